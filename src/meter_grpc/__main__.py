"""`python -m meter_grpc`: serve until SIGTERM or SIGINT, then drain and stop."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from meter_grpc.config import ConfigError, Settings
from meter_grpc.server import build_server


async def serve(settings: Settings) -> None:
    service, _ = await build_server(settings)
    await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logging.getLogger("meter_grpc").info("shutting down: draining in-flight calls")
    await service.stop()


def main() -> None:
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"meter-grpc: {exc}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))


if __name__ == "__main__":
    main()
