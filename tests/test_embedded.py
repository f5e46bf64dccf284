"""storage/embedded.py in-process: the data dir's lock, the supervisor, valkey's own session.
(The service as a whole, with signals and load, is in test_process.py.)"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from meter_grpc.storage.embedded import (
    LOCK_FILE_NAME,
    DataDirLock,
    DataDirLocked,
    EmbeddedServer,
    restart_delay,
)
from tests.support import alive, until

LOGGER = "meter_grpc.storage.embedded"


async def _get(url: str, key: str) -> bytes | None:
    client = aioredis.Redis.from_url(url)
    try:
        value: bytes | None = await client.get(key)
        return value
    finally:
        await client.aclose()


async def _set(url: str, key: str, value: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        await client.set(key, value)
    finally:
        await client.aclose()


async def _restarted(server: EmbeddedServer, old_pid: int, restarts: int) -> None:
    """Waits until the supervisor has restarted valkey and it answers on the same URL."""
    await until(lambda: server.restarts >= restarts and server.pid not in (None, old_pid))
    for _ in range(600):
        try:
            assert await _get(server.url, "probe") is None
            return
        except Exception:
            await asyncio.sleep(0.05)
    raise AssertionError("valkey did not answer after its restart")


def test_restart_delay_doubles_from_a_tenth_of_a_second_up_to_five() -> None:
    assert [restart_delay(n) for n in range(1, 10)] == [
        0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0,
    ]  # fmt: skip


def test_the_lock_names_its_owner_and_is_exclusive(tmp_path: Path) -> None:
    first, second = DataDirLock(tmp_path / "d"), DataDirLock(tmp_path / "d")
    first.acquire()
    first.acquire()  # held: a no-op
    assert (tmp_path / "d" / LOCK_FILE_NAME).read_text() == f"{os.getpid()}\n"
    with pytest.raises(DataDirLocked) as raised:
        second.acquire()  # another open file, even in the same process
    message = str(raised.value)
    assert "\n" not in message
    assert f"pid {os.getpid()}" in message and str(tmp_path / "d") in message
    assert raised.value.pid == os.getpid()
    first.release()
    second.acquire()
    assert second.held
    second.release()


async def test_valkey_runs_in_a_session_of_its_own(server: EmbeddedServer) -> None:
    assert server.pid is not None
    assert os.getsid(server.pid) == server.pid != os.getsid(0)


async def test_a_killed_valkey_is_restarted_on_the_same_address_with_its_data(
    server: EmbeddedServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    url = server.url
    await _set(url, "kept", "1")  # fsynced before the reply
    first = server.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    await _restarted(server, first, 1)
    assert server.url == url
    assert await _get(url, "kept") == b"1"
    assert server.pidfile.read_text().strip() == str(server.pid)
    assert (server.data_dir / "valkey.sock").exists()
    assert not (server.data_dir / "valkey.sock.loading").exists()

    second = server.pid
    assert second is not None
    os.kill(second, signal.SIGSEGV)  # a crash, soon after the last one: a longer delay
    await _restarted(server, second, 2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert f"pid {first}" in warnings[0] and "signal SIGKILL" in warnings[0]
    assert "in 0.1 s (attempt 1)" in warnings[0]
    assert f"pid {second}" in warnings[1] and "in 0.2 s (attempt 2)" in warnings[1]


async def test_stop_ends_supervision_first(tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path / "v")
    await server.start()
    pid = server.pid
    assert pid is not None
    await server.stop()
    assert not alive(pid)
    await asyncio.sleep(0.3)  # longer than the first restart delay: nothing comes back
    assert server.pid is None and server.restarts == 0
    assert not server.pidfile.exists()
    # The lock went with it: the data dir can be used again, by this object or another.
    other = EmbeddedServer(tmp_path / "v")
    url = await other.start()
    assert await _get(url, "x") is None
    await other.stop()


async def test_a_second_server_on_the_same_data_dir_touches_nothing(
    server: EmbeddedServer,
) -> None:
    pid = server.pid
    assert pid is not None
    second = EmbeddedServer(server.data_dir)
    with pytest.raises(DataDirLocked, match=f"pid {os.getpid()}"):
        await second.start()
    assert server.pid == pid and alive(pid)
    assert server.pidfile.read_text().strip() == str(pid)
    assert await _get(server.url, "x") is None


async def test_a_restart_on_a_loopback_port_keeps_the_port_and_password(
    tmp_path: Path,
) -> None:
    server = EmbeddedServer(tmp_path / ("d" * 120))  # too deep for a unix socket
    await server.start()
    try:
        url = server.url
        assert url.startswith("redis://:")
        await _set(url, "kept", "1")
        pid = server.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await _restarted(server, pid, 1)
        assert server.url == url
        assert await _get(url, "kept") == b"1"
    finally:
        await server.stop()
