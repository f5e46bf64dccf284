"""LicenseService: policies and licenses — create, get, list, update, delete, and bad input."""

from __future__ import annotations

import re
import uuid
from typing import Any

import grpc
import redis.asyncio as aioredis
from google.protobuf import duration_pb2, field_mask_pb2

from meter.v1 import license_pb2, policy_pb2
from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from meter_grpc.storage import keys
from tests.support import admin_md, expect_error

KEY_FORMAT = re.compile(r"[0-9A-HJKMNP-TV-Z]{6}(-[0-9A-HJKMNP-TV-Z]{6}){4}")


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


async def test_create_and_get_policy(licenses: lgrpc.LicenseServiceStub) -> None:
    created = (
        await licenses.CreatePolicy(
            lpb.CreatePolicyRequest(
                policy=policy_pb2.Policy(
                    name="pro",
                    max_uses=100,
                    max_machines=3,
                    max_cores=16,
                    floating=True,
                    strict=True,
                    duration=duration_pb2.Duration(seconds=86400),
                    entitlements=["export", "sso"],
                    overage_strategy=policy_pb2.OVERAGE_STRATEGY_ALLOW_1_5X_OVERAGE,
                    usage_reset_interval=policy_pb2.USAGE_RESET_INTERVAL_MONTHLY,
                    metadata={"tier": "pro"},
                )
            ),
            metadata=admin_md(),
        )
    ).policy
    assert created.id
    assert created.create_time.seconds > 0
    got = (
        await licenses.GetPolicy(lpb.GetPolicyRequest(id=created.id), metadata=admin_md())
    ).policy
    assert got == created
    assert (got.max_uses, got.max_machines, got.max_cores) == (100, 3, 16)
    assert got.duration.seconds == 86400
    assert list(got.entitlements) == ["export", "sso"]
    assert got.metadata["tier"] == "pro"


async def test_unset_limits_are_unlimited(make_policy: Any) -> None:
    p = await make_policy()
    assert not p.HasField("max_uses")
    assert not p.HasField("max_machines")
    assert not p.HasField("max_cores")


async def test_bad_policies_are_refused(licenses: lgrpc.LicenseServiceStub) -> None:
    cases = [
        (policy_pb2.Policy(max_uses=-1), "policy.max_uses"),
        (policy_pb2.Policy(max_cores=2**51), "policy.max_cores"),
        (policy_pb2.Policy(name="n" * 257), "policy.name"),
        (policy_pb2.Policy(duration=duration_pb2.Duration(seconds=-5)), "policy.duration"),
        (policy_pb2.Policy(duration=duration_pb2.Duration(nanos=5_000_000)), "policy.duration"),
        (policy_pb2.Policy(overage_strategy=42), "policy.overage_strategy"),  # type: ignore[arg-type]
        (policy_pb2.Policy(require_check_in=True), "policy.check_in_interval"),
        (policy_pb2.Policy(entitlements=["ok", "not ok"]), "policy.entitlements[1]"),
        (policy_pb2.Policy(floating=True, max_machines=0), "policy.max_machines"),
        (policy_pb2.Policy(metadata={"": "x"}), "policy.metadata['']"),
    ]
    for policy, field in cases:
        err = await expect_error(
            licenses.CreatePolicy(lpb.CreatePolicyRequest(policy=policy), metadata=admin_md())
        )
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT, field
        assert err.reason == "INVALID_ARGUMENT"
        assert field in err.bad_fields, (field, err.bad_fields)


async def test_get_unknown_policy(licenses: lgrpc.LicenseServiceStub) -> None:
    err = await expect_error(
        licenses.GetPolicy(
            lpb.GetPolicyRequest(id="01900000-0000-7000-8000-000000000000"), metadata=admin_md()
        )
    )
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert err.reason == "POLICY_NOT_FOUND"
    err = await expect_error(licenses.GetPolicy(lpb.GetPolicyRequest(id=""), metadata=admin_md()))
    assert err.bad_fields == ["id"]


async def test_list_policies_pages_through_everything(
    licenses: lgrpc.LicenseServiceStub, make_policy: Any
) -> None:
    made = [(await make_policy(name=f"page-{i}")).id for i in range(7)]
    seen: list[str] = []
    token = ""
    while True:
        page = await licenses.ListPolicies(
            lpb.ListPoliciesRequest(page_size=3, page_token=token), metadata=admin_md()
        )
        assert len(page.policies) <= 3
        seen += [p.id for p in page.policies]
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(seen)  # creation order
    assert [i for i in seen if i in made] == made
    err = await expect_error(
        licenses.ListPolicies(lpb.ListPoliciesRequest(page_token="garbage!"), metadata=admin_md())
    )
    assert err.bad_fields == ["page_token"]
    err = await expect_error(
        licenses.ListPolicies(lpb.ListPoliciesRequest(page_size=-1), metadata=admin_md())
    )
    assert err.bad_fields == ["page_size"]


