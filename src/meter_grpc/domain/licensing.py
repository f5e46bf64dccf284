"""Policies and licenses: the rules of creating, changing and deleting them."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, TypeVar

from meter_grpc.domain import failpoints, ids, masks, paging, periods, propagation
from meter_grpc.domain.clock import Clock
from meter_grpc.domain.errors import MeterError, Reason, not_found, request_id_reused
from meter_grpc.domain.keysecret import CREATE_SECRET, KeySecret, KeySecretError
from meter_grpc.domain.models import KeyHolder, License, Policy
from meter_grpc.domain.propagation import Propagator, is_ghost, new_token
from meter_grpc.domain.rules import (
    MAX_TIMESTAMP_MS,
    Violations,
    check_key,
    check_license,
    check_license_with_policy,
    check_policy,
)

if TYPE_CHECKING:
    from meter_grpc.domain.ports import CreateRecord, Store

R = TypeVar("R", Policy, License)

# The Policy attributes a caller sets (what identifies a create request, too).
POLICY_ATTRS = tuple(masks.POLICY.fields.values())
_UPDATE_RETRIES = 20
# Refusals of a create decided before anything of the license is written: its request id is
# released again (README: a refusal changes nothing).
_CREATE_REFUSALS = frozenset(
    {Reason.POLICY_NOT_FOUND, Reason.INVALID_ARGUMENT, Reason.LICENSE_KEY_TAKEN}
)


def _fingerprint(fields: dict[str, object]) -> str:
    """What identifies a create request (its idempotency key's arguments)."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _unavailable(message: str, outcome: str, **meta: str) -> MeterError:
    return MeterError(
        Reason.STORAGE_UNAVAILABLE,
        message,
        metadata={"outcome": outcome, **meta},
        retry_after_ms=100,
    )


class Licensing:
    """Policies and licenses. Creates and deletes take several steps over several cluster slots
    (the policy, the license, its key entry, the indexes); they are ordered so that the state a
    user sees is right after a crash between any two of them: every index entry is written
    before the record it points at and removed after it, readers skip entries that point
    nowhere and remove them once they are ghosts (propagation.is_ghost), and a create with a
    request_id is completed by its retry."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        secret: KeySecret,
        propagator: Propagator | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.secret = secret
        self.propagator = propagator or Propagator(store)
        # Called with the digest of every key this replica makes valid (create, rotation), so
        # the authenticator forgets that it was unknown (api/auth.py KeyCache).
        self.on_key_claimed: Callable[[str], None] = lambda digest: None

    # --- idempotent creates ---------------------------------------------------------------

    async def _bind(
        self, kind: str, request_id: str, fingerprint: str, secret: str = ""
    ) -> CreateRecord | None:
        """The id (and secret) a create uses: fresh, or, with a request_id, those of the first
        attempt, with its answer when it completed. None without a request_id."""
        if not request_id:
            return None
        record = await self.store.begin_create(kind, request_id, fingerprint, ids.new_id(), secret)
        if record is None:
            raise request_id_reused(request_id.rpartition("/")[2], kind=kind)
        return record

    async def _rebind(self, kind: str, request_id: str, old_id: str) -> str:
        """A fresh id for a create whose id can no longer be written (its window passed)."""
        fresh = ids.new_id()
        if request_id and not await self.store.rebind_create(kind, request_id, old_id, fresh):
            raise _unavailable("a retry of this create is running; retry later", "not_applied")
        return fresh

    async def _finish(self, kind: str, request_id: str, answer: R) -> R:
        await failpoints.hit(f"create_{kind}.created")
        if request_id:
            await self.store.finish_create(kind, request_id, answer)
        return answer

    # --- policies -------------------------------------------------------------------------

    async def create_policy(self, p: Policy, request_id: str = "") -> Policy:
        v = Violations()
        check_policy(v, p)
        v.request_id("request_id", request_id)
        v.raise_if_any()
        fields = {f: getattr(p, f) for f in POLICY_ATTRS}
        record = await self._bind("policy", request_id, _fingerprint(fields))
        if record is not None and isinstance(record.answer, Policy):
            return record.answer
        policy_id = record.id if record is not None else ids.new_id()
        now = self.clock.now_ms()
        for _ in range(2):
            p = dataclasses.replace(
                p, id=policy_id, create_time_ms=now, update_time_ms=now, revision=1
            )
            await self.store.index(policy_id=policy_id)
            await failpoints.hit("create_policy.indexed")
            _, created = await self.store.create_policy(
                p,
                now_ms=ids.wall_ms(),
                minted_ms=ids.minted_ms(policy_id) or 0,
                window_ms=propagation.CREATE_WINDOW_MS,
            )
            if created is not None:
                return await self._finish("policy", request_id, created)
            await self.store.unindex([policy_id], [])
            policy_id = await self._rebind("policy", request_id, policy_id)
        raise _unavailable("the create took too long; retry", "not_applied")

    async def get_policy(self, policy_id: str) -> Policy:
        v = Violations()
        v.identifier("id", policy_id)
        v.raise_if_any()
        p = await self.store.get_policy(policy_id)
        if p is None:
            raise not_found(Reason.POLICY_NOT_FOUND, "policy", policy_id)
        return p

    async def list_policies(self, page_size: int, page_token: str) -> tuple[list[Policy], str]:
        v = Violations()
        size = v.page("page_size", page_size)
        v.raise_if_any()
        after = paging.decode(page_token, "policies")
        page_ids = await self.store.list_policy_ids(after, size + 1)
        more = len(page_ids) > size
        page_ids = page_ids[:size]
        policies = await self.store.get_policies(page_ids)
        found = {p.id for p in policies}
        ghosts = [i for i in page_ids if is_ghost(i, int(i in found))]
        if ghosts:
            await self.store.unindex(ghosts, [])
        return policies, paging.encode(page_ids[-1], "policies") if more else ""

    async def update_policy(self, patch: Policy, mask: Iterable[str]) -> Policy:
        """Changes the policy, then copies it into every license; answers once all follow.

        The change is marked pending before it is made, so that if this call stops anywhere
        after it (cancelled, timed out, killed, store unreachable), the propagation loop of
        any replica completes it (domain/propagation.py)."""
        v = Violations()
        v.identifier("policy.id", patch.id)
        v.raise_if_any()
        attrs = masks.POLICY.resolve(mask).values()
        token = ""
        for _ in range(_UPDATE_RETRIES):
            current = await self.get_policy(patch.id)
            updated = dataclasses.replace(
                current, **{a: getattr(patch, a) for a in attrs}, update_time_ms=self.clock.now_ms()
            )
            v = Violations()
            check_policy(v, updated)
            v.raise_if_any()
            if not token:
                token = new_token()
                await self.store.mark_pending(patch.id, token)
                await failpoints.hit("update_policy.marked")
            rev = await self.store.update_policy(updated, current.revision)
            if rev < 0:
                raise not_found(Reason.POLICY_NOT_FOUND, "policy", patch.id)
            if rev > 0:
                await failpoints.hit("update_policy.updated")
                return await self._propagate(updated, rev, token)
        raise MeterError(
            Reason.STORAGE_UNAVAILABLE,
            "policy is being updated concurrently; retry",
            metadata={"outcome": "not_applied"},
            retry_after_ms=100,
        )

    async def _propagate(self, updated: Policy, rev: int, token: str) -> Policy:
        try:
            followed = await self.propagator.changed(updated.id)
            if followed >= rev:
                await self.store.clear_pending(updated.id, token)
        except MeterError as exc:
            if exc.reason != Reason.STORAGE_UNAVAILABLE:
                raise
            raise MeterError(
                Reason.STORAGE_UNAVAILABLE,
                f"the policy changed (revision {rev}) but not every license follows it yet; "
                "the change reaches them by itself once the store answers (GetPolicy: "
                "propagated_revision)",
                metadata={"outcome": "applied", "revision": str(rev), "propagation": "pending"},
                retry_after_ms=exc.retry_after_ms or 500,
            ) from exc
        current = await self.store.get_policy(updated.id)
        if current is None:
            raise not_found(Reason.POLICY_NOT_FOUND, "policy", updated.id)
        return current

    async def delete_policy(self, policy_id: str) -> None:
        v = Violations()
        v.identifier("id", policy_id)
        v.raise_if_any()
        n = await self.store.delete_policy(policy_id)
        if n > 0 and await self._drop_ghost_licenses(policy_id):
            n = await self.store.delete_policy(policy_id)
        if n < 0:
            raise not_found(Reason.POLICY_NOT_FOUND, "policy", policy_id)
        if n > 0:
            raise MeterError(
                Reason.POLICY_IN_USE,
                f"policy {policy_id!r} still has {n} license(s); delete them first",
                metadata={"id": policy_id, "licenses": str(n)},
            )

    async def _drop_ghost_licenses(self, policy_id: str) -> bool:
        """Removes the ids registered with a policy whose license will never exist (a create
        or delete cut short). True when every registered id was one."""
        after = ""
        while True:
            page = await self.store.list_license_ids(policy_id, after, 500)
            if not page:
                return True
            states = await self.store.license_states(page)
            await self._repair(page, states, policy_id)
            if not all(is_ghost(i, st) for i, st in zip(page, states, strict=True)):
                return False
            after = page[-1]

    async def _repair(
        self, license_ids: Sequence[str], states: Sequence[int], policy_id: str
    ) -> None:
        """Drops ghost license ids (see license_states) from the index and their policy's list."""
        ghosts = [i for i, st in zip(license_ids, states, strict=True) if is_ghost(i, st)]
        if not ghosts:
            return
        if policy_id:
            await asyncio.gather(*(self.store.detach_license(policy_id, g) for g in ghosts))
        await self.store.unindex([], ghosts)

    # --- licenses -------------------------------------------------------------------------

    async def create_license(self, lic: License, request_id: str = "") -> License:
        v = Violations()
        v.identifier("license.policy_id", lic.policy_id)
        check_license(v, lic)
        if lic.key:
            check_key(v, "license.key", lic.key)
        v.request_id("request_id", request_id)
        v.raise_if_any()
        fields = {a: getattr(lic, a) for a in (*masks.LICENSE.fields.values(), "policy_id")}
        fields["key"] = self.secret.digest(lic.key) if lic.key else ""
        # A license's request_id is scoped to its policy (the parent, as in AIP-155).
        scoped = f"{lic.policy_id}/{request_id}" if request_id else ""
        sealed = ""
        if scoped:  # the key this create uses, sealed: its replay returns it again
            sealed = self.secret.seal((lic.key or ids.new_license_key()).encode(), CREATE_SECRET)
        record = await self._bind("license", scoped, _fingerprint(fields), sealed)
        now = self.clock.now_ms()
        if record is not None and record.secret:
            lic = dataclasses.replace(lic, key=self._open_create_secret(record.secret))
        if record is not None and isinstance(record.answer, License):
            record.answer.key = lic.key
            return periods.as_read_now(record.answer, now)
        license_id = record.id if record is not None else ids.new_id()
        for _ in range(2):
            try:
                created = await self._create_license(lic, license_id, now)
            except MeterError as exc:
                if record is not None and exc.reason in _CREATE_REFUSALS:
                    # refused before the license was written: the request id stays free, as if
                    # the request had never come (a retry is decided afresh)
                    await self.store.abandon_create("license", scoped, license_id)
                raise
            if created is not None:
                created = await self._finish("license", scoped, created)
                return periods.as_read_now(created, now)
            license_id = await self._rebind("license", scoped, license_id)
        raise _unavailable("the create took too long; retry", "not_applied")

    def _open_create_secret(self, sealed: str) -> str:
        try:
            return self.secret.open(sealed, CREATE_SECRET).decode()
        except KeySecretError:
            raise MeterError(
                Reason.STORAGE_UNAVAILABLE,
                "the key of this create's first attempt cannot be read: "
                "was it stored under another server secret?",
                metadata={"outcome": "not_applied"},
                retry_after_ms=500,
            ) from None

    async def _create_license(self, lic: License, license_id: str, now: int) -> License | None:
        """Registers the id with its policy, claims its key, indexes it, then writes it: every
        entry that can point at a license exists before the license. None when the create
        window passed first (its entries are dropped again)."""
        policy = await self.store.attach_license(lic.policy_id, license_id)
        if policy is None:
            raise not_found(Reason.POLICY_NOT_FOUND, "policy", lic.policy_id)
        await failpoints.hit("create_license.attached")
        v = Violations()
        check_license_with_policy(v, lic, policy)
        if v.items:
            await self.store.detach_license(lic.policy_id, license_id)
            v.raise_if_any()
        lic = dataclasses.replace(
            lic, id=license_id, create_time_ms=now, update_time_ms=now, policy=policy
        )
        lic.key = lic.key or ids.new_license_key()
        lic.key_digest = self.secret.digest(lic.key)
        lic.sealed_file_key = self.secret.seal_file_key(license_id, lic.key)
        await self._claim_key(lic)
        await failpoints.hit("create_license.key_claimed")
        await self.store.index(license_id=license_id)
        await failpoints.hit("create_license.indexed")
        if lic.expire_time_ms is None and policy.duration_ms is not None:
            lic.expire_time_ms = now + policy.duration_ms
        bounds = periods.period_bounds(now, policy.usage_reset_interval)
        lic.period_start_ms = bounds[0] if bounds else 0
        lic.uses = lic.machines_count = lic.cores_count = 0
        status, created = await self.store.create_license(
            lic,
            now_ms=ids.wall_ms(),
            minted_ms=ids.minted_ms(license_id) or 0,
            window_ms=propagation.CREATE_WINDOW_MS,
        )
        if status == 3:
            raise MeterError(
                Reason.LICENSE_NOT_FOUND,
                f"the license this request created ({license_id}) has been deleted since",
                metadata={"id": license_id},
            )
        if created is None:  # never written, and never will be: drop what points at it
            await self.store.release_key(lic.key_digest, license_id)
            await self.store.detach_license(lic.policy_id, license_id)
            await self.store.unindex([], [license_id])
            return None
        created.key = lic.key  # only in this answer: the store holds its digest
        return created

    async def _claim_key(self, lic: License, *, field: str = "license.key") -> None:
        """Points the key at the license; takes it over from a ghost (a license that will
        never exist), else LICENSE_KEY_TAKEN (and a license being created leaves its
        policy's list)."""
        holder = await self.store.claim_key(lic.key_digest, lic.id)
        if holder and is_ghost(holder, (await self.store.license_states([holder]))[0]):
            holder = await self.store.claim_key(lic.key_digest, lic.id, ghost=holder)
        if holder:
            if field == "license.key":
                await self.store.detach_license(lic.policy_id, lic.id)
            raise MeterError(
                Reason.LICENSE_KEY_TAKEN,
                "another license has this key",
                metadata={"field": field},
            )
        self.on_key_claimed(lic.key_digest)

    async def rotate_license_key(self, license_id: str, key: str = "") -> License:
        """Gives the license a new key: the new key's entry first, then the license, then the
        old entry goes. Cut short, the old key already fails (authentication also checks that
        the license holds the key it was found by) and a retry with the same key completes."""
        v = Violations()
        v.identifier("id", license_id)
        if key:
            check_key(v, "key", key)
        v.raise_if_any()
        lic = await self.store.get_license(license_id)
        if lic is None:
            raise not_found(Reason.LICENSE_NOT_FOUND, "license", license_id)
        old = lic.key_digest
        if key and self.secret.digest(key) == old:
            lic.key = key
            return periods.as_read_now(lic, self.clock.now_ms())
        new_key = key or ids.new_license_key()
        new = dataclasses.replace(
            lic,
            key=new_key,
            key_digest=self.secret.digest(new_key),
            sealed_file_key=self.secret.seal_file_key(license_id, new_key),
        )
        await self._claim_key(new, field="key")
        await failpoints.hit("rotate_license_key.claimed")
        try:
            rotated = await self._set(
                license_id,
                {"key_digest": new.key_digest, "sealed_file_key": new.sealed_file_key},
            )
        except MeterError as err:
            if err.reason == Reason.LICENSE_NOT_FOUND:  # deleted meanwhile
                await self.store.release_key(new.key_digest, license_id)
            raise
        await failpoints.hit("rotate_license_key.updated")
        await self.store.release_key(old, license_id)
        rotated.key = new_key  # only in this answer: the store holds its digest
        return rotated

    async def get_license(self, license_id: str, field: str = "id") -> License:
        v = Violations()
        v.identifier(field, license_id)
        v.raise_if_any()
        now = self.clock.now_ms()
        read = await self.store.read_license(license_id, now)
        if read is None:
            raise not_found(Reason.LICENSE_NOT_FOUND, "license", license_id)
        return periods.as_read_now(read.license, now)

    async def _live(self, lic: License, now_ms: int) -> License:
        """Re-reads a license whose counters may still include machines that have died since
        (floating with a heartbeat): the read script removes them first."""
        if not lic.machines_can_die or lic.machines_count == 0:
            return lic
        read = await self.store.read_license(lic.id, now_ms)
        return read.license if read is not None else lic

    def file_key(self, lic: License) -> bytes:
        """SHA-256(key) of the license (the AES key of its encrypted license files), unsealed."""
        try:
            return self.secret.open_file_key(lic.id, lic.sealed_file_key)
        except KeySecretError:
            raise MeterError(
                Reason.STORAGE_UNAVAILABLE,
                "the license's file key cannot be read: was it stored under another server secret?",
                metadata={"outcome": "not_applied", "id": lic.id},
                retry_after_ms=500,
            ) from None

    def key_digest(self, key: str) -> str:
        """How a license key is indexed and stored: HMAC-SHA256 under the server secret."""
        return self.secret.digest(key)

    async def key_holder(self, digest: str) -> KeyHolder | None:
        """The license the key of this digest authenticates as, with what decides whether it
        still may (None when no license holds it)."""
        return await self.store.key_holder(digest)

    async def list_licenses(
        self, policy_id: str, page_size: int, page_token: str
    ) -> tuple[list[License], str]:
        v = Violations()
        v.identifier("policy_id", policy_id, required=False)
        size = v.page("page_size", page_size)
        v.raise_if_any()
        scope = f"licenses:{policy_id}"
        after = paging.decode(page_token, scope)
        page_ids = await self.store.list_license_ids(policy_id, after, size + 1)
        more = len(page_ids) > size
        page_ids = page_ids[:size]
        now = self.clock.now_ms()
        stored = await self.store.get_licenses(page_ids)
        found = {lic.id for lic in stored}
        missing = [i for i in page_ids if i not in found]
        if missing:
            await self._repair(missing, await self.store.license_states(missing), policy_id)
        live = await asyncio.gather(*(self._live(lic, now) for lic in stored))
        licenses = [periods.as_read_now(lic, now) for lic in live]
        return licenses, paging.encode(page_ids[-1], scope) if more else ""

    async def update_license(self, patch: License, mask: Iterable[str]) -> License:
        v = Violations()
        v.identifier("license.id", patch.id)
        check_license(v, patch)
        v.raise_if_any()
        paths = masks.LICENSE.resolve(mask)
        changes = {a: getattr(patch, a) for a in paths.values()}
        if "max_machines" in paths:
            current = await self.get_license(patch.id, "license.id")
            v = Violations()
            check_license_with_policy(v, patch, current.policy)
            v.raise_if_any()
        return await self._set(patch.id, changes)

    async def _set(self, license_id: str, changes: dict[str, object]) -> License:
        """Sets License attributes (by name) of an existing license, atomically."""
        now = self.clock.now_ms()
        lic = await self.store.update_license(license_id, changes, now)
        if lic is None:
            raise not_found(Reason.LICENSE_NOT_FOUND, "license", license_id)
        return periods.as_read_now(await self._live(lic, now), now)

    async def delete_license(self, license_id: str) -> None:
        """Deletes the license, then what points at it (its key entry, its policy's list, the
        index): a crash in between leaves entries pointing nowhere, which readers skip."""
        v = Violations()
        v.identifier("id", license_id)
        v.raise_if_any()
        deleted = await self.store.delete_license(license_id, max(propagation.GHOST_AFTER_MS, 1))
        if deleted is None:
            raise not_found(Reason.LICENSE_NOT_FOUND, "license", license_id)
        digest, policy_id = deleted
        await failpoints.hit("delete_license.deleted")
        await self.store.release_key(digest, license_id)
        await failpoints.hit("delete_license.key_released")
        await self.store.detach_license(policy_id, license_id)
        await failpoints.hit("delete_license.detached")
        await self.store.unindex([], [license_id])

    async def suspend_license(self, license_id: str) -> License:
        """Idempotent: suspending a suspended license changes nothing but update_time."""
        self._check_id(license_id)
        return await self._set(license_id, {"suspended": True})

    async def reinstate_license(self, license_id: str) -> License:
        self._check_id(license_id)
        return await self._set(license_id, {"suspended": False})

    async def renew_license(self, license_id: str) -> License:
        """Extends the expiry by the policy duration, from the current expiry, or from now when
        the license has already expired (or has no expiry), in one script."""
        self._check_id(license_id)
        now = self.clock.now_ms()
        status, lic = await self.store.renew_license(license_id, now, MAX_TIMESTAMP_MS)
        if status == 1:
            raise not_found(Reason.LICENSE_NOT_FOUND, "license", license_id)
        if status == 3:
            raise MeterError(
                Reason.LICENSE_NOT_RENEWABLE,
                "renewing would move the expiry past 9999-12-31T23:59:59Z, the latest time a "
                "google.protobuf.Timestamp holds; the license was not changed",
                metadata={"id": license_id, "max_expire_time": "9999-12-31T23:59:59.999Z"},
            )
        if lic is None:
            raise MeterError(
                Reason.LICENSE_NOT_RENEWABLE,
                "the license's policy has no duration: a perpetual license cannot be renewed",
                metadata={"id": license_id},
            )
        return periods.as_read_now(await self._live(lic, now), now)

    async def check_in(self, license_id: str) -> License:
        """Records a check-in now (SPEC §6: OVERDUE once it is older than the interval)."""
        self._check_id(license_id)
        return await self._set(license_id, {"last_check_in_ms": self.clock.now_ms()})

    @staticmethod
    def _check_id(license_id: str) -> None:
        v = Violations()
        v.identifier("id", license_id)
        v.raise_if_any()
