"""Suspend, reinstate, renew, expiry and its four strategies, EXPIRING, check-in, and usage
periods with a moved clock (including increments straddling a period boundary)."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf import duration_pb2

from meter.v1 import license_pb2
from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from meter_grpc.domain.clock import ManualClock
from meter_grpc.storage import keys
from tests.conftest import Running
from tests.machine_helpers import activate, get_license, outcome, validate
from tests.support import admin_md, expect_error, license_md, rich_error

DAY = 86_400_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
STATUS = license_pb2.LicenseStatus


def secs(n: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromMilliseconds(int(n * 1000))
    return d


def ms(*args: int) -> int:
    return int(dt.datetime(*args, tzinfo=dt.UTC).timestamp() * 1000)


async def inc(
    usage: ugrpc.UsageServiceStub, license_id: str, amount: int = 0, md: Any = None
) -> Any:
    return await usage.IncrementUsage(
        upb.IncrementUsageRequest(license_id=license_id, amount=amount),
        metadata=md or admin_md(),
    )


async def renew(licenses: lgrpc.LicenseServiceStub, license_id: str) -> Any:
    resp = await licenses.RenewLicense(lpb.RenewLicenseRequest(id=license_id), metadata=admin_md())
    return resp.license


async def test_suspend_and_reinstate(
    licenses: lgrpc.LicenseServiceStub, usage: ugrpc.UsageServiceStub, make_license: Any
) -> None:
    lic = await make_license(policy_fields={"floating": True, "max_uses": 10})
    m = await activate(licenses, lic.id, "before")
    resp = await licenses.SuspendLicense(lpb.SuspendLicenseRequest(id=lic.id), metadata=admin_md())
    assert resp.license.status == STATUS.LICENSE_STATUS_SUSPENDED
    for call in (inc(usage, lic.id), activate(licenses, lic.id, "during")):
        err = await expect_error(call)
        assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "LICENSE_SUSPENDED")
        assert err.metadata["license_id"] == lic.id
    # suspending twice is harmless; deactivation stays possible
    await licenses.SuspendLicense(lpb.SuspendLicenseRequest(id=lic.id), metadata=admin_md())
    await licenses.DeactivateMachine(lpb.DeactivateMachineRequest(id=m.id), metadata=admin_md())
    resp = await licenses.ReinstateLicense(
        lpb.ReinstateLicenseRequest(id=lic.id), metadata=admin_md()
    )
    assert resp.license.status == STATUS.LICENSE_STATUS_ACTIVE
    assert (await inc(usage, lic.id)).uses == 1
    await activate(licenses, lic.id, "after")


async def test_lifecycle_rpcs_reject_bad_and_unknown_ids(
    licenses: lgrpc.LicenseServiceStub,
) -> None:
    calls = [
        lambda i: licenses.SuspendLicense(lpb.SuspendLicenseRequest(id=i), metadata=admin_md()),
        lambda i: licenses.ReinstateLicense(lpb.ReinstateLicenseRequest(id=i), metadata=admin_md()),
        lambda i: licenses.RenewLicense(lpb.RenewLicenseRequest(id=i), metadata=admin_md()),
        lambda i: licenses.CheckInLicense(lpb.CheckInLicenseRequest(id=i), metadata=admin_md()),
    ]
    for call in calls:
        err = await expect_error(call("01900000-0000-7000-8000-000000000000"))
        assert (err.code, err.reason) == (grpc.StatusCode.NOT_FOUND, "LICENSE_NOT_FOUND")
        err = await expect_error(call(""))
        assert (err.code, err.bad_fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["id"])


async def test_expiry_from_duration_and_status(
    licenses: lgrpc.LicenseServiceStub, make_license: Any, clock: ManualClock
) -> None:
    clock.set(T0)
    short = await make_license(policy_fields={"duration": secs(1)})  # the shortest: 1 second
    assert short.expire_time.ToMilliseconds() == T0 + 1000
    assert short.status == STATUS.LICENSE_STATUS_EXPIRING
    long = await make_license(policy_fields={"duration": secs(30 * 86_400)})
    assert long.expire_time.ToMilliseconds() == T0 + 30 * DAY
    assert long.status == STATUS.LICENSE_STATUS_ACTIVE
    clock.set(T0 + 999)
    assert (await get_license(licenses, short.id)).status == STATUS.LICENSE_STATUS_EXPIRING
    clock.set(T0 + 1000)
    assert (await get_license(licenses, short.id)).status == STATUS.LICENSE_STATUS_EXPIRED
    clock.set(T0 + 27 * DAY - 1)  # 3 days + 1 ms left
    assert (await get_license(licenses, long.id)).status == STATUS.LICENSE_STATUS_ACTIVE
    clock.set(T0 + 27 * DAY)  # exactly 3 days left
    assert (await get_license(licenses, long.id)).status == STATUS.LICENSE_STATUS_EXPIRING
    # a duration under one second is refused
    err = await expect_error(make_license(policy_fields={"duration": secs(0.999)}))
    assert err.bad_fields == ["policy.duration"]


@pytest.mark.parametrize(
    ("strategy", "valid", "increments", "activations"),
    [
        (1, False, "LICENSE_EXPIRED", "LICENSE_EXPIRED"),  # RESTRICT_ACCESS
        (2, False, "LICENSE_EXPIRED", "LICENSE_EXPIRED"),  # REVOKE_ACCESS
        (3, True, "OK", "LICENSE_EXPIRED"),  # MAINTAIN_ACCESS
        (4, True, "OK", "OK"),  # ALLOW_ACCESS
        (0, False, "LICENSE_EXPIRED", "LICENSE_EXPIRED"),  # unspecified = RESTRICT_ACCESS
    ],
)
async def test_expiration_strategies(
    licenses: lgrpc.LicenseServiceStub,
    usage: ugrpc.UsageServiceStub,
    make_license: Any,
    clock: ManualClock,
    strategy: int,
    valid: bool,
    increments: str,
    activations: str,
) -> None:
    clock.set(T0)
    lic = await make_license(
        policy_fields={"floating": True, "duration": secs(60), "expiration_strategy": strategy}
    )
    assert await outcome(inc(usage, lic.id)) == "OK"
    await activate(licenses, lic.id, "before")
    clock.advance(60_000)
    resp = await validate(licenses, lic.id)
    assert (resp.valid, resp.code) == (valid, license_pb2.VALIDATION_CODE_EXPIRED)
    assert resp.license.status == STATUS.LICENSE_STATUS_EXPIRED
    assert await outcome(inc(usage, lic.id)) == increments
    assert await outcome(activate(licenses, lic.id, "after")) == activations
    if increments == "LICENSE_EXPIRED":
        err = await expect_error(inc(usage, lic.id))
        assert err.code == grpc.StatusCode.FAILED_PRECONDITION


async def test_revoke_access_refuses_license_key_authentication(
    licenses: lgrpc.LicenseServiceStub,
    usage: ugrpc.UsageServiceStub,
    make_license: Any,
    clock: ManualClock,
) -> None:
    clock.set(T0)
    lic = await make_license(
        policy_fields={"floating": True, "duration": secs(60), "expiration_strategy": 2}
    )
    md = license_md(lic.key)
    m = await activate(licenses, lic.id, "box", md=md)  # the key works, and is now cached
    assert (await validate(licenses, key=lic.key, md=md)).valid
    clock.advance(60_000)
    calls = [
        validate(licenses, key=lic.key, md=md),
        validate(licenses, lic.id, md=md),
        activate(licenses, lic.id, "other", md=md),
        licenses.DeactivateMachine(lpb.DeactivateMachineRequest(id=m.id), metadata=md),
        licenses.MachineHeartbeat(lpb.MachineHeartbeatRequest(id=m.id), metadata=md),
        licenses.CheckInLicense(lpb.CheckInLicenseRequest(id=lic.id), metadata=md),
        inc(usage, lic.id, md=md),
        usage.GetUsage(upb.GetUsageRequest(license_id=lic.id), metadata=md),
    ]
    for call in calls:
        err = await expect_error(call)
        assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "LICENSE_EXPIRED")
        assert err.metadata == {"license_id": lic.id, "expiration_strategy": "REVOKE_ACCESS"}
    # an admin still sees it, as expired and invalid
    assert (await validate(licenses, lic.id)).code == license_pb2.VALIDATION_CODE_EXPIRED
    # renewed: the key works again at once (a refusal is never served from the cache)
    await renew(licenses, lic.id)
    assert (await validate(licenses, key=lic.key, md=md)).valid
    await licenses.CheckInLicense(lpb.CheckInLicenseRequest(id=lic.id), metadata=md)
    # other strategies keep the key working after expiry
    restrict = await make_license(policy_fields={"duration": secs(60)})
    clock.advance(60_000)
    resp = await validate(licenses, key=restrict.key, md=license_md(restrict.key))
    assert (resp.valid, resp.code) == (False, license_pb2.VALIDATION_CODE_EXPIRED)


async def test_renew(
    licenses: lgrpc.LicenseServiceStub, make_license: Any, clock: ManualClock
) -> None:
    clock.set(T0)
    lic = await make_license(policy_fields={"duration": secs(10 * 86_400)})
    clock.set(T0 + 2 * DAY)
    renewed = await renew(licenses, lic.id)  # from the current expiry
    assert renewed.expire_time.ToMilliseconds() == T0 + 20 * DAY
    assert renewed.update_time.ToMilliseconds() == T0 + 2 * DAY
    clock.set(T0 + 25 * DAY)  # expired 5 days ago: from now
    assert (await get_license(licenses, lic.id)).status == STATUS.LICENSE_STATUS_EXPIRED
    renewed = await renew(licenses, lic.id)
    assert renewed.expire_time.ToMilliseconds() == T0 + 35 * DAY
    assert renewed.status == STATUS.LICENSE_STATUS_ACTIVE
    perpetual = await make_license()
    err = await expect_error(renew(licenses, perpetual.id))
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "LICENSE_NOT_RENEWABLE")
    assert not (await get_license(licenses, perpetual.id)).HasField("expire_time")


async def test_concurrent_renewals_all_count(
    running: Running, make_license: Any, clock: ManualClock
) -> None:
    clock.set(T0)
    lic = await make_license(policy_fields={"duration": secs(3600)})
    channels = [grpc.aio.insecure_channel(running.target) for _ in range(4)]
    try:
        stubs = [lgrpc.LicenseServiceStub(ch) for ch in channels]
        await asyncio.gather(*(renew(stubs[i % 4], lic.id) for i in range(8)))
        final = await get_license(stubs[0], lic.id)
    finally:
        for ch in channels:
            await ch.close()
    assert final.expire_time.ToMilliseconds() == T0 + 9 * 3_600_000


async def test_check_in_records_time(
    licenses: lgrpc.LicenseServiceStub, make_license: Any, clock: ManualClock
) -> None:
    clock.set(T0)
    lic = await make_license()
    assert not lic.HasField("last_check_in_time")
    clock.set(T0 + 5000)
    resp = await licenses.CheckInLicense(lpb.CheckInLicenseRequest(id=lic.id), metadata=admin_md())
    assert resp.license.last_check_in_time.ToMilliseconds() == T0 + 5000
    got = await get_license(licenses, lic.id)
    assert got.last_check_in_time.ToMilliseconds() == T0 + 5000


# --- usage periods --------------------------------------------------------------------------

PERIODS = [
    # interval, last ms of a period, the next period's start, the one after
    (2, ms(2026, 3, 15) - 1, ms(2026, 3, 15), ms(2026, 3, 16)),  # DAILY
    (3, ms(2026, 3, 16) - 1, ms(2026, 3, 16), ms(2026, 3, 23)),  # WEEKLY: Mondays
    (4, ms(2026, 3, 1) - 1, ms(2026, 3, 1), ms(2026, 4, 1)),  # MONTHLY (after February)
    (4, ms(2024, 3, 1) - 1, ms(2024, 3, 1), ms(2024, 4, 1)),  # MONTHLY, leap year
    (5, ms(2027, 1, 1) - 1, ms(2027, 1, 1), ms(2028, 1, 1)),  # YEARLY
]


@pytest.mark.parametrize(("interval", "before", "boundary", "after"), PERIODS)
async def test_usage_resets_at_calendar_periods(
    licenses: lgrpc.LicenseServiceStub,
    usage: ugrpc.UsageServiceStub,
    make_license: Any,
    clock: ManualClock,
    redis: aioredis.Redis,
    interval: int,
    before: int,
    boundary: int,
    after: int,
) -> None:
    clock.set(before - DAY // 2 if interval == 2 else before - 3 * DAY)
    lic = await make_license(policy_fields={"max_uses": 3, "usage_reset_interval": interval})
    r = await inc(usage, lic.id, amount=3)
    assert (r.uses, r.period_end_time.ToMilliseconds()) == (3, boundary)
    clock.set(before)
    assert await outcome(inc(usage, lic.id)) == "USAGE_LIMIT_EXCEEDED"
    assert (await get_license(licenses, lic.id)).uses == 3
    clock.set(boundary)
    assert (await get_license(licenses, lic.id)).uses == 0  # read before any script ran
    got = await usage.GetUsage(upb.GetUsageRequest(license_id=lic.id), metadata=admin_md())
    assert (got.uses, got.remaining, got.period_end_time.ToMilliseconds()) == (0, 3, after)
    r = await inc(usage, lic.id, amount=2)
    assert (r.uses, r.period_end_time.ToMilliseconds()) == (2, after)
    assert await redis.hmget(keys.license(lic.id), ["uses", "period"]) == ["2", str(boundary)]


async def test_usage_without_reset_interval_never_resets(
    usage: ugrpc.UsageServiceStub, make_license: Any, clock: ManualClock
) -> None:
    clock.set(T0)
    lic = await make_license(policy_fields={"max_uses": 2})
    await inc(usage, lic.id, amount=2)
    clock.advance(400 * DAY)
    got = await usage.GetUsage(upb.GetUsageRequest(license_id=lic.id), metadata=admin_md())
    assert got.uses == 2 and not got.HasField("period_end_time")


async def test_concurrent_increments_straddling_a_period_boundary(
    running: Running,
    usage: ugrpc.UsageServiceStub,
    make_license: Any,
    clock: ManualClock,
    redis: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    boundary = ms(2026, 5, 1)
    clock.set(boundary - 60_000)
    lic = await make_license(policy_fields={"max_uses": 10, "usage_reset_interval": 2})
    await inc(usage, lic.id, amount=8)
    # The next 5 reads of the clock are just before midnight, every later one at midnight:
    # requests that read the old time may reach Redis before or after those that read the new.
    reads = 0

    def straddling_now() -> int:
        nonlocal reads
        reads += 1
        return boundary - 1 if reads <= 5 else boundary

    monkeypatch.setattr(clock, "now_ms", straddling_now)
    channels = [grpc.aio.insecure_channel(running.target) for _ in range(4)]
    try:
        stubs = [ugrpc.UsageServiceStub(ch) for ch in channels]

        async def one(i: int) -> int | str:
            try:
                return int((await inc(stubs[i % 4], lic.id)).uses)
            except grpc.aio.AioRpcError as exc:
                return rich_error(exc).reason

        results = await asyncio.gather(*(one(i) for i in range(20)))
    finally:
        for ch in channels:
            await ch.close()
    granted = sorted(r for r in results if isinstance(r, int))
    refused = [r for r in results if not isinstance(r, int)]
    assert set(refused) <= {"USAGE_LIMIT_EXCEEDED"}
    # The new period took exactly its 10 uses (at least 15 requests ran after the reset); the
    # old period at most its last 2 (uses 9 and 10), each counted once.
    new_period = list(range(1, 11))
    for n in new_period:
        granted.remove(n)
    assert len(granted) <= 2 and len(set(granted)) == len(granted) and set(granted) <= {9, 10}
    assert len(refused) == 20 - 10 - len(granted)
    assert await redis.hmget(keys.license(lic.id), ["uses", "period"]) == ["10", str(boundary)]
    events = await redis.xrange(keys.license_events(lic.id))
    assert [e[1]["type"] for e in events].count("reset") == 1
