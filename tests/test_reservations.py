"""Usage reservations: units held against a counter's limit until committed, released or
expired (inside the scripts, no sweeper)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import grpc
import redis.asyncio as aioredis
from google.protobuf import duration_pb2

from meter.v1 import policy_pb2, usage_pb2
from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from meter_grpc.domain import ids
from meter_grpc.domain.clock import ManualClock
from meter_grpc.domain.models import ReservationState as S
from meter_grpc.storage import keys
from tests.conftest import Running
from tests.support import admin_md, expect_error, license_md

E = usage_pb2


def meter(code: str, max_uses: int | None = None, **fields: Any) -> policy_pb2.Meter:
    if max_uses is not None:
        fields["max_uses"] = max_uses
    return policy_pb2.Meter(code=code, **fields)


async def reserve(
    usage: ugrpc.UsageServiceStub,
    license_id: str,
    amount: int,
    meter_code: str = "GPU",
    ttl_s: int = 0,
    request_id: str = "",
    md: Any = None,
) -> Any:
    return await usage.ReserveUsage(
        upb.ReserveUsageRequest(
            license_id=license_id,
            meter=meter_code,
            amount=amount,
            ttl=duration_pb2.Duration(seconds=ttl_s) if ttl_s else None,
            request_id=request_id,
        ),
        metadata=md or admin_md(),
    )


async def commit(
    usage: ugrpc.UsageServiceStub,
    license_id: str,
    reservation_id: str,
    amount: int = 0,
    request_id: str = "",
    md: Any = None,
) -> Any:
    return await usage.CommitReservation(
        upb.CommitReservationRequest(
            license_id=license_id,
            reservation_id=reservation_id,
            amount=amount,
            request_id=request_id,
        ),
        metadata=md or admin_md(),
    )


async def release(
    usage: ugrpc.UsageServiceStub, license_id: str, reservation_id: str, request_id: str = ""
) -> Any:
    return await usage.ReleaseReservation(
        upb.ReleaseReservationRequest(
            license_id=license_id, reservation_id=reservation_id, request_id=request_id
        ),
        metadata=admin_md(),
    )


async def get(usage: ugrpc.UsageServiceStub, license_id: str, meter_code: str = "GPU") -> Any:
    return await usage.GetUsage(
        upb.GetUsageRequest(license_id=license_id, meter=meter_code), metadata=admin_md()
    )


async def inc(
    usage: ugrpc.UsageServiceStub, license_id: str, amount: int, meter_code: str = "GPU"
) -> Any:
    return await usage.IncrementUsage(
        upb.IncrementUsageRequest(license_id=license_id, amount=amount, meter=meter_code),
        metadata=admin_md(),
    )


async def test_hold_counts_against_the_limit_and_partial_commit_frees_the_rest(
    make_license: Any, usage: ugrpc.UsageServiceStub, clock: ManualClock
) -> None:
    lic = await make_license(policy_fields={"meters": [meter("GPU", 500)]})
    r = await reserve(usage, lic.id, 400, ttl_s=600)
    res = r.reservation
    assert (res.license_id, res.meter, res.amount, res.state) == (lic.id, "GPU", 400, S.OPEN)
    assert ids.minted_ms(res.id) is not None
    assert res.expire_time.ToMilliseconds() - res.create_time.ToMilliseconds() == 600_000
    assert (r.usage.uses, r.usage.reserved, r.usage.remaining) == (0, 400, 100)
    err = await expect_error(inc(usage, lic.id, 101))
    assert (err.code, err.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "USAGE_LIMIT_EXCEEDED")
    assert (err.metadata["reserved"], err.metadata["remaining"]) == ("400", "100")
    assert (await inc(usage, lic.id, 100)).reserved == 400
    err = await expect_error(reserve(usage, lic.id, 1))
    assert err.reason == "USAGE_LIMIT_EXCEEDED" and err.metadata["reserved"] == "400"
    c = await commit(usage, lic.id, res.id, 300)
    assert (c.reservation.state, c.reservation.committed_amount) == (S.COMMITTED, 300)
    assert (c.usage.uses, c.usage.reserved, c.usage.remaining) == (400, 0, 100)
    got = await get(usage, lic.id)
    assert (got.uses, got.reserved, got.remaining) == (400, 0, 100)
    listed = await usage.ListUsage(upb.ListUsageRequest(license_id=lic.id), metadata=admin_md())
    assert [(u.meter, u.uses, u.reserved) for u in listed.usages] == [("", 0, 0), ("GPU", 400, 0)]
    # committed: a second commit or a release is refused, counting nothing
    err = await expect_error(commit(usage, lic.id, res.id))
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_EXPIRED")
    assert err.metadata["state"] == "committed"
    err = await expect_error(release(usage, lic.id, res.id))
    assert err.metadata["state"] == "committed"
    assert (await get(usage, lic.id)).uses == 400


async def test_reservation_expires_by_itself_and_commit_after_expiry_counts_nothing(
    make_license: Any, usage: ugrpc.UsageServiceStub, clock: ManualClock, redis: aioredis.Redis
) -> None:
    clock.set(clock.now_ms())  # stands still: the expiry is to the millisecond
    lic = await make_license(policy_fields={"meters": [meter("GPU", 100)]})
    res = (await reserve(usage, lic.id, 100, ttl_s=5)).reservation
    await expect_error(inc(usage, lic.id, 1))
    clock.advance(4_999)
    assert (await get(usage, lic.id)).reserved == 100
    clock.advance(1)
    listed = await usage.ListUsage(upb.ListUsageRequest(license_id=lic.id), metadata=admin_md())
    assert [u.reserved for u in listed.usages] == [0, 0]  # ListUsage releases it too
    got = await get(usage, lic.id)
    assert (got.reserved, got.remaining) == (0, 100)
    assert await redis.hget(keys.license(lic.id), "rsvn") is None
    err = await expect_error(commit(usage, lic.id, res.id, 10))
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_EXPIRED")
    assert err.metadata["state"] == "expired"
    assert (await get(usage, lic.id)).uses == 0
    assert (await inc(usage, lic.id, 100)).uses == 100
    # past the retention the record is forgotten: NOT_FOUND (with no reservation open)
    clock.advance(25 * 3600 * 1000)
    err = await expect_error(commit(usage, lic.id, res.id))
    assert (err.code, err.reason) == (grpc.StatusCode.NOT_FOUND, "RESERVATION_NOT_FOUND")
    assert await redis.exists(*keys.reservation_keys(lic.id)) == 0


async def test_commit_release_and_reserve_are_idempotent_under_request_id(
    make_license: Any, usage: ugrpc.UsageServiceStub
) -> None:
    lic = await make_license(policy_fields={"meters": [meter("GPU", 100)]})
    err = await expect_error(reserve(usage, lic.id, 101))
    assert (err.reason, err.metadata["reserved"], err.metadata["requested"]) == (
        "USAGE_LIMIT_EXCEEDED",
        "0",
        "101",
    )
    a = await reserve(usage, lic.id, 30, request_id="job-1")
    again = await reserve(usage, lic.id, 30, request_id="job-1")
    assert again.replayed and again.reservation.id == a.reservation.id
    assert (await get(usage, lic.id)).reserved == 30
    err = await expect_error(reserve(usage, lic.id, 31, request_id="job-1"))
    assert err.reason == "REQUEST_ID_REUSED"
    c1 = await commit(usage, lic.id, a.reservation.id, 20, request_id="done-1")
    c2 = await commit(usage, lic.id, a.reservation.id, 20, request_id="done-1")
    assert (c1.replayed, c2.replayed) == (False, True)
    assert c2.reservation.committed_amount == 20 and c2.usage.uses == 20
    assert (await get(usage, lic.id)).uses == 20
    b = (await reserve(usage, lic.id, 50)).reservation
    r1 = await release(usage, lic.id, b.id, request_id="rel-1")
    r2 = await release(usage, lic.id, b.id, request_id="rel-1")
    assert r1.reservation.state == r2.reservation.state == S.RELEASED and r2.replayed
    got = await get(usage, lic.id)
    assert (got.uses, got.reserved, got.remaining) == (20, 0, 80)


async def test_bad_reservation_input_and_unknown_ids(
    make_license: Any, usage: ugrpc.UsageServiceStub, redis: aioredis.Redis
) -> None:
    lic = await make_license(policy_fields={"meters": [meter("GPU", 100)]})
    before = await redis.hgetall(keys.license(lic.id))
    for call, field in [
        (reserve(usage, lic.id, -1), "amount"),
        (reserve(usage, lic.id, 1, meter_code="gpu"), "meter"),
        (reserve(usage, lic.id, 1, ttl_s=8 * 86400), "ttl"),
        (reserve(usage, "nope", 1), "license_id"),
        (commit(usage, lic.id, "nope"), "reservation_id"),
        (commit(usage, lic.id, ""), "reservation_id"),
    ]:
        err = await expect_error(call)
        assert (err.reason, err.bad_fields[0]) == ("INVALID_ARGUMENT", field)
    err = await expect_error(commit(usage, lic.id, ids.new_id()))
    assert (err.code, err.reason) == (grpc.StatusCode.NOT_FOUND, "RESERVATION_NOT_FOUND")
    err = await expect_error(reserve(usage, lic.id, 1, meter_code="NOPE"))
    assert err.reason == "METER_NOT_FOUND"
    assert await redis.hgetall(keys.license(lic.id)) == before
    res = (await reserve(usage, lic.id, 10)).reservation
    err = await expect_error(commit(usage, lic.id, res.id, 11))
    assert (err.reason, err.bad_fields) == ("INVALID_ARGUMENT", ["amount"])
    assert (await get(usage, lic.id)).reserved == 10


async def test_reservations_of_the_license_counter_and_entitlement(
    make_license: Any, usage: ugrpc.UsageServiceStub
) -> None:
    lic = await make_license(
        policy_fields={"max_uses": 10, "meters": [meter("PRO", 5, entitlement="PRO")]}
    )
    r = await reserve(usage, lic.id, 8, meter_code="")
    assert (r.usage.reserved, r.usage.remaining) == (8, 2)
    err = await expect_error(
        usage.IncrementUsage(
            upb.IncrementUsageRequest(license_id=lic.id, amount=3), metadata=admin_md()
        )
    )
    assert err.metadata["reserved"] == "8"
    await commit(usage, lic.id, r.reservation.id, 0)  # 0 = all
    got = await usage.GetUsage(upb.GetUsageRequest(license_id=lic.id), metadata=admin_md())
    assert (got.uses, got.reserved) == (8, 0)
    err = await expect_error(reserve(usage, lic.id, 1, meter_code="PRO"))
    assert err.reason == "METER_NOT_ENTITLED"


async def test_license_key_reserves_for_its_own_license_only(
    make_license: Any, usage: ugrpc.UsageServiceStub
) -> None:
    lic = await make_license(policy_fields={"meters": [meter("GPU", 100)]})
    other = await make_license(policy_id=lic.policy_id)
    md = license_md(lic.key)
    res = (await reserve(usage, lic.id, 10, md=md)).reservation
    assert (await commit(usage, lic.id, res.id, 4, md=md)).usage.uses == 4
    err = await expect_error(reserve(usage, other.id, 1, md=md))
    assert err.reason == "PERMISSION_DENIED"
    theirs = (await reserve(usage, other.id, 1)).reservation
    err = await expect_error(commit(usage, other.id, theirs.id, md=md))
    assert err.reason == "PERMISSION_DENIED"
    # naming its own license with another license's reservation id finds nothing
    err = await expect_error(commit(usage, lic.id, theirs.id, md=md))
    assert err.reason == "RESERVATION_NOT_FOUND"
    assert (await get(usage, other.id)).reserved == 1


async def test_open_reservations_per_license_are_bounded(
    make_license: Any, usage: ugrpc.UsageServiceStub, running: Running
) -> None:
    lic = await make_license(policy_fields={"meters": [meter("GPU")]})
    limit = running.service.metering.max_reservations
    made = []
    for start in range(0, limit, 100):
        batch = await asyncio.gather(
            *(reserve(usage, lic.id, 1) for _ in range(min(100, limit - start)))
        )
        made += [r.reservation.id for r in batch]
    err = await expect_error(reserve(usage, lic.id, 1))
    assert (err.code, err.reason) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RESERVATION_LIMIT_EXCEEDED",
    )
    assert err.metadata["setting"] == "METER_MAX_RESERVATIONS_PER_LICENSE"
    assert (await get(usage, lic.id)).reserved == limit
    await release(usage, lic.id, made[0])
    await reserve(usage, lic.id, 1)


async def test_100_concurrent_reservations_never_pass_the_limit(
    running: Running, make_license: Any, usage: ugrpc.UsageServiceStub, redis: aioredis.Redis
) -> None:
    """100 reservations of 10 against max_uses 500, increments interleaved, a sampler reading
    the counter meanwhile: uses + reserved never passes 500, and the final uses is the sum of
    the committed amounts and the OK increments."""
    lic = await make_license(policy_fields={"meters": [meter("GPU", 500)]})
    rng = random.Random(11)
    committed: list[int] = []
    incremented: list[int] = []
    samples: list[tuple[int, int]] = []
    refusals: list[grpc.StatusCode] = []
    done = asyncio.Event()
    channels = [grpc.aio.insecure_channel(running.target) for _ in range(4)]
    stubs = [ugrpc.UsageServiceStub(ch) for ch in channels]

    async def job(i: int) -> None:
        stub = stubs[i % 4]
        try:
            r = await reserve(stub, lic.id, 10)
        except grpc.aio.AioRpcError as exc:
            refusals.append(exc.code())
            return
        await asyncio.sleep(rng.random() / 5)
        if i % 5 == 0:
            await release(stub, lic.id, r.reservation.id)
            return
        used = rng.randint(1, 10)
        c = await commit(stub, lic.id, r.reservation.id, used)
        committed.append(c.reservation.committed_amount)

    async def increment(i: int) -> None:
        amount = rng.randint(1, 5)
        await asyncio.sleep(rng.random() / 5)
        try:
            await inc(stubs[i % 4], lic.id, amount)
        except grpc.aio.AioRpcError as exc:
            refusals.append(exc.code())
            return
        incremented.append(amount)

    async def sampler(stub: ugrpc.UsageServiceStub) -> None:
        while not done.is_set():
            g = await get(stub, lic.id)
            samples.append((g.uses, g.reserved))
            await asyncio.sleep(0)

    async def store_sampler() -> None:
        """The two fields read at one moment (one HMGET), as often as the store answers."""
        while not done.is_set():
            u, r = await redis.hmget(keys.license(lic.id), ["m:GPU:u", "m:GPU:r"])
            samples.append((int(u or 0), int(r or 0)))
            await asyncio.sleep(0)

    sampling = asyncio.gather(sampler(stubs[2]), sampler(stubs[3]), store_sampler())
    try:
        tasks = [job(i) for i in range(100)] + [increment(i) for i in range(100)]
        rng.shuffle(tasks)
        await asyncio.gather(*tasks)
    finally:
        done.set()
        await sampling
        for ch in channels:
            await ch.close()
    assert set(refusals) <= {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert len(samples) >= 10
    assert all(u + r <= 500 for u, r in samples), max(u + r for u, r in samples)
    final = await get(usage, lic.id)
    assert final.reserved == 0
    assert final.uses == sum(committed) + sum(incremented)
    assert final.uses <= 500 and committed and incremented


async def test_watch_sees_reserve_commit_release_expire(
    make_license: Any, usage: ugrpc.UsageServiceStub, clock: ManualClock
) -> None:
    lic = await make_license(policy_fields={"meters": [meter("GPU", 100)]})
    stream = usage.WatchUsage(
        upb.WatchUsageRequest(
            license_id=lic.id, after_event_id="0-0", meter="GPU", filter_meter=True
        ),
        metadata=admin_md(),
    )
    a = (await reserve(usage, lic.id, 10)).reservation
    b = (await reserve(usage, lic.id, 20)).reservation
    c = (await reserve(usage, lic.id, 30, ttl_s=2)).reservation
    await usage.IncrementUsage(upb.IncrementUsageRequest(license_id=lic.id), metadata=admin_md())
    await commit(usage, lic.id, a.id, 7)
    await release(usage, lic.id, b.id)
    clock.advance(3000)
    await get(usage, lic.id)
    events: list[Any] = []

    async def collect() -> None:
        async for msg in stream:
            events.append(msg.event)
            if len(events) == 6:
                return

    try:
        await asyncio.wait_for(collect(), 20)
    finally:
        stream.cancel()
    assert [(e.type, e.amount, e.reservation_id, e.meter) for e in events] == [
        (E.USAGE_EVENT_TYPE_RESERVED, 10, a.id, "GPU"),
        (E.USAGE_EVENT_TYPE_RESERVED, 20, b.id, "GPU"),
        (E.USAGE_EVENT_TYPE_RESERVED, 30, c.id, "GPU"),
        (E.USAGE_EVENT_TYPE_COMMITTED, 7, a.id, "GPU"),
        (E.USAGE_EVENT_TYPE_RELEASED, 20, b.id, "GPU"),
        (E.USAGE_EVENT_TYPE_EXPIRED, 30, c.id, "GPU"),
    ]
    assert events[3].uses == 7
