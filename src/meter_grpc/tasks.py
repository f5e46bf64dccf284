"""Ending background tasks for good.

Python 3.11's `asyncio.wait_for` can swallow a cancellation that arrives as the awaited call
completes (CPython gh-86296, fixed in 3.12): the task then goes on as if never cancelled, and
a shutdown that awaits it once waits for ever. Loops here time out with `asyncio.timeout`,
which does not, and shutdowns end their tasks with `cancel_and_wait`, which cancels again
until the task is done.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any

RECANCEL_S = 0.5  # a task still running this long after its cancel is cancelled again


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancels `tasks` and waits until every one is done, cancelling again any that goes on;
    their results and exceptions are dropped."""
    every = list(tasks)
    pending = {t for t in every if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_S)
    for task in every:
        if not task.cancelled():
            with contextlib.suppress(BaseException):
                task.exception()  # retrieved: no "never retrieved" warning
