"""Shared helpers of the machine, validation and lifecycle tests."""

from __future__ import annotations

import json
from typing import Any

import grpc
import redis.asyncio as aioredis
from google.protobuf import field_mask_pb2

from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import machine_pb2
from meter_grpc.storage import keys
from tests.support import admin_md, rich_error

Md = tuple[tuple[str, str], ...]


async def activate(
    licenses: lgrpc.LicenseServiceStub,
    license_id: str,
    fingerprint: str,
    cores: int = 0,
    md: Md | None = None,
    **fields: Any,
) -> machine_pb2.Machine:
    resp = await licenses.ActivateMachine(
        lpb.ActivateMachineRequest(
            license_id=license_id, fingerprint=fingerprint, cores=cores, **fields
        ),
        metadata=md or admin_md(),
    )
    return resp.machine


async def outcome(call: Any) -> str:
    """'OK' or the ErrorInfo reason of a call."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return rich_error(exc).reason
    return "OK"


async def get_license(licenses: lgrpc.LicenseServiceStub, license_id: str) -> Any:
    resp = await licenses.GetLicense(lpb.GetLicenseRequest(id=license_id), metadata=admin_md())
    return resp.license


async def validate(
    licenses: lgrpc.LicenseServiceStub,
    license_id: str = "",
    *,
    key: str = "",
    fingerprint: str = "",
    entitlements: tuple[str, ...] = (),
    md: Md | None = None,
) -> lpb.ValidateLicenseResponse:
    request = lpb.ValidateLicenseRequest(fingerprint=fingerprint, entitlements=entitlements)
    if key:
        request.key = key
    else:
        request.license_id = license_id
    resp: lpb.ValidateLicenseResponse = await licenses.ValidateLicense(
        request, metadata=md or admin_md()
    )
    return resp


async def update_machine(
    licenses: lgrpc.LicenseServiceStub, machine_id: str, paths: list[str], **fields: Any
) -> machine_pb2.Machine:
    resp = await licenses.UpdateMachine(
        lpb.UpdateMachineRequest(
            machine=machine_pb2.Machine(id=machine_id, **fields),
            update_mask=field_mask_pb2.FieldMask(paths=paths),
        ),
        metadata=admin_md(),
    )
    return resp.machine


async def stored_machines(redis: aioredis.Redis, license_id: str) -> dict[str, Any]:
    """What Redis holds for a license's machines, read directly."""
    raw = await redis.hgetall(keys.machines(license_id))
    machines = {mid: json.loads(text) for mid, text in raw.items()}
    counters = await redis.hmget(keys.license(license_id), ["machines", "cores"])
    return {
        "machines": machines,
        "count": len(machines),
        "cores_sum": sum(int(m["cores"]) for m in machines.values()),
        "machines_field": int(counters[0]),
        "cores_field": int(counters[1]),
        "fingerprints": await redis.hgetall(keys.fingerprints(license_id)),
        "heartbeats": await redis.zcard(keys.heartbeats(license_id)),
    }


def assert_counters_exact(state: dict[str, Any]) -> None:
    """The license's counters equal its live machines; the indexes agree with them."""
    assert state["machines_field"] == state["count"]
    assert state["cores_field"] == state["cores_sum"]
    assert state["heartbeats"] == state["count"]
    assert {mid: m["fingerprint"] for mid, m in state["machines"].items()} == {
        mid: fp for fp, mid in state["fingerprints"].items()
    }
