"""One interceptor for every meter.v1 call: authenticate, then turn domain errors into rich
statuses. Anything unexpected becomes INTERNAL with a generic message and a full log."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from meter_grpc.api import auth
from meter_grpc.api.errors import internal_status, to_grpc_status
from meter_grpc.domain.errors import MeterError

log = logging.getLogger("meter_grpc.api")

PROTECTED_PREFIX = "/meter.v1."
Handler = Any  # grpc.RpcMethodHandler; its stubs do not type the aio behaviors


async def _abort(context: Any, exc: BaseException, method: str) -> None:
    if isinstance(exc, MeterError):
        status = to_grpc_status(exc)
    elif isinstance(exc, NotImplementedError):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented yet")
    else:
        log.exception("unexpected error in %s", method, exc_info=exc)
        from grpc_status import rpc_status

        status = rpc_status.to_status(internal_status())
    await context.abort(status.code, status.details, status.trailing_metadata)


def _authorization(context: Any) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode()
    return None


class MeterInterceptor(aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, authenticator: auth.Authenticator) -> None:
        self._auth = authenticator
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

    async def _enter(self, method: str, context: Any) -> None:
        auth.set_current(await self._auth.authenticate(method, _authorization(context)))

    def _wrap(self, method: str, h: Handler) -> Handler:
        enter = self._enter

        if h.unary_unary:
            inner_uu = h.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                try:
                    await enter(method, context)
                    return await inner_uu(request, context)
                except (MeterError, Exception) as exc:
                    if isinstance(exc, aio.AbortError):
                        raise
                    await _abort(context, exc, method)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, h.request_deserializer, h.response_serializer
            )

        def streaming(inner: Any) -> Callable[..., AsyncIterator[Any]]:
            async def behavior(request: Any, context: Any) -> AsyncIterator[Any]:
                try:
                    await enter(method, context)
                    async for item in inner(request, context):
                        yield item
                except (MeterError, Exception) as exc:
                    if isinstance(exc, aio.AbortError):
                        raise
                    await _abort(context, exc, method)

            return behavior

        if h.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                streaming(h.unary_stream), h.request_deserializer, h.response_serializer
            )
        if h.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                streaming(h.stream_stream), h.request_deserializer, h.response_serializer
            )
        inner_su = h.stream_unary

        async def stream_unary(request_iterator: Any, context: Any) -> Any:
            try:
                await enter(method, context)
                return await inner_su(request_iterator, context)
            except (MeterError, Exception) as exc:
                if isinstance(exc, aio.AbortError):
                    raise
                await _abort(context, exc, method)

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, h.request_deserializer, h.response_serializer
        )
