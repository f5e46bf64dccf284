"""meter.v1.UsageService: the usage counter."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from meter.v1 import usage_pb2
from meter.v1 import usage_service_pb2 as pb
from meter.v1 import usage_service_pb2_grpc as pb_grpc
from meter_grpc.api.convert import (
    record_result_to_proto,
    ts,
    usage_fields,
    usage_record_from_proto,
)
from meter_grpc.api.errors import to_status_proto
from meter_grpc.domain.errors import MeterError
from meter_grpc.domain.metering import Metering

Ctx = Any


class UsageService(pb_grpc.UsageServiceServicer):
    def __init__(self, metering: Metering) -> None:
        self.metering = metering

    async def IncrementUsage(
        self, request: pb.IncrementUsageRequest, context: Ctx
    ) -> pb.IncrementUsageResponse:
        u = await self.metering.increment(request.license_id, request.amount, request.request_id)
        return pb.IncrementUsageResponse(**usage_fields(u), replayed=u.replayed)  # type: ignore[arg-type]

    async def DecrementUsage(
        self, request: pb.DecrementUsageRequest, context: Ctx
    ) -> pb.DecrementUsageResponse:
        u = await self.metering.decrement(request.license_id, request.amount, request.request_id)
        return pb.DecrementUsageResponse(**usage_fields(u), replayed=u.replayed)  # type: ignore[arg-type]

    async def ResetUsage(
        self, request: pb.ResetUsageRequest, context: Ctx
    ) -> pb.ResetUsageResponse:
        u = await self.metering.reset(request.license_id, request.request_id)
        return pb.ResetUsageResponse(**usage_fields(u), replayed=u.replayed)  # type: ignore[arg-type]

    async def GetUsage(self, request: pb.GetUsageRequest, context: Ctx) -> pb.GetUsageResponse:
        u = await self.metering.get(request.license_id)
        return pb.GetUsageResponse(**usage_fields(u))  # type: ignore[arg-type]

    async def SyncUsage(self, request: pb.SyncUsageRequest, context: Ctx) -> pb.SyncUsageResponse:
        result = await self.metering.sync(
            request.license_id, [usage_record_from_proto(r) for r in request.records]
        )
        return pb.SyncUsageResponse(
            results=[record_result_to_proto(r) for r in result.results], uses=result.uses
        )

    async def StreamUsage(
        self, request_iterator: AsyncIterator[pb.IncrementUsageRequest], context: Ctx
    ) -> AsyncIterator[pb.StreamUsageResponse]:
        async for request in request_iterator:
            try:
                u = await self.metering.increment(
                    request.license_id, request.amount, request.request_id
                )
            except MeterError as err:
                yield pb.StreamUsageResponse(
                    request_id=request.request_id, error=to_status_proto(err)
                )
                continue
            yield pb.StreamUsageResponse(
                request_id=request.request_id,
                result=pb.IncrementUsageResponse(**usage_fields(u), replayed=u.replayed),  # type: ignore[arg-type]
            )

    async def WatchUsage(
        self, request: pb.WatchUsageRequest, context: Ctx
    ) -> AsyncIterator[pb.WatchUsageResponse]:
        async def subscribed() -> None:
            # The response headers tell the client that every later change reaches it.
            await context.send_initial_metadata(())

        async for e in self.metering.watch(
            request.license_id,
            request.after_event_id,
            from_oldest=request.from_oldest,
            subscribed=subscribed,
        ):
            yield pb.WatchUsageResponse(
                event=usage_pb2.UsageEvent(
                    event_id=e.event_id,
                    type=int(e.type),  # type: ignore[arg-type]
                    amount=e.amount,
                    uses=e.uses,
                    max_uses=e.max_uses,
                    request_id=e.request_id,
                    event_time=ts(e.time_ms),
                ),
                send_time=ts(self.metering.clock.now_ms()),
            )
