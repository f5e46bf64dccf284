"""Redis memory per outbox entry, and what a sink down for 24 h at 1,000 events/s keeps
(README "Export to billing"), on a valkey-server of the embedded store's configuration:

one outbox stream, N entries written as storage/lua/common.lua `outbox` writes them (XADD *
id k d u rid t, the id `<UUIDv7 license id>:<n>`), spread over L licenses; the figure is
(MEMORY USAGE <stream> SAMPLES 0 after N entries - after 1) / (N - 1). Nothing is
acknowledged (a sink down): a consumer group reads at most 5,000 entries ahead of a down
sink (its pending list), which is left out.

    python bench/outbox_memory.py [--entries 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from meter_grpc.domain.ids import new_id  # noqa: E402
from meter_grpc.storage.commands import RedisClient  # noqa: E402
from meter_grpc.storage.embedded import EmbeddedServer  # noqa: E402

DAY = 86_400 * 1000  # entries: 24 h at 1,000 events/s


async def per_entry(client: RedisClient, name: str, n: int, licenses: int, rid_chars: int) -> float:
    ids = [new_id() for _ in range(licenses)]
    seq = dict.fromkeys(ids, 0)
    now = int(time.time() * 1000)

    async def add(k: int) -> None:
        lid = ids[k % licenses]
        seq[lid] += 1
        rid = secrets.token_hex(rid_chars // 2) if rid_chars else ""
        await client.execute_command(
            "XADD", name, "*", "id", f"{lid}:{seq[lid]}", "k", "increment",
            "d", random.randint(1, 10), "u", seq[lid] * 5, "rid", rid, "t", now + k,
        )  # fmt: skip

    await add(0)
    base = int(await client.execute_command("MEMORY", "USAGE", name, "SAMPLES", "0"))
    for start in range(1, n, 1000):
        await asyncio.gather(*(add(k) for k in range(start, min(n, start + 1000))))
    total = int(await client.execute_command("MEMORY", "USAGE", name, "SAMPLES", "0"))
    return (total - base) / (n - 1)


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedServer(Path(tmp) / "store")
        url = await server.start()
        client = RedisClient(url)
        try:
            for licenses, rid_chars in ((1, 0), (50, 0), (50, 32)):
                name = f"meter:{{ob:bench{licenses}-{rid_chars}}}:outbox"
                per = await per_entry(client, name, args.entries, licenses, rid_chars)
                print(
                    f"{args.entries:,} entries of {licenses} license(s), request_id of "
                    f"{rid_chars} chars: {per:.1f} B per entry; 24 h at 1,000 events/s: "
                    f"{per * DAY / 2**30:.2f} GiB"
                )
        finally:
            await client.close()
            await server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    asyncio.run(main(parser.parse_args()))
