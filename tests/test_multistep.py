"""Creates and deletes take several steps over several cluster slots. A failure between any two
steps (failpoints raise there, as an unreachable store would) leaves nothing a user can see as
wrong, and the next operation repairs what is left: no ghost blocks DeletePolicy, no index
entry shows a missing license, a key never authenticates a license that is not there, and a
create retried with its request_id completes exactly once."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import policy_pb2
from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from meter_grpc.domain import failpoints, propagation
from meter_grpc.storage import keys
from tests.support import admin_md, expect_error, license_md

CREATE_LICENSE_STEPS = [
    "create_license.attached",
    "create_license.key_claimed",
    "create_license.indexed",
    "create_license.created",
]
DELETE_LICENSE_STEPS = [
    "delete_license.deleted",
    "delete_license.key_released",
    "delete_license.detached",
]


@pytest.fixture
def ghosts_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries pointing nowhere count as ghosts at once, rather than after two minutes."""
    monkeypatch.setattr(propagation, "GHOST_AFTER_MS", 0)


def new_license(policy_id: str, key: str = "", request_id: str = "") -> lpb.CreateLicenseRequest:
    return lpb.CreateLicenseRequest(
        license={"policy_id": policy_id, "key": key, "name": "n"}, request_id=request_id
    )


async def listed(licenses: lgrpc.LicenseServiceStub, policy_id: str = "") -> list[str]:
    out: list[str] = []
    token = ""
    while True:
        r = await licenses.ListLicenses(
            lpb.ListLicensesRequest(policy_id=policy_id, page_size=100, page_token=token),
            metadata=admin_md(),
        )
        out += [lic.id for lic in r.licenses]
        token = r.next_page_token
        if not token:
            return out


async def key_works(usage: ugrpc.UsageServiceStub, license_id: str, key: str) -> bool:
    try:
        await usage.GetUsage(upb.GetUsageRequest(license_id=license_id), metadata=license_md(key))
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
    else:
        return True
    assert code == grpc.StatusCode.UNAUTHENTICATED
    return False


async def expect_cut_short(call: Any) -> None:
    err = await expect_error(call)
    assert err.code == grpc.StatusCode.UNAVAILABLE
    assert (err.reason, err.metadata["outcome"]) == ("STORAGE_UNAVAILABLE", "unknown")
    assert err.retry_delay_ms


@pytest.mark.parametrize("step", CREATE_LICENSE_STEPS)
async def test_create_license_cut_short_then_retried(
    licenses: lgrpc.LicenseServiceStub,
    usage: ugrpc.UsageServiceStub,
    make_policy: Any,
    failpoint: Any,
    step: str,
    redis: Any,
) -> None:
    policy = await make_policy(max_uses=5)
    key = f"KEY-{step}-{policy.id}"
    failpoint(step)
    await expect_cut_short(
        licenses.CreateLicense(new_license(policy.id, key, f"rid-{step}"), metadata=admin_md())
    )
    failpoints.arm({})
    # What a user sees meanwhile is right: a listed license exists, a key works only for one.
    for lid in await listed(licenses, policy.id):
        await licenses.GetLicense(lpb.GetLicenseRequest(id=lid), metadata=admin_md())
    # The retry completes the same create, once.
    first = (
        await licenses.CreateLicense(
            new_license(policy.id, key, f"rid-{step}"), metadata=admin_md()
        )
    ).license
    again = (
        await licenses.CreateLicense(
            new_license(policy.id, key, f"rid-{step}"), metadata=admin_md()
        )
    ).license
    assert (again.id, again.key) == (first.id, key)
    assert await listed(licenses, policy.id) == [first.id]
    assert (await listed(licenses)).count(first.id) == 1
    assert await redis.zcard(keys.policy_licenses(policy.id)) == 1
    assert await key_works(usage, first.id, key)
    err = await expect_error(
        licenses.CreateLicense(new_license(policy.id, key, "rid-2"), metadata=admin_md())
    )
    assert err.reason == "LICENSE_KEY_TAKEN"
    # and the policy is in use by exactly that license
    err = await expect_error(
        licenses.DeletePolicy(lpb.DeletePolicyRequest(id=policy.id), metadata=admin_md())
    )
    assert (err.reason, err.metadata["licenses"]) == ("POLICY_IN_USE", "1")


