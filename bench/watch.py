"""WatchUsage isolation: how fast another license's watcher gets its events while one license
key holds its maximum of WatchUsage streams (METER_WATCH_PER_KEY) and its license is busy.

    make bench                       # or: python bench/watch.py --events 200 --rounds 2

meter-grpc runs as its own process (embedded valkey-server, appendfsync always). Per round:
- baseline: license B's watcher alone; this process increments B `--events` times, one at
  a time, and times each increment from its call until its event arrives on B's stream;
- at cap: the same, while a second client process holds key A's maximum of streams (one more
  is refused, checked) and increments A every `--load-ms` ms, every event of A going to all
  of A's watchers.
Prints p50/p99 of both (medians over the rounds) and the at-cap p99 over the baseline p99
measured in the same run. `other_license_p99()` is the measurement, for other code to call.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import policy_pb2
from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-admin-token"
ADMIN = (("authorization", f"Bearer {TOKEN}"),)
PER_KEY = 16  # METER_WATCH_PER_KEY's default


def key_md(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"License {key}"),)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], p: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1]


async def wait_serving(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as ch:
        for _ in range(600):
            try:
                r = await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=1
                )
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError("meter-grpc did not start")


async def other_license_p99(target: str, license_id: str, key: str, events: int) -> list[float]:
    """Seconds from each of `events` IncrementUsage calls on a license until its event
    arrives on a WatchUsage stream of that license (its key), one call at a time."""
    async with grpc.aio.insecure_channel(target) as ch:
        usage = ugrpc.UsageServiceStub(ch)
        call = usage.WatchUsage(upb.WatchUsageRequest(license_id=license_id), metadata=key_md(key))
        await call.initial_metadata()
        stream = call.__aiter__()
        latencies = []
        for _ in range(events):
            start = time.perf_counter()
            await usage.IncrementUsage(
                upb.IncrementUsageRequest(license_id=license_id, request_id=f"w{time.time_ns()}"),
                metadata=key_md(key),
            )
            await stream.__anext__()
            latencies.append(time.perf_counter() - start)
        call.cancel()
        return latencies


async def hold(target: str, license_id: str, key: str, load_ms: float) -> None:
    """The busy key: its maximum of streams (one more must be refused), read all along, and
    an increment of its license every load_ms ms. Prints "ready" once all are open."""
    async with grpc.aio.insecure_channel(target) as ch:
        usage = ugrpc.UsageServiceStub(ch)
        calls = []
        for _ in range(PER_KEY):
            call = usage.WatchUsage(
                upb.WatchUsageRequest(license_id=license_id), metadata=key_md(key)
            )
            await call.initial_metadata()
            calls.append(call)
        extra = usage.WatchUsage(upb.WatchUsageRequest(license_id=license_id), metadata=key_md(key))
        try:
            async for _ in extra:
                pass
            raise SystemExit("one stream more than the cap was not refused")
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise

        async def drain(call: grpc.aio.UnaryStreamCall) -> None:  # type: ignore[type-arg]
            async for _ in call:
                pass

        readers = [asyncio.create_task(drain(c)) for c in calls]
        print("ready", flush=True)
        while all(not r.done() for r in readers):
            await usage.IncrementUsage(
                upb.IncrementUsageRequest(license_id=license_id), metadata=key_md(key)
            )
            await asyncio.sleep(load_ms / 1000)


async def main(args: argparse.Namespace) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with tempfile.TemporaryDirectory() as data:
        port = free_port()
        target = f"127.0.0.1:{port}"
        server = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "meter_grpc",
            env={
                **env,
                "METER_LISTEN": target,
                "METER_DATA_DIR": data,
                "METER_ADMIN_TOKENS": TOKEN,
                "METER_LOG_LEVEL": "WARNING",
            },
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            await wait_serving(target)
            async with grpc.aio.insecure_channel(target) as ch:
                licenses = lgrpc.LicenseServiceStub(ch)
                policy = await licenses.CreatePolicy(
                    lpb.CreatePolicyRequest(policy=policy_pb2.Policy(name="bench-watch")),
                    metadata=ADMIN,
                )
                a, b = [
                    (
                        await licenses.CreateLicense(
                            lpb.CreateLicenseRequest(license={"policy_id": policy.policy.id}),
                            metadata=ADMIN,
                        )
                    ).license
                    for _ in range(2)
                ]
            await other_license_p99(target, b.id, b.key, 20)  # warm-up
            results: dict[str, list[list[float]]] = {"baseline": [], "at cap": []}
            for _ in range(args.rounds):
                results["baseline"].append(
                    await other_license_p99(target, b.id, b.key, args.events)
                )
                holder = await asyncio.create_subprocess_exec(
                    sys.executable,
                    __file__,
                    "--hold",
                    target,
                    a.id,
                    a.key,
                    str(args.load_ms),
                    env=env,
                    stdout=asyncio.subprocess.PIPE,
                )
                assert holder.stdout is not None
                line = await asyncio.wait_for(holder.stdout.readline(), 60)
                if line.strip() != b"ready":
                    raise RuntimeError("the key holding its cap did not start")
                try:
                    results["at cap"].append(
                        await other_license_p99(target, b.id, b.key, args.events)
                    )
                finally:
                    holder.send_signal(signal.SIGTERM)
                    await holder.wait()
        finally:
            server.send_signal(signal.SIGTERM)
            await asyncio.wait_for(server.wait(), 30)
    figures = {
        name: (
            statistics.median(pct(r, 50) for r in rounds) * 1000,
            statistics.median(pct(r, 99) for r in rounds) * 1000,
        )
        for name, rounds in results.items()
    }
    print(
        f"WatchUsage, another license's watcher ({args.events} events x {args.rounds} rounds, "
        f"increment call to event arrival):"
    )
    for name, (p50, p99) in figures.items():
        print(f"  {name:<9} p50 {p50:6.1f} ms   p99 {p99:6.1f} ms")
    ratio = figures["at cap"][1] / figures["baseline"][1]
    print(
        f"  one key at its cap of {PER_KEY} streams, its license incremented every "
        f"{args.load_ms:g} ms: other-license watcher p99 {figures['at cap'][1]:.1f} ms "
        f"({ratio:.2f}x baseline; target < 100 ms)"
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=200, help="events timed per scenario and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--load-ms", type=float, default=5.0, help="the busy license's increment pace")
    return p.parse_args()


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--hold":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        asyncio.run(hold(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])))
    else:
        asyncio.run(main(parse_args()))
