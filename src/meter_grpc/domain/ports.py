"""What the domain needs from storage: the Store protocol and the answers of its scripts.

storage.store.RedisStore implements Store; the domain knows only this module, so its rules
can be read (and type-checked) without Redis. The status enums mirror the return codes of the
Lua scripts (storage/lua), whose headers list them.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from meter_grpc.domain.models import (
    FingerprintState,
    KeyHolder,
    License,
    Machine,
    Policy,
    ReservationAnswer,
    Slots,
    Usage,
    UsageEvent,
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
    METER_NOT_FOUND = 7
    METER_NOT_ENTITLED = 8


class ReservationStatus(enum.IntEnum):
    """Status codes returned by reservation.lua."""

    OK = 0
    LICENSE_NOT_FOUND = 1
    USAGE_LIMIT_EXCEEDED = 2
    LICENSE_SUSPENDED = 4
    LICENSE_EXPIRED = 5
    REQUEST_ID_REUSED = 6
    METER_NOT_FOUND = 7
    METER_NOT_ENTITLED = 8
    RESERVATION_NOT_FOUND = 9
    RESERVATION_EXPIRED = 10
    RESERVATION_LIMIT_EXCEEDED = 11
    AMOUNT_ABOVE_HELD = 12


@dataclass(frozen=True, slots=True)
class ReservationResult:
    """reservation.lua's answer: its status, the reservation (as far as known) and its
    counter; `open`: open reservations of the license."""

    status: ReservationStatus
    answer: ReservationAnswer
    open: int = 0


class SyncCode(enum.IntEnum):
    """Per-record answer codes returned by usage_sync.lua; the names of the refusals are their
    ErrorInfo reasons."""

    APPLIED = 1
    DUPLICATE = 2
    USAGE_LIMIT_EXCEEDED = 3
    LICENSE_SUSPENDED = 4
    LICENSE_EXPIRED = 5
    REQUEST_ID_REUSED = 6
    METER_NOT_FOUND = 7
    METER_NOT_ENTITLED = 8


class MachineStatus(enum.IntEnum):
    """Status codes returned by the machine scripts (storage/lua/machines_common.lua)."""

    OK = 0
    LICENSE_NOT_FOUND = 1
    MACHINE_NOT_FOUND = 2
    LICENSE_SUSPENDED = 3
    LICENSE_EXPIRED = 4
    FINGERPRINT_TAKEN = 5
    MACHINE_LIMIT_EXCEEDED = 6
    CORE_LIMIT_EXCEEDED = 7
    CORES_REQUIRED = 8
    CONFLICT = 9
    REQUEST_ID_REUSED = 10
    MACHINE_CAP_EXCEEDED = 11  # the server's cap of machines per license


@dataclass(frozen=True, slots=True)
class UsageResult:
    status: UsageStatus
    usage: Usage


@dataclass(frozen=True, slots=True)
class MachineResult:
    """The answer of a machine script: its status, the license's machine counters and limits,
    and the machine(s) it returned."""

    status: MachineStatus
    slots: Slots
    machine: Machine | None = None
    machines: tuple[Machine, ...] = ()
    # FINGERPRINT_TAKEN: the id of the machine holding the fingerprint; CORE_LIMIT_EXCEEDED
    # of an update: the cores the change would add.
    extra: str = ""


@dataclass(frozen=True, slots=True)
class CreateRecord:
    """The idempotency record of a create: the id it creates, a secret it generated (the
    license key) and, once done, its answer."""

    id: str
    secret: str
    answer: Policy | License | None


@dataclass(frozen=True, slots=True)
class LicenseRead:
    """A license read after its dead machines were removed, with a fingerprint's state."""

    license: License
    fingerprint: FingerprintState
    machine_id: str