@pytest.mark.parametrize("step", CREATE_LICENSE_STEPS[:-1])
async def test_create_license_cut_short_leaves_no_ghost(
    licenses: lgrpc.LicenseServiceStub,
    usage: ugrpc.UsageServiceStub,
    make_policy: Any,
    failpoint: Any,
    ghosts_at_once: None,
    step: str,
    redis: Any,
) -> None:
    """Without a request_id nobody completes the create: what it left is repaired by the next
    operations (the key can be used again, DeletePolicy is not blocked, lists are clean)."""
    policy = await make_policy()
    key = f"GHOST-{step}-{policy.id}"
    failpoint(step)
    await expect_cut_short(licenses.CreateLicense(new_license(policy.id, key), metadata=admin_md()))
    failpoints.arm({})
    assert await listed(licenses, policy.id) == []
    assert await redis.zcard(keys.policy_licenses(policy.id)) == 0  # the listing repaired it
    lic = (await licenses.CreateLicense(new_license(policy.id, key), metadata=admin_md())).license
    assert await key_works(usage, lic.id, key)
    await licenses.DeleteLicense(lpb.DeleteLicenseRequest(id=lic.id), metadata=admin_md())
    await licenses.DeletePolicy(lpb.DeletePolicyRequest(id=policy.id), metadata=admin_md())


async def test_ghost_registration_never_blocks_delete_policy(
    licenses: lgrpc.LicenseServiceStub, make_policy: Any, failpoint: Any, ghosts_at_once: None
) -> None:
    policy = await make_policy()
    failpoint("create_license.attached")
    for _ in range(3):
        await expect_cut_short(licenses.CreateLicense(new_license(policy.id), metadata=admin_md()))
    failpoints.arm({})
    await licenses.DeletePolicy(lpb.DeletePolicyRequest(id=policy.id), metadata=admin_md())
    err = await expect_error(
        licenses.GetPolicy(lpb.GetPolicyRequest(id=policy.id), metadata=admin_md())
    )
    assert err.reason == "POLICY_NOT_FOUND"


async def test_young_registration_is_not_taken_for_a_ghost(
    licenses: lgrpc.LicenseServiceStub, make_policy: Any, failpoint: Any
) -> None:
    """A registration whose create may still complete keeps the policy in use."""
    policy = await make_policy()
    failpoint("create_license.attached")
    await expect_cut_short(licenses.CreateLicense(new_license(policy.id), metadata=admin_md()))
    failpoints.arm({})
    err = await expect_error(
        licenses.DeletePolicy(lpb.DeletePolicyRequest(id=policy.id), metadata=admin_md())
    )
    assert err.reason == "POLICY_IN_USE"


@pytest.mark.parametrize("step", DELETE_LICENSE_STEPS)
async def test_delete_license_cut_short(
    licenses: lgrpc.LicenseServiceStub,
    usage: ugrpc.UsageServiceStub,
    make_policy: Any,
    failpoint: Any,
    step: str,
    redis: Any,
) -> None:
    """Once the license is deleted, nothing that still points at it shows it, authenticates
    with it or blocks its policy, at once (the delete leaves a tombstone)."""
    policy = await make_policy()
    key = f"DEL-{step}-{policy.id}"
    lic = (await licenses.CreateLicense(new_license(policy.id, key), metadata=admin_md())).license
    failpoint(step)
    await expect_cut_short(
        licenses.DeleteLicense(lpb.DeleteLicenseRequest(id=lic.id), metadata=admin_md())
    )
    failpoints.arm({})
    err = await expect_error(
        licenses.GetLicense(lpb.GetLicenseRequest(id=lic.id), metadata=admin_md())
    )
    assert err.reason == "LICENSE_NOT_FOUND"
    assert not await key_works(usage, lic.id, key)
    assert lic.id not in await listed(licenses, policy.id)
    assert lic.id not in await listed(licenses)
    assert await redis.zscore(keys.all_licenses(), lic.id) is None  # repaired by the listing
    again = (await licenses.CreateLicense(new_license(policy.id, key), metadata=admin_md())).license
    assert await key_works(usage, again.id, key)
    await licenses.DeleteLicense(lpb.DeleteLicenseRequest(id=again.id), metadata=admin_md())
    await licenses.DeletePolicy(lpb.DeletePolicyRequest(id=policy.id), metadata=admin_md())


@pytest.mark.parametrize("step", ["create_policy.indexed", "create_policy.created"])
async def test_create_policy_cut_short_then_retried(
    licenses: lgrpc.LicenseServiceStub, failpoint: Any, step: str, redis: Any
) -> None:
    request = lpb.CreatePolicyRequest(
        policy=policy_pb2.Policy(name=step, max_uses=3), request_id=f"pol-{step}-{id(redis)}"
    )
    failpoint(step)
    await expect_cut_short(licenses.CreatePolicy(request, metadata=admin_md()))
    failpoints.arm({})
    first = (await licenses.CreatePolicy(request, metadata=admin_md())).policy
    again = (await licenses.CreatePolicy(request, metadata=admin_md())).policy
    assert again == first
    assert await redis.zscore(keys.all_policies(), first.id) == 0


