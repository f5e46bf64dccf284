"""WatchUsage under load (issue 8, item 3): one store reader per watched license, streams
capped per license key and per process, and another license's watcher unaffected.

Over real gRPC on real ports, on the embedded server and on a Cluster: a license key holds
its maximum of streams and one more is refused (RESOURCE_EXHAUSTED, WATCH_LIMIT_EXCEEDED);
meanwhile another license's watcher gets its events promptly (the p99 is printed; the strict
figure is in bench/watch.py); every watcher of a license gets every event, in order, exactly
once, including a watcher far slower than the events; slots come back when streams end;
4,000 watchers hold a handful of store connections; a store restart ends the watchers with
UNAVAILABLE and watching works again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import policy_pb2, usage_pb2
from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from meter_grpc.client import AsyncMeterClient, WatchLimitExceeded
from meter_grpc.config import ConfigError, Settings
from meter_grpc.domain import watching
from meter_grpc.domain.watching import DEFAULT_WATCH_PER_KEY, WatchHub
from meter_grpc.server import Service, build_server
from meter_grpc.storage import keys
from meter_grpc.storage.store import RedisStore
from meter_grpc.storage.transport import is_cluster_url
from tests.cluster import SLOTS, LocalCluster
from tests.conftest import Running
from tests.support import (
    ADMIN_TOKEN,
    admin_md,
    license_md,
    rich_error,
    shared_key_secret_file,
    until,
)

WAIT_S = 30.0  # bound on waiting for a condition that a correct service meets at once


async def subscribe(
    usage: ugrpc.UsageServiceStub, license_id: str, md: Any, **fields: Any
) -> grpc.aio.UnaryStreamCall[Any, Any]:
    """A WatchUsage stream whose headers came: every later change reaches it."""
    call = usage.WatchUsage(upb.WatchUsageRequest(license_id=license_id, **fields), metadata=md)
    await asyncio.wait_for(call.initial_metadata(), WAIT_S)
    return call


async def collect(call: Any, n: int) -> list[usage_pb2.UsageEvent]:
    out: list[usage_pb2.UsageEvent] = []
    async for msg in call:
        out.append(msg.event)
        if len(out) == n:
            break
    return out


async def refused(call: Any) -> Any:
    """The rich error a WatchUsage stream ends with (it must end with one)."""
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as exc:
        return rich_error(exc)
    raise AssertionError("the stream ended without an error")


async def increment_all(
    usage: ugrpc.UsageServiceStub, license_id: str, n: int, callers: int, prefix: str
) -> None:
    """n increments of 1 on one license by `callers` concurrent callers."""
    todo = iter(range(n))

    async def caller() -> None:
        for i in todo:
            await usage.IncrementUsage(
                upb.IncrementUsageRequest(license_id=license_id, request_id=f"{prefix}{i}"),
                metadata=admin_md(),
            )

    await asyncio.gather(*(caller() for _ in range(callers)))


def assert_complete(events: Sequence[usage_pb2.UsageEvent], n: int) -> None:
    """n increments of 1 from 0: every one, in order, once (uses 1..n in event id order)."""
    ids = [tuple(int(x) for x in e.event_id.split("-")) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), "events out of order or repeated"
    assert [e.uses for e in events] == list(range(1, n + 1))
    assert all(e.type == usage_pb2.USAGE_EVENT_TYPE_INCREMENTED for e in events)


def p99(samples: Sequence[float]) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[98]


# --- caps on the session server (METER_WATCH_PER_KEY = 16) -------------------------------------


async def test_a_key_at_its_cap_is_refused_one_more_and_another_license_is_unaffected(
    usage: ugrpc.UsageServiceStub, make_license: Any, running: Running
) -> None:
    """Key A opens its 16 streams; the 17th is refused with RESOURCE_EXHAUSTED naming the
    limit, while admin streams of A are not counted per key. With A's 16 watchers busy (A's
    license incremented all along), license B's watcher gets each of 200 events promptly.
    Then every one of A's watchers has every event of A, in order."""
    a, b = await make_license(), await make_license()
    cap = DEFAULT_WATCH_PER_KEY
    watchers = [await subscribe(usage, a.id, license_md(a.key)) for _ in range(cap)]
    err = await refused(
        usage.WatchUsage(upb.WatchUsageRequest(license_id=a.id), metadata=license_md(a.key))
    )
    assert (err.code, err.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "WATCH_LIMIT_EXCEEDED")
    assert err.metadata == {
        "limit": str(cap),
        "open_streams": str(cap),
        "scope": "license_key",
        "setting": "METER_WATCH_PER_KEY",
        "license_id": a.id,
    }
    assert err.quota_subjects == [f"license:{a.id}"]
    assert running.service.metering.hub.by_key[a.id] == cap  # the refused one counted nothing
    admin_watch = await subscribe(usage, a.id, admin_md())  # admin: only the process cap

    n_a, n_b = 300, 200
    collecting = [asyncio.create_task(collect(w, n_a)) for w in [*watchers, admin_watch]]
    b_watch = await subscribe(usage, b.id, license_md(b.key))
    arrived: dict[str, float] = {}

    async def watch_b() -> None:
        async for msg in b_watch:
            arrived[msg.event.request_id] = time.perf_counter()
            if len(arrived) == n_b:
                return

    b_reader = asyncio.create_task(watch_b())

    async def load_a() -> None:  # A busy all along: each event of A goes to its 17 watchers
        for i in range(n_a):
            await usage.IncrementUsage(
                upb.IncrementUsageRequest(license_id=a.id, request_id=f"a{i}"),
                metadata=license_md(a.key),
            )
            await asyncio.sleep(0.005)

    a_load = asyncio.create_task(load_a())
    latencies = []
    for i in range(n_b):
        start = time.perf_counter()
        await usage.IncrementUsage(
            upb.IncrementUsageRequest(license_id=b.id, request_id=f"b{i}"),
            metadata=license_md(b.key),
        )
        await until(lambda i=i: f"b{i}" in arrived, WAIT_S, f"event b{i}")
        latencies.append(arrived[f"b{i}"] - start)
    await asyncio.wait_for(b_reader, WAIT_S)
    await asyncio.wait_for(a_load, WAIT_S)
    print(
        f"\nanother license's watcher, one key at its cap of {cap} (busy): "
        f"p50 {statistics.median(latencies) * 1000:.1f} ms, "
        f"p99 {p99(latencies) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms "
        f"over {n_b} events (increment + event; client and server share one event loop)"
    )
    assert p99(latencies) < 1.0  # a sanity bound; bench/watch.py measures the real figure
    results = await asyncio.wait_for(asyncio.gather(*collecting), WAIT_S)
    for events in results:
        assert_complete(events, n_a)
    assert len({tuple(e.event_id for e in events) for events in results}) == 1
    for call in [*watchers, admin_watch, b_watch]:
        call.cancel()
    hub = running.service.metering.hub
    await until(lambda: a.id not in hub.by_key and b.id not in hub.by_key, WAIT_S, "slots back")


