"""Policies, licenses and usage as plain dataclasses.

Enum values equal the proto enum numbers, so the API layer converts with int().
All times are integer milliseconds since the Unix epoch; durations are milliseconds.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

DAY_MS = 86_400_000
EXPIRING_WINDOW_MS = 3 * DAY_MS


class ExpirationStrategy(enum.IntEnum):
    UNSPECIFIED = 0
    RESTRICT_ACCESS = 1
    REVOKE_ACCESS = 2
    MAINTAIN_ACCESS = 3
    ALLOW_ACCESS = 4

    @property
    def effective(self) -> ExpirationStrategy:
        return ExpirationStrategy.RESTRICT_ACCESS if self is self.UNSPECIFIED else self


class OverageStrategy(enum.IntEnum):
    UNSPECIFIED = 0
    NO_OVERAGE = 1
    ALLOW_1_25X_OVERAGE = 2
    ALLOW_1_5X_OVERAGE = 3
    ALLOW_2X_OVERAGE = 4
    ALWAYS_ALLOW_OVERAGE = 5


class UsageResetInterval(enum.IntEnum):
    UNSPECIFIED = 0
    NONE = 1
    DAILY = 2
    WEEKLY = 3
    MONTHLY = 4
    YEARLY = 5


class LicenseStatus(enum.IntEnum):
    UNSPECIFIED = 0
    ACTIVE = 1
    EXPIRING = 2
    EXPIRED = 3
    SUSPENDED = 4


def overage_ceiling(limit: int | None, strategy: OverageStrategy) -> int | None:
    """The highest count granted under `limit` with `strategy`; None means no ceiling.

    Mirrors `ceiling()` in storage/lua/common.lua: 1.25x of 8 is 10, 1.5x of 3 is 4.
    """
    if limit is None or strategy == OverageStrategy.ALWAYS_ALLOW_OVERAGE:
        return None
    if strategy == OverageStrategy.ALLOW_1_25X_OVERAGE:
        return limit * 5 // 4
    if strategy == OverageStrategy.ALLOW_1_5X_OVERAGE:
        return limit * 3 // 2
    if strategy == OverageStrategy.ALLOW_2X_OVERAGE:
        return limit * 2
    return limit


@dataclass(slots=True)
class Meter:
    """A feature meter of a policy: a counter of every license of the policy, with its own
    limit, overage and reset period (Policy.meters)."""

    code: str = ""
    max_uses: int | None = None
    overage_strategy: OverageStrategy = OverageStrategy.UNSPECIFIED
    usage_reset_interval: UsageResetInterval = UsageResetInterval.UNSPECIFIED
    # The entitlement a license must hold to use the meter ("" = none needed).
    entitlement: str = ""


@dataclass(slots=True)
class Policy:
    id: str = ""
    name: str = ""
    max_uses: int | None = None
    max_machines: int | None = None
    max_cores: int | None = None
    floating: bool = False
    strict: bool = False
    duration_ms: int | None = None
    expiration_strategy: ExpirationStrategy = ExpirationStrategy.UNSPECIFIED
    require_check_in: bool = False
    check_in_interval_ms: int | None = None
    heartbeat_duration_ms: int | None = None
    entitlements: list[str] = field(default_factory=list)
    overage_strategy: OverageStrategy = OverageStrategy.UNSPECIFIED
    usage_reset_interval: UsageResetInterval = UsageResetInterval.UNSPECIFIED
    metadata: dict[str, str] = field(default_factory=dict)
    create_time_ms: int = 0
    update_time_ms: int = 0
    # Incremented by every update; licenses keep the revision of the policy they follow.
    revision: int = 1
    # The newest revision every license of the policy follows (kept beside the policy, not in
    # its JSON): lower than `revision` while a change is still being propagated.
    propagated_revision: int = 0
    meters: list[Meter] = field(default_factory=list)

    def meter(self, code: str) -> Meter | None:
        return next((m for m in self.meters if m.code == code), None)


@dataclass(slots=True)
class License:
    id: str = ""
    # The full key: only in the answer of the call that set it (CreateLicense and its replay,
    # RotateLicenseKey) or given by the caller; never stored (domain/keysecret.py).
    key: str = ""
    policy_id: str = ""
    name: str = ""
    suspended: bool = False
    expire_time_ms: int | None = None
    # Overrides of the policy limits; None = the policy's limit applies.
    max_uses_override: int | None = None
    max_machines_override: int | None = None
    max_cores_override: int | None = None
    entitlements: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    uses: int = 0
    # Start (ms) of the usage period `uses` counts in; 0 when usage never resets by itself.
    period_start_ms: int = 0
    machines_count: int = 0
    cores_count: int = 0
    last_check_in_ms: int | None = None
    create_time_ms: int = 0
    update_time_ms: int = 0
    # The policy as this license last saw it (its limits are checked inside the scripts).
    policy: Policy = field(default_factory=Policy)
    # How the key is stored: its digest (HMAC-SHA256 under the server secret) and SHA-256(key)
    # sealed under the server secret (what encrypted license files need).
    key_digest: str = ""
    sealed_file_key: str = ""
    # Overrides of the max_uses of the policy's meters: code -> limit.
    meter_overrides: dict[str, int] = field(default_factory=dict)
    # Read only: code -> (uses, period start, reserved) of each meter of `policy`, and the
    # units reserved on the license's own counter.
    meter_counters: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    reserved: int = 0

    def meter_max_uses(self, m: Meter) -> int | None:
        return self.meter_overrides.get(m.code, m.max_uses)

    def meter_entitled(self, m: Meter) -> bool:
        return not m.entitlement or m.entitlement in self.all_entitlements

    @property
    def max_uses(self) -> int | None:
        return (
            self.max_uses_override if self.max_uses_override is not None else self.policy.max_uses
        )

    @property
    def max_machines(self) -> int | None:
        """Node-locked (floating = false): always 1, whatever the override says."""
        if not self.policy.floating:
            return 1
        if self.max_machines_override is not None:
            return self.max_machines_override
        return self.policy.max_machines

    @property
    def machine_ceiling(self) -> int | None:
        """Machines granted with overage; node-locked licenses get exactly one, no overage.

        Mirrors `load_license()` in storage/lua/machines_common.lua.
        """
        if not self.policy.floating:
            return 1
        return overage_ceiling(self.max_machines, self.policy.overage_strategy)

    @property
    def core_ceiling(self) -> int | None:
        return overage_ceiling(self.max_cores, self.policy.overage_strategy)

    @property
    def machines_can_die(self) -> bool:
        """Floating machines with a heartbeat_duration die when they miss their heartbeat."""
        return self.policy.floating and self.policy.heartbeat_duration_ms is not None

    @property
    def max_cores(self) -> int | None:
        if self.max_cores_override is not None:
            return self.max_cores_override
        return self.policy.max_cores

    @property
    def all_entitlements(self) -> list[str]:
        """The policy's entitlements plus the license's own, without repeats."""
        return list(dict.fromkeys([*self.policy.entitlements, *self.entitlements]))

    def is_expired(self, now_ms: int) -> bool:
        return self.expire_time_ms is not None and now_ms >= self.expire_time_ms

    def check_in_overdue(self, now_ms: int) -> bool:
        """With require_check_in: no check-in (or creation) within check_in_interval."""
        p = self.policy
        if not p.require_check_in or p.check_in_interval_ms is None:
            return False
        last = self.last_check_in_ms if self.last_check_in_ms is not None else self.create_time_ms
        return now_ms - last > p.check_in_interval_ms

    def status(self, now_ms: int) -> LicenseStatus:
        if self.suspended:
            return LicenseStatus.SUSPENDED
        if self.expire_time_ms is None:
            return LicenseStatus.ACTIVE
        if now_ms >= self.expire_time_ms:
            return LicenseStatus.EXPIRED
        if self.expire_time_ms - now_ms <= EXPIRING_WINDOW_MS:
            return LicenseStatus.EXPIRING
        return LicenseStatus.ACTIVE


@dataclass(frozen=True, slots=True)
class KeyHolder:
    """What license-key authentication needs to know of the license the key belongs to."""

    license_id: str
    expire_time_ms: int | None
    expiration_strategy: ExpirationStrategy

    def revoked(self, now_ms: int) -> bool:
        """REVOKE_ACCESS: once expired, the key no longer authenticates."""
        return (
            self.expire_time_ms is not None
            and now_ms >= self.expire_time_ms
            and self.expiration_strategy.effective == ExpirationStrategy.REVOKE_ACCESS
        )


class ValidationCode(enum.IntEnum):
    UNSPECIFIED = 0
    VALID = 1
    NOT_FOUND = 2
    SUSPENDED = 3
    EXPIRED = 4
    OVERDUE = 5
    NO_MACHINE = 6
    NO_MACHINES = 7
    TOO_MANY_MACHINES = 8
    TOO_MANY_CORES = 9
    FINGERPRINT_SCOPE_MISMATCH = 10
    ENTITLEMENTS_MISSING = 11
    HEARTBEAT_DEAD = 12


class FingerprintState(enum.IntEnum):
    """What a license knows of a fingerprint (mirrors storage/lua/license_read.lua)."""

    NOT_ASKED = 0
    ALIVE = 1
    DEAD = 2  # the machine missed its heartbeat and was removed
    UNKNOWN = 3


@dataclass(slots=True)
class Machine:
    id: str = ""
    license_id: str = ""
    fingerprint: str = ""
    cores: int = 0
    name: str = ""
    hostname: str = ""
    platform: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    # Last MachineHeartbeat, or the activation.
    last_heartbeat_ms: int = 0
    create_time_ms: int = 0


@dataclass(frozen=True, slots=True)
class Slots:
    """A license's machine counters and limits, as a machine script saw them."""

    machines: int
    cores: int
    max_machines: int | None
    machine_ceiling: int | None
    max_cores: int | None
    core_ceiling: int | None


