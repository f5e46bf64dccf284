"""Bounded per-caller resources (README "Limits and bounds"), over real connections: the cap of
machines per license, metadata size, ListMachines from its id index, CheckOutLicense off the
event loop, the gRPC server's bounds and the bounded send queue toward Redis."""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf import field_mask_pb2

from meter.v1 import license_pb2, policy_pb2
from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from meter_grpc.config import Settings
from meter_grpc.domain.clock import ManualClock
from meter_grpc.server import Service, build_server
from meter_grpc.storage import keys
from meter_grpc.storage.commands import RedisClient
from meter_grpc.storage.transport import is_cluster_url
from tests.cluster import redis_py_cluster
from tests.support import (
    ADMIN_TOKEN,
    admin_md,
    expect_error,
    license_md,
    rich_error,
    shared_key_secret_file,
)

FLOATING = {"floating": True}


class Bounded:
    """A meter-grpc server of the test's own, with some bounds set low."""

    def __init__(self, service: Service, port: int, clock: ManualClock, redis_url: str) -> None:
        self.service, self.port, self.clock, self.redis_url = service, port, clock, redis_url
        self.target = f"127.0.0.1:{port}"

    def channel(self, **options: Any) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.target, options=list(options.items()))

    def redis(self) -> Any:
        if is_cluster_url(self.redis_url):
            return redis_py_cluster(self.redis_url)
        return aioredis.Redis.from_url(self.redis_url, decode_responses=True)


