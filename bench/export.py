"""Usage export figures (README "Export to billing"), on a valkey-server of the embedded store's
configuration started here:

- the outbox append's cost: usage.lua increments per second with export off and on, 64 in
  flight, interleaved rounds (ratio of medians);
- Redis memory per outbox entry (used_memory delta over --entries entries on --licenses
  licenses, nothing acknowledged: a sink down), and what a day at 1,000 events/s needs;
- the exporter's throughput draining that backlog to the NDJSON sink (fsync per batch);
- the reading cost of the slot-aligned layout: one pass of XREADGROUP over 16,384 empty
  outbox streams (every slot holding a license), one look at their newest ids (what an idle
  exporter does instead) and one read of the registry of 16,384 stream names.

    python bench/export.py [--entries 200000] [--licenses 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from meter_grpc.domain import periods  # noqa: E402
from meter_grpc.domain.ids import new_id  # noqa: E402
from meter_grpc.export.exporter import Exporter  # noqa: E402
from meter_grpc.export.sinks.ndjson import NdjsonSink  # noqa: E402
from meter_grpc.storage import keys  # noqa: E402
from meter_grpc.storage.commands import RedisClient  # noqa: E402
from meter_grpc.storage.embedded import EmbeddedServer  # noqa: E402
from meter_grpc.storage.store import RedisStore  # noqa: E402


async def _licenses(client: RedisClient, n: int) -> list[str]:
    ids = [new_id() for _ in range(n)]  # UUIDv7, as real licenses: the entry ids' length
    await asyncio.gather(
        *(
            client.hset(keys.license(i), mapping={"id": i, "policy_id": "p", "uses": "0"})
            for i in ids
        )
    )
    return ids


async def _usage(client: RedisClient, names: list[str]) -> int:
    sizes = await asyncio.gather(
        *(client.execute_command("MEMORY", "USAGE", n, "SAMPLES", "0") for n in names)
    )
    return sum(int(s or 0) for s in sizes)


async def _rate(store: RedisStore, ids: list[str], calls: int, inflight: int = 64) -> float:
    now = int(time.time() * 1000)
    bounds = periods.period_bounds_arg(now)

    async def worker(w: int) -> None:
        for k in range(w, calls, inflight):
            await store.usage(
                ids[k % len(ids)], "inc", amount=1, request_id="", now_ms=now, periods=bounds
            )

    began = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(inflight)))
    return calls / (time.perf_counter() - began)


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        server = EmbeddedServer(Path(tmp) / "store")
        url = await server.start()
        try:
            off = RedisStore(RedisClient(url), event_retention=1000, export=False)
            on = RedisStore(RedisClient(url), event_retention=1000, export=True)
            ids = await _licenses(off.client, args.licenses)
            rates: dict[str, list[float]] = {"off": [], "on": []}
            for r in range(args.rounds):
                order = (("off", off), ("on", on)) if r % 2 == 0 else (("on", on), ("off", off))
                for name, store in order:
                    rates[name].append(await _rate(store, ids, args.calls))
            r_off, r_on = statistics.median(rates["off"]), statistics.median(rates["on"])
            print(f"usage.lua increments/s, 64 in flight: export off {r_off:,.0f}, on {r_on:,.0f}")
            print(f"  ratio on/off {r_on / r_off:.2f}x (median of {args.rounds} rounds each)")

            # Memory per entry: a fresh set of licenses, one outbox entry per increment.
            await on.client.execute_command("FLUSHALL")
            ids = await _licenses(on.client, args.licenses)
            await _rate(on, ids, args.licenses)  # every stream exists: its fixed cost aside
            streams = sorted({keys.outbox(i) for i in ids})
            before = await _usage(on.client, streams)
            await _rate(on, ids, args.entries)
            after = await _usage(on.client, streams)
            per = (after - before) / args.entries
            print(
                f"outbox memory: {per:.1f} B per entry ({args.entries:,} entries in "
                f"{len(streams):,} streams, MEMORY USAGE)"
            )
            day = per * 86_400 * 1000
            print(f"  a sink down 24 h at 1,000 events/s: {day / 2**30:.1f} GiB")

            # Drain to NDJSON.
            sink = NdjsonSink(str(Path(tmp) / "out.ndjson"))
            exporter = Exporter(on, [sink], lease_s=5.0, sweep_s=0.2)
            began = time.perf_counter()
            exporter.start()
            total = args.entries + args.licenses
            run = exporter.runs["ndjson"]
            while run.delivered < total:  # noqa: ASYNC110 - polling a counter
                await asyncio.sleep(0.1)
            took = time.perf_counter() - began
            await exporter.close()
            print(f"exporter to NDJSON: {total / took:,.0f} events/s ({total:,} events)")

            # Reading cost over every slot's stream.
            await on.client.execute_command("FLUSHALL")
            names = [keys.outbox_of_slot(s) for s in range(keys.SLOTS)]
            for n in names:
                await on.client.execute_command("XGROUP", "CREATE", n, "ndjson", "0", "MKSTREAM")
            began = time.perf_counter()
            await asyncio.gather(
                *(
                    on.client.execute_command(
                        "XREADGROUP", "GROUP", "ndjson", "b0", "COUNT", 500, "STREAMS", n, ">"
                    )
                    for n in names
                )
            )
            read_s = time.perf_counter() - began
            idle = Exporter(on, [sink])  # not started: its look at the streams' heads
            began = time.perf_counter()
            heads = await idle._heads(names)
            heads_s = time.perf_counter() - began
            assert len(heads) == len(names)
            await on.client.sadd(keys.export_streams(), *names)
            began = time.perf_counter()
            registered = await on.client.smembers(keys.export_streams())
            registry_s = time.perf_counter() - began
            assert len(registered) == len(names)
            print(
                f"one pass over 16,384 empty outbox streams: XREADGROUP {read_s * 1000:.0f} ms "
                f"(pipelined, one connection), their newest ids (outbox_heads.lua) "
                f"{heads_s * 1000:.0f} ms, the registry read {registry_s * 1000:.0f} ms"
            )
            await on.close()
            await off.close()
        except Exception:
            print(server._log_tail(3000))
            raise
        finally:
            await server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--licenses", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where the store and files go (a temp dir)")
    asyncio.run(main(parser.parse_args()))
