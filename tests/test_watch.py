"""WatchUsage: a server stream of usage events."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import usage_pb2
from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from tests.support import admin_md, expect_error, license_md, rich_error


async def _collect(stream: Any, n: int) -> list[usage_pb2.UsageEvent]:
    out = []
    async for msg in stream:
        out.append(msg.event)
        if len(out) == n:
            break
    return out


async def first_error_of(call: Any) -> Any:
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as exc:
        return rich_error(exc)
    raise AssertionError("stream ended without error")


async def test_watch_sees_increments_limit_decrements_and_resets(
    usage: ugrpc.UsageServiceStub, make_license: Any
) -> None:
    lic = await make_license(policy_fields={"max_uses": 3})
    stream = usage.WatchUsage(
        # From the start of the (new) license's stream: no race with the first increments.
        upb.WatchUsageRequest(license_id=lic.id, after_event_id="0-0"),
        metadata=license_md(lic.key),
    )
    collecting = asyncio.create_task(_collect(stream, 5))
    md = admin_md()
    await usage.IncrementUsage(
        upb.IncrementUsageRequest(license_id=lic.id, amount=2, request_id="r1"), metadata=md
    )
    await usage.IncrementUsage(upb.IncrementUsageRequest(license_id=lic.id), metadata=md)
    await expect_error(
        usage.IncrementUsage(upb.IncrementUsageRequest(license_id=lic.id), metadata=md)
    )
    await usage.DecrementUsage(upb.DecrementUsageRequest(license_id=lic.id), metadata=md)
    await usage.ResetUsage(upb.ResetUsageRequest(license_id=lic.id), metadata=md)
    events = await asyncio.wait_for(collecting, 10)
    stream.cancel()
    T = usage_pb2
    assert [(e.type, e.amount, e.uses) for e in events] == [
        (T.USAGE_EVENT_TYPE_INCREMENTED, 2, 2),
        (T.USAGE_EVENT_TYPE_INCREMENTED, 1, 3),
        (T.USAGE_EVENT_TYPE_LIMIT_REACHED, 1, 3),
        (T.USAGE_EVENT_TYPE_DECREMENTED, 1, 2),
        (T.USAGE_EVENT_TYPE_RESET, 0, 0),
    ]
    assert events[0].request_id == "r1"
    assert events[0].max_uses == 3
    assert events[0].event_time.seconds > 0


async def test_watch_resumes_after_an_event_id(
    usage: ugrpc.UsageServiceStub, make_license: Any
) -> None:
    lic = await make_license()
    md = admin_md()
    stream = usage.WatchUsage(
        upb.WatchUsageRequest(license_id=lic.id, after_event_id="0-0"), metadata=md
    )
    first = asyncio.create_task(_collect(stream, 1))
    for amount in (1, 2, 3):
        await usage.IncrementUsage(
            upb.IncrementUsageRequest(license_id=lic.id, amount=amount), metadata=md
        )
    (e1,) = await asyncio.wait_for(first, 10)
    stream.cancel()
    rest = await asyncio.wait_for(
        _collect(
            usage.WatchUsage(
                upb.WatchUsageRequest(license_id=lic.id, after_event_id=e1.event_id), metadata=md
            ),
            2,
        ),
        10,
    )
    assert [e.amount for e in [e1, *rest]] == [1, 2, 3]


async def test_watch_errors(
    usage: ugrpc.UsageServiceStub, licenses: lgrpc.LicenseServiceStub, make_license: Any
) -> None:
    lic = await make_license()
    other = await make_license()

    async def first_error(request: upb.WatchUsageRequest, md: Any) -> Any:
        return await first_error_of(usage.WatchUsage(request, metadata=md))

    err = await first_error(
        upb.WatchUsageRequest(license_id="01900000-0000-7000-8000-000000000000"), admin_md()
    )
    assert err.reason == "LICENSE_NOT_FOUND"
    err = await first_error(
        upb.WatchUsageRequest(license_id=lic.id, after_event_id="nope"), admin_md()
    )
    assert err.bad_fields == ["after_event_id"]
    err = await first_error(upb.WatchUsageRequest(license_id=other.id), license_md(lic.key))
    assert err.reason == "PERMISSION_DENIED"
    err = await first_error(
        upb.WatchUsageRequest(license_id=lic.id, after_event_id="1-0", from_oldest=True),
        admin_md(),
    )
    assert (err.code, err.bad_fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["from_oldest"])
    assert "after_event_id" in err.message
    # Deleting the watched license ends the stream with LICENSE_NOT_FOUND.
    call = usage.WatchUsage(upb.WatchUsageRequest(license_id=lic.id), metadata=admin_md())
    await asyncio.wait_for(call.initial_metadata(), 10)  # subscribed
    await licenses.DeleteLicense(lpb.DeleteLicenseRequest(id=lic.id), metadata=admin_md())
    err = await asyncio.wait_for(first_error_of(call), 15)
    assert err.reason == "LICENSE_NOT_FOUND", err


async def test_watch_sends_headers_once_subscribed_and_misses_nothing_after_them(
    usage: ugrpc.UsageServiceStub, make_license: Any
) -> None:
    """Without a start: only new events. The response headers come once the read position is
    fixed, so the increment made right after them is the first event; the one made before the
    watch never arrives. Repeated, each time on a fresh stream, to leave no room for luck."""
    lic = await make_license()
    md = admin_md()
    await usage.IncrementUsage(upb.IncrementUsageRequest(license_id=lic.id, amount=7), metadata=md)
    uses = 7
    for i in range(20):
        call = usage.WatchUsage(upb.WatchUsageRequest(license_id=lic.id), metadata=md)
        # Before the fix no headers came until the first event: this wait timed out.
        await asyncio.wait_for(call.initial_metadata(), 10)
        await usage.IncrementUsage(
            upb.IncrementUsageRequest(license_id=lic.id, amount=1, request_id=f"w{i}"), metadata=md
        )
        uses += 1
        (event,) = await asyncio.wait_for(_collect(call, 1), 10)
        call.cancel()
        assert (event.type, event.amount, event.uses, event.request_id) == (
            usage_pb2.USAGE_EVENT_TYPE_INCREMENTED,
            1,
            uses,
            f"w{i}",
        )


async def test_watch_from_oldest_returns_events_made_before_the_subscription(
    usage: ugrpc.UsageServiceStub, make_license: Any
) -> None:
    lic = await make_license(policy_fields={"max_uses": 3})
    md = admin_md()
    for amount in (1, 2):
        await usage.IncrementUsage(
            upb.IncrementUsageRequest(license_id=lic.id, amount=amount), metadata=md
        )
    await usage.DecrementUsage(upb.DecrementUsageRequest(license_id=lic.id), metadata=md)
    T = usage_pb2
    before = [
        (T.USAGE_EVENT_TYPE_INCREMENTED, 1, 1),
        (T.USAGE_EVENT_TYPE_INCREMENTED, 2, 3),
        (T.USAGE_EVENT_TYPE_LIMIT_REACHED, 2, 3),
        (T.USAGE_EVENT_TYPE_DECREMENTED, 1, 2),
    ]
    # from_oldest, and its spelled-out equivalent after_event_id "0-0", read the same events;
    # then the stream goes on with new ones.
    for request in (
        upb.WatchUsageRequest(license_id=lic.id, from_oldest=True),
        upb.WatchUsageRequest(license_id=lic.id, after_event_id="0-0"),
    ):
        call = usage.WatchUsage(request, metadata=license_md(lic.key))
        await asyncio.wait_for(call.initial_metadata(), 10)
        events = await asyncio.wait_for(_collect(call, 4), 10)
        assert [(e.type, e.amount, e.uses) for e in events] == before
        await usage.ResetUsage(upb.ResetUsageRequest(license_id=lic.id), metadata=md)
        (new,) = await asyncio.wait_for(_collect(call, 1), 10)
        call.cancel()
        assert (new.type, new.uses) == (T.USAGE_EVENT_TYPE_RESET, 0)
