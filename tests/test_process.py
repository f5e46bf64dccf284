"""The service as a user runs it: `python -m meter_grpc` on the embedded store."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import policy_pb2
from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from meter_grpc.config import Settings
from meter_grpc.server import build_server
from tests.support import expect_error

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = _free_port()
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        env = {
            **os.environ,
            "METER_LISTEN": self.target,
            "METER_DATA_DIR": str(self.data_dir),
            "METER_REDIS_URL": "",
            "METER_ADMIN_TOKENS": "",
            "PYTHONPATH": str(ROOT / "src"),
        }
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meter_grpc", env=env, stderr=asyncio.subprocess.PIPE
        )
        async with grpc.aio.insecure_channel(self.target) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for _ in range(300):
                try:
                    r = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError("service did not become SERVING")

    def token(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", "Bearer " + (self.data_dir / "admin-token").read_text().strip()),)

    async def terminate(self) -> tuple[int, str]:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(self.proc.communicate(), 30)
        return self.proc.returncode or 0, err.decode()


@pytest.fixture
async def proc(tmp_path: Path) -> AsyncIterator[ServiceProcess]:
    sp = ServiceProcess(tmp_path / "var")
    yield sp
    if sp.proc and sp.proc.returncode is None:
        sp.proc.kill()
        await sp.proc.wait()


@pytest.mark.slow
async def test_restart_keeps_policies_licenses_and_uses(proc: ServiceProcess) -> None:
    await proc.start()
    token = proc.token()
    valkey_pid = (proc.data_dir / "valkey.pid").read_text().strip()
    assert Path(f"/proc/{valkey_pid}").exists()
    assert oct((proc.data_dir / "admin-token").stat().st_mode & 0o777) == "0o600"
    async with grpc.aio.insecure_channel(proc.target) as ch:
        licenses, usage = lgrpc.LicenseServiceStub(ch), ugrpc.UsageServiceStub(ch)
        policy = (
            await licenses.CreatePolicy(
                lpb.CreatePolicyRequest(policy=policy_pb2.Policy(max_uses=10)), metadata=token
            )
        ).policy
        lic = (
            await licenses.CreateLicense(
                lpb.CreateLicenseRequest(license={"policy_id": policy.id}), metadata=token
            )
        ).license
        await usage.IncrementUsage(
            upb.IncrementUsageRequest(license_id=lic.id, amount=7), metadata=token
        )
    code, log = await proc.terminate()
    assert code == 0, log
    assert "stopped" in log
    assert not Path(f"/proc/{valkey_pid}").exists()  # the embedded server stopped with it

    await proc.start()
    assert proc.token() == token  # the generated admin token is kept
    async with grpc.aio.insecure_channel(proc.target) as ch:
        licenses, usage = lgrpc.LicenseServiceStub(ch), ugrpc.UsageServiceStub(ch)
        assert (
            await licenses.GetPolicy(lpb.GetPolicyRequest(id=policy.id), metadata=token)
        ).policy == policy
        got = (await licenses.GetLicense(lpb.GetLicenseRequest(id=lic.id), metadata=token)).license
        assert (got.key, got.uses) == (lic.key, 7)
        r = await usage.IncrementUsage(
            upb.IncrementUsageRequest(license_id=lic.id, amount=3), metadata=token
        )
        assert r.uses == 10
    code, _ = await proc.terminate()
    assert code == 0


@pytest.mark.slow
async def test_leftover_embedded_server_is_replaced(proc: ServiceProcess) -> None:
    """After a SIGKILL of the service, the next start finds every acknowledged write (the
    append-only file is fsynced on each write) and no second server on the data dir."""
    await proc.start()
    token = proc.token()
    async with grpc.aio.insecure_channel(proc.target) as ch:
        licenses = lgrpc.LicenseServiceStub(ch)
        policy = (
            await licenses.CreatePolicy(
                lpb.CreatePolicyRequest(policy=policy_pb2.Policy()), metadata=token
            )
        ).policy
    assert proc.proc is not None
    left_behind = (proc.data_dir / "valkey.pid").read_text().strip()
    proc.proc.kill()
    await proc.proc.wait()
    assert Path(f"/proc/{left_behind}").exists()  # the killed service could not stop it
    await proc.start()
    assert not Path(f"/proc/{left_behind}").exists()  # the new start stopped it first
    async with grpc.aio.insecure_channel(proc.target) as ch:
        licenses = lgrpc.LicenseServiceStub(ch)
        assert (
            await licenses.GetPolicy(lpb.GetPolicyRequest(id=policy.id), metadata=token)
        ).policy.id == policy.id
    code, _ = await proc.terminate()
    assert code == 0


async def test_unreachable_store_gives_unavailable_and_not_serving(tmp_path: Path) -> None:
    port = _free_port()  # nothing listens there
    settings = Settings(
        listen="127.0.0.1:0",
        redis_url=f"redis://127.0.0.1:{port}/0",
        data_dir=tmp_path,
        admin_tokens=["t"],
        redis_timeout_s=0.5,
    )
    service, bound = await build_server(settings)
    await service.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{bound}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            r = await health.Check(health_pb2.HealthCheckRequest())
            assert r.status == health_pb2.HealthCheckResponse.NOT_SERVING
            usage = ugrpc.UsageServiceStub(ch)
            err = await expect_error(
                usage.IncrementUsage(
                    upb.IncrementUsageRequest(license_id="x"),
                    metadata=(("authorization", "Bearer t"),),
                )
            )
            assert err.code == grpc.StatusCode.UNAVAILABLE
            assert err.reason == "STORAGE_UNAVAILABLE"
            assert err.metadata["outcome"] == "not_applied"
            assert err.retry_delay_ms is not None and err.retry_delay_ms > 0
    finally:
        await service.stop(0)


@pytest.mark.slow
async def test_sigterm_drains_in_flight_increments(proc: ServiceProcess) -> None:
    """Increments keep arriving while SIGTERM lands: every call that was counted was answered
    OK (in-flight calls finish), and every OK is counted (read back after a restart)."""
    await proc.start()
    token = proc.token()
    async with grpc.aio.insecure_channel(proc.target) as ch:
        licenses = lgrpc.LicenseServiceStub(ch)
        policy = (
            await licenses.CreatePolicy(
                lpb.CreatePolicyRequest(policy=policy_pb2.Policy()), metadata=token
            )
        ).policy
        lic = (
            await licenses.CreateLicense(
                lpb.CreateLicenseRequest(license={"policy_id": policy.id}), metadata=token
            )
        ).license
    ok = 0
    refused: list[grpc.StatusCode] = []
    stop = asyncio.Event()

    async def caller(usage: ugrpc.UsageServiceStub) -> None:
        nonlocal ok
        while not stop.is_set():
            try:
                await usage.IncrementUsage(
                    upb.IncrementUsageRequest(license_id=lic.id), metadata=token, timeout=5
                )
            except grpc.aio.AioRpcError as exc:
                refused.append(exc.code())
                return
            ok += 1

    channels = [grpc.aio.insecure_channel(proc.target) for _ in range(4)]
    try:
        callers = [
            asyncio.ensure_future(caller(ugrpc.UsageServiceStub(channels[i % 4])))
            for i in range(32)
        ]
        for _ in range(400):  # SIGTERM once calls are flowing
            if ok >= 50:
                break
            await asyncio.sleep(0.05)
        assert ok > 0
        code, log = await proc.terminate()
        stop.set()
        await asyncio.gather(*callers)
    finally:
        for c in channels:
            await c.close()
    assert code == 0, log
    assert "draining" in log
    # Calls that reach a stopping server are refused (gRPC answers CANCELLED or UNAVAILABLE);
    # the counts below show that none of them was counted.
    assert set(refused) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, refused
    await proc.start()
    async with grpc.aio.insecure_channel(proc.target) as ch:
        got = await ugrpc.UsageServiceStub(ch).GetUsage(
            upb.GetUsageRequest(license_id=lic.id), metadata=token
        )
    assert got.uses == ok
    await proc.terminate()
