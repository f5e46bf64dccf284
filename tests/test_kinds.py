"""One end-to-end story per license kind of SPEC §2, through the gRPC API only: the admin sets
up a policy and a license, the application works with the license key."""

from __future__ import annotations

from typing import Any

from google.protobuf import duration_pb2

from meter.v1 import license_pb2
from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from meter_grpc.domain.clock import ManualClock
from tests.machine_helpers import activate, get_license, outcome, validate
from tests.support import admin_md, expect_error, license_md

DAY = 86_400_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
CODE = license_pb2.ValidationCode
STATUS = license_pb2.LicenseStatus


def secs(n: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromMilliseconds(int(n * 1000))
    return d


async def code(licenses: lgrpc.LicenseServiceStub, key: str, **scope: Any) -> tuple[bool, str]:
    resp = await validate(licenses, key=key, md=license_md(key), **scope)
    return resp.valid, CODE.Name(resp.code).removeprefix("VALIDATION_CODE_")


async def test_perpetual(
    licenses: lgrpc.LicenseServiceStub,
    usage: ugrpc.UsageServiceStub,
    make_license: Any,
    clock: ManualClock,
) -> None:
    clock.set(T0)
    lic = await make_license(policy_fields={"name": "perpetual"})
    assert not lic.HasField("expire_time")
    assert lic.status == STATUS.LICENSE_STATUS_ACTIVE
    clock.advance(50 * 365 * DAY)
    assert await code(licenses, lic.key) == (True, "VALID")
    r = await usage.IncrementUsage(
        upb.IncrementUsageRequest(license_id=lic.id, amount=1000), metadata=license_md(lic.key)
    )
    assert r.uses == 1000 and not r.HasField("max_uses")
    err = await expect_error(
        licenses.RenewLicense(lpb.RenewLicenseRequest(id=lic.id), metadata=admin_md())
    )
    assert err.reason == "LICENSE_NOT_RENEWABLE"
    assert (await get_license(licenses, lic.id)).status == STATUS.LICENSE_STATUS_ACTIVE


async def test_timed(
    licenses: lgrpc.LicenseServiceStub,
    usage: ugrpc.UsageServiceStub,
    make_license: Any,
    clock: ManualClock,
) -> None:
    clock.set(T0)
    lic = await make_license(policy_fields={"name": "timed", "duration": secs(30 * 86_400)})
    md = license_md(lic.key)
    assert lic.expire_time.ToMilliseconds() == T0 + 30 * DAY
    assert await code(licenses, lic.key) == (True, "VALID")
    clock.set(T0 + 28 * DAY)
    assert (await get_license(licenses, lic.id)).status == STATUS.LICENSE_STATUS_EXPIRING
    clock.set(T0 + 30 * DAY)
    assert await code(licenses, lic.key) == (False, "EXPIRED")
    inc = upb.IncrementUsageRequest(license_id=lic.id)
    assert await outcome(usage.IncrementUsage(inc, metadata=md)) == "LICENSE_EXPIRED"
    renewed = (
        await licenses.RenewLicense(lpb.RenewLicenseRequest(id=lic.id), metadata=admin_md())
    ).license
    assert renewed.expire_time.ToMilliseconds() == T0 + 60 * DAY
    assert await code(licenses, lic.key) == (True, "VALID")
    assert (await usage.IncrementUsage(inc, metadata=md)).uses == 1


async def test_floating(
    licenses: lgrpc.LicenseServiceStub, make_license: Any, clock: ManualClock
) -> None:
    clock.set(T0)
    lic = await make_license(
        policy_fields={
            "name": "floating",
            "floating": True,
            "strict": True,
            "max_machines": 3,
            "heartbeat_duration": secs(600),
        }
    )
    md = license_md(lic.key)
    assert await code(licenses, lic.key) == (False, "NO_MACHINES")
    seats = [await activate(licenses, lic.id, f"desk-{i}", md=md) for i in range(3)]
    assert await outcome(activate(licenses, lic.id, "desk-3", md=md)) == "MACHINE_LIMIT_EXCEEDED"
    clock.advance(300_000)
    for seat in seats[:2]:
        await licenses.MachineHeartbeat(lpb.MachineHeartbeatRequest(id=seat.id), metadata=md)
    clock.advance(300_000)  # desk-2 missed its heartbeat: its seat floats to desk-3
    assert await code(licenses, lic.key, fingerprint="desk-2") == (False, "HEARTBEAT_DEAD")
    await activate(licenses, lic.id, "desk-3", md=md)
    assert await code(licenses, lic.key, fingerprint="desk-3") == (True, "VALID")
    await licenses.DeactivateMachine(lpb.DeactivateMachineRequest(id=seats[0].id), metadata=md)
    view = await get_license(licenses, lic.id)
    assert (view.machines_count, view.max_machines) == (2, 3)


async def test_node_locked(licenses: lgrpc.LicenseServiceStub, make_license: Any) -> None:
    lic = await make_license(policy_fields={"name": "node-locked", "strict": True})
    md = license_md(lic.key)
    assert lic.max_machines == 1
    assert await code(licenses, lic.key) == (False, "NO_MACHINE")
    box = await activate(licenses, lic.id, "workstation", cores=8, md=md)
    assert await code(licenses, lic.key, fingerprint="workstation") == (True, "VALID")
    assert await code(licenses, lic.key, fingerprint="laptop") == (
        False,
        "FINGERPRINT_SCOPE_MISMATCH",
    )
    assert await outcome(activate(licenses, lic.id, "laptop", md=md)) == "MACHINE_LIMIT_EXCEEDED"
    # moving to a new machine: deactivate, then activate there
    await licenses.DeactivateMachine(lpb.DeactivateMachineRequest(id=box.id), metadata=md)
    await activate(licenses, lic.id, "laptop", cores=4, md=md)
    assert await code(licenses, lic.key, fingerprint="laptop") == (True, "VALID")


async def test_feature(licenses: lgrpc.LicenseServiceStub, make_license: Any) -> None:
    lic = await make_license(
        policy_fields={"name": "feature", "entitlements": ["core", "export"]},
        entitlements=["sso"],
    )
    assert await code(licenses, lic.key, entitlements=("core", "export", "sso")) == (True, "VALID")
    assert await code(licenses, lic.key, entitlements=("gpu",)) == (False, "ENTITLEMENTS_MISSING")
    await licenses.UpdateLicense(
        lpb.UpdateLicenseRequest(
            license=license_pb2.License(id=lic.id, entitlements=["sso", "gpu"]),
            update_mask={"paths": ["entitlements"]},
        ),
        metadata=admin_md(),
    )
    assert await code(licenses, lic.key, entitlements=("gpu", "core")) == (True, "VALID")


async def test_metered(
    licenses: lgrpc.LicenseServiceStub, usage: ugrpc.UsageServiceStub, make_license: Any
) -> None:
    lic = await make_license(
        policy_fields={"name": "metered", "floating": True, "max_uses": 100, "max_cores": 8}
    )
    md = license_md(lic.key)
    inc = upb.IncrementUsageRequest(license_id=lic.id, amount=60)
    assert (await usage.IncrementUsage(inc, metadata=md)).remaining == 40
    assert await outcome(usage.IncrementUsage(inc, metadata=md)) == "USAGE_LIMIT_EXCEEDED"
    await activate(licenses, lic.id, "a", cores=6, md=md)
    assert await outcome(activate(licenses, lic.id, "b", cores=4, md=md)) == "CORE_LIMIT_EXCEEDED"
    await activate(licenses, lic.id, "b", cores=2, md=md)
    assert await code(licenses, lic.key) == (True, "VALID")  # usage left: irrelevant
    view = await get_license(licenses, lic.id)
    assert (view.uses, view.max_uses, view.cores_count, view.max_cores) == (60, 100, 8, 8)
