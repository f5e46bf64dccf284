"""Configuration: every METER_* environment variable is read here, and only here (SPEC §7)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from meter_grpc.domain import failpoints
from meter_grpc.domain.clock import Clock, SystemClock


class ConfigError(ValueError):
    """A METER_* variable has a value the service cannot use."""


@dataclass(slots=True)
class Settings:
    listen: str = "127.0.0.1:50051"
    redis_url: str = ""
    data_dir: Path = Path("./var")
    admin_tokens: list[str] = field(default_factory=list)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    metrics_listen: str = ""
    signing_key_file: Path | None = None
    redis_timeout_s: float = 5.0
    shutdown_grace_s: float = 10.0
    log_level: str = "INFO"
    # Testing only: failpoints armed from METER_FAILPOINTS (domain/failpoints.py).
    failpoints: dict[str, str] = field(default_factory=dict)
    clock: Clock = field(default_factory=SystemClock)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env

        def get(name: str, default: str = "") -> str:
            return env.get(name, default).strip()

        def path(name: str) -> Path | None:
            value = get(name)
            return Path(value) if value else None

        def number(name: str, default: str, kind: type[int] | type[float]) -> float:
            raw = get(name, default)
            try:
                value = kind(raw)
            except ValueError:
                raise ConfigError(f"{name}={raw!r} is not a number") from None
            if value <= 0:
                raise ConfigError(f"{name} must be positive")
            return value

        settings = cls(
            listen=get("METER_LISTEN") or "127.0.0.1:50051",
            redis_url=get("METER_REDIS_URL"),
            data_dir=Path(get("METER_DATA_DIR") or "./var"),
            admin_tokens=[t.strip() for t in get("METER_ADMIN_TOKENS").split(",") if t.strip()],
            tls_cert=path("METER_TLS_CERT"),
            tls_key=path("METER_TLS_KEY"),
            tls_client_ca=path("METER_TLS_CLIENT_CA"),
            metrics_listen=get("METER_METRICS_LISTEN"),
            signing_key_file=path("METER_SIGNING_KEY_FILE"),
            redis_timeout_s=number("METER_REDIS_TIMEOUT", "5", float),
            shutdown_grace_s=number("METER_SHUTDOWN_GRACE", "10", float),
            log_level=(get("METER_LOG_LEVEL") or "INFO").upper(),
        )
        try:
            settings.failpoints = failpoints.parse(get("METER_FAILPOINTS"))
        except ValueError as exc:
            raise ConfigError(f"METER_FAILPOINTS: {exc}") from None
        if bool(settings.tls_cert) != bool(settings.tls_key):
            raise ConfigError("METER_TLS_CERT and METER_TLS_KEY must be set together")
        if settings.tls_client_ca and not settings.tls_cert:
            raise ConfigError("METER_TLS_CLIENT_CA needs METER_TLS_CERT and METER_TLS_KEY")
        return settings