async def test_slots_come_back_after_cancel_and_disconnect_with_no_leak(
    usage: ugrpc.UsageServiceStub, make_license: Any, running: Running
) -> None:
    """20 rounds of a key filling its cap then cancelling every stream, and streams lost with
    their channel: afterwards the key opens exactly its cap again, and one more is refused."""
    lic = await make_license()
    hub = running.service.metering.hub
    cap = DEFAULT_WATCH_PER_KEY
    base = hub.streams
    for _ in range(20):
        calls = await asyncio.gather(
            *(subscribe(usage, lic.id, license_md(lic.key)) for _ in range(cap))
        )
        assert hub.by_key[lic.id] == cap
        for call in calls:
            call.cancel()
        await until(lambda: lic.id not in hub.by_key, WAIT_S, "the slots to come back")
    # A client that goes away without cancelling: its channel closes under open streams.
    async with grpc.aio.insecure_channel(running.target) as channel:
        gone = ugrpc.UsageServiceStub(channel)
        await asyncio.gather(*(subscribe(gone, lic.id, license_md(lic.key)) for _ in range(cap)))
        assert hub.by_key[lic.id] == cap
    await until(lambda: lic.id not in hub.by_key, WAIT_S, "the slots of a closed channel")
    assert hub.streams == base
    calls = [await subscribe(usage, lic.id, license_md(lic.key)) for _ in range(cap)]
    err = await refused(
        usage.WatchUsage(upb.WatchUsageRequest(license_id=lic.id), metadata=license_md(lic.key))
    )
    assert err.reason == "WATCH_LIMIT_EXCEEDED"
    # The streams still open work: one event reaches all of them.
    await usage.IncrementUsage(upb.IncrementUsageRequest(license_id=lic.id), metadata=admin_md())
    for events in await asyncio.wait_for(asyncio.gather(*(collect(c, 1) for c in calls)), WAIT_S):
        assert [e.uses for e in events] == [1]
    for call in calls:
        call.cancel()
    await until(lambda: lic.id not in hub.by_key, WAIT_S, "the slots to come back")