@dataclass(frozen=True, slots=True)
class Usage:
    """A license's counter as returned by every usage operation."""

    uses: int
    max_uses: int | None
    overage_limit: int | None
    period_end_ms: int | None
    replayed: bool = False
    # Units held by open reservations of the counter (ReserveUsage).
    reserved: int = 0

    @property
    def remaining(self) -> int | None:
        if self.overage_limit is None:
            return None
        return max(0, self.overage_limit - self.uses - self.reserved)


class UsageEventType(enum.IntEnum):
    UNSPECIFIED = 0
    INCREMENTED = 1
    DECREMENTED = 2
    RESET = 3
    LIMIT_REACHED = 4
    RESERVED = 5
    COMMITTED = 6
    RELEASED = 7
    EXPIRED = 8


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """One change of a usage counter, as kept in the license's event stream."""

    event_id: str
    type: UsageEventType
    amount: int
    uses: int
    max_uses: int | None
    request_id: str
    time_ms: int
    # The meter whose counter changed ("" = the license's own counter).
    meter: str = ""
    reservation_id: str = ""


class ReservationState(enum.IntEnum):
    """Numbers = proto ReservationState; the stored letters are in storage/lua/common.lua."""

    UNSPECIFIED = 0
    OPEN = 1
    COMMITTED = 2
    RELEASED = 3
    EXPIRED = 4


