"""Feature meters: several counters per license, each with its own limit, overage, reset
period, override and entitlement, checked and moved like the license's own counter."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import redis.asyncio as aioredis
from google.protobuf import field_mask_pb2

from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import policy_pb2, usage_pb2
from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from meter_grpc.domain import license_file
from meter_grpc.domain.clock import ManualClock
from meter_grpc.storage import keys
from tests.conftest import Running
from tests.support import admin_md, expect_error, license_md

DAILY = policy_pb2.USAGE_RESET_INTERVAL_DAILY


def meter(code: str, max_uses: int | None = None, **fields: Any) -> policy_pb2.Meter:
    if max_uses is not None:
        fields["max_uses"] = max_uses
    return policy_pb2.Meter(code=code, **fields)


async def inc(
    usage: ugrpc.UsageServiceStub,
    license_id: str,
    meter_code: str = "",
    amount: int = 0,
    request_id: str = "",
    md: Any = None,
) -> Any:
    return await usage.IncrementUsage(
        upb.IncrementUsageRequest(
            license_id=license_id, amount=amount, request_id=request_id, meter=meter_code
        ),
        metadata=md or admin_md(),
    )


async def get(usage: ugrpc.UsageServiceStub, license_id: str, meter_code: str = "") -> Any:
    return await usage.GetUsage(
        upb.GetUsageRequest(license_id=license_id, meter=meter_code), metadata=admin_md()
    )


async def listed(usage: ugrpc.UsageServiceStub, license_id: str) -> dict[str, Any]:
    r = await usage.ListUsage(upb.ListUsageRequest(license_id=license_id), metadata=admin_md())
    return {u.meter: u for u in r.usages}


async def test_200_concurrent_increments_on_two_meters(
    running: Running, make_license: Any, usage: ugrpc.UsageServiceStub
) -> None:
    lic = await make_license(
        policy_fields={"max_uses": 7, "meters": [meter("API_CALLS", 25), meter("EXPORTS", 40)]}
    )
    channels = [grpc.aio.insecure_channel(running.target) for _ in range(4)]
    try:
        stubs = [ugrpc.UsageServiceStub(ch) for ch in channels]

        async def one(i: int) -> grpc.StatusCode:
            code = "API_CALLS" if i % 2 else "EXPORTS"
            try:
                await inc(stubs[i % 4], lic.id, code)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        codes = await asyncio.gather(*(one(i) for i in range(200)))
    finally:
        for ch in channels:
            await ch.close()
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    oks = [c == grpc.StatusCode.OK for c in codes]
    assert sum(ok for i, ok in enumerate(oks) if i % 2) == 25
    assert sum(ok for i, ok in enumerate(oks) if not i % 2) == 40
    assert (await get(usage, lic.id, "API_CALLS")).uses == 25
    assert (await get(usage, lic.id, "EXPORTS")).uses == 40
    own = await get(usage, lic.id)
    assert (own.uses, own.max_uses) == (0, 7)  # the license counter untouched
    rows = await listed(usage, lic.id)
    assert list(rows) == ["", "API_CALLS", "EXPORTS"]
    assert (rows["API_CALLS"].uses, rows["API_CALLS"].remaining) == (25, 0)
    assert (rows["EXPORTS"].uses, rows["EXPORTS"].max_uses) == (40, 40)


async def test_meter_limit_error_bulk_decrement_reset(
    make_license: Any, usage: ugrpc.UsageServiceStub, redis: aioredis.Redis
) -> None:
    lic = await make_license(policy_fields={"meters": [meter("GPU_SECONDS", 10)]})
    r = await inc(usage, lic.id, "GPU_SECONDS", amount=8)
    assert (r.uses, r.max_uses, r.remaining) == (8, 10, 2)
    err = await expect_error(inc(usage, lic.id, "GPU_SECONDS", amount=3))
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.reason == "USAGE_LIMIT_EXCEEDED"
    assert (err.metadata["meter"], err.metadata["limit"], err.metadata["uses"]) == (
        "GPU_SECONDS",
        "10",
        "8",
    )
    assert err.quota_subjects == [f"license:{lic.id}:meter:GPU_SECONDS"]
    d = await usage.DecrementUsage(
        upb.DecrementUsageRequest(license_id=lic.id, amount=5, meter="GPU_SECONDS"),
        metadata=admin_md(),
    )
    assert d.uses == 3
    err = await expect_error(
        usage.DecrementUsage(
            upb.DecrementUsageRequest(license_id=lic.id, amount=4, meter="GPU_SECONDS"),
            metadata=admin_md(),
        )
    )
    assert err.reason == "USAGE_UNDERFLOW"
    z = await usage.ResetUsage(
        upb.ResetUsageRequest(license_id=lic.id, meter="GPU_SECONDS"), metadata=admin_md()
    )
    assert z.uses == 0
    assert await redis.hget(keys.license(lic.id), "uses") == "0"


async def test_meter_overage_and_override(
    make_license: Any, usage: ugrpc.UsageServiceStub, licenses: lgrpc.LicenseServiceStub
) -> None:
    lic = await make_license(
        policy_fields={
            "meters": [
                meter("A", 8, overage_strategy=policy_pb2.OVERAGE_STRATEGY_ALLOW_1_25X_OVERAGE),
                meter("B", 5),
            ]
        },
        meter_overrides={"B": 2},
    )
    assert dict(lic.meter_overrides) == {"B": 2}
    r = await inc(usage, lic.id, "A", amount=10)  # 1.25 x 8
    assert (r.uses, r.max_uses, r.overage_limit, r.remaining) == (10, 8, 10, 0)
    await expect_error(inc(usage, lic.id, "A"))
    await inc(usage, lic.id, "B", amount=2)
    err = await expect_error(inc(usage, lic.id, "B"))
    assert err.metadata["limit"] == "2"
    # raising the override through UpdateLicense applies at once
    await licenses.UpdateLicense(
        lpb.UpdateLicenseRequest(
            license={"id": lic.id, "meter_overrides": {"B": 4}},
            update_mask=field_mask_pb2.FieldMask(paths=["meter_overrides"]),
        ),
        metadata=admin_md(),
    )
    assert (await inc(usage, lic.id, "B", amount=2)).uses == 4
    rows = await listed(usage, lic.id)
    assert rows["B"].max_uses == 4 and rows["A"].overage_limit == 10


async def test_meter_period_reset(
    make_license: Any, usage: ugrpc.UsageServiceStub, clock: ManualClock
) -> None:
    lic = await make_license(
        policy_fields={"meters": [meter("DAILY_JOBS", 3, usage_reset_interval=DAILY)]}
    )
    r = await inc(usage, lic.id, "DAILY_JOBS", amount=3)
    assert r.uses == 3 and r.HasField("period_end_time")
    end = r.period_end_time.ToMilliseconds()
    await expect_error(inc(usage, lic.id, "DAILY_JOBS"))
    clock.advance(end - clock.now_ms() + 1)
    assert (await listed(usage, lic.id))["DAILY_JOBS"].uses == 0  # read lazily
    r = await inc(usage, lic.id, "DAILY_JOBS")
    assert r.uses == 1 and r.period_end_time.ToMilliseconds() == end + 86_400_000
    assert (await get(usage, lic.id)).uses == 0


async def test_meter_not_found_and_not_entitled(
    make_license: Any, usage: ugrpc.UsageServiceStub, licenses: lgrpc.LicenseServiceStub
) -> None:
    lic = await make_license(
        policy_fields={
            "entitlements": ["BASE"],
            "meters": [meter("FREE", 5, entitlement="BASE"), meter("PRO", 5, entitlement="PRO")],
        }
    )
    err = await expect_error(inc(usage, lic.id, "NOPE"))
    assert (err.code, err.reason) == (grpc.StatusCode.NOT_FOUND, "METER_NOT_FOUND")
    assert err.metadata["meter"] == "NOPE"
    err = await expect_error(get(usage, lic.id, "NOPE"))
    assert err.reason == "METER_NOT_FOUND"
    assert (await inc(usage, lic.id, "FREE")).uses == 1  # the policy grants BASE
    err = await expect_error(inc(usage, lic.id, "PRO"))
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "METER_NOT_ENTITLED")
    assert (await get(usage, lic.id, "PRO")).uses == 0
    assert not (await listed(usage, lic.id))["PRO"].entitled
    await licenses.UpdateLicense(
        lpb.UpdateLicenseRequest(
            license={"id": lic.id, "entitlements": ["PRO"]},
            update_mask=field_mask_pb2.FieldMask(paths=["entitlements"]),
        ),
        metadata=admin_md(),
    )
    assert (await inc(usage, lic.id, "PRO")).uses == 1
    assert (await listed(usage, lic.id))["PRO"].entitled


async def test_meter_idempotency(make_license: Any, usage: ugrpc.UsageServiceStub) -> None:
    lic = await make_license(policy_fields={"meters": [meter("A", 10), meter("B", 10)]})
    first = await inc(usage, lic.id, "A", amount=2, request_id="r-1")
    again = await inc(usage, lic.id, "A", amount=2, request_id="r-1")
    assert (first.uses, again.uses, again.replayed) == (2, 2, True)
    err = await expect_error(inc(usage, lic.id, "B", amount=2, request_id="r-1"))
    assert err.reason == "REQUEST_ID_REUSED"
    assert (await get(usage, lic.id, "A")).uses == 2
    assert (await get(usage, lic.id, "B")).uses == 0


async def test_bad_meter_input_changes_nothing(
    make_license: Any,
    make_policy: Any,
    usage: ugrpc.UsageServiceStub,
    licenses: lgrpc.LicenseServiceStub,
) -> None:
    lic = await make_license(policy_fields={"meters": [meter("A", 10)]})
    err = await expect_error(inc(usage, lic.id, "a:b"))
    assert err.reason == "INVALID_ARGUMENT" and err.bad_fields[0] == "meter"
    for bad, field in [
        ([meter("lower")], "policy.meters[0].code"),
        ([meter("A"), meter("A")], "policy.meters[1].code"),
        ([meter("A", -1)], "policy.meters[0].max_uses"),
        ([meter("")], "policy.meters[0].code"),
        ([meter("A", entitlement="a b")], "policy.meters[0].entitlement"),
        ([meter("A", overage_strategy=99)], "policy.meters[0].overage_strategy"),
    ]:
        err = await expect_error(make_policy(meters=bad))
        assert err.reason == "INVALID_ARGUMENT", bad
        assert err.bad_fields[0] == field, (bad, err.bad_fields)
    err = await expect_error(make_policy(meters=[meter(f"M{i}") for i in range(65)]))
    assert err.bad_fields[0] == "policy.meters"
    err = await expect_error(make_license(policy_id=lic.policy_id, meter_overrides={"x": 1}))
    assert err.bad_fields[0].startswith("license.meter_overrides[")
    assert (await get(usage, lic.id, "A")).uses == 0


async def test_license_key_lists_its_own_usage_only(
    make_license: Any, usage: ugrpc.UsageServiceStub, licenses: lgrpc.LicenseServiceStub
) -> None:
    lic = await make_license(policy_fields={"meters": [meter("A", 3)]})
    other = await make_license(policy_id=lic.policy_id)
    r = await inc(usage, lic.id, "A", md=license_md(lic.key))
    assert r.uses == 1
    own = await usage.ListUsage(
        upb.ListUsageRequest(license_id=lic.id), metadata=license_md(lic.key)
    )
    assert [u.meter for u in own.usages] == ["", "A"]
    err = await expect_error(
        usage.ListUsage(upb.ListUsageRequest(license_id=other.id), metadata=license_md(lic.key))
    )
    assert err.reason == "PERMISSION_DENIED"


async def test_policy_update_adds_changes_removes_meters_on_every_license(
    make_policy: Any,
    licenses: lgrpc.LicenseServiceStub,
    usage: ugrpc.UsageServiceStub,
    redis: aioredis.Redis,
) -> None:
    policy = await make_policy(max_uses=100)
    ids = []
    for _ in range(30):
        r = await licenses.CreateLicense(
            lpb.CreateLicenseRequest(license={"policy_id": policy.id}), metadata=admin_md()
        )
        ids.append(r.license.id)
    before = await redis.hgetall(keys.license(ids[0]))
    assert not [f for f in before if f.startswith(("pm:", "m:", "p_meters"))]

    async def update(meters: list[policy_pb2.Meter]) -> None:
        await licenses.UpdatePolicy(
            lpb.UpdatePolicyRequest(
                policy=policy_pb2.Policy(id=policy.id, meters=meters),
                update_mask=field_mask_pb2.FieldMask(paths=["meters"]),
            ),
            metadata=admin_md(),
        )

    await update([meter("A", 2), meter("B", 1)])  # added
    for lid in ids:
        assert (await inc(usage, lid, "A", amount=2)).uses == 2
        await inc(usage, lid, "B")
        await expect_error(inc(usage, lid, "A"))
    got = await licenses.GetLicense(lpb.GetLicenseRequest(id=ids[0]), metadata=admin_md())
    assert got.license.policy_id == policy.id
    await update([meter("A", 5)])  # A changed, B removed
    for lid in ids:
        assert (await inc(usage, lid, "A", amount=3)).uses == 5
        err = await expect_error(inc(usage, lid, "B"))
        assert err.reason == "METER_NOT_FOUND"
        h = await redis.hgetall(keys.license(lid))
        assert not [f for f in h if f.startswith(("pm:B", "m:B:"))]
    await update([])  # all removed: the license hash is back to its own fields
    for lid in ids:
        h = await redis.hgetall(keys.license(lid))
        assert not [f for f in h if f.startswith(("pm:", "m:", "p_meters"))], h
        assert (await inc(usage, lid)).uses == 1
    p = await licenses.GetPolicy(lpb.GetPolicyRequest(id=policy.id), metadata=admin_md())
    assert p.policy.propagated_revision == p.policy.revision and not p.policy.meters


async def test_policy_meters_round_trip(make_policy: Any) -> None:
    p = await make_policy(
        entitlements=["X"],
        meters=[
            meter("API_CALLS", 100, usage_reset_interval=DAILY, entitlement="X"),
            meter("UNLIMITED"),
        ],
    )
    assert [m.code for m in p.meters] == ["API_CALLS", "UNLIMITED"]
    assert p.meters[0].max_uses == 100 and p.meters[0].entitlement == "X"
    assert not p.meters[1].HasField("max_uses")


async def test_sync_records_of_meters(
    make_license: Any,
    usage: ugrpc.UsageServiceStub,
    licenses: lgrpc.LicenseServiceStub,
    redis: aioredis.Redis,
) -> None:
    lic = await make_license(policy_fields={"max_uses": 100, "meters": [meter("A", 5)]})
    await usage.ReserveUsage(
        upb.ReserveUsageRequest(license_id=lic.id, meter="A", amount=2), metadata=admin_md()
    )

    def rec(rid: str, amount: int, code: str = "") -> usage_pb2.UsageRecord:
        return usage_pb2.UsageRecord(id=rid, amount=amount, meter=code)

    async def sync(*records: usage_pb2.UsageRecord) -> Any:
        return await usage.SyncUsage(
            upb.SyncUsageRequest(license_id=lic.id, records=records), metadata=admin_md()
        )

    U = usage_pb2
    r = await sync(rec("a1", 2, "A"), rec("own", 7), rec("a2", 2, "A"), rec("b1", 1, "B"))
    assert [(x.outcome, x.reason) for x in r.results] == [
        (U.USAGE_RECORD_OUTCOME_APPLIED, ""),
        (U.USAGE_RECORD_OUTCOME_APPLIED, ""),
        (U.USAGE_RECORD_OUTCOME_REJECTED, "USAGE_LIMIT_EXCEEDED"),  # 2 used + 2 held + 2 > 5
        (U.USAGE_RECORD_OUTCOME_REJECTED, "METER_NOT_FOUND"),
    ]
    assert r.uses == 7
    assert (await get(usage, lic.id, "A")).uses == 2
    # the same id for another meter is a reuse; METER_NOT_FOUND was not remembered
    r = await sync(rec("a1", 2), rec("b1", 1, "B"))
    assert [x.reason for x in r.results] == ["REQUEST_ID_REUSED", "METER_NOT_FOUND"]
    assert await redis.exists(keys.usage_record(lic.id, "b1")) == 0
    await licenses.UpdatePolicy(
        lpb.UpdatePolicyRequest(
            policy=policy_pb2.Policy(id=lic.policy_id, meters=[meter("A", 5), meter("B", 1)]),
            update_mask=field_mask_pb2.FieldMask(paths=["meters"]),
        ),
        metadata=admin_md(),
    )
    r = await sync(rec("b1", 1, "B"), rec("a1", 2, "A"))
    assert [x.outcome for x in r.results] == [
        U.USAGE_RECORD_OUTCOME_APPLIED,
        U.USAGE_RECORD_OUTCOME_DUPLICATE,
    ]
    err = await expect_error(sync(rec("x", 1, "bad code")))
    assert err.bad_fields == ["records[0].meter"]


async def test_stream_and_batch_increments_of_meters(
    make_license: Any, usage: ugrpc.UsageServiceStub
) -> None:
    lic = await make_license(policy_fields={"meters": [meter("A", 3), meter("B", 10)]})
    requests = [
        upb.IncrementUsageRequest(license_id=lic.id, meter="A", request_id=f"s{i}")
        for i in range(4)
    ] + [upb.IncrementUsageRequest(license_id=lic.id, meter="NOPE", request_id="n")]
    answers = [a async for a in usage.StreamUsage(iter(requests), metadata=admin_md())]
    assert [a.result.uses for a in answers[:3]] == [1, 2, 3]
    assert answers[3].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert answers[4].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    batch = await usage.BatchIncrementUsage(
        upb.BatchIncrementUsageRequest(
            items=[
                upb.IncrementUsageRequest(license_id=lic.id, meter="B", amount=4),
                upb.IncrementUsageRequest(license_id=lic.id, meter="B", amount=7),
                upb.IncrementUsageRequest(license_id=lic.id, amount=7),
                upb.IncrementUsageRequest(license_id=lic.id, meter="b"),
            ]
        ),
        metadata=admin_md(),
    )
    r = batch.results
    assert r[0].result.uses == 4 and r[1].HasField("error") and r[2].result.uses == 7
    assert r[3].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert (await get(usage, lic.id, "B")).uses == 4


async def test_watch_filters_by_meter(make_license: Any, usage: ugrpc.UsageServiceStub) -> None:
    lic = await make_license(policy_fields={"meters": [meter("A")]})

    def watch(**fields: Any) -> Any:
        return usage.WatchUsage(
            upb.WatchUsageRequest(license_id=lic.id, after_event_id="0-0", **fields),
            metadata=admin_md(),
        )

    await inc(usage, lic.id, "A", amount=2)
    await inc(usage, lic.id, amount=3)
    await inc(usage, lic.id, "A", amount=4)

    async def first(stream: Any, n: int) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        try:
            async for msg in stream:
                out.append((msg.event.meter, msg.event.amount))
                if len(out) == n:
                    return out
        finally:
            stream.cancel()
        return out

    assert await asyncio.wait_for(first(watch(), 3), 10) == [("A", 2), ("", 3), ("A", 4)]
    assert await asyncio.wait_for(first(watch(meter="A", filter_meter=True), 2), 10) == [
        ("A", 2),
        ("A", 4),
    ]
    assert await asyncio.wait_for(first(watch(filter_meter=True), 1), 10) == [("", 3)]


async def test_license_file_carries_the_meters(
    make_license: Any, usage: ugrpc.UsageServiceStub, licenses: lgrpc.LicenseServiceStub
) -> None:
    lic = await make_license(
        policy_fields={
            "meters": [
                meter("A", 8, overage_strategy=policy_pb2.OVERAGE_STRATEGY_ALLOW_1_5X_OVERAGE),
                meter("PRO", entitlement="PRO", usage_reset_interval=DAILY),
            ]
        },
        meter_overrides={"A": 10},
    )
    await inc(usage, lic.id, "A", amount=4)
    await usage.ReserveUsage(
        upb.ReserveUsageRequest(license_id=lic.id, meter="A", amount=3), metadata=admin_md()
    )
    key = (await licenses.GetPublicKey(lpb.GetPublicKeyRequest(), metadata=admin_md())).public_key
    cert = (
        await licenses.CheckOutLicense(lpb.CheckOutLicenseRequest(id=lic.id), metadata=admin_md())
    ).certificate
    payload = license_file.verify(cert, bytes(key), now_ms=ManualClock().now_ms())
    meters = payload["data"]["attributes"]["meters"]
    assert meters[0] == {
        "code": "A",
        "uses": 4,
        "maxUses": 10,
        "usesLimit": 15,
        "reserved": 3,
        "usagePeriodEnd": None,
        "entitled": True,
    }
    assert meters[1]["code"] == "PRO" and meters[1]["entitled"] is False
    assert meters[1]["usagePeriodEnd"] is not None
    policy = payload["included"][0]["attributes"]
    assert [m["code"] for m in policy["meters"]] == ["A", "PRO"]
    assert policy["meters"][1]["entitlement"] == "PRO"
    # a license without meters: the file has no meters attribute at all
    plain = await make_license()
    cert = (
        await licenses.CheckOutLicense(lpb.CheckOutLicenseRequest(id=plain.id), metadata=admin_md())
    ).certificate
    payload = license_file.verify(cert, bytes(key), now_ms=ManualClock().now_ms())
    assert "meters" not in payload["data"]["attributes"]
    assert "meters" not in payload["included"][0]["attributes"]