async def test_update_policy_honours_mask_and_reaches_licenses(
    licenses: lgrpc.LicenseServiceStub,
    usage: ugrpc.UsageServiceStub,
    make_policy: Any,
    make_license: Any,
) -> None:
    p = await make_policy(name="before", max_uses=2, metadata={"a": "1"})
    lics = [await make_license(p.id) for _ in range(3)]
    updated = (
        await licenses.UpdatePolicy(
            lpb.UpdatePolicyRequest(
                policy=policy_pb2.Policy(id=p.id, name="ignored", max_uses=5),
                update_mask=mask("max_uses"),
            ),
            metadata=admin_md(),
        )
    ).policy
    assert updated.max_uses == 5
    assert updated.name == "before"  # not in the mask
    assert updated.metadata["a"] == "1"
    for lic in lics:
        r = await usage.IncrementUsage(
            upb.IncrementUsageRequest(license_id=lic.id, amount=5), metadata=admin_md()
        )
        assert r.max_uses == 5
    # An unset optional limit in the mask clears it: unlimited.
    cleared = (
        await licenses.UpdatePolicy(
            lpb.UpdatePolicyRequest(
                policy=policy_pb2.Policy(id=p.id), update_mask=mask("max_uses")
            ),
            metadata=admin_md(),
        )
    ).policy
    assert not cleared.HasField("max_uses")
    got = (
        await licenses.GetLicense(lpb.GetLicenseRequest(id=lics[0].id), metadata=admin_md())
    ).license
    assert not got.HasField("max_uses")


async def test_update_policy_errors(licenses: lgrpc.LicenseServiceStub, make_policy: Any) -> None:
    p = await make_policy(max_uses=2)
    for request, field in [
        (lpb.UpdatePolicyRequest(policy=policy_pb2.Policy(id=p.id)), "update_mask"),
        (
            lpb.UpdatePolicyRequest(policy=policy_pb2.Policy(id=p.id), update_mask=mask("id")),
            "update_mask.paths",
        ),
        (
            lpb.UpdatePolicyRequest(policy=policy_pb2.Policy(id=p.id), update_mask=mask("bogus")),
            "update_mask.paths",
        ),
        (
            lpb.UpdatePolicyRequest(
                policy=policy_pb2.Policy(id=p.id, max_uses=-3), update_mask=mask("max_uses")
            ),
            "policy.max_uses",
        ),
    ]:
        err = await expect_error(licenses.UpdatePolicy(request, metadata=admin_md()))
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT
        assert field in err.bad_fields
    assert (
        await licenses.GetPolicy(lpb.GetPolicyRequest(id=p.id), metadata=admin_md())
    ).policy.max_uses == 2
    err = await expect_error(
        licenses.UpdatePolicy(
            lpb.UpdatePolicyRequest(
                policy=policy_pb2.Policy(id="01900000-0000-7000-8000-000000000000", name="x"),
                update_mask=mask("name"),
            ),
            metadata=admin_md(),
        )
    )
    assert err.reason == "POLICY_NOT_FOUND"


async def test_delete_policy_refused_while_licenses_use_it(
    licenses: lgrpc.LicenseServiceStub, make_policy: Any, make_license: Any, redis: aioredis.Redis
) -> None:
    p = await make_policy()
    lic = await make_license(p.id)
    err = await expect_error(
        licenses.DeletePolicy(lpb.DeletePolicyRequest(id=p.id), metadata=admin_md())
    )
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.reason == "POLICY_IN_USE"
    assert err.metadata["licenses"] == "1"
    await licenses.DeleteLicense(lpb.DeleteLicenseRequest(id=lic.id), metadata=admin_md())
    await licenses.DeletePolicy(lpb.DeletePolicyRequest(id=p.id), metadata=admin_md())
    err = await expect_error(licenses.GetPolicy(lpb.GetPolicyRequest(id=p.id), metadata=admin_md()))
    assert err.reason == "POLICY_NOT_FOUND"
    err = await expect_error(
        licenses.DeletePolicy(lpb.DeletePolicyRequest(id=p.id), metadata=admin_md())
    )
    assert err.reason == "POLICY_NOT_FOUND"
    assert not await redis.exists(keys.policy(p.id), keys.policy_licenses(p.id))


