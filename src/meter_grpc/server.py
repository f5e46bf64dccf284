"""build_server(settings): the one factory that `python -m meter_grpc` and the tests share."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from meter.v1 import (
    license_service_pb2,
    license_service_pb2_grpc,
    usage_service_pb2,
    usage_service_pb2_grpc,
)
from meter_grpc.api import auth, reflection
from meter_grpc.api.auth import Authenticator
from meter_grpc.api.interceptor import MeterInterceptor
from meter_grpc.api.license_service import LicenseService
from meter_grpc.api.metrics import Metrics
from meter_grpc.api.usage_service import UsageService
from meter_grpc.config import Settings, mask_url
from meter_grpc.domain import failpoints
from meter_grpc.domain.errors import MeterError, Reason
from meter_grpc.domain.keysecret import KeySecret
from meter_grpc.domain.licensing import Licensing
from meter_grpc.domain.machines import Machines
from meter_grpc.domain.metering import Metering
from meter_grpc.domain.offline import LicenseFiles
from meter_grpc.domain.signing import Signer
from meter_grpc.domain.validation import Validator
from meter_grpc.export.exporter import Exporter, sinks_of
from meter_grpc.export.model import Sink
from meter_grpc.storage import migrate
from meter_grpc.storage.commands import RedisClient
from meter_grpc.storage.embedded import EmbeddedServer
from meter_grpc.storage.store import LISTPACK_VALUE_NEEDED, RedisStore
from meter_grpc.tasks import cancel_and_wait

log = logging.getLogger("meter_grpc")

SERVICE_NAMES = (
    license_service_pb2.DESCRIPTOR.services_by_name["LicenseService"].full_name,
    usage_service_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name,
)
HEALTH_PROBE_INTERVAL_S = 1.0


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    """The gRPC core options of the server's bounds (README "Limits and bounds")."""

    def ms(seconds: float) -> int:
        return max(1, round(seconds * 1000))

    return [
        ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
        ("grpc.so_reuseport", 0),
        # The server pings a connection every keepalive_time (with or without calls) and
        # closes it when no ack comes within keepalive_timeout, ending its calls: a silent peer
        # does not hold a connection or a call slot. (grpc core enforces the ack timeout
        # through ping_timeout; keepalive_timeout alone does not close the connection.)
        ("grpc.keepalive_time_ms", ms(settings.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", ms(settings.keepalive_timeout_s)),
        ("grpc.http2.ping_timeout_ms", ms(settings.keepalive_timeout_s)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Clients may ping this often (also without calls); more often is a ping strike, and
        # two strikes close the connection (GOAWAY too_many_pings).
        ("grpc.http2.min_ping_interval_without_data_ms", ms(settings.min_client_ping_interval_s)),
        # Connections are recycled (GOAWAY) after max_connection_age (+-10% jitter), so load
        # spreads over new replicas; calls still running get the grace, then are cancelled.
        ("grpc.max_connection_age_ms", ms(settings.max_connection_age_s)),
        ("grpc.max_connection_age_grace_ms", ms(settings.max_connection_age_grace_s)),
    ]


def admin_tokens(settings: Settings) -> list[str]:
    """METER_ADMIN_TOKENS, or one token kept in METER_DATA_DIR/admin-token (created once)."""
    if settings.admin_tokens:
        return settings.admin_tokens
    path = settings.data_dir / "admin-token"
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        log.info("generated an admin token in %s", path.resolve())
    else:
        log.info("admin token: %s", path.resolve())
    return [path.read_text().strip()]


def _server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert or not settings.tls_key:
        return None
    ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


@dataclass
class Service:
    """A built meter-grpc server with everything it owns."""

    server: aio.Server
    port: int
    settings: Settings
    store: RedisStore
    licensing: Licensing
    metering: Metering
    health: HealthServicer
    embedded: EmbeddedServer | None = None
    metrics: Metrics | None = None
    metrics_port: int | None = None
    license_files: LicenseFiles | None = None
    exporter: Exporter | None = None
    secret: KeySecret | None = None
    # False while the key secret check and migration (storage/migrate.py) have not run
    prepared: bool = True
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> None:
        await self.server.start()
        if not self.prepared:
            self._tasks.append(asyncio.create_task(self._prepare_later(), name="meter-migrate"))
        self._tasks.append(asyncio.create_task(self._watch_storage(), name="meter-health"))
        self._tasks.append(
            asyncio.create_task(self.licensing.propagator.run(), name="meter-propagation")
        )
        self._tasks.append(asyncio.create_task(self._migrate(), name="meter-policy-copies"))
        if self.exporter is not None:
            self.exporter.start()
        log.info("meter-grpc serving on port %d", self.port)

    async def _migrate(self) -> None:
        """Licenses written by earlier versions lose their copy of the whole policy (memory
        only: reads ignore it); retried while the store is unreachable."""
        while True:
            try:
                dropped = await self.store.drop_legacy_policy_copies()
            except MeterError:
                await asyncio.sleep(HEALTH_PROBE_INTERVAL_S)
                continue
            except Exception:  # memory only: serving goes on, the next start tries again
                log.warning("license migration failed; retried on the next start", exc_info=True)
                return
            if dropped:
                log.info("migrated %d licenses: policy copies removed", dropped)
            break
        with contextlib.suppress(Exception):
            limits = await self.store.listpack_value_limits()
            if any(n < LISTPACK_VALUE_NEEDED for n in limits):
                log.warning(
                    "the store's hash-max-listpack-value is %d, below %d: license hashes are "
                    "stored as hashtables, about twice the memory; set "
                    "hash-max-listpack-value %d in its configuration",
                    min(limits),
                    LISTPACK_VALUE_NEEDED,
                    LISTPACK_VALUE_NEEDED,
                )

    async def _prepare_later(self) -> None:
        """The secret check and key migration of a start the store did not answer; a secret
        mismatch found now stops the server (SIGTERM) as it would have refused to start."""
        assert self.secret is not None
        while not self.prepared:
            await asyncio.sleep(HEALTH_PROBE_INTERVAL_S)
            try:
                self.prepared = await _prepare(self.store, self.secret)
            except migrate.KeySecretMismatch as exc:
                log.critical("%s: stopping", exc)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    async def _set_health(
        self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType
    ) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def _watch_storage(self) -> None:
        """SERVING only while Redis answers."""
        serving: bool | None = None
        while True:
            error = "no answer"
            try:
                async with asyncio.timeout(self.settings.redis_timeout_s):
                    ok = await self.store.ping()
            except Exception as exc:
                ok, error = False, f"{type(exc).__name__}: {exc}".rstrip(": ")
            if ok != serving:
                serving = ok
                status = (
                    health_pb2.HealthCheckResponse.SERVING
                    if ok
                    else health_pb2.HealthCheckResponse.NOT_SERVING
                )
                await self._set_health(status)
                where = mask_url(self.settings.redis_url) or f"embedded in {self.settings.data_dir}"
                log.log(
                    logging.INFO if ok else logging.WARNING,
                    "storage %s",
                    f"reachable ({where})" if ok else f"unreachable ({where}): {error}",
                )
            await asyncio.sleep(HEALTH_PROBE_INTERVAL_S)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain in-flight calls, then close the pool and the embedded store."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.shutdown_grace_s if grace_s is None else grace_s)
        await cancel_and_wait(self._tasks)
        if self.exporter is not None:
            await self.exporter.close()  # what it read unacknowledged is read again later
        await self.licensing.propagator.close()  # pending marks let the next start resume
        await self.metering.close()  # WatchUsage streams still blocked in the store
        await self.store.close()
        if self.license_files is not None:
            self.license_files.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.embedded is not None:
            await self.embedded.stop()
        log.info("meter-grpc stopped")


async def build_server(
    settings: Settings, *, extra_sinks: Sequence[Sink] = ()
) -> tuple[Service, int]:
    """Connects the store (starting the embedded one if no URL is set) and builds the server.
    `extra_sinks`: export sinks besides those the settings configure (tests).

    Returns the service (not started yet) and the bound port.
    """
    embedded = None if settings.redis_url else EmbeddedServer(Path(settings.data_dir))
    if embedded is not None:
        embedded.lock()  # first: a second instance on the data dir stops here, touching nothing
    failpoints.arm(settings.failpoints)
    signer = Signer.configured(settings.signing_key_file, settings.data_dir)
    secret = KeySecret.configured(settings.key_secret_file, settings.data_dir)
    url = settings.redis_url
    if embedded is not None:
        url = await embedded.start()
    store: RedisStore | None = None
    metrics: Metrics | None = None
    # Usage export: the outbox is written only when at least one sink is configured.
    sinks = [*sinks_of(settings), *extra_sinks]
    exporter: Exporter | None = None
    try:
        # One pipelined connection per node for every command; blocking reads (WatchUsage:
        # one per watched license, shared by its watchers) take dedicated connections from
        # the transport's bounded pool.
        store = RedisStore(
            RedisClient(
                url,
                timeout_s=settings.redis_timeout_s,
                max_inflight=settings.redis_max_inflight,
            ),
            event_retention=settings.event_retention,
            export=bool(sinks),
            event_retention_age_ms=round(settings.event_retention_age_s * 1000),
        )
        with contextlib.suppress(Exception):
            await store.client.ping()  # connect (and load the slot map) now, not on a request
        if sinks:
            exporter = Exporter(
                store,
                sinks,
                lease_s=settings.export_lease_s,
                dead_letters_max=settings.export_dead_letters_max,
                backoff_max_s=settings.export_backoff_max_s,
                sweep_s=settings.export_sweep_s,
            )
        prepared = await _prepare(store, secret)
        licensing = Licensing(store, settings.clock, secret)
        metering = Metering(
            store,
            settings.clock,
            watch_per_key=settings.watch_per_key,
            watch_max=settings.watch_max,
            max_reservations=settings.max_reservations_per_license,
        )
        authenticator = Authenticator(
            admin_tokens(settings), licensing.key_holder, settings.clock, licensing.key_digest
        )
        licensing.on_key_claimed = authenticator.key_claimed

        metrics = Metrics() if settings.metrics_listen else None
        if exporter is not None:
            exporter.metrics = metrics
        server = aio.server(
            interceptors=[MeterInterceptor(authenticator, metrics)],
            options=grpc_options(settings),
            # Beyond this many calls in progress (streams included), a new call is answered
            # RESOURCE_EXHAUSTED at once by gRPC core.
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )
        machines = Machines(store, settings.clock, settings.max_machines_per_license)
        license_files = LicenseFiles(
            licensing,
            machines,
            signer,
            workers=settings.checkout_workers,
            max_file_bytes=settings.max_license_file_bytes,
        )
        # auth.guard: an RPC refuses a call no interceptor authenticated (deny by default)
        license_service_pb2_grpc.add_LicenseServiceServicer_to_server(
            auth.guard(
                LicenseService(
                    licensing,
                    machines=machines,
                    validator=Validator(store, settings.clock, licensing.key_digest),
                    license_files=license_files,
                ),
                license_service_pb2.DESCRIPTOR.services_by_name["LicenseService"],
            ),
            server,
        )
        usage_service_pb2_grpc.add_UsageServiceServicer_to_server(
            auth.guard(
                UsageService(metering, exporter),
                usage_service_pb2.DESCRIPTOR.services_by_name["UsageService"],
            ),
            server,
        )
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                *reflection.SERVICE_NAMES,
            ),
            server,
        )
        for name in ("", *SERVICE_NAMES):
            await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        metrics_port = None
        if metrics is not None:
            metrics_port = metrics.serve(settings.metrics_listen)
            log.info(
                "metrics on http://%s:%d/metrics",
                settings.metrics_listen.rpartition(":")[0],
                metrics_port,
            )
        creds = _server_credentials(settings)
        if creds is None:
            port = server.add_insecure_port(settings.listen)
        else:
            port = server.add_secure_port(settings.listen, creds)
        if port == 0:
            raise RuntimeError(f"cannot listen on {settings.listen}")
    except BaseException:
        # Close what was opened, so a failed start leaks no connection, port or process.
        if metrics is not None:
            metrics.close()
        if store is not None:
            await store.close()
        if embedded is not None:
            await embedded.stop()
        raise
    service = Service(
        server,
        port,
        settings,
        store,
        licensing,
        metering,
        health,
        embedded,
        metrics,
        metrics_port,
        license_files,
    )
    service.secret, service.prepared = secret, prepared
    service.exporter = exporter
    return service, port


async def _prepare(store: RedisStore, secret: KeySecret) -> bool:
    """The key secret's check and the migration of keys stored in clear (storage/migrate.py),
    before the server serves. False when the store did not answer (Service.start retries in
    the background); KeySecretMismatch when the secret is not the one of this Redis."""
    try:
        await migrate.prepare(store, secret)
    except MeterError as exc:
        if exc.reason != Reason.STORAGE_UNAVAILABLE:
            raise
        log.warning("storage unreachable: the key secret check and key migration run once it is")
        return False
    return True
