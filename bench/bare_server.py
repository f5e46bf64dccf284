"""The baseline: a bare grpc.aio server (uvloop) answering IncrementUsage, GetUsage and each
message of StreamUsage (a bidi echo) with a constant, no auth, no storage. meter-grpc's
throughput is reported as a ratio of this one's.

    python bench/bare_server.py HOST:PORT [REDIS_URL [LICENSE_ID]]

With REDIS_URL, the floor of any server that makes one store round trip per call: the same
server, whose unary handlers first await one PING through meter-grpc's own transport
(storage/transport.py, the pipelined connection every meter-grpc call uses) and then answer
the same constant, and whose StreamUsage sends one PING per request as it is read (up to
StreamUsage's window of unanswered requests) and answers each in request order once its PING
is answered.

With a LICENSE_ID too, the store work of meter-grpc without meter-grpc's Python around it:
instead of the PING, usage.lua increments that license by 1 (the script IncrementUsage runs,
with the same keys and arguments, through the same transport), with no authentication,
interceptor, validation or answer mapping."""

from __future__ import annotations

import asyncio
import collections
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import uvloop

from meter.v1 import usage_service_pb2 as pb
from meter.v1 import usage_service_pb2_grpc as pb_grpc
from meter_grpc.domain import periods
from meter_grpc.domain.metering import STREAM_WINDOW as WINDOW
from meter_grpc.storage import keys
from meter_grpc.storage.commands import RedisClient
from meter_grpc.storage.scripts import Scripts


class Bare(pb_grpc.UsageServiceServicer):
    def __init__(self, store: RedisClient | None, license_id: str | None = None) -> None:
        self.store = store
        self.op: Callable[[], Awaitable[object]] | None = None
        if store is not None:
            self.op = store.ping
        if store is not None and license_id:
            usage = Scripts(store).usage
            names = [
                keys.license(license_id),
                keys.license_events(license_id),
                keys.outbox(license_id),
                *keys.reservation_keys(license_id),
            ]

            def increment() -> Awaitable[object]:
                now = int(time.time() * 1000)
                return usage(keys=names, args=[now, "inc", 1, "", periods.period_bounds_arg(now)])

            self.op = increment

    async def IncrementUsage(
        self, request: pb.IncrementUsageRequest, context: object
    ) -> pb.IncrementUsageResponse:
        if self.op is not None:
            await self.op()
        return pb.IncrementUsageResponse(uses=1, max_uses=1_000_000, remaining=999_999)

    async def GetUsage(self, request: pb.GetUsageRequest, context: object) -> pb.GetUsageResponse:
        if self.op is not None:
            await self.op()
        return pb.GetUsageResponse(uses=1, max_uses=1_000_000, remaining=999_999)

    async def StreamUsage(
        self, request_iterator: AsyncIterator[pb.IncrementUsageRequest], context: object
    ) -> AsyncIterator[pb.StreamUsageResponse]:
        if self.op is None:
            # A bidi echo: one constant answer per request, as soon as it is read.
            async for request in request_iterator:
                yield pb.StreamUsageResponse(
                    request_id=request.request_id,
                    result=pb.IncrementUsageResponse(uses=1, max_uses=1_000_000, remaining=999_999),
                )
            return
        # With a store: one PING per request, sent as the request is read, up to WINDOW
        # unanswered, answered in request order (what StreamUsage does, minus the counting).
        loop = asyncio.get_running_loop()
        op = self.op
        window: collections.deque[tuple[str, asyncio.Future[object]]] = collections.deque()
        ended = False
        wake: list[asyncio.Future[None]] = []

        def poke() -> None:
            while wake:
                fut = wake.pop()
                if not fut.done():
                    fut.set_result(None)

        async def read() -> None:
            nonlocal ended
            try:
                async for request in request_iterator:
                    window.append((request.request_id, asyncio.ensure_future(op())))
                    poke()
                    while len(window) >= WINDOW:
                        wake.append(parked := loop.create_future())
                        await parked
            finally:
                ended = True
                poke()

        reader = loop.create_task(read())
        try:
            while window or not ended:
                if not window:
                    wake.append(parked := loop.create_future())
                    await parked
                    continue
                rid, pong = window[0]
                await pong
                yield pb.StreamUsageResponse(
                    request_id=rid,
                    result=pb.IncrementUsageResponse(uses=1, max_uses=1_000_000, remaining=999_999),
                )
                window.popleft()
                poke()
        finally:
            reader.cancel()


async def main(listen: str, redis_url: str | None, license_id: str | None) -> None:
    store = RedisClient(redis_url) if redis_url else None
    if store is not None:
        await store.ping()  # connected before the first call
    server = grpc.aio.server()
    pb_grpc.add_UsageServiceServicer_to_server(Bare(store, license_id), server)  # type: ignore[abstract]
    server.add_insecure_port(listen)
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    url = sys.argv[2] if len(sys.argv) > 2 else None
    license_id = sys.argv[3] if len(sys.argv) > 3 else None
    uvloop.run(main(sys.argv[1], url, license_id))
