"""update_mask of UpdatePolicy, UpdateLicense and UpdateMachine (AIP-134, AIP-161): the proto
field names, every field settable through its own path from the generated client, "*" for a
full replace, and clear refusals of nested, unknown and fixed paths."""

from __future__ import annotations

import dataclasses
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2
from google.protobuf.message import Message

from meter.v1 import license_pb2, machine_pb2, policy_pb2
from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter_grpc.domain import masks
from meter_grpc.domain.models import License, Machine, Policy
from tests.machine_helpers import activate
from tests.support import admin_md, expect_error

DAY_S = 86_400
# Output-only fields that an update changes by itself: left out of before/after comparisons.
_MOVING = ("update_time", "revision", "propagated_revision", "status")


def _mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=paths)


def _dur(seconds: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds)


def _steady(msg: Message) -> Message:
    out = type(msg)()
    out.CopyFrom(msg)
    for name in _MOVING:
        if name in out.DESCRIPTOR.fields_by_name:
            out.ClearField(name)  # type: ignore[arg-type]
    return out


def _with(expected: Message, patch: Message, name: str) -> Message:
    """`expected` with field `name` taken from `patch` (cleared when patch leaves it unset)."""
    out = type(expected)()
    out.CopyFrom(expected)
    out.ClearField(name)  # type: ignore[arg-type]
    only = type(patch)()
    only.CopyFrom(patch)
    for f in only.DESCRIPTOR.fields:
        if f.name != name:
            only.ClearField(f.name)  # type: ignore[arg-type]
    out.MergeFrom(only)
    return out


@pytest.mark.parametrize(
    ("table", "message", "model"),
    [
        (masks.POLICY, policy_pb2.Policy, Policy),
        (masks.LICENSE, license_pb2.License, License),
        (masks.MACHINE, machine_pb2.Machine, Machine),
    ],
)
def test_every_proto_field_is_in_its_mask_table(table: Any, message: Any, model: Any) -> None:
    """A field added to a message must be declared updatable (with the attribute it sets) or
    fixed (with the reason): no path is ever refused as "not a field" while it is one."""
    proto_names = {f.name for f in message.DESCRIPTOR.fields}
    assert set(table.fields) | set(table.fixed) == proto_names
    assert not set(table.fields) & set(table.fixed)
    attrs = {f.name for f in dataclasses.fields(model)}
    assert set(table.fields.values()) <= attrs


async def _get_policy(licenses: lgrpc.LicenseServiceStub, policy_id: str) -> policy_pb2.Policy:
    return (
        await licenses.GetPolicy(lpb.GetPolicyRequest(id=policy_id), metadata=admin_md())
    ).policy


async def _update_policy(
    licenses: lgrpc.LicenseServiceStub, patch: policy_pb2.Policy, *paths: str
) -> policy_pb2.Policy:
    return (
        await licenses.UpdatePolicy(
            lpb.UpdatePolicyRequest(policy=patch, update_mask=_mask(*paths)), metadata=admin_md()
        )
    ).policy


# Every updatable Policy field with a value unlike its default, in an order each step of which
# is a valid policy (floating before max_machines > 1, check_in_interval before
# require_check_in).
POLICY_VALUES: list[tuple[str, Any]] = [
    ("name", "renamed"),
    ("floating", True),
    ("max_machines", 5),
    ("max_uses", 1000),
    ("max_cores", 64),
    ("strict", True),
    ("duration", _dur(30 * DAY_S)),
    ("expiration_strategy", policy_pb2.EXPIRATION_STRATEGY_MAINTAIN_ACCESS),
    ("check_in_interval", _dur(7 * DAY_S)),
    ("require_check_in", True),
    ("heartbeat_duration", _dur(600)),
    ("entitlements", ["export", "batch"]),
    ("overage_strategy", policy_pb2.OVERAGE_STRATEGY_ALLOW_2X_OVERAGE),
    ("usage_reset_interval", policy_pb2.USAGE_RESET_INTERVAL_MONTHLY),
    ("metadata", {"tier": "gold"}),
    ("meters", [policy_pb2.Meter(code="API_CALLS", max_uses=10, entitlement="export")]),
]


async def test_update_policy_sets_every_field_through_its_own_path(
    licenses: lgrpc.LicenseServiceStub, make_policy: Any
) -> None:
    assert {name for name, _ in POLICY_VALUES} == set(masks.POLICY.fields)
    p = await make_policy(name="before")
    expected = _steady(await _get_policy(licenses, p.id))
    for name, value in POLICY_VALUES:
        # The patch carries other changed fields too: only the masked one may change.
        patch = policy_pb2.Policy(id=p.id, **{"name": "ignored", "max_uses": 1, name: value})
        answer = await _update_policy(licenses, patch, name)
        expected = _with(expected, patch, name)
        assert _steady(answer) == expected, name
        assert _steady(await _get_policy(licenses, p.id)) == expected, name
    # Clearing through the mask: an unset duration makes the policy perpetual again.
    cleared = await _update_policy(licenses, policy_pb2.Policy(id=p.id), "duration", "max_uses")
    assert not cleared.HasField("duration") and not cleared.HasField("max_uses")
    got = await _get_policy(licenses, p.id)
    assert not got.HasField("duration") and not got.HasField("max_uses")
    assert got.revision == len(POLICY_VALUES) + 2


