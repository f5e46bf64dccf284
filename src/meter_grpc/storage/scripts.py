"""The Lua scripts (package data), registered once per client.

Each script is `common.lua` followed by the script file (machine scripts get
`machines_common.lua` in between). Calls go out as EVALSHA on the pipelined connection of the
node of their first key (storage/transport.py), which loads the script on NOSCRIPT.
Return codes of usage.lua are mirrored by UsageStatus, the per-record codes of usage_sync.lua
by SyncCode, those of the machine scripts by MachineStatus (all in domain/ports.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Sequence
from functools import cache
from importlib.resources import files
from typing import Any

from meter_grpc.domain.ports import MachineStatus, SyncCode, UsageStatus
from meter_grpc.domain.rules import MAX_COUNTER
from meter_grpc.storage.commands import RedisClient
from meter_grpc.storage.transport import Node

SCRIPT_NAMES = (
    "usage",
    "usage_sync",
    "reservation",
    "cas",
    "events_after",
    "create_record",
    "key_migrate",
    "policy_create",
    "policy_attach",
    "policy_update",
    "policy_propagated",
    "policy_delete",
    "license_create",
    "license_follow_policy",
    "license_update",
    "license_delete",
    "license_renew",
    "license_read",
    "machine_activate",
    "machine_deactivate",
    "machine_get",
    "machine_heartbeat",
    "machine_update",
    "machine_list",
    "outbox_heads",
)
# Scripts that take the machine KEYS/ARGV and helpers of machines_common.lua.
MACHINE_SCRIPTS = frozenset(
    [
        "license_read",
        "machine_activate",
        "machine_deactivate",
        "machine_get",
        "machine_heartbeat",
        "machine_update",
        "machine_list",
    ]
)


# Constants the scripts share with Python, defined once here and prepended to every script.
REQUEST_RECORD_TTL_MS = 24 * 3600 * 1000  # request_id answers are replayed for 24 h
USAGE_RECORD_TTL_MS = 30 * 24 * 3600 * 1000  # SyncUsage record ids are remembered 30 days
# Reservations: a closed one's record is kept this long (RESERVATION_EXPIRED, replays); the
# longest ttl; the reservation keys of a license expire this long after their last write
# (every record is dead by then); at most this many expired reservations are released (and
# as many old records forgotten) per script call, oldest first.
RESERVATION_RETENTION_MS = 24 * 3600 * 1000
MAX_RESERVATION_TTL_MS = 7 * 24 * 3600 * 1000
RESERVATION_KEEP_MS = MAX_RESERVATION_TTL_MS + RESERVATION_RETENTION_MS + 3600 * 1000
RESERVATION_BATCH = 100
# Usage events kept per license (METER_EVENT_RETENTION): at least the newest N, trimmed in
# whole stream nodes (up to 100 more); 0 = no event is written.
EVENTS_MAXLEN = 1000


def _constants(events_maxlen: int, export: bool, events_max_age_ms: int) -> str:
    values = {
        "EXPORT": int(export),
        "EVENTS_MAX_AGE_MS": events_max_age_ms,
        "MAX_COUNTER": MAX_COUNTER,
        "REQUEST_RECORD_TTL_MS": REQUEST_RECORD_TTL_MS,
        "USAGE_RECORD_TTL_MS": USAGE_RECORD_TTL_MS,
        "EVENTS_MAXLEN": events_maxlen,
        "RESERVATION_RETENTION_MS": RESERVATION_RETENTION_MS,
        "RESERVATION_KEEP_MS": RESERVATION_KEEP_MS,
        "RESERVATION_BATCH": RESERVATION_BATCH,
    }
    lines = [f"local {name} = {value}" for name, value in values.items()]
    return "-- constants from meter_grpc/storage/scripts.py\n" + "\n".join(lines) + "\n"


@cache
def source(
    name: str, events_maxlen: int = EVENTS_MAXLEN, export: bool = False, events_max_age_ms: int = 0
) -> str:
    """The full text sent to Redis for script `name`: the constants, common.lua,
    machines_common.lua for machine scripts, then `<name>.lua`. `export`: counted changes are
    appended to the outbox (usage export on); `events_max_age_ms` > 0: usage events older than
    that (by their stream id) are trimmed when the license's next event is written."""
    if events_maxlen < 0 or events_max_age_ms < 0:
        raise ValueError("events_maxlen and events_max_age_ms must be >= 0")
    lua = files("meter_grpc.storage") / "lua"
    parts = ["common", "machines_common", name] if name in MACHINE_SCRIPTS else ["common", name]
    texts = [(lua / f"{part}.lua").read_text() for part in parts]
    shebang = ""  # `#!lua flags=...` must be the very first line
    if texts[-1].startswith("#!"):
        shebang, _, texts[-1] = texts[-1].partition("\n")
        shebang += "\n"
    return shebang + _constants(events_maxlen, export, events_max_age_ms) + "\n".join(texts)


class Script:
    """A Lua script run by EVALSHA: `await script(keys=[...], args=[...])`."""

    def __init__(self, source: str, client: RedisClient) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self._client = client

    def __call__(
        self, keys: Sequence[Any] = (), args: Sequence[Any] = (), node: Node | None = None
    ) -> Awaitable[Any]:
        """Runs on the node of keys[0], or on `node` (its keys must all be served there)."""
        return self._client.run_script(self.sha, self.source, keys, args, node=node)


class Scripts:
    """One Script per script name, all on one client; `events_maxlen` usage events kept per
    license (0: none written), and none older than `events_max_age_ms` (0: no age limit);
    `export`: counted changes appended to the outbox."""

    def __init__(
        self,
        client: RedisClient,
        events_maxlen: int = EVENTS_MAXLEN,
        export: bool = False,
        events_max_age_ms: int = 0,
    ) -> None:
        self._scripts = {
            name: Script(source(name, events_maxlen, export, events_max_age_ms), client)
            for name in SCRIPT_NAMES
        }

    def __getattr__(self, name: str) -> Script:
        try:
            return self._scripts[name]
        except KeyError:
            raise AttributeError(name) from None


__all__ = ["MachineStatus", "Script", "Scripts", "SyncCode", "UsageStatus", "source"]
