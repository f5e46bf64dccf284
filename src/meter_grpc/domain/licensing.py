"""Policies and licenses: the rules of creating, changing and deleting them."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING

from meter_grpc.domain import ids, paging, periods
from meter_grpc.domain.clock import Clock
from meter_grpc.domain.errors import MeterError, Reason, invalid, not_found
from meter_grpc.domain.models import KeyHolder, License, Policy
from meter_grpc.domain.rules import (
    Violations,
    check_key,
    check_license,
    check_license_with_policy,
    check_policy,
)

if TYPE_CHECKING:
    from meter_grpc.domain.ports import Store

POLICY_MASK = frozenset(
    f.name
    for f in dataclasses.fields(Policy)
    if f.name not in ("id", "create_time_ms", "update_time_ms", "revision")
)
# update_mask path -> License attribute
LICENSE_MASK = {
    "name": "name",
    "expire_time": "expire_time_ms",
    "max_uses": "max_uses_override",
    "max_machines": "max_machines_override",
    "max_cores": "max_cores_override",
    "entitlements": "entitlements",
    "metadata": "metadata",
}
_PROPAGATE_BATCH = 200
_UPDATE_RETRIES = 20


def _check_mask(
    paths: Iterable[str], allowed: Iterable[str], field: str = "update_mask"
) -> list[str]:
    paths = list(paths)
    if not paths:
        raise invalid(field, "is required: name the fields to change")
    v = Violations()
    allowed = frozenset(allowed)
    for path in paths:
        if path not in allowed:
            v.add(
                f"{field}.paths",
                f"{path!r} cannot be updated (allowed: {', '.join(sorted(allowed))})",
            )
    v.raise_if_any()
    return paths


class Licensing:
    def __init__(self, store: Store, clock: Clock) -> None:
        self.store = store
        self.clock = clock

    # --- policies -------------------------------------------------------------------------

    async def create_policy(self, p: Policy) -> Policy:
        v = Violations()
        check_policy(v, p)
        v.raise_if_any()
        now = self.clock.now_ms()
        p = dataclasses.replace(
            p, id=ids.new_id(), create_time_ms=now, update_time_ms=now, revision=1
        )
        await self.store.create_policy(p)
        return p

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
        return policies, paging.encode(page_ids[-1], "policies") if more else ""

    async def update_policy(self, patch: Policy, mask: Iterable[str]) -> Policy:
        v = Violations()
        v.identifier("policy.id", patch.id)
        v.raise_if_any()
        paths = _check_mask(mask, POLICY_MASK)
        for _ in range(_UPDATE_RETRIES):
            current = await self.get_policy(patch.id)
            updated = dataclasses.replace(
                current, **{p: getattr(patch, p) for p in paths}, update_time_ms=self.clock.now_ms()
            )
            v = Violations()
            check_policy(v, updated)
            v.raise_if_any()
            rev = await self.store.update_policy(updated, current.revision)
            if rev < 0:
                raise not_found(Reason.POLICY_NOT_FOUND, "policy", patch.id)
            if rev > 0:
                updated.revision = rev
                await self._propagate(updated)
                return updated
        raise MeterError(
            Reason.STORAGE_UNAVAILABLE,
            "policy is being updated concurrently; retry",
            retry_after_ms=100,
        )

    async def _propagate(self, p: Policy) -> None:
        """Copies the policy into each of its licenses (their scripts read only their own keys)."""
        after = ""
        while True:
            batch = await self.store.list_license_ids(p.id, after, _PROPAGATE_BATCH)
            if not batch:
                return
            await asyncio.gather(*(self.store.follow_policy(lid, p) for lid in batch))
            after = batch[-1]

    async def delete_policy(self, policy_id: str) -> None:
        v = Violations()
        v.identifier("id", policy_id)
        v.raise_if_any()
        n = await self.store.delete_policy(policy_id)
        if n < 0:
            raise not_found(Reason.POLICY_NOT_FOUND, "policy", policy_id)
        if n > 0:
            raise MeterError(
                Reason.POLICY_IN_USE,
                f"policy {policy_id!r} still has {n} license(s); delete them first",
                metadata={"id": policy_id, "licenses": str(n)},
            )

    # --- licenses -------------------------------------------------------------------------

    async def create_license(self, lic: License) -> License:
        v = Violations()
        v.identifier("license.policy_id", lic.policy_id)
        check_license(v, lic)
        if lic.key:
            check_key(v, "license.key", lic.key)
        v.raise_if_any()
        now = self.clock.now_ms()
        lic = dataclasses.replace(lic, id=ids.new_id(), create_time_ms=now, update_time_ms=now)
        policy = await self.store.attach_license(lic.policy_id, lic.id)
        if policy is None:
            raise not_found(Reason.POLICY_NOT_FOUND, "policy", lic.policy_id)
        claimed = ""
        try:
            v = Violations()
            check_license_with_policy(v, lic, policy)
            v.raise_if_any()
            if lic.key:
                if not await self.store.claim_key(lic.key, lic.id):
                    raise MeterError(
                        Reason.LICENSE_KEY_TAKEN,
                        "another license has this key",
                        metadata={"field": "license.key"},
                    )
            else:
                lic.key = ids.new_license_key()
                while not await self.store.claim_key(lic.key, lic.id):  # 150 random bits: ~never
                    lic.key = ids.new_license_key()
            claimed = lic.key
            lic.policy = policy
            if lic.expire_time_ms is None and policy.duration_ms is not None:
                lic.expire_time_ms = now + policy.duration_ms
            bounds = periods.period_bounds(now, policy.usage_reset_interval)
            lic.period_start_ms = bounds[0] if bounds else 0
            lic.uses = lic.machines_count = lic.cores_count = 0
            await self.store.create_license(lic)
        except BaseException:
            # Undo what this call did, so a refused or failed create leaves nothing behind.
            if claimed:
                await self.store.release_key(claimed)
            await self.store.detach_license(lic.policy_id, lic.id)
            raise
        # A policy update that ran between attach and create skipped this license: catch up.
        latest = await self.store.get_policy(lic.policy_id)
        if latest is not None and latest.revision > policy.revision:
            await self.store.follow_policy(lic.id, latest)
            lic.policy = latest
        return periods.as_read_now(lic, now)

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

    async def license_id_by_key(self, key: str) -> str | None:
        if not key or len(key) > 256:
            return None
        return await self.store.license_id_by_key(key)

    async def key_holder(self, key: str) -> KeyHolder | None:
        """The license a key authenticates as, with what decides whether it still may."""
        license_id = await self.license_id_by_key(key)
        if license_id is None:
            return None
        lic = await self.store.get_license(license_id)
        if lic is None:
            return None
        return KeyHolder(lic.id, lic.expire_time_ms, lic.policy.expiration_strategy)

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
        live = await asyncio.gather(*(self._live(lic, now) for lic in stored))
        licenses = [periods.as_read_now(lic, now) for lic in live]
        return licenses, paging.encode(page_ids[-1], scope) if more else ""

    async def update_license(self, patch: License, mask: Iterable[str]) -> License:
        v = Violations()
        v.identifier("license.id", patch.id)
        check_license(v, patch)
        v.raise_if_any()
        paths = _check_mask(mask, LICENSE_MASK)
        changes = {LICENSE_MASK[p]: getattr(patch, LICENSE_MASK[p]) for p in paths}
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
        v = Violations()
        v.identifier("id", license_id)
        v.raise_if_any()
        if not await self.store.delete_license(license_id):
            raise not_found(Reason.LICENSE_NOT_FOUND, "license", license_id)

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
        status, lic = await self.store.renew_license(license_id, now)
        if status == 1:
            raise not_found(Reason.LICENSE_NOT_FOUND, "license", license_id)
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
