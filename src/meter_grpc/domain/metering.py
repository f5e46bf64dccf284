"""Usage counters: increment, decrement, reset, read, sync offline records. The checks
themselves run in usage.lua and usage_sync.lua."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meter_grpc.domain import ids, periods
from meter_grpc.domain.clock import Clock
from meter_grpc.domain.errors import (
    FieldViolation,
    MeterError,
    Reason,
    not_found,
    request_id_reused,
)
from meter_grpc.domain.models import (
    MeterUsage,
    OverageStrategy,
    RecordOutcome,
    RecordResult,
    ReservationAnswer,
    SyncResult,
    Usage,
    UsageEvent,
    UsageRecord,
    UsageResetInterval,
    overage_ceiling,
)
from meter_grpc.domain.ports import ReservationResult, UsageResult, UsageStatus
from meter_grpc.domain.rules import (
    MAX_AMOUNT,
    MAX_COUNTER,
    MAX_SYNC_RECORDS,
    Violations,
    is_minted_id,
)
from meter_grpc.domain.watching import DEFAULT_WATCH_MAX, DEFAULT_WATCH_PER_KEY, WatchHub

if TYPE_CHECKING:
    from meter_grpc.domain.ports import Store


# SyncUsage reports at most this many bad fields (the rest are summarized in the message), so
# that the error's details stay well inside gRPC's trailing-metadata size limit.
MAX_REPORTED_VIOLATIONS = 20
_OUTCOMES = {"APPLIED": RecordOutcome.APPLIED, "DUPLICATE": RecordOutcome.DUPLICATE}


def _n(v: int | None) -> str:
    return "unlimited" if v is None else str(v)


_EVENT_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_U64_MAX = 2**64 - 1


def is_event_id(value: str) -> bool:
    """A Redis stream id `<ms>-<seq>`: two decimal numbers, each at most 2^64-1 (bounded
    parsing: at most 41 ASCII characters, no exception for any input)."""
    m = _EVENT_ID.fullmatch(value) if len(value) <= 41 else None
    return m is not None and int(m[1]) <= _U64_MAX and int(m[2]) <= _U64_MAX


_PENDING = MeterError(Reason.INVALID_ARGUMENT, "not answered")  # a slot filled after the replies

# BatchIncrementUsage: items per call.
MAX_BATCH_ITEMS = 1000
# StreamUsage: requests of one stream in flight at once (read, not yet answered).
STREAM_WINDOW = 256


@dataclass(frozen=True, slots=True)
class Increment:
    """One item of a batch: the arguments of one IncrementUsage."""

    license_id: str
    amount: int = 0
    request_id: str = ""
    meter: str = ""


# Reservations: ttl bounds and default, open reservations per license (default of
# METER_MAX_RESERVATIONS_PER_LICENSE).
MIN_RESERVATION_TTL_MS = 1000
MAX_RESERVATION_TTL_MS = 7 * 24 * 3600 * 1000  # = storage.scripts.MAX_RESERVATION_TTL_MS
DEFAULT_RESERVATION_TTL_MS = 600_000
DEFAULT_MAX_RESERVATIONS = 1000

# The position before every event of a stream: reading after it starts with the oldest one.
OLDEST_EVENT_ID = "0-0"


class Metering:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        watch_per_key: int = DEFAULT_WATCH_PER_KEY,
        watch_max: int = DEFAULT_WATCH_MAX,
        max_reservations: int = DEFAULT_MAX_RESERVATIONS,
    ) -> None:
        self.store = store
        self.clock = clock
        # Open reservations a license may hold (METER_MAX_RESERVATIONS_PER_LICENSE).
        self.max_reservations = max_reservations
        # One store reader per watched license, and the caps on WatchUsage streams.
        self.hub = WatchHub(store, per_key=watch_per_key, total=watch_max)
        # Tasks in watch(): stopped by close() before the store closes under them.
        self._watchers: set[asyncio.Task[Any]] = set()

    async def close(self, timeout_s: float = 5.0) -> None:
        """Ends every watch() still running (a shutdown) and its store readers, and waits for
        them to end."""
        watchers = [t for t in self._watchers if not t.done()]
        for task in watchers:
            task.cancel()
        if watchers:
            await asyncio.wait(watchers, timeout=timeout_s)
        await self.hub.close(timeout_s)

    async def increment(
        self,
        license_id: str,
        amount: int,
        request_id: str = "",
        *,
        field_prefix: str = "",
        meter: str = "",
    ) -> Usage:
        """`field_prefix` names the message of the arguments in a bad-input error (a batch
        item: "items[3]."). `meter`: a meter of the license's policy ("" = its own counter)."""
        return await self._run("inc", license_id, amount, request_id, field_prefix, meter)

    async def batch_increment(self, items: Sequence[Increment]) -> list[Usage | Exception]:
        """Each item answered as increment() would answer it: its Usage, or the exception it
        raised (a MeterError; anything else is a bug the caller logs), in the order of `items`.

        (Which licenses the caller may touch is checked before: api/auth.py.) Every item's script call is issued before any
        reply is awaited, in item order: the transport writes them in that order on the one
        pipelined connection of each node, so the items of one license apply in order while
        those of different licenses (and nodes) are in flight together.
        """
        if len(items) > MAX_BATCH_ITEMS:
            v = Violations()
            v.add(
                "items",
                f"must have at most {MAX_BATCH_ITEMS} items per call (got {len(items)}); "
                "send the rest in further calls",
            )
            v.raise_if_any()

        if len({item.license_id for item in items}) < len(items):
            await self.prepare_ordered()  # one license's items must apply in item order
        now = self.clock.now_ms()  # one moment for the whole batch
        bounds = periods.period_bounds_arg(now)
        out: list[Usage | Exception] = []
        # (index, license_id, amount, request_id, meter)
        sent: list[tuple[int, str, int, str, str]] = []
        calls: list[Coroutine[Any, Any, UsageResult]] = []
        for i, item in enumerate(items):
            try:
                amount = _checked(
                    item.license_id, item.amount, item.request_id, f"items[{i}].", item.meter
                )
            except MeterError as err:
                out.append(err)
                continue
            out.append(_PENDING)
            sent.append((i, item.license_id, amount, item.request_id, item.meter))
            calls.append(
                self.store.usage(
                    item.license_id,
                    "inc",
                    amount=amount,
                    request_id=item.request_id,
                    now_ms=now,
                    periods=bounds,
                    meter=item.meter,
                )
            )
        # gather starts one task per call, in item order; each runs up to its store write
        # before the next one starts.
        replies = await asyncio.gather(*calls, return_exceptions=True)
        for (i, license_id, amount, request_id, meter), reply in zip(sent, replies, strict=True):
            if isinstance(reply, BaseException):
                if not isinstance(reply, Exception):
                    raise reply  # cancellation
                out[i] = reply
                continue
            try:
                out[i] = _answer(reply, license_id, amount, request_id, meter)
            except MeterError as err:
                out[i] = err
        return out

    async def prepare_ordered(self) -> None:
        """Before issuing calls of one license back to back (a stream, a batch): loads
        usage.lua on every node, so that none of those calls is re-sent after a NOSCRIPT and
        overtaken by the ones behind it. Best effort: if the store is down, each call fails
        on its own."""
        try:
            await self.store.load_usage_script()
        except MeterError:
            pass

    async def decrement(
        self, license_id: str, amount: int, request_id: str = "", meter: str = ""
    ) -> Usage:
        return await self._run("dec", license_id, amount, request_id, meter=meter)

    async def reset(self, license_id: str, request_id: str = "", meter: str = "") -> Usage:
        return await self._run("reset", license_id, 0, request_id, meter=meter)

    async def get(self, license_id: str, meter: str = "") -> Usage:
        return await self._run("get", license_id, 0, "", meter=meter)

    async def list_usage(self, license_id: str) -> list[MeterUsage]:
        """Every counter of a license: its own ("" first), then each meter of its policy, as
        a reader sees them now (a counter whose period has ended reads 0)."""
        v = Violations()
        v.identifier("license_id", license_id)
        v.raise_if_any()
        lic = await self.store.get_license(license_id)
        if lic is None:
            raise not_found(Reason.LICENSE_NOT_FOUND, "license", license_id)
        now = self.clock.now_ms()
        if lic.reserved or any(r for _, _, r in lic.meter_counters.values()):
            # holds are open: a read through usage.lua releases the expired ones first
            await self.store.usage(
                license_id,
                "get",
                amount=1,
                request_id="",
                now_ms=now,
                periods=periods.period_bounds_arg(now),
            )
            lic = await self.store.get_license(license_id)
            if lic is None:
                raise not_found(Reason.LICENSE_NOT_FOUND, "license", license_id)

        def usage(
            uses: int,
            start: int,
            reserved: int,
            limit: int | None,
            overage: OverageStrategy,
            interval: UsageResetInterval,
        ) -> Usage:
            bounds = periods.period_bounds(now, interval)
            return Usage(
                periods.uses_in_current_period(uses, start, now, interval),
                limit,
                overage_ceiling(limit, overage),
                bounds[1] if bounds else None,
                reserved=reserved,
            )

        p = lic.policy
        out = [
            MeterUsage(
                "",
                usage(
                    lic.uses,
                    lic.period_start_ms,
                    lic.reserved,
                    lic.max_uses,
                    p.overage_strategy,
                    p.usage_reset_interval,
                ),
            )
        ]
        for m in p.meters:
            uses, start, reserved = lic.meter_counters.get(m.code, (0, 0, 0))
            out.append(
                MeterUsage(
                    m.code,
                    usage(
                        uses,
                        start,
                        reserved,
                        lic.meter_max_uses(m),
                        m.overage_strategy,
                        m.usage_reset_interval,
                    ),
                    lic.meter_entitled(m),
                )
            )
        return out

    async def reserve(
        self,
        license_id: str,
        amount: int,
        *,
        meter: str = "",
        ttl_ms: int = 0,
        request_id: str = "",
    ) -> ReservationAnswer:
        """Holds `amount` (0 means 1) of a counter for `ttl_ms` (0: DEFAULT_RESERVATION_TTL_MS)."""
        v = Violations()
        v.identifier("license_id", license_id)
        v.meter("meter", meter)
        v.amount("amount", amount)
        v.request_id("request_id", request_id)
        if ttl_ms and not MIN_RESERVATION_TTL_MS <= ttl_ms <= MAX_RESERVATION_TTL_MS:
            v.add("ttl", "must be 1 second to 7 days (unset: 10 minutes)")
        v.raise_if_any()
        amount = amount or 1
        now = self.clock.now_ms()
        result = await self.store.reservation(
            license_id,
            "reserve",
            [
                meter,
                amount,
                ttl_ms or DEFAULT_RESERVATION_TTL_MS,
                ids.new_id(),
                self.max_reservations,
            ],
            request_id=request_id,
            now_ms=now,
            periods=periods.period_bounds_arg(now),
        )
        return self._reservation_answer(result, license_id, amount, request_id, meter)

    async def commit(
        self, license_id: str, reservation_id: str, amount: int = 0, request_id: str = ""
    ) -> ReservationAnswer:
        """Moves `amount` (0: all held) of a reservation into uses and frees the rest."""
        return await self._close("commit", license_id, reservation_id, amount, request_id)

    async def release(
        self, license_id: str, reservation_id: str, request_id: str = ""
    ) -> ReservationAnswer:
        return await self._close("release", license_id, reservation_id, 0, request_id)

    async def _close(
        self, op: str, license_id: str, reservation_id: str, amount: int, request_id: str
    ) -> ReservationAnswer:
        v = Violations()
        v.identifier("license_id", license_id)
        if not reservation_id:
            v.add("reservation_id", "is required")
        elif not is_minted_id(reservation_id):
            v.add("reservation_id", "must be a Reservation.id returned by ReserveUsage")
        if op == "commit":
            if amount < 0:
                v.add("amount", "must not be negative (0 means all of it)")
            elif amount > MAX_AMOUNT:
                v.add("amount", f"must be at most 2^50 ({MAX_AMOUNT})")
        v.request_id("request_id", request_id)
        v.raise_if_any()
        now = self.clock.now_ms()
        args: list[object] = [reservation_id, amount] if op == "commit" else [reservation_id]
        result = await self.store.reservation(
            license_id,
            op,
            args,
            request_id=request_id,
            now_ms=now,
            periods=periods.period_bounds_arg(now),
        )
        return self._reservation_answer(result, license_id, amount, request_id, "")

    def _reservation_answer(
        self, result: ReservationResult, license_id: str, amount: int, request_id: str, meter: str
    ) -> ReservationAnswer:
        status, answer = result.status.name, result.answer
        r = answer.reservation
        meter = meter or r.meter
        if status == "OK":
            return answer
        meta = {"license_id": license_id}
        if r.id and status not in ("OK",):
            meta["reservation_id"] = r.id
        if status == "RESERVATION_NOT_FOUND":
            raise MeterError(
                Reason.RESERVATION_NOT_FOUND,
                f"license {license_id!r} has no reservation {r.id!r} (never made, or its "
                "record has passed its retention)",
                metadata=meta,
            )
        if status == "RESERVATION_EXPIRED":
            state = r.state.name.lower()
            why = {
                "expired": "expired (released by itself at its expire_time): nothing was counted",
                "committed": "was committed already",
                "released": "was released already",
            }.get(state, "is closed")
            raise MeterError(
                Reason.RESERVATION_EXPIRED,
                f"reservation {r.id!r} {why}",
                metadata={**meta, "state": state, "expire_time_ms": str(r.expire_time_ms)},
            )
        if status == "AMOUNT_ABOVE_HELD":
            raise MeterError(
                Reason.INVALID_ARGUMENT,
                f"amount {amount} is more than the {r.amount} units the reservation holds",
                metadata={**meta, "field": "amount", "held": str(r.amount)},
                violations=(
                    FieldViolation("amount", f"must be at most the amount held ({r.amount})"),
                ),
            )
        if status == "RESERVATION_LIMIT_EXCEEDED":
            raise MeterError(
                Reason.RESERVATION_LIMIT_EXCEEDED,
                f"the license holds {result.open} open reservations, the most this server "
                "allows (METER_MAX_RESERVATIONS_PER_LICENSE); commit or release some first",
                metadata={
                    **meta,
                    "limit": str(self.max_reservations),
                    "open_reservations": str(result.open),
                    "setting": "METER_MAX_RESERVATIONS_PER_LICENSE",
                },
                quota_subject=f"license:{license_id}:reservations",
            )
        usage = UsageResult(UsageStatus[status], answer.usage.usage)
        # raises for any status but OK
        _answer(usage, license_id, amount, request_id, meter, reservation=True)
        raise AssertionError(f"unknown reservation status {status}")

    async def watch(
        self,
        license_id: str,
        after_event_id: str = "",
        *,
        from_oldest: bool = False,
        meter: str | None = None,
        subscribed: Callable[[], Awaitable[None]] | None = None,
        key_license_id: str = "",
    ) -> AsyncIterator[UsageEvent]:
        """Usage events of a license as they happen (domain/watching.py: one store reader per
        watched license, shared by its watchers). `meter`: only the events of that meter
        ("" the license's own counter); None: all.

        Starts after `after_event_id` ("0-0": before the first one), with the oldest retained
        event (`from_oldest`), or else with the first event made after the subscription is in
        place. `subscribed` is awaited once the read position is fixed, before any event is
        read: every change made after it returns is delivered (the API sends the response
        headers there). Ends with LICENSE_NOT_FOUND when the license is deleted while being
        watched. `key_license_id`: the license of the calling license key ("" for an admin),
        whose streams are capped (WATCH_LIMIT_EXCEEDED).
        """
        v = Violations()
        v.identifier("license_id", license_id)
        if after_event_id and not is_event_id(after_event_id):
            v.add(
                "after_event_id",
                'must be an event_id of an earlier UsageEvent ("<ms>-<seq>", each at most '
                '2^64-1), or "0-0"',
            )
        if after_event_id and from_oldest:
            v.add(
                "from_oldest",
                "must not be set together with after_event_id: set one of them "
                '(from_oldest reads like after_event_id "0-0")',
            )
        if meter:
            v.meter("meter", meter)
        v.raise_if_any()
        if self.store.event_retention == 0:
            raise MeterError(
                Reason.USAGE_EVENTS_DISABLED,
                "this server keeps no usage events (METER_EVENT_RETENTION=0): WatchUsage has "
                "nothing to deliver; read the counter with GetUsage",
                metadata={"license_id": license_id, "event_retention": "0"},
            )
        self.hub.acquire(key_license_id, license_id)
        task = asyncio.current_task()
        if task is not None:
            self._watchers.add(task)
        try:
            if not await self.store.license_exists(license_id):
                raise not_found(Reason.LICENSE_NOT_FOUND, "license", license_id)
            newest = await self.store.last_event_id(license_id)
            after = OLDEST_EVENT_ID if from_oldest else (after_event_id or newest)
            if subscribed is not None:
                await subscribed()
            watched = self.hub.events(license_id, after, newest, from_oldest=from_oldest)
            async with contextlib.aclosing(watched) as events:
                async for event in events:
                    if meter is None or event.meter == meter:
                        yield event
        finally:
            self._watchers.discard(task)
            self.hub.release(key_license_id, license_id)

    async def sync(self, license_id: str, records: Sequence[UsageRecord]) -> SyncResult:
        """Applies offline records in order, each at most once by id, in one atomic script run.

        Every record is validated before anything reaches Redis; the answers come back per
        record (APPLIED, DUPLICATE, or REJECTED with a reason), never as a call failure.
        """
        v = Violations()
        v.identifier("license_id", license_id)
        if len(records) > MAX_SYNC_RECORDS:
            v.add(
                "records",
                f"must have at most {MAX_SYNC_RECORDS} records per call (got {len(records)}); "
                "send the rest in further calls",
            )
        else:
            for i, r in enumerate(records):
                v.record_id(f"records[{i}].id", r.id)
                v.amount(f"records[{i}].amount", r.amount)
                v.timestamp(f"records[{i}].occur_time", r.occur_time_ms)
                v.meter(f"records[{i}].meter", r.meter)
                if len(v.items) >= MAX_REPORTED_VIOLATIONS:
                    break
        v.raise_if_any()
        now = self.clock.now_ms()
        result = await self.store.sync_usage(
            license_id,
            [(r.id, r.amount or 1, r.meter) for r in records],
            now_ms=now,
            periods=periods.period_bounds_arg(now),
        )
        if result is None:
            raise not_found(Reason.LICENSE_NOT_FOUND, "license", license_id)
        uses, codes = result
        return SyncResult(
            results=[
                RecordResult(r.id, _OUTCOMES[code])
                if code in _OUTCOMES
                else RecordResult(r.id, RecordOutcome.REJECTED, code)
                for r, code in zip(records, codes, strict=True)
            ],
            uses=uses,
        )

    async def _run(
        self,
        op: str,
        license_id: str,
        amount: int,
        request_id: str,
        field_prefix: str = "",
        meter: str = "",
    ) -> Usage:
        amount = _checked(license_id, amount, request_id, field_prefix, meter)
        now = self.clock.now_ms()
        result = await self.store.usage(
            license_id,
            op,
            amount=amount,
            request_id=request_id,
            now_ms=now,
            periods=periods.period_bounds_arg(now),
            meter=meter,
        )
        return _answer(result, license_id, amount, request_id, meter)


