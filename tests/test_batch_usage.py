"""BatchIncrementUsage: per-item answers exactly as IncrementUsage, partial success,
idempotency across batches, order within a license, concurrent batches never over-granting."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import redis.asyncio as aioredis
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from meter.v1 import license_service_pb2 as lpb
from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from meter_grpc.domain.clock import ManualClock
from meter_grpc.storage import keys
from tests.conftest import Running
from tests.support import UNKNOWN_ID, admin_md, expect_error, license_md

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def item(license_id: str, amount: int = 0, request_id: str = "") -> upb.IncrementUsageRequest:
    return upb.IncrementUsageRequest(license_id=license_id, amount=amount, request_id=request_id)


async def batch(
    usage: ugrpc.UsageServiceStub, items: list[upb.IncrementUsageRequest], md: Any = None
) -> list[upb.BatchIncrementUsageResult]:
    resp = await usage.BatchIncrementUsage(
        upb.BatchIncrementUsageRequest(items=items), metadata=md or admin_md()
    )
    assert len(resp.results) == len(items)
    return list(resp.results)


def reason(result: upb.BatchIncrementUsageResult) -> str:
    """ "OK" or the ErrorInfo reason of one result."""
    if result.WhichOneof("outcome") == "result":
        return "OK"
    return info(result.error).reason


def info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo:
    for d in status.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            ei = error_details_pb2.ErrorInfo()
            d.Unpack(ei)
            return ei
    raise AssertionError(f"no ErrorInfo in {status}")


def bad_fields(status: status_pb2.Status) -> list[str]:
    for d in status.details:
        if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            d.Unpack(br)
            return [v.field for v in br.field_violations]
    return []


async def test_every_reason_per_item_with_partial_success(
    usage: ugrpc.UsageServiceStub,
    licenses: Any,
    make_license: Any,
    clock: ManualClock,
    redis: aioredis.Redis,
) -> None:
    clock.set(T0)
    limited = await make_license(policy_fields={"max_uses": 3})
    overage = await make_license(policy_fields={"max_uses": 2, "overage_strategy": 4})  # 2x: 4
    suspended = await make_license()
    await licenses.SuspendLicense(lpb.SuspendLicenseRequest(id=suspended.id), metadata=admin_md())
    expiring = await make_license(policy_fields={"duration": duration_pb2.Duration(seconds=60)})
    clock.advance(60_000)
    results = await batch(
        usage,
        [
            item(limited.id, 2),  # 0
            item(limited.id, 2),  # 1: 4 > 3
            item(limited.id, 1, "r1"),  # 2: exactly to the limit
            item(overage.id, 4),  # 3: within 2x overage
            item(overage.id),  # 4: past the ceiling
            item(suspended.id),  # 5
            item(expiring.id),  # 6
            item(UNKNOWN_ID),  # 7
            item(limited.id, -5),  # 8: bad amount
            item(""),  # 9: no license
            item(limited.id, 0, "r1"),  # 10: same request_id, other arguments
            item(limited.id, 1, "r1"),  # 11: replay of item 2
            item(limited.id, 1, "bad id"),  # 12
        ],
    )
    assert [reason(r) for r in results] == [
        "OK",
        "USAGE_LIMIT_EXCEEDED",
        "OK",
        "OK",
        "USAGE_LIMIT_EXCEEDED",
        "LICENSE_SUSPENDED",
        "LICENSE_EXPIRED",
        "LICENSE_NOT_FOUND",
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        "OK",  # amount 0 means 1: the same arguments as item 2
        "OK",
        "INVALID_ARGUMENT",
    ]
    assert (results[0].result.uses, results[2].result.uses, results[2].result.remaining) == (
        2,
        3,
        0,
    )
    assert results[1].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert info(results[1].error).metadata["requested"] == "2"
    assert (results[3].result.uses, results[3].result.overage_limit) == (4, 4)
    assert results[5].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert results[7].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert bad_fields(results[8].error) == ["items[8].amount"]
    assert bad_fields(results[9].error) == ["items[9].license_id"]
    assert bad_fields(results[12].error) == ["items[12].request_id"]
    assert results[10].result.replayed and results[11].result.replayed
    assert [r.request_id for r in results][10:] == ["r1", "r1", "bad id"]
    assert await redis.hget(keys.license(limited.id), "uses") == "3"
    assert await redis.hget(keys.license(overage.id), "uses") == "4"
    # the same request_id with other arguments is refused, as IncrementUsage refuses it
    (reused,) = await batch(usage, [item(limited.id, 2, "r1")])
    assert reason(reused) == "REQUEST_ID_REUSED"
    assert reused.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


async def test_idempotency_across_batches(
    usage: ugrpc.UsageServiceStub, make_license: Any, redis: aioredis.Redis
) -> None:
    a = await make_license(policy_fields={"max_uses": 10})
    b = await make_license(policy_fields={"max_uses": 1})
    first = await batch(usage, [item(a.id, 3, "x"), item(b.id, 1, "y"), item(b.id, 1, "z")])
    assert [reason(r) for r in first] == ["OK", "OK", "USAGE_LIMIT_EXCEEDED"]
    second = await batch(
        usage, [item(b.id, 1, "z"), item(a.id, 3, "x"), item(a.id, 1), item(b.id, 1, "y")]
    )
    # each answer replayed (the refusal included), counted once
    assert [reason(r) for r in second] == ["USAGE_LIMIT_EXCEEDED", "OK", "OK", "OK"]
    assert (second[1].result.uses, second[1].result.replayed) == (3, True)
    assert (second[2].result.uses, second[2].result.replayed) == (4, False)
    assert second[3].result.replayed
    single = await usage.IncrementUsage(item(a.id, 3, "x"), metadata=admin_md())
    assert (single.uses, single.replayed) == (3, True)
    assert await redis.hget(keys.license(a.id), "uses") == "4"
    assert await redis.hget(keys.license(b.id), "uses") == "1"


async def test_items_of_one_license_apply_in_order(
    usage: ugrpc.UsageServiceStub, make_license: Any, redis: aioredis.Redis
) -> None:
    lics = [await make_license(policy_fields={"max_uses": 150}) for _ in range(5)]
    await redis.script_flush()  # a call re-sent after NOSCRIPT would apply out of order
    items = [item(lics[i % 5].id, request_id=f"o{i}") for i in range(1000)]
    results = await batch(usage, items)
    for n, lic in enumerate(lics):
        mine = results[n::5]
        assert [reason(r) for r in mine] == ["OK"] * 150 + ["USAGE_LIMIT_EXCEEDED"] * 50
        assert [r.result.uses for r in mine[:150]] == list(range(1, 151))
        assert await redis.hget(keys.license(lic.id), "uses") == "150"


async def test_more_than_1000_items_are_refused(
    usage: ugrpc.UsageServiceStub, make_license: Any, redis: aioredis.Redis
) -> None:
    lic = await make_license()
    err = await expect_error(
        usage.BatchIncrementUsage(
            upb.BatchIncrementUsageRequest(items=[item(lic.id)] * 1001), metadata=admin_md()
        )
    )
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.reason == "INVALID_ARGUMENT"
    assert err.bad_fields == ["items"]
    assert await redis.hget(keys.license(lic.id), "uses") == "0"
    assert await batch(usage, []) == []


async def test_license_key_batches_only_its_own_license(
    usage: ugrpc.UsageServiceStub, make_license: Any, redis: aioredis.Redis
) -> None:
    mine = await make_license()
    other = await make_license()
    err = await expect_error(
        batch(usage, [item(mine.id), item(other.id), item(mine.id, 2)], md=license_md(mine.key))
    )
    assert (err.code, err.reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
    # refused whole (deny by default, api/auth.py): nothing of it applied
    assert await redis.hget(keys.license(other.id), "uses") == "0"
    assert await redis.hget(keys.license(mine.id), "uses") == "0"
    results = await batch(usage, [item(mine.id), item(mine.id, 2)], md=license_md(mine.key))
    assert [r.result.uses for r in results] == [1, 3]


async def test_concurrent_batches_over_four_channels_never_overgrant(
    running: Running, make_license: Any, redis: aioredis.Redis
) -> None:
    limited = await make_license(policy_fields={"max_uses": 500, "overage_strategy": 2})  # 625
    free = await make_license()
    items = [item(limited.id, 3 if i % 2 else 2) for i in range(100)] + [
        item(free.id, 1) for _ in range(50)
    ]
    channels = [grpc.aio.insecure_channel(running.target) for _ in range(4)]
    try:
        stubs = [ugrpc.UsageServiceStub(ch) for ch in channels]
        answers = await asyncio.gather(*(batch(stubs[b % 4], items) for b in range(16)))
    finally:
        for ch in channels:
            await ch.close()
    granted = 0
    seen: list[int] = []
    for results in answers:
        for it, r in zip(items[:100], results[:100], strict=True):
            assert reason(r) in ("OK", "USAGE_LIMIT_EXCEEDED")
            if reason(r) == "OK":
                granted += it.amount
                seen.append(r.result.uses)
        assert all(reason(r) == "OK" for r in results[100:])
    uses = int(await redis.hget(keys.license(limited.id), "uses") or 0)
    assert granted == uses  # every granted unit counted, none refused counted
    assert 625 - 2 <= uses <= 625  # the ceiling holds; once full, at most a 2 could still fit
    assert len(set(seen)) == len(seen)  # each grant saw its own counter value
    assert await redis.hget(keys.license(free.id), "uses") == str(16 * 50)