class Store(Protocol):
    """Every read and write the domain makes."""

    # Usage events kept per license; 0 = none are written (WatchUsage has nothing to read).
    event_retention: int

    async def create_policy(
        self, p: Policy, *, now_ms: int, minted_ms: int, window_ms: int
    ) -> tuple[int, Policy | None]:
        """(1, policy) created, (2, policy) it existed, (0, None) the create window passed."""

    async def get_policy(self, policy_id: str) -> Policy | None: ...

    async def list_policy_ids(self, after: str, limit: int) -> list[str]:
        """Up to `limit` policy ids after `after`, in creation (id) order."""

    async def list_license_ids(self, policy_id: str, after: str, limit: int) -> list[str]:
        """License ids after `after` in creation order: all, or those of one policy."""

    async def get_policies(self, ids: Sequence[str]) -> list[Policy]: ...

    async def update_policy(self, p: Policy, expected_revision: int) -> int:
        """New revision; 0 on a revision conflict; -1 when the policy is gone."""

    async def policy_propagated(self, policy_id: str, revision: int) -> int:
        """Records that every license follows `revision`; the policy's revision now (-1: gone)."""

    async def mark_pending(self, policy_id: str, token: str) -> None: ...

    async def clear_pending(self, policy_id: str, token: str) -> bool:
        """Drops the pending mark of a policy if it is still `token`."""

    async def pending_policies(self) -> dict[str, str]: ...

    async def lease(self, policy_id: str, owner: str, ttl_ms: int, *, renew: bool) -> bool: ...

    async def release_lease(self, policy_id: str, owner: str) -> None: ...

    async def delete_policy(self, policy_id: str) -> int:
        """0 deleted, -1 not found, n > 0: n license ids are registered with it."""

    async def attach_license(self, policy_id: str, license_id: str) -> Policy | None: ...

    async def detach_license(self, policy_id: str, license_id: str) -> None: ...

    async def index(self, policy_id: str = "", license_id: str = "") -> None: ...

    async def unindex(self, policy_ids: Sequence[str], license_ids: Sequence[str]) -> None: ...

    async def follow_policy(self, license_id: str, p: Policy, mailbox_ttl_ms: int = 0) -> int:
        """1 applied, 0 already following (or gone for good), 2 left in the mailbox."""

    async def begin_create(
        self, kind: str, request_id: str, fingerprint: str, new_id: str, secret: str = ""
    ) -> CreateRecord | None:
        """Binds a create's request_id to an id; None when it was used for another request."""

    async def rebind_create(self, kind: str, request_id: str, old_id: str, new_id: str) -> bool: ...

    async def finish_create(self, kind: str, request_id: str, answer: Policy | License) -> None: ...

    async def abandon_create(self, kind: str, request_id: str, bound_id: str) -> None:
        """Drops the record of a create that was refused (unless it holds an answer)."""

    async def claim_key(self, digest: str, license_id: str, ghost: str = "") -> str:
        """ "" when the license holds the key (by digest) now, else the id of the license
        holding it."""

    async def release_key(self, digest: str, license_id: str) -> None: ...

    async def create_license(
        self, lic: License, *, now_ms: int, minted_ms: int, window_ms: int
    ) -> tuple[int, License | None]:
        """(1, license) created, (2, license) it existed, (0, None) the create window passed,
        (3, None) it was created and deleted since."""

    async def license_id_by_key(self, digest: str) -> str | None: ...

    async def key_holder(self, digest: str) -> KeyHolder | None:
        """The license holding the key of this digest, with what authentication checks."""

    async def get_license(self, license_id: str) -> License | None: ...

    async def get_licenses(self, ids: Sequence[str]) -> list[License]: ...

    async def license_states(self, ids: Sequence[str]) -> list[int]:
        """Per id: 1 the license exists, -1 it was deleted recently, 0 neither."""

    async def update_license(
        self, license_id: str, changes: dict[str, object], now_ms: int
    ) -> License | None:
        """Sets License attributes (by attribute name) and `update_time`; None if gone."""

    async def delete_license(self, license_id: str, tombstone_ms: int) -> tuple[str, str] | None:
        """Deletes the license and its keys: its (key digest, policy id); None if gone."""

    async def usage(
        self,
        license_id: str,
        op: str,
        *,
        amount: int,
        request_id: str,
        now_ms: int,
        periods: str,
        meter: str = "",
    ) -> UsageResult:
        """Runs usage.lua: one round trip, one atomic check-and-move ("" = the license's own
        counter, else that meter's)."""

    async def reservation(
        self,
        license_id: str,
        op: str,
        args: Sequence[object],
        *,
        request_id: str,
        now_ms: int,
        periods: str,
    ) -> ReservationResult:
        """Runs reservation.lua (`op`: reserve, commit, release; `args`: its ARGV[5..])."""

    async def load_usage_script(self) -> None:
        """Makes sure every node has usage.lua, so the calls issued next are never re-sent
        after a NOSCRIPT (a re-sent call would apply after calls issued later)."""

    async def last_event_id(self, license_id: str) -> str:
        """Id of the newest usage event of the license ("0-0" when there is none)."""

    async def read_events(
        self, license_id: str, after: str, block_ms: int | None, count: int = 100
    ) -> list[UsageEvent]:
        """Usage events after `after`, waiting up to `block_ms` for the first one; None: no
        wait (what is there now)."""

    async def events_after(
        self, license_id: str, after: str, count: int = 100
    ) -> tuple[list[UsageEvent], str]:
        """Usage events after `after` (no wait), and "" or, when events after `after` may
        have been trimmed before they were read, the id of the oldest event kept."""

    async def license_exists(self, license_id: str) -> bool: ...

    async def sync_usage(
        self,
        license_id: str,
        records: Sequence[tuple[str, int, str]],
        *,
        now_ms: int,
        periods: str,
    ) -> tuple[int, list[str]] | None:
        """Runs usage_sync.lua on (record id, amount) pairs: one round trip, atomic."""

    async def activate_machine(
        self, m: Machine, now_ms: int, cap: int, request_id: str = "", digest: str = ""
    ) -> MachineResult:
        """Runs machine_activate.lua; the machine's id must embed its license id. `cap`: the
        most live machines any license may hold (METER_MAX_MACHINES_PER_LICENSE)."""

    async def deactivate_machine(
        self, license_id: str, machine_id: str, now_ms: int
    ) -> MachineResult: ...

    async def get_machine(self, license_id: str, machine_id: str, now_ms: int) -> MachineResult: ...

    async def heartbeat_machine(
        self, license_id: str, machine_id: str, now_ms: int
    ) -> MachineResult: ...

    async def list_machines(
        self, license_id: str, after: str, limit: int, now_ms: int
    ) -> MachineResult:
        """Up to `limit` live machines with ids after `after`, in activation order."""

    async def update_machine(
        self, license_id: str, machine_id: str, changes: Mapping[str, object], now_ms: int
    ) -> MachineResult:
        """Sets Machine attributes (by name) atomically; a cores change is re-checked."""

    async def read_license(
        self, license_id: str, now_ms: int, fingerprint: str = ""
    ) -> LicenseRead | None:
        """The license with only its live machines counted (dead ones are removed first)."""

    async def renew_license(
        self, license_id: str, now_ms: int, max_expire_ms: int
    ) -> tuple[int, License | None]:
        """(0, license) renewed; (1, None) not found; (2, None) its policy has no duration;
        (3, None) the new expiry would pass max_expire_ms (nothing written)."""