async def test_create_policy_ghost_index_entry_is_dropped(
    licenses: lgrpc.LicenseServiceStub, failpoint: Any, ghosts_at_once: None, redis: Any
) -> None:
    before = set(await redis.zrange(keys.all_policies(), 0, -1))
    failpoint("create_policy.indexed")
    await expect_cut_short(
        licenses.CreatePolicy(
            lpb.CreatePolicyRequest(policy=policy_pb2.Policy()), metadata=admin_md()
        )
    )
    failpoints.arm({})
    (ghost,) = set(await redis.zrange(keys.all_policies(), 0, -1)) - before
    token = ""
    seen: list[str] = []
    while True:
        r = await licenses.ListPolicies(
            lpb.ListPoliciesRequest(page_size=1000, page_token=token), metadata=admin_md()
        )
        seen += [p.id for p in r.policies]
        token = r.next_page_token
        if not token:
            break
    assert ghost not in seen
    assert await redis.zscore(keys.all_policies(), ghost) is None


async def test_create_request_id_rules(
    licenses: lgrpc.LicenseServiceStub, make_policy: Any
) -> None:
    """AIP-155 for creates: another request under the same id is refused (naming the field);
    the answer is replayed even after the resource is gone; concurrent retries create once."""
    request = lpb.CreatePolicyRequest(policy=policy_pb2.Policy(name="a"), request_id="same-rid-x")
    created = (await licenses.CreatePolicy(request, metadata=admin_md())).policy
    other = lpb.CreatePolicyRequest(policy=policy_pb2.Policy(name="b"), request_id="same-rid-x")
    err = await expect_error(licenses.CreatePolicy(other, metadata=admin_md()))
    assert (err.code, err.reason, err.bad_fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_ID_REUSED",
        ["request_id"],
    )
    await licenses.DeletePolicy(lpb.DeletePolicyRequest(id=created.id), metadata=admin_md())
    assert (await licenses.CreatePolicy(request, metadata=admin_md())).policy == created

    policy = await make_policy()
    answers = await asyncio.gather(
        *(
            licenses.CreateLicense(new_license(policy.id, request_id="many"), metadata=admin_md())
            for _ in range(20)
        )
    )
    assert len({(a.license.id, a.license.key) for a in answers}) == 1
    assert await listed(licenses, policy.id) == [answers[0].license.id]
    err = await expect_error(
        licenses.CreateLicense(
            lpb.CreateLicenseRequest(
                license={"policy_id": policy.id, "name": "other"}, request_id="many"
            ),
            metadata=admin_md(),
        )
    )
    assert err.reason == "REQUEST_ID_REUSED"


async def test_create_window_passed_binds_a_fresh_id(
    licenses: lgrpc.LicenseServiceStub,
    usage: ugrpc.UsageServiceStub,
    make_policy: Any,
    failpoint: Any,
    monkeypatch: pytest.MonkeyPatch,
    redis: Any,
) -> None:
    """A create retried after its window: the first id can no longer be written (so a ghost is
    always safe to drop); the retry drops what the first attempt left and uses a fresh id."""
    monkeypatch.setattr(propagation, "CREATE_WINDOW_MS", 300)
    policy = await make_policy()
    key = f"LATE-{policy.id}"
    failpoint("create_license.indexed")
    await expect_cut_short(
        licenses.CreateLicense(new_license(policy.id, key, "late"), metadata=admin_md())
    )
    failpoints.arm({})
    (stale,) = await redis.zrange(keys.policy_licenses(policy.id), 0, -1)
    await asyncio.sleep(0.4)
    lic = (
        await licenses.CreateLicense(new_license(policy.id, key, "late"), metadata=admin_md())
    ).license
    assert lic.id != stale
    assert await redis.zrange(keys.policy_licenses(policy.id), 0, -1) == [lic.id]
    assert await redis.zscore(keys.all_licenses(), stale) is None
    assert await key_works(usage, lic.id, key)


