"""License validation (Keygen's model): is this license usable now, in this scope?

A license that cannot be used is not an error: the answer says `valid = false` and why.
Codes are looked at in SPEC §3's order of precedence:

    NOT_FOUND, SUSPENDED, EXPIRED (REVOKE_ACCESS), OVERDUE, ENTITLEMENTS_MISSING,
    FINGERPRINT_SCOPE_MISMATCH / HEARTBEAT_DEAD, then for strict policies NO_MACHINE /
    NO_MACHINES, TOO_MANY_MACHINES, TOO_MANY_CORES, then EXPIRED (other strategies), VALID.

Some codes do not invalidate: TOO_MANY_* within the overage ceiling, and EXPIRED under
MAINTAIN_ACCESS / ALLOW_ACCESS. The answer is the first invalidating code; when there is none,
the first non-invalidating code that applies (with `valid = true`); else VALID. So a license
over its machine limit but within overage that has also expired under RESTRICT_ACCESS is
EXPIRED and invalid, never "valid with TOO_MANY_MACHINES" (Keygen returns at the first
over-limit code, which would let an expired RESTRICT_ACCESS license pass).

Usage never plays a part: a license that has used its last unit is still valid.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from meter_grpc.domain import periods
from meter_grpc.domain.clock import Clock
from meter_grpc.domain.models import (
    ExpirationStrategy,
    FingerprintState,
    License,
    ValidationCode,
)
from meter_grpc.domain.rules import Violations, check_key

if TYPE_CHECKING:
    from meter_grpc.domain.ports import Store

Code = ValidationCode


@dataclass(frozen=True, slots=True)
class Validation:
    valid: bool
    code: ValidationCode
    detail: str
    license: License | None = None


def _findings(
    lic: License, now_ms: int, fp_state: FingerprintState, entitlements: Iterable[str]
) -> Iterator[tuple[ValidationCode, bool, str]]:
    """(code, valid, detail) of every code that applies, in order of precedence."""
    p = lic.policy
    strategy = p.expiration_strategy.effective
    expired = lic.is_expired(now_ms)
    if lic.suspended:
        yield Code.SUSPENDED, False, "is suspended"
    if expired and strategy == ExpirationStrategy.REVOKE_ACCESS:
        yield Code.EXPIRED, False, "is expired (access revoked)"
    if lic.check_in_overdue(now_ms):
        yield Code.OVERDUE, False, "is overdue for check in"
    granted = set(lic.all_entitlements)
    missing = [e for e in dict.fromkeys(entitlements) if e not in granted]
    if missing:
        yield Code.ENTITLEMENTS_MISSING, False, f"is missing entitlements: {', '.join(missing)}"
    if fp_state == FingerprintState.UNKNOWN:
        yield (
            Code.FINGERPRINT_SCOPE_MISMATCH,
            False,
            "fingerprint is not activated on this license",
        )
    elif fp_state == FingerprintState.DEAD:
        yield Code.HEARTBEAT_DEAD, False, "machine heartbeat is dead"
    if p.strict:
        if lic.machines_count == 0:
            if p.floating:
                yield Code.NO_MACHINES, False, "must have at least 1 associated machine"
            else:
                yield Code.NO_MACHINE, False, "must have exactly 1 associated machine"
        max_m, ceil_m = lic.max_machines, lic.machine_ceiling
        if max_m is not None and lic.machines_count > max_m:
            within = ceil_m is None or lic.machines_count <= ceil_m
            yield (
                Code.TOO_MANY_MACHINES,
                within,
                f"has too many associated machines ({lic.machines_count} of {max_m})",
            )
        max_c, ceil_c = lic.max_cores, lic.core_ceiling
        if max_c is not None and lic.cores_count > max_c:
            within = ceil_c is None or lic.cores_count <= ceil_c
            yield (
                Code.TOO_MANY_CORES,
                within,
                f"has too many associated machine cores ({lic.cores_count} of {max_c})",
            )
    if expired and strategy != ExpirationStrategy.REVOKE_ACCESS:
        keeps = strategy in (ExpirationStrategy.MAINTAIN_ACCESS, ExpirationStrategy.ALLOW_ACCESS)
        yield Code.EXPIRED, keeps, "is expired"


def evaluate(
    lic: License, now_ms: int, fp_state: FingerprintState, entitlements: Iterable[str]
) -> Validation:
    """The answer for an existing license (see the module docstring for the rule)."""
    first_warning: tuple[ValidationCode, bool, str] | None = None
    for finding in _findings(lic, now_ms, fp_state, entitlements):
        if not finding[1]:
            return Validation(False, finding[0], finding[2], lic)
        first_warning = first_warning or finding
    if first_warning is not None:
        return Validation(True, first_warning[0], first_warning[2], lic)
    return Validation(True, Code.VALID, "is valid", lic)


class Validator:
    def __init__(self, store: Store, clock: Clock, key_digest: Callable[[str], str]) -> None:
        self.store = store
        self.clock = clock
        self.key_digest = key_digest  # how license keys are stored (domain/keysecret.py)

    @staticmethod
    def _check_scope(v: Violations, fingerprint: str, entitlements: list[str]) -> None:
        v.fingerprint("fingerprint", fingerprint, required=False)
        v.entitlements("entitlements", entitlements)

    async def resolve(
        self,
        license_id: str,
        key: str,
        which: str | None,
        fingerprint: str = "",
        entitlements: Iterable[str] = (),
    ) -> str:
        """Checks the whole request, then returns the license id to validate ("" when no
        license has the key). `which` names the field of the request's oneof that is set."""
        v = Violations()
        if which == "key":
            check_key(v, "key", key)
        elif which == "license_id":
            v.identifier("license_id", license_id)
        else:
            v.add("license_id", "one of license_id or key is required")
        self._check_scope(v, fingerprint, list(entitlements))
        v.raise_if_any()
        if which == "key":
            holder = await self.store.key_holder(self.key_digest(key))
            return holder.license_id if holder is not None else ""
        return license_id

    async def validate(
        self, license_id: str, fingerprint: str, entitlements: Iterable[str]
    ) -> Validation:
        entitlements = list(entitlements)
        v = Violations()
        self._check_scope(v, fingerprint, entitlements)
        v.raise_if_any()
        if not license_id:
            return Validation(False, Code.NOT_FOUND, "does not exist")
        now = self.clock.now_ms()
        read = await self.store.read_license(license_id, now, fingerprint)
        if read is None:
            return Validation(False, Code.NOT_FOUND, "does not exist")
        return evaluate(periods.as_read_now(read.license, now), now, read.fingerprint, entitlements)
