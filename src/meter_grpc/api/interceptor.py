"""One interceptor for every call but health and reflection: decode the request safely,
authenticate, authorize (auth.LICENSE_KEY_METHODS), then turn domain errors into rich
statuses. Anything unexpected becomes INTERNAL with a generic message and a full log.
With metrics on, it also counts calls by method and status code and times them.

Malformed request bytes (not a valid protobuf message of the method's request type) never
reach a handler: the request deserializer hands over a sentinel instead of raising, and the
call answers INVALID_ARGUMENT (BadRequest field "", the whole request body) before any
credentials are looked at. In a request stream (StreamUsage) a malformed message ends the
stream with INVALID_ARGUMENT after the answers to the messages before it: the client's
encoder is broken, and answering later messages would hide it. Such refusals are logged as
one line per burst at most (LOG_EVERY_S), never with a traceback."""

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
from meter_grpc.domain.errors import MeterError, invalid

log = logging.getLogger("meter_grpc.api")

Handler = Any  # grpc.RpcMethodHandler; its stubs do not type the aio behaviors
LOG_EVERY_S = 10.0


class _Malformed:
    """What the request deserializer returns for bytes that are no valid message."""

    __slots__ = ()


MALFORMED: Any = _Malformed()


class _BurstLog:
    """Logs a client mistake at most once per `every_s`, counting the ones not logged."""

    def __init__(self, every_s: float = LOG_EVERY_S) -> None:
        self.every_s = every_s
        self._next = 0.0
        self._suppressed = 0

    def note(self, method: str, what: str) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        log.warning(
            "refused %s on %s (%d more such refusals since the last line; at most one line "
            "per %.0f s)",
            what,
            method,
            self._suppressed,
            self.every_s,
        )
        self._next, self._suppressed = now + self.every_s, 0


_malformed_log = _BurstLog()


def _malformed(method: str) -> MeterError:
    _malformed_log.note(method, "a malformed request body")
    return invalid("", "the request body is not a valid protobuf message of the request type")


def _safe_deserializer(des: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if des is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return des(data)
        except Exception:  # DecodeError, bad UTF-8, nesting too deep...: all the client's
            return MALFORMED

    return deserialize


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
        if handler is None or method.startswith(auth.OPEN_PREFIXES):
            return handler
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = wrapped
        return wrapped

    def _wrap(self, method: str, h: Handler) -> Handler:
        authenticate = self._auth.authenticate
        authorize = self._auth.authorize
        metrics = self._metrics

        async def admit(request: Any, context: Any) -> auth.Principal:
            if request is MALFORMED:
                raise _malformed(method)
            principal = await authenticate(method, _authorization(context))
            auth.set_current(principal)
            if not h.request_streaming:  # a stream is checked message by message (checked)
                await authorize(method, principal, request)
            return principal

        async def checked(principal: auth.Principal, requests: AsyncIterator[Any]) -> Any:
            async for request in requests:
                if request is MALFORMED:
                    raise _malformed(method)
                await authorize(method, principal, request)
                yield request

        async def unary(inner: Any, request: Any, context: Any) -> Any:
            async with _Guard(method, context, metrics):
                principal = await admit(request, context)
                if h.request_streaming:
                    request = checked(principal, request)
                return await inner(request, context)

        def streaming(inner: Any) -> Callable[..., AsyncIterator[Any]]:
            async def behavior(request: Any, context: Any) -> AsyncIterator[Any]:
                async with _Guard(method, context, metrics):
                    principal = await admit(request, context)
                    if h.request_streaming:
                        request = checked(principal, request)
                    async for item in inner(request, context):
                        yield item

            return behavior

        des, ser = _safe_deserializer(h.request_deserializer), h.response_serializer
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
