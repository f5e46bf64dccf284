"""Files of secrets the service creates for itself (the signing key, the license key secret)."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)


def create_once(path: Path, data: bytes, what: str) -> None:
    """Writes `data` to `path` with mode 0600, atomically, and only if there is no file there:
    when several processes create it at once, the first one's file is kept by all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process created it first: keep theirs
        log.info("created the %s %s", what, path.resolve())
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def warn_if_readable_by_others(path: Path, what: str) -> None:
    """Logs a warning when a secret's file may be read by group or others."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("%s %s is readable by others (mode %o); use 0600", what, path, mode)
