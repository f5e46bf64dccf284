"""One interceptor for every meter.v1 call: authenticate, then turn domain errors into rich
statuses. Anything unexpected becomes INTERNAL with a generic message and a full log.
With metrics on, it also counts calls by method and status code and times them."""

from __future__ import annotations

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

        async def run(call: Callable[[], Awaitable[Any]], context: Any) -> Any:
            """Authenticates, runs the call, and maps what it raises to a status."""
            started = time.perf_counter() if metrics else 0.0
            code = "OK"
            try:
                auth.set_current(await authenticate(method, _authorization(context)))
                return await call()
            except aio.AbortError:
                code = "ABORTED_BY_HANDLER"
                raise
            except Exception as exc:
                status = _status(exc, method)
                code = status.code.name
                await context.abort(status.code, status.details, status.trailing_metadata)
            finally:
                if metrics:
                    metrics.observe(method, code, time.perf_counter() - started)

        def streaming(inner: Any) -> Callable[..., AsyncIterator[Any]]:
            async def behavior(request: Any, context: Any) -> AsyncIterator[Any]:
                started = time.perf_counter() if metrics else 0.0
                code = "OK"
                try:
                    auth.set_current(await authenticate(method, _authorization(context)))
                    async for item in inner(request, context):
                        yield item
                except aio.AbortError:
                    code = "ABORTED_BY_HANDLER"
                    raise
                except Exception as exc:
                    status = _status(exc, method)
                    code = status.code.name
                    await context.abort(status.code, status.details, status.trailing_metadata)
                finally:
                    if metrics:
                        metrics.observe(method, code, time.perf_counter() - started)

            return behavior

        des, ser = h.request_deserializer, h.response_serializer
        if h.unary_unary:
            inner_uu = h.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                return await run(lambda: inner_uu(request, context), context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, des, ser)
        if h.unary_stream:
            return grpc.unary_stream_rpc_method_handler(streaming(h.unary_stream), des, ser)
        if h.stream_stream:
            return grpc.stream_stream_rpc_method_handler(streaming(h.stream_stream), des, ser)
        inner_su = h.stream_unary

        async def stream_unary(request_iterator: Any, context: Any) -> Any:
            return await run(lambda: inner_su(request_iterator, context), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, des, ser)
