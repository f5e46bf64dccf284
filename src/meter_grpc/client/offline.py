"""Usage that keeps working offline: OfflineMeter (blocking) and AsyncOfflineMeter.

`use(amount)` asks the service first (SyncUsage with one fresh record). When the service
cannot be reached, the usage is written to the local journal instead, but only within what
the last license file allows: its uses ceiling (max_uses with overage) minus the last usage
count the service reported (or the file's count at issue time) minus the usage already
journaled and not yet synced. `sync()` sends the journal with SyncUsage, in order and in
batches, and settles records only after the answer: APPLIED and DUPLICATE are done, REJECTED
are kept as rejected with the reason. A process that dies after SyncUsage was sent but before
the journal was updated resends the same record ids on the next sync; the service answers
DUPLICATE for those already counted, so nothing is counted twice.

`use(amount, meter=CODE)` counts on a meter of the license's policy the same way. Offline, a
meter is bounded by its entry in the file's `meters` (usesLimit less uses and reserved at
issue time) less what the service answered for the meter's records since the file was
issued (the journal keeps the meter's online records too, as applied) and its pending ones.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from meter.v1 import usage_pb2
from meter.v1 import usage_service_pb2 as upb
from meter_grpc.client import _common as c
from meter_grpc.client.aio import AsyncMeterClient
from meter_grpc.client.errors import (
    InternalError,
    LicenseExpired,
    LicenseSuspended,
    NoValidLicenseFile,
    Unavailable,
    UsageLimitExceeded,
    error_for,
)
from meter_grpc.client.journal import (
    APPLIED,
    DUPLICATE,
    PENDING,
    REJECTED,
    JournalRecord,
    UsageJournal,
)
from meter_grpc.client.sync import MeterClient
from meter_grpc.domain import ids, license_file
from meter_grpc.domain.license_file import LicenseFileError, ms_of_iso

DEFAULT_BATCH_SIZE = 500
MAX_BATCH_SIZE = 1000
_PUBLIC_KEY_SETTING = "public_key"
_STATE_OF = {
    usage_pb2.USAGE_RECORD_OUTCOME_APPLIED: APPLIED,
    usage_pb2.USAGE_RECORD_OUTCOME_DUPLICATE: DUPLICATE,
    usage_pb2.USAGE_RECORD_OUTCOME_REJECTED: REJECTED,
}
# Expiration strategies under which an expired license refuses usage (SPEC §3).
_EXPIRED_REFUSES = ("RESTRICT_ACCESS", "REVOKE_ACCESS")

BatchHook = Callable[[Sequence[JournalRecord], upb.SyncUsageResponse], None]


def _system_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class UseResult:
    record_id: str
    amount: int
    # True: the service counted it now. False: journaled offline, counted at the next sync.
    online: bool
    # Online: the license's usage after this record.
    uses: int | None = None
    # Offline: what the license file still allows offline after this record (None: no limit).
    offline_remaining: int | None = None


@dataclass(slots=True)
class SyncReport:
    applied: int = 0
    duplicate: int = 0
    rejected: int = 0
    batches: int = 0
    # Usage after the last batch (None when there was nothing to send).
    uses: int | None = None
    rejected_reasons: dict[str, int] = field(default_factory=dict)


class _Core:
    """Everything of the offline meter that does not talk to the network."""

    def __init__(
        self,
        journal: UsageJournal | str | Path,
        license_id: str,
        public_key: bytes | None,
        license_key: str | None,
        batch_size: int,
        clock: Callable[[], int] | None,
    ) -> None:
        if not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"batch_size must be 1 to {MAX_BATCH_SIZE}")
        self.journal = journal if isinstance(journal, UsageJournal) else UsageJournal(journal)
        self.license_id = license_id
        self.license_key = license_key
        self.batch_size = batch_size
        self.now = clock or _system_ms
        if public_key is not None:
            self.pin_public_key(public_key)

    def public_key(self) -> bytes | None:
        return self.journal.setting(_PUBLIC_KEY_SETTING)

    def pin_public_key(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the public key is the 32 raw bytes of GetPublicKey")
        self.journal.set_setting(_PUBLIC_KEY_SETTING, key)

    def _invalid(self, reason: str, message: str) -> NoValidLicenseFile:
        return NoValidLicenseFile(
            message,
            code=grpc.StatusCode.UNAVAILABLE,
            reason=reason,
            metadata={"license_id": self.license_id},
        )

    def verified_file(self, certificate: str | None = None) -> dict[str, Any]:
        """The payload of the stored (or given) license file, verified now."""
        certificate = certificate or self.journal.license_file(self.license_id)
        if certificate is None:
            raise self._invalid("LICENSE_FILE_MISSING", "no license file: check one out online")
        key = self.public_key()
        if key is None:
            raise self._invalid("PUBLIC_KEY_MISSING", "no public key to verify the license file")
        try:
            payload = license_file.verify(certificate, key, self.license_key, now_ms=self.now())
        except LicenseFileError as exc:
            raise self._invalid(f"LICENSE_FILE_{exc.reason}", str(exc)) from exc
        if payload.get("data", {}).get("id") != self.license_id:
            raise self._invalid("LICENSE_FILE_MISMATCH", "the license file is another license's")
        return payload

    def store_file(self, certificate: str) -> dict[str, Any]:
        payload = self.verified_file(certificate)
        self.journal.save_license_file(self.license_id, certificate)
        uses = payload["data"]["attributes"].get("uses")
        if isinstance(uses, int):
            self.journal.observe_uses(self.license_id, uses, ms_of_iso(payload["meta"]["issued"]))
        return payload

    def offline_ceiling(self, meter: str = "") -> int | None:
        """What the license file allows offline before the journal's pending usage (None: no
        limit), of the license's own counter or of `meter`. Raises when the file is missing or
        invalid, or the license (or the meter) may not be used."""
        now = self.now()
        payload = self.verified_file()
        attrs = payload["data"]["attributes"]
        meta = {"license_id": self.license_id, "offline": "true"}
        if attrs.get("suspended"):
            raise LicenseSuspended(
                "the license file says the license is suspended",
                code=grpc.StatusCode.FAILED_PRECONDITION,
                reason="LICENSE_SUSPENDED",
                metadata=meta,
            )
        expiry = attrs.get("expiry")
        strategy = attrs.get("expirationStrategy")
        if expiry and now >= ms_of_iso(expiry) and strategy in _EXPIRED_REFUSES:
            raise LicenseExpired(
                f"the license expired at {expiry}",
                code=grpc.StatusCode.FAILED_PRECONDITION,
                reason="LICENSE_EXPIRED",
                metadata=meta,
            )
        if meter:
            return self._meter_ceiling(payload, attrs, meter, now, meta)
        limit = attrs.get("usesLimit")
        if limit is None:
            return None
        uses, seen_ms = attrs.get("uses", 0), ms_of_iso(payload["meta"]["issued"])
        observed = self.journal.observed_uses(self.license_id)
        if observed is not None and observed[1] >= seen_ms:
            uses, seen_ms = observed
        period_end = attrs.get("usagePeriodEnd")
        if period_end and now >= ms_of_iso(period_end) and seen_ms < ms_of_iso(period_end):
            uses = 0  # a new usage period began since the count was seen
        return max(0, int(limit) - int(uses))

    def _meter_ceiling(
        self,
        payload: dict[str, Any],
        attrs: dict[str, Any],
        meter: str,
        now: int,
        meta: dict[str, str],
    ) -> int | None:
        """A meter's offline ceiling: its usesLimit in the file, less the usage and the
        reservations the file shows and what the service counted of it since the file was
        issued (records the journal saw answered)."""
        entry = next((m for m in attrs.get("meters") or [] if m.get("code") == meter), None)
        meta = {**meta, "meter": meter}
        if entry is None:
            raise error_for(
                "METER_NOT_FOUND",
                f"the license file has no meter {meter!r}",
                code=grpc.StatusCode.NOT_FOUND,
                metadata=meta,
            )
        if not entry.get("entitled", True):
            raise error_for(
                "METER_NOT_ENTITLED",
                f"the license file says meter {meter!r} needs an entitlement it lacks",
                code=grpc.StatusCode.FAILED_PRECONDITION,
                metadata=meta,
            )
        limit = entry.get("usesLimit")
        if limit is None:
            return None
        since = ms_of_iso(payload["meta"]["issued"])
        used = int(entry.get("uses") or 0) + int(entry.get("reserved") or 0)
        period_end = entry.get("usagePeriodEnd")
        if period_end and now >= ms_of_iso(period_end) > since:
            used, since = 0, ms_of_iso(period_end)  # a new usage period began since the file
        used += self.journal.counted_since(self.license_id, meter, since)
        return max(0, int(limit) - used)

    def allowance(self, meter: str = "") -> int | None:
        ceiling = self.offline_ceiling(meter)
        if ceiling is None:
            return None
        return max(0, ceiling - self.journal.pending_amount(self.license_id, meter))

    def record_offline(
        self, record_id: str, amount: int, occur_ms: int, meter: str = ""
    ) -> UseResult:
        ceiling = self.offline_ceiling(meter)
        rec = self.journal.record(
            self.license_id,
            amount,
            record_id=record_id,
            occur_ms=occur_ms,
            max_pending=ceiling,
            meter=meter,
        )
        if rec is None:
            assert ceiling is not None
            left = max(0, ceiling - self.journal.pending_amount(self.license_id, meter))
            raise UsageLimitExceeded(
                f"offline, the license file allows {left} more, not {amount}",
                code=grpc.StatusCode.RESOURCE_EXHAUSTED,
                reason="USAGE_LIMIT_EXCEEDED",
                metadata={
                    "license_id": self.license_id,
                    "offline": "true",
                    "remaining": str(left),
                    "requested": str(amount),
                    **({"meter": meter} if meter else {}),
                },
            )
        left_after = None
        if ceiling is not None:
            left_after = max(0, ceiling - self.journal.pending_amount(self.license_id, meter))
        return UseResult(record_id, amount, online=False, offline_remaining=left_after)

    def new_record(self, amount: int) -> tuple[str, int, int]:
        if not 1 <= amount <= 2**50:
            raise ValueError(f"amount must be 1 to 2^50, not {amount}")
        return ids.new_id(), amount, self.now()

    def batch(self) -> tuple[list[JournalRecord], list[usage_pb2.UsageRecord]]:
        recs = self.journal.pending(self.license_id, self.batch_size)
        return recs, [c.usage_record(r.id, r.amount, r.occur_ms, r.meter) for r in recs]

    def settle(
        self, recs: Sequence[JournalRecord], resp: upb.SyncUsageResponse, report: SyncReport
    ) -> None:
        if [r.id for r in resp.results] != [r.id for r in recs]:
            raise InternalError(
                "SyncUsage answered other records than were sent; nothing was marked",
                code=grpc.StatusCode.INTERNAL,
            )
        outcomes = []
        for r in resp.results:
            state = _STATE_OF.get(r.outcome, PENDING)
            outcomes.append((r.id, state, r.reason))
            if state == APPLIED:
                report.applied += 1
            elif state == DUPLICATE:
                report.duplicate += 1
            elif state == REJECTED:
                report.rejected += 1
                report.rejected_reasons[r.reason] = report.rejected_reasons.get(r.reason, 0) + 1
        self.journal.settle(self.license_id, outcomes, uses=resp.uses, observed_ms=self.now())
        report.batches += 1
        report.uses = resp.uses

    def online_result(
        self,
        record_id: str,
        amount: int,
        resp: upb.SyncUsageResponse,
        meter: str = "",
        occur_ms: int | None = None,
    ) -> UseResult:
        self.journal.observe_uses(self.license_id, resp.uses, self.now())
        result = resp.results[0]
        if meter and result.outcome != usage_pb2.USAGE_RECORD_OUTCOME_REJECTED:
            # kept as answered: what the license file allows offline of the meter counts it
            self.journal.record(
                self.license_id,
                amount,
                record_id=record_id,
                occur_ms=occur_ms,
                meter=meter,
                state=APPLIED,
            )
            return UseResult(record_id, amount, online=True)
        if result.outcome == usage_pb2.USAGE_RECORD_OUTCOME_REJECTED:
            raise error_for(
                result.reason,
                f"the service refused the usage: {result.reason}",
                metadata={
                    "license_id": self.license_id,
                    "uses": str(resp.uses),
                    "requested": str(amount),
                    **({"meter": meter} if meter else {}),
                },
            )
        return UseResult(record_id, amount, online=True, uses=resp.uses)


class OfflineMeter:
    """Metered usage of one license that survives outages (blocking; thread-safe).

    `journal` is a UsageJournal or the path of its SQLite file. `public_key` (32 raw bytes)
    verifies license files; without it the key of GetPublicKey is fetched once and pinned in
    the journal. `license_key` decrypts encrypted license files (default: the client's).
    `on_batch_answered` runs after each SyncUsage answer and before the journal is updated
    (instrumentation, crash tests).
    """

    def __init__(
        self,
        client: MeterClient,
        license_id: str,
        journal: UsageJournal | str | Path,
        *,
        public_key: bytes | None = None,
        license_key: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        clock: Callable[[], int] | None = None,
        on_batch_answered: BatchHook | None = None,
    ) -> None:
        self.client = client
        self._core = _Core(
            journal,
            license_id,
            public_key,
            license_key or client.license_key,
            batch_size,
            clock,
        )
        self.journal = self._core.journal
        self.license_id = license_id
        self._hook = on_batch_answered
        self._lock = threading.RLock()

    def refresh_license_file(
        self, *, ttl: dt.timedelta | None = None, encrypt: bool = False
    ) -> dict[str, Any]:
        """Checks out a new license file (CheckOutLicense), verifies and keeps it."""
        with self._lock:
            if self._core.public_key() is None:
                self._core.pin_public_key(self.client.get_public_key())
            resp = self.client.check_out_license(self.license_id, ttl=ttl, encrypt=encrypt)
            return self._core.store_file(resp.certificate)

    def license_file(self) -> dict[str, Any]:
        """The kept license file's payload, verified now (NoValidLicenseFile otherwise)."""
        return self._core.verified_file()

    def allowance(self, meter: str = "") -> int | None:
        """Units that may still be used offline now (None: no limit), of the license's own
        counter or of `meter`."""
        with self._lock:
            return self._core.allowance(meter)

    def use(self, amount: int = 1, *, meter: str = "") -> UseResult:
        """Counts `amount` units (of `meter`, or of the license's own counter): online if
        the service answers, else in the journal within the license file's allowance. Raises
        UsageLimitExceeded (and the other refusals). A meter's online answer has no `uses`
        (SyncUsage reports the license's counter)."""
        record_id, amount, occur = self._core.new_record(amount)
        with self._lock:
            try:
                if self.journal.pending(self.license_id, 1):
                    self._sync()
                resp = self.client.sync_usage(
                    self.license_id, [c.usage_record(record_id, amount, occur, meter)]
                )
            except Unavailable:
                return self._core.record_offline(record_id, amount, occur, meter)
            return self._core.online_result(record_id, amount, resp, meter, occur)

    def sync(self) -> SyncReport:
        """Sends every pending record (SyncUsage, in order, in batches). Raises Unavailable
        while the service cannot be reached; records stay pending until answered."""
        with self._lock:
            return self._sync()

    def _sync(self) -> SyncReport:
        report = SyncReport()
        while True:
            recs, records = self._core.batch()
            if not recs:
                return report
            resp = self.client.sync_usage(self.license_id, records)
            if self._hook is not None:
                self._hook(recs, resp)
            self._core.settle(recs, resp, report)


class AsyncOfflineMeter:
    """OfflineMeter for asyncio (one task at a time per meter; the journal is local SQLite)."""

    def __init__(
        self,
        client: AsyncMeterClient,
        license_id: str,
        journal: UsageJournal | str | Path,
        *,
        public_key: bytes | None = None,
        license_key: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        clock: Callable[[], int] | None = None,
        on_batch_answered: BatchHook | None = None,
    ) -> None:
        self.client = client
        self._core = _Core(
            journal,
            license_id,
            public_key,
            license_key or client.license_key,
            batch_size,
            clock,
        )
        self.journal = self._core.journal
        self.license_id = license_id
        self._hook = on_batch_answered
        self._lock = asyncio.Lock()

    async def refresh_license_file(
        self, *, ttl: dt.timedelta | None = None, encrypt: bool = False
    ) -> dict[str, Any]:
        async with self._lock:
            if self._core.public_key() is None:
                self._core.pin_public_key(await self.client.get_public_key())
            resp = await self.client.check_out_license(self.license_id, ttl=ttl, encrypt=encrypt)
            return self._core.store_file(resp.certificate)

    def license_file(self) -> dict[str, Any]:
        return self._core.verified_file()

    def allowance(self, meter: str = "") -> int | None:
        return self._core.allowance(meter)

    async def use(self, amount: int = 1, *, meter: str = "") -> UseResult:
        record_id, amount, occur = self._core.new_record(amount)
        async with self._lock:
            try:
                if self.journal.pending(self.license_id, 1):
                    await self._sync()
                resp = await self.client.sync_usage(
                    self.license_id, [c.usage_record(record_id, amount, occur, meter)]
                )
            except Unavailable:
                return self._core.record_offline(record_id, amount, occur, meter)
            return self._core.online_result(record_id, amount, resp, meter, occur)

    async def sync(self) -> SyncReport:
        async with self._lock:
            return await self._sync()

    async def _sync(self) -> SyncReport:
        report = SyncReport()
        while True:
            recs, records = self._core.batch()
            if not recs:
                return report
            resp = await self.client.sync_usage(self.license_id, records)
            if self._hook is not None:
                self._hook(recs, resp)
            self._core.settle(recs, resp, report)
