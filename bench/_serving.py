"""A meter-grpc server for a benchmark: its own embedded valkey in a temporary data dir, an
admin token, and a channel to it (shared by bench/keycheck.py, propagation.py,
list_machines.py)."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from meter_grpc.config import Settings
from meter_grpc.server import Service, build_server

MD = (("authorization", "Bearer bench"),)


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