async def test_activate_machine_request_id(
    licenses: lgrpc.LicenseServiceStub,
    usage: ugrpc.UsageServiceStub,
    make_license: Any,
    redis: Any,
) -> None:
    """ActivateMachine with a request_id: 20 concurrent copies over one license activate one
    machine and all get it; a refusal is replayed too; other arguments: REQUEST_ID_REUSED."""
    lic = await make_license(policy_fields={"floating": True, "max_machines": 2, "max_cores": 8})

    def act(fp: str, rid: str, cores: int = 4) -> Any:
        return licenses.ActivateMachine(
            lpb.ActivateMachineRequest(
                license_id=lic.id, fingerprint=fp, cores=cores, request_id=rid
            ),
            metadata=admin_md(),
        )

    answers = await asyncio.gather(*(act("fp-a", "act-a") for _ in range(20)))
    assert len({a.machine.id for a in answers}) == 1
    machine = answers[0].machine
    assert await redis.hlen(keys.machines(lic.id)) == 1
    assert await redis.hget(keys.license(lic.id), "cores") == "4"
    # over the core limit: refused, and replayed as refused even once there is room
    err = await expect_error(act("fp-b", "act-b", cores=5))
    assert err.reason == "CORE_LIMIT_EXCEEDED"
    await licenses.DeactivateMachine(
        lpb.DeactivateMachineRequest(id=machine.id), metadata=admin_md()
    )
    err = await expect_error(act("fp-b", "act-b", cores=5))
    assert err.reason == "CORE_LIMIT_EXCEEDED"
    err = await expect_error(act("fp-c", "act-a"))
    assert (err.code, err.reason, err.bad_fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_ID_REUSED",
        ["request_id"],
    )
    # an increment under an activation's request_id is another request
    err = await expect_error(
        usage.IncrementUsage(
            upb.IncrementUsageRequest(license_id=lic.id, request_id="act-a"), metadata=admin_md()
        )
    )
    assert err.reason == "REQUEST_ID_REUSED"
    replay = (await act("fp-a", "act-a")).machine
    assert replay.id == machine.id


async def wait_refused(usage: ugrpc.UsageServiceStub, license_id: str, key: str) -> None:
    """The key stops authenticating within a second or so (the key cache's bound)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while await key_works(usage, license_id, key):
        assert loop.time() < deadline, "the old key still authenticates"
        await asyncio.sleep(0.05)


async def test_rotate_license_key(
    licenses: lgrpc.LicenseServiceStub,
    usage: ugrpc.UsageServiceStub,
    make_license: Any,
    redis: Any,
    key_index: Any,
) -> None:
    """RotateLicenseKey: the new key works, the old one stops (within the cache's second);
    a key another license holds is refused and changes nothing; a license key may not
    rotate."""
    lic = await make_license()
    other = await make_license()
    assert await key_works(usage, lic.id, lic.key)  # now in the key cache
    rotated = (
        await licenses.RotateLicenseKey(lpb.RotateLicenseKeyRequest(id=lic.id), metadata=admin_md())
    ).license
    assert rotated.id == lic.id and rotated.key and rotated.key != lic.key
    assert await key_works(usage, lic.id, rotated.key)
    await wait_refused(usage, lic.id, lic.key)
    assert await redis.get(key_index(lic.key)) is None
    assert await redis.get(key_index(rotated.key)) == lic.id
    got = (await licenses.GetLicense(lpb.GetLicenseRequest(id=lic.id), metadata=admin_md())).license
    assert got.key == ""  # returned by the rotation only: stored as a digest

    err = await expect_error(
        licenses.RotateLicenseKey(
            lpb.RotateLicenseKeyRequest(id=lic.id, key=other.key), metadata=admin_md()
        )
    )
    assert (err.reason, err.metadata["field"]) == ("LICENSE_KEY_TAKEN", "key")
    assert await key_works(usage, lic.id, rotated.key)
    assert await key_works(usage, other.id, other.key)
    err = await expect_error(
        licenses.RotateLicenseKey(
            lpb.RotateLicenseKeyRequest(id=lic.id), metadata=license_md(rotated.key)
        )
    )
    assert err.reason == "PERMISSION_DENIED"


@pytest.mark.parametrize("step", ["rotate_license_key.claimed", "rotate_license_key.updated"])
async def test_rotate_license_key_cut_short(
    licenses: lgrpc.LicenseServiceStub,
    usage: ugrpc.UsageServiceStub,
    make_license: Any,
    failpoint: Any,
    step: str,
) -> None:
    """Cut short between its steps, a rotation never lets two keys work; retried with the same
    key it completes."""
    lic = await make_license()
    new_key = f"ROT-{lic.id}"
    request = lpb.RotateLicenseKeyRequest(id=lic.id, key=new_key)
    failpoint(step)
    await expect_cut_short(licenses.RotateLicenseKey(request, metadata=admin_md()))
    failpoints.arm({})
    works = [await key_works(usage, lic.id, k) for k in (lic.key, new_key)]
    assert works == ([True, False] if step.endswith("claimed") else [False, True])
    rotated = (await licenses.RotateLicenseKey(request, metadata=admin_md())).license
    assert rotated.key == new_key
    assert await key_works(usage, lic.id, new_key)
    await wait_refused(usage, lic.id, lic.key)
