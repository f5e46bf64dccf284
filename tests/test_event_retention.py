"""METER_EVENT_RETENTION: usage events kept per license for WatchUsage (0 = none written)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import policy_pb2, usage_pb2
from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from meter_grpc.config import ConfigError, Settings
from meter_grpc.domain import watching
from meter_grpc.domain.errors import MeterError, Reason
from meter_grpc.domain.watching import WatchHub
from meter_grpc.server import build_server
from meter_grpc.storage import keys
from meter_grpc.storage.commands import RedisClient
from meter_grpc.storage.store import RedisStore
from tests.conftest import Running
from tests.support import (
    ADMIN_TOKEN,
    admin_md,
    license_md,
    rich_error,
    shared_key_secret_file,
)

# Stream nodes hold up to 100 entries (stream-node-max-entries); approximate trimming drops
# whole nodes only, so a stream keeps between N and N + 100 events.
NODE = 100


@asynccontextmanager
async def serving(
    running: Running, data_dir: Path, retention: int, **extra: Any
) -> AsyncIterator[tuple[lgrpc.LicenseServiceStub, ugrpc.UsageServiceStub]]:
    settings = Settings(
        listen="127.0.0.1:0",
        redis_url=running.redis_url,
        data_dir=data_dir,
        admin_tokens=[ADMIN_TOKEN],
        key_secret_file=shared_key_secret_file(),
        event_retention=retention,
        **extra,
    )
    service, port = await build_server(settings)
    await service.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield lgrpc.LicenseServiceStub(ch), ugrpc.UsageServiceStub(ch)
    finally:
        await service.stop(0)


async def _license(ls: lgrpc.LicenseServiceStub, **policy: Any) -> Any:
    p = (
        await ls.CreatePolicy(
            lpb.CreatePolicyRequest(policy=policy_pb2.Policy(name="retention", **policy)),
            metadata=admin_md(),
        )
    ).policy
    req = lpb.CreateLicenseRequest(license={"policy_id": p.id})
    return (await ls.CreateLicense(req, metadata=admin_md())).license


async def _increments(us: ugrpc.UsageServiceStub, license_id: str, n: int) -> None:
    # 16 callers at once over one connection: the counter must still be exact.
    async def caller(k: int) -> None:
        for _ in range(k):
            await us.IncrementUsage(
                upb.IncrementUsageRequest(license_id=license_id), metadata=admin_md()
            )

    per, extra = divmod(n, 16)
    await asyncio.gather(*(caller(per + (1 if i < extra else 0)) for i in range(16)))


@pytest.mark.parametrize("retention", [10, 250])
async def test_retention_n_keeps_the_newest_n_events(
    running: Running,
    redis: aioredis.Redis,
    tmp_path: Path,
    retention: int,
) -> None:
    async with serving(running, tmp_path, retention) as (ls, us):
        lic = await _license(ls)
        total = retention + 3 * NODE + 7
        await _increments(us, lic.id, total)
        assert (
            await us.GetUsage(upb.GetUsageRequest(license_id=lic.id), metadata=admin_md())
        ).uses == total
        stream = keys.license_events(lic.id)
        kept = await redis.xlen(stream)  # type: ignore[misc]
        assert retention <= kept <= retention + NODE
        # The newest ones are kept, in order: their `uses` run up to the total.
        entries = await redis.xrange(stream)  # type: ignore[misc]
        uses = [int(f["uses"]) for _, f in entries]
        assert uses == list(range(total - kept + 1, total + 1))
        # WatchUsage from the oldest retained event delivers exactly what is kept.
        call = us.WatchUsage(
            upb.WatchUsageRequest(license_id=lic.id, from_oldest=True),
            metadata=license_md(lic.key),
        )
        seen = []
        async for msg in call:
            seen.append(msg.event.uses)
            if len(seen) == kept:
                break
        call.cancel()
        assert seen == uses


async def test_retention_zero_writes_no_events_and_watch_is_refused(
    running: Running, redis: aioredis.Redis, tmp_path: Path
) -> None:
    async with serving(running, tmp_path, 0) as (ls, us):
        lic = await _license(ls, max_uses=50)
        md = admin_md()
        await _increments(us, lic.id, 50)
        # The limit, a decrement, a reset and a SyncUsage: none of them writes an event either.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await us.IncrementUsage(upb.IncrementUsageRequest(license_id=lic.id), metadata=md)
        assert rich_error(refused.value).reason == "USAGE_LIMIT_EXCEEDED"
        await us.DecrementUsage(upb.DecrementUsageRequest(license_id=lic.id), metadata=md)
        await us.SyncUsage(
            upb.SyncUsageRequest(
                license_id=lic.id, records=[usage_pb2.UsageRecord(id="r1", amount=1)]
            ),
            metadata=md,
        )
        await us.ResetUsage(upb.ResetUsageRequest(license_id=lic.id), metadata=md)
        assert await redis.exists(keys.license_events(lic.id)) == 0
        assert (await us.GetUsage(upb.GetUsageRequest(license_id=lic.id), metadata=md)).uses == 0

        for request in (
            upb.WatchUsageRequest(license_id=lic.id),
            upb.WatchUsageRequest(license_id=lic.id, from_oldest=True),
        ):
            call = us.WatchUsage(request, metadata=license_md(lic.key))
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                async for _ in call:
                    pass
            err = rich_error(exc.value)
            assert err.code == grpc.StatusCode.FAILED_PRECONDITION
            assert (err.reason, err.domain) == ("USAGE_EVENTS_DISABLED", "meter.v1")
            assert err.metadata["event_retention"] == "0"
        # Bad input is still reported as such first.
        call = us.WatchUsage(upb.WatchUsageRequest(license_id="nope"), metadata=md)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            async for _ in call:
                pass
        assert rich_error(exc.value).bad_fields == ["license_id"]


def _env(value: str) -> Callable[[], Settings]:
    return lambda: Settings.from_env({"METER_EVENT_RETENTION": value})


async def test_retention_age_drops_older_events_when_the_next_is_written(
    running: Running, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """METER_EVENT_RETENTION_AGE: writing an event drops the license's events older than the
    age (by stream id), whatever the count; a watch from before them is told, not given a
    hole."""
    async with serving(running, tmp_path, 1000, event_retention_age_s=1.0) as (ls, us):
        lic = await _license(ls)
        await _increments(us, lic.id, 20)
        stream = keys.license_events(lic.id)
        old = await redis.xrange(stream)  # type: ignore[misc]
        assert len(old) == 20
        await asyncio.sleep(1.2)
        await _increments(us, lic.id, 3)
        kept = await redis.xrange(stream)  # type: ignore[misc]
        newest_ms = int(kept[-1][0].split("-")[0])
        assert [int(f["uses"]) for _, f in kept] == list(range(24 - len(kept), 24))
        assert 1 <= len(kept) <= 3  # none of the 20, and at most the 3 new ones
        assert all(int(i.split("-")[0]) >= newest_ms - 1000 for i, _ in kept)
        call = us.WatchUsage(
            upb.WatchUsageRequest(license_id=lic.id, after_event_id=old[0][0]),
            metadata=license_md(lic.key),
        )
        err = await _watch_error(call)
        assert err.reason == "USAGE_EVENTS_TRIMMED"
        assert err.metadata["oldest_event_id"] == kept[0][0]


def test_event_retention_age_setting() -> None:
    def age(value: str) -> float:
        return Settings.from_env({"METER_EVENT_RETENTION_AGE": value}).event_retention_age_s

    assert Settings.from_env({}).event_retention_age_s == 0
    assert age("0") == 0 and age("86400") == 86400 and age("0.5") == 0.5
    for bad in ("-1", "ten", "nan", "inf", "0.0001", "400000000", "1d"):
        with pytest.raises(ConfigError, match="METER_EVENT_RETENTION_AGE"):
            age(bad)


def test_event_retention_setting() -> None:
    assert Settings.from_env({}).event_retention == 1000
    assert _env("0")().event_retention == 0
    assert _env(" 25 ")().event_retention == 25
    assert _env("1000000")().event_retention == 1_000_000
    for bad in ("-1", "1e3", "ten", "1000001", "²", "99999999999"):
        with pytest.raises(ConfigError, match="METER_EVENT_RETENTION"):
            _env(bad)()


async def _watch_error(call: Any) -> Any:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for _ in call:
            pass
    return rich_error(exc.value)


async def test_watching_after_trimmed_events_is_told_never_given_a_hole(
    running: Running, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """A watch from a position whose next events were trimmed away ends at once with
    OUT_OF_RANGE / USAGE_EVENTS_TRIMMED naming the oldest event kept, instead of skipping to
    it; from a position still kept it goes on in order, and from_oldest starts with the
    oldest kept."""
    async with serving(running, tmp_path, 10) as (ls, us):
        lic = await _license(ls)
        md = license_md(lic.key)
        stream = keys.license_events(lic.id)
        await _increments(us, lic.id, 1)
        ((first_id, _),) = await redis.xrange(stream)  # type: ignore[misc]
        total = 10 + 3 * NODE + 7
        await _increments(us, lic.id, total - 1)
        entries = await redis.xrange(stream)  # type: ignore[misc]
        oldest, kept = entries[0][0], len(entries)
        assert kept < total  # trimmed
        for after in (first_id, "0-0"):
            err = await _watch_error(
                us.WatchUsage(
                    upb.WatchUsageRequest(license_id=lic.id, after_event_id=after), metadata=md
                )
            )
            assert err.code == grpc.StatusCode.OUT_OF_RANGE
            assert (err.reason, err.domain) == ("USAGE_EVENTS_TRIMMED", "meter.v1")
            assert err.metadata == {
                "license_id": lic.id,
                "after_event_id": after,
                "oldest_event_id": oldest,
            }
        # From the oldest kept event: what follows it, in order, and no error.
        call = us.WatchUsage(
            upb.WatchUsageRequest(license_id=lic.id, after_event_id=oldest), metadata=md
        )
        seen = []
        async for msg in call:
            seen.append(msg.event.uses)
            if len(seen) == kept - 1:
                break
        call.cancel()
        assert seen == list(range(total - kept + 2, total + 1))


async def test_a_watcher_that_falls_behind_the_retained_events_is_told(
    running: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watcher (queue of 1 event) that stops taking events while hundreds are made, more
    than are kept: it gets the events queued for it, then USAGE_EVENTS_TRIMMED when it would
    read on from a position whose next events are gone, never a stream with a hole."""
    monkeypatch.setattr(watching, "WATCH_QUEUE", 1)
    async with serving(running, tmp_path, 10) as (ls, us):
        lic = await _license(ls)
        store = RedisStore(RedisClient(running.redis_url), event_retention=10)
        hub = WatchHub(store)
        try:
            newest = await store.last_event_id(lic.id)
            events = hub.events(lic.id, newest, newest)
            pending = asyncio.ensure_future(anext(events))
            await asyncio.sleep(0.2)  # its feed's read is in place
            await _increments(us, lic.id, 1)
            got = [(await asyncio.wait_for(pending, 10)).uses]
            await _increments(us, lic.id, 10 + 3 * NODE + 7)

            async def take_all() -> None:
                while True:
                    got.append((await asyncio.wait_for(anext(events), 10)).uses)

            with pytest.raises(MeterError) as exc:
                await take_all()
            assert exc.value.reason == Reason.USAGE_EVENTS_TRIMMED
            assert got == list(range(1, len(got) + 1))  # in order, no hole
            assert exc.value.metadata["after_event_id"] != exc.value.metadata["oldest_event_id"]
            await events.aclose()
        finally:
            await hub.close()
            await store.close()
