"""`meter-grpc` / `python -m meter_grpc`: the command line (meter_grpc/cli.py); `serve`, the
default, serves until SIGTERM, SIGINT or SIGHUP, then drains and stops.

The three signals mean the same thing (a terminal's Ctrl-C and hang-up, a supervisor's
stop): stop taking calls, let the calls in flight finish within METER_SHUTDOWN_GRACE, then
close the store and stop the embedded valkey (which runs in its own session, so a signal to
the service's process group never reaches it directly). A second signal during the drain
cuts it short: the calls still in flight are cancelled (their clients see CANCELLED and
must treat the outcome as unknown; what was acknowledged is on disk), then the store is
stopped as usual. Further signals are ignored while that completes.

Exit status of `serve`: 0 after a signal-initiated stop; 1 when another instance owns the
data dir (one line on stderr naming its pid, nothing touched); 2 for a bad configuration (one
line on stderr naming the variable, what is wrong and what is expected; nothing created).
"""

from __future__ import annotations

import os

# The service forks only to exec valkey (the embedded store, restarted when it dies): gRPC's
# fork handlers, meant for children that go on using gRPC, would only log about being
# skipped at each restart. Read when gRPC initializes, so before it is imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import asyncio
import errno
import logging
import signal
import sys
from collections.abc import Sequence

from meter_grpc import cli
from meter_grpc.config import ConfigError, Settings
from meter_grpc.domain.keysecret import KeySecretError
from meter_grpc.domain.signing import SigningKeyError
from meter_grpc.server import build_server
from meter_grpc.storage.embedded import DataDirLocked
from meter_grpc.storage.migrate import KeySecretMismatch

log = logging.getLogger("meter_grpc")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


async def serve(settings: Settings) -> None:
    loop = asyncio.get_running_loop()
    received: list[signal.Signals] = []
    stop = asyncio.Event()
    cut_short = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        if len(received) == 1:
            stop.set()
        elif len(received) == 2:
            cut_short.set()
        else:
            log.warning("%s: already stopping", sig.name)

    # Before anything starts, so that a signal during start-up still stops everything that
    # start-up began (the embedded valkey included) instead of killing the process.
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    service, _ = await build_server(settings)
    if not stop.is_set():
        await service.start()
        await stop.wait()
    log.info(
        "%s: shutting down: draining in-flight calls (up to %g s; a second signal cuts it short)",
        received[0].name,
        settings.shutdown_grace_s,
    )
    stopping = asyncio.ensure_future(service.stop())
    cut = asyncio.ensure_future(cut_short.wait())
    await asyncio.wait((stopping, cut), return_when=asyncio.FIRST_COMPLETED)
    if cut.done() and not stopping.done():
        log.warning("%s again: cancelling the calls still in flight", received[1].name)
        await service.server.stop(0)  # the most restrictive grace wins: service.stop() ends
    cut.cancel()
    await stopping


def main(argv: Sequence[str] | None = None) -> None:
    args = cli.parse(sys.argv[1:] if argv is None else argv)
    if args.command in (None, "serve"):
        run_server()
    else:
        cli.run(args)


def run_server() -> None:
    try:
        settings = Settings.from_env()
        settings.check_files()
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
        run = asyncio.run
    else:
        run = uvloop.run
    try:
        run(serve(settings))
    except DataDirLocked as exc:
        print(f"meter-grpc: {exc}", file=sys.stderr)
        sys.exit(1)
    except RuntimeError as exc:
        if not str(exc).startswith(("cannot listen on", "Failed to bind")):
            raise
        print(
            f"meter-grpc: METER_LISTEN={settings.listen!r}: cannot listen there (the port is "
            "in use, or the address is not this host's): expected a free HOST:PORT",
            file=sys.stderr,
        )
        sys.exit(2)
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL) or not settings.metrics_listen:
            raise
        print(
            f"meter-grpc: METER_METRICS_LISTEN={settings.metrics_listen!r}: cannot listen there "
            f"({exc.strerror}): expected a free HOST:PORT",
            file=sys.stderr,
        )
        sys.exit(2)
    except SigningKeyError as exc:  # check_files saw it fine: the file changed since
        print(f"meter-grpc: METER_SIGNING_KEY_FILE: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeySecretError as exc:  # check_files saw it fine: the file changed since
        print(f"meter-grpc: METER_KEY_SECRET_FILE: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeySecretMismatch as exc:
        print(f"meter-grpc: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