async def test_the_python_client_raises_watch_limit_exceeded(
    usage: ugrpc.UsageServiceStub, make_license: Any, running: Running
) -> None:
    lic = await make_license()
    calls = [
        await subscribe(usage, lic.id, license_md(lic.key)) for _ in range(DEFAULT_WATCH_PER_KEY)
    ]
    async with AsyncMeterClient(running.target, license_key=lic.key) as client:
        with pytest.raises(WatchLimitExceeded) as info:
            async for _ in client.watch_usage(lic.id):
                pass
    err = info.value
    assert (err.code, err.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "WATCH_LIMIT_EXCEEDED")
    assert (err.metadata["scope"], err.metadata["setting"]) == (
        "license_key",
        "METER_WATCH_PER_KEY",
    )
    for call in calls:
        call.cancel()


async def test_a_slow_watcher_reads_on_its_own_and_misses_nothing(
    usage: ugrpc.UsageServiceStub,
    make_license: Any,
    running: Running,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With per-watcher queues of 1 event, watchers fall behind their license's reader on
    any batch of 2 events or more (gRPC's own buffers take what a client does not read yet,
    so a slow client alone does not make a slow server-side watcher) and catch up by reading
    the store themselves; each then has all 400 events in order, as has the watcher that
    kept up, and new events still reach all of them through the shared reader."""
    monkeypatch.setattr(watching, "WATCH_QUEUE", 1)
    catch_ups = 0
    original = WatchHub._catch_up

    async def counted(self: WatchHub, *args: Any) -> None:
        nonlocal catch_ups
        catch_ups += 1
        await original(self, *args)

    monkeypatch.setattr(WatchHub, "_catch_up", counted)
    # The shared reader pauses before each blocking read, so that events pile up and each
    # read returns a batch (otherwise a fast reader may take them one at a time and no
    # watcher ever falls behind).
    read_events = RedisStore.read_events

    async def batching(self: RedisStore, *args: Any) -> Any:
        if args[2] is not None:  # block_ms: the license's shared reader
            await asyncio.sleep(0.05)
        return await read_events(self, *args)

    monkeypatch.setattr(RedisStore, "read_events", batching)
    lic = await make_license()
    md = license_md(lic.key)
    fast = await subscribe(usage, lic.id, md)
    slow = [await subscribe(usage, lic.id, md) for _ in range(3)]
    n = 400
    keeping_up = asyncio.create_task(collect(fast, n))
    await increment_all(usage, lic.id, n, 8, "s")
    assert_complete(await asyncio.wait_for(keeping_up, WAIT_S), n)
    for call in slow:  # only now do they read
        assert_complete(await asyncio.wait_for(collect(call, n), WAIT_S), n)
    assert catch_ups > 0  # they did fall behind, and read on their own
    await usage.IncrementUsage(upb.IncrementUsageRequest(license_id=lic.id), metadata=admin_md())
    for call in [fast, *slow]:
        (event,) = await asyncio.wait_for(collect(call, 1), WAIT_S)
        assert event.uses == n + 1
        call.cancel()


async def test_from_oldest_and_after_event_id_join_a_running_reader(
    usage: ugrpc.UsageServiceStub, make_license: Any
) -> None:
    """Watchers that start behind the license's reader (from the oldest event, or after an
    older event) read up to it by themselves, then go on with it, in order."""
    lic = await make_license()
    md = admin_md()
    live = await subscribe(usage, lic.id, md)
    await increment_all(usage, lic.id, 50, 1, "o")
    first = await asyncio.wait_for(collect(live, 50), WAIT_S)
    oldest = await subscribe(usage, lic.id, md, from_oldest=True)
    after = await subscribe(usage, lic.id, md, after_event_id=first[9].event_id)
    await increment_all(usage, lic.id, 50, 4, "p")
    assert_complete([*first, *await asyncio.wait_for(collect(live, 50), WAIT_S)], 100)
    assert_complete(await asyncio.wait_for(collect(oldest, 100), WAIT_S), 100)
    rest = await asyncio.wait_for(collect(after, 90), WAIT_S)
    assert [e.uses for e in rest] == list(range(11, 101))
    for call in (live, oldest, after):
        call.cancel()


# --- a server of its own: the process cap, many watchers, a store restart ---------------------


@contextlib.asynccontextmanager
async def own_server(
    url: str, data_dir: Path, **settings: Any
) -> AsyncIterator[tuple[Service, grpc.aio.Channel]]:
    settings.setdefault("key_secret_file", shared_key_secret_file())  # the store's replicas
    service, port = await build_server(
        Settings(
            listen="127.0.0.1:0",
            redis_url=url,
            data_dir=data_dir,
            admin_tokens=[ADMIN_TOKEN],
            shutdown_grace_s=1,
            **settings,
        )
    )
    await service.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield service, channel
    finally:
        await service.stop(0)


async def new_license(channel: grpc.aio.Channel, **policy: Any) -> Any:
    licenses = lgrpc.LicenseServiceStub(channel)
    p = await licenses.CreatePolicy(
        lpb.CreatePolicyRequest(policy=policy_pb2.Policy(name="watch", **policy)),
        metadata=admin_md(),
    )
    resp = await licenses.CreateLicense(
        lpb.CreateLicenseRequest(license={"policy_id": p.policy.id}), metadata=admin_md()
    )
    return resp.license


async def test_the_process_cap_counts_admin_and_key_streams(redis_url: str, tmp_path: Path) -> None:
    async with own_server(redis_url, tmp_path / "d", watch_max=5, watch_per_key=3) as (
        service,
        channel,
    ):
        usage = ugrpc.UsageServiceStub(channel)
        a, b = await new_license(channel), await new_license(channel)
        calls = [await subscribe(usage, a.id, license_md(a.key)) for _ in range(3)]
        err = await refused(
            usage.WatchUsage(upb.WatchUsageRequest(license_id=a.id), metadata=license_md(a.key))
        )
        assert (err.reason, err.metadata["scope"], err.metadata["limit"]) == (
            "WATCH_LIMIT_EXCEEDED",
            "license_key",
            "3",
        )
        calls += [await subscribe(usage, b.id, admin_md()) for _ in range(2)]
        for md in (admin_md(), license_md(b.key)):
            err = await refused(
                usage.WatchUsage(upb.WatchUsageRequest(license_id=b.id), metadata=md)
            )
            assert (err.code, err.reason) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "WATCH_LIMIT_EXCEEDED",
            )
            assert err.metadata == {
                "limit": "5",
                "open_streams": "5",
                "scope": "process",
                "setting": "METER_WATCH_MAX",
            }
        calls.pop().cancel()
        await until(lambda: service.metering.hub.streams == 4, WAIT_S, "a slot back")
        calls.append(await subscribe(usage, b.id, license_md(b.key)))
        for call in calls:
            call.cancel()
        await until(lambda: service.metering.hub.streams == 0, WAIT_S, "every slot back")


async def test_licenses_watched_at_once_are_capped_and_idle_readers_make_room(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With room for 3 watched licenses: a 4th is refused (scope "licenses") while more
    watchers of the 3 are welcome; once one license has no watcher left, its reader (still
    in its blocking read) gives its connection to the next license."""
    monkeypatch.setattr(watching, "WATCH_LICENSES_MAX", 3)
    async with own_server(redis_url, tmp_path / "d") as (service, channel):
        usage = ugrpc.UsageServiceStub(channel)
        lics = [await new_license(channel) for _ in range(4)]
        calls = {lic.id: [await subscribe(usage, lic.id, admin_md())] for lic in lics[:3]}
        err = await refused(
            usage.WatchUsage(upb.WatchUsageRequest(license_id=lics[3].id), metadata=admin_md())
        )
        assert (err.code, err.reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "WATCH_LIMIT_EXCEEDED",
        )
        assert err.metadata == {"scope": "licenses", "limit": "3", "watched_licenses": "3"}
        calls[lics[0].id].append(await subscribe(usage, lics[0].id, license_md(lics[0].key)))
        hub = service.metering.hub
        for call in calls.pop(lics[0].id):
            call.cancel()
        await until(lambda: lics[0].id not in hub.licenses, WAIT_S, "license 0 unwatched")
        assert lics[0].id in hub.feeds  # its reader lingers in its blocking read
        calls[lics[3].id] = [await subscribe(usage, lics[3].id, admin_md())]
        assert lics[0].id not in hub.feeds and len(hub.feeds) == 3
        err = await refused(
            usage.WatchUsage(upb.WatchUsageRequest(license_id=lics[0].id), metadata=admin_md())
        )
        assert err.metadata["scope"] == "licenses"
        for lic in lics[1:]:
            await usage.IncrementUsage(
                upb.IncrementUsageRequest(license_id=lic.id, amount=2), metadata=admin_md()
            )
            (event,) = await asyncio.wait_for(collect(calls[lic.id][0], 1), WAIT_S)
            assert event.uses == 2
        for group in calls.values():
            for call in group:
                call.cancel()
        await until(lambda: hub.streams == 0 and not hub.licenses, WAIT_S, "every slot back")


