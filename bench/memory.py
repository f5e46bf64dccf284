"""Redis memory per license, and IncrementUsage latency as the number of licenses grows.

    python bench/memory.py                       # 100,000 licenses, then up to 1,000,000
    python bench/memory.py --licenses 100000 --max-licenses 300000 --budget 120

Starts its own embedded valkey-server (appendfsync always, as meter-grpc's embedded store)
and a meter-grpc server process on it. Licenses are created with the service's own create
path (meter_grpc.domain.licensing.Licensing over a RedisStore, in this process, a few thousand
creates in flight so that the transport pipelines them): the real format, every index entry.

- memory per license: `used_memory` (INFO memory) after creating --licenses licenses of a
  policy of default size (no machines, no events, no usage), minus before, divided by the
  count; with the share of each key (MEMORY USAGE of a sample).
- latency: p50 of IncrementUsage over gRPC, one caller, each call on a random license, on a
  store of 1,000 licenses and on a second store (same configuration, its own meter-grpc
  server) once --max-licenses exist there (or as many as were created within --budget seconds
  of creating: the figure says how many): on its first 1,000 and on any of them. The two are
  measured in interleaved rounds at the end; the ratios are medians of the per-round ratios.

Prints `RESULT key=value` lines (read by bench/bench.py for its table) and a readable summary.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio as aioredis
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from _serving import free_port, spawn, wait_serving  # noqa: E402

from meter.v1 import usage_service_pb2 as upb  # noqa: E402
from meter.v1 import usage_service_pb2_grpc as ugrpc  # noqa: E402
from meter_grpc.domain.clock import SystemClock  # noqa: E402
from meter_grpc.domain.keysecret import KeySecret  # noqa: E402
from meter_grpc.domain.licensing import Licensing  # noqa: E402
from meter_grpc.domain.models import License, Policy  # noqa: E402
from meter_grpc.storage import keys  # noqa: E402
from meter_grpc.storage.commands import RedisClient  # noqa: E402
from meter_grpc.storage.embedded import EmbeddedServer  # noqa: E402
from meter_grpc.storage.store import RedisStore  # noqa: E402

TOKEN = "bench-admin-token"
MD = (("authorization", f"Bearer {TOKEN}"),)
IN_FLIGHT = 2000


async def used_memory(r: aioredis.Redis) -> int:
    info = await r.info("memory")
    return int(info["used_memory"])


async def create(
    r: aioredis.Redis, licensing: Licensing, policy_id: str, n: int, out: list[str]
) -> None:
    """n licenses of the policy, IN_FLIGHT creates at a time; their ids appended to out.
    The store fsyncs once a second meanwhile (the contents are the same; only the creating
    is faster), and on every write again afterwards, as meter-grpc's embedded store does."""
    await r.config_set("appendfsync", "everysec")
    try:
        await _create(licensing, policy_id, n, out)
    finally:
        await r.config_set("appendfsync", "always")
    # The append-only file grew: valkey rewrites it in a child process, which competes for
    # the disk and the CPU. Latencies are measured once that is over.
    while True:
        info = await r.info("persistence")
        if not (info.get("aof_rewrite_in_progress") or info.get("aof_rewrite_scheduled")):
            break
        await asyncio.sleep(0.2)


async def _create(licensing: Licensing, policy_id: str, n: int, out: list[str]) -> None:
    done = 0
    while done < n:
        k = min(IN_FLIGHT, n - done)
        made = await asyncio.gather(
            *(licensing.create_license(License(policy_id=policy_id)) for _ in range(k))
        )
        out += [lic.id for lic in made]
        done += k


async def script_usec(r: aioredis.Redis) -> float:
    """valkey's CPU time per EVALSHA (µs) since the last CONFIG RESETSTAT."""
    stats = await r.info("commandstats")
    return float(stats.get("cmdstat_evalsha", {}).get("usec_per_call", 0.0))


async def p50_increment(target: str, ids: list[str], seconds: float) -> tuple[float, int]:
    """Median latency (ms) of IncrementUsage, one caller, random licenses among `ids`."""
    rng = random.Random(7)
    lat: list[float] = []
    async with grpc.aio.insecure_channel(target) as ch:
        stub = ugrpc.UsageServiceStub(ch)
        for _ in range(200):  # warm-up
            await stub.IncrementUsage(upb.IncrementUsageRequest(license_id=ids[0]), metadata=MD)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            req = upb.IncrementUsageRequest(license_id=rng.choice(ids))
            t0 = time.perf_counter()
            await stub.IncrementUsage(req, metadata=MD)
            lat.append((time.perf_counter() - t0) * 1000)
    return statistics.median(lat), len(lat)


async def key_shares(r: aioredis.Redis, store: RedisStore, license_id: str) -> dict[str, int]:
    lic = await store.get_license(license_id)
    assert lic is not None
    out = {
        "license hash": int(await r.memory_usage(keys.license(license_id), samples=0) or 0),
        "key lookup": int(
            await r.memory_usage(keys.license_by_key(lic.key_digest), samples=0) or 0
        ),
    }
    out["encoding"] = await r.object("encoding", keys.license(license_id))
    return out


