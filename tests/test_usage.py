"""UsageService: increments, decrements, resets, limits, overage, idempotency, concurrency."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import redis.asyncio as aioredis

from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from meter_grpc.storage import keys
from tests.conftest import Running
from tests.support import admin_md, expect_error


async def inc(
    usage: ugrpc.UsageServiceStub, license_id: str, amount: int = 0, request_id: str = ""
) -> Any:
    return await usage.IncrementUsage(
        upb.IncrementUsageRequest(license_id=license_id, amount=amount, request_id=request_id),
        metadata=admin_md(),
    )


async def test_increment_counts_and_reports_limit(
    usage: ugrpc.UsageServiceStub, make_license: Any
) -> None:
    lic = await make_license(policy_fields={"max_uses": 5})
    r = await inc(usage, lic.id)
    assert (r.uses, r.max_uses, r.remaining, r.overage_limit) == (1, 5, 4, 5)
    r = await inc(usage, lic.id, amount=3)
    assert (r.uses, r.remaining) == (4, 1)
    got = await usage.GetUsage(upb.GetUsageRequest(license_id=lic.id), metadata=admin_md())
    assert (got.uses, got.max_uses, got.remaining) == (4, 5, 1)
    assert not got.HasField("period_end_time")


async def test_unlimited_license_has_no_max(
    usage: ugrpc.UsageServiceStub, make_license: Any
) -> None:
    lic = await make_license()
    r = await inc(usage, lic.id, amount=1000)
    assert r.uses == 1000
    assert not r.HasField("max_uses")
    assert not r.HasField("remaining")


async def test_limit_exceeded_error_carries_numbers(
    usage: ugrpc.UsageServiceStub, make_license: Any, redis: aioredis.Redis
) -> None:
    lic = await make_license(policy_fields={"max_uses": 3})
    await inc(usage, lic.id, amount=2)
    err = await expect_error(inc(usage, lic.id, amount=2))
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.reason == "USAGE_LIMIT_EXCEEDED"
    assert err.domain == "meter.v1"
    assert err.metadata["limit"] == "3"
    assert err.metadata["uses"] == "2"
    assert err.metadata["requested"] == "2"
    assert err.quota_subjects == [f"license:{lic.id}"]
    assert await redis.hget(keys.license(lic.id), "uses") == "2"


async def test_bulk_increment_is_all_or_nothing(
    usage: ugrpc.UsageServiceStub, make_license: Any
) -> None:
    lic = await make_license(policy_fields={"max_uses": 10})
    await inc(usage, lic.id, amount=7)
    await expect_error(inc(usage, lic.id, amount=4))  # 11 > 10: nothing counted
    r = await inc(usage, lic.id, amount=3)  # exactly to the limit
    assert r.uses == 10 and r.remaining == 0
    err = await expect_error(inc(usage, lic.id))
    assert err.reason == "USAGE_LIMIT_EXCEEDED"


async def test_license_override_beats_policy(
    usage: ugrpc.UsageServiceStub, make_license: Any
) -> None:
    lic = await make_license(policy_fields={"max_uses": 2}, max_uses=4)
    assert lic.max_uses == 4
    r = await inc(usage, lic.id, amount=4)
    assert (r.uses, r.max_uses) == (4, 4)
    assert (await expect_error(inc(usage, lic.id))).metadata["limit"] == "4"


async def test_overage_strategies(usage: ugrpc.UsageServiceStub, make_license: Any) -> None:
    cases = [(2, 8, 10), (3, 3, 4), (4, 5, 10), (1, 8, 8)]  # (strategy, max_uses, ceiling)
    for strategy, max_uses, ceiling in cases:
        lic = await make_license(policy_fields={"max_uses": max_uses, "overage_strategy": strategy})
        r = await inc(usage, lic.id, amount=ceiling)
        assert (r.uses, r.max_uses, r.overage_limit, r.remaining) == (ceiling, max_uses, ceiling, 0)
        err = await expect_error(inc(usage, lic.id))
        assert err.reason == "USAGE_LIMIT_EXCEEDED", strategy
        assert err.metadata["overage_limit"] == str(ceiling)
    lic = await make_license(policy_fields={"max_uses": 1, "overage_strategy": 5})
    r = await inc(usage, lic.id, amount=50)
    assert r.uses == 50 and r.max_uses == 1 and not r.HasField("overage_limit")


async def test_decrement_never_below_zero(usage: ugrpc.UsageServiceStub, make_license: Any) -> None:
    lic = await make_license(policy_fields={"max_uses": 10})
    await inc(usage, lic.id, amount=5)
    r = await usage.DecrementUsage(
        upb.DecrementUsageRequest(license_id=lic.id, amount=2), metadata=admin_md()
    )
    assert r.uses == 3
    err = await expect_error(
        usage.DecrementUsage(
            upb.DecrementUsageRequest(license_id=lic.id, amount=4), metadata=admin_md()
        )
    )
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.reason == "USAGE_UNDERFLOW"
    assert err.metadata["uses"] == "3" and err.metadata["requested"] == "4"
    r = await usage.DecrementUsage(
        upb.DecrementUsageRequest(license_id=lic.id), metadata=admin_md()
    )
    assert r.uses == 2


async def test_reset(usage: ugrpc.UsageServiceStub, make_license: Any) -> None:
    lic = await make_license(policy_fields={"max_uses": 3})
    await inc(usage, lic.id, amount=3)
    r = await usage.ResetUsage(upb.ResetUsageRequest(license_id=lic.id), metadata=admin_md())
    assert (r.uses, r.remaining) == (0, 3)
    assert (await inc(usage, lic.id, amount=3)).uses == 3


async def test_unknown_license(usage: ugrpc.UsageServiceStub) -> None:
    for call in (
        usage.IncrementUsage(
            upb.IncrementUsageRequest(license_id="01900000-0000-7000-8000-000000000000"),
            metadata=admin_md(),
        ),
        usage.DecrementUsage(
            upb.DecrementUsageRequest(license_id="01900000-0000-7000-8000-000000000000"),
            metadata=admin_md(),
        ),
        usage.ResetUsage(
            upb.ResetUsageRequest(license_id="01900000-0000-7000-8000-000000000000"),
            metadata=admin_md(),
        ),
        usage.GetUsage(
            upb.GetUsageRequest(license_id="01900000-0000-7000-8000-000000000000"),
            metadata=admin_md(),
        ),
    ):
        err = await expect_error(call)
        assert err.code == grpc.StatusCode.NOT_FOUND
        assert err.reason == "LICENSE_NOT_FOUND"
        assert err.metadata["id"] == "01900000-0000-7000-8000-000000000000"


async def test_bad_input_is_refused_and_changes_nothing(
    usage: ugrpc.UsageServiceStub, make_license: Any, redis: aioredis.Redis
) -> None:
    lic = await make_license(policy_fields={"max_uses": 10})
    bad = [
        (upb.IncrementUsageRequest(license_id=lic.id, amount=-1), "amount"),
        (upb.IncrementUsageRequest(license_id=lic.id, amount=2**50 + 1), "amount"),
        (upb.IncrementUsageRequest(license_id=lic.id, amount=2**63 - 1), "amount"),
        (upb.IncrementUsageRequest(license_id="", amount=1), "license_id"),
        (upb.IncrementUsageRequest(license_id="x" * 129), "license_id"),
        (upb.IncrementUsageRequest(license_id="has space"), "license_id"),
        (upb.IncrementUsageRequest(license_id=lic.id, request_id="r" * 129), "request_id"),
        (upb.IncrementUsageRequest(license_id=lic.id, request_id="a b"), "request_id"),
    ]
    for request, field in bad:
        err = await expect_error(usage.IncrementUsage(request, metadata=admin_md()))
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT, field
        assert err.reason == "INVALID_ARGUMENT"
        assert field in err.bad_fields
    err = await expect_error(
        usage.DecrementUsage(
            upb.DecrementUsageRequest(license_id=lic.id, amount=-5), metadata=admin_md()
        )
    )
    assert err.bad_fields == ["amount"]
    assert await redis.hget(keys.license(lic.id), "uses") == "0"


async def test_idempotent_retry_returns_first_answer(
    usage: ugrpc.UsageServiceStub, make_license: Any, redis: aioredis.Redis
) -> None:
    lic = await make_license(policy_fields={"max_uses": 10})
    first = await inc(usage, lic.id, amount=3, request_id="req-1")
    await inc(usage, lic.id, amount=1)
    again = await inc(usage, lic.id, amount=3, request_id="req-1")
    assert (first.uses, first.replayed) == (3, False)
    assert (again.uses, again.replayed) == (3, True)
    assert await redis.hget(keys.license(lic.id), "uses") == "4"
    ttl = await redis.pttl(keys.request_record(lic.id, "req-1"))
    assert 23 * 3600 * 1000 < ttl <= 24 * 3600 * 1000


async def test_idempotent_refusal_is_replayed(
    usage: ugrpc.UsageServiceStub, make_license: Any
) -> None:
    lic = await make_license(policy_fields={"max_uses": 2})
    err1 = await expect_error(inc(usage, lic.id, amount=5, request_id="big"))
    err2 = await expect_error(inc(usage, lic.id, amount=5, request_id="big"))
    assert err1.reason == err2.reason == "USAGE_LIMIT_EXCEEDED"


async def test_request_id_reused_with_other_arguments(
    usage: ugrpc.UsageServiceStub, make_license: Any, redis: aioredis.Redis
) -> None:
    lic = await make_license(policy_fields={"max_uses": 10})
    await inc(usage, lic.id, amount=2, request_id="same")
    err = await expect_error(inc(usage, lic.id, amount=3, request_id="same"))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.reason == "REQUEST_ID_REUSED"
    assert err.bad_fields == ["request_id"]
    err = await expect_error(
        usage.DecrementUsage(
            upb.DecrementUsageRequest(license_id=lic.id, amount=2, request_id="same"),
            metadata=admin_md(),
        )
    )
    assert err.reason == "REQUEST_ID_REUSED"
    assert await redis.hget(keys.license(lic.id), "uses") == "2"


async def test_request_ids_are_scoped_to_their_license(
    usage: ugrpc.UsageServiceStub, make_license: Any
) -> None:
    a = await make_license(policy_fields={"max_uses": 10})
    b = await make_license(policy_fields={"max_uses": 10})
    assert (await inc(usage, a.id, amount=2, request_id="shared")).uses == 2
    assert (await inc(usage, b.id, amount=5, request_id="shared")).uses == 5


async def test_twenty_concurrent_copies_count_once(
    running: Running, make_license: Any, redis: aioredis.Redis
) -> None:
    lic = await make_license(policy_fields={"max_uses": 100})
    channels = [grpc.aio.insecure_channel(running.target) for _ in range(4)]
    try:
        stubs = [ugrpc.UsageServiceStub(ch) for ch in channels]
        results = await asyncio.gather(
            *(inc(stubs[i % 4], lic.id, amount=7, request_id="once") for i in range(20))
        )
    finally:
        for ch in channels:
            await ch.close()
    assert {r.uses for r in results} == {7}
    assert sum(not r.replayed for r in results) == 1
    assert await redis.hget(keys.license(lic.id), "uses") == "7"


async def test_hundred_concurrent_increments_against_25(
    running: Running, make_license: Any, redis: aioredis.Redis
) -> None:
    lic = await make_license(policy_fields={"max_uses": 25})
    channels = [grpc.aio.insecure_channel(running.target) for _ in range(5)]
    try:
        stubs = [ugrpc.UsageServiceStub(ch) for ch in channels]

        async def one(i: int) -> str:
            try:
                await inc(stubs[i % len(stubs)], lic.id)
            except grpc.aio.AioRpcError as exc:
                from tests.support import rich_error

                return rich_error(exc).reason
            return "OK"

        outcomes = await asyncio.gather(*(one(i) for i in range(100)))
    finally:
        for ch in channels:
            await ch.close()
    assert outcomes.count("OK") == 25
    assert outcomes.count("USAGE_LIMIT_EXCEEDED") == 75
    assert await redis.hget(keys.license(lic.id), "uses") == "25"


async def test_concurrent_bulk_increments_never_overgrant(
    running: Running, make_license: Any, redis: aioredis.Redis
) -> None:
    lic = await make_license(policy_fields={"max_uses": 100, "overage_strategy": 2})  # ceiling 125
    channels = [grpc.aio.insecure_channel(running.target) for _ in range(4)]
    try:
        stubs = [ugrpc.UsageServiceStub(ch) for ch in channels]

        async def one(i: int) -> int:
            try:
                await inc(stubs[i % 4], lic.id, amount=7)
            except grpc.aio.AioRpcError:
                return 0
            return 7

        granted = sum(await asyncio.gather(*(one(i) for i in range(60))))
    finally:
        for ch in channels:
            await ch.close()
    assert granted == 7 * (125 // 7)
    assert await redis.hget(keys.license(lic.id), "uses") == str(granted)


async def test_stream_usage_answers_each_request_in_order(
    usage: ugrpc.UsageServiceStub, make_license: Any
) -> None:
    lic = await make_license(policy_fields={"max_uses": 3})

    async def requests() -> Any:
        for i in range(5):
            yield upb.IncrementUsageRequest(license_id=lic.id, request_id=f"s{i}")
        yield upb.IncrementUsageRequest(license_id=lic.id, amount=-1, request_id="bad")

    answers = [r async for r in usage.StreamUsage(requests(), metadata=admin_md())]
    assert [a.request_id for a in answers] == ["s0", "s1", "s2", "s3", "s4", "bad"]
    assert [a.result.uses for a in answers[:3]] == [1, 2, 3]
    assert [a.WhichOneof("outcome") for a in answers] == ["result"] * 3 + ["error"] * 3
    assert answers[3].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert answers[5].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


async def test_scripts_are_reloaded_after_a_script_flush(
    usage: ugrpc.UsageServiceStub, make_license: Any, redis: aioredis.Redis
) -> None:
    lic = await make_license(policy_fields={"max_uses": 50})
    await inc(usage, lic.id)
    await redis.script_flush()
    results = await asyncio.gather(*(inc(usage, lic.id) for _ in range(20)))
    assert sorted(r.uses for r in results) == list(range(2, 22))
