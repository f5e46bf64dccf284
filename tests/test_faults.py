"""Fault injection between the service and its store (issue 7, part 4).

A TCP proxy (tests/faultproxy.py) sits between an in-process meter-grpc server and a
valkey-server the test starts (with `requirepass`, the service on db 3), or in front of each
node of a three-node Cluster. While 32 callers run IncrementUsage (with and without a
request_id), the proxy drops a connection before forwarding a command, after forwarding it
but before its reply, resets it in the middle of a pipeline, delays replies past the
service's Redis timeout, refuses connections, or Redis restarts. Every test then checks what
the contract promises (SPEC §4, STYLE "Failure semantics"), seen only through gRPC and
through the store itself:

- every answer is OK or UNAVAILABLE / STORAGE_UNAVAILABLE with RetryInfo and
  `outcome` = `not_applied` or `unknown`: never INTERNAL, UNKNOWN, a deadline or NOT_FOUND;
- counts are exact: ok <= counted <= ok + unknown (the counter read back from the store);
  a call answered OK with a request_id has its idempotency record, one answered
  `not_applied` has none (it did not run); `unknown` is bounded by what was in flight;
- nothing lands on the wrong db (db 0 stays empty; every connection completes AUTH and
  SELECT before any other command);
- the service recovers by itself: once the fault is gone, calls succeed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import socket
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf import field_mask_pb2
from redis.crc import key_slot

from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import policy_pb2
from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from meter_grpc.config import Settings
from meter_grpc.server import build_server
from meter_grpc.storage import keys
from meter_grpc.storage.embedded import valkey_binary
from tests.cluster import SLOTS, LocalCluster
from tests.faultproxy import Connection, FaultProxy
from tests.support import ADMIN_TOKEN, admin_md, rich_error
from tests.test_propagation import (
    assert_all_follow,
    assert_enforced,
    create_licenses,
    wait_propagated,
)

CALLERS = 32
REDIS_TIMEOUT_S = 0.5
CALL_DEADLINE_S = 5.0  # far above anything a correct service takes; hitting it is a failure
RECOVERY_S = 5.0  # once a fault is gone, calls succeed again within this
WAIT_S = 10.0  # bound on waiting for a condition (the fault fired, calls failed...)
MAX_CALLS_PER_CALLER = 2000  # a bound on the load, should a condition never come
PASSWORD = "fault-test-pw"
DB = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the store ------------------------------------------------------------------------------


class Valkey:
    """A standalone valkey-server with a password and an fsynced append-only file, on a fixed
    port, so that it can be stopped and started again on the same data."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = _free_port()
        self.proc: asyncio.subprocess.Process | None = None

    def client(self, db: int) -> aioredis.Redis:
        return aioredis.Redis(
            port=self.port, password=PASSWORD, db=db, decode_responses=True, protocol=2
        )

    async def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            "--port", str(self.port), "--bind", "127.0.0.1", "--requirepass", PASSWORD,
            "--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "always",
            "--save", "", "--daemonize", "no", "--logfile", str(self.data_dir / "valkey.log"),
        ]  # fmt: skip
        self.proc = await asyncio.create_subprocess_exec(
            str(valkey_binary()),
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        client = self.client(0)
        try:
            for _ in range(400):
                with contextlib.suppress(Exception):
                    if await client.ping():
                        return
                await asyncio.sleep(0.025)
            raise RuntimeError("valkey-server did not start")
        finally:
            await client.aclose()

    async def stop(self) -> None:
        """SIGTERM: valkey finishes its append-only file and exits."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            proc.terminate()
        if proc is not None:
            await proc.wait()


# --- answers --------------------------------------------------------------------------------


@dataclass
class Tally:
    """Every answer of the callers, by kind: 'ok', 'not_applied', 'unknown', or a description
    of anything else (which must never happen)."""

    ok: int = 0
    not_applied: int = 0
    unknown: int = 0
    other: list[str] = field(default_factory=list)
    # (license id, request_id) -> answer, for calls made with a request_id
    by_request: dict[tuple[str, str], str] = field(default_factory=dict)
    latencies: dict[str, list[float]] = field(default_factory=dict)  # license id -> OK seconds
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def failed(self) -> int:
        return self.not_applied + self.unknown + len(self.other)

    async def add(self, answer: str, license_id: str, request_id: str, seconds: float) -> None:
        if answer == "ok":
            self.ok += 1
            self.latencies.setdefault(license_id, []).append(seconds)
        elif answer == "not_applied":
            self.not_applied += 1
        elif answer == "unknown":
            self.unknown += 1
        else:
            self.other.append(answer)
        if request_id:
            self.by_request[(license_id, request_id)] = answer
        async with self.changed:
            self.changed.notify_all()

    async def until(
        self, what: str, predicate: Callable[[], bool], timeout_s: float = WAIT_S
    ) -> None:
        """Waits (at most timeout_s) for `predicate` to hold."""
        try:
            async with asyncio.timeout(timeout_s), self.changed:
                await self.changed.wait_for(predicate)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}: {self}") from None

    def __str__(self) -> str:
        others = sorted(set(self.other))[:5]
        return (
            f"ok={self.ok} not_applied={self.not_applied} unknown={self.unknown} "
            f"other={len(self.other)} {others}"
        )


_request_ids = itertools.count()


async def increment(
    usage: ugrpc.UsageServiceStub, tally: Tally, license_id: str, with_request_id: bool
) -> str:
    """One IncrementUsage of 1, its answer recorded in `tally`."""
    request_id = f"rid-{next(_request_ids)}-{uuid.uuid4().hex[:8]}" if with_request_id else ""
    started = time.monotonic()
    try:
        await usage.IncrementUsage(
            upb.IncrementUsageRequest(license_id=license_id, amount=1, request_id=request_id),
            metadata=admin_md(),
            timeout=CALL_DEADLINE_S,
        )
        answer = "ok"
    except grpc.aio.AioRpcError as exc:
        err = rich_error(exc)
        outcome = err.metadata.get("outcome", "")
        if (
            err.code == grpc.StatusCode.UNAVAILABLE
            and err.reason == "STORAGE_UNAVAILABLE"
            and err.domain == "meter.v1"
            and err.retry_delay_ms is not None
            and outcome in ("not_applied", "unknown")
        ):
            answer = outcome
        else:
            answer = (
                f"{err.code.name} reason={err.reason!r} outcome={outcome!r} "
                f"retry_info={err.retry_delay_ms is not None} {err.message[:120]!r}"
            )
    await tally.add(answer, license_id, request_id, time.monotonic() - started)
    return answer


@contextlib.asynccontextmanager
async def load(
    usage: ugrpc.UsageServiceStub, tally: Tally, *groups: Sequence[str]
) -> AsyncIterator[None]:
    """CALLERS concurrent callers, each making one IncrementUsage after the other (every
    other one with a request_id) round the licenses of its group (caller i: group i mod the
    number of groups), until the block ends. Starts once calls are flowing."""
    stop = asyncio.Event()

    async def caller(i: int) -> None:
        ids = groups[i % len(groups)]
        for n in range(MAX_CALLS_PER_CALLER):
            if stop.is_set():
                return
            await increment(usage, tally, ids[(i + n) % len(ids)], n % 2 == 1)

    callers = asyncio.gather(*(caller(i) for i in range(CALLERS)))
    try:
        start = tally.ok
        await tally.until("calls to flow", lambda: tally.ok >= start + CALLERS)
        yield
    finally:
        stop.set()
        await callers


async def recovered(
    usage: ugrpc.UsageServiceStub, tally: Tally, license_ids: Sequence[str]
) -> None:
    """The service recovers by itself: within RECOVERY_S, a burst of CALLERS concurrent calls
    all answer OK."""
    deadline = time.monotonic() + RECOVERY_S
    while True:
        answers = await asyncio.gather(
            *(
                increment(usage, tally, license_ids[i % len(license_ids)], i % 2 == 1)
                for i in range(CALLERS)
            )
        )
        if all(a == "ok" for a in answers):
            return
        assert time.monotonic() < deadline, f"not recovered after {RECOVERY_S} s: {tally}"


# --- checks ---------------------------------------------------------------------------------


@dataclass
class Counts:
    """The `uses` counters of some licenses, read from the store directly."""

    read: Callable[[str], Awaitable[int]]
    has_record: Callable[[str, str], Awaitable[bool]]
    license_ids: Sequence[str]
    baseline: int = 0

    async def total(self) -> int:
        return sum([await self.read(lid) for lid in self.license_ids])

    async def start(self) -> Counts:
        self.baseline = await self.total()
        return self

    async def check(self, tally: Tally, *, max_unknown: int | None = CALLERS) -> int:
        """Asserts the contract on everything `tally` saw; returns how many were counted."""
        assert not tally.other, f"answers outside the contract: {tally}"
        counted = await self.total() - self.baseline
        assert tally.ok <= counted <= tally.ok + tally.unknown, (
            f"counted {counted}, acknowledged {tally.ok}, unknown {tally.unknown}: {tally}"
        )
        if max_unknown is not None:
            assert tally.unknown <= max_unknown, f"more unknown than calls in flight: {tally}"
        for (license_id, request_id), answer in tally.by_request.items():
            applied = await self.has_record(license_id, request_id)
            if answer == "ok":
                assert applied, f"{request_id} answered OK but is not recorded"
            elif answer == "not_applied":
                assert not applied, f"{request_id} answered not_applied but it was applied"
        return counted


def handshake_problem(conn: Connection) -> str | None:
    """What is wrong with how a connection began: it must authenticate (AUTH, or HELLO with
    AUTH) and select db DB, each completed (its reply relayed), before any other command."""
    authed = selected = False
    for kind, what, *reply in conn.log:
        name = what.split(" ", 1)[0]
        carries_auth = name == "AUTH" or (name == "HELLO" and what.endswith(" AUTH"))
        if kind == "reply":
            ok = not reply[0].startswith(("-", "!"))
            authed = authed or (carries_auth and ok)
            selected = selected or (name == "SELECT" and ok)
            continue
        if carries_auth or name in ("HELLO", "CLIENT"):
            continue
        if name == "SELECT":
            if what != f"SELECT {DB}":
                return f"{what} instead of SELECT {DB}: {conn.log}"
            if not authed:
                return f"SELECT before AUTH completed: {conn.log}"
            continue
        if not (authed and selected):
            return f"{what} sent before AUTH and SELECT {DB} completed: {conn.log}"
    return None


# --- standalone -----------------------------------------------------------------------------


@dataclass
class Rig:
    valkey: Valkey
    proxy: FaultProxy
    usage: ugrpc.UsageServiceStub
    licenses: lgrpc.LicenseServiceStub
    store: aioredis.Redis  # db DB, directly (not through the proxy)
    db0: aioredis.Redis

    async def make_licenses(self, n: int) -> list[str]:
        policy = await self.licenses.CreatePolicy(
            lpb.CreatePolicyRequest(policy=policy_pb2.Policy(name="faults")), metadata=admin_md()
        )
        ids = []
        for _ in range(n):
            resp = await self.licenses.CreateLicense(
                lpb.CreateLicenseRequest(license={"policy_id": policy.policy.id}),
                metadata=admin_md(),
            )
            ids.append(resp.license.id)
        return ids

    async def counts(self, license_ids: Sequence[str]) -> Counts:
        async def read(license_id: str) -> int:
            return int(await self.store.hget(keys.license(license_id), "uses") or 0)

        async def has_record(license_id: str, request_id: str) -> bool:
            return bool(await self.store.exists(keys.request_record(license_id, request_id)))

        return await Counts(read, has_record, license_ids).start()

    async def check_store(self) -> None:
        """Nothing on the wrong db, and every connection began with AUTH then SELECT."""
        assert await self.db0.dbsize() == 0, f"written to db 0: {await self.db0.keys('*')}"
        problems = [p for c in self.proxy.connections if (p := handshake_problem(c))]
        assert not problems, problems[0]


def _service_settings(url: str, data_dir: Path) -> Settings:
    return Settings(
        listen="127.0.0.1:0",
        redis_url=url,
        redis_timeout_s=REDIS_TIMEOUT_S,
        data_dir=data_dir,
        admin_tokens=[ADMIN_TOKEN],
        shutdown_grace_s=1,
    )


@contextlib.asynccontextmanager
async def serving(url: str, data_dir: Path) -> AsyncIterator[grpc.aio.Channel]:
    """An in-process meter-grpc server on `url` and a channel to it.

    Once it is stopped, tasks it left behind (the current cluster batcher's calls, orphaned
    by calls that timed out) are given time to end, then cancelled: left to the end of the
    session, they would be destroyed with their sockets open, a ResourceWarning that the
    suite turns into an error outside any test."""
    before = asyncio.all_tasks()
    service, port = await build_server(_service_settings(url, data_dir))
    await service.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await service.stop(0)
        del service
        leftovers = [t for t in asyncio.all_tasks() - before if t is not asyncio.current_task()]
        if leftovers:
            _, pending = await asyncio.wait(leftovers, timeout=10)
            for task in pending:
                task.cancel()
        gc.collect()  # what they leaked is reported now, under this module's filters


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    valkey = Valkey(tmp_path / "valkey")
    await valkey.start()
    proxy = await FaultProxy(valkey.port).start()
    store, db0 = valkey.client(DB), valkey.client(0)
    try:
        url = f"redis://:{PASSWORD}@127.0.0.1:{proxy.port}/{DB}"
        async with serving(url, tmp_path / "data") as channel:
            yield Rig(
                valkey,
                proxy,
                ugrpc.UsageServiceStub(channel),
                lgrpc.LicenseServiceStub(channel),
                store,
                db0,
            )
            proxy.passing()
    finally:
        await proxy.close()
        await store.aclose()
        await db0.aclose()
        await valkey.stop()


async def _prepared(rig: Rig, n: int = 4) -> tuple[list[str], Counts, Tally]:
    """n fresh licenses (every script already loaded by a first call on each), their counts,
    and a fresh tally."""
    ids = await rig.make_licenses(n)
    warm = Tally()
    for lid in ids:
        assert await increment(rig.usage, warm, lid, False) == "ok", warm
    return ids, await rig.counts(ids), Tally()


async def _fired(proxy: FaultProxy) -> None:
    try:
        await asyncio.wait_for(proxy.fired.wait(), WAIT_S)
    except TimeoutError:
        raise AssertionError("the fault never fired") from None


async def test_drop_before_forwarding(rig: Rig) -> None:
    """The connection is closed before a command reaches Redis: nothing forwarded is lost,
    so what was counted is exactly what was acknowledged."""
    ids, counts, tally = await _prepared(rig)
    async with load(rig.usage, tally, ids):
        rig.proxy.drop_before()
        await _fired(rig.proxy)
        ok = tally.ok
        await tally.until("calls to succeed again", lambda: tally.ok >= ok + CALLERS)
    await recovered(rig.usage, tally, ids)
    assert await counts.check(tally) == tally.ok
    await rig.check_store()


async def test_drop_after_forwarding_before_the_reply(rig: Rig) -> None:
    """A script call runs but its reply never comes back: it is counted, and answered
    `unknown` (never `not_applied`, never re-sent)."""
    ids, counts, tally = await _prepared(rig)
    async with load(rig.usage, tally, ids):
        rig.proxy.drop_after()
        await _fired(rig.proxy)
        ok = tally.ok
        await tally.until("calls to succeed again", lambda: tally.ok >= ok + CALLERS)
    await recovered(rig.usage, tally, ids)
    counted = await counts.check(tally)
    assert tally.unknown >= 1, "the call whose reply was dropped is answered unknown"
    assert counted > tally.ok, "the call whose reply was dropped ran, so it must be counted"
    await rig.check_store()


async def test_reset_in_the_middle_of_a_pipeline(rig: Rig) -> None:
    """RST with 4 commands in flight on a connection, 2 of which had been forwarded: those 2
    ran, the other 2 did not; none of them is answered `not_applied` if it ran."""
    ids, counts, tally = await _prepared(rig)
    async with load(rig.usage, tally, ids):
        rig.proxy.reset_mid_pipeline(k=2, n=4)
        await _fired(rig.proxy)
        ok = tally.ok
        await tally.until("calls to succeed again", lambda: tally.ok >= ok + CALLERS)
    await recovered(rig.usage, tally, ids)
    counted = await counts.check(tally)
    assert counted >= tally.ok + 2, "the 2 commands forwarded before the reset ran"
    await rig.check_store()


async def test_replies_delayed_past_the_timeout(rig: Rig) -> None:
    """Replies 4x slower than the service's Redis timeout: calls fail `unknown` (well before
    the gRPC deadline), whatever ran is counted once, and calls succeed again as soon as
    replies are prompt."""
    ids, counts, tally = await _prepared(rig)
    async with load(rig.usage, tally, ids):
        rig.proxy.delay_s = 4 * REDIS_TIMEOUT_S
        failed = tally.failed
        await tally.until("every caller to time out", lambda: tally.failed >= failed + CALLERS)
        rig.proxy.passing()
        ok = tally.ok
        await tally.until("calls to succeed again", lambda: tally.ok >= ok + 2 * CALLERS)
    await recovered(rig.usage, tally, ids)
    await counts.check(tally, max_unknown=None)  # every call made while slow may have run
    assert tally.unknown >= CALLERS, "calls that timed out after being written are unknown"
    await rig.check_store()


async def test_connections_refused(rig: Rig) -> None:
    """Redis unreachable (connections refused): calls fail `not_applied` (they never left the
    process); only those in flight when the connection was cut may be `unknown`."""
    ids, counts, tally = await _prepared(rig)
    async with load(rig.usage, tally, ids):
        await rig.proxy.refuse()
        na = tally.not_applied
        await tally.until(
            "calls to fail not_applied", lambda: tally.not_applied >= na + 2 * CALLERS
        )
        await rig.proxy.accept()
        ok = tally.ok
        await tally.until("calls to succeed again", lambda: tally.ok >= ok + CALLERS)
    await recovered(rig.usage, tally, ids)
    await counts.check(tally)
    await rig.check_store()


@pytest.mark.slow
async def test_redis_restarts_with_a_password_on_db_3(rig: Rig) -> None:
    """valkey-server (requirepass, AOF) stops and starts again on the same data while 32
    callers run: every acknowledged increment is there, nothing went to db 0, and calls
    succeed again without restarting the service."""
    ids, counts, tally = await _prepared(rig)
    async with load(rig.usage, tally, ids):
        await rig.valkey.stop()
        failed = tally.failed
        await tally.until("calls to fail", lambda: tally.failed >= failed + 2 * CALLERS)
        await rig.valkey.start()
        ok = tally.ok
        await tally.until("calls to succeed again", lambda: tally.ok >= ok + 2 * CALLERS)
    await recovered(rig.usage, tally, ids)
    assert tally.not_applied >= CALLERS, "calls made while Redis was down never left"
    await counts.check(tally)
    await rig.check_store()


async def test_auth_and_select_come_first_on_every_new_connection(rig: Rig) -> None:
    """With 20 callers issuing calls while the connection is down and the handshake is slow,
    every new connection sends AUTH, then SELECT 3, and waits for both replies before any
    other command."""
    ids, counts, tally = await _prepared(rig)
    await rig.proxy.refuse()
    before = len(rig.proxy.connections)
    rig.proxy.delay_s = REDIS_TIMEOUT_S / 5  # a slow handshake: a wide window for callers

    async def caller(i: int) -> None:
        """Calls until two of them succeeded over the new connection."""
        succeeded = 0
        for n in range(MAX_CALLS_PER_CALLER):
            if succeeded == 2:
                return
            answer = await increment(rig.usage, tally, ids[(i + n) % len(ids)], n % 2 == 1)
            succeeded += answer == "ok"

    callers = asyncio.gather(*(caller(i) for i in range(20)))
    try:
        await tally.until("calls to fail while down", lambda: tally.failed >= 20)
    finally:
        await rig.proxy.accept()
        await callers
    rig.proxy.passing()
    await recovered(rig.usage, tally, ids)
    new = rig.proxy.connections[before:]
    assert new, "the service never reconnected"
    assert any(c.commands > 2 for c in new), "no calls went over the new connections"
    for conn in new:
        first = conn.first_commands()
        if first:
            assert first[0] == "AUTH" or first[0].endswith(" AUTH"), first
    await counts.check(tally)
    await rig.check_store()


# --- cluster --------------------------------------------------------------------------------


@dataclass
class ClusterRig:
    cluster: LocalCluster
    proxies: list[FaultProxy]
    nodes: list[aioredis.Redis]  # a direct client per node (its real port)
    usage: ugrpc.UsageServiceStub
    licenses: lgrpc.LicenseServiceStub

    def node_of(self, license_id: str) -> int:
        per = SLOTS // len(self.nodes)
        return min(key_slot(keys.license(license_id).encode()) // per, len(self.nodes) - 1)

    async def make_licenses(self, per_node: int) -> list[list[str]]:
        """At least `per_node` fresh licenses on each node, by node."""
        policy = await self.licenses.CreatePolicy(
            lpb.CreatePolicyRequest(policy=policy_pb2.Policy(name="faults")), metadata=admin_md()
        )
        by_node: list[list[str]] = [[] for _ in self.nodes]
        for _ in range(200):
            if all(len(ids) >= per_node for ids in by_node):
                return by_node
            resp = await self.licenses.CreateLicense(
                lpb.CreateLicenseRequest(license={"policy_id": policy.policy.id}),
                metadata=admin_md(),
            )
            by_node[self.node_of(resp.license.id)].append(resp.license.id)
        raise AssertionError("license ids never spread over every node")

    async def counts(self, license_ids: Sequence[str]) -> Counts:
        async def read(license_id: str) -> int:
            node = self.nodes[self.node_of(license_id)]
            return int(await node.hget(keys.license(license_id), "uses") or 0)

        async def has_record(license_id: str, request_id: str) -> bool:
            node = self.nodes[self.node_of(license_id)]
            return bool(await node.exists(keys.request_record(license_id, request_id)))

        return await Counts(read, has_record, license_ids).start()

    async def prepared(self, per_node: int = 2) -> tuple[list[list[str]], Counts, Tally]:
        by_node = await self.make_licenses(per_node)
        ids = [lid for node in by_node for lid in node]
        warm = Tally()
        for lid in ids:
            assert await increment(self.usage, warm, lid, False) == "ok", warm
        return by_node, await self.counts(ids), Tally()


@pytest.fixture(scope="module")
async def cluster_rig(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ClusterRig]:
    """A three-node cluster (AOF on) that tells clients to reach each node through its
    proxy, and a service on it. Shared by the cluster tests: each puts its proxies back to
    passing and uses licenses of its own."""
    base = tmp_path_factory.mktemp("faults-cluster")
    cluster = LocalCluster(base / "nodes", persistent=True)
    proxies = [await FaultProxy(port).start() for port in cluster.ports]
    nodes = [aioredis.Redis(port=p, decode_responses=True) for p in cluster.ports]
    try:
        await cluster.start(announce_ports=[p.port for p in proxies])
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{p.port}" for p in proxies)
        async with serving(url, base / "data") as channel:
            yield ClusterRig(
                cluster,
                proxies,
                nodes,
                ugrpc.UsageServiceStub(channel),
                lgrpc.LicenseServiceStub(channel),
            )
    finally:
        for proxy in proxies:
            await proxy.close()
        for node in nodes:
            await node.aclose()
        await cluster.stop()


@pytest.fixture
async def crig(cluster_rig: ClusterRig) -> AsyncIterator[ClusterRig]:
    yield cluster_rig
    for proxy in cluster_rig.proxies:
        proxy.passing()
    for i, proc in enumerate(cluster_rig.cluster.procs):
        if proc.returncode is not None:  # a test failed with the node stopped
            await cluster_rig.cluster.start_node(i)


@pytest.mark.cluster
async def test_cluster_drop_after_forwarding(crig: ClusterRig) -> None:
    by_node, counts, tally = await crig.prepared()
    ids = [lid for node in by_node for lid in node]
    async with load(crig.usage, tally, ids):
        crig.proxies[0].drop_after()
        await _fired(crig.proxies[0])
        ok = tally.ok
        await tally.until("calls to succeed again", lambda: tally.ok >= ok + 2 * CALLERS)
    await recovered(crig.usage, tally, ids)
    counted = await counts.check(tally)
    assert tally.unknown >= 1, "the call whose reply was dropped is answered unknown"
    assert counted > tally.ok, "the call whose reply was dropped ran, so it must be counted"


@pytest.mark.cluster
async def test_cluster_replies_delayed_past_the_timeout(crig: ClusterRig) -> None:
    by_node, counts, tally = await crig.prepared()
    ids = by_node[1]  # on the slow node only
    async with load(crig.usage, tally, ids):
        crig.proxies[1].delay_s = 4 * REDIS_TIMEOUT_S
        failed = tally.failed
        await tally.until("every caller to time out", lambda: tally.failed >= failed + CALLERS)
        crig.proxies[1].passing()
        ok = tally.ok
        await tally.until("calls to succeed again", lambda: tally.ok >= ok + 2 * CALLERS)
    await recovered(crig.usage, tally, ids)
    await counts.check(tally, max_unknown=None)
    assert tally.unknown >= CALLERS, "calls that timed out after being written are unknown"


@pytest.mark.cluster
@pytest.mark.slow
async def test_cluster_node_restarts(crig: ClusterRig) -> None:
    """One primary stops and starts again on its data while 32 callers use licenses on every
    node: nothing acknowledged is lost, nothing counted twice, calls recover."""
    by_node, counts, tally = await crig.prepared()
    ids = [lid for node in by_node for lid in node]
    async with load(crig.usage, tally, ids):
        await crig.cluster.stop_node(2)
        try:
            failed = tally.failed
            await tally.until("calls to fail", lambda: tally.failed >= failed + CALLERS)
        finally:
            await crig.cluster.start_node(2)
        ok = tally.ok
        await tally.until("calls to succeed again", lambda: tally.ok >= ok + 2 * CALLERS)
    await recovered(crig.usage, tally, ids)
    await counts.check(tally)


@pytest.mark.cluster
async def test_cluster_slow_shard_delays_only_its_own_calls(crig: ClusterRig) -> None:
    """One node answers 2 s late: calls to its licenses are slow (they time out), while the
    callers of licenses on the other nodes keep getting prompt answers."""
    delay = 2.0
    by_node, counts, tally = await crig.prepared()
    slow, fast = by_node[0], by_node[1] + by_node[2]
    async with load(crig.usage, tally, slow, fast):
        crig.proxies[0].delay_s = delay
        failed = tally.failed
        await tally.until("the slow node's calls to time out", lambda: tally.failed >= failed + 8)
        tally.latencies.clear()
        ok = tally.ok
        await tally.until(
            "calls to the other nodes", lambda: tally.ok >= ok + 4 * CALLERS, timeout_s=2 * delay
        )
        latencies = [s for lid in fast for s in tally.latencies.get(lid, [])]
        crig.proxies[0].passing()
    await recovered(crig.usage, tally, slow + fast)
    await counts.check(tally, max_unknown=None)
    assert latencies
    p50 = statistics.median(latencies)
    assert p50 < delay / 10, f"p50 {p50:.3f} s on the healthy nodes while one is {delay} s slow"


@pytest.mark.slow
async def test_redis_restarts_during_update_policy(rig: Rig) -> None:
    """valkey stops while an UpdatePolicy is copying the change into 3,000 licenses and starts
    again: the answer never says not_applied once the policy changed, and every license ends
    up enforcing the new limit without restarting the service."""
    policy = (
        await rig.licenses.CreatePolicy(
            lpb.CreatePolicyRequest(policy=policy_pb2.Policy(max_uses=100)), metadata=admin_md()
        )
    ).policy
    ids = await create_licenses(rig.licenses, policy.id, 3000)
    call = asyncio.ensure_future(
        rig.licenses.UpdatePolicy(
            lpb.UpdatePolicyRequest(
                policy=policy_pb2.Policy(id=policy.id, max_uses=10),
                update_mask=field_mask_pb2.FieldMask(paths=["max_uses"]),
            ),
            metadata=admin_md(),
        )
    )
    for _ in range(int(WAIT_S / 0.001)):  # stop it once the policy has changed
        if await rig.store.hget(keys.policy(policy.id), "rev") == "2":
            break
        await asyncio.sleep(0.001)
    await rig.valkey.stop()
    try:
        answer = await call
        assert answer.policy.propagated_revision == 2  # finished before the stop
    except grpc.aio.AioRpcError as exc:
        err = rich_error(exc)
        assert (err.code, err.reason) == (grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE")
        assert err.metadata["outcome"] in ("applied", "unknown"), err
    finally:
        await rig.valkey.start()
    p = await wait_propagated(rig.licenses, policy.id)
    assert (p.revision, p.max_uses) == (2, 10)
    await assert_all_follow(rig.store, ids, 2, 10)
    await assert_enforced(rig.usage, ids[0], 10)
    await rig.check_store()
