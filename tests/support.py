"""Helpers for tests: credentials and reading rich error statuses."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

ADMIN_TOKEN = "test-admin-token"
UNKNOWN_ID = "01900000-0000-7000-8000-000000000000"  # a well-formed id never minted here


def shared_key_secret_file() -> Path:
    """The server secret of every service the tests run on a shared store (the session's
    embedded server and cluster): replicas of one store must share it (storage/migrate.py)."""
    path = Path(tempfile.gettempdir()) / f"meter-test-key-secret-{os.getpid()}"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
    return path


def admin_md() -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {ADMIN_TOKEN}"),)


def license_md(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"License {key}"),)


@dataclass
class RichError:
    code: grpc.StatusCode
    message: str
    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    bad_fields: list[str] = field(default_factory=list)
    quota_subjects: list[str] = field(default_factory=list)
    retry_delay_ms: int | None = None


def rich_error(exc: grpc.aio.AioRpcError | grpc.RpcError) -> RichError:
    """The status code and every google.rpc detail of a failed call."""
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    err = RichError(code=exc.code(), message=exc.details() or "")  # type: ignore[attr-defined]
    if status is None:
        return err
    assert status.code == exc.code().value[0]  # type: ignore[attr-defined]
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            err.reason, err.domain, err.metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            detail.Unpack(br)
            err.bad_fields += [v.field for v in br.field_violations]
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            qf = error_details_pb2.QuotaFailure()
            detail.Unpack(qf)
            err.quota_subjects += [v.subject for v in qf.violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            ri = error_details_pb2.RetryInfo()
            detail.Unpack(ri)
            err.retry_delay_ms = ri.retry_delay.ToMilliseconds()
    return err


async def expect_error(call: object) -> RichError:
    """Awaits a call that must fail and returns its rich error."""
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return rich_error(exc)
    raise AssertionError("the call succeeded but an error was expected")


async def until(
    condition: Callable[[], bool], timeout_s: float = 30, what: str = "the condition"
) -> None:
    """Waits until condition() holds, checking every 20 ms."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def alive(pid: int) -> bool:
    """The process runs (it is neither gone nor a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
