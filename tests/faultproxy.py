"""A fault-injecting TCP proxy for RESP (Redis/Valkey) connections, for tests.

`FaultProxy(upstream_port)` listens on 127.0.0.1 (`proxy.port`) and forwards every client
connection to the server, cut at RESP boundaries: client -> server one command at a time,
server -> client one reply at a time, each reply matched to the command it answers. So a
fault lands exactly between two commands or between a command and its reply. Modes (set
one at a time; the one-shot ones set `proxy.fired` when they happen, then the proxy passes
again):

- pass (default): forward everything.
- `drop_before(names)`: the next command named in `names` (default: script calls) is not
  forwarded, nor anything after it on its connection; the client connection is closed once
  the replies of the commands already forwarded have been relayed. Nothing forwarded is lost.
- `drop_after(names)`: the next matching command is forwarded; when its reply arrives, the
  client connection is closed instead of relaying it (or any later reply).
- `reset_mid_pipeline(k, n)`: from the next script call on, a connection's replies are
  withheld, its next `k` commands forwarded and the ones after them held back; once `n` are
  in flight that way, the client connection is reset (RST, via SO_LINGER 0). The server
  runs the `k` (its side is closed cleanly after them), never the `n - k`.
- `delay_s = D`: every reply is relayed D seconds after it arrived (order kept); 0 = none.
- `refuse()`: stop listening (new connections are refused) and reset every open connection;
  `await accept()` listens again on the same port.
- `drop_all()`: reset every open connection.

Every connection records its first commands and the relaying of their replies, in order
(`Connection.log`), to check what a client sends before anything else (AUTH, SELECT).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

import hiredis

SCRIPT_CALLS = frozenset({"EVALSHA", "EVAL", "EVALSHA_RO", "EVAL_RO", "FCALL"})
LOGGED_COMMANDS = 12  # per connection


def frame_end(buf: bytes | bytearray, pos: int = 0) -> int | None:
    """The index just past the one RESP2/RESP3 value (or inline command) at `pos`, or None
    while `buf` does not hold all of it yet."""
    nl = buf.find(b"\r\n", pos)
    if nl < 0:
        return None
    kind = buf[pos : pos + 1]
    if kind in (b"$", b"=", b"!"):  # bulk string, verbatim string, bulk error
        n = int(buf[pos + 1 : nl])
        end = nl + 2 if n < 0 else nl + 2 + n + 2
        return end if len(buf) >= end else None
    if kind in (b"*", b"~", b">", b"%", b"|"):  # array, set, push, map, attribute
        n = int(buf[pos + 1 : nl])
        items = max(n, 0) * (2 if kind in (b"%", b"|") else 1) + (1 if kind == b"|" else 0)
        end: int | None = nl + 2
        for _ in range(items):
            assert end is not None
            end = frame_end(buf, end)
            if end is None:
                return None
        return end
    return nl + 2  # simple string, error, integer, null, double, boolean, big number, inline


def command_words(frame: bytes) -> list[str]:
    """The words of one command frame, e.g. ['SELECT', '3'] (the name upper-cased)."""
    if frame.startswith(b"*"):
        reader = hiredis.Reader()
        reader.feed(frame)
        words = [w.decode(errors="replace") for w in reader.gets()]
    else:
        words = frame.decode(errors="replace").split()
    if words:
        words[0] = words[0].upper()
    return words


def describe(words: list[str]) -> str:
    """A command as logged: its name and first argument, and for HELLO whether it carries
    AUTH (never a password): 'AUTH', 'SELECT 3', 'HELLO 3 AUTH', 'EVALSHA 3f2a...'."""
    if not words:
        return ""
    if words[0] == "AUTH":
        return "AUTH"
    if words[0] == "HELLO":
        return " ".join(words[:2]) + (" AUTH" if "AUTH" in (w.upper() for w in words) else "")
    return " ".join(words[:2])


def _reset(writer: asyncio.StreamWriter) -> None:
    """Closes a connection with a TCP RST rather than a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass
class _Fault:
    kind: str  # "drop_before" | "drop_after" | "reset"
    names: frozenset[str] = SCRIPT_CALLS
    k: int = 0
    n: int = 0


