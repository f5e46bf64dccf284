"""A lean, pipelined RESP connection for the script calls of the request path.

redis-py's asyncio client spends more CPU on one round trip (stream reader, pooled
connection, a timeout per command) than grpc.aio spends on a whole call. Scripts are the
whole request path, so they go through this instead: an asyncio Protocol that writes each
command as it comes (coalesced into one write per event-loop iteration), keeps any number in
flight on one connection, and hands each reply (parsed by hiredis) to its caller in order.

- Used for `redis://` and `unix://` URLs; TLS (`rediss://`) and Redis Cluster use redis-py.
- Failures raise redis-py's exceptions, so storage_call maps them as for any other command:
  a connection that cannot be made raises ConnectionError("Error connecting ..."): nothing
  was sent; a connection lost with calls in flight fails them with ConnectionError("Error
  while reading ..."): their outcome is unknown; a call not answered within the timeout fails
  with TimeoutError, and so does everything behind it (the connection is dropped, since its
  replies can no longer be matched to callers).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

_NOT_ENOUGH = object()
_WATCHDOG_S = 0.1


def supports(url: str) -> bool:
    """Whether a URL can be served by RespConnection."""
    return url.startswith(("redis://", "unix://"))


class _Protocol(asyncio.Protocol):
    """One socket of a RespConnection; events of a socket it has replaced are ignored."""

    def __init__(self, conn: RespConnection) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.conn._made(self.transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        if self.transport is self.conn._transport:
            self.conn._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is self.conn._transport:
            self.conn._lost(exc)


class RespConnection:
    def __init__(self, url: str, timeout_s: float) -> None:
        params = parse_url(url)
        self._path: str | None = params.get("path")
        self._host: str = params.get("host", "127.0.0.1")
        self._port: int = int(params.get("port", 6379))
        self._username: str | None = params.get("username")
        self._password: str | None = params.get("password")
        self._db = int(params.get("db", 0) or 0)
        self.timeout_s = timeout_s
        self._transport: asyncio.Transport | None = None
        self._reader: Any = None
        # (future, sent at) of every call in flight, in the order of their replies
        self._waiters: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._connecting: asyncio.Task[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._closed = False

    # --- connection -------------------------------------------------------------------

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        where = self._path or f"{self._host}:{self._port}"
        try:
            if self._path:
                transport, _ = await asyncio.wait_for(
                    loop.create_unix_connection(lambda: _Protocol(self), self._path), self.timeout_s
                )
            else:
                transport, _ = await asyncio.wait_for(
                    loop.create_connection(lambda: _Protocol(self), self._host, self._port),
                    self.timeout_s,
                )
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(f"Error connecting to {where}: {exc}") from exc
        if self._transport is not transport:  # dropped at once (e.g. a reply before any call)
            transport.abort()
            raise RedisConnectionError(
                f"Error connecting to {where}: the connection failed as it opened"
            )
        hello: list[tuple[Any, ...]] = []
        if self._password is not None:
            hello.append(("AUTH", self._username or "default", self._password))
        if self._db:
            hello.append(("SELECT", self._db))
        for command in hello:
            reply = await self._send(command)
            if isinstance(reply, ResponseError):
                self._drop(RedisConnectionError(f"Error connecting to {where}: {reply}"))
                raise RedisConnectionError(f"Error connecting to {where}: {reply}")
        self._arm_watchdog()

    async def _ensure(self) -> None:
        if self._transport is not None:
            return
        if self._closed:
            raise RedisConnectionError("Error connecting: the connection is closed")
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        task = self._connecting
        try:
            await asyncio.shield(task)
        finally:
            if task.done() and self._connecting is task:
                self._connecting = None

    def _made(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._reader = hiredis.Reader(
            encoding="utf-8", notEnoughData=_NOT_ENOUGH, replyError=ResponseError
        )

    def _lost(self, exc: Exception | None) -> None:
        self._drop(RedisConnectionError(f"Error while reading from the server: {exc or 'closed'}"))

    def _drop(self, error: Exception) -> None:
        transport, self._transport = self._transport, None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._out.clear()
        waiters, self._waiters = self._waiters, collections.deque()
        for fut, _ in waiters:
            if not fut.done():
                fut.set_exception(error)
        if transport is not None:
            transport.abort()

    def _arm_watchdog(self) -> None:
        loop = asyncio.get_running_loop()
        self._watchdog = loop.call_later(_WATCHDOG_S, self._check_timeouts)

    def _check_timeouts(self) -> None:
        self._watchdog = None
        if self._transport is None:
            return
        if self._waiters and time.monotonic() - self._waiters[0][1] > self.timeout_s:
            self._drop(RedisTimeoutError(f"Timeout reading from the server ({self.timeout_s} s)"))
            return
        self._arm_watchdog()

    async def close(self) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        self._drop(RedisConnectionError("Error while reading from the server: closed"))

    # --- calls --------------------------------------------------------------------------

    def _received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiters = self._waiters
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:  # not RESP: nothing more can be trusted
                self._drop(RedisConnectionError(f"Error while reading from the server: {exc}"))
                return
            if reply is _NOT_ENOUGH:
                return
            if not waiters:  # a reply nobody asked for: the stream is out of step
                self._drop(RedisConnectionError("Error while reading from the server: stray reply"))
                return
            fut = waiters.popleft()[0]
            if not fut.done():
                fut.set_result(reply)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._transport is not None and self._out:
            self._transport.write(b"".join(self._out))
        self._out.clear()

    def _send(self, command: Sequence[Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if self._transport is None:  # dropped while connecting: nothing will be sent
            fut.set_exception(RedisConnectionError("Error connecting: the connection dropped"))
            return fut
        self._waiters.append((fut, time.monotonic()))
        self._out.append(hiredis.pack_command(tuple(command)))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return fut

    async def execute(self, *command: Any) -> Any:
        """Sends one command and returns its reply (error replies raise ResponseError)."""
        await self._ensure()
        reply = await self._send(command)
        if isinstance(reply, ResponseError):
            if str(reply).startswith("NOSCRIPT"):
                raise NoScriptError(str(reply))
            raise reply
        return reply

    async def evalsha(self, sha: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        return await self.execute("EVALSHA", sha, len(keys), *keys, *args)
