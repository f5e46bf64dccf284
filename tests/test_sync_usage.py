"""UsageService.SyncUsage: offline records applied in order, each once, against the limit."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import redis.asyncio as aioredis
from google.protobuf import field_mask_pb2

from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import usage_pb2
from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from meter_grpc.domain.clock import ManualClock
from meter_grpc.storage import keys
from tests.conftest import Running
from tests.support import admin_md, expect_error, license_md, rich_error

APPLIED = usage_pb2.USAGE_RECORD_OUTCOME_APPLIED
DUPLICATE = usage_pb2.USAGE_RECORD_OUTCOME_DUPLICATE
REJECTED = usage_pb2.USAGE_RECORD_OUTCOME_REJECTED
DAY_MS = 86_400_000


def records(*amounts: int, prefix: str = "r") -> list[usage_pb2.UsageRecord]:
    return [
        usage_pb2.UsageRecord(id=f"{prefix}{i}", amount=a, occur_time={"seconds": 1_700_000_000})
        for i, a in enumerate(amounts)
    ]


async def sync(
    usage: ugrpc.UsageServiceStub,
    license_id: str,
    recs: list[usage_pb2.UsageRecord],
    md: Any = None,
) -> upb.SyncUsageResponse:
    return await usage.SyncUsage(
        upb.SyncUsageRequest(license_id=license_id, records=recs), metadata=md or admin_md()
    )


def outcomes(resp: upb.SyncUsageResponse) -> list[tuple[int, str]]:
    return [(r.outcome, r.reason) for r in resp.results]


async def stored_uses(redis: aioredis.Redis, license_id: str) -> int:
    return int(await redis.hget(keys.license(license_id), "uses"))


A = (APPLIED, "")
D = (DUPLICATE, "")
OVER = (REJECTED, "USAGE_LIMIT_EXCEEDED")


async def test_records_that_fit_are_applied_the_rest_rejected(
    usage: ugrpc.UsageServiceStub, make_license: Any, redis: aioredis.Redis
) -> None:
    lic = await make_license(policy_fields={"max_uses": 5})
    recs = records(1, 2, 1, 2, 1, 1, 0)  # 0 means 1
    resp = await sync(usage, lic.id, recs)
    assert [r.id for r in resp.results] == [f"r{i}" for i in range(7)]
    assert outcomes(resp) == [A, A, A, OVER, A, OVER, OVER]
    assert resp.uses == 5
    assert await stored_uses(redis, lic.id) == 5


async def test_resend_answers_duplicate_and_keeps_rejections_final(
    usage: ugrpc.UsageServiceStub,
    licenses: lgrpc.LicenseServiceStub,
    make_license: Any,
    redis: aioredis.Redis,
) -> None:
    lic = await make_license(policy_fields={"max_uses": 3})
    recs = records(2, 2, 1)
    assert outcomes(await sync(usage, lic.id, recs)) == [A, OVER, A]
    again = await sync(usage, lic.id, recs)
    assert outcomes(again) == [D, OVER, D]
    assert again.uses == 3
    # Raising the limit does not revive a rejected record: its first answer is final.
    await licenses.UpdateLicense(
        lpb.UpdateLicenseRequest(
            license={"id": lic.id, "max_uses": 10},
            update_mask=field_mask_pb2.FieldMask(paths=["max_uses"]),
        ),
        metadata=admin_md(),
    )
    assert outcomes(await sync(usage, lic.id, recs)) == [D, OVER, D]
    fresh = await sync(usage, lic.id, records(2, prefix="new"))
    assert outcomes(fresh) == [A] and fresh.uses == 5
    assert await stored_uses(redis, lic.id) == 5
    ttl = await redis.pttl(keys.usage_record(lic.id, "r0"))
    assert 29 * DAY_MS < ttl <= 30 * DAY_MS
    assert 29 * DAY_MS < await redis.pttl(keys.usage_record(lic.id, "r1")) <= 30 * DAY_MS


async def test_reused_id_with_another_amount_is_rejected(
    usage: ugrpc.UsageServiceStub, make_license: Any, redis: aioredis.Redis
) -> None:
    lic = await make_license(policy_fields={"max_uses": 100})
    await sync(usage, lic.id, records(5))
    resp = await sync(usage, lic.id, records(6))
    assert outcomes(resp) == [(REJECTED, "REQUEST_ID_REUSED")]
    assert resp.uses == 5
    # The first answer is still the stored one.
    assert outcomes(await sync(usage, lic.id, records(5))) == [D]
    assert await stored_uses(redis, lic.id) == 5


async def test_repeated_id_inside_one_request(
    usage: ugrpc.UsageServiceStub, make_license: Any, redis: aioredis.Redis
) -> None:
    lic = await make_license(policy_fields={"max_uses": 100})
    r = usage_pb2.UsageRecord(id="same", amount=4)
    other = usage_pb2.UsageRecord(id="same", amount=7)
    resp = await sync(usage, lic.id, [r, r, other])
    assert outcomes(resp) == [A, D, (REJECTED, "REQUEST_ID_REUSED")]
    assert resp.uses == 4 and await stored_uses(redis, lic.id) == 4


async def test_overage_and_override_apply(usage: ugrpc.UsageServiceStub, make_license: Any) -> None:
    lic = await make_license(policy_fields={"max_uses": 8, "overage_strategy": 2})  # ceiling 10
    assert outcomes(await sync(usage, lic.id, records(6, 4, 1))) == [A, A, OVER]
    lic = await make_license(policy_fields={"max_uses": 2}, max_uses=4)
    resp = await sync(usage, lic.id, records(4, 1))
    assert outcomes(resp) == [A, OVER] and resp.uses == 4


async def test_counter_ceiling_without_a_limit(
    usage: ugrpc.UsageServiceStub, make_license: Any, redis: aioredis.Redis
) -> None:
    lic = await make_license()
    resp = await sync(usage, lic.id, records(*[2**50] * 8))
    assert outcomes(resp) == [A] * 7 + [OVER]  # 8 * 2^50 > 2^53 - 1
    assert resp.uses == 7 * 2**50
    assert await stored_uses(redis, lic.id) == 7 * 2**50


async def test_suspended_license_rejects_new_records_only(
    usage: ugrpc.UsageServiceStub, licenses: lgrpc.LicenseServiceStub, make_license: Any
) -> None:
    lic = await make_license(policy_fields={"max_uses": 10})
    await sync(usage, lic.id, records(1))
    await licenses.SuspendLicense(lpb.SuspendLicenseRequest(id=lic.id), metadata=admin_md())
    resp = await sync(usage, lic.id, records(1, 1))
    assert outcomes(resp) == [D, (REJECTED, "LICENSE_SUSPENDED")]
    assert resp.uses == 1


async def test_expired_license_follows_its_strategy(
    usage: ugrpc.UsageServiceStub, make_license: Any, clock: ManualClock
) -> None:
    restrict = await make_license(policy_fields={"duration": {"seconds": 3600}})
    maintain = await make_license(
        policy_fields={"duration": {"seconds": 3600}, "expiration_strategy": 3}
    )
    clock.advance(2 * 3600 * 1000)
    assert outcomes(await sync(usage, restrict.id, records(1))) == [(REJECTED, "LICENSE_EXPIRED")]
    assert outcomes(await sync(usage, maintain.id, records(1))) == [A]


async def test_new_usage_period_resets_before_records(
    usage: ugrpc.UsageServiceStub, make_license: Any, clock: ManualClock, redis: aioredis.Redis
) -> None:
    lic = await make_license(policy_fields={"max_uses": 3, "usage_reset_interval": 2})  # DAILY
    assert outcomes(await sync(usage, lic.id, records(3))) == [A]
    clock.advance(DAY_MS)
    resp = await sync(usage, lic.id, records(2, 1, 1, prefix="day2-"))
    assert outcomes(resp) == [A, A, OVER]
    assert resp.uses == 3 and await stored_uses(redis, lic.id) == 3


async def test_records_emit_usage_events(
    usage: ugrpc.UsageServiceStub, make_license: Any, redis: aioredis.Redis
) -> None:
    lic = await make_license(policy_fields={"max_uses": 3})
    await sync(usage, lic.id, records(2, 1, 1))
    events = [e for _, e in await redis.xrange(keys.license_events(lic.id))]
    assert [(e["type"], e["amount"], e["uses"], e["rid"]) for e in events] == [
        ("inc", "2", "2", "r0"),
        ("inc", "1", "3", "r1"),
        ("limit", "1", "3", "r1"),
    ]


async def test_empty_sync_reports_uses(usage: ugrpc.UsageServiceStub, make_license: Any) -> None:
    lic = await make_license()
    await sync(usage, lic.id, records(4))
    resp = await sync(usage, lic.id, [])
    assert (list(resp.results), resp.uses) == ([], 4)


async def test_bad_records_are_refused_before_anything_is_applied(
    usage: ugrpc.UsageServiceStub, make_license: Any, redis: aioredis.Redis
) -> None:
    lic = await make_license(policy_fields={"max_uses": 10})
    cases = [
        (records(1, 1, 1, 1), 3, {"id": "has space"}, "records[3].id"),
        (records(1, 1), 1, {"id": ""}, "records[1].id"),
        (records(1, 1), 0, {"id": "x" * 129}, "records[0].id"),
        (records(1, 1), 1, {"amount": -1}, "records[1].amount"),
        (records(1, 1), 1, {"amount": 2**50 + 1}, "records[1].amount"),
        (records(1), 0, {"occur_time": {"seconds": -5}}, "records[0].occur_time"),
        (records(1), 0, {"occur_time": {"seconds": 2**62}}, "records[0].occur_time"),
    ]
    for recs, index, change, field in cases:
        for name, value in change.items():
            if name == "occur_time":
                recs[index].occur_time.seconds = value["seconds"]
            else:
                setattr(recs[index], name, value)
        err = await expect_error(sync(usage, lic.id, recs))
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT, field
        assert err.reason == "INVALID_ARGUMENT"
        assert err.bad_fields == [field]
    err = await expect_error(sync(usage, lic.id, records(*[1] * 1001)))
    assert err.bad_fields == ["records"]
    many_bad = [usage_pb2.UsageRecord(id=f"bad id {i}", amount=-1) for i in range(1000)]
    err = await expect_error(sync(usage, lic.id, many_bad))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert 0 < len(err.bad_fields) <= 20
    assert await stored_uses(redis, lic.id) == 0
    assert not await redis.exists(keys.usage_record(lic.id, "r0"))
    err = await expect_error(sync(usage, "", records(1)))
    assert err.bad_fields == ["license_id"]


async def test_unknown_license(usage: ugrpc.UsageServiceStub) -> None:
    err = await expect_error(sync(usage, "01900000-0000-7000-8000-000000000000", records(1)))
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert err.reason == "LICENSE_NOT_FOUND"


async def test_license_key_may_sync_its_own_license_only(
    usage: ugrpc.UsageServiceStub, make_license: Any
) -> None:
    mine = await make_license(policy_fields={"max_uses": 10})
    other = await make_license(policy_fields={"max_uses": 10})
    resp = await sync(usage, mine.id, records(2), md=license_md(mine.key))
    assert outcomes(resp) == [A]
    err = await expect_error(sync(usage, other.id, records(2), md=license_md(mine.key)))
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    err = await expect_error(sync(usage, mine.id, records(2), md=license_md("wrong-key")))
    assert err.code == grpc.StatusCode.UNAUTHENTICATED


async def test_concurrent_sync_and_increment_never_overgrant(
    running: Running, make_license: Any, redis: aioredis.Redis
) -> None:
    lic = await make_license(policy_fields={"max_uses": 60})
    channels = [grpc.aio.insecure_channel(running.target) for _ in range(4)]
    try:
        stubs = [ugrpc.UsageServiceStub(ch) for ch in channels]

        async def syncer(i: int) -> int:
            resp = await sync(stubs[i % 4], lic.id, records(*[1] * 20, prefix=f"s{i}-"))
            assert {r.outcome for r in resp.results} <= {APPLIED, REJECTED}
            return sum(r.outcome == APPLIED for r in resp.results)

        async def incrementer(i: int) -> int:
            try:
                await stubs[i % 4].IncrementUsage(
                    upb.IncrementUsageRequest(license_id=lic.id), metadata=admin_md()
                )
            except grpc.aio.AioRpcError as exc:
                reason = rich_error(exc).reason
                assert reason == "USAGE_LIMIT_EXCEEDED", reason
                return 0
            return 1

        granted = await asyncio.gather(
            *(syncer(i) for i in range(5)), *(incrementer(i) for i in range(40))
        )
    finally:
        for ch in channels:
            await ch.close()
    assert sum(granted) == 60  # 140 asked for, 60 granted, not one more
    assert await stored_uses(redis, lic.id) == 60
