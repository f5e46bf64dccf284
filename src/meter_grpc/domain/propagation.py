"""A policy change reaches every license of the policy, whatever happens.

Each license keeps a copy of its policy's limits (its scripts read only its own keys: one
cluster slot), so a policy change must be copied into every license. This follows the
Kubernetes controller model: the policy's `revision` is its generation, each license records
the revision it follows (`p_rev`), and the policy's `propagated_revision` says which revision
every license follows. A change is marked pending (with a token) *before* the policy changes;
the mark is dropped only once every license follows the change. The loop here, on every
replica, is level-triggered: it picks up any pending mark (a change whose UpdatePolicy was
cancelled, timed out, killed, or hit a store outage), takes the policy's lease so that replicas
do not duplicate the work, and completes the propagation. Copying is idempotent (a license
never goes back to an older revision), so two copies racing is harmless, only wasteful.

A license being created while its policy changes: if the copy reaches it before it exists, the
revision waits in the license's mailbox, which the create applies (license_create.lua).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from typing import TYPE_CHECKING

from meter_grpc.domain import failpoints, ids
from meter_grpc.domain.errors import MeterError
from meter_grpc.domain.models import Policy
from meter_grpc.tasks import cancel_and_wait

if TYPE_CHECKING:
    from meter_grpc.domain.ports import Store

log = logging.getLogger(__name__)

BATCH = 200  # licenses copied concurrently
LEASE_MS = 6_000
INTERVAL_S = 1.0
# A pending mark this recent belongs to an UpdatePolicy that is most likely still at work.
SETTLE_MS = 1_500
# An id whose record is missing this long after it was minted belongs to a create or delete
# that was cut short: its index entries point nowhere for good. Creates write their record
# within CREATE_WINDOW_MS of minting the id or not at all; the rest is margin for clock skew
# between replicas.
CREATE_WINDOW_MS = 30_000
GHOST_AFTER_MS = 120_000


def is_ghost(id_: str, state: int) -> bool:
    """Whether an index entry is a ghost: its record is missing and will never be written.
    `state`: 1 the record exists, -1 it was deleted (a tombstone), 0 neither."""
    if state != 0:
        return state < 0
    minted = ids.minted_ms(id_)
    return minted is None or ids.wall_ms() - minted > GHOST_AFTER_MS


def new_token() -> str:
    return f"{ids.wall_ms()}:{secrets.token_hex(8)}"


def _token_ms(token: str) -> int:
    head = token.partition(":")[0]
    return int(head) if head.isdigit() else 0


class Propagator:
    def __init__(self, store: Store, owner: str = "") -> None:
        self.store = store
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._tasks: dict[str, asyncio.Task[int]] = {}

    async def changed(self, policy_id: str) -> int:
        """Copies the policy's latest revision into every license and returns it. The copy runs
        in a task of its own: a cancelled call (deadline, shutdown) does not stop it."""
        task = self._tasks.get(policy_id)
        if task is None or task.done():
            task = asyncio.ensure_future(self._propagate(policy_id))
            self._tasks[policy_id] = task
            task.add_done_callback(lambda t: self._forget(policy_id, t))
        return await asyncio.shield(task)

    def _forget(self, policy_id: str, task: asyncio.Task[int]) -> None:
        if self._tasks.get(policy_id) is task:
            del self._tasks[policy_id]
        if not task.cancelled() and task.exception() is not None:
            log.debug("propagation of policy %s failed: %s", policy_id, task.exception())

    async def _propagate(self, policy_id: str) -> int:
        """Until every license follows the latest revision: returns it (0: policy deleted)."""
        held = await self.store.lease(policy_id, self.owner, LEASE_MS, renew=False)
        try:
            while True:
                p = await self.store.get_policy(policy_id)
                if p is None:
                    return 0
                if p.propagated_revision < p.revision:
                    await self._copy(p)
                rev = await self.store.policy_propagated(policy_id, p.revision)
                if rev == p.revision:
                    return rev
                # changed again meanwhile: copy the newer revision too
        finally:
            if held:
                with contextlib.suppress(MeterError):
                    await self.store.release_lease(policy_id, self.owner)

    async def _copy(self, p: Policy) -> None:
        after = ""
        renewed = ids.wall_ms()
        while True:
            page = await self.store.list_license_ids(p.id, after, BATCH)
            if not page:
                return
            await asyncio.gather(*(self._follow(lid, p) for lid in page))
            await failpoints.hit("propagate.page")
            after = page[-1]
            if ids.wall_ms() - renewed > LEASE_MS // 3:
                await self.store.lease(p.id, self.owner, LEASE_MS, renew=True)
                renewed = ids.wall_ms()

    async def _follow(self, license_id: str, p: Policy) -> None:
        minted = ids.minted_ms(license_id)
        young = minted is not None and ids.wall_ms() - minted <= GHOST_AFTER_MS
        # A license not written yet may still be being created: leave it the revision.
        await self.store.follow_policy(license_id, p, GHOST_AFTER_MS if young else 0)

    # --- the loop every replica runs ------------------------------------------------------

    async def run(self, interval_s: float = INTERVAL_S) -> None:
        """Completes every pending propagation, forever; store errors are retried."""
        failing = False
        while True:
            try:
                await self.reconcile()
                failing = False
            except MeterError as exc:
                if not failing:
                    log.warning("policy propagation paused: %s", exc.message)
                failing = True
            await asyncio.sleep(interval_s)

    async def reconcile(self) -> int:
        """One pass over the pending marks; returns how many propagations it completed."""
        done = 0
        for policy_id, token in (await self.store.pending_policies()).items():
            if policy_id in self._tasks or ids.wall_ms() - _token_ms(token) < SETTLE_MS:
                continue
            if not await self.store.lease(policy_id, self.owner, LEASE_MS, renew=False):
                continue  # another replica is at it
            rev = await self.changed(policy_id)
            p = await self.store.get_policy(policy_id)
            if p is None or p.propagated_revision >= p.revision:
                await self.store.clear_pending(policy_id, token)
            if rev:
                log.info("policy %s: revision %d reached every license", policy_id, rev)
            done += 1
        return done

    async def close(self) -> None:
        """Stops the propagations running here (another replica, or the next start, resumes
        them from their pending marks)."""
        await cancel_and_wait(list(self._tasks.values()))
