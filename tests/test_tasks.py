"""tasks.cancel_and_wait: a shutdown ends its tasks even when one swallows a cancellation, as
Python 3.11's asyncio.wait_for can (a session teardown once waited for ever on the server's
storage probe)."""

from __future__ import annotations

import asyncio

from meter_grpc.tasks import RECANCEL_S, cancel_and_wait


async def test_a_task_that_swallows_its_cancellation_is_cancelled_again() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                swallowed += 1
                if swallowed == 2:
                    raise
                asyncio.current_task().uncancel()  # type: ignore[union-attr]

    async def failing() -> None:
        raise RuntimeError("dropped, never 'never retrieved'")

    tasks = [asyncio.create_task(stubborn()), asyncio.create_task(failing())]
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await cancel_and_wait(tasks)
    assert all(t.done() for t in tasks) and swallowed == 2
    assert loop.time() - began < RECANCEL_S * 4


async def test_done_and_empty() -> None:
    await cancel_and_wait([])
    done = asyncio.create_task(asyncio.sleep(0))
    await done
    await cancel_and_wait([done])
    assert done.done() and not done.cancelled()