@pytest.fixture
async def bounded(redis_url: str, tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """start(**settings): a server of the test's own on the backend of the test."""
    async for start in _servers(redis_url, tmp_path):
        yield start


@pytest.fixture
async def bounded_embedded(
    embedded_url: str, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """The same on the embedded server only, for bounds of the gRPC side."""
    async for start in _servers(embedded_url, tmp_path):
        yield start


async def _servers(redis_url: str, tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    started: list[Service] = []

    async def start(**bounds: Any) -> Bounded:
        clock = ManualClock()
        settings = Settings(
            listen="127.0.0.1:0",
            redis_url=redis_url,
            data_dir=tmp_path / f"data{len(started)}",
            admin_tokens=[ADMIN_TOKEN],
            clock=clock,
            shutdown_grace_s=1,
            key_secret_file=shared_key_secret_file(),  # the store's other replicas use it
            **bounds,
        )
        service, port = await build_server(settings)
        await service.start()
        started.append(service)
        return Bounded(service, port, clock, redis_url)

    yield start
    for service in started:
        await service.stop(0)


async def _license(licenses: lgrpc.LicenseServiceStub, **policy_fields: Any) -> license_pb2.License:
    policy = (
        await licenses.CreatePolicy(
            lpb.CreatePolicyRequest(policy=policy_pb2.Policy(name="bounds", **policy_fields)),
            metadata=admin_md(),
        )
    ).policy
    resp = await licenses.CreateLicense(
        lpb.CreateLicenseRequest(license=license_pb2.License(policy_id=policy.id)),
        metadata=admin_md(),
    )
    return resp.license


async def _outcome(call: Any) -> Any:
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        return rich_error(exc)


# --- machines per license -----------------------------------------------------------------


async def test_machine_cap_holds_under_concurrent_activations(bounded: Any) -> None:
    """120 activations at once over 4 channels (admin and license key) against a cap of 25:
    exactly 25 machines, every other call MACHINE_LIMIT_EXCEEDED naming the server's limit."""
    srv = await bounded(max_machines_per_license=25)
    channels = [srv.channel() for _ in range(4)]
    try:
        stubs = [lgrpc.LicenseServiceStub(ch) for ch in channels]
        lic = await _license(stubs[0], **FLOATING)  # no max_machines at all
        calls = [
            _outcome(
                stubs[i % 4].ActivateMachine(
                    lpb.ActivateMachineRequest(
                        license_id=lic.id,
                        fingerprint=f"fp-{i}",
                        request_id=f"act-{i}" if i % 3 == 0 else "",
                    ),
                    metadata=license_md(lic.key) if i % 2 else admin_md(),
                )
            )
            for i in range(120)
        ]
        results = await asyncio.gather(*calls)
        ok = [r for r in results if isinstance(r, lpb.ActivateMachineResponse)]
        refused = [r for r in results if not isinstance(r, lpb.ActivateMachineResponse)]
        assert len(ok) == 25 and len(refused) == 95
        for err in refused:
            assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert err.reason == "MACHINE_LIMIT_EXCEEDED"
            assert err.metadata == {
                "license_id": lic.id,
                "limit": "25",
                "overage_limit": "25",
                "machines": "25",
                "requested": "1",
                "limit_source": "server",
            }
            assert err.quota_subjects == [f"license:{lic.id}"]
        redis = srv.redis()
        try:
            assert await redis.hlen(keys.machines(lic.id)) == 25
            assert await redis.zcard(keys.machine_order(lic.id)) == 25
            assert await redis.hlen(keys.fingerprints(lic.id)) == 25
            assert await redis.hget(keys.license(lic.id), "machines") == "25"
        finally:
            await redis.aclose()
        # A refusal under a request_id is replayed, and changes nothing.
        first_refused = next(
            i
            for i, r in enumerate(results)
            if i % 3 == 0 and not isinstance(r, lpb.ActivateMachineResponse)
        )
        again = await expect_error(
            stubs[0].ActivateMachine(
                lpb.ActivateMachineRequest(
                    license_id=lic.id,
                    fingerprint=f"fp-{first_refused}",
                    request_id=f"act-{first_refused}",
                ),
                metadata=admin_md(),
            )
        )
        assert again.metadata["limit_source"] == "server"
        # One deactivation makes room for exactly one more.
        await stubs[0].DeactivateMachine(
            lpb.DeactivateMachineRequest(id=ok[0].machine.id), metadata=admin_md()
        )
        more = await asyncio.gather(
            *(
                _outcome(
                    stubs[1].ActivateMachine(
                        lpb.ActivateMachineRequest(license_id=lic.id, fingerprint=f"new-{i}"),
                        metadata=admin_md(),
                    )
                )
                for i in range(10)
            )
        )
        assert sum(isinstance(r, lpb.ActivateMachineResponse) for r in more) == 1
    finally:
        for ch in channels:
            await ch.close()


async def test_machine_cap_and_the_license_limit_name_their_source(bounded: Any) -> None:
    srv = await bounded(max_machines_per_license=5)
    async with srv.channel() as ch:
        licenses = lgrpc.LicenseServiceStub(ch)
        above = await _license(licenses, floating=True, max_machines=8)
        below = await _license(licenses, floating=True, max_machines=3)
        for lic, allowed, source, limit in ((above, 5, "server", "5"), (below, 3, "license", "3")):
            results = await asyncio.gather(
                *(
                    _outcome(
                        licenses.ActivateMachine(
                            lpb.ActivateMachineRequest(license_id=lic.id, fingerprint=f"f{i}"),
                            metadata=admin_md(),
                        )
                    )
                    for i in range(12)
                )
            )
            refused = [r for r in results if not isinstance(r, lpb.ActivateMachineResponse)]
            assert len(results) - len(refused) == allowed
            assert {
                (e.reason, e.metadata["limit_source"], e.metadata["limit"]) for e in refused
            } == {("MACHINE_LIMIT_EXCEEDED", source, limit)}


def test_the_machine_cap_is_a_setting() -> None:
    from meter_grpc.config import ConfigError

    assert Settings.from_env({}).max_machines_per_license == 10_000
    assert (
        Settings.from_env({"METER_MAX_MACHINES_PER_LICENSE": "50"}).max_machines_per_license == 50
    )
    for bad in ("0", "-1", "ten", "1.5"):
        with pytest.raises(ConfigError, match="METER_MAX_MACHINES_PER_LICENSE"):
            Settings.from_env({"METER_MAX_MACHINES_PER_LICENSE": bad})
    for name, bad in (
        ("METER_CHECKOUT_WORKERS", "0"),
        ("METER_MAX_CONCURRENT_RPCS", "none"),
        ("METER_MAX_RECEIVE_MESSAGE_BYTES", "1000"),
        ("METER_MAX_LICENSE_FILE_BYTES", "4096"),
        ("METER_REDIS_MAX_INFLIGHT", "8"),
        ("METER_KEEPALIVE_TIME", "0"),
        ("METER_KEEPALIVE_TIMEOUT", "-5"),
        ("METER_MIN_CLIENT_PING_INTERVAL", "x"),
        ("METER_MAX_CONNECTION_AGE", "inf"),
        ("METER_MAX_CONNECTION_AGE_GRACE", "0"),
    ):
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({name: bad})


# --- metadata size ------------------------------------------------------------------------


async def test_oversize_metadata_is_refused_naming_the_field_and_nothing_is_stored(
    licenses: lgrpc.LicenseServiceStub, make_license: Any, redis: aioredis.Redis
) -> None:
    # Each entry is within the per-entry bounds; together they pass 4 KiB as JSON.
    big = {f"k{i}": "v" * 1000 for i in range(5)}
    wide = {"k": "\u20ac" * 700}  # 700 characters, 4,200 bytes once escaped as JSON
    lic = await make_license(policy_fields=FLOATING)
    for metadata in (big, wide):
        err = await expect_error(
            licenses.ActivateMachine(
                lpb.ActivateMachineRequest(license_id=lic.id, fingerprint="f", metadata=metadata),
                metadata=admin_md(),
            )
        )
        assert (err.code, err.reason, err.bad_fields) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            ["metadata"],
        )
    assert await redis.exists(keys.machines(lic.id)) == 0
    err = await expect_error(
        licenses.CreatePolicy(
            lpb.CreatePolicyRequest(policy=policy_pb2.Policy(name="p", metadata=big)),
            metadata=admin_md(),
        )
    )
    assert err.bad_fields == ["policy.metadata"]
    err = await expect_error(
        licenses.UpdateLicense(
            lpb.UpdateLicenseRequest(
                license=license_pb2.License(id=lic.id, metadata=big),
                update_mask=field_mask_pb2.FieldMask(paths=["metadata"]),
            ),
            metadata=admin_md(),
        )
    )
    assert err.bad_fields == ["license.metadata"]
    got = await licenses.GetLicense(lpb.GetLicenseRequest(id=lic.id), metadata=admin_md())
    assert dict(got.license.metadata) == {} and got.license.update_time == lic.update_time
    # Just within the bound is fine.
    fits = {"k": "v" * 1000, "l": "w" * 1000, "m": "x" * 1000, "n": "y" * 1000}
    m = await licenses.ActivateMachine(
        lpb.ActivateMachineRequest(license_id=lic.id, fingerprint="f", metadata=fits),
        metadata=admin_md(),
    )
    assert dict(m.machine.metadata) == fits


# --- ListMachines from the id index -------------------------------------------------------


async def _page_all(licenses: lgrpc.LicenseServiceStub, license_id: str, size: int) -> list[str]:
    ids: list[str] = []
    token = ""
    while True:
        resp = await licenses.ListMachines(
            lpb.ListMachinesRequest(license_id=license_id, page_size=size, page_token=token),
            metadata=admin_md(),
        )
        ids += [m.id for m in resp.machines]
        token = resp.next_page_token
        if not token:
            return ids


async def _activate_many(
    licenses: lgrpc.LicenseServiceStub, license_id: str, prefix: str, n: int
) -> list[str]:
    out: list[str] = []
    for start in range(0, n, 50):
        batch = await asyncio.gather(
            *(
                licenses.ActivateMachine(
                    lpb.ActivateMachineRequest(license_id=license_id, fingerprint=f"{prefix}{i}"),
                    metadata=admin_md(),
                )
                for i in range(start, min(n, start + 50))
            )
        )
        out += [r.machine.id for r in batch]
    return out


async def test_list_machines_pages_in_order_under_concurrent_changes(
    licenses: lgrpc.LicenseServiceStub, make_license: Any, redis: aioredis.Redis
) -> None:
    """Paging while machines are activated and deactivated: every page in id order, no id
    twice, every machine live throughout is listed, none deactivated before is; afterwards
    a full listing is exactly the live machines, and the index holds exactly them."""
    lic = await make_license(policy_fields=FLOATING)
    initial = await _activate_many(licenses, lic.id, "a", 300)
    gone_before = set(random.Random(1).sample(initial, 40))
    await asyncio.gather(
        *(
            licenses.DeactivateMachine(lpb.DeactivateMachineRequest(id=i), metadata=admin_md())
            for i in gone_before
        )
    )
    stable = [i for i in initial if i not in gone_before]
    churn_out = set(random.Random(2).sample(stable, 60))
    stable_throughout = set(stable) - churn_out
    stop = asyncio.Event()

    async def churn() -> list[str]:
        added: list[str] = []
        for n, victim in enumerate(sorted(churn_out)):
            await licenses.DeactivateMachine(
                lpb.DeactivateMachineRequest(id=victim), metadata=admin_md()
            )
            added += await _activate_many(licenses, lic.id, f"c{n}-", 2)
        stop.set()
        return added

    async def pager() -> list[list[str]]:
        listings = []
        while not stop.is_set() or not listings:
            listings.append(await _page_all(licenses, lic.id, 7))
        return listings

    added, listings = await asyncio.gather(churn(), pager())
    for listing in listings:
        assert listing == sorted(listing) and len(listing) == len(set(listing))
        assert stable_throughout <= set(listing)
        assert not gone_before & set(listing)
    live = sorted(stable_throughout | set(added))
    for size in (1, 13, 1000):
        assert await _page_all(licenses, lic.id, size) == live
    assert sorted(await redis.zrange(keys.machine_order(lic.id), 0, -1)) == live
    assert sorted(await redis.hkeys(keys.machines(lic.id))) == live


async def test_the_machine_index_is_built_from_data_written_before_it(
    licenses: lgrpc.LicenseServiceStub, make_license: Any, redis: aioredis.Redis
) -> None:
    lic = await make_license(policy_fields=FLOATING)
    ids = await _activate_many(licenses, lic.id, "m", 30)
    order = keys.machine_order(lic.id)
    # As stored before the index existed: the machines hash alone.
    await redis.delete(order)
    assert await _page_all(licenses, lic.id, 4) == sorted(ids)
    assert await redis.zcard(order) == 30
    # An activation or a deactivation on such data builds it whole too.
    for change in ("activate", "deactivate"):
        await redis.delete(order)
        if change == "activate":
            ids += await _activate_many(licenses, lic.id, "late", 1)
        else:
            await licenses.DeactivateMachine(
                lpb.DeactivateMachineRequest(id=ids.pop(3)), metadata=admin_md()
            )
        assert sorted(await redis.zrange(order, 0, -1)) == sorted(ids)
    assert await _page_all(licenses, lic.id, 1000) == sorted(ids)


async def test_dead_machines_leave_the_index(
    licenses: lgrpc.LicenseServiceStub, make_license: Any, redis: aioredis.Redis, clock: Any
) -> None:
    lic = await make_license(policy_fields={**FLOATING, "heartbeat_duration": {"seconds": 60}})
    ids = await _activate_many(licenses, lic.id, "h", 10)
    clock.advance(30_000)
    await licenses.MachineHeartbeat(lpb.MachineHeartbeatRequest(id=ids[4]), metadata=admin_md())
    clock.advance(40_000)  # all but ids[4] missed their heartbeat
    assert await _page_all(licenses, lic.id, 3) == [ids[4]]
    assert await redis.zrange(keys.machine_order(lic.id), 0, -1) == [ids[4]]
    await licenses.DeleteLicense(lpb.DeleteLicenseRequest(id=lic.id), metadata=admin_md())
    assert await redis.exists(keys.machine_order(lic.id)) == 0


# --- CheckOutLicense off the event loop ---------------------------------------------------


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


_CHECKOUT_LOOP = """
import sys, time, grpc
from meter.v1 import license_service_pb2 as lpb, license_service_pb2_grpc as lgrpc
target, token, license_id, seconds = sys.argv[1:]
ch = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", -1)])
stub = lgrpc.LicenseServiceStub(ch)
md = (("authorization", "Bearer " + token),)
end = time.perf_counter() + float(seconds)
while time.perf_counter() < end:
    t0 = time.perf_counter()
    resp = stub.CheckOutLicense(lpb.CheckOutLicenseRequest(id=license_id, encrypt=True), metadata=md)
    print(time.perf_counter() - t0, len(resp.certificate), flush=True)
"""


async def test_checkout_of_a_large_license_leaves_other_calls_fast(
    bounded_embedded: Any,
) -> None:
    """Two clients (other processes) check out a license of 2,000 machines (1 KB metadata
    each) in a loop; another license's IncrementUsage latency, measured before and during,
    stays low."""
    srv = await bounded_embedded()
    async with srv.channel() as ch:
        licenses = lgrpc.LicenseServiceStub(ch)
        usage = ugrpc.UsageServiceStub(ch)
        big = await _license(licenses, **FLOATING)
        meta = {f"k{i}": "v" * 100 for i in range(9)}
        for start in range(0, 2000, 100):
            await asyncio.gather(
                *(
                    licenses.ActivateMachine(
                        lpb.ActivateMachineRequest(
                            license_id=big.id, fingerprint=f"fp{i}", metadata=meta
                        ),
                        metadata=admin_md(),
                    )
                    for i in range(start, start + 100)
                )
            )
        other = await _license(licenses)

        async def increments(seconds: float) -> list[float]:
            latencies = []
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                await usage.IncrementUsage(
                    upb.IncrementUsageRequest(license_id=other.id), metadata=admin_md()
                )
                latencies.append(time.perf_counter() - t0)
            return latencies

        baseline = await increments(1.5)
        loops = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _CHECKOUT_LOOP,
                srv.target,
                ADMIN_TOKEN,
                big.id,
                "4",
                stdout=asyncio.subprocess.PIPE,
            )
            for _ in range(2)
        ]
        await asyncio.sleep(1)  # the clients start and their first checkouts run
        during = await increments(2.5)
        outputs = [(await p.communicate())[0].decode().split() for p in loops]
    checkouts = [float(t) for out in outputs for t in out[0::2]]
    size = int(outputs[0][1])
    ms = 1000
    print(
        f"\nIncrementUsage p50/p99/max ms: alone {_quantile(baseline, 0.5) * ms:.1f}/"
        f"{_quantile(baseline, 0.99) * ms:.1f}/{max(baseline) * ms:.1f}, during checkouts "
        f"{_quantile(during, 0.5) * ms:.1f}/{_quantile(during, 0.99) * ms:.1f}/"
        f"{max(during) * ms:.1f}; {len(checkouts)} checkouts of {size / 1e6:.1f} MB, "
        f"median {statistics.median(checkouts) * ms:.0f} ms"
    )
    assert all(p.returncode == 0 for p in loops) and len(checkouts) >= 4
    # Loose: an increment never waits for a whole checkout to finish.
    assert _quantile(during, 0.5) < statistics.median(checkouts) / 2


