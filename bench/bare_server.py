"""The baseline: a bare grpc.aio server (uvloop) answering IncrementUsage, GetUsage and each
message of StreamUsage (a bidi echo) with a constant, no auth, no storage. meter-grpc's
throughput is reported as a ratio of this one's."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import grpc
import uvloop

from meter.v1 import usage_service_pb2 as pb
from meter.v1 import usage_service_pb2_grpc as pb_grpc


class Bare(pb_grpc.UsageServiceServicer):
    async def IncrementUsage(
        self, request: pb.IncrementUsageRequest, context: object
    ) -> pb.IncrementUsageResponse:
        return pb.IncrementUsageResponse(uses=1, max_uses=1_000_000, remaining=999_999)

    async def GetUsage(self, request: pb.GetUsageRequest, context: object) -> pb.GetUsageResponse:
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


async def main(listen: str) -> None:
    server = grpc.aio.server()
    pb_grpc.add_UsageServiceServicer_to_server(Bare(), server)  # type: ignore[abstract]
    server.add_insecure_port(listen)
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1]))
