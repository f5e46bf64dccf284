"""The usage export's outbox with meters and reservations: a meter's changes carry `m` (the
exporter's ExportEvent.meter), the license counter's entries keep their earlier shape."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio as aioredis

from meter.v1 import policy_pb2
from meter_grpc.domain import ids, periods
from meter_grpc.export.exporter import event_of
from meter_grpc.storage.commands import RedisClient
from meter_grpc.storage.store import RedisStore
from tests.conftest import Running
from tests.test_outbox import _entries, _license


@pytest.fixture
async def store(running: Running) -> AsyncIterator[RedisStore]:
    on = RedisStore(RedisClient(running.redis_url), export=True)
    yield on
    await on.close()


async def test_meter_changes_and_commits_reach_the_outbox_with_their_meter(
    running: Running, channel: grpc.aio.Channel, redis: aioredis.Redis, store: RedisStore
) -> None:
    lic = await _license(channel, max_uses=100, meters=[policy_pb2.Meter(code="GPU", max_uses=50)])
    now = running.clock.now_ms()
    bounds = periods.period_bounds_arg(now)
    common = {"request_id": "", "now_ms": now, "periods": bounds}
    await store.usage(lic.id, "inc", amount=3, **common)
    await store.usage(lic.id, "inc", amount=5, meter="GPU", **common)
    await store.usage(lic.id, "dec", amount=2, meter="GPU", **common)
    held = await store.reservation(
        lic.id, "reserve", ["GPU", 10, 60_000, ids.new_id(), 1000], **common
    )
    assert held.status.name == "OK"
    done = await store.reservation(lic.id, "commit", [held.answer.reservation.id, 7], **common)
    assert done.status.name == "OK" and done.answer.usage.usage.uses == 10
    synced = await store.sync_usage(lic.id, [("s1", 4, "GPU")], now_ms=now, periods=bounds)
    assert synced is not None and synced[1] == ["APPLIED"]
    got = await _entries(redis, lic.id)
    assert [(e["k"], int(e["d"]), int(e["u"]), e.get("m")) for e in got] == [
        ("increment", 3, 3, None),  # the license counter's entry: no `m`, as before
        ("increment", 5, 5, "GPU"),
        ("decrement", -2, 3, "GPU"),
        ("increment", 7, 10, "GPU"),  # the commit: what was used, not what was held
        ("sync", 4, 14, "GPU"),
    ]
    events = [event_of(e) for e in got]
    assert [e.meter for e in events] == ["", "GPU", "GPU", "GPU", "GPU"]