@dataclass
class Connection:
    """One proxied client connection."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    # ("cmd", "AUTH") when a command arrived, ("reply", "AUTH", "+OK") when its reply was
    # relayed to the client; only the first LOGGED_COMMANDS commands.
    log: list[tuple[str, ...]] = field(default_factory=list)
    commands: int = 0
    # commands forwarded whose reply has not been relayed yet: (words, drop its reply)
    pending: collections.deque[tuple[list[str], bool]] = field(default_factory=collections.deque)
    # (relay at, reply, words of its command if logged / None for a push) in order
    replies: asyncio.Queue[tuple[float, bytes, list[str] | None] | None] = field(
        default_factory=asyncio.Queue
    )
    unrelayed: int = 0  # forwarded commands whose reply was not written to the client yet
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    reset: _Fault | None = None  # a reset_mid_pipeline under way: commands left to take
    closed: bool = False

    def first_commands(self) -> list[str]:
        """The first commands (see describe), e.g. ['AUTH', 'SELECT 3', 'EVALSHA 3f2a...']."""
        return [e[1] for e in self.log if e[0] == "cmd"]


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.delay_s = 0.0
        self.fired = asyncio.Event()
        self.connections: list[Connection] = []
        self._fault: _Fault | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # --- control ------------------------------------------------------------------------

    async def start(self) -> FaultProxy:
        await self.accept()
        return self

    async def accept(self) -> None:
        """Listens (again, on the same port once it has one)."""
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def refuse(self) -> None:
        """Stops listening, so connecting fails, and resets every open connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.drop_all()

    def drop_all(self) -> None:
        for conn in self.connections:
            self._close(conn, reset=True)

    def passing(self) -> None:
        """Back to forwarding everything (disarms a fault that has not fired, ends delays)."""
        self._fault = None
        self.delay_s = 0.0

    def _arm(self, fault: _Fault) -> None:
        self.fired.clear()
        self._fault = fault

    def drop_before(self, names: Iterable[str] = SCRIPT_CALLS) -> None:
        self._arm(_Fault("drop_before", frozenset(names)))

    def drop_after(self, names: Iterable[str] = SCRIPT_CALLS) -> None:
        self._arm(_Fault("drop_after", frozenset(names)))

    def reset_mid_pipeline(self, k: int, n: int, names: Iterable[str] = SCRIPT_CALLS) -> None:
        assert 0 < k < n
        self._arm(_Fault("reset", frozenset(names), k=k, n=n))

    async def close(self) -> None:
        await self.refuse()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _take(self, kind: str) -> _Fault | None:
        fault = self._fault
        if fault is None or fault.kind != kind:
            return None
        self._fault = None
        self.fired.set()
        return fault

    # --- one connection -----------------------------------------------------------------

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(writer)
        conn.settled.set()
        self.connections.append(conn)
        try:
            up_reader, conn.upstream = await asyncio.open_connection(*self.upstream)
        except OSError:
            self._close(conn, reset=True)
            return
        if conn.closed:  # dropped while connecting
            conn.upstream.transport.abort()
            return
        self._spawn(self._replies(conn, up_reader))
        self._spawn(self._relay(conn))
        await self._commands(conn, reader)

    def _close(self, conn: Connection, *, reset: bool = False) -> None:
        """Closes the client side (FIN, or RST with `reset`) and the server side (FIN, after
        whatever was forwarded)."""
        if conn.closed:
            return
        conn.closed = True
        if reset:
            _reset(conn.client)
        else:
            conn.client.transport.abort()
        if conn.upstream is not None:
            conn.upstream.close()
        conn.replies.put_nowait(None)
        conn.settled.set()

    async def _commands(self, conn: Connection, reader: asyncio.StreamReader) -> None:
        """client -> server, one command at a time."""
        assert conn.upstream is not None
        buf = bytearray()
        with contextlib.suppress(ConnectionError):
            while not conn.closed:
                data = await reader.read(65536)
                if not data or conn.closed:
                    break
                buf += data
                frames = []
                while (end := frame_end(buf)) is not None:
                    frames.append(bytes(buf[:end]))
                    del buf[:end]
                for frame in frames:
                    words = command_words(frame)
                    conn.commands += 1
                    if conn.commands <= LOGGED_COMMANDS:
                        conn.log.append(("cmd", describe(words)))
                    name = words[0] if words else ""
                    fault = self._fault
                    if fault and fault.kind == "reset" and name in fault.names:
                        conn.reset = self._take("reset")
                    if conn.reset is not None:
                        conn.reset.n -= 1
                        if conn.reset.n == 0:
                            await conn.upstream.drain()
                            self._close(conn, reset=True)
                            return
                        if conn.reset.k == 0:
                            continue  # held back: never forwarded
                        conn.reset.k -= 1
                    if fault and fault.kind == "drop_before" and name in fault.names:
                        self._take("drop_before")
                        await conn.upstream.drain()
                        await conn.settled.wait()  # replies of what was forwarded: relayed
                        self._close(conn)
                        return
                    drop_reply = False
                    if fault and fault.kind == "drop_after" and name in fault.names:
                        self._take("drop_after")
                        drop_reply = True
                    logged = conn.commands <= LOGGED_COMMANDS
                    conn.pending.append((words if logged else [], drop_reply))
                    conn.unrelayed += 1
                    conn.settled.clear()
                    conn.upstream.write(frame)
                await conn.upstream.drain()
        self._close(conn)

    async def _replies(self, conn: Connection, reader: asyncio.StreamReader) -> None:
        """server -> client: cuts replies, matches them to their commands, queues them."""
        loop = asyncio.get_running_loop()
        buf = bytearray()
        with contextlib.suppress(ConnectionError):
            while not conn.closed:
                data = await reader.read(65536)
                if not data:
                    break
                buf += data
                while (end := frame_end(buf)) is not None:
                    frame = bytes(buf[:end])
                    del buf[:end]
                    if conn.reset is not None:  # in the middle of a pipeline: withheld
                        continue
                    if frame.startswith(b">") or not conn.pending:  # a push answers nothing
                        conn.replies.put_nowait((loop.time() + self.delay_s, frame, None))
                        continue
                    words, drop_reply = conn.pending.popleft()
                    if drop_reply:
                        self._close(conn)
                        return
                    conn.replies.put_nowait((loop.time() + self.delay_s, frame, words))
        self._close(conn)

    async def _relay(self, conn: Connection) -> None:
        loop = asyncio.get_running_loop()
        while (item := await conn.replies.get()) is not None:
            at, frame, words = item
            if at > loop.time():
                await asyncio.sleep(at - loop.time())
            if conn.closed:
                return
            conn.client.write(frame)
            if words is not None:
                if words:
                    conn.log.append(("reply", describe(words), frame[:40].decode("latin-1")))
                conn.unrelayed -= 1
                if conn.unrelayed == 0:
                    conn.settled.set()