def spawn_meter(target: str, url: str, data_dir: Path) -> subprocess.Popen[bytes]:
    return spawn(
        ["-m", "meter_grpc"],
        {
            "METER_LISTEN": target,
            "METER_REDIS_URL": url,
            "METER_DATA_DIR": str(data_dir),
            "METER_ADMIN_TOKENS": TOKEN,
            "METER_LOG_LEVEL": "WARNING",
        },
    )


class Stack:
    """One embedded valkey-server, a meter-grpc server process on it, and this process's own
    Licensing over the same store (sharing the server's key secret)."""

    def __init__(self, tmp: Path, name: str) -> None:
        self.dir = tmp / name
        self.embedded = EmbeddedServer(self.dir / "valkey")
        self.target = f"127.0.0.1:{free_port()}"

    async def __aenter__(self) -> Stack:
        url = await self.embedded.start()
        self.proc = spawn_meter(self.target, url, self.dir / "data")
        self.r = aioredis.Redis.from_url(url, decode_responses=True)
        self.store = RedisStore(RedisClient(url, timeout_s=30))
        # The server's key secret (created in its data dir): keys digest the same on both sides.
        secret = KeySecret.configured(None, self.dir / "data")
        self.licensing = Licensing(self.store, SystemClock(), secret)
        self.policy = (await self.licensing.create_policy(Policy(name="bench"))).id
        await wait_serving(self.target, health=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        await self.store.close()
        await self.r.aclose()
        await self.embedded.stop()

    async def create(self, n: int, out: list[str]) -> None:
        await create(self.r, self.licensing, self.policy, n, out)


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # Two stores of the same configuration: `small` keeps 1,000 licenses, `large` grows to
        # --max-licenses; their latencies are measured interleaved at the end, so that the
        # machine's drift over the minutes of creating does not enter the comparison.
        async with Stack(Path(tmp), "small") as small, Stack(Path(tmp), "large") as large:
            small_ids: list[str] = []
            await small.create(1000, small_ids)
            ids: list[str] = []
            await large.create(1000, ids)

            # Memory: the licenses made from here on are never used (no usage, no events).
            fresh = args.licenses - len(ids)
            before = await used_memory(large.r)
            t0 = time.perf_counter()
            await large.create(fresh, ids)
            rate = fresh / (time.perf_counter() - t0)
            per_license = (await used_memory(large.r) - before) / fresh
            shares = await key_shares(large.r, large.store, ids[-1])
            print(
                f"# {fresh:,} licenses created in {fresh / rate:.0f}s ({rate:,.0f}/s); "
                f"used_memory delta / N = {per_license:,.0f} B per license (license hash "
                f"{shares['license hash']} B, {shares['encoding']}; key lookup "
                f"{shares['key lookup']} B; the rest: index entries)",
                flush=True,
            )
            print(f"RESULT memory_per_license={per_license:.0f}")
            print(f"RESULT license_hash_bytes={shares['license hash']}")

            t0 = time.perf_counter()
            while len(ids) < args.max_licenses and time.perf_counter() - t0 < args.budget:
                n = min(50_000, args.max_licenses - len(ids))
                await large.create(n, ids)
            big = len(ids)
            print(
                f"# {big:,} licenses in the large store after {time.perf_counter() - t0:.0f}s "
                f"more; used_memory {await used_memory(large.r) / 2**20:,.0f} MiB",
                flush=True,
            )
            # Interleaved rounds, one caller each: the small store's 1,000 licenses at random,
            # the large store's first 1,000 at random, then any of the large store's.
            for st in (small, large):
                await st.r.config_resetstat()
            p1k, again, rand = [], [], []
            for _ in range(args.latency_rounds):
                p1k.append((await p50_increment(small.target, small_ids, args.seconds))[0])
                again.append((await p50_increment(large.target, ids[:1000], args.seconds))[0])
                rand.append((await p50_increment(large.target, ids, args.seconds))[0])
            med = statistics.median
            same_ratio = med(a / b for a, b in zip(again, p1k, strict=True))
            rand_ratio = med(a / b for a, b in zip(rand, p1k, strict=True))
            usec_small, usec_big = await script_usec(small.r), await script_usec(large.r)
            print(
                f"# IncrementUsage p50, {args.latency_rounds} interleaved rounds: "
                f"{med(p1k):.3f} ms with 1,000 licenses (valkey {usec_small:.1f} µs per script "
                f"call); with {big:,}: {med(again):.3f} ms on the first 1,000 "
                f"({same_ratio:.2f}x), {med(rand):.3f} ms on random ones ({rand_ratio:.2f}x) "
                f"(valkey {usec_big:.1f} µs per script call)",
                flush=True,
            )
            print(f"RESULT p50_1k={med(p1k):.3f}")
            print(f"RESULT p50_large={med(rand):.3f}")
            print(f"RESULT p50_1k_at_large={med(again):.3f}")
            print(f"RESULT ratio_same={same_ratio:.3f}")
            print(f"RESULT ratio_random={rand_ratio:.3f}")
            print(f"RESULT large_n={big}")


def parse(argv: list[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--licenses", type=int, default=100_000, help="for memory per license")
    parser.add_argument("--max-licenses", type=int, default=1_000_000, help="for the latency")
    parser.add_argument(
        "--budget", type=float, default=900, help="seconds of creating beyond --licenses at most"
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="per latency measurement")
    parser.add_argument("--latency-rounds", type=int, default=5)
    return parser.parse_args(argv)


if __name__ == "__main__":
    uvloop.run(main(parse()))
