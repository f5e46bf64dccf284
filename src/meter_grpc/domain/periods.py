"""Calendar usage periods in UTC (days, ISO weeks starting Monday, months, years)."""

from __future__ import annotations

import datetime as dt

from meter_grpc.domain.models import License, UsageResetInterval

_UTC = dt.UTC


def _ms(t: dt.datetime) -> int:
    return int(t.timestamp()) * 1000


def period_bounds(now_ms: int, interval: UsageResetInterval) -> tuple[int, int] | None:
    """[start, end) of the period containing `now_ms`, or None when usage never resets."""
    now = dt.datetime.fromtimestamp(now_ms // 1000, _UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if interval == UsageResetInterval.DAILY:
        return _ms(day), _ms(day + dt.timedelta(days=1))
    if interval == UsageResetInterval.WEEKLY:
        start = day - dt.timedelta(days=day.weekday())
        return _ms(start), _ms(start + dt.timedelta(days=7))
    if interval == UsageResetInterval.MONTHLY:
        start = day.replace(day=1)
        end = (
            start.replace(year=start.year + 1, month=1)
            if start.month == 12
            else start.replace(month=start.month + 1)
        )
        return _ms(start), _ms(end)
    if interval == UsageResetInterval.YEARLY:
        start = day.replace(month=1, day=1)
        return _ms(start), _ms(start.replace(year=start.year + 1))
    return None


RESETTING_INTERVALS = (
    UsageResetInterval.DAILY,
    UsageResetInterval.WEEKLY,
    UsageResetInterval.MONTHLY,
    UsageResetInterval.YEARLY,
)


_DAY_MS = 86_400_000
_cached_day: int | None = None
_cached_bounds: list[int] = []
_cached_arg = ""


def all_period_bounds(now_ms: int) -> list[int]:
    """start, end of the current period for DAILY, WEEKLY, MONTHLY, YEARLY, flattened.

    Passed to the usage scripts, which pick the pair of the license's interval; the calendar
    arithmetic stays in Python and the clock stays an argument. Every period starts at a
    UTC midnight, so the answer is the same all day long and is computed once per day.
    """
    global _cached_day, _cached_bounds, _cached_arg
    day = now_ms // _DAY_MS
    if day != _cached_day:
        out: list[int] = []
        for interval in RESETTING_INTERVALS:
            bounds = period_bounds(now_ms, interval)
            assert bounds is not None
            out.extend(bounds)
        _cached_day, _cached_bounds, _cached_arg = day, out, ",".join(map(str, out))
    return _cached_bounds


def period_bounds_arg(now_ms: int) -> str:
    """all_period_bounds as the one comma-separated ARGV the usage scripts take."""
    all_period_bounds(now_ms)
    return _cached_arg


def uses_in_current_period(
    uses: int, period_start_ms: int, now_ms: int, interval: UsageResetInterval
) -> int:
    """The counter as the scripts would see it now: 0 once a new period has begun."""
    bounds = period_bounds(now_ms, interval)
    if bounds is None:
        return uses
    return 0 if bounds[0] > period_start_ms else uses


def as_read_now(lic: License, now_ms: int) -> License:
    """The license as a reader sees it at `now_ms`: usage of the current period (the scripts
    reset the stored counter lazily, on the next write)."""
    lic.uses = uses_in_current_period(
        lic.uses, lic.period_start_ms, now_ms, lic.policy.usage_reset_interval
    )
    return lic
