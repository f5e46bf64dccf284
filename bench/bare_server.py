"""The baseline: a bare grpc.aio server (uvloop) answering IncrementUsage, GetUsage and each
message of StreamUsage (a bidi echo) with a constant, no auth, no storage. meter-grpc's
throughput is reported as a ratio of this one's.

    python bench/bare_server.py HOST:PORT [REDIS_URL]

With REDIS_URL, the floor of any server that makes one store round trip per call: the same
server, whose unary handlers first await one PING through meter-grpc's own transport
(storage/transport.py, the pipelined connection every meter-grpc call uses) and then answer
the same constant."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import grpc
import uvloop

from meter.v1 import usage_service_pb2 as pb
from meter.v1 import usage_service_pb2_grpc as pb_grpc
from meter_grpc.storage.commands import RedisClient


class Bare(pb_grpc.UsageServiceServicer):
    def __init__(self, store: RedisClient | None) -> None:
        self.store = store

    async def IncrementUsage(
        self, request: pb.IncrementUsageRequest, context: object
    ) -> pb.IncrementUsageResponse:
        if self.store is not None:
            await self.store.ping()
        return pb.IncrementUsageResponse(uses=1, max_uses=1_000_000, remaining=999_999)

    async def GetUsage(self, request: pb.GetUsageRequest, context: object) -> pb.GetUsageResponse:
        if self.store is not None:
            await self.store.ping()
        return pb.GetUsageResponse(uses=1, max_uses=1_000_000, remaining=999_999)

    async def StreamUsage(
        self, request_iterator: AsyncIterator[pb.IncrementUsageRequest], context: object
    ) -> AsyncIterator[pb.StreamUsageResponse]:
        # A bidi echo: one constant answer per request, as soon as it is read.
        async for request in request_iterator:
            yield pb.StreamUsageResponse(
                request_id=request.request_id,
                result=pb.IncrementUsageResponse(uses=1, max_uses=1_000_000, remaining=999_999),
            )


async def main(listen: str, redis_url: str | None) -> None:
    store = RedisClient(redis_url) if redis_url else None
    if store is not None:
        await store.ping()  # connected before the first call
    server = grpc.aio.server()
    pb_grpc.add_UsageServiceServicer_to_server(Bare(store), server)  # type: ignore[abstract]
    server.add_insecure_port(listen)
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