async def test_a_license_file_past_the_size_limit_is_refused(bounded_embedded: Any) -> None:
    """The limit is exact: a file of S bytes is issued under a limit of S and refused, before
    it is encrypted and signed, under S - 1; one machine's file still fits."""
    srv = await bounded_embedded()
    async with srv.channel() as ch:
        licenses = lgrpc.LicenseServiceStub(ch)
        lic = await _license(licenses, **FLOATING)
        meta = {f"k{i}": "v" * 500 for i in range(3)}
        for start in range(0, 60, 20):
            await asyncio.gather(
                *(
                    licenses.ActivateMachine(
                        lpb.ActivateMachineRequest(
                            license_id=lic.id, fingerprint=f"f{i}", metadata=meta
                        ),
                        metadata=admin_md(),
                    )
                    for i in range(start, start + 20)
                )
            )
        srv.clock.set(srv.clock.now_ms())  # the same issue time: the same size
        sizes = {}
        for encrypt in (False, True):
            resp = await licenses.CheckOutLicense(
                lpb.CheckOutLicenseRequest(id=lic.id, encrypt=encrypt), metadata=admin_md()
            )
            sizes[encrypt] = len(resp.certificate)
        assert sizes[True] > 64 * 1024
    files = srv.service.license_files
    assert files is not None
    files.max_file_bytes = sizes[True]
    async with srv.channel() as ch:
        licenses = lgrpc.LicenseServiceStub(ch)
        ok = await licenses.CheckOutLicense(
            lpb.CheckOutLicenseRequest(id=lic.id, encrypt=True), metadata=admin_md()
        )
        assert len(ok.certificate) == sizes[True]
        files.max_file_bytes = sizes[True] - 1
        err = await expect_error(
            licenses.CheckOutLicense(
                # the admin's file: a key holder's also carries the key, so it is longer
                lpb.CheckOutLicenseRequest(id=lic.id, encrypt=True),
                metadata=admin_md(),
            )
        )
        assert (err.code, err.reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "LICENSE_FILE_TOO_LARGE",
        )
        assert err.metadata == {
            "license_id": lic.id,
            "size": str(sizes[True]),
            "limit": str(sizes[True] - 1),
            "machines": "60",
        }
        one = await licenses.CheckOutLicense(
            lpb.CheckOutLicenseRequest(id=lic.id, encrypt=True, fingerprint="f7"),
            metadata=admin_md(),
        )
        assert len(one.certificate) < 8 * 1024


