"""meter.v1.UsageService: the usage counter."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator
from typing import Any

from meter.v1 import usage_pb2
from meter.v1 import usage_service_pb2 as pb
from meter.v1 import usage_service_pb2_grpc as pb_grpc
from meter_grpc.api import auth
from meter_grpc.api.convert import (
    meter_usage_to_proto,
    record_result_to_proto,
    reservation_fields,
    ts,
    ttl_ms,
    usage_fields,
    usage_record_from_proto,
)
from meter_grpc.api.errors import internal_status, to_status_proto
from meter_grpc.domain.errors import MeterError, invalid
from meter_grpc.domain.metering import STREAM_WINDOW, Increment, Metering
from meter_grpc.domain.models import Usage
from meter_grpc.export.exporter import Exporter, SinkStatus
from meter_grpc.storage.store import RedisStore

log = logging.getLogger("meter_grpc.api")

Ctx = Any


def _outcome(answer: Usage | BaseException, method: str) -> dict[str, Any]:
    """The `result` or `error` field of one per-request answer (StreamUsage, batches)."""
    if isinstance(answer, Usage):
        return {
            "result": pb.IncrementUsageResponse(**usage_fields(answer), replayed=answer.replayed)  # type: ignore[arg-type]
        }
    if isinstance(answer, MeterError):
        return {"error": to_status_proto(answer)}
    log.error("unexpected error in %s", method, exc_info=answer)
    return {"error": internal_status()}


def _sink_status(s: SinkStatus) -> pb.SinkExportStatus:
    return pb.SinkExportStatus(
        sink=s.name,
        lag_events=s.lag_events,
        lag_seconds=s.lag_seconds,
        last_error=s.last_error,
        last_error_time=ts(s.last_error_ms) if s.last_error_ms else None,
        dead_letters=s.dead_letters,
    )


class UsageService(pb_grpc.UsageServiceServicer):
    def __init__(self, metering: Metering, exporter: Exporter | None = None) -> None:
        self.metering = metering
        self.exporter = exporter

    def _export_admin(self) -> Exporter:
        """The exporter, or one with no sinks on the same store (a replica that configures
        none still reports and forgets the sinks others left behind)."""
        if self.exporter is not None:
            return self.exporter
        store = self.metering.store
        assert isinstance(store, RedisStore), "export needs the Redis store"
        return Exporter(store, [])

    async def ExportStatus(
        self, request: pb.ExportStatusRequest, context: Ctx
    ) -> pb.ExportStatusResponse:
        exporter = self._export_admin()
        rows = await exporter.status()
        removed = await exporter.removed_sinks()
        return pb.ExportStatusResponse(
            sinks=[_sink_status(s) for s in rows],
            removed_sinks=[_sink_status(s) for s in removed],
        )

    async def ForgetExportSink(
        self, request: pb.ForgetExportSinkRequest, context: Ctx
    ) -> pb.ForgetExportSinkResponse:
        if not request.sink:
            raise invalid("sink", "required: the sink configured on no replica to forget")
        if len(request.sink) > 64 or not request.sink.isprintable() or " " in request.sink:
            raise invalid("sink", "a sink name: at most 64 printable characters, no space")
        try:
            groups, dead = await self._export_admin().forget(request.sink)
        except ValueError as exc:
            raise invalid("sink", str(exc)) from None
        return pb.ForgetExportSinkResponse(groups=groups, dead_letters=dead)

    async def ReplayDeadLetters(
        self, request: pb.ReplayDeadLettersRequest, context: Ctx
    ) -> pb.ReplayDeadLettersResponse:
        names = list(self.exporter.runs) if self.exporter is not None else []
        if not request.sink:
            raise invalid("sink", "required: the sink whose dead letters are replayed")
        if request.sink not in names:
            configured = ", ".join(names) or "none"
            raise invalid(
                "sink", f"no sink {request.sink!r} is configured (configured: {configured})"
            )
        if request.limit < 0:
            raise invalid("limit", "must be >= 0 (0 = all)")
        assert self.exporter is not None
        delivered, failed, remaining = await self.exporter.replay(request.sink, request.limit)
        return pb.ReplayDeadLettersResponse(delivered=delivered, failed=failed, remaining=remaining)

    async def IncrementUsage(
        self, request: pb.IncrementUsageRequest, context: Ctx
    ) -> pb.IncrementUsageResponse:
        u = await self.metering.increment(
            request.license_id, request.amount, request.request_id, meter=request.meter
        )
        # The fields of usage_fields(), spelled out: the hot path builds no kwargs dict.
        return pb.IncrementUsageResponse(
            uses=u.uses,
            max_uses=u.max_uses,
            remaining=u.remaining,
            overage_limit=u.overage_limit,
            period_end_time=None if u.period_end_ms is None else ts(u.period_end_ms),
            replayed=u.replayed,
            reserved=u.reserved,
        )

    async def DecrementUsage(
        self, request: pb.DecrementUsageRequest, context: Ctx
    ) -> pb.DecrementUsageResponse:
        u = await self.metering.decrement(
            request.license_id, request.amount, request.request_id, request.meter
        )
        return pb.DecrementUsageResponse(**usage_fields(u), replayed=u.replayed)  # type: ignore[arg-type]

    async def ResetUsage(
        self, request: pb.ResetUsageRequest, context: Ctx
    ) -> pb.ResetUsageResponse:
        u = await self.metering.reset(request.license_id, request.request_id, request.meter)
        return pb.ResetUsageResponse(**usage_fields(u), replayed=u.replayed)  # type: ignore[arg-type]

    async def GetUsage(self, request: pb.GetUsageRequest, context: Ctx) -> pb.GetUsageResponse:
        u = await self.metering.get(request.license_id, request.meter)
        return pb.GetUsageResponse(
            uses=u.uses,
            max_uses=u.max_uses,
            remaining=u.remaining,
            overage_limit=u.overage_limit,
            period_end_time=None if u.period_end_ms is None else ts(u.period_end_ms),
            reserved=u.reserved,
        )

    async def ReserveUsage(
        self, request: pb.ReserveUsageRequest, context: Ctx
    ) -> pb.ReserveUsageResponse:
        a = await self.metering.reserve(
            request.license_id,
            request.amount,
            meter=request.meter,
            ttl_ms=ttl_ms(request.ttl) if request.HasField("ttl") else 0,
            request_id=request.request_id,
        )
        return pb.ReserveUsageResponse(**reservation_fields(a))  # type: ignore[arg-type]

    async def CommitReservation(
        self, request: pb.CommitReservationRequest, context: Ctx
    ) -> pb.CommitReservationResponse:
        a = await self.metering.commit(
            request.license_id, request.reservation_id, request.amount, request.request_id
        )
        return pb.CommitReservationResponse(**reservation_fields(a))  # type: ignore[arg-type]

    async def ReleaseReservation(
        self, request: pb.ReleaseReservationRequest, context: Ctx
    ) -> pb.ReleaseReservationResponse:
        a = await self.metering.release(
            request.license_id, request.reservation_id, request.request_id
        )
        return pb.ReleaseReservationResponse(**reservation_fields(a))  # type: ignore[arg-type]

    async def ListUsage(self, request: pb.ListUsageRequest, context: Ctx) -> pb.ListUsageResponse:
        usages = await self.metering.list_usage(request.license_id)
        return pb.ListUsageResponse(usages=[meter_usage_to_proto(m) for m in usages])

    async def SyncUsage(self, request: pb.SyncUsageRequest, context: Ctx) -> pb.SyncUsageResponse:
        result = await self.metering.sync(
            request.license_id, [usage_record_from_proto(r) for r in request.records]
        )
        return pb.SyncUsageResponse(
            results=[record_result_to_proto(r) for r in result.results], uses=result.uses
        )

    async def BatchIncrementUsage(
        self, request: pb.BatchIncrementUsageRequest, context: Ctx
    ) -> pb.BatchIncrementUsageResponse:
        items = request.items
        answers = await self.metering.batch_increment(
            [Increment(i.license_id, i.amount, i.request_id, i.meter) for i in items]
        )
        return pb.BatchIncrementUsageResponse(
            results=[
                pb.BatchIncrementUsageResult(
                    request_id=item.request_id, **_outcome(answer, "BatchIncrementUsage")
                )
                for item, answer in zip(items, answers, strict=True)
            ]
        )

    async def StreamUsage(
        self, request_iterator: AsyncIterator[pb.IncrementUsageRequest], context: Ctx
    ) -> AsyncIterator[pb.StreamUsageResponse]:
        """Up to STREAM_WINDOW requests in flight, answered in request order.

        A reader task reads the requests and starts each one's increment as soon as it is read
        (in read order, so the store sees them in stream order); it reads nothing more while
        STREAM_WINDOW requests are unanswered. This generator awaits the answers in order and
        writes them, waking the reader for each answer written.
        """
        loop = asyncio.get_running_loop()
        # The requests read and not yet answered, oldest first: each one's increment, running.
        window: collections.deque[asyncio.Task[pb.StreamUsageResponse]] = collections.deque()
        ended: list[BaseException | None] = []  # [None] once the requests end, [exc] on failure
        waiting: dict[str, asyncio.Future[None]] = {}  # "reader" / "writer": parked until woken

        def wake(who: str) -> None:
            fut = waiting.pop(who, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

        async def answer(request: pb.IncrementUsageRequest) -> pb.StreamUsageResponse:
            try:
                args = (request.license_id, request.amount, request.request_id)
                # `meter` only when set: the license's own counter takes the call as before
                u = await (
                    self.metering.increment(*args, meter=request.meter)
                    if request.meter
                    else self.metering.increment(*args)
                )
            except Exception as exc:  # one request's failure is its answer, never the stream's
                return pb.StreamUsageResponse(
                    request_id=request.request_id, **_outcome(exc, "StreamUsage")
                )
            return pb.StreamUsageResponse(
                request_id=request.request_id,
                result=pb.IncrementUsageResponse(**usage_fields(u), replayed=u.replayed),  # type: ignore[arg-type]
            )

        async def read() -> None:
            try:
                async for request in request_iterator:
                    # Started in read order: the store sees one license's requests in order.
                    window.append(loop.create_task(answer(request)))
                    wake("writer")
                    while len(window) >= STREAM_WINDOW:  # full: read nothing more for now
                        waiting["reader"] = parked = loop.create_future()
                        await parked
                ended.append(None)
            except BaseException as exc:  # the request stream failed: the call ends with it
                ended.append(exc)
                if not isinstance(exc, Exception):
                    raise
            finally:
                wake("writer")

        await self.metering.prepare_ordered()
        reader = loop.create_task(read())
        try:
            while True:
                if window:
                    yield await window[0]
                    window.popleft()
                    wake("reader")
                elif ended:
                    if ended[0] is not None:
                        raise ended[0]
                    break
                else:
                    waiting["writer"] = parked = loop.create_future()
                    await parked
        finally:
            reader.cancel()
            for task in window:
                task.cancel()

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
            meter=request.meter if request.filter_meter else None,
            subscribed=subscribed,
            key_license_id=auth.current().license_id,
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
                    meter=e.meter,
                    reservation_id=e.reservation_id,
                ),
                send_time=ts(self.metering.clock.now_ms()),
            )