async def test_create_license_generates_key_and_id(
    licenses: lgrpc.LicenseServiceStub, make_license: Any, redis: aioredis.Redis, key_index: Any
) -> None:
    lic = await make_license(name="acme", metadata={"customer": "acme"})
    assert KEY_FORMAT.fullmatch(lic.key), lic.key
    assert lic.status == license_pb2.LICENSE_STATUS_ACTIVE
    assert (lic.uses, lic.machines_count, lic.cores_count) == (0, 0, 0)
    assert await redis.get(key_index(lic.key)) == lic.id
    got = (await licenses.GetLicense(lpb.GetLicenseRequest(id=lic.id), metadata=admin_md())).license
    assert got.key == ""  # returned once, by CreateLicense: stored only as a digest
    got.key = lic.key
    assert got == lic
    other = await make_license()
    assert other.key != lic.key


async def test_license_keys_carry_150_random_bits(make_license: Any) -> None:
    lic = await make_license()
    assert len(lic.key.replace("-", "")) * 5 >= 128


async def test_create_license_with_own_key_and_collision(
    licenses: lgrpc.LicenseServiceStub, make_policy: Any, redis: aioredis.Redis
) -> None:
    p = await make_policy()
    key = f"CUSTOM-KEY-{uuid.uuid4().hex[:16]}"
    lic = (
        await licenses.CreateLicense(
            lpb.CreateLicenseRequest(license=license_pb2.License(policy_id=p.id, key=key)),
            metadata=admin_md(),
        )
    ).license
    assert lic.key == key
    err = await expect_error(
        licenses.CreateLicense(
            lpb.CreateLicenseRequest(license=license_pb2.License(policy_id=p.id, key=key)),
            metadata=admin_md(),
        )
    )
    assert err.code == grpc.StatusCode.ALREADY_EXISTS
    assert err.reason == "LICENSE_KEY_TAKEN"
    assert await redis.zcard(keys.policy_licenses(p.id)) == 1  # the refused one left nothing behind


async def test_create_license_errors(licenses: lgrpc.LicenseServiceStub, make_policy: Any) -> None:
    err = await expect_error(
        licenses.CreateLicense(
            lpb.CreateLicenseRequest(license=license_pb2.License()), metadata=admin_md()
        )
    )
    assert err.bad_fields == ["license.policy_id"]
    err = await expect_error(
        licenses.CreateLicense(
            lpb.CreateLicenseRequest(
                license=license_pb2.License(policy_id="01900000-0000-7000-8000-000000000000")
            ),
            metadata=admin_md(),
        )
    )
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert err.reason == "POLICY_NOT_FOUND"
    p = await make_policy()
    for lic, field in [
        (license_pb2.License(policy_id=p.id, max_uses=-1), "license.max_uses"),
        (license_pb2.License(policy_id=p.id, key="short"), "license.key"),
        (license_pb2.License(policy_id=p.id, name="x" * 300), "license.name"),
        (license_pb2.License(policy_id=p.id, metadata={"k": "v" * 2000}), "license.metadata['k']"),
    ]:
        err = await expect_error(
            licenses.CreateLicense(lpb.CreateLicenseRequest(license=lic), metadata=admin_md())
        )
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT
        assert field in err.bad_fields


async def test_license_expiry_from_policy_duration(make_license: Any) -> None:
    lic = await make_license(policy_fields={"duration": duration_pb2.Duration(seconds=3600)})
    delta = lic.expire_time.ToMilliseconds() - lic.create_time.ToMilliseconds()
    assert delta == 3_600_000
    perpetual = await make_license()
    assert not perpetual.HasField("expire_time")


async def test_list_licenses_all_and_by_policy(
    licenses: lgrpc.LicenseServiceStub, make_policy: Any, make_license: Any
) -> None:
    p = await make_policy()
    mine = [(await make_license(p.id)).id for _ in range(5)]
    await make_license()  # another policy's
    seen: list[str] = []
    token = ""
    while True:
        page = await licenses.ListLicenses(
            lpb.ListLicensesRequest(policy_id=p.id, page_size=2, page_token=token),
            metadata=admin_md(),
        )
        seen += [lic.id for lic in page.licenses]
        token = page.next_page_token
        if not token:
            break
    assert seen == mine
    first = await licenses.ListLicenses(
        lpb.ListLicensesRequest(policy_id=p.id, page_size=2), metadata=admin_md()
    )
    err = await expect_error(
        licenses.ListLicenses(
            lpb.ListLicensesRequest(page_token=first.next_page_token), metadata=admin_md()
        )
    )
    assert err.bad_fields == ["page_token"]  # a token of another filter
    everything: set[str] = set()
    token = ""
    while True:  # unfiltered: every license of the store, here or left by earlier runs
        page = await licenses.ListLicenses(
            lpb.ListLicensesRequest(page_size=1000, page_token=token), metadata=admin_md()
        )
        everything |= {lic.id for lic in page.licenses}
        token = page.next_page_token
        if not token:
            break
    assert set(mine) <= everything


