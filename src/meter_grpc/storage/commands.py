"""redis-py-style commands over the transport (storage/transport.py), for every URL.

RedisStore calls `self.client.<command>(...)` with redis-py's names, arguments and replies
(as with decode_responses=True: str, not bytes), so store code reads as it would with
redis-py; underneath, each call is one pipelined command with the transport's semantics
(NotSent / MaybeSent / Unavailable, see transport.py). On a Cluster, multi-key commands are
split per slot; blocking reads (xread with `block`) go to a dedicated connection.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from datetime import timedelta
from typing import Any

from meter_grpc.storage.transport import MAX_INFLIGHT, Node, router_for, slot_of


def pairs(flat: Sequence[Any]) -> dict[Any, Any]:
    """[name, value, name, value, ...] (HGETALL, XINFO, stream entry fields) as a dict."""
    it = iter(flat)
    return dict(zip(it, it, strict=True))


def _entries(rows: Sequence[Any] | None) -> list[tuple[str, dict[str, str]]]:
    return [(eid, pairs(fields or ())) for eid, fields in rows or ()]


def _ms(t: int | timedelta) -> int:
    return int(t.total_seconds() * 1000) if isinstance(t, timedelta) else int(t)


def _s(t: int | timedelta) -> int:
    return int(t.total_seconds()) if isinstance(t, timedelta) else int(t)


# Commands execute_command() sends without a key: to one node (on a Cluster, that of slot 0).
# ping() and script_load() go to every primary.
_KEYLESS = frozenset(
    (
        *("PING", "ECHO", "INFO", "TIME", "DBSIZE", "SCRIPT", "CLUSTER", "CONFIG", "CLIENT"),
        *("DEBUG", "COMMAND", "FLUSHALL", "FLUSHDB", "ROLE", "MEMORY", "LATENCY", "FUNCTION"),
    )
)


def key_of(args: Sequence[Any]) -> str | None:
    """The key that routes a command on a Cluster (None: any node)."""
    name = str(args[0]).upper()
    if name in _KEYLESS or len(args) < 2:
        return None
    if name in ("EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"):
        return str(args[3]) if int(args[2]) > 0 else None
    if name in ("XREAD", "XREADGROUP"):
        upper = [str(a).upper() for a in args]
        return str(args[upper.index("STREAMS") + 1])
    return str(args[1])


class RedisClient:
    """redis-py-compatible commands (replies decoded to str, as with decode_responses=True)
    over the transport, for every URL. Multi-key commands are split by slot on a Cluster."""

    def __init__(self, url: str, timeout_s: float = 5.0, max_inflight: int = MAX_INFLIGHT) -> None:
        self.router = router_for(url, timeout_s, max_inflight)

    async def close(self) -> None:
        self.router.close()

    aclose = close

    async def _call(self, *args: Any) -> Any:
        """A command whose key is its first argument."""
        return await self.router.call(args, args[1])

    async def _per_slot(self, command: str, names: Sequence[str]) -> list[tuple[list[str], Any]]:
        """Runs `command` once per slot group of `names` (once in all on a single server)."""
        if not self.router.cluster or len(names) < 2:
            return [(list(names), await self.router.call((command, *names), names[0]))]
        groups: dict[int, list[str]] = {}
        for name in names:
            groups.setdefault(slot_of(name), []).append(name)
        replies = await asyncio.gather(
            *(self.router.call((command, *g), g[0]) for g in groups.values())
        )
        return list(zip(groups.values(), replies, strict=True))

    def pipeline(self, transaction: bool = False) -> Pipeline:
        """Commands queued and sent together by execute(); no MULTI/EXEC (use a script)."""
        if transaction:
            raise TypeError("transactions are not supported: use a Lua script")
        return Pipeline(self)

    # generic
    async def execute_command(self, *args: Any) -> Any:
        return await self.router.call(args, key_of(args))

    async def ping(self) -> bool:
        nodes = await self.router.primaries()
        replies = await asyncio.gather(*(self.router.call(("PING",), node=n) for n in nodes))
        return all(r == "PONG" for r in replies)

    async def scan_iter(self, match: str, count: int = 1000) -> AsyncIterator[str]:
        """Every key name matching `match`, SCANned on every primary (a Cluster's too); a key
        may come twice, as SCAN guarantees."""
        for node in await self.router.primaries():
            cursor = "0"
            while True:
                reply = await self.router.call(
                    ("SCAN", cursor, "MATCH", match, "COUNT", count), node=node
                )
                cursor = str(reply[0])
                for name in reply[1]:
                    yield str(name)
                if cursor == "0":
                    break

    # scripts
    def run_script(
        self,
        sha: str,
        source: str,
        keys: Sequence[Any],
        args: Sequence[Any],
        node: Node | None = None,
    ) -> Coroutine[Any, Any, Any]:
        """EVALSHA on the node of keys[0] (or `node`), loading the script on NOSCRIPT (on the
        node that said it)."""
        command = ("EVALSHA", sha, len(keys), *keys, *args)
        key = str(keys[0]) if keys and node is None else None
        return self.router.call(command, key, node=node, source=source)

    async def script_load(self, source: str) -> str:
        nodes = await self.router.primaries()
        shas = await asyncio.gather(
            *(self.router.call(("SCRIPT", "LOAD", source), node=n) for n in nodes)
        )
        return str(shas[0])

    # strings and keys
    async def get(self, name: str) -> str | None:
        return await self._call("GET", name)  # type: ignore[no-any-return]

    async def set(
        self,
        name: str,
        value: Any,
        ex: int | timedelta | None = None,
        px: int | timedelta | None = None,
        nx: bool = False,
        xx: bool = False,
        keepttl: bool = False,
        get: bool = False,
    ) -> Any:
        args: list[Any] = ["SET", name, value]
        if ex is not None:
            args += ["EX", _s(ex)]
        if px is not None:
            args += ["PX", _ms(px)]
        if nx:
            args.append("NX")
        if xx:
            args.append("XX")
        if keepttl:
            args.append("KEEPTTL")
        if get:
            args.append("GET")
        reply = await self._call(*args)
        return reply if get else (True if reply == "OK" else None)

    async def mget(self, keys: Sequence[str], *args: str) -> list[str | None]:
        names = [*keys, *args]
        found: dict[str, str | None] = {}
        for group, values in await self._per_slot("MGET", names):
            found.update(zip(group, values, strict=True))
        return [found[n] for n in names]

    async def delete(self, *names: str) -> int:
        return sum(n for _, n in await self._per_slot("DEL", names))

    async def unlink(self, *names: str) -> int:
        return sum(n for _, n in await self._per_slot("UNLINK", names))

    async def exists(self, *names: str) -> int:
        return sum(n for _, n in await self._per_slot("EXISTS", names))

    async def incr(self, name: str, amount: int = 1) -> int:
        return await self._call("INCRBY", name, amount)  # type: ignore[no-any-return]

    # hashes
    async def hget(self, name: str, key: str) -> str | None:
        return await self._call("HGET", name, key)  # type: ignore[no-any-return]

    async def hmget(self, name: str, keys: Sequence[str], *args: str) -> list[str | None]:
        return await self._call("HMGET", name, *keys, *args)  # type: ignore[no-any-return]

    async def hset(
        self,
        name: str,
        key: str | None = None,
        value: Any = None,
        mapping: Mapping[str, Any] | None = None,
        items: Sequence[Any] | None = None,
    ) -> int:
        flat: list[Any] = [] if key is None else [key, value]
        for k, v in (mapping or {}).items():
            flat += [k, v]
        flat += list(items or ())
        if not flat:
            raise ValueError("hset needs key/value, mapping or items")
        return await self._call("HSET", name, *flat)  # type: ignore[no-any-return]

    async def hgetall(self, name: str) -> dict[str, str]:
        return pairs(await self._call("HGETALL", name))

    async def hdel(self, name: str, *keys: str) -> int:
        return await self._call("HDEL", name, *keys)  # type: ignore[no-any-return]

    # sets
    async def sadd(self, name: str, *values: str) -> int:
        return await self._call("SADD", name, *values)  # type: ignore[no-any-return]

    async def smembers(self, name: str) -> builtins.set[str]:
        return set(await self._call("SMEMBERS", name))

    # sorted sets
    async def zadd(
        self,
        name: str,
        mapping: Mapping[str, float],
        nx: bool = False,
        xx: bool = False,
        ch: bool = False,
        gt: bool = False,
        lt: bool = False,
    ) -> int:
        flags = [f for f, on in (("NX", nx), ("XX", xx), ("GT", gt), ("LT", lt), ("CH", ch)) if on]
        flat: list[Any] = []
        for member, score in mapping.items():
            flat += [score, member]
        return await self._call("ZADD", name, *flags, *flat)  # type: ignore[no-any-return]

    async def zrem(self, name: str, *values: Any) -> int:
        return await self._call("ZREM", name, *values)  # type: ignore[no-any-return]

    async def zscore(self, name: str, value: Any) -> float | None:
        reply = await self._call("ZSCORE", name, value)
        return None if reply is None else float(reply)

    async def zcard(self, name: str) -> int:
        return await self._call("ZCARD", name)  # type: ignore[no-any-return]

    async def zrange(
        self, name: str, start: int, end: int, desc: bool = False, withscores: bool = False
    ) -> list[Any]:
        args: list[Any] = ["ZRANGE", name, start, end]
        if desc:
            args.append("REV")
        if withscores:
            args.append("WITHSCORES")
        reply = await self._call(*args)
        return [(m, float(s)) for m, s in pairs(reply).items()] if withscores else reply

    async def zrangebylex(
        self, name: str, min: str, max: str, start: int | None = None, num: int | None = None
    ) -> list[str]:
        limit = ["LIMIT", start, num] if start is not None and num is not None else []
        return await self._call("ZRANGEBYLEX", name, min, max, *limit)  # type: ignore[no-any-return]

    # streams
    async def xadd(
        self,
        name: str,
        fields: Mapping[str, Any],
        id: str = "*",
        maxlen: int | None = None,
        approximate: bool = True,
    ) -> str:
        trim = ["MAXLEN", "~" if approximate else "=", maxlen] if maxlen is not None else []
        flat = [x for kv in fields.items() for x in kv]
        return await self._call("XADD", name, *trim, id, *flat)  # type: ignore[no-any-return]

    async def xrange(
        self, name: str, min: str = "-", max: str = "+", count: int | None = None
    ) -> list[tuple[str, dict[str, str]]]:
        extra = ["COUNT", count] if count is not None else []
        return _entries(await self._call("XRANGE", name, min, max, *extra))

    async def xrevrange(
        self, name: str, max: str = "+", min: str = "-", count: int | None = None
    ) -> list[tuple[str, dict[str, str]]]:
        extra = ["COUNT", count] if count is not None else []
        return _entries(await self._call("XREVRANGE", name, max, min, *extra))

    async def xread(
        self, streams: Mapping[str, str], count: int | None = None, block: int | None = None
    ) -> list[list[Any]]:
        """As redis-py (RESP2): [[stream, [(id, fields), ...]], ...]; [] when nothing came.
        With `block` (ms), waits on a dedicated connection of the node's blocking pool."""
        args: list[Any] = ["XREAD"]
        if count is not None:
            args += ["COUNT", count]
        if block is not None:
            args += ["BLOCK", block]
        args += ["STREAMS", *streams.keys(), *streams.values()]
        key = next(iter(streams))
        block_s = -1.0 if block is None else block / 1000
        reply = await self.router.call(tuple(args), key, block_s=block_s)
        return [[name, _entries(rows)] for name, rows in reply or ()]


class Pipeline:
    """redis-py's non-transactional pipeline: calls queued, then sent concurrently by
    execute() (the pipelined connections put them on the wire together)."""

    def __init__(self, client: RedisClient) -> None:
        self._client = client
        self._queued: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Callable[..., Pipeline]:
        getattr(self._client, name)  # AttributeError for unknown commands

        def queue(*args: Any, **kwargs: Any) -> Pipeline:
            self._queued.append((name, args, kwargs))
            return self

        return queue

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        queued, self._queued = self._queued, []
        calls = (getattr(self._client, n)(*a, **kw) for n, a, kw in queued)
        return list(await asyncio.gather(*calls, return_exceptions=not raise_on_error))

    async def __aenter__(self) -> Pipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._queued.clear()
