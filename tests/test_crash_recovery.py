"""The service killed or stopped in the middle of a multi-step operation, as a user runs it
(`python -m meter_grpc` on the embedded store): after a restart the state is right and what
was cut short completes by itself (a policy change) or through its retry (a create)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import policy_pb2
from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from tests.test_process import ServiceProcess
from tests.test_propagation import (
    FOLLOW_WITHIN_S,
    assert_all_follow,
    create_licenses,
    update,
    wait_propagated,
)

pytestmark = pytest.mark.slow


@pytest.fixture
async def proc(tmp_path: Path) -> AsyncIterator[ServiceProcess]:
    sp = ServiceProcess(tmp_path / "var")
    yield sp
    if sp.proc and sp.proc.returncode is None:
        sp.proc.kill()
        await sp.proc.wait()


def store(proc: ServiceProcess) -> aioredis.Redis:
    return aioredis.Redis(
        unix_socket_path=str(proc.data_dir / "valkey.sock"), decode_responses=True
    )


async def policy_with_licenses(proc: ServiceProcess, n: int) -> tuple[str, list[str]]:
    async with grpc.aio.insecure_channel(proc.target) as ch:
        licenses = lgrpc.LicenseServiceStub(ch)
        policy = (
            await licenses.CreatePolicy(
                lpb.CreatePolicyRequest(policy=policy_pb2.Policy(max_uses=100)),
                metadata=proc.token(),
            )
        ).policy
        return policy.id, await create_licenses(licenses, policy.id, n, md=proc.token())


async def restart_and_check(proc: ServiceProcess, policy_id: str, ids: list[str]) -> None:
    await proc.start()
    async with grpc.aio.insecure_channel(proc.target) as ch:
        licenses = lgrpc.LicenseServiceStub(ch)
        p = await wait_propagated(licenses, policy_id, md=proc.token(), timeout_s=FOLLOW_WITHIN_S)
        assert (p.revision, p.max_uses) == (2, 10)
        client = store(proc)
        try:
            await assert_all_follow(client, ids, 2, 10)
        finally:
            await client.aclose()
        usage = ugrpc.UsageServiceStub(ch)
        await usage.IncrementUsage(
            upb.IncrementUsageRequest(license_id=ids[0], amount=10), metadata=proc.token()
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await usage.IncrementUsage(
                upb.IncrementUsageRequest(license_id=ids[0]), metadata=proc.token()
            )
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    code, _ = await proc.terminate()
    assert code == 0


async def test_sigkill_during_update_policy(
    proc: ServiceProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL after the first page of an UpdatePolicy of 5,000 licenses has been copied (a
    failpoint: the copy is too fast to catch by timing): after a restart every license
    enforces the new limit within 30 s."""
    monkeypatch.setenv("METER_FAILPOINTS", "propagate.page=kill")
    await proc.start()
    policy_id, ids = await policy_with_licenses(proc, 5000)
    async with grpc.aio.insecure_channel(proc.target) as ch:
        with pytest.raises(grpc.aio.AioRpcError):
            await lgrpc.LicenseServiceStub(ch).UpdatePolicy(
                update(policy_id, max_uses=10), metadata=proc.token()
            )
    assert proc.proc is not None
    assert await proc.proc.wait() == -signal.SIGKILL
    monkeypatch.delenv("METER_FAILPOINTS")
    await restart_and_check(proc, policy_id, ids)


async def test_grace_period_ends_during_update_policy(
    proc: ServiceProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM with a 1 s grace while an UpdatePolicy is stuck midway (a failpoint holds the
    propagation): the service stops after the grace; after a restart the change completes."""
    monkeypatch.setenv("METER_SHUTDOWN_GRACE", "1")
    monkeypatch.setenv("METER_FAILPOINTS", "propagate.page=hang")
    await proc.start()
    policy_id, ids = await policy_with_licenses(proc, 5000)
    async with grpc.aio.insecure_channel(proc.target) as ch:
        call = lgrpc.LicenseServiceStub(ch).UpdatePolicy(
            update(policy_id, max_uses=10), metadata=proc.token()
        )
        await asyncio.sleep(0.3)
        code, log = await proc.terminate()  # SIGTERM
        with pytest.raises(grpc.aio.AioRpcError):
            await call
    assert code == 0, log
    monkeypatch.delenv("METER_FAILPOINTS")
    await restart_and_check(proc, policy_id, ids)


@pytest.mark.parametrize("step", ["create_license.key_claimed", "create_license.created"])
async def test_sigkill_during_create_license(
    proc: ServiceProcess, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """Killed between two steps of a create: after a restart the retry with the same
    request_id creates the license once, with the key it chose."""
    monkeypatch.setenv("METER_FAILPOINTS", f"{step}=kill")
    await proc.start()
    request = lpb.CreateLicenseRequest(request_id="crash-1")
    async with grpc.aio.insecure_channel(proc.target) as ch:
        licenses = lgrpc.LicenseServiceStub(ch)
        policy = (
            await licenses.CreatePolicy(
                lpb.CreatePolicyRequest(policy=policy_pb2.Policy()), metadata=proc.token()
            )
        ).policy
        request.license.policy_id = policy.id
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            await licenses.CreateLicense(request, metadata=proc.token())
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
    assert proc.proc is not None
    await proc.proc.wait()
    monkeypatch.delenv("METER_FAILPOINTS")
    await proc.start()
    async with grpc.aio.insecure_channel(proc.target) as ch:
        licenses = lgrpc.LicenseServiceStub(ch)
        lic = (await licenses.CreateLicense(request, metadata=proc.token())).license
        again = (await licenses.CreateLicense(request, metadata=proc.token())).license
        assert (again.id, again.key) == (lic.id, lic.key)
        listed = await licenses.ListLicenses(
            lpb.ListLicensesRequest(policy_id=policy.id), metadata=proc.token()
        )
        assert [x.id for x in listed.licenses] == [lic.id]
        await ugrpc.UsageServiceStub(ch).GetUsage(
            upb.GetUsageRequest(license_id=lic.id),
            metadata=(("authorization", f"License {lic.key}"),),
        )
    code, _ = await proc.terminate()
    assert code == 0
