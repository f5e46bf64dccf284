"""storage/resp.py, the pipelined connection of the request path, against a real valkey-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from meter_grpc.storage.embedded import EmbeddedServer
from meter_grpc.storage.resp import RespConnection, supports


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[EmbeddedServer]:
    s = EmbeddedServer(tmp_path / "v")
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def tcp_server(tmp_path: Path) -> AsyncIterator[EmbeddedServer]:
    """A data dir too deep for a unix socket: the embedded server listens on loopback with a
    password instead."""
    s = EmbeddedServer(tmp_path / ("d" * 120))
    await s.start()
    yield s
    await s.stop()


def test_supported_urls() -> None:
    assert supports("redis://127.0.0.1:6379/0")
    assert supports("unix:///tmp/valkey.sock")
    assert not supports("rediss://127.0.0.1:6380/0")
    assert not supports("redis+cluster://127.0.0.1:7000")


async def test_many_calls_in_flight_get_their_own_replies(server: EmbeddedServer) -> None:
    conn = RespConnection(server.url, timeout_s=5)
    try:
        replies = await asyncio.gather(*(conn.execute("ECHO", f"m{i}") for i in range(500)))
        assert replies == [f"m{i}" for i in range(500)]
        assert await conn.execute("INCRBY", "n", 5) == 5
        assert await conn.execute("GET", "missing") is None
        with pytest.raises(ResponseError):
            await conn.execute("INCR", "n", "extra-argument")
        assert await conn.execute("GET", "n") == "5"  # an error reply leaves the order intact
    finally:
        await conn.close()


async def test_evalsha_of_an_unknown_script_raises_noscript(server: EmbeddedServer) -> None:
    conn = RespConnection(server.url, timeout_s=5)
    try:
        with pytest.raises(NoScriptError):
            await conn.evalsha("0" * 40, [], [])
        sha = await conn.execute("SCRIPT", "LOAD", "return {KEYS[1], ARGV[1], 7}")
        assert await conn.evalsha(sha, ["k"], ["v"]) == ["k", "v", 7]
    finally:
        await conn.close()


async def test_password_and_database_from_the_url(tcp_server: EmbeddedServer) -> None:
    assert tcp_server.url.startswith("redis://:")
    url = tcp_server.url.rsplit("/", 1)[0] + "/3"
    conn = RespConnection(url, timeout_s=5)
    direct = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        await conn.execute("SET", "where", "db3")
        assert await direct.get("where") == "db3"
        bad = RespConnection(tcp_server.url.replace("redis://:", "redis://:wrong"), timeout_s=5)
        with pytest.raises(RedisConnectionError, match="Error connecting"):
            await bad.execute("PING")
        await bad.close()
    finally:
        await conn.close()
        await direct.aclose()


async def test_timeout_fails_the_calls_and_the_next_call_reconnects(server: EmbeddedServer) -> None:
    conn = RespConnection(server.url, timeout_s=0.3)
    try:
        blocked = asyncio.ensure_future(conn.execute("BLPOP", "nothing", 5))
        behind = asyncio.ensure_future(conn.execute("PING"))
        with pytest.raises(RedisTimeoutError):
            await blocked
        with pytest.raises(RedisTimeoutError):
            await behind
        assert await conn.execute("PING") == "PONG"
    finally:
        await conn.close()


async def test_server_gone_mid_call_and_before_a_call(server: EmbeddedServer) -> None:
    conn = RespConnection(server.url, timeout_s=5)
    try:
        assert await conn.execute("PING") == "PONG"
        in_flight = asyncio.ensure_future(conn.execute("BLPOP", "nothing", 5))
        await asyncio.sleep(0.1)
        await server.stop()
        with pytest.raises(RedisConnectionError, match="Error while reading"):
            await in_flight  # sent, outcome unknown
        with pytest.raises(RedisConnectionError, match="Error connecting"):
            await conn.execute("PING")  # nothing sent
        await server.start()
        assert await conn.execute("PING") == "PONG"
    finally:
        await conn.close()


async def _fake_server(*replies: bytes) -> tuple[asyncio.Server, str]:
    """A TCP server that sends replies[0] as soon as a client connects (if not empty), then
    replies[1], replies[2], ... (the last one over and over) to what it reads."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(replies[0])
        n = 1
        while await reader.read(1024):
            writer.write(replies[min(n, len(replies) - 1)])
            n += 1
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"redis://127.0.0.1:{port}/0"


async def test_replies_nobody_asked_for_or_not_resp_drop_the_connection() -> None:
    cases = [
        ((b"+HELLO\r\n", b"+PONG\r\n"), "Error connecting"),  # a reply before any call
        ((b"this is not RESP\r\n",), "Error connecting"),
        ((b"", b"+PONG\r\n", b"this is not RESP\r\n"), "Error while reading"),
    ]
    for replies, error in cases:
        server, url = await _fake_server(*replies)
        conn = RespConnection(url, timeout_s=2)
        try:
            if replies[0] == b"":
                assert await conn.execute("PING") == "PONG"
            with pytest.raises(RedisConnectionError, match=error):
                await conn.execute("PING")
        finally:
            await conn.close()
            server.close()
            await server.wait_closed()
