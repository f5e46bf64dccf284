"""Automatic pipelining of script calls over redis-py (Redis Cluster and TLS connections;
plain ones use storage/resp.py, which pipelines by itself).

At most MAX_IN_FLIGHT batches are on their way to Redis at a time. A call made while a slot
is free goes out at once (on the next event-loop iteration); calls made while all slots are
busy queue up and leave together, as one non-transactional pipeline, as soon as a slot
frees: one write, one read and one pooled connection for the lot instead of one each. Each
EVALSHA still runs atomically on its own; only the trip is shared. Alone, a call never
waits; under load, batches grow by themselves and the client-side cost of a round trip
is shared by every call in the batch.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Sequence
from typing import Any, Protocol

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from meter_grpc.storage.resp import RespConnection

MAX_BATCH = 512
MAX_IN_FLIGHT = 1


class ScriptBatcher:
    def __init__(self, client: Any) -> None:
        self.client = client
        # redis-py's cluster pipelines refuse EVALSHA: on a cluster each call goes out by itself
        # (to the node of its license), concurrently with the rest of its batch.
        self._pipelines = not isinstance(client, RedisCluster)
        self._pending: list[tuple[Script, Sequence[Any], Sequence[Any], asyncio.Future[Any]]] = []
        self._scheduled = False
        self._sending: set[asyncio.Task[None]] = set()

    def run(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending.append((script, keys, args, fut))
        self._schedule(loop)
        return fut

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._scheduled and self._pending and len(self._sending) < MAX_IN_FLIGHT:
            self._scheduled = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        while self._pending and len(self._sending) < MAX_IN_FLIGHT:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            task = asyncio.ensure_future(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        self._schedule(asyncio.get_running_loop())

    async def _send(
        self, batch: list[tuple[Script, Sequence[Any], Sequence[Any], asyncio.Future[Any]]]
    ) -> None:
        try:
            if len(batch) == 1:
                script, keys, args, fut = batch[0]
                results: list[Any] = [await self._evalsha(script, keys, args)]
            elif not self._pipelines:
                results = await asyncio.gather(
                    *(self._evalsha(script, keys, args) for script, keys, args, _ in batch),
                    return_exceptions=True,
                )
            else:
                async with self.client.pipeline(transaction=False) as pipe:
                    for script, keys, args, _ in batch:
                        pipe.evalsha(script.sha, len(keys), *keys, *args)
                    results = await pipe.execute(raise_on_error=False)
                for i, result in enumerate(results):
                    if isinstance(result, NoScriptError):  # after a SCRIPT FLUSH or failover
                        script, keys, args, _ = batch[i]
                        try:
                            results[i] = await self._evalsha(script, keys, args)
                        except Exception as exc:
                            results[i] = exc
        except BaseException as exc:
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (*_, fut), result in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, Exception):
                fut.set_exception(result)
            else:
                fut.set_result(result)

    async def _evalsha(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        try:
            return await self.client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.client.script_load(script.source)
            return await self.client.evalsha(script.sha, len(keys), *keys, *args)


class RespRunner:
    """Script calls over a RespConnection: EVALSHA, loading the script on NOSCRIPT."""

    def __init__(self, conn: RespConnection) -> None:
        self.conn = conn

    async def run(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        try:
            return await self.conn.evalsha(script.sha, keys, args)
        except NoScriptError:
            await self.conn.execute("SCRIPT", "LOAD", script.source)
            return await self.conn.evalsha(script.sha, keys, args)


class Runner(Protocol):
    def run(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> Awaitable[Any]: ...


class Script:
    """A Lua script called through a runner: `await script(keys=[...], args=[...])`."""

    def __init__(self, source: str, runner: Runner) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self._runner = runner

    async def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        return await self._runner.run(self, keys, args)