# --- gRPC server bounds -------------------------------------------------------------------


async def test_calls_beyond_max_concurrent_rpcs_are_refused_not_dropped(bounded: Any) -> None:
    srv = await bounded(max_concurrent_rpcs=8)
    async with srv.channel() as ch, srv.channel() as flood_ch:
        licenses = lgrpc.LicenseServiceStub(ch)
        lic = await _license(licenses)
        usage = ugrpc.UsageServiceStub(ch)
        held = [usage.StreamUsage(metadata=admin_md()) for _ in range(8)]
        for call in held:  # each one answered once: all 8 are in progress on the server
            await call.write(upb.IncrementUsageRequest(license_id=lic.id))
            assert (await asyncio.wait_for(call.read(), 10)).result.uses >= 1
        flood = ugrpc.UsageServiceStub(flood_ch)
        results = await asyncio.gather(
            *(
                _outcome(
                    flood.GetUsage(
                        upb.GetUsageRequest(license_id=lic.id), metadata=admin_md(), timeout=20
                    )
                )
                for _ in range(200)
            )
        )
        assert {r.code for r in results} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        for call in held:
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
        resp = await flood.GetUsage(upb.GetUsageRequest(license_id=lic.id), metadata=admin_md())
        assert resp.uses == 8  # the streams' increments, and nothing of the refused calls