async def _store_clients(url: str) -> tuple[int, int]:
    """(connections blocked in XREAD, all connections) on the store, over every node of a
    Cluster (CLIENT LIST; the connection asking is not counted)."""
    if is_cluster_url(url):
        nodes = [h.rsplit(":", 1) for h in url.split("://", 1)[1].split(",")]
        clients = [aioredis.Redis(host=h, port=int(p), decode_responses=True) for h, p in nodes]
    else:
        clients = [aioredis.Redis.from_url(url, decode_responses=True)]
    blocked = total = 0
    for client in clients:
        try:
            listed = await client.client_list()
            blocked += sum(1 for c in listed if c.get("cmd") == "xread")
            total += len(listed) - 1
        finally:
            await client.aclose()
    return blocked, total


@pytest.mark.slow
async def test_4000_watchers_share_a_reader_per_license(redis_url: str, tmp_path: Path) -> None:
    """4,000 admin watchers of 4 licenses: 4 blocking reads on the store, not 4,000, and each
    watcher gets each event of its license."""
    n, licenses_n = 4000, 4
    async with own_server(redis_url, tmp_path / "d") as (service, channel):
        usage = ugrpc.UsageServiceStub(channel)
        lics = [await new_license(channel) for _ in range(licenses_n)]
        blocked_before, before = await _store_clients(redis_url)
        calls = []
        for i in range(0, n, 200):
            calls += await asyncio.gather(
                *(subscribe(usage, lics[j % licenses_n].id, admin_md()) for j in range(i, i + 200))
            )
        assert service.metering.hub.streams == n
        assert len(service.metering.hub.feeds) == licenses_n
        blocked, total = await _store_clients(redis_url)
        print(
            f"\n{n} watchers of {licenses_n} licenses: {blocked - blocked_before} more blocked "
            f"XREADs, {total - before} more store connections"
        )
        assert blocked - blocked_before <= licenses_n
        assert total - before <= licenses_n
        for lic in lics:
            await usage.IncrementUsage(
                upb.IncrementUsageRequest(license_id=lic.id, amount=3), metadata=admin_md()
            )
        got = await asyncio.wait_for(asyncio.gather(*(collect(c, 1) for c in calls)), 120)
        assert all([e.uses for e in events] == [3] for events in got)
        for call in calls:
            call.cancel()
        await until(lambda: service.metering.hub.streams == 0, 60, "every slot back")


