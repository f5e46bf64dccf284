"""Time as integer milliseconds since the Unix epoch.

Scripts receive the current time as an argument, so a test can move a ManualClock and see
expiry, heartbeats and usage periods change without sleeping.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int: ...


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class ManualClock:
    """A clock that follows the system clock shifted by `offset_ms`, or stands at `fixed_ms`."""

    def __init__(self, offset_ms: int = 0, fixed_ms: int | None = None) -> None:
        self.offset_ms = offset_ms
        self.fixed_ms = fixed_ms

    def now_ms(self) -> int:
        if self.fixed_ms is not None:
            return self.fixed_ms
        return time.time_ns() // 1_000_000 + self.offset_ms

    def advance(self, ms: int) -> None:
        if self.fixed_ms is not None:
            self.fixed_ms += ms
        else:
            self.offset_ms += ms

    def set(self, ms: int | None) -> None:
        self.fixed_ms = ms
