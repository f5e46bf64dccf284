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


_RAND_BITS = 74  # rand_a (12 bits) and rand_b (62 bits) of a UUIDv7
_last = (0, 0)  # (ms, random bits) of the last id minted by this process


def new_id() -> str:
    """A UUIDv7 (RFC 9562): time-ordered, so ids sort in creation order. Within one
    millisecond this process's ids still increase (RFC 9562 method 2: the random bits of the
    next id are those of the last plus a random step), so ids minted by one replica never
    sort out of the order they were made in."""
    global _last
    ms = wall_ms()
    rand = int.from_bytes(os.urandom(10), "big") >> (80 - _RAND_BITS)
    last_ms, last_rand = _last
    if ms <= last_ms:
        ms, rand = last_ms, last_rand + 1 + (rand >> 50)  # a step below 2^24
        if rand >> _RAND_BITS:  # the millisecond is full: borrow the next one
            ms, rand = ms + 1, rand & ((1 << _RAND_BITS) - 1)
    _last = (ms, rand)
    rand_a, rand_b = rand >> 62, rand & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | rand_a << 64 | 0x2 << 62 | rand_b
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
