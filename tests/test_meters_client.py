"""The Python client (blocking and asyncio) with meters and reservations."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from meter.v1 import license_pb2, policy_pb2
from meter.v1 import usage_service_pb2 as upb
from meter_grpc.client import (
    AsyncMeterClient,
    MeterClient,
    MeterNotFound,
    ReservationExpired,
    UsageLimitExceeded,
)
from tests.conftest import Running
from tests.support import ADMIN_TOKEN


def _policy() -> policy_pb2.Policy:
    return policy_pb2.Policy(
        name="metered", meters=[policy_pb2.Meter(code="GPU_SECONDS", max_uses=1000)]
    )


async def test_sync_client_reserve_commit_and_release_on_exception(running: Running) -> None:
    def scenario() -> None:
        with MeterClient(running.target, admin_token=ADMIN_TOKEN) as admin:
            policy = admin.create_policy(_policy())
            lic = admin.create_license(license_pb2.License(policy_id=policy.id))
        with MeterClient(running.target, license_key=lic.key) as client:
            with client.reserve(lic.id, 1000, meter="GPU_SECONDS", ttl=600) as r:
                assert r.usage.reserved == 1000
                with pytest.raises(UsageLimitExceeded) as info:
                    client.increment_usage(lic.id, meter="GPU_SECONDS")
                assert info.value.metadata["reserved"] == "1000"
                done = r.commit(734)
                assert done.usage.uses == 734 and done.usage.reserved == 0
                again = r.commit(734)  # the same request id: answered again, counted once
                assert again.replayed
            with (
                pytest.raises(RuntimeError),
                client.reserve(
                    lic.id, 200, meter="GPU_SECONDS", ttl=dt.timedelta(minutes=5)
                ) as failed,
            ):
                raise RuntimeError("the job failed")
            assert (
                failed.closed_by is not None
                and failed.closed_by.reservation.state == upb.RESERVATION_STATE_RELEASED
            )
            with client.reserve(lic.id, 10, meter="GPU_SECONDS") as unused:
                pass  # left without a commit: released
            with pytest.raises(ReservationExpired):
                client.commit_reservation(lic.id, unused.id)
            got = client.get_usage(lic.id, meter="GPU_SECONDS")
            assert (got.uses, got.reserved, got.remaining) == (734, 0, 266)
            listed = client.list_usage(lic.id)
            assert [(u.meter, u.uses) for u in listed.usages] == [("", 0), ("GPU_SECONDS", 734)]
            with pytest.raises(MeterNotFound):
                client.increment_usage(lic.id, meter="NOPE")

    await asyncio.to_thread(scenario)


async def test_async_client_reserve(running: Running) -> None:
    async with AsyncMeterClient(running.target, admin_token=ADMIN_TOKEN) as admin:
        policy = await admin.create_policy(_policy())
        lic = await admin.create_license(license_pb2.License(policy_id=policy.id))
        async with await admin.reserve(lic.id, 500, meter="GPU_SECONDS", ttl=60) as r:
            assert (await admin.get_usage(lic.id, meter="GPU_SECONDS")).reserved == 500
            await r.commit()
        with pytest.raises(ValueError, match="boom"):
            async with await admin.reserve(lic.id, 100, meter="GPU_SECONDS"):
                raise ValueError("boom")
        got = await admin.get_usage(lic.id, meter="GPU_SECONDS")
        assert (got.uses, got.reserved) == (500, 0)
        r2 = await admin.increment_usage(lic.id, 5, meter="GPU_SECONDS")
        assert r2.uses == 505
        assert (await admin.decrement_usage(lic.id, 5, meter="GPU_SECONDS")).uses == 500
        assert (await admin.reset_usage(lic.id, meter="GPU_SECONDS")).uses == 0
