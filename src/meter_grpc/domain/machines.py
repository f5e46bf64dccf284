"""Machine activations: activate, deactivate, read, list, update, heartbeat.

Every check of a limit (fingerprint, max_machines, max_cores, with overage) and every move of
the license's `machines` / `cores` counters happens inside one Lua script per call
(storage/lua/machine_*.lua); this module validates the input and turns the scripts' statuses
into errors. Dead floating machines are removed by those same scripts, before they check.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from typing import TYPE_CHECKING

from meter_grpc.domain import ids, masks, paging
from meter_grpc.domain.clock import Clock
from meter_grpc.domain.errors import (
    FieldViolation,
    MeterError,
    Reason,
    not_found,
    request_id_reused,
)
from meter_grpc.domain.models import Machine, Slots
from meter_grpc.domain.rules import Violations, check_machine

if TYPE_CHECKING:
    from meter_grpc.domain.ports import MachineResult, Store

_ID_RETRIES = 3


def _n(v: int | None) -> str:
    return "unlimited" if v is None else str(v)


def _limit_meta(limit: int | None, ceiling: int | None) -> dict[str, str]:
    return {"limit": _n(limit), "overage_limit": _n(ceiling)}


# Live machines any one license may hold, whatever its max_machines
# (METER_MAX_MACHINES_PER_LICENSE): bounds the keys of a license, ListMachines paging and the
# size of a license file.
DEFAULT_MAX_MACHINES_PER_LICENSE = 10_000


class Machines:
    def __init__(
        self, store: Store, clock: Clock, max_per_license: int = DEFAULT_MAX_MACHINES_PER_LICENSE
    ) -> None:
        self.store = store
        self.clock = clock
        self.max_per_license = max_per_license

    async def activate(self, m: Machine, request_id: str = "") -> Machine:
        """One script checks and activates; with a request_id a retry gets the first answer."""
        v = Violations()
        v.identifier("license_id", m.license_id)
        v.fingerprint("fingerprint", m.fingerprint)
        check_machine(v, m)
        v.request_id("request_id", request_id)
        v.raise_if_any()
        now = self.clock.now_ms()
        digest = ""
        if request_id:
            args = [m.fingerprint, m.cores, m.name, m.hostname, m.platform, m.metadata]
            digest = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:32]
        for _ in range(_ID_RETRIES):  # CONFLICT: the minted id exists (never, in practice)
            m = dataclasses.replace(
                m, id=ids.new_machine_id(m.license_id), create_time_ms=now, last_heartbeat_ms=now
            )
            result = await self.store.activate_machine(
                m, now, self.max_per_license, request_id, digest
            )
            if result.status.name != "CONFLICT":
                break
        if result.status.name == "REQUEST_ID_REUSED":
            raise request_id_reused(request_id, license_id=m.license_id)
        if result.status.name == "MACHINE_CAP_EXCEEDED":
            raise _machine_cap(m.license_id, result.slots, self.max_per_license)
        return self._machine(result, m.license_id, "", requested_cores=m.cores, fp=m.fingerprint)

    async def deactivate(self, machine_id: str) -> None:
        license_id = self._license_of(machine_id, "id")
        result = await self.store.deactivate_machine(license_id, machine_id, self.clock.now_ms())
        self._check(result, license_id, machine_id)

    async def get(self, machine_id: str) -> Machine:
        license_id = self._license_of(machine_id, "id")
        result = await self.store.get_machine(license_id, machine_id, self.clock.now_ms())
        return self._machine(result, license_id, machine_id)

    async def heartbeat(self, machine_id: str) -> Machine:
        license_id = self._license_of(machine_id, "id")
        result = await self.store.heartbeat_machine(license_id, machine_id, self.clock.now_ms())
        return self._machine(result, license_id, machine_id)

    async def list(
        self, license_id: str, page_size: int, page_token: str
    ) -> tuple[list[Machine], str]:
        v = Violations()
        v.identifier("license_id", license_id)
        size = v.page("page_size", page_size)
        v.raise_if_any()
        scope = f"machines:{license_id}"
        after = paging.decode(page_token, scope)
        result = await self.store.list_machines(license_id, after, size + 1, self.clock.now_ms())
        self._check(result, license_id, "")
        page = list(result.machines)
        more = len(page) > size
        page = page[:size]
        return page, paging.encode(page[-1].id, scope) if more else ""

    async def update(self, patch: Machine, mask: Iterable[str]) -> Machine:
        v = Violations()
        v.machine_id("machine.id", patch.id)
        check_machine(v, patch, prefix="machine.")
        v.raise_if_any()
        attrs = masks.MACHINE.resolve(mask).values()
        license_id = self._license_of(patch.id, "machine.id")
        changes = {a: getattr(patch, a) for a in attrs}
        result = await self.store.update_machine(license_id, patch.id, changes, self.clock.now_ms())
        return self._machine(
            result, license_id, patch.id, requested_cores=patch.cores, cores_field="machine.cores"
        )

    # --- helpers --------------------------------------------------------------------------

    @staticmethod
    def _license_of(machine_id: str, field: str) -> str:
        """The license a machine id embeds; MACHINE_NOT_FOUND for an id we never issue."""
        v = Violations()
        v.machine_id(field, machine_id)
        v.raise_if_any()
        license_id = ids.license_id_of_machine(machine_id)
        if license_id is None:
            raise not_found(Reason.MACHINE_NOT_FOUND, "machine", machine_id)
        return license_id

    def _machine(
        self,
        result: MachineResult,
        license_id: str,
        machine_id: str,
        *,
        requested_cores: int = 0,
        fp: str = "",
        cores_field: str = "cores",
    ) -> Machine:
        self._check(result, license_id, machine_id, requested_cores, fp, cores_field)
        assert result.machine is not None
        return result.machine

    @staticmethod
    def _check(
        result: MachineResult,
        license_id: str,
        machine_id: str,
        requested_cores: int = 0,
        fp: str = "",
        cores_field: str = "cores",
    ) -> None:
        """Raises the error of a refused machine script (nothing was changed)."""
        status, s = result.status.name, result.slots
        if status == "OK":
            return
        meta = {"license_id": license_id}
        if machine_id:
            meta["machine_id"] = machine_id
        if status == "LICENSE_NOT_FOUND" and machine_id:
            # The machine's license is gone, and the machine with it.
            raise not_found(Reason.MACHINE_NOT_FOUND, "machine", machine_id)
        if status == "LICENSE_NOT_FOUND":
            raise not_found(Reason.LICENSE_NOT_FOUND, "license", license_id)
        if status == "MACHINE_NOT_FOUND":
            raise not_found(Reason.MACHINE_NOT_FOUND, "machine", machine_id)
        if status == "LICENSE_SUSPENDED":
            raise MeterError(Reason.LICENSE_SUSPENDED, "the license is suspended", metadata=meta)
        if status == "LICENSE_EXPIRED":
            what = "a machine cannot be activated" if not machine_id else "it may not be used"
            raise MeterError(
                Reason.LICENSE_EXPIRED, f"the license has expired: {what}", metadata=meta
            )
        if status == "FINGERPRINT_TAKEN":
            raise MeterError(
                Reason.FINGERPRINT_TAKEN,
                f"fingerprint {fp!r} is already activated on this license",
                metadata={**meta, "fingerprint": fp, "machine_id": result.extra},
            )
        if status == "MACHINE_LIMIT_EXCEEDED":
            raise _machine_limit(license_id, s)
        if status == "CORE_LIMIT_EXCEEDED":
            added = int(result.extra) if result.extra else requested_cores
            raise _core_limit(meta, license_id, s, added, requested_cores)
        if status == "CORES_REQUIRED":
            description = f"is required (>= 1): the license has a core limit of {s.max_cores}"
            raise MeterError(
                Reason.INVALID_ARGUMENT,
                f"invalid {cores_field}: {description}",
                metadata={"field": cores_field, "limit": _n(s.max_cores)},
                violations=(FieldViolation(cores_field, description),),
            )
        raise AssertionError(f"unexpected machine status {status}")


def _machine_limit(license_id: str, s: Slots) -> MeterError:
    return MeterError(
        Reason.MACHINE_LIMIT_EXCEEDED,
        f"one more machine would pass the machine limit: {s.machines} active of "
        f"{_n(s.max_machines)} (granted up to {_n(s.machine_ceiling)})",
        metadata={
            "license_id": license_id,
            **_limit_meta(s.max_machines, s.machine_ceiling),
            "machines": str(s.machines),
            "requested": "1",
            "limit_source": "license",
        },
        quota_subject=f"license:{license_id}",
    )


def _machine_cap(license_id: str, s: Slots, cap: int) -> MeterError:
    """MACHINE_LIMIT_EXCEEDED of the server's cap: the shape of the license's own limit, with
    `limit_source` = "server" (the license's own limit, if any, is higher or unset)."""
    return MeterError(
        Reason.MACHINE_LIMIT_EXCEEDED,
        f"one more machine would pass the server's limit of machines per license: "
        f"{s.machines} active of {cap}",
        metadata={
            "license_id": license_id,
            "limit": str(cap),
            "overage_limit": str(cap),
            "machines": str(s.machines),
            "requested": "1",
            "limit_source": "server",
        },
        quota_subject=f"license:{license_id}",
    )


def _core_limit(
    meta: dict[str, str], license_id: str, s: Slots, added: int, machine_cores: int
) -> MeterError:
    return MeterError(
        Reason.CORE_LIMIT_EXCEEDED,
        f"{added} more core(s) would pass the core limit: {s.cores} in use of "
        f"{_n(s.max_cores)} (granted up to {_n(s.core_ceiling)})",
        metadata={
            **meta,
            **_limit_meta(s.max_cores, s.core_ceiling),
            "cores": str(s.cores),
            "requested": str(added),
            "machine_cores": str(machine_cores),
        },
        quota_subject=f"license:{license_id}",
    )
