"""Machine activations over real gRPC: limits, fingerprints, cores, heartbeats, concurrency."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import grpc
import redis.asyncio as aioredis
from google.protobuf import duration_pb2, field_mask_pb2

from meter.v1 import license_pb2, machine_pb2
from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter_grpc.domain.clock import ManualClock
from meter_grpc.storage import keys
from tests.conftest import Running
from tests.machine_helpers import (
    activate,
    assert_counters_exact,
    get_license,
    outcome,
    stored_machines,
    update_machine,
    validate,
)
from tests.support import admin_md, expect_error, license_md

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
FLOATING = {"floating": True}


def secs(n: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromMilliseconds(int(n * 1000))
    return d


async def test_activate_get_list_and_counters(
    licenses: lgrpc.LicenseServiceStub, make_license: Any, clock: ManualClock
) -> None:
    clock.set(T0)
    lic = await make_license(policy_fields={**FLOATING, "max_machines": 3, "max_cores": 16})
    m = await activate(
        licenses,
        lic.id,
        "fp-1",
        cores=4,
        name="build box",
        hostname="ci-1",
        platform="linux/amd64",
        metadata={"rack": "7"},
    )
    assert m.id.startswith(lic.id + ".")
    assert (m.license_id, m.fingerprint, m.cores, m.name, m.hostname, m.platform) == (
        lic.id,
        "fp-1",
        4,
        "build box",
        "ci-1",
        "linux/amd64",
    )
    assert dict(m.metadata) == {"rack": "7"}
    assert m.create_time.ToMilliseconds() == m.last_heartbeat_time.ToMilliseconds() == T0
    got = (await licenses.GetMachine(lpb.GetMachineRequest(id=m.id), metadata=admin_md())).machine
    assert got == m
    await activate(licenses, lic.id, "fp-2", cores=2)
    view = await get_license(licenses, lic.id)
    assert (view.machines_count, view.cores_count, view.max_machines, view.max_cores) == (
        2,
        6,
        3,
        16,
    )
    listed = await licenses.ListMachines(
        lpb.ListMachinesRequest(license_id=lic.id), metadata=admin_md()
    )
    assert [x.fingerprint for x in listed.machines] == ["fp-1", "fp-2"]
    assert listed.next_page_token == ""


async def test_deactivate_frees_slot_and_cores(
    licenses: lgrpc.LicenseServiceStub, make_license: Any, redis: aioredis.Redis
) -> None:
    lic = await make_license(policy_fields={**FLOATING, "max_machines": 1, "max_cores": 8})
    m = await activate(licenses, lic.id, "fp-a", cores=8)
    assert await outcome(activate(licenses, lic.id, "fp-b", cores=1)) == "MACHINE_LIMIT_EXCEEDED"
    await licenses.DeactivateMachine(lpb.DeactivateMachineRequest(id=m.id), metadata=admin_md())
    state = await stored_machines(redis, lic.id)
    assert (state["count"], state["machines_field"], state["cores_field"]) == (0, 0, 0)
    assert state["fingerprints"] == {}
    err = await expect_error(
        licenses.DeactivateMachine(lpb.DeactivateMachineRequest(id=m.id), metadata=admin_md())
    )
    assert (err.code, err.reason, err.metadata["id"]) == (
        grpc.StatusCode.NOT_FOUND,
        "MACHINE_NOT_FOUND",
        m.id,
    )
    again = await activate(licenses, lic.id, "fp-a", cores=8)  # the fingerprint is free again
    assert again.id != m.id
    view = await get_license(licenses, lic.id)
    assert (view.machines_count, view.cores_count) == (1, 8)


async def test_fingerprint_taken(licenses: lgrpc.LicenseServiceStub, make_license: Any) -> None:
    lic = await make_license(policy_fields=FLOATING)
    m = await activate(licenses, lic.id, "same")
    err = await expect_error(activate(licenses, lic.id, "same"))
    assert err.code == grpc.StatusCode.ALREADY_EXISTS
    assert err.reason == "FINGERPRINT_TAKEN"
    assert (err.metadata["fingerprint"], err.metadata["machine_id"]) == ("same", m.id)
    other = await make_license(policy_fields=FLOATING)
    await activate(licenses, other.id, "same")  # unique per license only


async def test_machine_limit_error_carries_numbers(
    licenses: lgrpc.LicenseServiceStub, make_license: Any, redis: aioredis.Redis
) -> None:
    lic = await make_license(policy_fields={**FLOATING, "max_machines": 2})
    for fp in ("a", "b"):
        await activate(licenses, lic.id, fp)
    err = await expect_error(activate(licenses, lic.id, "c"))
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.reason == "MACHINE_LIMIT_EXCEEDED"
    assert err.metadata == {
        "license_id": lic.id,
        "limit": "2",
        "overage_limit": "2",
        "machines": "2",
        "requested": "1",
        "limit_source": "license",
    }
    assert err.quota_subjects == [f"license:{lic.id}"]
    assert (await stored_machines(redis, lic.id))["count"] == 2


async def test_core_limit_error_carries_numbers(
    licenses: lgrpc.LicenseServiceStub, make_license: Any, redis: aioredis.Redis
) -> None:
    lic = await make_license(policy_fields={**FLOATING, "max_cores": 10})
    await activate(licenses, lic.id, "a", cores=6)
    err = await expect_error(activate(licenses, lic.id, "b", cores=5))
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.reason == "CORE_LIMIT_EXCEEDED"
    assert err.metadata == {
        "license_id": lic.id,
        "limit": "10",
        "overage_limit": "10",
        "cores": "6",
        "requested": "5",
        "machine_cores": "5",
    }
    assert err.quota_subjects == [f"license:{lic.id}"]
    await activate(licenses, lic.id, "b", cores=4)  # exactly to the limit
    state = await stored_machines(redis, lic.id)
    assert (state["count"], state["cores_field"]) == (2, 10)


async def test_license_overrides_of_machine_and_core_limits(
    licenses: lgrpc.LicenseServiceStub, make_license: Any
) -> None:
    lic = await make_license(
        policy_fields={**FLOATING, "max_machines": 1, "max_cores": 2}, max_machines=3, max_cores=9
    )
    assert (lic.max_machines, lic.max_cores) == (3, 9)
    for fp in ("a", "b", "c"):
        await activate(licenses, lic.id, fp, cores=3)
    assert await outcome(activate(licenses, lic.id, "d", cores=1)) == "MACHINE_LIMIT_EXCEEDED"


async def test_overage_applies_to_machines_and_cores(
    licenses: lgrpc.LicenseServiceStub, make_license: Any
) -> None:
    lic = await make_license(
        policy_fields={**FLOATING, "max_machines": 4, "overage_strategy": 4}  # 2x: 8 machines
    )
    results = [await outcome(activate(licenses, lic.id, f"m{i}")) for i in range(9)]
    assert results == ["OK"] * 8 + ["MACHINE_LIMIT_EXCEEDED"]
    err = await expect_error(activate(licenses, lic.id, "m9"))
    assert (err.metadata["limit"], err.metadata["overage_limit"]) == ("4", "8")

    lic = await make_license(
        policy_fields={**FLOATING, "max_cores": 8, "overage_strategy": 2}  # 1.25x: 10 cores
    )
    await activate(licenses, lic.id, "a", cores=8)
    assert await outcome(activate(licenses, lic.id, "b", cores=3)) == "CORE_LIMIT_EXCEEDED"
    await activate(licenses, lic.id, "b", cores=2)
    assert (await get_license(licenses, lic.id)).cores_count == 10

    lic = await make_license(
        policy_fields={**FLOATING, "max_machines": 1, "max_cores": 1, "overage_strategy": 5}
    )
    for i in range(5):
        await activate(licenses, lic.id, f"x{i}", cores=16)
    view = await get_license(licenses, lic.id)
    assert (view.machines_count, view.cores_count) == (5, 80)


async def test_node_locked_allows_exactly_one_machine(
    licenses: lgrpc.LicenseServiceStub, make_license: Any, make_policy: Any
) -> None:
    lic = await make_license()  # floating = false, no max_machines: node-locked
    assert lic.max_machines == 1
    await activate(licenses, lic.id, "only")
    err = await expect_error(activate(licenses, lic.id, "second"))
    assert (err.reason, err.metadata["limit"], err.metadata["overage_limit"]) == (
        "MACHINE_LIMIT_EXCEEDED",
        "1",
        "1",
    )
    # Overage never grants a node-locked license a second machine.
    lic = await make_license(policy_fields={"overage_strategy": 5})
    await activate(licenses, lic.id, "only")
    assert await outcome(activate(licenses, lic.id, "second")) == "MACHINE_LIMIT_EXCEEDED"
    # A node-locked license's override may only say 1.
    policy = await make_policy()
    err = await expect_error(make_license(policy_id=policy.id, max_machines=3))
    assert (err.code, err.bad_fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        ["license.max_machines"],
    )
    ok = await make_license(policy_id=policy.id, max_machines=1)
    err = await expect_error(
        licenses.UpdateLicense(
            lpb.UpdateLicenseRequest(
                license=license_pb2.License(id=ok.id, max_machines=2),
                update_mask=field_mask_pb2.FieldMask(paths=["max_machines"]),
            ),
            metadata=admin_md(),
        )
    )
    assert err.bad_fields == ["license.max_machines"]


async def test_cores_required_under_a_core_limit(
    licenses: lgrpc.LicenseServiceStub, make_license: Any, redis: aioredis.Redis
) -> None:
    lic = await make_license(policy_fields={**FLOATING, "max_cores": 4})
    err = await expect_error(activate(licenses, lic.id, "no-cores"))
    assert (err.code, err.reason, err.bad_fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        ["cores"],
    )
    assert err.metadata["limit"] == "4"
    assert (await stored_machines(redis, lic.id))["count"] == 0
    unlimited = await make_license(policy_fields=FLOATING)
    m = await activate(licenses, unlimited.id, "no-cores")  # no core limit: 0 is fine
    assert m.cores == 0


async def test_bad_input_is_refused_and_changes_nothing(
    licenses: lgrpc.LicenseServiceStub, make_license: Any, redis: aioredis.Redis
) -> None:
    lic = await make_license(policy_fields=FLOATING)
    bad = [
        ({"license_id": "", "fingerprint": "f"}, "license_id"),
        ({"license_id": "a b", "fingerprint": "f"}, "license_id"),
        ({"fingerprint": ""}, "fingerprint"),
        ({"fingerprint": "   "}, "fingerprint"),
        ({"fingerprint": "f" * 257}, "fingerprint"),
        ({"fingerprint": "nul\x00"}, "fingerprint"),
        ({"fingerprint": "f", "cores": -1}, "cores"),
        ({"fingerprint": "f", "cores": 2**20 + 1}, "cores"),
        ({"fingerprint": "f", "cores": 2**62}, "cores"),
        ({"fingerprint": "f", "name": "n" * 257}, "name"),
        ({"fingerprint": "f", "hostname": "h" * 257}, "hostname"),
        ({"fingerprint": "f", "platform": "p" * 257}, "platform"),
        ({"fingerprint": "f", "metadata": {str(i): "v" for i in range(65)}}, "metadata"),
    ]
    for fields, field in bad:
        request = lpb.ActivateMachineRequest(**{"license_id": lic.id, **fields})
        err = await expect_error(licenses.ActivateMachine(request, metadata=admin_md()))
        assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        assert field in err.bad_fields, (fields, err.bad_fields)
    assert (await stored_machines(redis, lic.id))["count"] == 0


async def test_not_found_variants(licenses: lgrpc.LicenseServiceStub, make_license: Any) -> None:
    err = await expect_error(activate(licenses, "01900000-0000-7000-8000-000000000000", "f"))
    assert (err.code, err.reason, err.metadata["id"]) == (
        grpc.StatusCode.NOT_FOUND,
        "LICENSE_NOT_FOUND",
        "01900000-0000-7000-8000-000000000000",
    )
    err = await expect_error(
        licenses.ListMachines(
            lpb.ListMachinesRequest(license_id="01900000-0000-7000-8000-000000000000"),
            metadata=admin_md(),
        )
    )
    assert err.reason == "LICENSE_NOT_FOUND"
    lic = await make_license(policy_fields=FLOATING)
    unknown_ids = [
        f"{lic.id}.{'0' * 32}",  # the license exists, the machine does not
        f"01900000-0000-7000-8000-000000000000.{'a' * 32}",  # the license does not exist
    ]
    malformed_ids = [
        "nope",  # not a machine id at all
        f"gone-license.{'a' * 32}",  # not a license id the server minted
        f"{lic.id}.{'G' * 32}",  # not hex
        f"{lic.id}.{'0' * 32}}}:x",  # key name syntax
    ]
    calls = [
        lambda i: licenses.GetMachine(lpb.GetMachineRequest(id=i), metadata=admin_md()),
        lambda i: licenses.DeactivateMachine(
            lpb.DeactivateMachineRequest(id=i), metadata=admin_md()
        ),
        lambda i: licenses.MachineHeartbeat(lpb.MachineHeartbeatRequest(id=i), metadata=admin_md()),
        lambda i: update_machine(licenses, i, ["name"], name="x"),
    ]
    for machine_id in unknown_ids:
        for call in calls:
            err = await expect_error(call(machine_id))
            assert (err.code, err.reason) == (grpc.StatusCode.NOT_FOUND, "MACHINE_NOT_FOUND")
            assert err.metadata["id"] == machine_id
    for machine_id in malformed_ids:
        for call in calls:
            err = await expect_error(call(machine_id))
            assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    for call in calls[:3]:
        err = await expect_error(call(""))
        assert (err.code, err.bad_fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["id"])
    err = await expect_error(
        licenses.CheckInLicense(
            lpb.CheckInLicenseRequest(id="01900000-0000-7000-8000-000000000000"),
            metadata=admin_md(),
        )
    )
    assert err.reason == "LICENSE_NOT_FOUND"


async def test_update_machine_rechecks_cores(
    licenses: lgrpc.LicenseServiceStub, make_license: Any, redis: aioredis.Redis
) -> None:
    lic = await make_license(policy_fields={**FLOATING, "max_cores": 10})
    a = await activate(licenses, lic.id, "a", cores=4)
    await activate(licenses, lic.id, "b", cores=4)
    m = await update_machine(
        licenses, a.id, ["name", "metadata"], name="renamed", metadata={"k": "v"}
    )
    assert (m.name, dict(m.metadata), m.cores, m.fingerprint) == ("renamed", {"k": "v"}, 4, "a")
    m = await update_machine(licenses, a.id, ["cores"], cores=6)  # 10: exactly the limit
    assert m.cores == 6 and m.name == "renamed"
    err = await expect_error(update_machine(licenses, a.id, ["cores"], cores=7))
    assert (err.code, err.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "CORE_LIMIT_EXCEEDED")
    assert (err.metadata["cores"], err.metadata["requested"], err.metadata["limit"]) == (
        "10",
        "1",
        "10",
    )
    assert err.metadata["machine_cores"] == "7"
    state = await stored_machines(redis, lic.id)
    assert state["cores_field"] == 10
    assert_counters_exact(state)
    m = await update_machine(licenses, a.id, ["cores"], cores=1)  # decreases always pass
    assert (await get_license(licenses, lic.id)).cores_count == 5
    # name-only updates ignore the cores in the message
    m = await update_machine(licenses, a.id, ["name"], name="n2", cores=999)
    assert (m.cores, m.name) == (1, "n2")
    err = await expect_error(update_machine(licenses, a.id, ["cores"], cores=0))
    assert err.bad_fields == ["machine.cores"]
    err = await expect_error(update_machine(licenses, a.id, ["fingerprint"], fingerprint="z"))
    assert err.bad_fields == ["update_mask.paths"]
    err = await expect_error(update_machine(licenses, a.id, [], name="z"))
    assert err.bad_fields == ["update_mask"]
    err = await expect_error(update_machine(licenses, a.id, ["cores"], cores=-3))
    assert err.bad_fields == ["machine.cores"]
    assert_counters_exact(await stored_machines(redis, lic.id))


async def test_list_machines_pages_in_activation_order(
    licenses: lgrpc.LicenseServiceStub, make_license: Any
) -> None:
    lic = await make_license(policy_fields=FLOATING)
    ids = [(await activate(licenses, lic.id, f"fp{i}")).id for i in range(5)]
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        resp = await licenses.ListMachines(
            lpb.ListMachinesRequest(license_id=lic.id, page_size=2, page_token=token),
            metadata=admin_md(),
        )
        seen += [m.id for m in resp.machines]
        pages += 1
        token = resp.next_page_token
        if not token:
            break
    assert (seen, pages) == (ids, 3)
    other = await make_license(policy_fields=FLOATING)
    first = await licenses.ListMachines(
        lpb.ListMachinesRequest(license_id=lic.id, page_size=1), metadata=admin_md()
    )
    for request in (
        lpb.ListMachinesRequest(license_id=other.id, page_token=first.next_page_token),
        lpb.ListMachinesRequest(license_id=lic.id, page_token="garbage!"),
        lpb.ListMachinesRequest(license_id=lic.id, page_size=1001),
        lpb.ListMachinesRequest(license_id=""),
    ):
        err = await expect_error(licenses.ListMachines(request, metadata=admin_md()))
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_dead_floating_machines_stop_counting(
    licenses: lgrpc.LicenseServiceStub,
    make_license: Any,
    clock: ManualClock,
    redis: aioredis.Redis,
) -> None:
    clock.set(T0)
    lic = await make_license(
        policy_fields={
            **FLOATING,
            "max_machines": 2,
            "max_cores": 8,
            "heartbeat_duration": secs(60),
        }
    )
    a = await activate(licenses, lic.id, "a", cores=4)
    b = await activate(licenses, lic.id, "b", cores=4)
    clock.advance(30_000)
    hb = await licenses.MachineHeartbeat(lpb.MachineHeartbeatRequest(id=a.id), metadata=admin_md())
    assert hb.machine.last_heartbeat_time.ToMilliseconds() == T0 + 30_000
    clock.advance(29_999)  # b: 59.999 s since activation, alive
    assert await outcome(activate(licenses, lic.id, "c", cores=1)) == "MACHINE_LIMIT_EXCEEDED"
    clock.advance(1)  # b: exactly 60 s: dead
    listed_licenses = await licenses.ListLicenses(
        lpb.ListLicensesRequest(policy_id=lic.policy_id), metadata=admin_md()
    )
    assert [(x.machines_count, x.cores_count) for x in listed_licenses.licenses] == [(1, 4)]
    view = await get_license(licenses, lic.id)
    assert (view.machines_count, view.cores_count) == (1, 4)
    listed = await licenses.ListMachines(
        lpb.ListMachinesRequest(license_id=lic.id), metadata=admin_md()
    )
    assert [m.id for m in listed.machines] == [a.id]
    for call in (
        licenses.GetMachine(lpb.GetMachineRequest(id=b.id), metadata=admin_md()),
        licenses.MachineHeartbeat(lpb.MachineHeartbeatRequest(id=b.id), metadata=admin_md()),
        licenses.DeactivateMachine(lpb.DeactivateMachineRequest(id=b.id), metadata=admin_md()),
    ):
        e = await expect_error(call)
        assert e.reason == "MACHINE_NOT_FOUND", e
    dead = await validate(licenses, lic.id, fingerprint="b")
    assert (dead.valid, dead.code) == (False, license_pb2.VALIDATION_CODE_HEARTBEAT_DEAD)
    c = await activate(licenses, lic.id, "c", cores=4)  # b's slot and cores are free
    state = await stored_machines(redis, lic.id)
    assert set(state["machines"]) == {a.id, c.id}
    assert (state["machines_field"], state["cores_field"]) == (2, 8)
    assert_counters_exact(state)
    assert await redis.zrange(keys.dead_fingerprints(lic.id), 0, -1) == ["b"]
    # b comes back under its fingerprint once a slot is free; no longer dead
    await licenses.DeactivateMachine(lpb.DeactivateMachineRequest(id=c.id), metadata=admin_md())
    await activate(licenses, lic.id, "b", cores=4)
    assert (await validate(licenses, lic.id, fingerprint="b")).valid
    assert await redis.zcard(keys.dead_fingerprints(lic.id)) == 0


async def test_only_floating_machines_die(
    licenses: lgrpc.LicenseServiceStub, make_license: Any, clock: ManualClock
) -> None:
    clock.set(T0)
    lic = await make_license(policy_fields={"heartbeat_duration": secs(1)})  # node-locked
    await activate(licenses, lic.id, "n")
    clock.advance(3_600_000)
    assert (await get_license(licenses, lic.id)).machines_count == 1
    assert (await validate(licenses, lic.id, fingerprint="n")).valid
    floating = await make_license(policy_fields=FLOATING)  # no heartbeat_duration
    await activate(licenses, floating.id, "f")
    clock.advance(10 * 365 * 86_400_000)
    assert (await get_license(licenses, floating.id)).machines_count == 1


async def test_heartbeat_refused_on_unusable_license(
    licenses: lgrpc.LicenseServiceStub, make_license: Any, clock: ManualClock
) -> None:
    clock.set(T0)
    lic = await make_license(policy_fields={**FLOATING, "duration": secs(3600)})
    m = await activate(licenses, lic.id, "a")
    await licenses.SuspendLicense(lpb.SuspendLicenseRequest(id=lic.id), metadata=admin_md())
    err = await expect_error(
        licenses.MachineHeartbeat(lpb.MachineHeartbeatRequest(id=m.id), metadata=admin_md())
    )
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "LICENSE_SUSPENDED")
    await licenses.ReinstateLicense(lpb.ReinstateLicenseRequest(id=lic.id), metadata=admin_md())
    clock.advance(3_600_000)
    err = await expect_error(
        licenses.MachineHeartbeat(lpb.MachineHeartbeatRequest(id=m.id), metadata=admin_md())
    )
    assert err.reason == "LICENSE_EXPIRED"
    maintain = await make_license(
        policy_fields={**FLOATING, "duration": secs(1), "expiration_strategy": 3}
    )
    m = await activate(licenses, maintain.id, "a")
    clock.advance(1000)
    await licenses.MachineHeartbeat(lpb.MachineHeartbeatRequest(id=m.id), metadata=admin_md())


async def test_license_key_acts_only_on_its_own_license(
    licenses: lgrpc.LicenseServiceStub, make_license: Any
) -> None:
    mine = await make_license(policy_fields=FLOATING)
    theirs = await make_license(policy_fields=FLOATING)
    their_machine = await activate(licenses, theirs.id, "t")
    md = license_md(mine.key)
    denied = [
        activate(licenses, theirs.id, "x", md=md),
        licenses.DeactivateMachine(lpb.DeactivateMachineRequest(id=their_machine.id), metadata=md),
        licenses.MachineHeartbeat(lpb.MachineHeartbeatRequest(id=their_machine.id), metadata=md),
        licenses.CheckInLicense(lpb.CheckInLicenseRequest(id=theirs.id), metadata=md),
        validate(licenses, theirs.id, md=md),
        validate(licenses, key=theirs.key, md=md),
        validate(licenses, key="NO-SUCH-KEY-0123456789", md=md),
        # admin-only RPCs, even on its own license
        licenses.GetMachine(lpb.GetMachineRequest(id=their_machine.id), metadata=md),
        licenses.ListMachines(lpb.ListMachinesRequest(license_id=mine.id), metadata=md),
        update_machine_as(licenses, their_machine.id, md),
    ]
    for call in denied:
        err = await expect_error(call)
        assert (err.code, err.reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
    assert (await outcome(activate(licenses, theirs.id, "y"))) == "OK"  # nothing was taken
    m = await activate(licenses, mine.id, "mine", md=md)
    await licenses.MachineHeartbeat(lpb.MachineHeartbeatRequest(id=m.id), metadata=md)
    assert (await validate(licenses, mine.id, fingerprint="mine", md=md)).valid
    assert (await validate(licenses, key=mine.key, md=md)).valid
    await licenses.CheckInLicense(lpb.CheckInLicenseRequest(id=mine.id), metadata=md)
    await licenses.DeactivateMachine(lpb.DeactivateMachineRequest(id=m.id), metadata=md)


async def update_machine_as(licenses: lgrpc.LicenseServiceStub, machine_id: str, md: Any) -> Any:
    return await licenses.UpdateMachine(
        lpb.UpdateMachineRequest(
            machine=machine_pb2.Machine(id=machine_id, name="x"),
            update_mask=field_mask_pb2.FieldMask(paths=["name"]),
        ),
        metadata=md,
    )


async def test_delete_license_removes_its_machines(
    licenses: lgrpc.LicenseServiceStub,
    make_license: Any,
    clock: ManualClock,
    redis: aioredis.Redis,
) -> None:
    clock.set(T0)
    lic = await make_license(policy_fields={**FLOATING, "heartbeat_duration": secs(10)})
    dead = await activate(licenses, lic.id, "dead")
    clock.advance(10_000)
    live = await activate(licenses, lic.id, "live")  # prunes `dead` into the dead set
    assert await redis.exists(keys.dead_fingerprints(lic.id)) == 1
    await licenses.DeleteLicense(lpb.DeleteLicenseRequest(id=lic.id), metadata=admin_md())
    assert await redis.exists(*keys.machine_keys(lic.id)) == 0
    for m in (dead, live):
        err = await expect_error(
            licenses.GetMachine(lpb.GetMachineRequest(id=m.id), metadata=admin_md())
        )
        assert err.reason == "MACHINE_NOT_FOUND"
    assert (await outcome(activate(licenses, lic.id, "again"))) == "LICENSE_NOT_FOUND"
    assert await redis.exists(*keys.machine_keys(lic.id)) == 0


# --- concurrency ------------------------------------------------------------------------


async def _stubs(running: Running, n: int) -> tuple[list[grpc.aio.Channel], list[Any]]:
    channels = [grpc.aio.insecure_channel(running.target) for _ in range(n)]
    return channels, [lgrpc.LicenseServiceStub(ch) for ch in channels]


async def test_twelve_concurrent_activations_against_sixteen_cores(
    running: Running, make_license: Any, redis: aioredis.Redis
) -> None:
    lic = await make_license(policy_fields={**FLOATING, "max_cores": 16})
    channels, stubs = await _stubs(running, 4)
    try:
        outcomes = await asyncio.gather(
            *(outcome(activate(stubs[i % 4], lic.id, f"fp-{i}", cores=4)) for i in range(12))
        )
    finally:
        for ch in channels:
            await ch.close()
    assert outcomes.count("OK") == 4
    assert outcomes.count("CORE_LIMIT_EXCEEDED") == 8
    state = await stored_machines(redis, lic.id)
    assert (state["count"], state["cores_sum"]) == (4, 16)
    assert_counters_exact(state)


async def test_concurrent_activations_against_max_machines(
    running: Running, make_license: Any, redis: aioredis.Redis
) -> None:
    lic = await make_license(policy_fields={**FLOATING, "max_machines": 5})
    channels, stubs = await _stubs(running, 5)
    try:
        outcomes = await asyncio.gather(
            *(outcome(activate(stubs[i % 5], lic.id, f"fp-{i}")) for i in range(25))
        )
    finally:
        for ch in channels:
            await ch.close()
    assert outcomes.count("OK") == 5
    assert outcomes.count("MACHINE_LIMIT_EXCEEDED") == 20
    state = await stored_machines(redis, lic.id)
    assert state["count"] == 5
    assert_counters_exact(state)


async def test_same_fingerprint_ten_times_at_once(
    running: Running, make_license: Any, redis: aioredis.Redis
) -> None:
    lic = await make_license(policy_fields=FLOATING)
    channels, stubs = await _stubs(running, 5)
    try:
        outcomes = await asyncio.gather(
            *(outcome(activate(stubs[i % 5], lic.id, "one-box", cores=2)) for i in range(10))
        )
    finally:
        for ch in channels:
            await ch.close()
    assert outcomes.count("OK") == 1
    assert outcomes.count("FINGERPRINT_TAKEN") == 9
    state = await stored_machines(redis, lic.id)
    assert (state["count"], state["cores_field"]) == (1, 2)
    assert_counters_exact(state)


async def test_churn_keeps_counters_equal_to_live_machines(
    running: Running,
    licenses: lgrpc.LicenseServiceStub,
    make_license: Any,
    redis: aioredis.Redis,
    clock: ManualClock,
) -> None:
    clock.set(T0)
    lic = await make_license(
        policy_fields={
            **FLOATING,
            "max_machines": 12,
            "max_cores": 40,
            "heartbeat_duration": secs(60),
        }
    )
    rng = random.Random(3)
    channels, stubs = await _stubs(running, 4)
    try:
        seeded = [await activate(stubs[0], lic.id, f"seed-{i}", cores=2) for i in range(8)]
        clock.advance(30_000)
        # half of the seeds keep beating; the other half will die during the churn
        for m in seeded[:4]:
            await stubs[0].MachineHeartbeat(
                lpb.MachineHeartbeatRequest(id=m.id), metadata=admin_md()
            )
        clock.advance(30_000)  # seeds 4..7: exactly 60 s without a heartbeat

        def stub() -> Any:
            return stubs[rng.randrange(4)]

        ops: list[Any] = []
        for i in range(16):
            ops.append(outcome(activate(stub(), lic.id, f"new-{i}", cores=rng.randint(1, 6))))
        for m in seeded[:3] + seeded[5:7]:
            ops.append(
                outcome(
                    stub().DeactivateMachine(
                        lpb.DeactivateMachineRequest(id=m.id), metadata=admin_md()
                    )
                )
            )
        for m in seeded[2:5]:
            ops.append(outcome(update_machine(stub(), m.id, ["cores"], cores=rng.randint(1, 9))))
        rng.shuffle(ops)
        outcomes = await asyncio.gather(*ops)
    finally:
        for ch in channels:
            await ch.close()
    allowed = {
        "OK",
        "MACHINE_LIMIT_EXCEEDED",
        "CORE_LIMIT_EXCEEDED",
        "MACHINE_NOT_FOUND",  # deactivating / updating a machine that died or left meanwhile
    }
    assert set(outcomes) <= allowed, outcomes
    assert outcomes.count("OK") > 0
    state = await stored_machines(redis, lic.id)
    assert_counters_exact(state)
    assert state["count"] <= 12 and state["cores_sum"] <= 40
    assert not {"seed-4", "seed-5", "seed-6", "seed-7"} & set(state["fingerprints"])
    view = await get_license(licenses, lic.id)
    assert (view.machines_count, view.cores_count) == (state["count"], state["cores_sum"])
