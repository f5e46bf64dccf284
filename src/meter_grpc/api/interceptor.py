"""One interceptor for every meter.v1 call: authenticate, then turn domain errors into rich
statuses. Anything unexpected becomes INTERNAL with a generic message and a full log.
With metrics on, it also counts calls by method and status code and times them."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.rpc import status_pb2
from grpc import aio
from grpc_status import rpc_status

from meter_grpc.api import auth
from meter_grpc.api.errors import internal_status, to_grpc_status
from meter_grpc.api.metrics import Metrics
from meter_grpc.domain.errors import MeterError

log = logging.getLogger("meter_grpc.api")

PROTECTED_PREFIX = "/meter.v1."
Handler = Any  # grpc.RpcMethodHandler; its stubs do not type the aio behaviors


def _status(exc: BaseException, method: str) -> grpc.Status:
    if isinstance(exc, MeterError):
        return to_grpc_status(exc)
    if isinstance(exc, NotImplementedError):
        unimplemented = status_pb2.Status(
            code=grpc.StatusCode.UNIMPLEMENTED.value[0], message=f"{method} is not implemented"
        )
        return rpc_status.to_status(unimplemented)
    log.exception("unexpected error in %s", method, exc_info=exc)
    return rpc_status.to_status(internal_status())


def _authorization(context: Any) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode()
    return None


class MeterInterceptor(aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, authenticator: auth.Authenticator, metrics: Metrics | None = None) -> None:
        self._auth = authenticator
        self._metrics = metrics
        self._wrapped: dict[str, Handler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None or not method.startswith(PROTECTED_PREFIX):
            return handler
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = wrapped
        return wrapped

    def _wrap(self, method: str, h: Handler) -> Handler:
        authenticate = self._auth.authenticate
        metrics = self._metrics

        async def unary(inner: Any, request: Any, context: Any) -> Any:
            async with _Guard(method, context, metrics):
                auth.set_current(await authenticate(method, _authorization(context)))
                return await inner(request, context)

        def streaming(inner: Any) -> Callable[..., AsyncIterator[Any]]:
            async def behavior(request: Any, context: Any) -> AsyncIterator[Any]:
                async with _Guard(method, context, metrics):
                    auth.set_current(await authenticate(method, _authorization(context)))
                    async for item in inner(request, context):
                        yield item

            return behavior

        des, ser = h.request_deserializer, h.response_serializer
        if h.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                functools.partial(unary, h.unary_unary), des, ser
            )
        if h.unary_stream:
            return grpc.unary_stream_rpc_method_handler(streaming(h.unary_stream), des, ser)
        if h.stream_stream:
            return grpc.stream_stream_rpc_method_handler(streaming(h.stream_stream), des, ser)
        return grpc.stream_unary_rpc_method_handler(
            functools.partial(unary, h.stream_unary), des, ser
        )


class _Guard:
    """Around one call: maps what the call raises to its status (aborting the call with it),
    and records the outcome when metrics are on."""

    __slots__ = ("context", "method", "metrics", "started")

    def __init__(self, method: str, context: Any, metrics: Metrics | None) -> None:
        self.method, self.context, self.metrics = method, context, metrics
        self.started = time.perf_counter() if metrics else 0.0

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> bool:
        code = "OK"
        try:
            if exc is None:
                return False
            if isinstance(exc, aio.AbortError):
                code = "ABORTED_BY_HANDLER"
                return False
            if not isinstance(exc, Exception):  # cancellation, generator exit
                code = "CANCELLED"
                return False
            status = _status(exc, self.method)
            code = status.code.name
            await self.context.abort(status.code, status.details, status.trailing_metadata)
            return False
        finally:
            if self.metrics:
                self.metrics.observe(self.method, code, time.perf_counter() - self.started)
