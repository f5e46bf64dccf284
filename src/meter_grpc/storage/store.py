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
    FingerprintState,
    License,
    Machine,
    Policy,
    Slots,
    Usage,
    UsageEvent,
    UsageEventType,
)
from meter_grpc.domain.ports import LicenseRead, MachineResult, UsageResult
from meter_grpc.storage import codec, keys
from meter_grpc.storage.commands import RedisClient
from meter_grpc.storage.scripts import MachineStatus, Scripts, SyncCode, UsageStatus
from meter_grpc.storage.transport import MaybeSent, NotSent, Unavailable

P = ParamSpec("P")
T = TypeVar("T")

USAGE_OPS = ("inc", "dec", "reset", "get")
# Fingerprints of dead machines remembered per license (validation answers HEARTBEAT_DEAD).
DEAD_FINGERPRINTS_KEPT = 1000
_MACHINE_UPDATE_RETRIES = 20

RETRY_AFTER_MS = 500


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


def _opt(v: int) -> int | None:
    return None if v < 0 else v


_EVENT_TYPES = {
    "inc": UsageEventType.INCREMENTED,
    "dec": UsageEventType.DECREMENTED,
    "reset": UsageEventType.RESET,
    "limit": UsageEventType.LIMIT_REACHED,
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

    def __init__(self, client: RedisClient) -> None:
        self.client = client
        self.scripts = Scripts(client)

    async def close(self) -> None:
        await self.client.close()

    @storage_call
    async def ping(self) -> bool:
        return bool(await self.client.ping())

    # --- policies -------------------------------------------------------------------------

    @storage_call
    async def create_policy(self, p: Policy) -> None:
        await self.client.hset(
            keys.policy(p.id), mapping={"json": codec.policy_to_json(p), "rev": p.revision}
        )
        await self.client.zadd(keys.all_policies(), {p.id: 0})

    @storage_call
    async def get_policy(self, policy_id: str) -> Policy | None:
        json_text, rev = await self.client.hmget(keys.policy(policy_id), ["json", "rev"])
        if json_text is None:
            return None
        p = codec.policy_from_json(json_text)
        p.revision = int(rev or 0)
        return p

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
        if not ids:
            return []
        # Concurrent calls share the pipelined connection(s): one round trip per node.
        rows = await asyncio.gather(
            *(self.client.hmget(keys.policy(pid), ["json", "rev"]) for pid in ids)
        )
        out = []
        for json_text, rev in rows:
            if json_text is not None:
                p = codec.policy_from_json(json_text)
                p.revision = int(rev or 0)
                out.append(p)
        return out

    @storage_call
    async def update_policy(self, p: Policy, expected_revision: int) -> int:
        """New revision; 0 on a revision conflict; -1 when the policy is gone."""
        p.revision = expected_revision + 1
        rev: int = await self.scripts.policy_update(
            keys=[keys.policy(p.id)], args=[expected_revision, codec.policy_to_json(p)]
        )
        return rev

    @storage_call
    async def delete_policy(self, policy_id: str) -> int:
        """0 deleted, -1 not found, n > 0: licenses still use it."""
        n: int = await self.scripts.policy_delete(
            keys=[keys.policy(policy_id), keys.policy_licenses(policy_id)]
        )
        if n == 0:
            await self.client.zrem(keys.all_policies(), policy_id)
        return n

    @storage_call
    async def attach_license(self, policy_id: str, license_id: str) -> Policy | None:
        row = await self.scripts.policy_attach(
            keys=[keys.policy(policy_id), keys.policy_licenses(policy_id)], args=[license_id]
        )
        if not row:
            return None
        p = codec.policy_from_json(row[0])
        p.revision = int(row[1])
        return p

    @storage_call
    async def detach_license(self, policy_id: str, license_id: str) -> None:
        await self.client.zrem(keys.policy_licenses(policy_id), license_id)

    @storage_call
    async def follow_policy(self, license_id: str, p: Policy) -> bool:
        fields = codec.policy_snapshot_fields(p)
        flat = [x for kv in fields.items() for x in kv]
        applied: int = await self.scripts.license_follow_policy(
            keys=[keys.license(license_id)], args=[p.revision, *flat]
        )
        return applied == 1

    # --- licenses -------------------------------------------------------------------------

    @storage_call
    async def claim_key(self, key: str, license_id: str) -> bool:
        """Reserves a license key for a license; False when another license has it."""
        return bool(await self.client.set(keys.license_by_key(key), license_id, nx=True))

    @storage_call
    async def release_key(self, key: str) -> None:
        await self.client.delete(keys.license_by_key(key))

    @storage_call
    async def create_license(self, lic: License) -> None:
        await self.client.hset(keys.license(lic.id), mapping=codec.license_to_hash(lic))
        await self.client.zadd(keys.all_licenses(), {lic.id: 0})

    @storage_call
    async def license_id_by_key(self, key: str) -> str | None:
        value: str | None = await self.client.get(keys.license_by_key(key))
        return value

    @storage_call
    async def get_license(self, license_id: str) -> License | None:
        h = await self.client.hgetall(keys.license(license_id))
        return codec.license_from_hash(h) if h else None

    @storage_call
    async def get_licenses(self, ids: Sequence[str]) -> list[License]:
        if not ids:
            return []
        rows = await asyncio.gather(*(self.client.hgetall(keys.license(lid)) for lid in ids))
        return [codec.license_from_hash(h) for h in rows if h]

    @storage_call
    async def update_license(
        self, license_id: str, changes: dict[str, object], now_ms: int
    ) -> License | None:
        """Sets License attributes (by attribute name) and `update_time`; None if gone."""
        fields = codec.license_fields(changes)
        fields["updated"] = str(now_ms)
        flat = [x for kv in fields.items() for x in kv]
        row = await self.scripts.license_update(keys=[keys.license(license_id)], args=flat)
        return codec.license_from_hash(codec.flat_to_dict(row)) if row else None

    @storage_call
    async def delete_license(self, license_id: str) -> bool:
        row = await self.scripts.license_delete(
            keys=[*keys.machine_keys(license_id), keys.license_events(license_id)]
        )
        if not row:
            return False
        key, policy_id = row
        await self.client.delete(keys.license_by_key(key))
        await self.client.zrem(keys.policy_licenses(policy_id), license_id)
        await self.client.zrem(keys.all_licenses(), license_id)
        return True

    # --- usage ----------------------------------------------------------------------------

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
    ) -> UsageResult:
        """Runs usage.lua: one round trip, one atomic check-and-move."""
        script_keys = [keys.license(license_id), keys.license_events(license_id)]
        if request_id:
            script_keys.append(keys.request_record(license_id, request_id))
        row = await self.scripts.usage(
            keys=script_keys,
            args=[now_ms, op, amount, request_id, periods],
        )
        status, uses, max_uses, ceiling, period_end, replayed = row
        return UsageResult(
            UsageStatus(status),
            Usage(
                uses=uses,
                max_uses=_opt(max_uses),
                overage_limit=_opt(ceiling),
                period_end_ms=_opt(period_end),
                replayed=bool(replayed),
            ),
        )

    # --- usage events ---------------------------------------------------------------------

    @storage_call
    async def last_event_id(self, license_id: str) -> str:
        """Id of the newest usage event of the license ("0-0" when there is none)."""
        rows = await self.client.xrevrange(keys.license_events(license_id), "+", "-", count=1)
        return str(rows[0][0]) if rows else "0-0"

    @storage_call
    async def read_events(
        self, license_id: str, after: str, block_ms: int, count: int = 100
    ) -> list[UsageEvent]:
        """Usage events after `after`, waiting up to `block_ms` for the first one."""
        stream = keys.license_events(license_id)
        reply = await self.client.xread({stream: after}, count=count, block=block_ms)
        if not reply:
            return []
        entries = reply[0][1]
        return [_event(str(eid), fields) for eid, fields in entries]

    @storage_call
    async def license_exists(self, license_id: str) -> bool:
        return bool(await self.client.exists(keys.license(license_id)))

    @storage_call
    async def sync_usage(
        self,
        license_id: str,
        records: Sequence[tuple[str, int]],
        *,
        now_ms: int,
        periods: str,
    ) -> tuple[int, list[str]] | None:
        """Runs usage_sync.lua on (record id, amount) pairs: one round trip, atomic.

        Returns the usage after the call and one SyncCode name per record, or None when the
        license does not exist.
        """
        script_keys = [keys.license(license_id), keys.license_events(license_id)]
        args: list[object] = [now_ms, periods]
        for record_id, amount in records:
            script_keys.append(keys.usage_record(license_id, record_id))
            args += [record_id, str(amount)]
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
    async def activate_machine(self, m: Machine, now_ms: int) -> MachineResult:
        """Runs machine_activate.lua; the machine's id must embed its license id."""
        row = await self._machine_script(
            "machine_activate",
            m.license_id,
            now_ms,
            m.id,
            m.fingerprint,
            m.cores,
            codec.machine_to_json(m),
        )
        result = self._result(row)
        if result.status == MachineStatus.OK:
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
            codec.license_from_hash(codec.flat_to_dict(flat)),
            FingerprintState(state),
            machine_id,
        )

    @storage_call
    async def renew_license(self, license_id: str, now_ms: int) -> tuple[int, License | None]:
        """(0, license) renewed; (1, None) not found; (2, None) its policy has no duration."""
        row = await self.scripts.license_renew(keys=[keys.license(license_id)], args=[now_ms])
        if row[0] != 0:
            return int(row[0]), None
        return 0, codec.license_from_hash(codec.flat_to_dict(row[1]))