async def test_update_policy_star_replaces_every_field(
    licenses: lgrpc.LicenseServiceStub, make_policy: Any
) -> None:
    full = dict(POLICY_VALUES)
    p = await make_policy(**full)
    replacement = policy_pb2.Policy(name="plain", max_uses=3)
    fresh = await make_policy(**{"name": "plain", "max_uses": 3})
    answer = await _update_policy(
        licenses, policy_pb2.Policy(id=p.id, name="plain", max_uses=3), "*"
    )
    got = await _get_policy(licenses, p.id)
    for msg in (answer, got):
        # What a policy made from the same message holds: every field not in it is reset.
        mine, theirs = _steady(msg), _steady(fresh)
        for name in ("id", "create_time"):
            mine.ClearField(name)  # type: ignore[arg-type]
            theirs.ClearField(name)  # type: ignore[arg-type]
        assert mine == theirs
    assert got.name == replacement.name and got.max_uses == 3
    assert not got.HasField("duration") and not got.entitlements and not got.metadata


async def test_update_policy_refuses_nested_unknown_and_output_only_paths(
    licenses: lgrpc.LicenseServiceStub, make_policy: Any
) -> None:
    p = await make_policy(name="kept", max_uses=2, metadata={"a": "b"})
    before = await _get_policy(licenses, p.id)
    patch = policy_pb2.Policy(id=p.id, name="x", duration=_dur(60), metadata={"x": "y"})
    cases: list[tuple[list[str], list[str]]] = [
        (["duration.seconds"], ["nested path", "'duration'"]),
        (["metadata.x"], ["nested path", "'metadata'"]),
        (["check_in_interval.nanos"], ["nested path", "'check_in_interval'"]),
        (["bogus"], ["not a field of Policy", "accepted: check_in_interval, duration"]),
        (["duration_ms"], ["did you mean 'duration'?"]),
        (["check_in_interval_ms"], ["did you mean 'check_in_interval'?"]),
        (["heartbeat_duration_ms"], ["did you mean 'heartbeat_duration'?"]),
        (["id"], ["output only"]),
        (["create_time"], ["output only"]),
        (["update_time"], ["output only"]),
        (["revision"], ["output only"]),
        (["propagated_revision"], ["output only"]),
        (["*", "name"], ['"*" replaces every field and must be the only path']),
        (["name", "duration.seconds"], ["nested path"]),
        ([], ["is required", "name the Policy fields"]),
    ]
    for paths, words in cases:
        err = await expect_error(
            licenses.UpdatePolicy(
                lpb.UpdatePolicyRequest(policy=patch, update_mask=_mask(*paths)),
                metadata=admin_md(),
            )
        )
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT, paths
        assert err.reason == "INVALID_ARGUMENT"
        assert err.bad_fields == ["update_mask.paths" if paths else "update_mask"], paths
        for word in words:
            assert word in err.message, (paths, err.message)
    # A thousand long bogus paths: one short answer, nothing echoed in full.
    err = await expect_error(
        licenses.UpdatePolicy(
            lpb.UpdatePolicyRequest(
                policy=patch, update_mask=_mask(*[f"x{i}" * 500 for i in range(1000)])
            ),
            metadata=admin_md(),
        )
    )
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(err.bad_fields) == 11 and len(err.message) < 1000
    assert await _get_policy(licenses, p.id) == before  # nothing changed


# --- licenses ---------------------------------------------------------------------------


async def _get_license(licenses: lgrpc.LicenseServiceStub, license_id: str) -> license_pb2.License:
    return (
        await licenses.GetLicense(lpb.GetLicenseRequest(id=license_id), metadata=admin_md())
    ).license