@dataclass(frozen=True, slots=True)
class Reservation:
    """Units held against a counter's limit (ReserveUsage) until committed, released or
    expired."""

    id: str
    license_id: str
    meter: str
    amount: int
    expire_time_ms: int
    state: ReservationState
    committed_amount: int = 0
    create_time_ms: int = 0


@dataclass(frozen=True, slots=True)
class ReservationAnswer:
    """A reservation script's answer: the reservation, its counter after the call."""

    reservation: Reservation
    usage: MeterUsage
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class MeterUsage:
    """One counter of a license as ListUsage reports it ("" = the license's own)."""

    meter: str
    usage: Usage
    entitled: bool = True


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One unit of usage recorded offline by a client, sent with SyncUsage."""

    id: str
    amount: int
    occur_time_ms: int | None = None
    meter: str = ""


class RecordOutcome(enum.IntEnum):
    """What SyncUsage did with one record (numbers = proto UsageRecordOutcome)."""

    UNSPECIFIED = 0
    APPLIED = 1
    DUPLICATE = 2
    REJECTED = 3


@dataclass(frozen=True, slots=True)
class RecordResult:
    id: str
    outcome: RecordOutcome
    # For REJECTED: the ErrorInfo reason (e.g. USAGE_LIMIT_EXCEEDED); empty otherwise.
    reason: str = ""


@dataclass(frozen=True, slots=True)
class SyncResult:
    results: list[RecordResult]
    uses: int
