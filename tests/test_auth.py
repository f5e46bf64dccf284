"""Authentication and authorization (SPEC §5)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from tests.support import admin_md, expect_error, license_md


async def test_missing_or_wrong_credentials(
    licenses: lgrpc.LicenseServiceStub, usage: ugrpc.UsageServiceStub
) -> None:
    for md in [
        (),
        (("authorization", "Bearer wrong"),),
        (("authorization", "Basic abc"),),
        (("authorization", "Bearer"),),
    ]:
        err = await expect_error(licenses.ListPolicies(lpb.ListPoliciesRequest(), metadata=md))
        assert err.code == grpc.StatusCode.UNAUTHENTICATED
        assert err.reason == "UNAUTHENTICATED"
    err = await expect_error(
        usage.GetUsage(
            upb.GetUsageRequest(license_id="x"), metadata=(("authorization", "License NOPE-NOPE"),)
        )
    )
    assert err.code == grpc.StatusCode.UNAUTHENTICATED


async def test_license_key_uses_its_own_license(
    usage: ugrpc.UsageServiceStub, make_license: Any
) -> None:
    lic = await make_license(policy_fields={"max_uses": 5})
    r = await usage.IncrementUsage(
        upb.IncrementUsageRequest(license_id=lic.id, amount=2), metadata=license_md(lic.key)
    )
    assert r.uses == 2
    got = await usage.GetUsage(upb.GetUsageRequest(license_id=lic.id), metadata=license_md(lic.key))
    assert got.uses == 2


async def test_license_key_may_not_touch_another_license(
    usage: ugrpc.UsageServiceStub, make_license: Any
) -> None:
    mine = await make_license()
    other = await make_license()
    err = await expect_error(
        usage.IncrementUsage(
            upb.IncrementUsageRequest(license_id=other.id), metadata=license_md(mine.key)
        )
    )
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    assert err.reason == "PERMISSION_DENIED"
    got = await usage.GetUsage(upb.GetUsageRequest(license_id=other.id), metadata=admin_md())
    assert got.uses == 0


async def test_license_key_may_not_decrement_reset_or_administer(
    licenses: lgrpc.LicenseServiceStub, usage: ugrpc.UsageServiceStub, make_license: Any
) -> None:
    lic = await make_license()
    md = license_md(lic.key)
    for call in (
        usage.DecrementUsage(upb.DecrementUsageRequest(license_id=lic.id), metadata=md),
        usage.ResetUsage(upb.ResetUsageRequest(license_id=lic.id), metadata=md),
        licenses.GetLicense(lpb.GetLicenseRequest(id=lic.id), metadata=md),
        licenses.ListPolicies(lpb.ListPoliciesRequest(), metadata=md),
        licenses.DeleteLicense(lpb.DeleteLicenseRequest(id=lic.id), metadata=md),
        licenses.SuspendLicense(lpb.SuspendLicenseRequest(id=lic.id), metadata=md),
    ):
        err = await expect_error(call)
        assert err.code == grpc.StatusCode.PERMISSION_DENIED
        assert err.reason == "PERMISSION_DENIED"
    await licenses.GetLicense(lpb.GetLicenseRequest(id=lic.id), metadata=admin_md())


async def test_stream_usage_checks_each_request(
    usage: ugrpc.UsageServiceStub, make_license: Any
) -> None:
    mine = await make_license()
    other = await make_license()

    async def requests() -> Any:
        yield upb.IncrementUsageRequest(license_id=mine.id, request_id="a")
        yield upb.IncrementUsageRequest(license_id=other.id, request_id="b")

    # The interceptor checks every message against auth.LICENSE_KEY_METHODS: a message naming
    # another license ends the stream with PERMISSION_DENIED, after the answers before it.
    call = usage.StreamUsage(requests(), metadata=license_md(mine.key))
    answers: list[Any] = []

    async def drain() -> None:
        async for r in call:
            answers.append(r)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await drain()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert [a.result.uses for a in answers] == [1]


async def test_health_needs_no_credentials(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "meter.v1.LicenseService", "meter.v1.UsageService"):
        r = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert r.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_services_without_credentials(channel: grpc.aio.Channel) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def ask() -> Any:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names = set()
    async for resp in stub.ServerReflectionInfo(ask()):
        names |= {s.name for s in resp.list_services_response.service}
    assert {"meter.v1.LicenseService", "meter.v1.UsageService", "grpc.health.v1.Health"} <= names
