"""Two tiny TCP servers for transport tests: a scripted fake Redis (for replies a real server
cannot easily be made to give) and a proxy that records what each client socket sent."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import hiredis

# A handler gets one command (as strings) and returns the raw reply bytes, or None to close
# the connection without replying (after the command was read: a "maybe sent" failure).
Handler = Callable[[list[str]], bytes | None]

OK = b"+OK\r\n"
PONG = b"+PONG\r\n"


def _commands(reader: hiredis.Reader) -> list[list[str]]:
    out = []
    while (cmd := reader.gets()) is not False:
        out.append(cmd)
    return out


class FakeRedis:
    """Answers PING with PONG (the transport's handshake) and every other command with what
    `handler` returns."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.received: list[list[str]] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> FakeRedis:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        reader = hiredis.Reader(encoding="utf-8")
        try:
            while data := await r.read(65536):
                reader.feed(data)
                commands = _commands(reader)
                self.received.extend(commands)  # all that arrived, answered or not
                for cmd in commands:
                    reply = PONG if cmd == ["PING"] else self.handler(cmd)
                    if reply is None:
                        return
                    w.write(reply)
                await w.drain()
        except ConnectionError:
            pass
        finally:
            w.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1)


class RecordingProxy:
    """Forwards to host:port and records, per accepted client socket, the commands it sent.
    `accept_delay_s` holds each new socket that long before connecting upstream."""

    def __init__(self, host: str, port: int, accept_delay_s: float = 0.0) -> None:
        self.upstream = (host, port)
        self.accept_delay_s = accept_delay_s
        self.sockets: list[list[list[str]]] = []
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> RecordingProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        seen: list[list[str]] = []
        self.sockets.append(seen)
        self._writers.append(cw)
        await asyncio.sleep(self.accept_delay_s)
        ur, uw = await asyncio.open_connection(*self.upstream)
        self._writers.append(uw)
        reader = hiredis.Reader(encoding="utf-8")

        async def client_to_server() -> None:
            while data := await cr.read(65536):
                reader.feed(data)
                seen.extend(_commands(reader))
                uw.write(data)
            uw.close()

        async def server_to_client() -> None:
            while data := await ur.read(65536):
                cw.write(data)
            cw.close()

        with contextlib.suppress(ConnectionError):
            await asyncio.gather(client_to_server(), server_to_client())

    def drop_all(self) -> None:
        """Closes every socket (both sides) it holds."""
        for w in self._writers:
            w.transport.abort()
        self._writers.clear()

    async def stop(self) -> None:
        self.drop_all()
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1)


def error(text: str) -> bytes:
    return f"-{text}\r\n".encode()
