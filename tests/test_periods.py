"""Calendar periods in UTC (pure functions; the scripts get them as arguments)."""

from __future__ import annotations

import datetime as dt

from meter_grpc.domain.models import UsageResetInterval as R
from meter_grpc.domain.periods import all_period_bounds, period_bounds


def ms(*args: int) -> int:
    return int(dt.datetime(*args, tzinfo=dt.UTC).timestamp() * 1000)  # type: ignore[misc]


def test_bounds_of_each_interval() -> None:
    now = ms(2024, 2, 29, 13, 45)  # a Thursday in a leap year
    assert period_bounds(now, R.DAILY) == (ms(2024, 2, 29), ms(2024, 3, 1))
    assert period_bounds(now, R.WEEKLY) == (ms(2024, 2, 26), ms(2024, 3, 4))
    assert period_bounds(now, R.MONTHLY) == (ms(2024, 2, 1), ms(2024, 3, 1))
    assert period_bounds(now, R.YEARLY) == (ms(2024, 1, 1), ms(2025, 1, 1))
    assert period_bounds(now, R.NONE) is None
    assert period_bounds(now, R.UNSPECIFIED) is None


def test_december_rolls_into_next_year() -> None:
    assert period_bounds(ms(2025, 12, 31, 23, 59), R.MONTHLY) == (ms(2025, 12, 1), ms(2026, 1, 1))


def test_boundaries_are_half_open() -> None:
    assert period_bounds(ms(2024, 3, 1), R.DAILY) == (ms(2024, 3, 1), ms(2024, 3, 2))
    assert period_bounds(ms(2024, 3, 1) - 1, R.DAILY) == (ms(2024, 2, 29), ms(2024, 3, 1))


def test_all_bounds_follow_the_clock_across_days() -> None:
    a = all_period_bounds(ms(2024, 2, 29, 23, 59))
    b = all_period_bounds(ms(2024, 3, 1, 0, 0))
    assert a[:2] == [ms(2024, 2, 29), ms(2024, 3, 1)]
    assert b[:2] == [ms(2024, 3, 1), ms(2024, 3, 2)]
    assert b[4:6] == [ms(2024, 3, 1), ms(2024, 4, 1)]
    assert all_period_bounds(ms(2024, 2, 29, 1)) == a
