"""Every Redis key name of meter-grpc is built here, and only here.

All keys of one license share the hash tag `{lic:<id>}` and so one cluster slot: a script
touches exactly one license and never reads a key of another slot. The usage export's outbox
is one stream per cluster slot, named with a hash tag of that slot (`outbox`), so the script
that moves a counter appends to the outbox of its own slot. A policy's keys share
`{pol:<id>}`. Global indexes (lists in creation order) have their own slots and are only
read or written outside scripts.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib.resources import files

from redis.crc import key_slot

PREFIX = "meter"


def _lic(license_id: str) -> str:
    return f"{PREFIX}:{{lic:{license_id}}}"


def license(license_id: str) -> str:
    """Hash: the license, its policy snapshot, its usage counter and machine counters."""
    return _lic(license_id)


def license_events(license_id: str) -> str:
    """Stream: usage events of the license (WatchUsage), capped in length."""
    return f"{_lic(license_id)}:events"


def request_record(license_id: str, request_id: str) -> str:
    """String: the stored answer of a call with this idempotency key (expires after 24 h)."""
    return f"{_lic(license_id)}:req:{request_id}"


def policy_mailbox(license_id: str) -> str:
    """Hash: a policy snapshot (the `p_*` fields and `p_rev`) that reached a license still
    being created; the create script applies it. Expires after the create window."""
    return f"{_lic(license_id)}:policy"


def license_tombstone(license_id: str) -> str:
    """String: left by a delete for a while, so that what still points at the license is
    known to be stale at once and a late create of the same id does not bring it back."""
    return f"{_lic(license_id)}:gone"


def usage_record(license_id: str, record_id: str) -> str:
    """String: a SyncUsage record id that was applied (expires after 30 days)."""
    return f"{_lic(license_id)}:rec:{record_id}"


def machines(license_id: str) -> str:
    """Hash: machine id -> machine JSON, for the license's live machines."""
    return f"{_lic(license_id)}:machines"


def fingerprints(license_id: str) -> str:
    """Hash: fingerprint -> machine id, for the license's live machines."""
    return f"{_lic(license_id)}:fingerprints"


def heartbeats(license_id: str) -> str:
    """Sorted set: live machine id scored by its last heartbeat (or activation) time.

    Scored by the last heartbeat rather than a deadline, so that a change of the policy's
    heartbeat_duration applies to machines already activated.
    """
    return f"{_lic(license_id)}:heartbeats"


def dead_fingerprints(license_id: str) -> str:
    """Sorted set: fingerprints of machines removed for missing their heartbeat, scored by
    the time they died; capped in size. Lets validation answer HEARTBEAT_DEAD."""
    return f"{_lic(license_id)}:dead"


def machine_order(license_id: str) -> str:
    """Sorted set (all scores 0, ordered by id = activation order): the ids of the license's
    live machines, so that ListMachines reads one page with ZRANGEBYLEX instead of sorting
    every id. Changed by the same scripts that change `machines`; built from it by the
    machine scripts when missing (data written before the index existed)."""
    return f"{_lic(license_id)}:machine_order"


def reservations(license_id: str) -> str:
    """Hash: reservation id -> its record "state|meter|amount|expire|committed|created" (open
    ones, and closed ones for the retention, to answer RESERVATION_EXPIRED and replays)."""
    return f"{_lic(license_id)}:rsv"


def reservation_expiry(license_id: str) -> str:
    """Sorted set: the open reservations of the license scored by their expire time (ms), so
    that the scripts release the expired ones, oldest first, without a sweeper."""
    return f"{_lic(license_id)}:rsvx"


def reservation_closed(license_id: str) -> str:
    """Sorted set: closed reservations scored by the time their record may be forgotten."""
    return f"{_lic(license_id)}:rsvc"


def reservation_keys(license_id: str) -> list[str]:
    """The reservation keys every usage script takes (after the events and outbox keys)."""
    return [
        reservations(license_id),
        reservation_expiry(license_id),
        reservation_closed(license_id),
    ]


def machine_keys(license_id: str) -> list[str]:
    """KEYS[1..6] of every machine script (storage/lua/machines_common.lua)."""
    return [
        license(license_id),
        machines(license_id),
        fingerprints(license_id),
        heartbeats(license_id),
        dead_fingerprints(license_id),
        machine_order(license_id),
    ]


def create_request(kind: str, request_id: str) -> str:
    """Hash: the idempotency record of a create (`fp`, `id`, then `answer`), 24 h. The request
    id is hashed: a caller's text never shapes a key name."""
    digest = hashlib.sha256(request_id.encode()).hexdigest()[:40]
    return f"{PREFIX}:{{req:{kind}:{digest}}}"


def license_by_key(digest: str) -> str:
    """String: license id of a license key, named by the key's digest (HMAC-SHA256 under the
    server secret, domain/keysecret.py): neither the key nor SHA-256(key) appears in Redis."""
    return f"{PREFIX}:{{kd:{digest}}}"


