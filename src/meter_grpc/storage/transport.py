"""The one Redis transport of the service: every command, every URL, one set of semantics.

URLs: `redis://[user:password@]host:port[/db]`, `rediss://...` (TLS), `unix://[user:password@]
/path/to/socket[?db=n]`, and Redis Cluster as `redis+cluster://[user:password@]host:port,
host:port,...` or `rediss+cluster://...`. TLS options as in redis-py: `ssl_cert_reqs=none|
optional|required`, `ssl_ca_certs=`, `ssl_certfile=`, `ssl_keyfile=`, `ssl_check_hostname=`.

Design. Each node has one *pipelined* connection (an asyncio.Protocol whose replies are parsed
by hiredis): a command is written as it is issued (all commands of one event-loop iteration
in one write), any number are in flight, and replies are handed back in order. That costs
about a tenth of the CPU per call of redis-py or valkey-glide. Blocking commands (XREAD BLOCK)
cannot share it: they take a dedicated connection from a bounded per-node pool, with the same
handshake and the same failure semantics. On a Cluster, the slot map comes from CLUSTER SLOTS,
each key goes to the primary of its slot, and calls to different nodes never wait for each
other (a slow shard delays only its own calls).

Backpressure. At most `max_inflight` commands (METER_REDIS_MAX_INFLIGHT, default 10,000) are
in flight on one node's pipelined connection: issued and not yet answered, queued for the
write included. A call beyond it waits, in order of arrival, for earlier ones to be answered,
up to the timeout (then it fails as NotSent: it was never written) or until its caller gives
up (a gRPC deadline cancels the wait); so a flood of calls costs waiting tasks, never an
unbounded send buffer or an unbounded queue of replies to match. `Connection.inflight` and
`Connection.peak_inflight` show it.

Handshake. On every (re)connect, AUTH and SELECT (or a PING when the URL needs neither) are
written and answered before any other command is written on that socket; commands issued
meanwhile wait for it. A handshake that fails (wrong password, unknown db, a socket closed
before the answer) fails the waiting calls as NotSent.

Failure semantics, decided by *where* a call failed, never by the text of an error:

- `NotSent`: the command's bytes were never written (no connection could be made, the
  handshake failed, the connection dropped before the write that carried it). Nothing was
  applied. The transport retries such a call once, on a fresh connection, when the failure
  was not the handshake's own (a wrong password stays wrong).
- `MaybeSent`: the bytes were written (or handed to the socket) and no reply came: the
  connection was lost, or (`StoreTimeout`) no reply within the per-call timeout. The outcome
  is unknown; the transport never re-sends such a call (a script that may have run is never
  run twice, Cluster included). A timeout drops the connection, since later replies could no
  longer be matched to their callers.
- `Unavailable`: the server answered that it did not run the command (LOADING, BUSY,
  READONLY, OOM, MASTERDOWN, TRYAGAIN, CLUSTERDOWN, NOAUTH, NOPERM, ...), or Cluster
  redirects did not settle (more than MAX_REDIRECTS MOVED/ASK). Nothing was applied.
- `ReplyError`: any other error reply (a bad command, a script error): a bug, not an outage.

MOVED (the slot moved: the command was not run) updates the slot map and re-sends; ASK sends
ASKING + the command to the importing node; NOSCRIPT loads the script on that node and
re-sends. Failures are logged once per burst (a WARNING naming the error and the node, then a
summary of how many more came in each further 10 s), never once per call.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
from redis.crc import key_slot

log = logging.getLogger(__name__)

SLOTS = 16384
MAX_REDIRECTS = 5
BLOCKING_POOL_SIZE = 1024  # dedicated connections for blocking reads, per node
MAX_INFLIGHT = 10_000  # commands in flight per pipelined connection (METER_REDIS_MAX_INFLIGHT)
BURST_WINDOW_S = 10.0
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")

# Error reply codes meaning "the server did not run this command; try again later".
UNAVAILABLE_CODES = frozenset(
    {
        "LOADING",
        "BUSY",
        "READONLY",
        "OOM",
        "MASTERDOWN",
        "TRYAGAIN",
        "CLUSTERDOWN",
        "NOAUTH",
        "NOPERM",
        "WRONGPASS",
        "MISCONF",
        "NOREPLICAS",
        "UNBLOCKED",
    }
)


# --- exceptions ---------------------------------------------------------------------------


class StoreError(Exception):
    """A call that did not get a reply it can use; `node` is where it went."""

    def __init__(self, message: str, node: str = "") -> None:
        super().__init__(message)
        self.node = node


class NotSent(StoreError):
    """The command was never written: nothing was applied; safe to retry."""

    def __init__(self, message: str, node: str = "", *, retry: bool = True) -> None:
        super().__init__(message, node)
        self.retry = retry  # False when retrying cannot help (the handshake was refused)


class MaybeSent(StoreError):
    """The command was written and no reply came: it may or may not have been applied."""


class StoreTimeout(MaybeSent):
    """No reply within the timeout; the connection was dropped."""


class Unavailable(StoreError):
    """The server refused to run the command (LOADING, BUSY, READONLY, ...): not applied."""

    def __init__(self, message: str, node: str = "", code: str = "") -> None:
        super().__init__(message, node)
        self.code = code


class ReplyError(StoreError):
    """Any other error reply (bad command, script error): a bug rather than an outage."""

    def __init__(self, message: str, node: str = "", code: str = "") -> None:
        super().__init__(message, node)
        self.code = code


class NoScript(ReplyError):
    """EVALSHA of a script the node does not have (handled inside the transport)."""


class _Redirect(Unavailable):
    """MOVED / ASK: the command was not run; `target` is the node to ask."""

    def __init__(self, message: str, node: str, code: str, slot: int, target: str) -> None:
        super().__init__(message, node, code)
        self.slot, self.target = slot, target


class _ErrorReply(Exception):
    """What hiredis makes of an error reply; turned into one of the above by _raise_for."""


def _raise_for(reply: _ErrorReply, node: str) -> StoreError:
    message = str(reply)
    code = message.split(" ", 1)[0]
    if code in ("MOVED", "ASK"):
        _, slot, target = message.split(" ", 2)
        host, _, port = target.rpartition(":")
        if not host:  # "MOVED 123 :6380": same host, other port
            host = node.rpartition(":")[0]
        return _Redirect(message, node, code, int(slot), f"{host}:{port}")
    if code == "NOSCRIPT":
        return NoScript(message, node, code)
    if code in UNAVAILABLE_CODES:
        burst.note(code, node, message)
        return Unavailable(message, node, code)
    return ReplyError(message, node, code)


# --- logging once per burst ---------------------------------------------------------------


class BurstLog:
    """Logs the first failure of a kind on a node, then one summary per window while more come."""

    def __init__(self, window_s: float = BURST_WINDOW_S) -> None:
        self.window_s = window_s
        self._counts: dict[tuple[str, str], int] = {}

    def note(self, what: str, node: str, detail: str) -> None:
        key = (what, node)
        if key in self._counts:
            self._counts[key] += 1
            return
        self._counts[key] = 0
        log.warning(
            "redis %s on %s: %s (repeats are counted, not logged, for %g s)",
            what,
            node,
            detail,
            self.window_s,
        )
        asyncio.get_running_loop().call_later(self.window_s, self._summary, key)

    def _summary(self, key: tuple[str, str]) -> None:
        n = self._counts.pop(key, 0)
        if n:
            log.warning("%d more redis %s on %s in the last %g s", n, *key, self.window_s)
            self._counts[key] = 0  # the burst goes on: one summary per window
            asyncio.get_running_loop().call_later(self.window_s, self._summary, key)


burst = BurstLog()


# --- URLs ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str = "127.0.0.1"
    port: int = 6379
    path: str = ""  # a unix socket

    def __str__(self) -> str:
        return self.path or f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Options:
    """What every connection of one URL shares."""

    username: str | None = None
    password: str | None = None
    db: int = 0
    ssl: ssl.SSLContext | None = None
    timeout_s: float = 5.0
    max_inflight: int = MAX_INFLIGHT

    def handshake(self) -> list[tuple[str | int, ...]]:
        """AUTH and SELECT as the URL asks, else PING: a reply proves a server is there
        (not just a proxy or a dying process that accepted the socket) before any call is
        written, so a socket that dies at once fails its calls as NotSent, not MaybeSent."""
        hello: list[tuple[str | int, ...]] = []
        if self.password is not None:
            if self.username:
                hello.append(("AUTH", self.username, self.password))
            else:
                hello.append(("AUTH", self.password))
        if self.db:
            hello.append(("SELECT", self.db))
        return hello or [("PING",)]


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0] in CLUSTER_SCHEMES


_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def _ssl_context(query: Mapping[str, list[str]]) -> ssl.SSLContext:
    def get(name: str) -> str | None:
        return query[name][-1] if name in query else None

    ctx = ssl.create_default_context(cafile=get("ssl_ca_certs"))
    reqs = (get("ssl_cert_reqs") or "required").lower()
    if reqs not in _CERT_REQS:
        raise ValueError(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}, not {reqs!r}")
    check_hostname = (get("ssl_check_hostname") or "").lower()
    ctx.check_hostname = _CERT_REQS[reqs] != ssl.CERT_NONE and check_hostname not in (
        "false",
        "0",
        "no",
    )
    ctx.verify_mode = _CERT_REQS[reqs]
    certfile = get("ssl_certfile")
    if certfile:
        ctx.load_cert_chain(certfile, get("ssl_keyfile"))
    return ctx


def parse_url(
    url: str, timeout_s: float = 5.0, max_inflight: int = MAX_INFLIGHT
) -> tuple[list[Endpoint], Options]:
    """The endpoints (seed nodes on a Cluster) and connection options of a URL."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix", *CLUSTER_SCHEMES):
        raise ValueError(f"unsupported Redis URL scheme {scheme!r}")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    query = parse_qs(parts.query)
    db = int(query["db"][-1]) if "db" in query else 0
    if scheme == "unix":
        endpoints = [Endpoint(path=unquote(parts.path))]
    else:
        if parts.path.strip("/"):
            db = int(parts.path.strip("/"))
        endpoints = []
        for hostport in hosts.split(","):
            hp = urlsplit(f"//{hostport}")
            endpoints.append(Endpoint(hp.hostname or "127.0.0.1", hp.port or 6379))
    if scheme in CLUSTER_SCHEMES and db:
        raise ValueError("a Redis Cluster has only database 0")
    options = Options(
        username=unquote(user) or None,
        password=unquote(password) if password else None,
        db=db,
        ssl=_ssl_context(query) if scheme.startswith("rediss") else None,
        timeout_s=timeout_s,
        max_inflight=max_inflight,
    )
    return endpoints, options


