"""meter-grpc benchmark: throughput and latency of the request path, against a bare grpc.aio
server measured in the same run (ratios, because shared machines are noisy).

    make bench                      # or: python bench/bench.py --seconds 5 --concurrency 64

Then the bulk paths, in the same run: one StreamUsage stream against the bare server's bidi echo
stream (the same client, --stream-inflight requests unanswered at most), and
BatchIncrementUsage with --batch-size items over --batch-licenses licenses, --batch-inflight
calls in flight on one channel (increments/s); the counters are read back at the end and must
equal the OK answers.

Both servers run as their own processes (meter-grpc with its embedded valkey-server, appendfsync
always); one client process drives them with --concurrency calls in flight over --channels
channels, for --seconds per scenario after a warm-up. The scenarios are interleaved for
--rounds rounds (the baseline before and after each round, the others in a rotated order);
each figure is the median over the rounds, each ratio the median of the per-round ratios to
the round's baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import policy_pb2
from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-admin-token"
MD = (("authorization", f"Bearer {TOKEN}"),)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, *args],
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def wait_serving(target: str, health: bool) -> None:
    async with grpc.aio.insecure_channel(target) as ch:
        for _ in range(600):
            try:
                if health:
                    r = await health_pb2_grpc.HealthStub(ch).Check(
                        health_pb2.HealthCheckRequest(), timeout=1
                    )
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                else:
                    await ugrpc.UsageServiceStub(ch).GetUsage(upb.GetUsageRequest(), timeout=1)
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{target} did not come up")


Call = Callable[[ugrpc.UsageServiceStub, int], Awaitable[object]]


async def drive(
    target: str, call: Call, seconds: float, concurrency: int, channels: int
) -> tuple[float, list[float]]:
    """Calls per second and latencies (ms) with `concurrency` calls in flight."""
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
        start = time.perf_counter()
        stop_at = start + seconds
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - start
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


async def main(args: argparse.Namespace) -> None:
    bare_port, meter_port = free_port(), free_port()
    bare_target, meter_target = f"127.0.0.1:{bare_port}", f"127.0.0.1:{meter_port}"
    with tempfile.TemporaryDirectory() as data:
        procs = [
            spawn([str(ROOT / "bench" / "bare_server.py"), bare_target], {}),
            spawn(
                ["-m", "meter_grpc"],
                {
                    "METER_LISTEN": meter_target,
                    "METER_DATA_DIR": data,
                    "METER_ADMIN_TOKENS": TOKEN,
                    "METER_REDIS_URL": args.redis_url,
                    "METER_LOG_LEVEL": "WARNING",
                },
            ),
        ]
        try:
            await wait_serving(bare_target, health=False)
            await wait_serving(meter_target, health=True)
            async with grpc.aio.insecure_channel(meter_target) as ch:
                ls = lgrpc.LicenseServiceStub(ch)
                policy = (
                    await ls.CreatePolicy(
                        lpb.CreatePolicyRequest(policy=policy_pb2.Policy(name="bench")), metadata=MD
                    )
                ).policy
                lic = (
                    await ls.CreateLicense(
                        lpb.CreateLicenseRequest(license={"policy_id": policy.id}), metadata=MD
                    )
                ).license

            async def bare(stub: ugrpc.UsageServiceStub, i: int) -> object:
                # The same request and metadata as meter's, answered without looking at them.
                return await stub.IncrementUsage(
                    upb.IncrementUsageRequest(license_id=lic.id), metadata=MD
                )

            async def increment(stub: ugrpc.UsageServiceStub, i: int) -> object:
                return await stub.IncrementUsage(
                    upb.IncrementUsageRequest(license_id=lic.id), metadata=MD
                )

            async def increment_idem(stub: ugrpc.UsageServiceStub, i: int) -> object:
                return await stub.IncrementUsage(
                    upb.IncrementUsageRequest(license_id=lic.id, request_id=f"b{i}"), metadata=MD
                )

            async def get(stub: ugrpc.UsageServiceStub, i: int) -> object:
                return await stub.GetUsage(upb.GetUsageRequest(license_id=lic.id), metadata=MD)

            scenarios: list[tuple[str, str, Call]] = [
                ("bare grpc.aio IncrementUsage (baseline)", bare_target, bare),
                ("meter IncrementUsage", meter_target, increment),
                ("meter IncrementUsage + request_id", meter_target, increment_idem),
                ("meter GetUsage", meter_target, get),
            ]
            print(
                f"# {args.rounds} rounds x {args.seconds:g}s per scenario (interleaved; medians), "
                f"{args.concurrency} calls in flight over {args.channels} channels, store: "
                f"{args.redis_url or 'embedded valkey (appendfsync always)'}",
                flush=True,
            )
            rates: dict[str, list[float]] = {name: [] for name, _, _ in scenarios}
            ratios: dict[str, list[float]] = {name: [] for name, _, _ in scenarios}
            latencies: dict[str, list[float]] = {name: [] for name, _, _ in scenarios}
            base_name, base_target, base_call = scenarios[0]
            measured = scenarios[1:]
            for r in range(args.rounds):
                # The baseline before and after the round; the other scenarios in a rotated
                # order, so that none always runs first.
                before, lat = await drive(
                    base_target, base_call, args.seconds, args.concurrency, args.channels
                )
                latencies[base_name] += lat
                order = measured[r % len(measured) :] + measured[: r % len(measured)]
                round_rates = {}
                for name, target, call in order:
                    rate, lat = await drive(
                        target, call, args.seconds, args.concurrency, args.channels
                    )
                    round_rates[name] = rate
                    latencies[name] += lat
                after, lat = await drive(
                    base_target, base_call, args.seconds, args.concurrency, args.channels
                )
                latencies[base_name] += lat
                baseline = (before + after) / 2
                rates[base_name].append(baseline)
                ratios[base_name].append(1.0)
                print(
                    f"  round {r + 1}: bare {baseline:.0f}",
                    {k: round(v) for k, v in round_rates.items()},
                    flush=True,
                )
                for name, rate in round_rates.items():
                    rates[name].append(rate)
                    ratios[name].append(rate / baseline)
            if args.rounds:
                print(f"{'scenario':42} {'calls/s':>9} {'x bare':>7} {'p50 ms':>7} {'p99 ms':>7}")
                for name, _, _ in scenarios:
                    lat = latencies[name]
                    print(
                        f"{name:42} {statistics.median(rates[name]):9.0f} "
                        f"{statistics.median(ratios[name]):7.2f} "
                        f"{statistics.median(lat):7.2f} {pct(lat, 0.99):7.2f}"
                    )
            if args.stream_rounds:
                await bulk(args, bare_target, meter_target, policy.id)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()


async def bulk(args: argparse.Namespace, bare_target: str, meter_target: str, policy: str) -> None:
    """StreamUsage (one stream, the server's window) against the bare bidi echo stream, and
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
            after, _ = await drive_stream(
                bare_target, stream_lic, args.seconds, args.stream_inflight
            )
            brate, ok = await drive_batches(meter_target, items, args.seconds, args.batch_inflight)
            batch_ok += ok
            baseline = (before + after) / 2
            bare_rates.append(baseline)
            stream_rates.append(rate)
            stream_ratios.append(rate / baseline)
            batch_rates.append(brate)
            print(
                f"  round {r + 1}: bare bidi {baseline:.0f}/s, StreamUsage {rate:.0f}/s, "
                f"BatchIncrementUsage {brate:.0f} increments/s",
                flush=True,
            )
        us = ugrpc.UsageServiceStub(ch)
        counted = [
            (await us.GetUsage(upb.GetUsageRequest(license_id=lic), metadata=MD)).uses
            for lic in lics
        ]
        exact = counted[0] == stream_ok and sum(counted[1:]) == batch_ok
        print(f"{'scenario':42} {'msgs/s':>9} {'x bare':>7}")
        print(
            f"{'bare grpc.aio bidi echo stream (baseline)':42} {statistics.median(bare_rates):9.0f} {1:7.2f}"
        )
        print(
            f"{'meter StreamUsage (window 256)':42} {statistics.median(stream_rates):9.0f} "
            f"{statistics.median(stream_ratios):7.2f}"
        )
        print(
            f"{f'meter BatchIncrementUsage x{args.batch_size} (incr/s)':42} "
            f"{statistics.median(batch_rates):9.0f} {'':>7}"
        )
        print(
            f"counts: StreamUsage {counted[0]} counted / {stream_ok} OK answers, "
            f"batches {sum(counted[1:])} / {batch_ok}: {'exact' if exact else 'MISMATCH'}"
        )


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
        "--redis-url", default="", help="METER_REDIS_URL for the service (default: embedded)"
    )
    uvloop.run(main(parser.parse_args()))
