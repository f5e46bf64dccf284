"""StreamUsage with a window of requests in flight: answers in request order, exact counts,
errors of one request never end the stream, several streams against one limit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2

from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from meter_grpc.api.usage_service import UsageService
from meter_grpc.domain.metering import STREAM_WINDOW
from meter_grpc.domain.models import Usage
from meter_grpc.storage import keys
from tests.conftest import Running
from tests.support import UNKNOWN_ID, admin_md


def reason(answer: upb.StreamUsageResponse) -> str:
    if answer.WhichOneof("outcome") == "result":
        return "OK"
    for d in answer.error.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            ei = error_details_pb2.ErrorInfo()
            d.Unpack(ei)
            return ei.reason
    raise AssertionError(f"no ErrorInfo in {answer}")


async def test_2000_requests_on_one_stream_in_order_with_exact_counts(
    usage: ugrpc.UsageServiceStub, make_license: Any, redis: aioredis.Redis
) -> None:
    lic = await make_license(policy_fields={"max_uses": 1200})
    # with no script cached, a re-sent call (after NOSCRIPT) would apply out of order
    await redis.script_flush()

    async def requests() -> AsyncIterator[upb.IncrementUsageRequest]:
        for i in range(2000):
            yield upb.IncrementUsageRequest(license_id=lic.id, request_id=f"s{i}")

    answers = [a async for a in usage.StreamUsage(requests(), metadata=admin_md())]
    assert [a.request_id for a in answers] == [f"s{i}" for i in range(2000)]
    # sent to the store in request order: the first 1,200 fit, in order, the rest are refused
    assert [reason(a) for a in answers] == ["OK"] * 1200 + ["USAGE_LIMIT_EXCEEDED"] * 800
    assert [a.result.uses for a in answers[:1200]] == list(range(1, 1201))
    assert await redis.hget(keys.license(lic.id), "uses") == "1200"


async def test_errors_mid_stream_are_answers_and_the_stream_goes_on(
    usage: ugrpc.UsageServiceStub, make_license: Any, redis: aioredis.Redis
) -> None:
    lic = await make_license(policy_fields={"max_uses": 1000})
    bad = {100: (UNKNOWN_ID, 1), 200: (lic.id, -1), 300: ("", 1), 400: (lic.id, 2**60)}

    async def requests() -> AsyncIterator[upb.IncrementUsageRequest]:
        for i in range(500):
            license_id, amount = bad.get(i, (lic.id, 1))
            yield upb.IncrementUsageRequest(
                license_id=license_id, amount=amount, request_id=f"m{i}"
            )

    answers = [a async for a in usage.StreamUsage(requests(), metadata=admin_md())]
    assert [a.request_id for a in answers] == [f"m{i}" for i in range(500)]
    expected = ["OK"] * 500
    expected[100] = "LICENSE_NOT_FOUND"
    expected[200] = expected[300] = expected[400] = "INVALID_ARGUMENT"
    assert [reason(a) for a in answers] == expected
    assert answers[200].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert answers[100].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert answers[-1].result.uses == 496
    assert await redis.hget(keys.license(lic.id), "uses") == "496"


async def test_reading_stops_while_the_window_is_full(caplog: pytest.LogCaptureFixture) -> None:
    """The servicer reads STREAM_WINDOW requests ahead, no more, while none is answered; it
    reads on as answers go out, and answers in request order even when later requests finish
    first."""
    release = asyncio.Event()

    class SlowMetering:
        async def prepare_ordered(self) -> None:
            pass

        async def increment(self, license_id: str, amount: int, request_id: str) -> Usage:
            if request_id == "boom":
                raise RuntimeError("a bug")
            if int(request_id) % 2 == 0:  # the even ones wait; the odd ones finish first
                await release.wait()
            return Usage(
                uses=int(request_id), max_uses=None, overage_limit=None, period_end_ms=None
            )

    pulled = 0
    total = STREAM_WINDOW * 3

    async def requests() -> AsyncIterator[upb.IncrementUsageRequest]:
        nonlocal pulled
        for i in range(total):
            pulled += 1
            yield upb.IncrementUsageRequest(license_id="lic", request_id=str(i))
        yield upb.IncrementUsageRequest(license_id="lic", request_id="boom")
        yield upb.IncrementUsageRequest(license_id="lic", request_id="-1")

    service = UsageService(SlowMetering())  # type: ignore[arg-type]
    answers = service.StreamUsage(requests(), None)
    first = asyncio.ensure_future(anext(answers))
    await asyncio.sleep(0.2)
    assert pulled == STREAM_WINDOW
    assert not first.done()
    release.set()
    got = [await first] + [a async for a in answers]
    assert [a.result.uses for a in got[:total]] == list(range(total))
    assert pulled == total
    # an unexpected failure is that request's INTERNAL error (and a log), not the stream's end
    assert got[total].request_id == "boom"
    assert got[total].error.code == grpc.StatusCode.INTERNAL.value[0]
    assert got[total + 1].result.uses == -1


async def test_streams_over_four_channels_never_overgrant(
    running: Running, make_license: Any, redis: aioredis.Redis
) -> None:
    lic = await make_license(policy_fields={"max_uses": 1000})
    channels = [grpc.aio.insecure_channel(running.target) for _ in range(4)]

    async def stream(stub: ugrpc.UsageServiceStub) -> list[upb.StreamUsageResponse]:
        async def requests() -> AsyncIterator[upb.IncrementUsageRequest]:
            for i in range(400):
                yield upb.IncrementUsageRequest(license_id=lic.id, amount=1 + i % 2)

        return [a async for a in stub.StreamUsage(requests(), metadata=admin_md())]

    try:
        stubs = [ugrpc.UsageServiceStub(ch) for ch in channels]
        answers = await asyncio.gather(*(stream(stubs[i % 4]) for i in range(8)))
    finally:
        for ch in channels:
            await ch.close()
    granted = 0
    for one in answers:
        assert len(one) == 400
        for i, a in enumerate(one):
            assert reason(a) in ("OK", "USAGE_LIMIT_EXCEEDED")
            granted += (1 + i % 2) if reason(a) == "OK" else 0
    uses = int(await redis.hget(keys.license(lic.id), "uses") or 0)
    assert granted == uses == 1000


async def test_a_cancelled_stream_leaves_the_server_serving(
    usage: ugrpc.UsageServiceStub, make_license: Any, redis: aioredis.Redis
) -> None:
    lic = await make_license()

    async def requests() -> AsyncIterator[upb.IncrementUsageRequest]:
        for _ in range(5000):
            yield upb.IncrementUsageRequest(license_id=lic.id)

    call = usage.StreamUsage(requests(), metadata=admin_md())
    got = 0
    async for _ in call:
        got += 1
        if got == 10:
            call.cancel()
            break
    # whatever was sent before the cancellation counted at most once; the service goes on
    await asyncio.sleep(0.2)
    counted = int(await redis.hget(keys.license(lic.id), "uses") or 0)
    assert 10 <= counted <= 5000
    r = await usage.IncrementUsage(
        upb.IncrementUsageRequest(license_id=lic.id), metadata=admin_md()
    )
    assert r.uses == counted + 1
