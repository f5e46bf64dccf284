"""RedisStore: every read and write of meter-grpc's data, on one RedisClient
(storage/commands.py: redis-py-style commands over storage/transport.py).

State changes that check a rule are Lua scripts on the keys of one license or one policy.
Failures of the store become STORAGE_UNAVAILABLE (UNAVAILABLE with RetryInfo) whose
`outcome` says where the failure happened, as the transport reports it:
- `not_applied`: the command provably never ran (never written: NotSent; or refused by the
  server: Unavailable, e.g. LOADING, READONLY, CLUSTERDOWN). Retrying is safe.
- `unknown`: the command was written and no reply came (MaybeSent, StoreTimeout): it may
  have run. Retry only with a `request_id`, which makes the retry count at most once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar

from meter_grpc.domain.errors import MeterError, Reason
from meter_grpc.domain.models import (
    ExpirationStrategy,
    FingerprintState,
    KeyHolder,
    License,
    Machine,
    MeterUsage,
    Policy,
    Reservation,
    ReservationAnswer,
    ReservationState,
    Slots,
    Usage,
    UsageEvent,
    UsageEventType,
)
from meter_grpc.domain.ports import (
    CreateRecord,
    LicenseRead,
    MachineResult,
    ReservationResult,
    ReservationStatus,
    UsageResult,
)
from meter_grpc.storage import codec, keys
from meter_grpc.storage.commands import RedisClient, pairs
from meter_grpc.storage.scripts import (
    EVENTS_MAXLEN,
    REQUEST_RECORD_TTL_MS,
    MachineStatus,
    Scripts,
    SyncCode,
    UsageStatus,
)
from meter_grpc.storage.transport import MaybeSent, NotSent, Unavailable

P = ParamSpec("P")
T = TypeVar("T")

# Fingerprints of dead machines remembered per license (validation answers HEARTBEAT_DEAD).
DEAD_FINGERPRINTS_KEPT = 1000
_MACHINE_UPDATE_RETRIES = 20

RETRY_AFTER_MS = 500
# The license hash format this code writes (keys.license_format): 2 = without `p_json`.
LICENSE_FORMAT = 2
# hash-max-listpack-value a license hash needs to stay a listpack: its longest value is the
# sealed file key (`kf`, about 85 bytes).
LISTPACK_VALUE_NEEDED = 128
# Policies kept in memory to build Licenses from license hashes (cleared when full).
POLICY_CACHE_SIZE = 10_000


def storage_call(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Turns a store failure into STORAGE_UNAVAILABLE with RetryInfo and the outcome the
    transport established: not_applied (NotSent, Unavailable) or unknown (MaybeSent)."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except (NotSent, Unavailable, MaybeSent) as exc:
            outcome = "unknown" if isinstance(exc, MaybeSent) else "not_applied"
            error = exc.code if isinstance(exc, Unavailable) else type(exc).__name__
            raise MeterError(
                Reason.STORAGE_UNAVAILABLE,
                "the counter store is unavailable; retry later",
                metadata={"outcome": outcome, "error": error},
                retry_after_ms=RETRY_AFTER_MS,
            ) from None

    return wrapper


# usage.lua's status codes (0 .. 6) to UsageStatus, by index: no enum lookup per call.
_USAGE_STATUSES = tuple(UsageStatus(i) for i in range(len(UsageStatus)))


def _opt(v: int) -> int | None:
    return None if v < 0 else v


_EVENT_TYPES = {
    "inc": UsageEventType.INCREMENTED,
    "dec": UsageEventType.DECREMENTED,
    "reset": UsageEventType.RESET,
    "limit": UsageEventType.LIMIT_REACHED,
    "reserve": UsageEventType.RESERVED,
    "commit": UsageEventType.COMMITTED,
    "release": UsageEventType.RELEASED,
    "expire": UsageEventType.EXPIRED,
}
_RESERVATION_STATES = {
    "o": ReservationState.OPEN,
    "c": ReservationState.COMMITTED,
    "r": ReservationState.RELEASED,
    "x": ReservationState.EXPIRED,
}


def _event(event_id: str, f: dict[str, str]) -> UsageEvent:
    return UsageEvent(
        event_id=event_id,
        type=_EVENT_TYPES.get(f.get("type", ""), UsageEventType.UNSPECIFIED),
        amount=int(f.get("amount") or 0),
        uses=int(f.get("uses") or 0),
        max_uses=int(f["max"]) if f.get("max") else None,
        request_id=f.get("rid", ""),
        time_ms=int(f.get("ts") or 0),
        meter=f.get("m", ""),
        reservation_id=f.get("rsv", ""),
    )


def _slots(row: Sequence[Any]) -> Slots:
    return Slots(
        machines=int(row[1]),
        cores=int(row[2]),
        max_machines=_opt(row[3]),
        machine_ceiling=_opt(row[4]),
        max_cores=_opt(row[5]),
        core_ceiling=_opt(row[6]),
    )


class RedisStore:
    """Every command goes through `client`; blocking reads (WatchUsage) take dedicated
    connections of the transport's blocking pool, never the request path's."""

    def __init__(
        self,
        client: RedisClient,
        event_retention: int = EVENTS_MAXLEN,
        export: bool = False,
        event_retention_age_ms: int = 0,
    ) -> None:
        self.client = client
        # Usage events kept per license (METER_EVENT_RETENTION); 0: none are written. None
        # older than event_retention_age_ms either (METER_EVENT_RETENTION_AGE; 0: no limit).
        self.event_retention = event_retention
        # Usage export on (a sink configured): counted changes are appended to the outbox.
        self.export = export
        self.scripts = Scripts(client, event_retention, export, event_retention_age_ms)
        # Outbox streams this process has added to keys.export_streams() (at most 16,384).
        self._registered: set[str] = set()
        # policy id -> the policy as last read from its hash, for building Licenses (a license
        # hash holds only the policy fields its scripts read). Used for a license whose
        # revision it covers; policies only move forward, so it is never wrong, only re-read.
        self._policies: dict[str, Policy] = {}

    async def close(self) -> None:
        await self.client.close()

    @storage_call
    async def ping(self) -> bool:
        return bool(await self.client.ping())

    # --- policies -------------------------------------------------------------------------

    @staticmethod
    def _policy(json_text: str, rev: str | int | None, synced: str | int | None) -> Policy:
        p = codec.policy_from_json(json_text)
        p.revision = int(rev or 0)
        p.propagated_revision = int(synced if synced is not None else p.revision)
        return p

    @storage_call
    async def create_policy(
        self, p: Policy, *, now_ms: int, minted_ms: int, window_ms: int
    ) -> tuple[int, Policy | None]:
        """Writes the policy (policy_create.lua), once its id is indexed: (1, policy) created,
        (2, policy) it existed already (a retried create), (0, None) the window had passed."""
        row = await self.scripts.policy_create(
            keys=[keys.policy(p.id)],
            args=[codec.policy_to_json(p), now_ms, minted_ms, window_ms],
        )
        if row[0] == 0:
            return 0, None
        return int(row[0]), self._policy(row[1], row[2], row[3])

    @storage_call
    async def get_policy(self, policy_id: str) -> Policy | None:
        json_text, rev, synced = await self.client.hmget(
            keys.policy(policy_id), ["json", "rev", "synced"]
        )
        return None if json_text is None else self._policy(json_text, rev, synced)

    @storage_call
    async def _list_ids(self, index: str, after: str, limit: int) -> list[str]:
        start = f"({after}" if after else "-"
        ids: list[str] = await self.client.zrangebylex(index, start, "+", start=0, num=limit)
        return ids

    async def list_policy_ids(self, after: str, limit: int) -> list[str]:
        """Up to `limit` policy ids after `after`, in creation (id) order."""
        return await self._list_ids(keys.all_policies(), after, limit)

    async def list_license_ids(self, policy_id: str, after: str, limit: int) -> list[str]:
        """License ids after `after` in creation order: all, or those of one policy."""
        index = keys.policy_licenses(policy_id) if policy_id else keys.all_licenses()
        return await self._list_ids(index, after, limit)

    @storage_call
    async def get_policies(self, ids: Sequence[str]) -> list[Policy]:
        rows = await asyncio.gather(
            *(self.client.hmget(keys.policy(pid), ["json", "rev", "synced"]) for pid in ids)
        )
        return [self._policy(j, rev, synced) for j, rev, synced in rows if j is not None]

    @storage_call
    async def update_policy(self, p: Policy, expected_revision: int) -> int:
        """New revision; 0 on a revision conflict; -1 when the policy is gone."""
        p.revision = expected_revision + 1
        rev: int = await self.scripts.policy_update(
            keys=[keys.policy(p.id)], args=[expected_revision, codec.policy_to_json(p)]
        )
        return rev

    @storage_call
    async def policy_propagated(self, policy_id: str, revision: int) -> int:
        """Records that every license follows `revision`; the policy's revision now (-1: gone)."""
        rev: int = await self.scripts.policy_propagated(
            keys=[keys.policy(policy_id)], args=[revision]
        )
        return rev

    @storage_call
    async def mark_pending(self, policy_id: str, token: str) -> None:
        await self.client.hset(keys.pending_propagations(), policy_id, token)

    @storage_call
    async def clear_pending(self, policy_id: str, token: str) -> bool:
        """Drops the pending mark of a policy if it is still `token` (no newer change)."""
        row = await self.scripts.cas(
            keys=[keys.pending_propagations()], args=["hdel", policy_id, token]
        )
        return bool(row[0])

    @storage_call
    async def pending_policies(self) -> dict[str, str]:
        """policy id -> token of every policy whose last change may not be propagated yet."""
        marks: dict[str, str] = await self.client.hgetall(keys.pending_propagations())
        return marks

    @storage_call
    async def lease(self, policy_id: str, owner: str, ttl_ms: int, *, renew: bool) -> bool:
        """Takes (or, with renew, extends) the propagation lease of a policy for `owner`."""
        args = ["expire", owner, ttl_ms] if renew else ["set", "", owner, ttl_ms]
        row = await self.scripts.cas(keys=[keys.policy_lease(policy_id)], args=args)
        return bool(row[0]) or (not renew and row[1] == owner)

    @storage_call
    async def release_lease(self, policy_id: str, owner: str) -> None:
        await self.scripts.cas(keys=[keys.policy_lease(policy_id)], args=["del", owner])

    @storage_call
    async def delete_policy(self, policy_id: str) -> int:
        """0 deleted, -1 not found, n > 0: n license ids are registered with it."""
        n: int = await self.scripts.policy_delete(
            keys=[
                keys.policy(policy_id),
                keys.policy_licenses(policy_id),
                keys.policy_lease(policy_id),
            ]
        )
        if n == 0:
            await self.client.zrem(keys.all_policies(), policy_id)
        return n

    @storage_call
    async def attach_license(self, policy_id: str, license_id: str) -> Policy | None:
        row = await self.scripts.policy_attach(
            keys=[keys.policy(policy_id), keys.policy_licenses(policy_id)], args=[license_id]
        )
        return self._policy(row[0], row[1], None) if row else None

    @storage_call
    async def detach_license(self, policy_id: str, license_id: str) -> None:
        await self.client.zrem(keys.policy_licenses(policy_id), license_id)

    @storage_call
    async def index(self, policy_id: str = "", license_id: str = "") -> None:
        """Adds an id to the index of all policies or all licenses (before it exists)."""
        if policy_id:
            await self.client.zadd(keys.all_policies(), {policy_id: 0})
        if license_id:
            await self.client.zadd(keys.all_licenses(), {license_id: 0})

    @storage_call
    async def unindex(self, policy_ids: Sequence[str], license_ids: Sequence[str]) -> None:
        """Removes ids that point nowhere from the indexes of all policies / all licenses."""
        if policy_ids:
            await self.client.zrem(keys.all_policies(), *policy_ids)
        if license_ids:
            await self.client.zrem(keys.all_licenses(), *license_ids)

    @storage_call
    async def follow_policy(self, license_id: str, p: Policy, mailbox_ttl_ms: int = 0) -> int:
        """license_follow_policy.lua: 1 applied, 0 already following (or gone for good), 2 left
        in the mailbox of a license being created (kept mailbox_ttl_ms)."""
        fields = codec.policy_snapshot_fields(p)
        flat = [x for kv in fields.items() for x in kv]
        applied: int = await self.scripts.license_follow_policy(
            keys=[keys.license(license_id), keys.policy_mailbox(license_id)],
            args=[p.revision, mailbox_ttl_ms, *flat],
        )
        return applied

    # --- idempotent creates ---------------------------------------------------------------

    @storage_call
    async def begin_create(
        self, kind: str, request_id: str, fingerprint: str, new_id: str, secret: str = ""
    ) -> CreateRecord | None:
        """Binds a create's request_id to an id (create_record.lua); None when the request id
        was used for another request."""
        row = await self.scripts.create_record(
            keys=[keys.create_request(kind, request_id)],
            args=["begin", fingerprint, new_id, REQUEST_RECORD_TTL_MS, secret],
        )
        if row[0] == 0:
            return None
        answer: Policy | License | None = None
        if row[2]:
            answer = codec.answer_from_text(kind, row[2])
        return CreateRecord(id=str(row[1]), secret=str(row[3]), answer=answer)

    @storage_call
    async def rebind_create(self, kind: str, request_id: str, old_id: str, new_id: str) -> bool:
        done = await self.scripts.create_record(
            keys=[keys.create_request(kind, request_id)], args=["rebind", old_id, new_id]
        )
        return bool(done)

    @storage_call
    async def finish_create(self, kind: str, request_id: str, answer: Policy | License) -> None:
        await self.scripts.create_record(
            keys=[keys.create_request(kind, request_id)],
            args=["finish", answer.id, codec.answer_to_text(answer)],
        )

    @storage_call
    async def abandon_create(self, kind: str, request_id: str, bound_id: str) -> None:
        await self.scripts.create_record(
            keys=[keys.create_request(kind, request_id)], args=["abandon", bound_id]
        )

    # --- licenses -------------------------------------------------------------------------

    @storage_call
    async def claim_key(self, digest: str, license_id: str, ghost: str = "") -> str:
        """Reserves a license key (by its digest) for a license. Returns "" when the license
        holds it now, else the id of the license holding it. With `ghost`, takes it over from
        that holder (whose license does not exist) only if it still holds it."""
        row = await self.scripts.cas(
            keys=[keys.license_by_key(digest)], args=["set", ghost, license_id, ""]
        )
        if row[0] or row[1] == license_id:
            return ""
        return str(row[1] or "")

    @storage_call
    async def release_key(self, digest: str, license_id: str) -> None:
        """Drops a key's entry if it still points at this license."""
        if digest:
            await self.scripts.cas(keys=[keys.license_by_key(digest)], args=["del", license_id])

    @storage_call
    async def create_license(
        self, lic: License, *, now_ms: int, minted_ms: int, window_ms: int
    ) -> tuple[int, License | None]:
        """Writes the license (license_create.lua), once its id is registered with its policy,
        its key and the index: (1, license) created, (2, license) it existed already (a retried
        create), (0, None) the window had passed."""
        flat = [x for kv in codec.license_to_hash(lic).items() for x in kv]
        row = await self.scripts.license_create(
            keys=[
                keys.license(lic.id),
                keys.policy_mailbox(lic.id),
                keys.license_tombstone(lic.id),
            ],
            args=[now_ms, minted_ms, window_ms, *flat],
        )
        if row[0] in (0, 3):
            return int(row[0]), None
        return int(row[0]), await self._license(codec.flat_to_dict(row[1]))

    async def _licenses(self, hashes: Sequence[dict[str, str]]) -> list[License]:
        """Licenses of license hashes, each with its policy: read from the policy's hash
        (one HMGET per policy not cached at the license's revision or newer)."""
        cache = self._policies
        stale = {
            h["policy_id"]
            for h in hashes
            if (p := cache.get(h["policy_id"])) is None or p.revision < codec.policy_rev(h)
        }
        if stale:
            ids = sorted(stale)
            rows = await asyncio.gather(
                *(self.client.hmget(keys.policy(pid), ["json", "rev", "synced"]) for pid in ids)
            )
            if len(cache) + len(ids) > POLICY_CACHE_SIZE:
                cache.clear()
            for pid, (json_text, rev, synced) in zip(ids, rows, strict=True):
                if json_text is not None:
                    p = self._policy(json_text, rev, synced)
                    held = cache.get(pid)
                    if held is None or held.revision < p.revision:
                        cache[pid] = p
        return [codec.license_from_hash(h, cache.get(h["policy_id"])) for h in hashes]

    async def _license(self, h: dict[str, str]) -> License:
        (lic,) = await self._licenses([h])
        return lic

    async def listpack_value_limits(self) -> list[int]:
        """hash-max-listpack-value of every primary that lets CONFIG GET be called (a managed
        Redis may refuse it: that node is left out)."""
        router = self.client.router
        out = []
        for node in await router.primaries():
            try:
                reply = await router.call(("CONFIG", "GET", "hash-max-listpack-value"), node=node)
            except Exception:  # CONFIG disabled or renamed: nothing to learn
                continue
            if isinstance(reply, list) and len(reply) == 2:
                out.append(int(reply[1]))
            elif isinstance(reply, dict) and reply:
                out.append(int(next(iter(reply.values()))))
        return out

    @storage_call
    async def drop_legacy_policy_copies(self, page: int = 1000) -> int:
        """Migrates licenses written by earlier versions: removes the `p_json` copy of the whole
        policy from every license hash (HDEL, pipelined `page` at a time, in index order), then
        records format LICENSE_FORMAT so later starts skip the scan. Returns how many licenses
        had the copy. Idempotent: a scan cut short is redone on the next start; reads ignore
        the copy meanwhile (_licenses)."""
        done = await self.client.get(keys.license_format())
        if done is not None and int(done) >= LICENSE_FORMAT:
            return 0
        after, dropped = "", 0
        while ids := await self._list_ids(keys.all_licenses(), after, page):
            removed = await asyncio.gather(
                *(self.client.hdel(keys.license(lid), codec.LEGACY_POLICY_JSON) for lid in ids)
            )
            dropped += sum(removed)
            after = ids[-1]
        await self.client.set(keys.license_format(), str(LICENSE_FORMAT))
        return dropped

    @storage_call
    async def license_id_by_key(self, digest: str) -> str | None:
        """The id of the license whose key has this digest (an index entry: a create or
        delete cut short may leave one pointing at a license without this key)."""
        value: str | None = await self.client.get(keys.license_by_key(digest))
        return value

    @storage_call
    async def key_holder(self, digest: str) -> KeyHolder | None:
        """What license-key authentication reads: one GET of the index entry, then one HMGET
        of the three fields the check needs. None unless the license holds this key."""
        license_id: str | None = await self.client.get(keys.license_by_key(digest))
        if license_id is None:
            return None
        kd, expire, strategy = await self.client.hmget(
            keys.license(license_id), ["kd", "expire", "p_expiry_strategy"]
        )
        if kd != digest:  # an entry left by a create, rotation or delete cut short
            return None
        return KeyHolder(
            license_id,
            int(expire) if expire else None,
            ExpirationStrategy(int(strategy or 0)),
        )

    @storage_call
    async def get_license(self, license_id: str) -> License | None:
        h = await self.client.hgetall(keys.license(license_id))
        return await self._license(h) if h else None

    @storage_call
    async def get_licenses(self, ids: Sequence[str]) -> list[License]:
        rows = await asyncio.gather(*(self.client.hgetall(keys.license(lid)) for lid in ids))
        return await self._licenses([h for h in rows if h])

    @storage_call
    async def license_states(self, ids: Sequence[str]) -> list[int]:
        """Per id: 1 the license exists, -1 it was deleted recently, 0 neither."""
        found = await asyncio.gather(
            *(self.client.exists(keys.license(lid)) for lid in ids),
            *(self.client.exists(keys.license_tombstone(lid)) for lid in ids),
        )
        return [
            1 if live else -1 if gone else 0
            for live, gone in zip(found[: len(ids)], found[len(ids) :], strict=True)
        ]

    @storage_call
    async def update_license(
        self, license_id: str, changes: dict[str, object], now_ms: int
    ) -> License | None:
        """Sets License attributes (by attribute name) and `update_time`; None if gone."""
        fields = codec.license_fields(changes)
        fields["updated"] = str(now_ms)
        flat = [x for kv in fields.items() for x in kv]
        row = await self.scripts.license_update(keys=[keys.license(license_id)], args=flat)
        return await self._license(codec.flat_to_dict(row)) if row else None

    @storage_call
    async def delete_license(self, license_id: str, tombstone_ms: int) -> tuple[str, str] | None:
        """Deletes the license with all its keys (license_delete.lua) and leaves a tombstone:
        its (key digest, policy id), for the caller to drop it from the key lookup and the indexes;
        None if it is gone."""
        row = await self.scripts.license_delete(
            keys=[
                *keys.machine_keys(license_id),
                keys.license_events(license_id),
                keys.policy_mailbox(license_id),
                *keys.reservation_keys(license_id),
                keys.license_tombstone(license_id),
            ],
            args=[tombstone_ms],
        )
        return (str(row[0]), str(row[1])) if row else None

    # --- usage ----------------------------------------------------------------------------

    async def _usage_keys(self, license_id: str, request_id: str) -> list[str]:
        """The KEYS of usage.lua, reservation.lua and (without a request_id) the first ones of
        usage_sync.lua: the license, its events, its outbox, its reservations, and the
        request's idempotency record when there is a request_id. With export on, the outbox
        is added to keys.export_streams() before the first script call of this process that
        may write to it (one SADD per stream and process), so the exporter finds it."""
        outbox = keys.outbox(license_id)
        if self.export and outbox not in self._registered:
            await self.client.sadd(keys.export_streams(), outbox)
            self._registered.add(outbox)
        names = [
            keys.license(license_id),
            keys.license_events(license_id),
            outbox,
            *keys.reservation_keys(license_id),
        ]
        if request_id:
            names.append(keys.request_record(license_id, request_id))
        return names

    @storage_call
    async def usage(
        self,
        license_id: str,
        op: str,
        *,
        amount: int,
        request_id: str,
        now_ms: int,
        periods: str,
        meter: str = "",
    ) -> UsageResult:
        """Runs usage.lua: one round trip, one atomic check-and-move (of the license's own
        counter, or with `meter` of that meter's)."""
        script_keys = await self._usage_keys(license_id, request_id)
        args: list[object] = [now_ms, op, amount, request_id, periods]
        if meter:
            args.append(meter)
        row = await self.scripts.usage(keys=script_keys, args=args)
        status, uses, max_uses, ceiling, period_end, replayed, reserved = row
        return UsageResult(
            _USAGE_STATUSES[status],
            Usage(
                uses,
                None if max_uses < 0 else max_uses,
                None if ceiling < 0 else ceiling,
                None if period_end < 0 else period_end,
                replayed == 1,
                reserved,
            ),
        )

    @storage_call
    async def reservation(
        self,
        license_id: str,
        op: str,
        args: Sequence[object],
        *,
        request_id: str,
        now_ms: int,
        periods: str,
    ) -> ReservationResult:
        """Runs reservation.lua: one round trip, atomic."""
        script_keys = await self._usage_keys(license_id, request_id)
        row = await self.scripts.reservation(
            keys=script_keys, args=[now_ms, op, periods, request_id, *args]
        )
        status, rid, state, meter, amount, expire, committed, created = row[:8]
        uses, max_uses, ceiling, period_end, reserved, replayed, open_ = row[8:15]
        usage = Usage(
            int(uses),
            _opt(int(max_uses)),
            _opt(int(ceiling)),
            _opt(int(period_end)),
            int(replayed) == 1,
            int(reserved),
        )
        r = Reservation(
            id=str(rid),
            license_id=license_id,
            meter=str(meter),
            amount=int(amount),
            expire_time_ms=int(expire),
            state=_RESERVATION_STATES.get(str(state), ReservationState.UNSPECIFIED),
            committed_amount=int(committed),
            create_time_ms=int(created),
        )
        return ReservationResult(
            ReservationStatus(int(status)),
            ReservationAnswer(r, MeterUsage(str(meter), usage), int(replayed) == 1),
            int(open_),
        )

    @storage_call
    async def load_usage_script(self) -> None:
        """SCRIPT LOAD of usage.lua on every primary: one round trip per node, nothing run.

        The transport re-sends a call answered NOSCRIPT after loading the script, so that call
        applies after the calls written behind it. StreamUsage and BatchIncrementUsage issue
        one license's calls back to back and rely on their order; they load the script first.
        """
        await self.client.script_load(self.scripts.usage.source)

    # --- usage events ---------------------------------------------------------------------

    @storage_call
    async def last_event_id(self, license_id: str) -> str:
        """Id of the newest usage event of the license ("0-0" when there is none)."""
        rows = await self.client.xrevrange(keys.license_events(license_id), "+", "-", count=1)
        return str(rows[0][0]) if rows else "0-0"

    @storage_call
    async def read_events(
        self, license_id: str, after: str, block_ms: int | None, count: int = 100
    ) -> list[UsageEvent]:
        """Usage events after `after`, waiting up to `block_ms` for the first one (on a
        connection of the blocking pool); `block_ms` None: no wait, on the pipelined one."""
        stream = keys.license_events(license_id)
        reply = await self.client.xread({stream: after}, count=count, block=block_ms)
        if not reply:
            return []
        entries = reply[0][1]
        return [_event(str(eid), fields) for eid, fields in entries]

    @storage_call
    async def events_after(
        self, license_id: str, after: str, count: int = 100
    ) -> tuple[list[UsageEvent], str]:
        """events_after.lua: the events after `after` and, in the same atomic step, whether
        some after it were trimmed first ("" or the oldest event id kept)."""
        gap, entries = await self.scripts.events_after(
            keys=[keys.license_events(license_id)], args=[after, count]
        )
        return [_event(str(eid), pairs(fields)) for eid, fields in entries], str(gap)

    @storage_call
    async def license_exists(self, license_id: str) -> bool:
        return bool(await self.client.exists(keys.license(license_id)))

    @storage_call
    async def sync_usage(
        self,
        license_id: str,
        records: Sequence[tuple[str, int] | tuple[str, int, str]],
        *,
        now_ms: int,
        periods: str,
    ) -> tuple[int, list[str]] | None:
        """Runs usage_sync.lua on (record id, amount[, meter]) tuples: one round trip, atomic.

        Returns the usage after the call and one SyncCode name per record, or None when the
        license does not exist.
        """
        script_keys = await self._usage_keys(license_id, "")
        args: list[object] = [now_ms, periods]
        for record in records:
            record_id, amount = record[0], record[1]
            script_keys.append(keys.usage_record(license_id, record_id))
            args += [record_id, str(amount), record[2] if len(record) > 2 else ""]
        row = await self.scripts.usage_sync(keys=script_keys, args=args)
        if not row[0]:
            return None
        return int(row[1]), [SyncCode(code).name for code in row[2:]]

    # --- machines -------------------------------------------------------------------------

    async def _machine_script(
        self, name: str, license_id: str, now_ms: int, *args: object
    ) -> list[Any]:
        row: list[Any] = await getattr(self.scripts, name)(
            keys=keys.machine_keys(license_id), args=[now_ms, DEAD_FINGERPRINTS_KEPT, *args]
        )
        return row

    @staticmethod
    def _result(row: Sequence[Any]) -> MachineResult:
        """answer(status, l, ...) of machines_common.lua; OK with (json, heartbeat) = a machine."""
        status, slots, extra = MachineStatus(row[0]), _slots(row), row[7:]
        if status == MachineStatus.OK and len(extra) == 2:
            return MachineResult(status, slots, codec.machine_from_json(extra[0], int(extra[1])))
        return MachineResult(status, slots, extra=str(extra[0]) if extra else "")

    @storage_call
    async def activate_machine(
        self, m: Machine, now_ms: int, cap: int, request_id: str = "", digest: str = ""
    ) -> MachineResult:
        """Runs machine_activate.lua; the machine's id must embed its license id. With a
        request_id, a retry gets the first answer back (the machine it activated). `cap`: the
        most live machines any license may hold, checked in the script."""
        script_keys = keys.machine_keys(m.license_id)
        args: list[object] = [now_ms, DEAD_FINGERPRINTS_KEPT, m.id, m.fingerprint, m.cores]
        args += [codec.machine_to_json(m), cap]
        if request_id:
            script_keys.append(keys.request_record(m.license_id, request_id))
            args.append(digest)
        row = await self.scripts.machine_activate(keys=script_keys, args=args)
        result = self._result(row)
        if result.status == MachineStatus.OK and result.machine is None:
            m = dataclasses.replace(m, last_heartbeat_ms=now_ms)
            return dataclasses.replace(result, machine=m)
        return result

    @storage_call
    async def deactivate_machine(
        self, license_id: str, machine_id: str, now_ms: int
    ) -> MachineResult:
        row = await self._machine_script("machine_deactivate", license_id, now_ms, machine_id)
        return self._result(row)

    @storage_call
    async def get_machine(self, license_id: str, machine_id: str, now_ms: int) -> MachineResult:
        row = await self._machine_script("machine_get", license_id, now_ms, machine_id)
        return self._result(row)

    @storage_call
    async def heartbeat_machine(
        self, license_id: str, machine_id: str, now_ms: int
    ) -> MachineResult:
        row = await self._machine_script("machine_heartbeat", license_id, now_ms, machine_id)
        return self._result(row)

    @storage_call
    async def list_machines(
        self, license_id: str, after: str, limit: int, now_ms: int
    ) -> MachineResult:
        """Up to `limit` live machines with ids after `after`, in activation order."""
        row = await self._machine_script("machine_list", license_id, now_ms, after, limit)
        status, slots, extra = MachineStatus(row[0]), _slots(row), row[7:]
        ms = tuple(
            codec.machine_from_json(extra[i], int(extra[i + 1])) for i in range(0, len(extra), 2)
        )
        return MachineResult(status, slots, machines=ms)

    @storage_call
    async def update_machine(
        self, license_id: str, machine_id: str, changes: Mapping[str, object], now_ms: int
    ) -> MachineResult:
        """Sets Machine attributes (by name) atomically; a cores change is re-checked.

        Optimistic: reads the machine, writes it back only if unchanged, else retries.
        """
        for _ in range(_MACHINE_UPDATE_RETRIES):
            row = await self._machine_script("machine_get", license_id, now_ms, machine_id)
            if row[0] != MachineStatus.OK:
                return self._result(row)
            current_json, heartbeat = row[7], int(row[8])
            current = codec.machine_from_json(current_json, heartbeat)
            updated = dataclasses.replace(current, **changes)  # type: ignore[arg-type]
            row = await self._machine_script(
                "machine_update",
                license_id,
                now_ms,
                machine_id,
                current_json,
                codec.machine_to_json(updated),
                updated.cores,
            )
            if row[0] != MachineStatus.CONFLICT:
                return self._result(row)
        raise MeterError(
            Reason.STORAGE_UNAVAILABLE,
            "the machine is being updated concurrently; retry",
            metadata={"outcome": "not_applied", "id": machine_id},
            retry_after_ms=100,
        )

    @storage_call
    async def read_license(
        self, license_id: str, now_ms: int, fingerprint: str = ""
    ) -> LicenseRead | None:
        """The license with only its live machines counted (dead ones are removed first)."""
        row = await self._machine_script("license_read", license_id, now_ms, fingerprint)
        if not row:
            return None
        flat, state, machine_id = row
        return LicenseRead(
            await self._license(codec.flat_to_dict(flat)),
            FingerprintState(state),
            machine_id,
        )

    @storage_call
    async def renew_license(
        self, license_id: str, now_ms: int, max_expire_ms: int
    ) -> tuple[int, License | None]:
        """(0, license) renewed; (1, None) not found; (2, None) its policy has no duration;
        (3, None) the new expiry would pass max_expire_ms (nothing written)."""
        row = await self.scripts.license_renew(
            keys=[keys.license(license_id)], args=[now_ms, max_expire_ms]
        )
        if row[0] != 0:
            return int(row[0]), None
        return 0, await self._license(codec.flat_to_dict(row[1]))