def _checked(
    license_id: str, amount: int, request_id: str, field_prefix: str, meter: str = ""
) -> int:
    """The amount to apply (0 means 1); INVALID_ARGUMENT naming each bad field."""
    if not request_id and not meter and 0 <= amount <= MAX_AMOUNT and is_minted_id(license_id):
        return amount or 1  # the common call, valid: no Violations to build
    v = Violations()
    v.identifier(f"{field_prefix}license_id", license_id)
    v.amount(f"{field_prefix}amount", amount)
    v.request_id(f"{field_prefix}request_id", request_id)
    v.meter(f"{field_prefix}meter", meter)
    v.raise_if_any()
    return amount or 1


def meter_not_found(license_id: str, meter: str) -> MeterError:
    return MeterError(
        Reason.METER_NOT_FOUND,
        f"the policy of license {license_id!r} has no meter {meter!r}",
        metadata={"license_id": license_id, "meter": meter},
    )


def _answer(
    result: UsageResult,
    license_id: str,
    amount: int,
    request_id: str,
    meter: str = "",
    *,
    reservation: bool = False,
) -> Usage:
    """The Usage of a usage.lua answer, or the MeterError of its status. `reservation`: the
    answer of a reservation script (USAGE_LIMIT_EXCEEDED then always names `reserved`)."""
    if result.status == 0:  # UsageStatus.OK, compared as the integer it is
        return result.usage
    status, usage = result.status.name, result.usage
    meta = {"license_id": license_id, "uses": str(usage.uses)}
    if meter:
        meta["meter"] = meter
    if status == "LICENSE_NOT_FOUND":
        raise not_found(Reason.LICENSE_NOT_FOUND, "license", license_id)
    if status == "METER_NOT_FOUND":
        raise meter_not_found(license_id, meter)
    if status == "METER_NOT_ENTITLED":
        raise MeterError(
            Reason.METER_NOT_ENTITLED,
            f"meter {meter!r} requires an entitlement the license does not hold",
            metadata=meta,
        )
    if status == "USAGE_LIMIT_EXCEEDED":
        limit = usage.overage_limit if usage.overage_limit is not None else MAX_COUNTER
        what = f"meter {meter}" if meter else "the usage limit"
        held = f", {usage.reserved} reserved" if usage.reserved else ""
        extra = {"reserved": str(usage.reserved)} if usage.reserved or reservation else {}
        raise MeterError(
            Reason.USAGE_LIMIT_EXCEEDED,
            f"using {amount} more would pass {what}: {usage.uses} used{held} of "
            f"{_n(usage.max_uses)} (granted up to {limit})",
            metadata={
                **meta,
                "limit": str(usage.max_uses if usage.max_uses is not None else limit),
                "overage_limit": str(limit),
                "requested": str(amount),
                "remaining": str(max(0, limit - usage.uses - usage.reserved)),
                **extra,
            },
            quota_subject=f"license:{license_id}" + (f":meter:{meter}" if meter else ""),
        )
    if status == "USAGE_UNDERFLOW":
        raise MeterError(
            Reason.USAGE_UNDERFLOW,
            f"cannot decrement by {amount}: usage is {usage.uses}",
            metadata={**meta, "requested": str(amount)},
        )
    if status == "LICENSE_SUSPENDED":
        raise MeterError(Reason.LICENSE_SUSPENDED, "the license is suspended", metadata=meta)
    if status == "LICENSE_EXPIRED":
        raise MeterError(Reason.LICENSE_EXPIRED, "the license has expired", metadata=meta)
    if status == "REQUEST_ID_REUSED":
        raise request_id_reused(request_id, license_id=license_id)
    raise AssertionError(f"unknown usage status {status}")
