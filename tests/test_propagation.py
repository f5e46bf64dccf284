"""A policy change reaches every license of the policy, whatever happens to the UpdatePolicy
that made it: a client deadline, a store failure midway, the replica doing it going away, or
licenses being created meanwhile. Each test reads every license's policy copy back from the
store and proves enforcement with real increments."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import policy_pb2
from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from meter_grpc.domain import failpoints
from meter_grpc.domain.propagation import Propagator
from meter_grpc.storage import keys
from tests.conftest import Running
from tests.support import admin_md, expect_error

FOLLOW_WITHIN_S = 30


async def create_licenses(
    licenses: lgrpc.LicenseServiceStub,
    policy_id: str,
    n: int,
    in_flight: int = 64,
    md: tuple[tuple[str, str], ...] | None = None,
) -> list[str]:
    ids: list[str] = []
    todo = iter(range(n))
    batch = uuid.uuid4().hex[:12]  # request ids unique to this call

    async def worker() -> None:
        for i in todo:
            # With a request_id, a create that timed out on a loaded machine (UNAVAILABLE)
            # is retried safely: the retry completes the same license.
            request = lpb.CreateLicenseRequest(
                license={"policy_id": policy_id}, request_id=f"setup-{batch}-{i}"
            )
            for attempt in range(20):
                try:
                    r = await licenses.CreateLicense(request, metadata=md or admin_md())
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == 19:
                        raise
                    await asyncio.sleep(0.05)
            ids.append(r.license.id)

    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return ids


def update(policy_id: str, **fields: Any) -> lpb.UpdatePolicyRequest:
    return lpb.UpdatePolicyRequest(
        policy=policy_pb2.Policy(id=policy_id, **fields),
        update_mask=field_mask_pb2.FieldMask(paths=list(fields)),
    )


async def policy_copies(redis: Any, license_ids: list[str]) -> list[tuple[str, str]]:
    """(p_rev, p_uses) of every license, read from the store (pipelined: one connection per
    node, also for redis-py's cluster client, whose concurrent first connects race)."""
    rows: list[Any] = []
    for i in range(0, len(license_ids), 500):
        async with redis.pipeline(transaction=False) as pipe:
            for lid in license_ids[i : i + 500]:
                pipe.hmget(keys.license(lid), ["p_rev", "p_uses"])
            rows += await pipe.execute()
    return [(r[0], r[1]) for r in rows]


async def wait_propagated(
    licenses: lgrpc.LicenseServiceStub,
    policy_id: str,
    timeout_s: float = FOLLOW_WITHIN_S,
    md: tuple[tuple[str, str], ...] | None = None,
) -> policy_pb2.Policy:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        p = (
            await licenses.GetPolicy(lpb.GetPolicyRequest(id=policy_id), metadata=md or admin_md())
        ).policy
        if p.propagated_revision == p.revision:
            return p
        assert loop.time() < deadline, f"revision {p.revision} not propagated: {p}"
        await asyncio.sleep(0.1)


async def assert_all_follow(
    redis: Any, license_ids: list[str], revision: int, max_uses: int
) -> None:
    copies = await policy_copies(redis, license_ids)
    wrong = [
        (lid, c)
        for lid, c in zip(license_ids, copies, strict=True)
        if c != (str(revision), str(max_uses))
    ]
    assert not wrong, f"{len(wrong)} of {len(license_ids)} licenses lag, e.g. {wrong[:3]}"


async def assert_enforced(usage: ugrpc.UsageServiceStub, license_id: str, max_uses: int) -> None:
    """The license grants exactly max_uses, then refuses."""
    await usage.IncrementUsage(
        upb.IncrementUsageRequest(license_id=license_id, amount=max_uses), metadata=admin_md()
    )
    err = await expect_error(
        usage.IncrementUsage(upb.IncrementUsageRequest(license_id=license_id), metadata=admin_md())
    )
    assert err.reason == "USAGE_LIMIT_EXCEEDED"
    assert err.metadata["limit"] == str(max_uses)


async def test_revision_pair_on_every_change(
    licenses: lgrpc.LicenseServiceStub, make_policy: Any, make_license: Any, redis: Any
) -> None:
    policy = await make_policy(max_uses=100)
    assert (policy.revision, policy.propagated_revision) == (1, 1)
    lic = await make_license(policy.id)
    for n in (2, 3):
        p = (
            await licenses.UpdatePolicy(update(policy.id, max_uses=100 + n), metadata=admin_md())
        ).policy
        assert (p.revision, p.propagated_revision, p.max_uses) == (n, n, 100 + n)
    await assert_all_follow(redis, [lic.id], 3, 103)


async def test_client_deadline_does_not_stop_the_change(
    licenses: lgrpc.LicenseServiceStub,
    usage: ugrpc.UsageServiceStub,
    make_policy: Any,
    redis: Any,
) -> None:
    """A 50 ms deadline on an UpdatePolicy of 5,000 licenses: the call fails, the change
    completes anyway and every license enforces the new limit."""
    policy = await make_policy(max_uses=100)
    ids = await create_licenses(licenses, policy.id, 5000)
    code = grpc.StatusCode.OK
    try:
        await licenses.UpdatePolicy(
            update(policy.id, max_uses=7), metadata=admin_md(), timeout=0.05
        )
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
    assert code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.OK)
    p = await wait_propagated(licenses, policy.id)
    assert (p.revision, p.max_uses) == (2, 7)
    await assert_all_follow(redis, ids, 2, 7)
    await assert_enforced(usage, ids[-1], 7)


