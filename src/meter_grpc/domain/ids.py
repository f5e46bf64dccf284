"""Identifiers and license keys."""

from __future__ import annotations

import os
import secrets
import time
import uuid

# Crockford's base32 without I, L, O, U: unambiguous when read aloud or typed.
_KEY_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
KEY_GROUPS = 5
KEY_GROUP_LEN = 6  # 30 characters of 5 bits = 150 bits of randomness


def new_id() -> str:
    """A UUIDv7 (RFC 9562): time-ordered, so ids sort in creation order."""
    ms = wall_ms()
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | rand
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # variant 10
    return str(uuid.UUID(int=value))


def wall_ms() -> int:
    """Now on the clock ids are minted with (milliseconds since the epoch)."""
    return time.time_ns() // 1_000_000


def minted_ms(id_: str) -> int | None:
    """When an id of new_id() was minted (ms), or None for a string that is not one."""
    try:
        value = uuid.UUID(id_)
    except ValueError:
        return None
    if value.version != 7:
        return None
    return value.int >> 80


def new_license_key() -> str:
    """e.g. 'K7Q2MX-9ZP4CT-...': 5 groups of 6 base32 characters, 150 random bits."""
    chars = "".join(secrets.choice(_KEY_ALPHABET) for _ in range(KEY_GROUPS * KEY_GROUP_LEN))
    return "-".join(chars[i : i + KEY_GROUP_LEN] for i in range(0, len(chars), KEY_GROUP_LEN))


MACHINE_SUFFIX_LEN = 32
_HEX = frozenset("0123456789abcdef")


def new_machine_id(license_id: str) -> str:
    """`<license id>.<UUIDv7 as 32 hex digits>`: a machine is found in its license's keys
    without a lookup, and a license's machine ids sort in activation order."""
    return f"{license_id}.{uuid.UUID(new_id()).hex}"


def license_id_of_machine(machine_id: str) -> str | None:
    license_id, sep, suffix = machine_id.rpartition(".")
    if not sep or not license_id or len(suffix) != MACHINE_SUFFIX_LEN or not set(suffix) <= _HEX:
        return None
    return license_id