def pack(args: Sequence[Any]) -> bytes:
    return hiredis.pack_command(tuple(args))  # type: ignore[no-any-return]


# --- one socket ---------------------------------------------------------------------------

_NOT_ENOUGH = object()
_INF = float("inf")


class _Link(asyncio.Protocol):
    """One socket: commands written in order, replies handed to their waiters in order.

    `waiters` holds (future, deadline) of every command issued on this socket; the last
    `unwritten` of them are still in `out`, waiting for this iteration's write.
    """

    def __init__(self, node: str) -> None:
        self.node = node
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(
            encoding="utf-8", notEnoughData=_NOT_ENOUGH, replyError=_ErrorReply
        )
        self.waiters: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.out: list[bytes] = []
        self.unwritten = 0
        self.flush_scheduled = False
        self.watchdog: asyncio.TimerHandle | None = None
        self.dead = False
        self.loop = asyncio.get_running_loop()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(MaybeSent, f"connection to {self.node} lost: {exc or 'closed by the server'}")

    def data_received(self, data: bytes) -> None:
        if self.dead:
            return
        reader = self.reader
        reader.feed(data)
        waiters = self.waiters
        while True:
            try:
                reply = reader.gets()
            except Exception as exc:  # not RESP (or not UTF-8): nothing more can be trusted
                self.fail(MaybeSent, f"{self.node} sent a reply that cannot be read: {exc!r}")
                return
            if reply is _NOT_ENOUGH:
                return
            if not waiters:  # a reply nobody asked for: the stream is out of step
                self.fail(MaybeSent, f"{self.node} sent a reply nobody asked for")
                return
            fut = waiters.popleft()[0]
            if not fut.done():
                fut.set_result(reply)

    # calls
    def send(self, packed: bytes, timeout_s: float | None) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self.loop.create_future()
        if self.dead:
            fut.set_exception(NotSent(f"connection to {self.node} lost", self.node))
            return fut
        deadline = _INF if timeout_s is None else self.loop.time() + timeout_s
        self.waiters.append((fut, deadline))
        self.out.append(packed)
        self.unwritten += 1
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)
        if self.watchdog is None and deadline != _INF:
            self.watchdog = self.loop.call_at(deadline, self._check_timeout)
        return fut

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.dead or not self.out:
            return
        assert self.transport is not None
        data = b"".join(self.out)
        self.out.clear()
        self.unwritten = 0
        self.transport.write(data)

    def _check_timeout(self) -> None:
        self.watchdog = None
        if self.dead or not self.waiters:
            return
        deadline = self.waiters[0][1]
        if self.loop.time() >= deadline:
            burst.note("timeout", self.node, "no reply in time; connection dropped")
            self.fail(StoreTimeout, f"no reply from {self.node} in time")
        elif deadline != _INF:
            self.watchdog = self.loop.call_at(deadline, self._check_timeout)

    def fail(self, kind: type[MaybeSent], message: str, *, log: bool = True) -> None:
        """Ends the socket: written calls fail with `kind`, unwritten ones with NotSent."""
        if self.dead:
            return
        self.dead = True
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        waiters, self.waiters = self.waiters, collections.deque()
        written = len(waiters) - self.unwritten
        self.out.clear()
        if waiters and log and kind is not StoreTimeout:
            burst.note("connection lost", self.node, message)
        for i, (fut, _) in enumerate(waiters):
            if not fut.done():
                if i < written:
                    fut.set_exception(kind(message, self.node))
                else:
                    fut.set_exception(NotSent(message, self.node))
        if self.transport is not None:
            self.transport.abort()