class _TcpCounter:
    """A byte-for-byte TCP forwarder that counts the connections it accepted; `frozen` stops
    forwarding (the sockets stay open: a peer that went silent)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.accepted = 0
        self.frozen = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> _TcpCounter:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await r.read(65536):
                    if self.frozen:
                        continue
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()


async def test_old_connections_are_recycled_without_a_failed_call(bounded_embedded: Any) -> None:
    """With a max connection age of 0.5 s, a client calling for 4 s is moved to new
    connections (GOAWAY) again and again, and no call fails."""
    srv = await bounded_embedded(max_connection_age_s=0.5, max_connection_age_grace_s=5)
    proxy = await _TcpCounter(srv.port).start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}") as ch:
            licenses = lgrpc.LicenseServiceStub(ch)
            usage = ugrpc.UsageServiceStub(ch)
            lic = await _license(licenses)
            calls = 0
            end = time.perf_counter() + 4
            while time.perf_counter() < end:
                await asyncio.gather(
                    *(
                        usage.IncrementUsage(
                            upb.IncrementUsageRequest(license_id=lic.id), metadata=admin_md()
                        )
                        for _ in range(8)
                    )
                )
                calls += 8
            got = await usage.GetUsage(upb.GetUsageRequest(license_id=lic.id), metadata=admin_md())
        assert got.uses == calls
        assert proxy.accepted >= 3
    finally:
        await proxy.close()


async def test_keepalive_drops_a_silent_peer_and_frees_its_calls(bounded_embedded: Any) -> None:
    """A client whose network goes silent holds the only call slot; the server's keepalive
    ping goes unanswered, the connection is closed and its call ends, and the slot is free
    again (without keepalive it would stay taken for as long as the socket stays open)."""
    srv = await bounded_embedded(
        max_concurrent_rpcs=1, keepalive_time_s=0.5, keepalive_timeout_s=0.5
    )
    proxy = await _TcpCounter(srv.port).start()
    try:
        async with srv.channel() as direct:
            usage = ugrpc.UsageServiceStub(direct)
            lic = await _license(lgrpc.LicenseServiceStub(direct))
            async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}") as far:
                held = ugrpc.UsageServiceStub(far).StreamUsage(metadata=admin_md())
                await held.write(upb.IncrementUsageRequest(license_id=lic.id))
                await asyncio.wait_for(held.read(), 10)
                request = upb.GetUsageRequest(license_id=lic.id)
                err = await expect_error(usage.GetUsage(request, metadata=admin_md()))
                assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                proxy.frozen = True
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 15
                while True:
                    got = await _outcome(usage.GetUsage(request, metadata=admin_md()))
                    if isinstance(got, upb.GetUsageResponse):
                        break
                    assert got.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert loop.time() < deadline, "the silent peer's call was never dropped"
                    await asyncio.sleep(0.1)
                assert got.uses == 1
                held.cancel()
    finally:
        await proxy.close()


async def test_a_message_above_the_receive_limit_is_refused(bounded_embedded: Any) -> None:
    srv = await bounded_embedded(max_receive_message_bytes=64 * 1024)
    async with srv.channel() as ch:
        usage = ugrpc.UsageServiceStub(ch)
        err = await expect_error(
            usage.IncrementUsage(
                upb.IncrementUsageRequest(license_id="x" * 100_000), metadata=admin_md()
            )
        )
        assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_server_bounds_are_settings() -> None:
    from meter_grpc.server import grpc_options

    s = Settings.from_env(
        {
            "METER_MAX_CONCURRENT_RPCS": "100",
            "METER_KEEPALIVE_TIME": "30",
            "METER_KEEPALIVE_TIMEOUT": "5",
            "METER_MIN_CLIENT_PING_INTERVAL": "2.5",
            "METER_MAX_CONNECTION_AGE": "600",
            "METER_MAX_CONNECTION_AGE_GRACE": "60",
            "METER_MAX_RECEIVE_MESSAGE_BYTES": "1048576",
            "METER_CHECKOUT_WORKERS": "3",
            "METER_REDIS_MAX_INFLIGHT": "512",
        }
    )
    assert (s.max_concurrent_rpcs, s.checkout_workers, s.redis_max_inflight) == (100, 3, 512)
    options = dict(grpc_options(s))
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.keepalive_timeout_ms"] == 5_000
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 2_500
    assert options["grpc.max_connection_age_ms"] == 600_000
    assert options["grpc.max_connection_age_grace_ms"] == 60_000
    assert options["grpc.max_receive_message_length"] == 1_048_576
    defaults = dict(grpc_options(Settings.from_env({})))
    assert defaults["grpc.max_connection_age_ms"] == 1_800_000
    assert defaults["grpc.keepalive_time_ms"] == 60_000


# --- the send queue toward Redis ----------------------------------------------------------


async def test_a_flood_beyond_the_inflight_bound_completes_exactly(redis_url: str) -> None:
    """5,000 INCRs at once through a connection bounded to 64 commands in flight: exact
    results, and never more than 64 in flight on any node."""
    client = RedisClient(redis_url, timeout_s=10, max_inflight=64)
    key = f"meter:{{bounds-test}}:{random.randrange(1 << 60)}"
    try:
        replies = await asyncio.gather(*(client.incr(key) for _ in range(5000)))
        assert sorted(replies) == list(range(1, 5001))
        nodes = await client.router.primaries()
        peaks = [n.conn.peak_inflight for n in nodes]
        assert max(peaks) == 64  # the bound was reached, and never passed
        assert all(n.conn.inflight == 0 for n in nodes)
    finally:
        await client.delete(key)
        await client.close()


async def test_the_service_under_a_small_inflight_bound_counts_exactly(bounded: Any) -> None:
    srv = await bounded(redis_max_inflight=16)
    channels = [srv.channel() for _ in range(4)]
    try:
        licenses = lgrpc.LicenseServiceStub(channels[0])
        lic = await _license(licenses, max_uses=700)
        stubs = [ugrpc.UsageServiceStub(ch) for ch in channels]
        results = await asyncio.gather(
            *(
                _outcome(
                    stubs[i % 4].IncrementUsage(
                        upb.IncrementUsageRequest(license_id=lic.id), metadata=admin_md()
                    )
                )
                for i in range(1000)
            )
        )
        ok = [r for r in results if isinstance(r, upb.IncrementUsageResponse)]
        assert len(ok) == 700
        assert {r.reason for r in results if not isinstance(r, upb.IncrementUsageResponse)} == {
            "USAGE_LIMIT_EXCEEDED"
        }
        got = await stubs[0].GetUsage(upb.GetUsageRequest(license_id=lic.id), metadata=admin_md())
        assert got.uses == 700
        nodes = await srv.service.store.client.router.primaries()
        assert max(n.conn.peak_inflight for n in nodes) <= 16
    finally:
        for ch in channels:
            await ch.close()


async def test_calls_waiting_for_room_keep_their_order_and_may_give_up(redis_url: str) -> None:
    """200 INCRs through a connection bounded to 4 in flight: those that waited are written
    in the order they were issued (their replies increase with it), and 50 that gave up while
    waiting were never written."""
    client = RedisClient(redis_url, timeout_s=10, max_inflight=4)
    key = f"meter:{{bounds-test}}:{random.randrange(1 << 60)}"
    try:
        tasks = [asyncio.create_task(client.incr(key)) for _ in range(200)]
        await asyncio.sleep(0)  # every call issued: 4 in flight, 196 waiting for room
        given_up = tasks[100:150]
        for task in given_up:
            task.cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        replies = [r for r in done if not isinstance(r, BaseException)]
        assert all(isinstance(r, asyncio.CancelledError) for r in done[100:150])
        assert replies == list(range(1, 151))  # in issue order, none of the 50 counted
        assert int(await client.get(key) or 0) == 150
        for node in await client.router.primaries():
            assert node.conn.inflight == 0 and not node.conn._room
            assert node.conn.peak_inflight <= 4
    finally:
        await client.delete(key)
        await client.close()
