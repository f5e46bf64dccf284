"""What the benchmarks share: a meter-grpc server in this process (its own embedded valkey in
a temporary data dir, an admin token, a channel to it: bench/keycheck.py, propagation.py,
list_machines.py), and servers in processes of their own (a free port, spawning one, waiting
until it serves: bench/bench.py, memory.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from meter_grpc.config import Settings
from meter_grpc.server import Service, build_server

ROOT = Path(__file__).resolve().parent.parent
MD = (("authorization", "Bearer bench"),)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`python args...` with src/ importable and `env` over this process's environment."""
    return subprocess.Popen(
        [sys.executable, *args],
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def wait_serving(target: str, health: bool) -> None:
    """Until `target` answers: health SERVING (meter-grpc), or any answer to GetUsage (the bare
    servers, which have no health service)."""
    async with grpc.aio.insecure_channel(target) as ch:
        for _ in range(600):
            try:
                if health:
                    r = await health_pb2_grpc.HealthStub(ch).Check(
                        health_pb2.HealthCheckRequest(), timeout=1
                    )
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                else:
                    await ugrpc.UsageServiceStub(ch).GetUsage(upb.GetUsageRequest(), timeout=1)
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{target} did not come up")


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[tuple[Service, grpc.aio.Channel]]:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(listen="127.0.0.1:0", data_dir=Path(tmp), admin_tokens=["bench"])
        service, port = await build_server(settings)
        await service.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                yield service, channel
        finally:
            await service.stop(1)