# --- one node -----------------------------------------------------------------------------


class Connection:
    """The pipelined connection to one node, (re)connected on demand, handshake first."""

    def __init__(self, endpoint: Endpoint, options: Options) -> None:
        self.endpoint = endpoint
        self.node = str(endpoint)
        self.options = options
        self._link: _Link | None = None
        self._connecting: asyncio.Task[_Link] | None = None
        self._closed = False
        # Backpressure: commands issued and not answered yet, the most there ever were, and
        # the calls waiting for room (future, commands), first come first served; `_admitted`
        # calls were let in and have not written yet (nobody passes them meanwhile, so calls
        # are written in the order they were issued).
        self.max_inflight = max(options.max_inflight, 4)
        self.inflight = 0
        self.peak_inflight = 0
        self._admitted = 0
        self._room: collections.deque[tuple[asyncio.Future[None], int]] = collections.deque()

    async def request(self, *commands: bytes, timeout_s: float | None = -1) -> Any:
        """Writes `commands` back to back and returns the reply of the last one.

        `timeout_s`: -1 for the connection's timeout, None for none. Error replies raise
        (the first one, if several). Connection failures raise NotSent or MaybeSent; no room
        within the connection's timeout (max_inflight commands in flight) raises NotSent.
        """
        n = len(commands)
        if self._room or self._admitted or self.inflight + n > self.max_inflight:
            await self._wait_for_room(n)
        else:
            self.inflight += n
            if self.inflight > self.peak_inflight:
                self.peak_inflight = self.inflight
        try:
            timeout = self.options.timeout_s if timeout_s == -1 else timeout_s
            link = self._link
            if link is None or link.dead:
                link = await self._connected()
            if n == 1:
                reply = await link.send(commands[0], timeout)
                if type(reply) is _ErrorReply:
                    raise _raise_for(reply, self.node)
                return reply
            futs = [link.send(c, timeout) for c in commands]
            replies = await asyncio.gather(*futs, return_exceptions=True)
            for r in replies:
                if isinstance(r, BaseException):
                    raise r
            for r in replies:
                if type(r) is _ErrorReply:
                    raise _raise_for(r, self.node)
            return replies[-1]
        finally:
            self.inflight -= n
            if self._room:
                self._let_in()

    async def _wait_for_room(self, n: int) -> None:
        """Waits until `n` more commands fit (counted in `inflight` when this returns)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (fut, n)
        self._room.append(entry)
        try:
            async with asyncio.timeout(self.options.timeout_s):
                await fut
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                self._admitted -= 1
                self.inflight -= n  # let in just as the wait ended: give the room back
                self._let_in()
            else:
                fut.cancel()
                with contextlib.suppress(ValueError):
                    self._room.remove(entry)
            if isinstance(exc, TimeoutError):
                burst.note("send queue full", self.node, "no room in time")
                raise NotSent(
                    f"{self.max_inflight} commands in flight to {self.node}: no room in time",
                    self.node,
                    retry=False,
                ) from None
            raise
        self._admitted -= 1
        if self._room and not self._admitted:
            self._let_in()  # those behind run after this call has written

    def _let_in(self) -> None:
        """Lets waiting calls in, in order, while they fit."""
        room = self._room
        while room:
            fut, n = room[0]
            if fut.done():  # gave up
                room.popleft()
                continue
            if self.inflight + n > self.max_inflight:
                return
            room.popleft()
            self.inflight += n
            self._admitted += 1
            if self.inflight > self.peak_inflight:
                self.peak_inflight = self.inflight
            fut.set_result(None)

    async def _connected(self) -> _Link:
        if self._closed:
            raise NotSent(f"connection to {self.node} closed", self.node, retry=False)
        task = self._connecting
        if task is None:
            task = self._connecting = asyncio.ensure_future(self._connect())
            task.add_done_callback(self._connect_done)
        try:
            return await asyncio.shield(task)
        except NotSent as exc:  # a fresh exception per caller, not one shared traceback
            raise NotSent(str(exc), self.node, retry=exc.retry) from None
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and not (current and current.cancelling()):  # close()
                raise NotSent(f"connection to {self.node} closed", self.node, retry=False) from None
            raise

    def _connect_done(self, task: asyncio.Task[_Link]) -> None:
        if self._connecting is task:
            self._connecting = None
        if not task.cancelled():
            task.exception()  # retrieved: the callers got it

    async def _connect(self) -> _Link:
        loop = asyncio.get_running_loop()
        ep, opts = self.endpoint, self.options
        link = _Link(self.node)
        retry = True
        try:
            async with asyncio.timeout(opts.timeout_s):
                if ep.path:
                    await loop.create_unix_connection(lambda: link, ep.path)
                else:
                    await loop.create_connection(
                        lambda: link,
                        ep.host,
                        ep.port,
                        ssl=opts.ssl,
                        server_hostname=ep.host if opts.ssl else None,
                    )
                for command in opts.handshake():
                    reply = await link.send(pack(command), None)
                    if type(reply) is _ErrorReply:
                        retry = False
                        raise ConnectionRefusedError(f"{command[0]} refused: {reply}")
        except (OSError, TimeoutError, StoreError) as exc:
            link.fail(MaybeSent, "handshake failed", log=False)
            what = "handshake refused" if not retry else "cannot connect"
            burst.note(what, self.node, str(exc) or type(exc).__name__)
            raise NotSent(f"{what} to {self.node}: {exc}", self.node, retry=retry) from None
        if self._closed:
            link.fail(MaybeSent, "closed", log=False)
            raise NotSent(f"connection to {self.node} closed", self.node, retry=False)
        self._link = link
        return link

    def close(self) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        if self._link is not None:
            self._link.fail(MaybeSent, f"connection to {self.node} closed", log=False)
            self._link = None


class BlockingPool:
    """Dedicated connections for blocking commands to one node, at most `size` at a time."""

    def __init__(self, endpoint: Endpoint, options: Options, size: int) -> None:
        self.endpoint, self.options = endpoint, options
        self._slots = asyncio.Semaphore(size)
        self._idle: list[Connection] = []

    async def request(self, packed: bytes, timeout_s: float | None) -> Any:
        try:
            async with asyncio.timeout(self.options.timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            node = str(self.endpoint)
            burst.note("blocking pool exhausted", node, "no free connection in time")
            raise NotSent(f"no free blocking connection to {node}", node, retry=False) from None
        conn = self._idle.pop() if self._idle else Connection(self.endpoint, self.options)
        answered = False
        try:
            reply = await conn.request(packed, timeout_s=timeout_s)
            answered = True
            return reply
        except (Unavailable, ReplyError):
            answered = True  # an error reply leaves the connection in step
            raise
        finally:
            if answered:
                self._idle.append(conn)
            else:  # cancelled or failed: its command may still be blocked on the server
                conn.close()
            self._slots.release()

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


class Node:
    """One server (or one Cluster primary): its pipelined connection, and its pool of
    dedicated connections for blocking commands."""

    def __init__(self, endpoint: Endpoint, options: Options) -> None:
        self.name = str(endpoint)
        self.conn = Connection(endpoint, options)
        self.blocking = BlockingPool(endpoint, options, BLOCKING_POOL_SIZE)

    def close(self) -> None:
        self.conn.close()
        self.blocking.close()


_ASKING = pack(("ASKING",))


# --- routing: one server or a Cluster -----------------------------------------------------


@lru_cache(maxsize=65536)
def slot_of(key: str) -> int:
    return key_slot(key.encode())


class Router:
    """Sends commands to the node that holds their key; subclassed for a Cluster."""

    cluster = False

    def __init__(self, endpoint: Endpoint, options: Options) -> None:
        self.options = options
        self.node = Node(endpoint, options)

    def _route(self, key: str | None) -> Node | None:
        return self.node

    def node_of(self, key: str) -> Node | None:
        """The node that serves `key` as far as the slot map knows (None: not known yet)."""
        return self._route(key)

    async def _located(self, key: str | None) -> Node:
        return self.node

    async def primaries(self) -> list[Node]:
        return [self.node]

    def _redirected(self, r: _Redirect) -> Node:
        raise r  # a single server never redirects: treated as unavailable

    async def _after_failure(self, node: Node, key: str | None) -> Node:
        return node

    def _refused(self, exc: Unavailable) -> None:
        """An error reply that may mean the topology changed (a Cluster reloads its map)."""

    async def call(
        self,
        args: tuple[Any, ...],
        key: str | None = None,
        *,
        node: Node | None = None,
        source: str = "",
        block_s: float = -1,
    ) -> Any:
        """Runs one command on the node of `key` (or on `node`) and returns its reply.

        `source`: the script of an EVALSHA, loaded on NOSCRIPT (nothing ran; load and re-send in
        one round trip). `block_s` >= 0: a blocking command waiting up to that long (0: for
        ever), on a dedicated connection. A NotSent failure is retried once, on a fresh
        connection; MOVED / ASK are followed up to MAX_REDIRECTS times; nothing else is retried.
        """
        packed: bytes = hiredis.pack_command(args)
        pinned = node is not None
        if node is None:
            node = self._route(key) or await self._located(key)
        prefix: tuple[bytes, ...] = ()  # ASKING and/or SCRIPT LOAD, written just before
        retried, loaded, redirects = False, False, 0
        while True:
            try:
                if block_s >= 0:
                    timeout = None if block_s == 0 else block_s + self.options.timeout_s
                    return await node.blocking.request(packed, timeout)
                if not prefix:
                    return await node.conn.request(packed)
                return await node.conn.request(*prefix, packed)
            except NoScript:
                if not source or loaded:
                    raise
                loaded, prefix = True, (pack(("SCRIPT", "LOAD", source)), *prefix)
            except _Redirect as r:
                redirects += 1
                if pinned:
                    raise
                if redirects > MAX_REDIRECTS:
                    burst.note("redirect storm", node.name, str(r))
                    raise Unavailable(
                        f"more than {MAX_REDIRECTS} cluster redirects (last: {r})",
                        node.name,
                        r.code,
                    ) from None
                node = self._redirected(r)
                loaded, prefix = False, (_ASKING,) if r.code == "ASK" else ()
            except Unavailable as exc:
                self._refused(exc)
                raise
            except NotSent as exc:
                if retried or not exc.retry:
                    raise
                retried, loaded, prefix = True, False, ()
                if not pinned:
                    node = await self._after_failure(node, key)

    def close(self) -> None:
        self.node.close()


class ClusterRouter(Router):
    """A Redis Cluster: slot map from CLUSTER SLOTS, one Node per primary."""

    cluster = True

    def __init__(self, seeds: Sequence[Endpoint], options: Options) -> None:
        self.options = options
        self.seeds = list(seeds)
        self._nodes: dict[str, Node] = {}
        self._slots: list[Node | None] = [None] * SLOTS
        self._refreshing: asyncio.Task[None] | None = None

    def _node_at(self, name: str) -> Node:
        node = self._nodes.get(name)
        if node is None:
            host, _, port = name.rpartition(":")
            node = self._nodes[name] = Node(Endpoint(host, int(port)), self.options)
        return node

    def _route(self, key: str | None) -> Node | None:
        return self._slots[0 if key is None else slot_of(key)]

    async def _located(self, key: str | None) -> Node:
        await self.refresh()
        node = self._route(key)
        if node is None:
            raise Unavailable("no node serves this slot", "cluster", "CLUSTERDOWN")
        return node

    async def primaries(self) -> list[Node]:
        if self._slots[0] is None:
            await self.refresh()
        return list({id(n): n for n in self._slots if n is not None}.values())

    def _redirected(self, r: _Redirect) -> Node:
        node = self._node_at(r.target)
        if r.code == "MOVED":
            self._slots[r.slot] = node
            self._refresh_soon()
        return node

    async def _after_failure(self, node: Node, key: str | None) -> Node:
        return await self._located(key)  # reloads the map: a failover may have moved the slot

    def _refused(self, exc: Unavailable) -> None:
        if exc.code in ("READONLY", "MASTERDOWN", "CLUSTERDOWN"):  # e.g. after a failover
            self._refresh_soon()

    def _refresh_soon(self) -> None:
        if self._refreshing is None:
            self._refreshing = asyncio.ensure_future(self._refresh())
            self._refreshing.add_done_callback(self._refreshed)

    def _refreshed(self, task: asyncio.Task[None]) -> None:
        self._refreshing = None
        if not task.cancelled():
            task.exception()

    async def refresh(self) -> None:
        """Reloads the slot map (one refresh at a time; callers share it)."""
        self._refresh_soon()
        assert self._refreshing is not None
        await asyncio.shield(self._refreshing)

    async def _refresh(self) -> None:
        known = [n.conn.endpoint for n in self._nodes.values()]
        errors = []
        for endpoint in dict.fromkeys([*known, *self.seeds]):
            node = self._nodes.get(str(endpoint)) or Node(endpoint, self.options)
            try:
                rows = await node.conn.request(pack(("CLUSTER", "SLOTS")))
            except StoreError as exc:
                errors.append(exc)
                continue
            finally:
                if str(endpoint) not in self._nodes:
                    node.close()
            slots: list[Node | None] = [None] * SLOTS
            for start, end, primary, *_ in rows:
                host = primary[0] or endpoint.host
                owner = self._node_at(f"{host}:{primary[1]}")
                slots[start : end + 1] = [owner] * (end + 1 - start)
            self._slots = slots
            return
        raise NotSent(f"no cluster node answered CLUSTER SLOTS: {errors}", "cluster")

    def close(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
        for node in self._nodes.values():
            node.close()


def router_for(url: str, timeout_s: float, max_inflight: int = MAX_INFLIGHT) -> Router:
    endpoints, options = parse_url(url, timeout_s, max_inflight)
    if is_cluster_url(url):
        return ClusterRouter(endpoints, options)
    return Router(endpoints[0], options)


__all__ = [
    "MaybeSent",
    "NotSent",
    "ReplyError",
    "Router",
    "StoreError",
    "StoreTimeout",
    "Unavailable",
    "is_cluster_url",
    "router_for",
]
