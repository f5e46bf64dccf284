"""The Lua scripts (package data), registered once per client.

Each script is `common.lua` followed by the script file; redis-py sends EVALSHA and loads the
script on NOSCRIPT. Return codes of usage.lua are mirrored by UsageStatus, the per-record
codes of usage_sync.lua by SyncCode.
"""

from __future__ import annotations

import enum
from functools import cache
from importlib.resources import files
from typing import Any

SCRIPT_NAMES = (
    "usage",
    "usage_sync",
    "policy_attach",
    "policy_update",
    "policy_delete",
    "license_follow_policy",
    "license_update",
    "license_delete",
)


class UsageStatus(enum.IntEnum):
    """Status codes returned by usage.lua."""

    OK = 0
    LICENSE_NOT_FOUND = 1
    USAGE_LIMIT_EXCEEDED = 2
    USAGE_UNDERFLOW = 3
    LICENSE_SUSPENDED = 4
    LICENSE_EXPIRED = 5
    REQUEST_ID_REUSED = 6


class SyncCode(enum.IntEnum):
    """Per-record answer codes returned by usage_sync.lua; the names of the refusals are their
    ErrorInfo reasons."""

    APPLIED = 1
    DUPLICATE = 2
    USAGE_LIMIT_EXCEEDED = 3
    LICENSE_SUSPENDED = 4
    LICENSE_EXPIRED = 5
    REQUEST_ID_REUSED = 6


@cache
def source(name: str) -> str:
    """The full text sent to Redis for script `name` (common.lua + `<name>.lua`)."""
    lua = files("meter_grpc.storage") / "lua"
    return (lua / "common.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


class Scripts:
    """One registered script object per script name, bound to one client."""

    def __init__(self, client: Any) -> None:
        self._scripts = {name: client.register_script(source(name)) for name in SCRIPT_NAMES}

    def __getattr__(self, name: str) -> Any:
        try:
            return self._scripts[name]
        except KeyError:
            raise AttributeError(name) from None

    def register(self, name: str, client: Any) -> None:
        """Adds a script (for modules that bring their own file in storage/lua)."""
        self._scripts[name] = client.register_script(source(name))
