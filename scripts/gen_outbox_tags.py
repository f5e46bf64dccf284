"""Writes src/meter_grpc/storage/outbox_tags.txt: for each of the 16,384 cluster slots, in
slot order, the shortest hash tag `ob:<hex>` (the lowest hex number) whose slot it is. The
outbox stream of a slot is named with its tag (storage/keys.py `outbox`), so that a usage
script appends to the stream of its own license's slot.

    python scripts/gen_outbox_tags.py src
"""

from __future__ import annotations

import sys
from pathlib import Path

from redis.crc import key_slot

SLOTS = 16384


def tags() -> list[str]:
    table: dict[int, str] = {}
    i = 0
    while len(table) < SLOTS:
        tag = f"ob:{i:x}"
        table.setdefault(key_slot(("{" + tag + "}").encode()), f"{i:x}")
        i += 1
    return [table[slot] for slot in range(SLOTS)]


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "src")
    out = root / "meter_grpc" / "storage" / "outbox_tags.txt"
    out.write_text("\n".join(tags()) + "\n")
    print(f"wrote {out}")
