"""meter-grpc benchmark: every figure of the request path next to its baseline measured in the
same run (ratios, because shared machines are noisy), printed as one table.

    make bench                      # or: python bench/bench.py --seconds 5 --rounds 5

- unary IncrementUsage / IncrementUsage + request_id / GetUsage, --concurrency calls in flight
  over --channels channels, against a bare grpc.aio server answering the same request with a
  constant (measured before and after each round); the same IncrementUsage run against a
  store fsyncing once a second (`appendfsync everysec`; meter-grpc's embedded store fsyncs on
  every write, `always`) and against a server keeping no usage events
  (METER_EVENT_RETENTION=0) and against a server exporting usage (METER_EXPORT_NDJSON: the
  outbox append in the script, the exporter beside it in the same process);
- the floor of one store round trip per call: the bare server awaiting one PING to the
  embedded store through meter-grpc's transport before it answers (bench/bare_server.py with
  a URL), unary and one caller; and the p50 of fdatasync after a 120-byte append on the
  store's disk, which every answered write waits for with `appendfsync always`;
- the store work of meter-grpc without its Python: the bare server running usage.lua (an
  increment, the same keys and arguments IncrementUsage sends) through the same transport
  before it answers (bench/bare_server.py with a URL and a license id), unary, one caller and
  stream: what is left of a gap once authentication, validation and mapping cost nothing;
- one caller (1 call in flight): IncrementUsage p50 against the bare server's p50, with
  `always` and with `everysec`;
- one StreamUsage stream against the bare server's bidi echo stream (the same client,
  --stream-inflight requests unanswered at most), with its floors: the bare stream sending one
  PING, or running usage.lua, per message through meter-grpc's transport, windowed like
  StreamUsage; and
  BatchIncrementUsage with --batch-size
  items over --batch-licenses licenses, --batch-inflight calls in flight on one channel
  (increments/s); the counters are read back at the end and must equal the OK answers;
- bench/memory.py (its own process and store): Redis memory per license and IncrementUsage
  p50 at 1,000 licenses and at up to --max-licenses.

Then a second table: the CPU time per call of this load generator, of the server and of its
valkey-server, read from /proc over the measured seconds of each scenario: what the gap to the
bare server is made of.

The servers run as their own processes, each meter-grpc on a valkey-server started here with
the embedded store's configuration; the scenarios are interleaved for --rounds rounds (the
others in a rotated order); each figure is the median over the rounds, each ratio the median of
the per-round ratios to the round's baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import itertools
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import redis.asyncio as aioredis
import uvloop
from _serving import ROOT, free_port, spawn, wait_serving

from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import policy_pb2
from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from meter_grpc.storage.embedded import EmbeddedServer, valkey_binary

TOKEN = "bench-admin-token"
MD = (("authorization", f"Bearer {TOKEN}"),)


Call = Callable[[ugrpc.UsageServiceStub, int], Awaitable[object]]


async def drive(
    target: str,
    call: Call,
    seconds: float,
    concurrency: int,
    channels: int,
    cpu: CPU | None = None,
) -> tuple[float, list[float]]:
    """Calls per second and latencies (ms) with `concurrency` calls in flight; `cpu` measures
    the CPU time spent over the measured seconds."""
    # What earlier scenarios left (their latencies) must not slow this one's garbage collections.
    gc.collect()
    gc.freeze()
    chans = [grpc.aio.insecure_channel(target) for _ in range(channels)]
    stubs = [ugrpc.UsageServiceStub(c) for c in chans]
    latencies: list[float] = []
    count = 0
    stop_at = 0.0
    measuring = False

    async def worker(w: int) -> None:
        nonlocal count
        stub = stubs[w % channels]
        i = 0
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await call(stub, w * 10_000_000 + i)
            i += 1
            if measuring:
                latencies.append((time.perf_counter() - t0) * 1000)
                count += 1

    try:
        stop_at = time.perf_counter() + 1.0  # warm-up
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        measuring = True
        if cpu is not None:
            cpu.begin()
        start = time.perf_counter()
        stop_at = start + seconds
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - start
        if cpu is not None:
            cpu.stop()
    finally:
        for c in chans:
            await c.close()
    return count / elapsed, latencies


async def drive_stream(
    target: str, license_id: str, seconds: float, inflight: int
) -> tuple[float, int]:
    """Answers per second on one StreamUsage stream with up to `inflight` requests unanswered
    (the client's own window), and how many answers were OK (to check counts afterwards)."""
    gc.collect()
    gc.freeze()
    ok = 0
    async with grpc.aio.insecure_channel(target) as ch:
        call = ugrpc.UsageServiceStub(ch).StreamUsage(metadata=MD)
        slots = asyncio.Semaphore(inflight)
        request = upb.IncrementUsageRequest(license_id=license_id)
        stop = False
        sent = 0

        async def write() -> None:
            nonlocal sent
            while not stop:
                await slots.acquire()
                await call.write(request)
                sent += 1
            await call.done_writing()

        writer = asyncio.ensure_future(write())
        received = 0
        counted = 0
        start = time.perf_counter()
        warm_until = start + 1.0
        end_at = warm_until + seconds
        measured_from = 0.0
        rate = 0.0
        while True:
            answer = await call.read()
            if answer is grpc.aio.EOF:
                break
            slots.release()
            received += 1
            if answer.WhichOneof("outcome") == "result":
                ok += 1
            now = time.perf_counter()
            if now >= warm_until and not measured_from:
                measured_from, counted = now, received
            if now >= end_at and not stop:
                stop = True
                rate = (received - counted) / (now - measured_from)
                slots.release()  # let the writer see `stop`
        await writer
    return rate, ok


async def drive_batches(
    target: str, items: list[upb.IncrementUsageRequest], seconds: float, inflight: int
) -> tuple[float, int]:
    """Increments per second with `inflight` BatchIncrementUsage calls of `items` in flight
    on one channel, and how many items were answered OK."""
    gc.collect()
    gc.freeze()
    ok = 0
    count = 0
    measuring = False
    stop_at = 0.0
    request = upb.BatchIncrementUsageRequest(items=items)
    async with grpc.aio.insecure_channel(target) as ch:
        stub = ugrpc.UsageServiceStub(ch)

        async def worker() -> None:
            nonlocal ok, count
            while time.perf_counter() < stop_at:
                resp = await stub.BatchIncrementUsage(request, metadata=MD)
                n = sum(r.WhichOneof("outcome") == "result" for r in resp.results)
                ok += n
                if measuring:
                    count += len(resp.results)

        stop_at = time.perf_counter() + 1.0  # warm-up
        await asyncio.gather(*(worker() for _ in range(inflight)))
        measuring = True
        start = time.perf_counter()
        stop_at = start + seconds
        await asyncio.gather(*(worker() for _ in range(inflight)))
        elapsed = time.perf_counter() - start
    return count / elapsed, ok


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


class CPU:
    """CPU seconds (user + system) of this process and of other processes, by pid."""

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = {name: pid for name, pid in pids.items() if pid}
        self.start: dict[str, float] = {}
        self.spent: dict[str, float] = {}

    def now(self) -> dict[str, float]:
        out = {"client": time.process_time()}
        for name, pid in self.pids.items():
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            out[name] = (int(fields[11]) + int(fields[12])) / self.TICK
        return out

    def begin(self) -> None:
        self.start = self.now()

    def stop(self) -> None:
        end = self.now()
        self.spent = {name: end[name] - self.start[name] for name in end}


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


async def main(args: argparse.Namespace) -> None:
    bare_port = free_port()
    bare_target = f"127.0.0.1:{bare_port}"
    with tempfile.TemporaryDirectory() as tmp:
        # The stores, started here so that their processes can be measured: the embedded
        # server's configuration (appendfsync always), and a second one fsyncing once a second.
        stores = {
            "always": EmbeddedServer(Path(tmp) / "always"),
            "everysec": EmbeddedServer(Path(tmp) / "everysec"),
        }
        urls = {name: await s.start() for name, s in stores.items()}
        async with aioredis.Redis.from_url(urls["everysec"]) as rc:
            await rc.config_set("appendfsync", "everysec")
        meters = {
            # name: (store, extra environment)
            "meter": ("always", {}),
            "everysec": ("everysec", {}),
            "no-events": ("always", {"METER_EVENT_RETENTION": "0"}),
            # Usage export on: each change also appended to the outbox, which the exporter
            # of the same process reads and writes to an NDJSON file beside the request path.
            "export": ("always", {"METER_EXPORT_NDJSON": str(Path(tmp) / "export.ndjson")}),
        }
        targets = {name: f"127.0.0.1:{free_port()}" for name in meters}
        # Servers sharing a store must share its license key secret.
        secret_file = Path(tmp) / "key-secret"
        secret_file.write_bytes(os.urandom(32))
        secret_file.chmod(0o600)
        bare = spawn([str(ROOT / "bench" / "bare_server.py"), bare_target], {})
        # The floor of one store round trip per call: the bare server, awaiting one PING to the
        # embedded store through meter-grpc's transport before it answers.
        floor_target = f"127.0.0.1:{free_port()}"
        floor = spawn(
            [
                str(ROOT / "bench" / "bare_server.py"),
                floor_target,
                args.redis_url or urls["always"],
            ],
            {},
        )
        procs = {"bare": bare, "floor": floor}
        for name, (store, extra) in meters.items():
            procs[name] = spawn(
                ["-m", "meter_grpc"],
                {
                    "METER_LISTEN": targets[name],
                    "METER_DATA_DIR": str(Path(tmp) / f"data-{name}"),
                    "METER_ADMIN_TOKENS": TOKEN,
                    "METER_REDIS_URL": args.redis_url or urls[store],
                    "METER_LOG_LEVEL": "WARNING",
                    "METER_KEY_SECRET_FILE": str(secret_file),
                    **extra,
                },
            )
        try:
            await wait_serving(bare_target, health=False)
            await wait_serving(floor_target, health=False)
            lics: dict[str, str] = {}
            policy = ""
            for name, target in targets.items():
                await wait_serving(target, health=True)
                async with grpc.aio.insecure_channel(target) as ch:
                    ls = lgrpc.LicenseServiceStub(ch)
                    pol = (
                        await ls.CreatePolicy(
                            lpb.CreatePolicyRequest(policy=policy_pb2.Policy(name="bench")),
                            metadata=MD,
                        )
                    ).policy
                    lics[name] = (
                        await ls.CreateLicense(
                            lpb.CreateLicenseRequest(license={"policy_id": pol.id}), metadata=MD
                        )
                    ).license.id
                    if name == "meter":
                        policy = pol.id
                        script_lic = (
                            await ls.CreateLicense(
                                lpb.CreateLicenseRequest(license={"policy_id": pol.id}),
                                metadata=MD,
                            )
                        ).license.id
            # The store work of meter-grpc without its Python: the bare server running usage.lua
            # (an increment of a license of its own) through meter-grpc's transport per call.
            script_floor_target = f"127.0.0.1:{free_port()}"
            procs["script-floor"] = spawn(
                [
                    str(ROOT / "bench" / "bare_server.py"),
                    script_floor_target,
                    args.redis_url or urls["always"],
                    script_lic,
                ],
                {},
            )
            await wait_serving(script_floor_target, health=False)

            def increment(name: str, rid: bool = False) -> Call:
                lic = lics[name]
                # A request id never used before, in the warm-up, the rounds and the workers
                # alike: a repeated one is a replay (no write, no fsync), not an increment.
                ids = itertools.count()

                async def call(stub: ugrpc.UsageServiceStub, i: int) -> object:
                    req = upb.IncrementUsageRequest(
                        license_id=lic, request_id=f"b{next(ids)}" if rid else ""
                    )
                    return await stub.IncrementUsage(req, metadata=MD)

                return call

            async def get(stub: ugrpc.UsageServiceStub, i: int) -> object:
                return await stub.GetUsage(
                    upb.GetUsageRequest(license_id=lics["meter"]), metadata=MD
                )

            async def bare_call(stub: ugrpc.UsageServiceStub, i: int) -> object:
                # The same request and metadata as meter's, answered without looking at them.
                return await stub.IncrementUsage(
                    upb.IncrementUsageRequest(license_id=lics["meter"]), metadata=MD
                )

            valkey = {name: stores[store].pid for name, (store, _) in meters.items()}
            valkey["floor"] = stores["always"].pid
            # name, target, call, process measured, its store's process, calls in flight
            Scenario = tuple[str, str, Call, str, int | None, int]
            c, one = args.concurrency, 1
            scenarios: list[Scenario] = [
                (
                    "IncrementUsage",
                    targets["meter"],
                    increment("meter"),
                    "meter",
                    valkey["meter"],
                    c,
                ),
                (
                    "IncrementUsage + request_id",
                    targets["meter"],
                    increment("meter", rid=True),
                    "meter",
                    valkey["meter"],
                    c,
                ),
                ("GetUsage", targets["meter"], get, "meter", valkey["meter"], c),
                (
                    "IncrementUsage, appendfsync everysec",
                    targets["everysec"],
                    increment("everysec"),
                    "everysec",
                    valkey["everysec"],
                    c,
                ),
                (
                    "IncrementUsage, METER_EVENT_RETENTION=0",
                    targets["no-events"],
                    increment("no-events"),
                    "no-events",
                    valkey["no-events"],
                    c,
                ),
                (
                    "IncrementUsage, export on (NDJSON)",
                    targets["export"],
                    increment("export"),
                    "export",
                    valkey["export"],
                    c,
                ),
                (FLOOR, floor_target, bare_call, "floor", valkey["floor"], c),
                (
                    SCRIPT_FLOOR,
                    script_floor_target,
                    bare_call,
                    "script-floor",
                    valkey["floor"],
                    c,
                ),
            ]
            base: Scenario = ("bare", bare_target, bare_call, "bare", None, c)
            single: Scenario = (
                "IncrementUsage, one caller",
                targets["meter"],
                increment("meter"),
                "meter",
                valkey["meter"],
                one,
            )
            single_base: Scenario = ("bare, one caller", bare_target, bare_call, "bare", None, one)
            single_everysec: Scenario = (
                "IncrementUsage, one caller, everysec",
                targets["everysec"],
                increment("everysec"),
                "everysec",
                valkey["everysec"],
                one,
            )
            single_floor: Scenario = (
                FLOOR + ", one caller",
                floor_target,
                bare_call,
                "floor",
                valkey["floor"],
                one,
            )
            single_script_floor: Scenario = (
                SCRIPT_FLOOR + ", one caller",
                script_floor_target,
                bare_call,
                "script-floor",
                valkey["floor"],
                one,
            )
            singles = (single_base, single, single_everysec, single_floor, single_script_floor)
            print(
                f"# {args.rounds} rounds x {args.seconds:g}s per scenario (interleaved; medians), "
                f"{c} calls in flight over {args.channels} channels (one caller: 1 on 1), "
                f"store: {args.redis_url or 'embedded valkey (appendfsync always)'}",
                flush=True,
            )
            rates: dict[str, list[float]] = collections.defaultdict(list)
            ratios: dict[str, list[float]] = collections.defaultdict(list)
            lats: dict[str, list[float]] = collections.defaultdict(list)
            cpu: dict[str, list[dict[str, float]]] = collections.defaultdict(list)

            async def run(sc: Scenario) -> float:
                name, target, call, proc, store_pid, inflight = sc
                meter = CPU({"server": procs[proc].pid, "valkey": store_pid})
                chans = args.channels if inflight > 1 else 1
                rate, lat = await drive(target, call, args.seconds, inflight, chans, meter)
                calls = rate * args.seconds
                cpu[name].append({k: v / calls * 1e6 for k, v in meter.spent.items()})
                lats[name] += lat
                return rate

            for r in range(args.rounds):
                order = scenarios[r % len(scenarios) :] + scenarios[: r % len(scenarios)]
                before = await run(base)
                round_rates = {sc[0]: await run(sc) for sc in order}
                after = await run(base)
                baseline = (before + after) / 2
                rates["bare"].append(baseline)
                for name, rate in round_rates.items():
                    rates[name].append(rate)
                    ratios[name].append(rate / baseline)
                for sc in singles:
                    rates[sc[0]].append(await run(sc))
                print(
                    f"  round {r + 1}: bare {baseline:.0f}/s",
                    {k: round(v) for k, v in round_rates.items()},
                    flush=True,
                )
            rows: list[tuple[str, str, str, str, str]] = []
            med = statistics.median
            if args.rounds:
                for name, target_ratio in (
                    ("IncrementUsage", "≥ 0.75x"),
                    ("IncrementUsage + request_id", ""),
                    ("GetUsage", "≥ 0.85x"),
                    ("IncrementUsage, appendfsync everysec", "(fsync cost)"),
                    ("IncrementUsage, METER_EVENT_RETENTION=0", "(XADD cost)"),
                    ("IncrementUsage, export on (NDJSON)", "(outbox cost)"),
                    (FLOOR, "(floor)"),
                    (SCRIPT_FLOOR, "(store work)"),
                ):
                    rows.append(
                        (
                            f"unary {name}, {c} in flight (calls/s)",
                            f"{med(rates[name]):,.0f}",
                            f"{med(rates['bare']):,.0f} bare unary",
                            f"{med(ratios[name]):.2f}x",
                            target_ratio,
                        )
                    )
                p_bare = med(lats[single_base[0]])
                for sc, label, goal in (
                    (single, "", "≤ +0.3 ms"),
                    (single_everysec, ", appendfsync everysec", "(fsync cost)"),
                    (single_floor, "", "(floor)"),
                    (single_script_floor, "", "(store work)"),
                ):
                    p_meter = med(lats[sc[0]])
                    what = {single_floor: FLOOR, single_script_floor: SCRIPT_FLOOR}.get(
                        sc, f"IncrementUsage p50{label}"
                    )
                    rows.append(
                        (
                            f"one caller, {what} (ms)",
                            f"{p_meter:.2f}",
                            f"{p_bare:.2f} bare unary",
                            f"{p_meter - p_bare:+.2f} ms",
                            goal,
                        )
                    )
                fsync = fdatasync_p50(stores["always"].data_dir)
                rows.append(
                    (
                        "fdatasync after a 120 B append, the store's disk, p50 (ms)",
                        f"{fsync:.3f}",
                        "",
                        "",
                        "(in every answer)",
                    )
                )
            if args.stream_rounds:
                rows += await bulk(
                    args, bare_target, targets["meter"], policy, floor_target, script_floor_target
                )
            if args.memory:
                rows += memory_rows(args)
            print()
            print(f"# {machine()}")
            widths = [max(len(row[i]) for row in [HEADER, *rows]) for i in range(5)]
            for row in [HEADER, tuple("-" * w for w in widths), *rows]:
                print(
                    "| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |"
                )
            if args.rounds:
                print()
                print("CPU per call (µs, medians over the rounds; client = this load generator):")
                print(f"{'scenario':42} {'client':>7} {'server':>7} {'valkey':>7}")
                for name in ["bare", *(sc[0] for sc in (*scenarios, *singles))]:
                    per = cpu[name]
                    vals = [
                        med([x.get(k, 0.0) for x in per]) for k in ("client", "server", "valkey")
                    ]
                    print(f"{name:42} {vals[0]:7.0f} {vals[1]:7.0f} {vals[2]:7.0f}")
        finally:
            for p in procs.values():
                p.send_signal(signal.SIGTERM)
            for p in procs.values():
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
            for s in stores.values():
                await s.stop()


HEADER = ("figure", "meter-grpc", "baseline (same run)", "ratio", "target")
# The bare server awaiting one PING through meter-grpc's transport per call (bare_server.py).
FLOOR = "bare + 1 PING"
SCRIPT_FLOOR = "bare + usage.lua"


def fdatasync_p50(directory: Path, n: int = 2000) -> float:
    """Median time (ms) of fdatasync after appending 120 bytes to a file in `directory`: what
    each write answered with `appendfsync always` waits for, at the least."""
    path = directory / "fsync.bench"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    took: list[float] = []
    try:
        for _ in range(n):
            os.write(fd, b"x" * 120)
            t0 = time.perf_counter()
            os.fdatasync(fd)
            took.append((time.perf_counter() - t0) * 1000)
    finally:
        os.close(fd)
        path.unlink()
    return statistics.median(took)


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    valkey = subprocess.run(
        [valkey_binary(), "--version"], capture_output=True, text=True, check=False
    ).stdout.split()
    version = next((w.split("=")[1] for w in valkey if w.startswith("v=")), "?")
    return (
        f"{os.cpu_count()} cores ({model}), Python {sys.version.split()[0]}, "
        f"valkey {version}, {time.strftime('%Y-%m-%d')}"
    )


def memory_rows(args: argparse.Namespace) -> list[tuple[str, str, str, str, str]]:
    """bench/memory.py in its own process: memory per license, latency at 1k vs N."""
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "memory.py"),
        "--licenses",
        str(args.memory_licenses),
        "--max-licenses",
        str(args.max_licenses),
        "--budget",
        str(args.memory_budget),
    ]
    print(f"# {' '.join(cmd[1:])}", flush=True)
    out = subprocess.run(
        cmd,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    res: dict[str, str] = {}
    for line in out.splitlines():
        if line.startswith("RESULT "):
            k, _, v = line[7:].partition("=")
            res[k] = v
        else:
            print(line, flush=True)
    n = int(res["large_n"])
    p1k, pn, again = float(res["p50_1k"]), float(res["p50_large"]), float(res["p50_1k_at_large"])
    return [
        (
            f"Redis memory per license, {args.memory_licenses:,} licenses (B)",
            f"{float(res['memory_per_license']):,.0f}",
            f"license hash {res['license_hash_bytes']} B",
            "",
            "≤ 1,024",
        ),
        (
            f"IncrementUsage p50 with {n:,} vs 1,000 licenses, same 1,000 used (ms)",
            f"{again:.2f}",
            f"{p1k:.2f} with 1,000",
            f"{float(res['ratio_same']):.2f}x",
            "≤ 1.10x",
        ),
        (
            f"IncrementUsage p50 with {n:,} licenses, random ones (ms)",
            f"{pn:.2f}",
            f"{p1k:.2f} with 1,000",
            f"{float(res['ratio_random']):.2f}x",
            "(first use of most)",
        ),
    ]


async def bulk(
    args: argparse.Namespace,
    bare_target: str,
    meter_target: str,
    policy: str,
    floor_target: str,
    script_floor_target: str,
) -> list[tuple[str, str, str, str, str]]:
    """StreamUsage (one stream, the server's window) against the bare bidi echo stream, its
    floors (the bare stream sending one PING, or running usage.lua, per message, windowed the
    same way), and
    BatchIncrementUsage, interleaved per round like the unary scenarios; the counts of the
    licenses used are checked against the OK answers at the end."""
    async with grpc.aio.insecure_channel(meter_target) as ch:
        ls = lgrpc.LicenseServiceStub(ch)
        lics = [
            (
                await ls.CreateLicense(
                    lpb.CreateLicenseRequest(license={"policy_id": policy}), metadata=MD
                )
            ).license.id
            for _ in range(1 + args.batch_licenses)
        ]
        stream_lic, batch_lics = lics[0], lics[1:]
        items = [
            upb.IncrementUsageRequest(license_id=batch_lics[i % len(batch_lics)])
            for i in range(args.batch_size)
        ]
        bare_rates: list[float] = []
        stream_rates: list[float] = []
        stream_ratios: list[float] = []
        floor_rates: list[float] = []
        floor_ratios: list[float] = []
        script_rates: list[float] = []
        script_ratios: list[float] = []
        batch_rates: list[float] = []
        stream_ok = batch_ok = 0
        print(
            f"# streams: one StreamUsage stream, {args.stream_inflight} unanswered at most on "
            f"the client; batches: {args.batch_size} items over {len(batch_lics)} licenses, "
            f"{args.batch_inflight} calls in flight on one channel; "
            f"{args.stream_rounds} rounds x {args.seconds:g}s",
            flush=True,
        )
        for r in range(args.stream_rounds):
            before, _ = await drive_stream(
                bare_target, stream_lic, args.seconds, args.stream_inflight
            )
            rate, ok = await drive_stream(
                meter_target, stream_lic, args.seconds, args.stream_inflight
            )
            stream_ok += ok
            floor, _ = await drive_stream(
                floor_target, stream_lic, args.seconds, args.stream_inflight
            )
            scripted, _ = await drive_stream(
                script_floor_target, stream_lic, args.seconds, args.stream_inflight
            )
            after, _ = await drive_stream(
                bare_target, stream_lic, args.seconds, args.stream_inflight
            )
            brate, ok = await drive_batches(meter_target, items, args.seconds, args.batch_inflight)
            batch_ok += ok
            baseline = (before + after) / 2
            bare_rates.append(baseline)
            stream_rates.append(rate)
            stream_ratios.append(rate / baseline)
            floor_rates.append(floor)
            floor_ratios.append(floor / baseline)
            script_rates.append(scripted)
            script_ratios.append(scripted / baseline)
            batch_rates.append(brate)
            print(
                f"  round {r + 1}: bare bidi {baseline:.0f}/s, StreamUsage {rate:.0f}/s, "
                f"bare bidi + 1 PING per message {floor:.0f}/s, "
                f"bare bidi + usage.lua per message {scripted:.0f}/s, "
                f"BatchIncrementUsage {brate:.0f} increments/s",
                flush=True,
            )
        us = ugrpc.UsageServiceStub(ch)
        counted = [
            (await us.GetUsage(upb.GetUsageRequest(license_id=lic), metadata=MD)).uses
            for lic in lics
        ]
        exact = counted[0] == stream_ok and sum(counted[1:]) == batch_ok
        print(
            f"counts: StreamUsage {counted[0]} counted / {stream_ok} OK answers, "
            f"batches {sum(counted[1:])} / {batch_ok}: {'exact' if exact else 'MISMATCH'}",
            flush=True,
        )
        med = statistics.median
        check = "" if exact else " COUNTS MISMATCH"
        return [
            (
                "StreamUsage, one stream (msgs/s)",
                f"{med(stream_rates):,.0f}",
                f"{med(bare_rates):,.0f} bare bidi echo",
                f"{med(stream_ratios):.2f}x",
                "≥ 0.70x" + check,
            ),
            (
                "StreamUsage floor: bare bidi + 1 PING per message (msgs/s)",
                f"{med(floor_rates):,.0f}",
                f"{med(bare_rates):,.0f} bare bidi echo",
                f"{med(floor_ratios):.2f}x",
                "(floor)",
            ),
            (
                "StreamUsage store work: bare bidi + usage.lua per message (msgs/s)",
                f"{med(script_rates):,.0f}",
                f"{med(bare_rates):,.0f} bare bidi echo",
                f"{med(script_ratios):.2f}x",
                "(store work)",
            ),
            (
                f"BatchIncrementUsage x{args.batch_size}, one channel (increments/s)",
                f"{med(batch_rates):,.0f}",
                "",
                "",
                "≥ 20,000" + check,
            ),
        ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of the unary scenarios (0: none)"
    )
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument(
        "--stream-rounds", type=int, default=3, help="rounds of the stream and batch scenarios"
    )
    parser.add_argument("--stream-inflight", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--batch-licenses", type=int, default=20)
    parser.add_argument("--batch-inflight", type=int, default=4)
    parser.add_argument(
        "--redis-url", default="", help="METER_REDIS_URL for the services (default: embedded)"
    )
    parser.add_argument(
        "--no-memory", dest="memory", action="store_false", help="skip bench/memory.py"
    )
    parser.add_argument("--memory-licenses", type=int, default=100_000)
    parser.add_argument("--max-licenses", type=int, default=1_000_000)
    parser.add_argument(
        "--memory-budget", type=float, default=900, help="seconds of creating licenses at most"
    )
    uvloop.run(main(parser.parse_args()))