@pytest.mark.slow
async def test_embedded_store_restart_ends_watchers_with_unavailable_then_watching_resumes(
    tmp_path: Path,
) -> None:
    """The embedded valkey is killed under 8 watchers: each gets the events made before, then
    UNAVAILABLE (STORAGE_UNAVAILABLE, with RetryInfo); once the supervisor has restarted it,
    watching resumes after the last event received and misses nothing."""
    async with own_server("", tmp_path / "d") as (service, channel):
        assert service.embedded is not None
        usage = ugrpc.UsageServiceStub(channel)
        lic = await new_license(channel)
        md = license_md(lic.key)
        calls = [await subscribe(usage, lic.id, md) for _ in range(8)]
        await increment_all(usage, lic.id, 10, 2, "k")
        got = await asyncio.wait_for(asyncio.gather(*(collect(c, 10) for c in calls)), WAIT_S)
        for events in got:
            assert_complete(events, 10)
        pid = service.embedded.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        for call in calls:
            err = await asyncio.wait_for(refused(call), WAIT_S)
            assert (err.code, err.reason) == (grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE")
            assert err.retry_delay_ms > 0
        hub = service.metering.hub
        await until(lambda: hub.streams == 0 and not hub.feeds, WAIT_S, "the readers to end")
        await until(
            lambda: service.embedded is not None and service.embedded.restarts >= 1,
            WAIT_S,
            "the restart",
        )
        deadline = time.monotonic() + WAIT_S
        while True:  # the store answers again soon after its restart
            try:
                await usage.GetUsage(upb.GetUsageRequest(license_id=lic.id), metadata=md)
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        resumed = await subscribe(usage, lic.id, md, after_event_id=got[0][-1].event_id)
        live = await subscribe(usage, lic.id, md)
        await increment_all(usage, lic.id, 5, 1, "r")
        assert_complete([*got[0], *await asyncio.wait_for(collect(resumed, 5), WAIT_S)], 15)
        assert [e.uses for e in await asyncio.wait_for(collect(live, 5), WAIT_S)] == list(
            range(11, 16)
        )
        resumed.cancel()
        live.cancel()


def test_watch_settings_parse_and_refuse_what_cannot_be_used() -> None:
    s = Settings.from_env({})
    assert (s.watch_per_key, s.watch_max) == (DEFAULT_WATCH_PER_KEY, watching.DEFAULT_WATCH_MAX)
    s = Settings.from_env({"METER_WATCH_PER_KEY": " 4 ", "METER_WATCH_MAX": "250"})
    assert (s.watch_per_key, s.watch_max) == (4, 250)
    for name in ("METER_WATCH_PER_KEY", "METER_WATCH_MAX"):
        for bad in ("0", "-1", "1.5", "lots", "1e3", "1234567890"):
            with pytest.raises(ConfigError) as info:
                Settings.from_env({name: bad})
            assert str(info.value).startswith(f"{name}={bad!r} ")
            assert "whole number >= 1" in str(info.value)


@pytest.mark.cluster
@pytest.mark.slow
async def test_cluster_node_restart_ends_its_watchers_then_watching_resumes(
    tmp_path: Path,
) -> None:
    """A Cluster primary stops under the watchers of a license it holds: they get the
    events made before, then UNAVAILABLE; once it is back, watching resumes after the last
    event received and misses nothing, and the license's reader works again. A watcher of a
    license on another node keeps its stream through it all."""
    cluster = LocalCluster(tmp_path / "nodes", persistent=True)
    await cluster.start()
    try:
        async with own_server(cluster.url, tmp_path / "d") as (service, channel):
            usage = ugrpc.UsageServiceStub(channel)
            per = SLOTS // len(cluster.ports)

            def node_of(license_id: str) -> int:
                slot = key_slot(keys.license(license_id).encode())
                return min(slot // per, len(cluster.ports) - 1)

            lics = [await new_license(channel) for _ in range(12)]
            victim = next(lic for lic in lics if node_of(lic.id) == 0)
            other = next(lic for lic in lics if node_of(lic.id) != 0)
            md = admin_md()
            calls = [await subscribe(usage, victim.id, md) for _ in range(4)]
            bystander = await subscribe(usage, other.id, md)
            await increment_all(usage, victim.id, 5, 1, "v")
            got = await asyncio.wait_for(asyncio.gather(*(collect(c, 5) for c in calls)), WAIT_S)
            for events in got:
                assert_complete(events, 5)
            await cluster.stop_node(0)
            try:
                for call in calls:
                    err = await asyncio.wait_for(refused(call), WAIT_S)
                    assert (err.code, err.reason) == (
                        grpc.StatusCode.UNAVAILABLE,
                        "STORAGE_UNAVAILABLE",
                    )
            finally:
                await cluster.start_node(0)
            deadline = time.monotonic() + WAIT_S
            while True:
                try:
                    await usage.GetUsage(upb.GetUsageRequest(license_id=victim.id), metadata=md)
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)
            resumed = await subscribe(usage, victim.id, md, after_event_id=got[0][-1].event_id)
            await increment_all(usage, victim.id, 5, 1, "w")
            tail = await asyncio.wait_for(collect(resumed, 5), WAIT_S)
            assert_complete([*got[0], *tail], 10)
            assert not service.metering.hub.feeds[victim.id].ended  # a new reader, working
            await usage.IncrementUsage(
                upb.IncrementUsageRequest(license_id=other.id, amount=4), metadata=md
            )
            (event,) = await asyncio.wait_for(collect(bystander, 1), WAIT_S)
            assert event.uses == 4
            resumed.cancel()
            bystander.cancel()
    finally:
        await cluster.stop()
