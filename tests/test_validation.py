"""ValidateLicense: every ValidationCode, its precedence, strictness, overage, scope."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import duration_pb2, field_mask_pb2

from meter.v1 import license_pb2, policy_pb2
from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from meter_grpc.domain.clock import ManualClock
from tests.machine_helpers import activate, validate
from tests.support import admin_md, expect_error

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
HOUR = 3_600_000
FLOATING = {"floating": True}
STRICT = {"strict": True}


def secs(n: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromMilliseconds(int(n * 1000))
    return d


def answer(resp: lpb.ValidateLicenseResponse) -> tuple[bool, str]:
    """(valid, code without its prefix)."""
    name = license_pb2.ValidationCode.Name(resp.code).removeprefix("VALIDATION_CODE_")
    return resp.valid, name


async def check(licenses: lgrpc.LicenseServiceStub, license_id: str, **scope: Any) -> Any:
    return answer(await validate(licenses, license_id, **scope))


async def suspend(licenses: lgrpc.LicenseServiceStub, license_id: str) -> None:
    await licenses.SuspendLicense(lpb.SuspendLicenseRequest(id=license_id), metadata=admin_md())


async def update_license(
    licenses: lgrpc.LicenseServiceStub, license_id: str, paths: list[str], **fields: Any
) -> None:
    await licenses.UpdateLicense(
        lpb.UpdateLicenseRequest(
            license=license_pb2.License(id=license_id, **fields),
            update_mask=field_mask_pb2.FieldMask(paths=paths),
        ),
        metadata=admin_md(),
    )


async def update_policy(
    licenses: lgrpc.LicenseServiceStub, policy_id: str, paths: list[str], **fields: Any
) -> None:
    await licenses.UpdatePolicy(
        lpb.UpdatePolicyRequest(
            policy=policy_pb2.Policy(id=policy_id, **fields),
            update_mask=field_mask_pb2.FieldMask(paths=paths),
        ),
        metadata=admin_md(),
    )


# --- single codes ---------------------------------------------------------------------------


async def test_valid_by_id_and_by_key(
    licenses: lgrpc.LicenseServiceStub, make_license: Any
) -> None:
    lic = await make_license(name="by key")
    by_id = await validate(licenses, lic.id)
    by_key = await validate(licenses, key=lic.key)
    for resp in (by_id, by_key):
        assert answer(resp) == (True, "VALID")
        assert resp.detail == "is valid"
        assert (resp.license.id, resp.license.name) == (lic.id, "by key")


async def test_not_found(licenses: lgrpc.LicenseServiceStub) -> None:
    for resp in (
        await validate(licenses, "01900000-0000-7000-8000-000000000000"),
        await validate(licenses, key="NO-SUCH-KEY-0123456789"),
    ):
        assert answer(resp) == (False, "NOT_FOUND")
        assert not resp.HasField("license")


async def test_suspended(licenses: lgrpc.LicenseServiceStub, make_license: Any) -> None:
    lic = await make_license()
    await suspend(licenses, lic.id)
    resp = await validate(licenses, lic.id)
    assert answer(resp) == (False, "SUSPENDED")
    assert resp.license.status == license_pb2.LICENSE_STATUS_SUSPENDED


async def test_expired_per_strategy(
    licenses: lgrpc.LicenseServiceStub, make_license: Any, clock: ManualClock
) -> None:
    clock.set(T0)
    expected = {0: False, 1: False, 2: False, 3: True, 4: True}
    made = {
        s: await make_license(policy_fields={"duration": secs(60), "expiration_strategy": s})
        for s in expected
    }
    for lic in made.values():
        assert await check(licenses, lic.id) == (True, "VALID")
    clock.advance(60_000)
    for strategy, lic in made.items():
        assert await check(licenses, lic.id) == (expected[strategy], "EXPIRED"), strategy


async def test_overdue_check_in(
    licenses: lgrpc.LicenseServiceStub, make_license: Any, clock: ManualClock
) -> None:
    clock.set(T0)
    lic = await make_license(
        policy_fields={"require_check_in": True, "check_in_interval": secs(3600)}
    )
    clock.advance(HOUR)  # exactly the interval since creation: not yet overdue
    assert await check(licenses, lic.id) == (True, "VALID")
    clock.advance(1)
    assert await check(licenses, lic.id) == (False, "OVERDUE")
    resp = await licenses.CheckInLicense(lpb.CheckInLicenseRequest(id=lic.id), metadata=admin_md())
    assert resp.license.last_check_in_time.ToMilliseconds() == T0 + HOUR + 1
    assert await check(licenses, lic.id) == (True, "VALID")
    clock.advance(HOUR + 1)
    assert await check(licenses, lic.id) == (False, "OVERDUE")
    # without require_check_in, nobody is ever overdue
    free = await make_license()
    clock.advance(365 * 24 * HOUR)
    assert await check(licenses, free.id) == (True, "VALID")


async def test_entitlements(licenses: lgrpc.LicenseServiceStub, make_license: Any) -> None:
    lic = await make_license(policy_fields={"entitlements": ["pro", "sso"]}, entitlements=["beta"])
    assert list(lic.entitlements) == ["beta"]
    assert await check(licenses, lic.id, entitlements=("pro", "beta")) == (True, "VALID")
    assert await check(licenses, lic.id, entitlements=("sso",)) == (True, "VALID")
    resp = await validate(licenses, lic.id, entitlements=("pro", "gpu", "audit"))
    assert answer(resp) == (False, "ENTITLEMENTS_MISSING")
    assert resp.detail == "is missing entitlements: gpu, audit"


async def test_fingerprint_scope(licenses: lgrpc.LicenseServiceStub, make_license: Any) -> None:
    lic = await make_license()
    await activate(licenses, lic.id, "here")
    assert await check(licenses, lic.id, fingerprint="here") == (True, "VALID")
    assert await check(licenses, lic.id, fingerprint="elsewhere") == (
        False,
        "FINGERPRINT_SCOPE_MISMATCH",
    )


async def test_heartbeat_dead(
    licenses: lgrpc.LicenseServiceStub, make_license: Any, clock: ManualClock
) -> None:
    clock.set(T0)
    lic = await make_license(policy_fields={**FLOATING, "heartbeat_duration": secs(30)})
    await activate(licenses, lic.id, "beating")
    clock.advance(29_999)
    assert await check(licenses, lic.id, fingerprint="beating") == (True, "VALID")
    clock.advance(1)
    # the validation itself notices the death: nothing else ran since
    assert await check(licenses, lic.id, fingerprint="beating") == (False, "HEARTBEAT_DEAD")
    assert await check(licenses, lic.id, fingerprint="never") == (
        False,
        "FINGERPRINT_SCOPE_MISMATCH",
    )
    assert await check(licenses, lic.id) == (True, "VALID")  # not strict: no machine needed


async def test_no_machine_and_no_machines(
    licenses: lgrpc.LicenseServiceStub, make_license: Any
) -> None:
    node = await make_license(policy_fields=STRICT)
    assert await check(licenses, node.id) == (False, "NO_MACHINE")
    await activate(licenses, node.id, "n")
    assert await check(licenses, node.id) == (True, "VALID")
    floating = await make_license(policy_fields={**STRICT, **FLOATING})
    assert await check(licenses, floating.id) == (False, "NO_MACHINES")
    await activate(licenses, floating.id, "f")
    assert await check(licenses, floating.id) == (True, "VALID")


async def test_too_many_machines_hard_and_within_overage(
    licenses: lgrpc.LicenseServiceStub, make_license: Any
) -> None:
    lic = await make_license(policy_fields={**STRICT, **FLOATING, "max_machines": 4})
    for i in range(4):
        await activate(licenses, lic.id, f"m{i}")
    assert await check(licenses, lic.id) == (True, "VALID")
    await update_license(licenses, lic.id, ["max_machines"], max_machines=3)  # limit lowered
    resp = await validate(licenses, lic.id)
    assert answer(resp) == (False, "TOO_MANY_MACHINES")
    assert resp.detail == "has too many associated machines (4 of 3)"

    over = await make_license(
        policy_fields={**STRICT, **FLOATING, "max_machines": 2, "overage_strategy": 3}  # 1.5x: 3
    )
    for i in range(3):
        await activate(licenses, over.id, f"m{i}")
    assert await check(licenses, over.id) == (True, "TOO_MANY_MACHINES")
    await update_license(licenses, over.id, ["max_machines"], max_machines=1)  # ceiling 1 < 3
    assert await check(licenses, over.id) == (False, "TOO_MANY_MACHINES")


async def test_too_many_cores_hard_and_within_overage(
    licenses: lgrpc.LicenseServiceStub, make_license: Any
) -> None:
    lic = await make_license(policy_fields={**STRICT, **FLOATING, "max_cores": 8})
    await activate(licenses, lic.id, "a", cores=8)
    assert await check(licenses, lic.id) == (True, "VALID")
    await update_license(licenses, lic.id, ["max_cores"], max_cores=6)
    resp = await validate(licenses, lic.id)
    assert answer(resp) == (False, "TOO_MANY_CORES")
    assert resp.detail == "has too many associated machine cores (8 of 6)"
    over = await make_license(
        policy_fields={**STRICT, **FLOATING, "max_cores": 8, "overage_strategy": 4}
    )
    await activate(licenses, over.id, "a", cores=12)
    assert await check(licenses, over.id) == (True, "TOO_MANY_CORES")


async def test_non_strict_skips_machine_and_core_checks(
    licenses: lgrpc.LicenseServiceStub, make_license: Any
) -> None:
    lic = await make_license(policy_fields={**FLOATING, "max_machines": 2, "max_cores": 2})
    assert await check(licenses, lic.id) == (True, "VALID")  # no machine: fine
    await activate(licenses, lic.id, "a", cores=1)
    await activate(licenses, lic.id, "b", cores=1)
    await update_license(
        licenses, lic.id, ["max_machines", "max_cores"], max_machines=1, max_cores=1
    )
    assert await check(licenses, lic.id) == (True, "VALID")  # over both limits: not reported
    # ... but activation still enforces them
    err = await expect_error(activate(licenses, lic.id, "c", cores=1))
    assert err.reason == "MACHINE_LIMIT_EXCEEDED"


async def test_exhausted_usage_never_invalidates(
    licenses: lgrpc.LicenseServiceStub, usage: ugrpc.UsageServiceStub, make_license: Any
) -> None:
    lic = await make_license(policy_fields={"max_uses": 2, **STRICT, **FLOATING})
    await activate(licenses, lic.id, "a")
    await usage.IncrementUsage(
        upb.IncrementUsageRequest(license_id=lic.id, amount=2), metadata=admin_md()
    )
    err = await expect_error(
        usage.IncrementUsage(upb.IncrementUsageRequest(license_id=lic.id), metadata=admin_md())
    )
    assert err.reason == "USAGE_LIMIT_EXCEEDED"
    resp = await validate(licenses, lic.id)
    assert answer(resp) == (True, "VALID")
    assert (resp.license.uses, resp.license.max_uses) == (2, 2)


# --- precedence -----------------------------------------------------------------------------


async def test_precedence_when_several_codes_apply(
    licenses: lgrpc.LicenseServiceStub, make_license: Any, clock: ManualClock
) -> None:
    clock.set(T0)
    everything = {
        **STRICT,
        **FLOATING,
        "duration": secs(60),
        "require_check_in": True,
        "check_in_interval": secs(10),
        "heartbeat_duration": secs(30),
        "max_machines": 1,
        "max_cores": 1,
        "entitlements": ["pro"],
    }

    async def make(strategy: int) -> Any:
        lic = await make_license(policy_fields={**everything, "expiration_strategy": strategy})
        return lic

    revoke = await make(2)
    allow = await make(4)
    scope = {"fingerprint": "ghost", "entitlements": ("gpu",)}
    clock.advance(60_000)  # expired, overdue; no machine; entitlement missing; fp unknown
    await suspend(licenses, revoke.id)
    assert await check(licenses, revoke.id, **scope) == (False, "SUSPENDED")
    await licenses.ReinstateLicense(lpb.ReinstateLicenseRequest(id=revoke.id), metadata=admin_md())
    assert await check(licenses, revoke.id, **scope) == (False, "EXPIRED")  # REVOKE: early
    restrict = await make(1)
    clock.advance(60_000)
    assert await check(licenses, restrict.id, **scope) == (False, "OVERDUE")
    await licenses.CheckInLicense(lpb.CheckInLicenseRequest(id=restrict.id), metadata=admin_md())
    assert await check(licenses, restrict.id, **scope) == (False, "ENTITLEMENTS_MISSING")
    scope = {"fingerprint": "ghost", "entitlements": ("pro",)}
    assert await check(licenses, restrict.id, **scope) == (False, "FINGERPRINT_SCOPE_MISMATCH")
    assert await check(licenses, restrict.id) == (False, "NO_MACHINES")
    # RESTRICT also refuses new activations of an expired license: ALLOW gets machines
    await licenses.CheckInLicense(lpb.CheckInLicenseRequest(id=allow.id), metadata=admin_md())
    await activate(licenses, allow.id, "dies", cores=1)
    clock.advance(30_000)
    await licenses.CheckInLicense(lpb.CheckInLicenseRequest(id=allow.id), metadata=admin_md())
    # HEARTBEAT_DEAD before NO_MACHINES (its only machine died)
    assert await check(licenses, allow.id, fingerprint="dies") == (False, "HEARTBEAT_DEAD")
    assert await check(licenses, allow.id) == (False, "NO_MACHINES")
    await update_license(
        licenses, allow.id, ["max_machines", "max_cores"], max_machines=3, max_cores=3
    )
    for fp in ("a", "b", "c"):
        await activate(licenses, allow.id, fp, cores=1)
    await update_license(
        licenses, allow.id, ["max_machines", "max_cores"], max_machines=2, max_cores=2
    )
    # TOO_MANY_MACHINES before TOO_MANY_CORES
    assert await check(licenses, allow.id, fingerprint="a") == (False, "TOO_MANY_MACHINES")
    await update_license(licenses, allow.id, ["max_machines"], max_machines=3)
    # TOO_MANY_CORES before EXPIRED
    assert await check(licenses, allow.id, fingerprint="a") == (False, "TOO_MANY_CORES")
    await update_license(licenses, allow.id, ["max_cores"], max_cores=3)
    # ALLOW_ACCESS: expired is only reported
    assert await check(licenses, allow.id, fingerprint="a", entitlements=("pro",)) == (
        True,
        "EXPIRED",
    )


async def test_overage_warning_never_hides_an_invalidating_code(
    licenses: lgrpc.LicenseServiceStub, make_license: Any, clock: ManualClock
) -> None:
    clock.set(T0)
    fields = {
        **STRICT,
        **FLOATING,
        "max_machines": 1,
        "max_cores": 1,
        "overage_strategy": 4,  # 2x
        "duration": secs(60),
    }
    restrict = await make_license(policy_fields={**fields, "expiration_strategy": 1})
    maintain = await make_license(policy_fields={**fields, "expiration_strategy": 3})
    for lic in (restrict, maintain):
        await activate(licenses, lic.id, "a", cores=1)
        await activate(licenses, lic.id, "b", cores=1)
        assert await check(licenses, lic.id) == (True, "TOO_MANY_MACHINES")
    clock.advance(60_000)
    # within overage + expired under RESTRICT: invalid, and the code says why
    assert await check(licenses, restrict.id) == (False, "EXPIRED")
    # within overage + expired under MAINTAIN: both only warn; the first one is reported
    assert await check(licenses, maintain.id) == (True, "TOO_MANY_MACHINES")


async def test_node_locked_switch_reports_too_many_machines(
    licenses: lgrpc.LicenseServiceStub, make_policy: Any, make_license: Any
) -> None:
    policy = await make_policy(**STRICT, **FLOATING, max_machines=2)
    lic = await make_license(policy_id=policy.id)
    await activate(licenses, lic.id, "a")
    await activate(licenses, lic.id, "b")
    await update_policy(licenses, policy.id, ["floating", "max_machines"], floating=False)
    resp = await validate(licenses, lic.id)
    assert answer(resp) == (False, "TOO_MANY_MACHINES")
    assert resp.license.max_machines == 1
    assert (await expect_error(activate(licenses, lic.id, "c"))).reason == (
        "MACHINE_LIMIT_EXCEEDED"
    )


# --- bad requests ---------------------------------------------------------------------------


async def test_bad_validate_requests(licenses: lgrpc.LicenseServiceStub, make_license: Any) -> None:
    lic = await make_license()
    bad = [
        (lpb.ValidateLicenseRequest(), "license_id"),
        (lpb.ValidateLicenseRequest(license_id=""), "license_id"),
        (lpb.ValidateLicenseRequest(license_id="has space"), "license_id"),
        (lpb.ValidateLicenseRequest(key="short"), "key"),
        (lpb.ValidateLicenseRequest(key="k" * 257), "key"),
        (lpb.ValidateLicenseRequest(license_id=lic.id, fingerprint="f" * 257), "fingerprint"),
        (lpb.ValidateLicenseRequest(license_id=lic.id, fingerprint="  "), "fingerprint"),
        (
            lpb.ValidateLicenseRequest(license_id=lic.id, entitlements=["bad code"]),
            "entitlements[0]",
        ),
    ]
    for request, field in bad:
        err = await expect_error(licenses.ValidateLicense(request, metadata=admin_md()))
        assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        assert err.bad_fields == [field], (request, err.bad_fields)