async def test_store_failure_midway_answers_applied_and_completes(
    licenses: lgrpc.LicenseServiceStub,
    usage: ugrpc.UsageServiceStub,
    make_policy: Any,
    redis: Any,
    failpoint: Any,
) -> None:
    """The store fails after the first page of licenses: the answer says the change is made
    (outcome=applied, never not_applied) and GetPolicy shows it pending; it completes by
    itself once the store answers again."""
    policy = await make_policy(max_uses=100)
    ids = await create_licenses(licenses, policy.id, 450)
    failpoint("propagate.page")
    err = await expect_error(
        licenses.UpdatePolicy(update(policy.id, max_uses=9), metadata=admin_md())
    )
    assert err.code == grpc.StatusCode.UNAVAILABLE
    assert err.reason == "STORAGE_UNAVAILABLE"
    assert err.metadata["outcome"] == "applied"
    assert err.metadata["propagation"] == "pending"
    assert err.retry_delay_ms
    p = (await licenses.GetPolicy(lpb.GetPolicyRequest(id=policy.id), metadata=admin_md())).policy
    assert (p.revision, p.propagated_revision, p.max_uses) == (2, 1, 9)
    copies = await policy_copies(redis, ids)
    assert ("1", "100") in copies  # some licenses still lag: the failure was real
    failpoints.arm({})
    await wait_propagated(licenses, policy.id)
    await assert_all_follow(redis, ids, 2, 9)
    await assert_enforced(usage, ids[-1], 9)


async def test_another_replica_completes_a_change_left_behind(
    running: Running,
    licenses: lgrpc.LicenseServiceStub,
    make_policy: Any,
    redis: Any,
    failpoint: Any,
) -> None:
    """The replica propagating stops midway (its propagations are cancelled, as when it goes
    away); another replica finds the pending change and completes it."""
    policy = await make_policy(max_uses=100)
    ids = await create_licenses(licenses, policy.id, 450)
    failpoint("propagate.page", "hang")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await licenses.UpdatePolicy(update(policy.id, max_uses=11), metadata=admin_md(), timeout=1)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await running.service.licensing.propagator.close()  # this replica's work is gone
    failpoints.arm({})
    other = Propagator(running.service.store, owner="another-replica")
    deadline = asyncio.get_running_loop().time() + FOLLOW_WITHIN_S
    while (await other.reconcile()) == 0 and (
        await running.service.store.get_policy(policy.id)
    ).propagated_revision < 2:  # type: ignore[union-attr]
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.2)
    await wait_propagated(licenses, policy.id)
    await assert_all_follow(redis, ids, 2, 11)
    assert policy.id not in await running.service.store.pending_policies()


async def test_licenses_created_during_changes_follow_the_last_one(
    licenses: lgrpc.LicenseServiceStub, make_policy: Any, redis: Any
) -> None:
    """Creates racing five policy changes: every license ends on the last revision (a revision
    that reaches a license still being created waits in its mailbox)."""
    policy = await make_policy(max_uses=100)
    created = asyncio.ensure_future(create_licenses(licenses, policy.id, 400, in_flight=32))
    for n in range(1, 6):
        await licenses.UpdatePolicy(update(policy.id, max_uses=100 + n), metadata=admin_md())
    ids = await created
    p = await wait_propagated(licenses, policy.id)
    assert p.revision == 6
    await assert_all_follow(redis, ids, 6, 105)
