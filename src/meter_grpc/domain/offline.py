"""License files: signed (optionally encrypted) snapshots of a license for offline use.

The payload follows Keygen's license file dataset: `data` is the license (type "licenses")
with its effective limits, entitlements and usage at issue time as `attributes`; `included`
holds its policy and machines; `meta` holds `issued`, `expiry` (ISO 8601, UTC) and `ttl`
(seconds), `expiry` and `ttl` being null for a file that never expires.

Building, encoding, encrypting and signing a file runs in worker processes
(METER_CHECKOUT_WORKERS, default 2, started on the first check-out), never on the event loop
nor in a thread of the service's process: a license with thousands of machines takes a few
hundred milliseconds of CPU, which would hold the GIL against every other call. Check-outs
beyond the workers wait for a free one. The service only reads the license and its machines,
CHECKOUT_PAGE_SIZE machines a round trip, so that the event loop is never held for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meter_grpc.domain import license_file, periods
from meter_grpc.domain.errors import MeterError, Reason
from meter_grpc.domain.license_file import iso
from meter_grpc.domain.models import License, Machine, Policy, overage_ceiling
from meter_grpc.domain.rules import MAX_DURATION_MS, Violations
from meter_grpc.domain.signing import Signer

if TYPE_CHECKING:
    from meter_grpc.domain.licensing import Licensing
    from meter_grpc.domain.machines import Machines

log = logging.getLogger(__name__)

# Machines read per round trip while checking out (short turns of the event loop).
CHECKOUT_PAGE_SIZE = 200
# Longest license file issued (METER_MAX_LICENSE_FILE_BYTES): 10,000 machines with 1 KB of
# metadata each make about 27 MB.
DEFAULT_MAX_FILE_BYTES = 32 * 1024 * 1024
# Niceness added to the worker processes that make license files.
CHECKOUT_NICE = 10

HOUR_MS = 3_600_000
DEFAULT_TTL_MS = 30 * 24 * HOUR_MS
MIN_TTL_MS = HOUR_MS
MAX_FINGERPRINT_LEN = 256


@dataclass(frozen=True, slots=True)
class CheckedOut:
    certificate: str
    issued_ms: int
    expiry_ms: int | None


def _seconds(ms: int | None) -> int | None:
    return None if ms is None else ms // 1000


def machine_resource(m: Machine) -> dict[str, Any]:
    """A live machine as a Keygen-style resource."""
    return {
        "type": "machines",
        "id": m.id,
        "attributes": {
            "fingerprint": m.fingerprint,
            "cores": m.cores,
            "name": m.name,
            "hostname": m.hostname,
            "platform": m.platform,
            "metadata": m.metadata,
            "lastHeartbeat": iso(m.last_heartbeat_ms),
            "created": iso(m.create_time_ms),
        },
        "relationships": {"license": {"data": {"type": "licenses", "id": m.license_id}}},
    }


def _overage(p: Policy) -> str:
    return p.overage_strategy.name if p.overage_strategy else "NO_OVERAGE"


def _policy_meters(p: Policy) -> list[dict[str, Any]]:
    return [
        {
            "code": m.code,
            "maxUses": m.max_uses,
            "overageStrategy": m.overage_strategy.name if m.overage_strategy else "NO_OVERAGE",
            "usageResetInterval": (
                m.usage_reset_interval.name if m.usage_reset_interval else "NONE"
            ),
            "entitlement": m.entitlement or None,
        }
        for m in p.meters
    ]


def license_meters(lic: License, issued_ms: int) -> list[dict[str, Any]]:
    """Each meter of the license as of `issued_ms`: its usage, limit and ceiling (the
    license's override or the policy's), units reserved, period end, entitlement held."""
    out = []
    for m in lic.policy.meters:
        uses, start, reserved = lic.meter_counters.get(m.code, (0, 0, 0))
        bounds = periods.period_bounds(issued_ms, m.usage_reset_interval)
        limit = lic.meter_max_uses(m)
        out.append(
            {
                "code": m.code,
                "uses": periods.uses_in_current_period(
                    uses, start, issued_ms, m.usage_reset_interval
                ),
                "maxUses": limit,
                "usesLimit": overage_ceiling(limit, m.overage_strategy),
                "reserved": reserved,
                "usagePeriodEnd": iso(bounds[1]) if bounds else None,
                "entitled": lic.meter_entitled(m),
            }
        )
    return out


def policy_resource(p: Policy) -> dict[str, Any]:
    resource = _policy_resource(p)
    if p.meters:  # files of policies without meters keep their earlier shape
        resource["attributes"]["meters"] = _policy_meters(p)
    return resource


def _policy_resource(p: Policy) -> dict[str, Any]:
    return {
        "type": "policies",
        "id": p.id,
        "attributes": {
            "name": p.name,
            "maxUses": p.max_uses,
            "maxMachines": p.max_machines,
            "maxCores": p.max_cores,
            "floating": p.floating,
            "strict": p.strict,
            "duration": _seconds(p.duration_ms),
            "expirationStrategy": p.expiration_strategy.effective.name,
            "requireCheckIn": p.require_check_in,
            "checkInInterval": _seconds(p.check_in_interval_ms),
            "heartbeatDuration": _seconds(p.heartbeat_duration_ms),
            "entitlements": p.entitlements,
            "overageStrategy": _overage(p),
            "usageResetInterval": p.usage_reset_interval.name if p.usage_reset_interval else "NONE",
            "metadata": p.metadata,
            "created": iso(p.create_time_ms),
            "updated": iso(p.update_time_ms),
        },
    }


def license_payload(
    lic: License,
    machines: list[dict[str, Any]],
    *,
    issued_ms: int,
    ttl_ms: int | None,
) -> dict[str, Any]:
    """The JSON payload of a license file (a Keygen-style dataset)."""
    p = lic.policy
    bounds = periods.period_bounds(issued_ms, p.usage_reset_interval)
    expiry_ms = None if ttl_ms is None else issued_ms + ttl_ms
    payload = _license_payload(lic, machines, issued_ms, bounds, expiry_ms, ttl_ms)
    if p.meters:  # files of licenses without meters keep their earlier shape
        payload["data"]["attributes"]["meters"] = license_meters(lic, issued_ms)
    return payload


def _license_payload(
    lic: License,
    machines: list[dict[str, Any]],
    issued_ms: int,
    bounds: tuple[int, int] | None,
    expiry_ms: int | None,
    ttl_ms: int | None,
) -> dict[str, Any]:
    p = lic.policy
    return {
        "meta": {"issued": iso(issued_ms), "expiry": iso(expiry_ms), "ttl": _seconds(ttl_ms)},
        "data": {
            "type": "licenses",
            "id": lic.id,
            "attributes": {
                "name": lic.name,
                # the key only when the caller authenticated with it (never stored in clear)
                "key": lic.key or None,
                "expiry": iso(lic.expire_time_ms),
                "status": lic.status(issued_ms).name,
                "suspended": lic.suspended,
                "uses": lic.uses,
                "maxUses": lic.max_uses,
                # The ceiling increments are checked against: maxUses with the overage.
                "usesLimit": overage_ceiling(lic.max_uses, p.overage_strategy),
                "usagePeriodEnd": iso(bounds[1]) if bounds else None,
                "maxMachines": lic.max_machines,
                "maxCores": lic.max_cores,
                "machinesCount": lic.machines_count,
                "coresCount": lic.cores_count,
                "floating": p.floating,
                "strict": p.strict,
                "expirationStrategy": p.expiration_strategy.effective.name,
                "overageStrategy": _overage(p),
                "requireCheckIn": p.require_check_in,
                "lastCheckIn": iso(lic.last_check_in_ms),
                "entitlements": lic.all_entitlements,
                "metadata": lic.metadata,
                "created": iso(lic.create_time_ms),
                "updated": iso(lic.update_time_ms),
            },
            "relationships": {
                "policy": {"data": {"type": "policies", "id": p.id}},
                "machines": {
                    "data": [{"type": "machines", "id": m["id"]} for m in machines],
                    "meta": {"count": len(machines)},
                },
            },
        },
        "included": [policy_resource(p), *machines],
    }


def certificate(
    lic: License,
    live: list[Machine],
    issued_ms: int,
    ttl_ms: int | None,
    aes_key: bytes | None,
    sign: Callable[[bytes], bytes],
    max_bytes: int | None = None,
) -> str:
    """The license file of `lic` with its `live` machines, encrypted under `aes_key`
    (SHA-256 of the license key) when given; FileTooLarge past max_bytes."""
    machines = [machine_resource(m) for m in live]
    payload = license_payload(lic, machines, issued_ms=issued_ms, ttl_ms=ttl_ms)
    return license_file.issue(payload, sign, aes_key=aes_key, max_bytes=max_bytes)


_worker_signer: Signer | None = None


def _start_worker(raw_private_key: bytes) -> None:
    global _worker_signer
    # Below the service's priority: when CPU is short, calls go first and files wait.
    with contextlib.suppress(OSError):
        os.nice(CHECKOUT_NICE)
    # A terminal's Ctrl-C or a signal to the process group is for the service, which stops
    # its workers itself; a worker whose service died without doing so exits on its own.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    parent = os.getppid()

    def orphaned() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=orphaned, name="meter-checkout-parent", daemon=True).start()
    _worker_signer = Signer(Ed25519PrivateKey.from_private_bytes(raw_private_key))


def _certificate_in_worker(
    lic: License,
    live: list[Machine],
    issued_ms: int,
    ttl_ms: int | None,
    aes_key: bytes | None,
    max_bytes: int,
) -> str:
    assert _worker_signer is not None
    return certificate(lic, live, issued_ms, ttl_ms, aes_key, _worker_signer.sign, max_bytes)


class LicenseFiles:
    """CheckOutLicense and GetPublicKey."""

    def __init__(
        self,
        licensing: Licensing,
        machines: Machines,
        signer: Signer,
        *,
        workers: int = 2,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    ) -> None:
        self.licensing = licensing
        self.machines = machines
        self.signer = signer
        self.workers = workers
        self.max_file_bytes = max_file_bytes
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(self.signer.raw_private_key(),),
            )
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def _certificate(
        self, lic: License, live: list[Machine], issued: int, ttl: int | None, aes_key: bytes | None
    ) -> str:
        """The license file, made by a worker process (a broken pool is started anew once)."""
        loop = asyncio.get_running_loop()
        for attempt in (1, 2):
            pool = self._executor()
            try:
                return await loop.run_in_executor(
                    pool,
                    _certificate_in_worker,
                    lic,
                    live,
                    issued,
                    ttl,
                    aes_key,
                    self.max_file_bytes,
                )
            except license_file.FileTooLarge as exc:
                raise MeterError(
                    Reason.LICENSE_FILE_TOO_LARGE,
                    f"the license file would be {exc.size} bytes, more than the server's limit "
                    f"of {exc.limit} ({len(live)} machines): check out one machine's file with "
                    "`fingerprint`",
                    metadata={
                        "license_id": lic.id,
                        "size": str(exc.size),
                        "limit": str(exc.limit),
                        "machines": str(len(live)),
                    },
                    quota_subject=f"license:{lic.id}",
                ) from None
            except BrokenProcessPool:  # a worker died (killed, out of memory)
                if self._pool is pool:
                    self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    @property
    def public_key(self) -> bytes:
        return self.signer.public_key

    @property
    def public_key_pem(self) -> str:
        return self.signer.public_key_pem

    @property
    def algorithm(self) -> str:
        return self.signer.algorithm

    async def check_out(
        self, license_id: str, ttl_ms: int | None, encrypt: bool, fingerprint: str, key: str = ""
    ) -> CheckedOut:
        """Signs a snapshot of the license. `ttl_ms`: None = 30 days, 0 = never expires.
        `key`: the license key the caller authenticated with (put in the payload), if any.
        Encryption uses SHA-256(key), kept sealed under the server secret."""
        v = Violations()
        v.identifier("id", license_id)
        if ttl_ms is None:
            ttl_ms = DEFAULT_TTL_MS
        elif ttl_ms != 0 and not MIN_TTL_MS <= ttl_ms <= MAX_DURATION_MS:
            v.add("ttl", "must be at least 1 hour and at most 100 years (or zero: no expiry)")
        v.text("fingerprint", fingerprint, MAX_FINGERPRINT_LEN)
        v.raise_if_any()
        lic = await self.licensing.get_license(license_id)
        live = await self._live_machines(license_id)
        if fingerprint:
            live = [m for m in live if m.fingerprint == fingerprint]
            if not live:
                raise MeterError(
                    Reason.MACHINE_NOT_FOUND,
                    f"no machine with fingerprint {fingerprint!r} is activated on license "
                    f"{license_id!r}: activate it before checking out its license file",
                    metadata={"license_id": license_id, "fingerprint": fingerprint},
                )
        issued = self.licensing.clock.now_ms()
        ttl = ttl_ms or None
        lic.key = key
        aes_key = self.licensing.file_key(lic) if encrypt else None
        cert = await self._certificate(lic, live, issued, ttl, aes_key)
        return CheckedOut(cert, issued, None if ttl is None else issued + ttl)

    async def _live_machines(self, license_id: str) -> list[Machine]:
        """Every live machine of the license, in activation order (dead ones left out)."""
        out: list[Machine] = []
        token = ""
        while True:
            page, token = await self.machines.list(license_id, CHECKOUT_PAGE_SIZE, token)
            out += page
            if not token:
                return out
