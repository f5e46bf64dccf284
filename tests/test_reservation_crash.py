"""kill -9 between ReserveUsage and CommitReservation (`python -m meter_grpc` on the embedded
store, the service and its store both SIGKILLed): nothing acknowledged is lost, the
reservations survive the restart, are committed after it and still expire on time."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import policy_pb2
from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from tests.support import alive, rich_error, until
from tests.test_process import ServiceProcess

pytestmark = pytest.mark.slow

EXPIRES_IN_S = 15


@pytest.fixture
async def proc(tmp_path: Path) -> AsyncIterator[ServiceProcess]:
    sp = ServiceProcess(tmp_path / "var")
    yield sp
    await sp.close()


async def test_sigkill_between_reserve_and_commit_loses_nothing(proc: ServiceProcess) -> None:
    await proc.start()
    md = proc.token()
    async with grpc.aio.insecure_channel(proc.target) as ch:
        licenses = lgrpc.LicenseServiceStub(ch)
        usage = ugrpc.UsageServiceStub(ch)
        policy = (
            await licenses.CreatePolicy(
                lpb.CreatePolicyRequest(
                    policy=policy_pb2.Policy(meters=[policy_pb2.Meter(code="GPU", max_uses=100)])
                ),
                metadata=md,
            )
        ).policy
        lic = (
            await licenses.CreateLicense(
                lpb.CreateLicenseRequest(license={"policy_id": policy.id}), metadata=md
            )
        ).license

        async def reserve(amount: int, ttl_s: int) -> upb.Reservation:
            r = await usage.ReserveUsage(
                upb.ReserveUsageRequest(
                    license_id=lic.id,
                    meter="GPU",
                    amount=amount,
                    ttl=duration_pb2.Duration(seconds=ttl_s),
                ),
                metadata=md,
            )
            return r.reservation

        kept = await reserve(40, 600)
        left = await reserve(50, EXPIRES_IN_S)
    assert proc.proc is not None
    valkey = proc.valkey_pid()
    proc.proc.send_signal(signal.SIGKILL)
    os.kill(valkey, signal.SIGKILL)
    await proc.proc.wait()
    await until(lambda: not alive(valkey), what="valkey gone")

    await proc.start()
    async with grpc.aio.insecure_channel(proc.target) as ch:
        usage = ugrpc.UsageServiceStub(ch)
        got = await usage.GetUsage(upb.GetUsageRequest(license_id=lic.id, meter="GPU"), metadata=md)
        assert (got.uses, got.reserved, got.remaining) == (0, 90, 10)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await usage.IncrementUsage(
                upb.IncrementUsageRequest(license_id=lic.id, meter="GPU", amount=11), metadata=md
            )
        assert rich_error(refused.value).metadata["reserved"] == "90"
        c = await usage.CommitReservation(
            upb.CommitReservationRequest(license_id=lic.id, reservation_id=kept.id, amount=25),
            metadata=md,
        )
        assert (c.usage.uses, c.usage.reserved) == (25, 50)
        # the other one still expires at its expire_time, not later
        expire_s = left.expire_time.ToMilliseconds() / 1000
        assert time.time() < expire_s
        await asyncio.sleep(max(0.0, expire_s - time.time()) + 0.2)
        got = await usage.GetUsage(upb.GetUsageRequest(license_id=lic.id, meter="GPU"), metadata=md)
        assert (got.uses, got.reserved, got.remaining) == (25, 0, 75)
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await usage.CommitReservation(
                upb.CommitReservationRequest(license_id=lic.id, reservation_id=left.id),
                metadata=md,
            )
        err = rich_error(late.value)
        assert (err.reason, err.metadata["state"]) == ("RESERVATION_EXPIRED", "expired")
    code, _ = await proc.terminate()
    assert code == 0