def license_by_key_sha256(key: str) -> str:
    """The index entry of a license key in the earlier format, named by SHA-256(key): only
    read to remove it (storage/migrate.py)."""
    return f"{PREFIX}:{{key:{hashlib.sha256(key.encode()).hexdigest()}}}"


# Index entries of an earlier format, named by SHA-256(key): removed on start (storage/migrate.py).
OLD_KEY_INDEX_PATTERN = f"{PREFIX}:{{key:*}}"
# License hashes (and their other keys: migrate.py keeps only names matching `license`).
LICENSE_PATTERN = f"{PREFIX}:{{lic:*}}"
# Create records of licenses (`create_request("license", ...)`).
LICENSE_CREATE_PATTERN = f"{PREFIX}:{{req:license:*}}"


def keys_migrated() -> str:
    """String: set once every record of the earlier format (keys in clear) was migrated, so
    later starts skip the SCAN (storage/migrate.py)."""
    return f"{PREFIX}:keys-migrated"


def key_secret_check() -> str:
    """String: an HMAC of a fixed label under the server secret, written by the first replica;
    a replica whose secret disagrees refuses to start."""
    return f"{PREFIX}:keysecret"


def policy(policy_id: str) -> str:
    """Hash: `json` (the policy) and `rev` (its revision)."""
    return f"{PREFIX}:{{pol:{policy_id}}}"


def policy_licenses(policy_id: str) -> str:
    """Sorted set (all scores 0, ordered by id): the licenses of a policy."""
    return f"{PREFIX}:{{pol:{policy_id}}}:licenses"


def policy_lease(policy_id: str) -> str:
    """String: the replica propagating the policy's latest revision (expires unless renewed)."""
    return f"{PREFIX}:{{pol:{policy_id}}}:lease"


def pending_propagations() -> str:
    """Hash: policy id -> token, for every policy whose latest revision may not have reached
    all its licenses yet. Set before a policy changes, removed once the change has reached
    every license (only by whoever saw the same token)."""
    return f"{PREFIX}:propagations"


def all_policies() -> str:
    """Sorted set (all scores 0, ordered by id): every policy."""
    return f"{PREFIX}:policies"


def all_licenses() -> str:
    """Sorted set (all scores 0, ordered by id): every license."""
    return f"{PREFIX}:licenses"


def license_format() -> str:
    """String: the newest license hash format every license has been migrated to (2: no
    `p_json` copy of the policy). Absent on data written before it."""
    return f"{PREFIX}:license-format"


# --- usage export (export/exporter.py) -------------------------------------------------------

# Cluster slots: one outbox stream per slot that holds a license with a counted change.
SLOTS = 16384


@cache
def _outbox_tags() -> list[str]:
    """Slot -> the hex suffix of the shortest tag `ob:<hex>` of that slot (package data
    written by scripts/gen_outbox_tags.py)."""
    text = (files("meter_grpc.storage") / "outbox_tags.txt").read_text()
    tags = text.split()
    if len(tags) != SLOTS:
        raise RuntimeError(f"outbox_tags.txt holds {len(tags)} tags, not {SLOTS}")
    return tags


def slot_of(name: str) -> int:
    """The cluster slot of a key name (CRC16 of its hash tag, mod 16384)."""
    return int(key_slot(name.encode()))


def outbox_of_slot(slot: int) -> str:
    """Stream: the outbox of one cluster slot: every counted change (increment, decrement,
    reset, SyncUsage record) of the licenses of that slot, appended by the script that moved
    the counter, read by one consumer group per sink, trimmed once every group acknowledged."""
    return f"{PREFIX}:{{ob:{_outbox_tags()[slot]}}}:outbox"


def outbox_pattern() -> str:
    """SCAN pattern matching every outbox stream's name."""
    return f"{PREFIX}:{{ob:*}}:outbox"


def outbox(license_id: str) -> str:
    """The outbox stream of the license's slot (same slot as `license(license_id)`)."""
    return outbox_of_slot(slot_of(license(license_id)))


def export_streams() -> str:
    """Set: the names of the outbox streams that exist (or are about to: a replica adds the
    stream of a license's slot before its first script call there writes to it). The
    exporter reads it instead of looking for 16,384 possible streams."""
    return f"{PREFIX}:export:streams"


def export_dead(sink: str) -> str:
    """Stream: events a sink refused for good (its dead letters), capped in length; read and
    replayed by an admin (ExportStatus, ReplayDeadLetters)."""
    return f"{PREFIX}:export:dead:{sink}"


def export_lease(bucket: int) -> str:
    """String: the replica exporting the outbox streams of one bucket of slots (slot mod
    the bucket count); expires unless renewed, then another replica takes the bucket over."""
    return f"{PREFIX}:export:lease:{bucket}"


def export_sinks() -> str:
    """Hash: replica (exporter owner) -> `<until Unix ms> <sink>,<sink>...`, the sinks each
    live replica configures, renewed with its leases. The outbox is trimmed for these only."""
    return f"{PREFIX}:export:sinks"


def export_error(sink: str) -> str:
    """Hash: the last delivery error of a sink (`at` Unix ms, `reason`), for ExportStatus."""
    return f"{PREFIX}:export:error:{sink}"