async def test_update_license_sets_every_field_through_its_own_path(
    licenses: lgrpc.LicenseServiceStub, make_license: Any
) -> None:
    lic = await make_license(policy_fields={"floating": True}, name="before")
    expire = timestamp_pb2.Timestamp(seconds=lic.create_time.seconds + 365 * DAY_S)
    values: list[tuple[str, Any]] = [
        ("name", "after"),
        ("expire_time", expire),
        ("max_uses", 50),
        ("max_machines", 4),
        ("max_cores", 32),
        ("entitlements", ["extra"]),
        ("metadata", {"customer": "acme"}),
        ("meter_overrides", {"API_CALLS": 5}),
    ]
    assert {name for name, _ in values} == set(masks.LICENSE.fields)
    expected = _steady(await _get_license(licenses, lic.id))
    for name, value in values:
        patch = license_pb2.License(id=lic.id, **{"name": "ignored", "max_cores": 1, name: value})
        answer = (
            await licenses.UpdateLicense(
                lpb.UpdateLicenseRequest(license=patch, update_mask=_mask(name)),
                metadata=admin_md(),
            )
        ).license
        expected = _with(expected, patch, name)
        assert _steady(answer) == expected, name
        assert _steady(await _get_license(licenses, lic.id)) == expected, name
    # "*": every updatable field from the request; the unset limits fall back to the policy's.
    answer = (
        await licenses.UpdateLicense(
            lpb.UpdateLicenseRequest(
                license=license_pb2.License(id=lic.id, name="star", max_uses=9),
                update_mask=_mask("*"),
            ),
            metadata=admin_md(),
        )
    ).license
    got = await _get_license(licenses, lic.id)
    for msg in (answer, got):
        assert (msg.name, msg.max_uses) == ("star", 9)
        assert not msg.HasField("expire_time") and not msg.HasField("max_cores")
        assert not msg.HasField("max_machines")
        assert not msg.entitlements and not msg.metadata


async def test_update_license_refuses_nested_unknown_and_fixed_paths(
    licenses: lgrpc.LicenseServiceStub, make_license: Any
) -> None:
    lic = await make_license(name="kept")
    before = _steady(await _get_license(licenses, lic.id))
    patch = license_pb2.License(id=lic.id, name="x", key="K" * 20, uses=5)
    for paths, words in [
        (["metadata.customer"], ["nested path", "'metadata'"]),
        (["expire_time.seconds"], ["nested path", "'expire_time'"]),
        (["max_uses_override"], ["did you mean 'max_uses'?"]),
        (["bogus"], ["not a field of License", "accepted: entitlements, expire_time"]),
        (["key"], ["set at creation only"]),
        (["policy_id"], ["set at creation only"]),
        (["uses"], ["output only"]),
        (["status"], ["output only", "SuspendLicense"]),
        (["create_time"], ["output only"]),
    ]:
        err = await expect_error(
            licenses.UpdateLicense(
                lpb.UpdateLicenseRequest(license=patch, update_mask=_mask(*paths)),
                metadata=admin_md(),
            )
        )
        assert (err.code, err.bad_fields) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            ["update_mask.paths"],
        ), paths
        for word in words:
            assert word in err.message, (paths, err.message)
    assert _steady(await _get_license(licenses, lic.id)) == before


# --- machines ---------------------------------------------------------------------------


async def _update_machine(
    licenses: lgrpc.LicenseServiceStub, patch: machine_pb2.Machine, *paths: str
) -> Any:
    return licenses.UpdateMachine(
        lpb.UpdateMachineRequest(machine=patch, update_mask=_mask(*paths)), metadata=admin_md()
    )


async def test_update_machine_masks(licenses: lgrpc.LicenseServiceStub, make_license: Any) -> None:
    lic = await make_license(policy_fields={"floating": True, "max_cores": 16})
    m = await activate(licenses, lic.id, "fp-mask", cores=2, name="box", hostname="h", platform="p")
    assert set(masks.MACHINE.fields) == {"cores", "name", "metadata"}
    for name, value in [("cores", 8), ("name", "renamed"), ("metadata", {"rack": "7"})]:
        patch = machine_pb2.Machine(id=m.id, **{"cores": 3, "name": "ignored", name: value})
        answer = (await (await _update_machine(licenses, patch, name))).machine
        m = _with(m, patch, name)  # type: ignore[assignment]
        got = (
            await licenses.GetMachine(lpb.GetMachineRequest(id=m.id), metadata=admin_md())
        ).machine
        assert answer == m == got, name
    star = (
        await (await _update_machine(licenses, machine_pb2.Machine(id=m.id, cores=1), "*"))
    ).machine
    assert (star.cores, star.name, dict(star.metadata)) == (1, "", {})
    assert (star.fingerprint, star.hostname, star.platform) == ("fp-mask", "h", "p")
    for paths, words in [
        (["metadata.rack"], ["nested path", "'metadata'"]),
        (["fingerprint"], ["set at creation only"]),
        (["hostname"], ["set at creation only"]),
        (["last_heartbeat_time"], ["output only"]),
        (["bogus"], ["not a field of Machine", "accepted: cores, metadata, name"]),
    ]:
        err = await expect_error(
            await _update_machine(licenses, machine_pb2.Machine(id=m.id, cores=2), *paths)
        )
        assert (err.code, err.bad_fields) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            ["update_mask.paths"],
        ), paths
        for word in words:
            assert word in err.message, (paths, err.message)
