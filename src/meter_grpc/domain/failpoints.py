"""Failpoints: named places between the steps of multi-step operations where a test makes the
process fail, to prove that every step boundary leaves a state that is right or repairs itself.

Off unless configured (METER_FAILPOINTS, e.g. "create_license.attached=kill"); an unarmed
failpoint costs one dict lookup. Actions:
- kill: SIGKILL this process, as a crash would (nothing after it runs, not even cleanup);
- raise: fail the operation there as an unreachable store would (outcome unknown);
- hang: stop there until the call is cancelled (a deadline, a shutdown).
"""

from __future__ import annotations

import asyncio
import os
import signal

from meter_grpc.domain.errors import MeterError, Reason

ACTIONS = ("kill", "raise", "hang")
_armed: dict[str, str] = {}


def parse(spec: str) -> dict[str, str]:
    """ "name=action,name2=action2" -> {name: action}; ValueError naming what is wrong."""
    points: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, action = item.partition("=")
        if not sep or not name or action not in ACTIONS:
            raise ValueError(f"{item!r} is not name=action with action one of {ACTIONS}")
        points[name.strip()] = action
    return points


def arm(points: dict[str, str]) -> None:
    """Replaces the armed failpoints (an empty dict disarms them all)."""
    _armed.clear()
    _armed.update(points)


async def hit(name: str) -> None:
    action = _armed.get(name)
    if action is None:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "hang":
        await asyncio.Event().wait()
    raise MeterError(
        Reason.STORAGE_UNAVAILABLE,
        f"failpoint {name}",
        metadata={"outcome": "unknown", "failpoint": name},
        retry_after_ms=100,
    )
