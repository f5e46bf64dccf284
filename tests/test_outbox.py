"""The outbox of the usage export: every counted change appended by the script that moves the
counter (storage/lua/common.lua `outbox`), into the stream of the license's own slot, only when
export is on; on the embedded server and the Cluster."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import policy_pb2
from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from meter_grpc.domain import periods
from meter_grpc.storage import keys
from meter_grpc.storage.commands import RedisClient
from meter_grpc.storage.store import RedisStore
from tests.conftest import Running
from tests.support import admin_md


@pytest.fixture
async def stores(running: Running) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    """(export on, export off) stores on the service's Redis, without an exporter."""
    on = RedisStore(RedisClient(running.redis_url), export=True)
    off = RedisStore(RedisClient(running.redis_url), export=False)
    yield on, off
    await on.close()
    await off.close()


async def _license(channel: grpc.aio.Channel, **policy: Any) -> Any:
    ls = lgrpc.LicenseServiceStub(channel)
    p = (
        await ls.CreatePolicy(
            lpb.CreatePolicyRequest(policy=policy_pb2.Policy(name="outbox", **policy)),
            metadata=admin_md(),
        )
    ).policy
    req = lpb.CreateLicenseRequest(license={"policy_id": p.id})
    return (await ls.CreateLicense(req, metadata=admin_md())).license


async def _entries(redis: aioredis.Redis, license_id: str) -> list[dict[str, str]]:
    rows = await redis.xrange(keys.outbox(license_id))  # type: ignore[misc]
    return [f for _, f in rows if f["id"].rpartition(":")[0] == license_id]


def test_outbox_stream_shares_the_license_slot() -> None:
    for i in range(2000):
        lid = f"lic-{i}"
        assert keys.slot_of(keys.outbox(lid)) == keys.slot_of(keys.license(lid))
    # Every slot has its own stream name.
    names = {keys.outbox_of_slot(s) for s in range(keys.SLOTS)}
    assert len(names) == keys.SLOTS
    assert all(keys.slot_of(keys.outbox_of_slot(s)) == s for s in range(0, keys.SLOTS, 97))


async def test_every_counted_change_is_appended_once_with_a_deterministic_id(
    running: Running,
    channel: grpc.aio.Channel,
    redis: aioredis.Redis,
    stores: tuple[RedisStore, RedisStore],
) -> None:
    on, off = stores
    lic = await _license(channel, max_uses=100)
    now = running.clock.now_ms()
    bounds = periods.period_bounds_arg(now)

    async def usage(store: RedisStore, op: str, amount: int = 1, rid: str = "") -> Any:
        return await store.usage(
            lic.id, op, amount=amount, request_id=rid, now_ms=now, periods=bounds
        )

    # Export off: nothing appended, the counter still moves.
    await usage(off, "inc", 3)
    assert await _entries(redis, lic.id) == []
    # Export on: an increment, a decrement, an idempotent retry, a refusal, a reset, a sync.
    await usage(on, "inc", 5, "r-1")
    again = await usage(on, "inc", 5, "r-1")
    assert again.usage.replayed and again.usage.uses == 8
    await usage(on, "dec", 2)
    refused = await usage(on, "inc", 1000)
    assert refused.status.name == "USAGE_LIMIT_EXCEEDED"
    await usage(on, "reset")
    await usage(on, "reset")  # 0 -> 0: no change, nothing appended
    synced = await on.sync_usage(
        lic.id, [("s1", 4), ("s1", 4), ("s2", 2)], now_ms=now, periods=bounds
    )
    assert synced is not None and synced[0] == 6
    got = await _entries(redis, lic.id)
    assert [(e["k"], int(e["d"]), int(e["u"]), e["rid"]) for e in got] == [
        ("increment", 5, 8, "r-1"),
        ("decrement", -2, 6, ""),
        ("reset", -6, 0, ""),
        ("sync", 4, 4, "s1"),
        ("sync", 2, 6, "s2"),
    ]
    assert [e["id"] for e in got] == [f"{lic.id}:{n}" for n in range(1, 6)]
    assert all(set(e) == {"id", "k", "d", "u", "rid", "t"} for e in got)
    assert {int(e["t"]) for e in got} == {now}
    # The deltas since export was on add up to the counter's move since then (from 3 to 6).
    assert sum(int(e["d"]) for e in got) == 6 - 3


async def test_concurrent_changes_get_distinct_consecutive_ids(
    running: Running,
    channel: grpc.aio.Channel,
    redis: aioredis.Redis,
    stores: tuple[RedisStore, RedisStore],
) -> None:
    on, _ = stores
    lic = await _license(channel)
    now = running.clock.now_ms()
    bounds = periods.period_bounds_arg(now)

    async def caller(k: int) -> None:
        for i in range(50):
            op = "dec" if i % 5 == 4 else "inc"
            await on.usage(lic.id, op, amount=1, request_id="", now_ms=now, periods=bounds)

    await asyncio.gather(*(caller(k) for k in range(16)))
    got = await _entries(redis, lic.id)
    assert len(got) == 16 * 50
    assert sorted(int(e["id"].rsplit(":", 1)[1]) for e in got) == list(range(1, 801))
    # In stream order the ids count up and each `uses` is the previous one plus the delta.
    uses = 0
    for n, e in enumerate(got, 1):
        assert e["id"] == f"{lic.id}:{n}"
        uses += int(e["d"])
        assert int(e["u"]) == uses
    us = ugrpc.UsageServiceStub(channel)
    reply = await us.GetUsage(upb.GetUsageRequest(license_id=lic.id), metadata=admin_md())
    assert reply.uses == uses == 16 * 30


async def test_a_period_rollover_appends_a_reset(
    running: Running,
    channel: grpc.aio.Channel,
    redis: aioredis.Redis,
    stores: tuple[RedisStore, RedisStore],
) -> None:
    on, _ = stores
    lic = await _license(channel, usage_reset_interval=policy_pb2.USAGE_RESET_INTERVAL_DAILY)
    now = running.clock.now_ms()
    await on.usage(
        lic.id, "inc", amount=7, request_id="", now_ms=now, periods=periods.period_bounds_arg(now)
    )
    later = now + 2 * 86_400_000
    await on.usage(
        lic.id, "inc", amount=2, request_id="", now_ms=later,
        periods=periods.period_bounds_arg(later),
    )  # fmt: skip
    got = await _entries(redis, lic.id)
    assert [(e["k"], int(e["d"]), int(e["u"])) for e in got] == [
        ("increment", 7, 7),
        ("reset", -7, 0),
        ("increment", 2, 2),
    ]