async def test_update_license_override_and_fields(
    licenses: lgrpc.LicenseServiceStub, usage: ugrpc.UsageServiceStub, make_license: Any
) -> None:
    lic = await make_license(policy_fields={"max_uses": 2}, name="old")
    updated = (
        await licenses.UpdateLicense(
            lpb.UpdateLicenseRequest(
                license=license_pb2.License(
                    id=lic.id, max_uses=10, name="new", metadata={"x": "y"}
                ),
                update_mask=mask("max_uses", "name"),
            ),
            metadata=admin_md(),
        )
    ).license
    assert (updated.max_uses, updated.name) == (10, "new")
    assert dict(updated.metadata) == {}
    assert updated.update_time.ToMilliseconds() >= lic.update_time.ToMilliseconds()
    r = await usage.IncrementUsage(
        upb.IncrementUsageRequest(license_id=lic.id, amount=10), metadata=admin_md()
    )
    assert r.uses == 10
    # Clearing the override brings the policy's limit back.
    back = (
        await licenses.UpdateLicense(
            lpb.UpdateLicenseRequest(
                license=license_pb2.License(id=lic.id), update_mask=mask("max_uses")
            ),
            metadata=admin_md(),
        )
    ).license
    assert back.max_uses == 2
    err = await expect_error(
        licenses.UpdateLicense(
            lpb.UpdateLicenseRequest(
                license=license_pb2.License(id=lic.id, key="X" * 20), update_mask=mask("key")
            ),
            metadata=admin_md(),
        )
    )
    assert err.bad_fields == ["update_mask.paths"]
    err = await expect_error(
        licenses.UpdateLicense(
            lpb.UpdateLicenseRequest(
                license=license_pb2.License(id="01900000-0000-7000-8000-000000000000", name="x"),
                update_mask=mask("name"),
            ),
            metadata=admin_md(),
        )
    )
    assert err.reason == "LICENSE_NOT_FOUND"


async def test_delete_license_removes_every_key(
    licenses: lgrpc.LicenseServiceStub,
    usage: ugrpc.UsageServiceStub,
    make_license: Any,
    redis: aioredis.Redis,
    key_index: Any,
) -> None:
    lic = await make_license()
    assert await redis.exists(key_index(lic.key))
    await usage.IncrementUsage(upb.IncrementUsageRequest(license_id=lic.id), metadata=admin_md())
    await licenses.DeleteLicense(lpb.DeleteLicenseRequest(id=lic.id), metadata=admin_md())
    assert not await redis.exists(keys.license(lic.id), keys.license_events(lic.id))
    assert not await redis.exists(key_index(lic.key))
    assert await redis.zscore(keys.all_licenses(), lic.id) is None
    err = await expect_error(
        licenses.GetLicense(lpb.GetLicenseRequest(id=lic.id), metadata=admin_md())
    )
    assert err.reason == "LICENSE_NOT_FOUND"
    err = await expect_error(
        usage.IncrementUsage(upb.IncrementUsageRequest(license_id=lic.id), metadata=admin_md())
    )
    assert err.reason == "LICENSE_NOT_FOUND"
    err = await expect_error(
        licenses.DeleteLicense(lpb.DeleteLicenseRequest(id=lic.id), metadata=admin_md())
    )
    assert err.reason == "LICENSE_NOT_FOUND"


async def test_out_of_range_times_are_bad_fields_not_internal(
    licenses: lgrpc.LicenseServiceStub, make_policy: Any
) -> None:
    from google.protobuf import timestamp_pb2

    p = await make_policy()
    for seconds in (-(10**12), 10**13):
        err = await expect_error(
            licenses.CreateLicense(
                lpb.CreateLicenseRequest(
                    license=license_pb2.License(
                        policy_id=p.id, expire_time=timestamp_pb2.Timestamp(seconds=seconds)
                    )
                ),
                metadata=admin_md(),
            )
        )
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.bad_fields == ["license.expire_time"]
    err = await expect_error(
        licenses.CreatePolicy(
            lpb.CreatePolicyRequest(
                policy=policy_pb2.Policy(duration=duration_pb2.Duration(seconds=10**15))
            ),
            metadata=admin_md(),
        )
    )
    assert err.bad_fields == ["policy.duration"]
