"""Configuration: every METER_* environment variable is read here, and only here (SPEC §7)."""

from __future__ import annotations

import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from meter_grpc.domain import failpoints
from meter_grpc.domain.clock import Clock, SystemClock
from meter_grpc.domain.watching import DEFAULT_WATCH_MAX, DEFAULT_WATCH_PER_KEY


class ConfigError(ValueError):
    """A METER_* variable has a value the service cannot use: the message is one line naming
    the variable, what is wrong and what is expected."""


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
REDIS_SCHEMES = (
    "redis://HOST:PORT[/DB]",
    "rediss://HOST:PORT[/DB]",
    "unix:///PATH",
    "redis+cluster://HOST:PORT,HOST:PORT,...",
    "rediss+cluster://HOST:PORT,...",
)
_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
_HOST_PORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.%\w]+\]|[^\s:\[\]/]*):(?P<port>\d{1,5})$")


def check_host_port(name: str, value: str, example: str, *, empty_host: bool) -> None:
    """HOST:PORT (an IPv6 host in brackets); `empty_host` also takes :PORT (every interface)."""
    if name == "METER_LISTEN" and value.startswith(("unix:", "unix-abstract:")):
        return
    m = _HOST_PORT.match(value)
    if m is None or int(m["port"]) > 65535 or (not m["host"] and not empty_host):
        also = " or :PORT" if empty_host else " or unix:PATH"
        raise ConfigError(
            f"{name}={value!r} is not an address: expected HOST:PORT{also} (e.g. {example})"
        )


def mask_url(url: str) -> str:
    """The URL with its password (if any) replaced by ***, for logs and error messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        userinfo, at, hosts = url.rpartition("@")
        return f"***@{hosts}" if at else url
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.partition(":")[0] + ":***"
    elif at and userinfo:
        userinfo = "***"  # redis://PASSWORD@host is read as a password alone by many clients
    return f"{scheme}{sep}{userinfo}{at}{hosts}{slash}{tail}"


def check_redis_url(value: str) -> None:
    scheme, sep, _ = value.partition("://")
    expected = f"expected one of {', '.join(REDIS_SCHEMES)} (or empty for the embedded store)"
    if not sep:
        raise ConfigError(f"METER_REDIS_URL={mask_url(value)!r} has no scheme: {expected}")
    if scheme.lower() not in _SCHEMES:
        raise ConfigError(
            f"METER_REDIS_URL={mask_url(value)!r}: unsupported scheme {scheme!r}: {expected}"
        )


OWN_COUNTER = "uses"  # how the export mappings name a license's own counter (meter "")


@dataclass(frozen=True, slots=True)
class LagoExport:
    """METER_EXPORT_LAGO_*: events to `<url>/api/v1/events/batch`."""

    url: str  # the API base, e.g. https://api.getlago.com
    api_key: str = field(repr=False)
    subscription_key: str = "external_subscription_id"  # license metadata key
    codes: Mapping[str, str] = field(default_factory=dict)  # meter -> billable metric code


@dataclass(frozen=True, slots=True)
class M3terExport:
    """METER_EXPORT_M3TER_*: measurements to `<url>/organizations/<org_id>/measurements`."""

    org_id: str
    access_key_id: str
    api_secret: str = field(repr=False)
    url: str = "https://ingest.m3ter.com"
    token_url: str = "https://api.m3ter.com/oauth/token"
    account_key: str = "m3ter_account"  # license metadata key holding the account code
    meters: Mapping[str, str] = field(default_factory=dict)  # meter -> m3ter meter code


@dataclass(frozen=True, slots=True)
class OpenMeterExport:
    """METER_EXPORT_OPENMETER_*: CloudEvents batches to `<url>/api/v1/events`."""

    url: str  # e.g. https://openmeter.cloud
    token: str = field(default="", repr=False)  # empty: no Authorization header
    source: str = "meter-grpc"
    subject_key: str = "openmeter_subject"  # license metadata key
    type: str = "license.usage"  # CloudEvents type of every event not in `types`
    types: Mapping[str, str] = field(default_factory=dict)  # meter -> type


@dataclass(frozen=True, slots=True)
class StripeExport:
    """METER_EXPORT_STRIPE_*: meter events to `<url>/v1/billing/meter_events`."""

    api_key: str = field(repr=False)
    url: str = "https://api.stripe.com"
    customer_key: str = "stripe_customer_id"  # license metadata key
    event_names: Mapping[str, str] = field(default_factory=dict)  # meter -> event_name
    value: str = "delta"  # what payload[value] carries: "delta" (sum meters) or "uses" (last)


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
    # 32 random bytes (or 64 hex digits): license keys are stored as HMACs under it
    key_secret_file: Path | None = None
    redis_timeout_s: float = 5.0
    shutdown_grace_s: float = 10.0
    # Usage events kept per license for WatchUsage (at least the newest N); 0 = none written.
    event_retention: int = 1000
    event_retention_age_s: float = 0.0  # 0: events are kept by count only
    log_level: str = "INFO"
    # WatchUsage streams open at once: per license key, and in the whole process (admin too).
    watch_per_key: int = DEFAULT_WATCH_PER_KEY
    watch_max: int = DEFAULT_WATCH_MAX
    # Bounds (README "Limits and bounds").
    max_machines_per_license: int = 10_000
    max_reservations_per_license: int = 1_000
    max_concurrent_rpcs: int = 10_000
    max_receive_message_bytes: int = 4 * 1024 * 1024
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    min_client_ping_interval_s: float = 10.0
    max_connection_age_s: float = 1800.0
    max_connection_age_grace_s: float = 300.0
    checkout_workers: int = 2
    max_license_file_bytes: int = 32 * 1024 * 1024
    redis_max_inflight: int = 10_000
    # Billing sinks (export/sinks/): each None unless configured.
    export_lago: LagoExport | None = None
    export_m3ter: M3terExport | None = None
    export_openmeter: OpenMeterExport | None = None
    export_stripe: StripeExport | None = None
    export_http_timeout_s: float = 30.0  # one call to a billing system, connecting included
    # Usage export (export/exporter.py): the NDJSON sink's file ("-" = stdout, "" = off) and
    # its CloudEvents source; how long a dead replica's outbox buckets wait before another
    # replica takes them over; dead letters kept per sink.
    export_ndjson: str = ""
    export_ndjson_source: str = "meter-grpc"
    export_lease_s: float = 10.0
    export_dead_letters_max: int = 100_000
    # The longest wait before a failed delivery is retried (METER_EXPORT_BACKOFF_MAX), and how
    # often the registry of outbox streams is read again (set by tests; no variable).
    export_backoff_max_s: float = 60.0
    export_sweep_s: float = 10.0
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
            expected = f"expected a number of seconds > 0 (default {default})"
            try:
                value = kind(raw)
            except ValueError:
                raise ConfigError(f"{name}={raw!r} is not a number: {expected}") from None
            if value <= 0 or not math.isfinite(value):
                raise ConfigError(f"{name}={raw!r} is out of range: {expected}")
            return value

        def count(name: str, default: int, *, minimum: int = 1) -> int:
            raw = get(name, str(default))
            expected = f"expected a whole number >= {minimum} (default {default})"
            digits = raw.replace("_", "")
            if not digits.isdigit() or len(digits) > 9:
                why = "is not a whole number" if not digits.isdigit() else "is out of range"
                raise ConfigError(f"{name}={raw!r} {why}: {expected}")
            value = int(digits)
            if value < minimum:
                raise ConfigError(f"{name}={raw!r} is out of range: {expected}")
            return value

        listen = get("METER_LISTEN") or "127.0.0.1:50051"
        check_host_port("METER_LISTEN", listen, "127.0.0.1:50051, [::]:50051", empty_host=False)
        redis_url = get("METER_REDIS_URL")
        if redis_url:
            check_redis_url(redis_url)
        metrics_listen = get("METER_METRICS_LISTEN")
        if metrics_listen:
            check_host_port(
                "METER_METRICS_LISTEN", metrics_listen, "127.0.0.1:9100", empty_host=True
            )
        log_level = (get("METER_LOG_LEVEL") or "INFO").upper()
        if log_level == "WARN":
            log_level = "WARNING"
        if log_level not in LOG_LEVELS:
            raise ConfigError(
                f"METER_LOG_LEVEL={get('METER_LOG_LEVEL')!r} is not a log level: "
                f"expected one of {', '.join(LOG_LEVELS)}"
            )
        admin_tokens = [t.strip() for t in get("METER_ADMIN_TOKENS").split(",") if t.strip()]
        if any(not t.isprintable() or any(ch.isspace() for ch in t) for t in admin_tokens):
            raise ConfigError(
                "METER_ADMIN_TOKENS has a token with a space or control character: "
                "expected comma-separated tokens of printable characters"
            )

        settings = cls(
            listen=listen,
            redis_url=redis_url,
            data_dir=Path(get("METER_DATA_DIR") or "./var"),
            admin_tokens=admin_tokens,
            tls_cert=path("METER_TLS_CERT"),
            tls_key=path("METER_TLS_KEY"),
            tls_client_ca=path("METER_TLS_CLIENT_CA"),
            metrics_listen=metrics_listen,
            signing_key_file=path("METER_SIGNING_KEY_FILE"),
            key_secret_file=path("METER_KEY_SECRET_FILE"),
            redis_timeout_s=number("METER_REDIS_TIMEOUT", "5", float),
            shutdown_grace_s=number("METER_SHUTDOWN_GRACE", "10", float),
            log_level=log_level,
            event_retention=_event_retention(get("METER_EVENT_RETENTION")),
            event_retention_age_s=_event_retention_age(get("METER_EVENT_RETENTION_AGE")),
            watch_per_key=count("METER_WATCH_PER_KEY", DEFAULT_WATCH_PER_KEY),
            watch_max=count("METER_WATCH_MAX", DEFAULT_WATCH_MAX),
            max_machines_per_license=count("METER_MAX_MACHINES_PER_LICENSE", 10_000),
            max_reservations_per_license=count("METER_MAX_RESERVATIONS_PER_LICENSE", 1_000),
            max_concurrent_rpcs=count("METER_MAX_CONCURRENT_RPCS", 10_000),
            max_receive_message_bytes=count(
                "METER_MAX_RECEIVE_MESSAGE_BYTES", 4 * 1024 * 1024, minimum=64 * 1024
            ),
            keepalive_time_s=number("METER_KEEPALIVE_TIME", "60", float),
            keepalive_timeout_s=number("METER_KEEPALIVE_TIMEOUT", "20", float),
            min_client_ping_interval_s=number("METER_MIN_CLIENT_PING_INTERVAL", "10", float),
            max_connection_age_s=number("METER_MAX_CONNECTION_AGE", "1800", float),
            max_connection_age_grace_s=number("METER_MAX_CONNECTION_AGE_GRACE", "300", float),
            checkout_workers=count("METER_CHECKOUT_WORKERS", 2),
            max_license_file_bytes=count(
                "METER_MAX_LICENSE_FILE_BYTES", 32 * 1024 * 1024, minimum=64 * 1024
            ),
            redis_max_inflight=count("METER_REDIS_MAX_INFLIGHT", 10_000, minimum=16),
            export_ndjson=get("METER_EXPORT_NDJSON"),
            export_ndjson_source=get("METER_EXPORT_NDJSON_SOURCE") or "meter-grpc",
            export_lease_s=number("METER_EXPORT_LEASE", "10", float),
            export_dead_letters_max=count("METER_EXPORT_DEAD_LETTERS_MAX", 100_000),
        )
        settings.export_http_timeout_s = number("METER_EXPORT_HTTP_TIMEOUT", "30", float)
        settings.export_backoff_max_s = number("METER_EXPORT_BACKOFF_MAX", "60", float)
        _read_sinks(settings, get)
        try:
            settings.failpoints = failpoints.parse(get("METER_FAILPOINTS"))
        except ValueError as exc:
            raise ConfigError(f"METER_FAILPOINTS: {exc}") from None
        if bool(settings.tls_cert) != bool(settings.tls_key):
            raise ConfigError(
                "METER_TLS_CERT and METER_TLS_KEY must be set together: "
                "expected both (PEM certificate chain and private key) or neither"
            )
        if settings.tls_client_ca and not settings.tls_cert:
            raise ConfigError(
                "METER_TLS_CLIENT_CA needs METER_TLS_CERT and METER_TLS_KEY: "
                "mutual TLS is TLS with a client CA"
            )
        return settings

    def check_files(self) -> None:
        """What from_env cannot see: files that must be readable and hold what they should,
        the data dir that must be (or become) a writable directory, a Redis URL's options.
        Reads only, creates nothing; raises ConfigError (one line) on the first problem."""
        if self.redis_url:
            from meter_grpc.storage.transport import parse_url

            try:
                parse_url(self.redis_url)
            except (ValueError, OSError) as exc:
                raise ConfigError(
                    f"METER_REDIS_URL={mask_url(self.redis_url)!r} is not usable: "
                    f"{_one_line(exc)}: expected e.g. redis://:PASSWORD@HOST:6379/0"
                ) from None
        for name, file, kind in (
            ("METER_TLS_CERT", self.tls_cert, "certificate"),
            ("METER_TLS_KEY", self.tls_key, "key"),
            ("METER_TLS_CLIENT_CA", self.tls_client_ca, "certificate"),
            ("METER_SIGNING_KEY_FILE", self.signing_key_file, "ed25519"),
        ):
            if file is not None:
                _check_pem(name, file, kind)
        if self.key_secret_file is not None:
            from meter_grpc.domain.keysecret import KeySecret, KeySecretError

            try:
                KeySecret.load(self.key_secret_file)
            except KeySecretError as exc:
                raise ConfigError(f"METER_KEY_SECRET_FILE: {_one_line(exc)}") from None
        _check_bindable("METER_LISTEN", self.listen)
        if self.metrics_listen:
            _check_bindable("METER_METRICS_LISTEN", self.metrics_listen)
        uses_data_dir = (
            not self.redis_url
            or self.signing_key_file is None
            or self.key_secret_file is None
            or not self.admin_tokens
        )
        if uses_data_dir:
            _check_data_dir(self.data_dir)
        if self.export_ndjson and self.export_ndjson != "-":
            _check_ndjson(Path(self.export_ndjson))


# Above this, a license's event stream alone would outweigh everything else it stores by far.
MAX_EVENT_RETENTION = 1_000_000


def _event_retention(raw: str) -> int:
    expected = (
        f"expected a whole number of events per license from 0 (none kept; WatchUsage then "
        f"answers FAILED_PRECONDITION) to {MAX_EVENT_RETENTION:,} (default 1000)"
    )
    if not raw:
        return 1000
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 7:
        raise ConfigError(f"METER_EVENT_RETENTION={raw!r} is not usable: {expected}")
    value = int(raw)
    if value > MAX_EVENT_RETENTION:
        raise ConfigError(f"METER_EVENT_RETENTION={raw!r} is out of range: {expected}")
    return value


MAX_EVENT_RETENTION_AGE_S = 10 * 366 * 86400  # ten years


def _event_retention_age(raw: str) -> float:
    expected = (
        "expected a number of seconds from 0.001 to 316,224,000 (ten years), or 0 or "
        "nothing for no age limit (default)"
    )
    if not raw or raw == "0":
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(
            f"METER_EVENT_RETENTION_AGE={raw!r} is not a number: {expected}"
        ) from None
    if not math.isfinite(value) or not 0.001 <= value <= MAX_EVENT_RETENTION_AGE_S:
        raise ConfigError(f"METER_EVENT_RETENTION_AGE={raw!r} is out of range: {expected}")
    return value


def _read_sinks(settings: Settings, get: Callable[..., str]) -> None:
    """METER_EXPORT_{LAGO,M3TER,OPENMETER,STRIPE}_*: a sink is on when its first variable
    below is set; the variables it needs besides must then be set too."""

    def url(name: str, default: str = "") -> str:
        value = get(name) or default
        parsed = urlsplit(value)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(
                f"{name}={mask_url(value)!r} is not an http(s) URL: "
                "expected e.g. https://api.example.com"
            )
        return value.rstrip("/")

    def needed(name: str, because: str) -> str:
        value = get(name)
        if not value:
            raise ConfigError(f"{name} is not set: {because} needs it")
        if not value.isprintable() or any(ch.isspace() for ch in value):
            raise ConfigError(f"{name} has a space or control character: expected a token")
        return value

    def key(name: str, default: str) -> str:
        value = get(name) or default
        if not value.isprintable():
            raise ConfigError(f"{name}={value!r} has a control character: expected a name")
        return value

    def mapping(name: str, example: str) -> dict[str, str]:
        raw = get(name)
        pairs: dict[str, str] = {}
        for item in filter(None, (p.strip() for p in raw.split(","))):
            meter, eq, code = (x.strip() for x in item.partition("="))
            if not eq or not meter or not code or not (meter + code).isprintable():
                raise ConfigError(
                    f"{name}={raw!r} is not a mapping: expected METER=NAME pairs separated "
                    f"by commas, `{OWN_COUNTER}` for a license's own counter (e.g. {example})"
                )
            pairs[meter] = code
        return pairs

    if get("METER_EXPORT_LAGO_URL") or get("METER_EXPORT_LAGO_API_KEY"):
        settings.export_lago = LagoExport(
            url=url("METER_EXPORT_LAGO_URL"),
            api_key=needed("METER_EXPORT_LAGO_API_KEY", "METER_EXPORT_LAGO_URL"),
            subscription_key=key("METER_EXPORT_LAGO_SUBSCRIPTION_KEY", "external_subscription_id"),
            codes=mapping("METER_EXPORT_LAGO_CODES", "API_CALLS=api_calls,uses=seats"),
        )
    if get("METER_EXPORT_M3TER_ORG_ID"):
        because = "METER_EXPORT_M3TER_ORG_ID"
        settings.export_m3ter = M3terExport(
            org_id=needed("METER_EXPORT_M3TER_ORG_ID", because),
            access_key_id=needed("METER_EXPORT_M3TER_ACCESS_KEY_ID", because),
            api_secret=needed("METER_EXPORT_M3TER_API_SECRET", because),
            url=url("METER_EXPORT_M3TER_URL", "https://ingest.m3ter.com"),
            token_url=url("METER_EXPORT_M3TER_TOKEN_URL", "https://api.m3ter.com/oauth/token"),
            account_key=key("METER_EXPORT_M3TER_ACCOUNT_KEY", "m3ter_account"),
            meters=mapping("METER_EXPORT_M3TER_METERS", "API_CALLS=api_calls,uses=seats"),
        )
    if get("METER_EXPORT_OPENMETER_URL"):
        token = get("METER_EXPORT_OPENMETER_TOKEN")
        if token:
            token = needed("METER_EXPORT_OPENMETER_TOKEN", "METER_EXPORT_OPENMETER_URL")
        settings.export_openmeter = OpenMeterExport(
            url=url("METER_EXPORT_OPENMETER_URL"),
            token=token,
            source=key("METER_EXPORT_OPENMETER_SOURCE", "meter-grpc"),
            subject_key=key("METER_EXPORT_OPENMETER_SUBJECT_KEY", "openmeter_subject"),
            type=key("METER_EXPORT_OPENMETER_TYPE", "license.usage"),
            types=mapping("METER_EXPORT_OPENMETER_TYPES", "API_CALLS=api.calls"),
        )
    if get("METER_EXPORT_STRIPE_API_KEY"):
        value = get("METER_EXPORT_STRIPE_VALUE") or "delta"
        if value not in ("delta", "uses"):
            raise ConfigError(
                f"METER_EXPORT_STRIPE_VALUE={value!r} is not a choice: expected delta (for a "
                "sum meter) or uses (for a last meter)"
            )
        settings.export_stripe = StripeExport(
            api_key=needed("METER_EXPORT_STRIPE_API_KEY", "the Stripe export"),
            url=url("METER_EXPORT_STRIPE_URL", "https://api.stripe.com"),
            customer_key=key("METER_EXPORT_STRIPE_CUSTOMER_KEY", "stripe_customer_id"),
            event_names=mapping("METER_EXPORT_STRIPE_EVENT_NAMES", "API_CALLS=api_calls"),
            value=value,
        )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _check_pem(name: str, path: Path, kind: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    expected = {
        "certificate": "a PEM certificate (chain)",
        "key": "an unencrypted PEM private key",
        "ed25519": "an unencrypted PEM Ed25519 private key (PKCS#8)",
    }[kind]
    try:
        data = path.read_bytes()
    except OSError as exc:
        why = exc.strerror or _one_line(exc)
        raise ConfigError(
            f"{name}={str(path)!r}: cannot read it ({why}): expected {expected}"
        ) from None
    try:
        if kind == "certificate":
            x509.load_pem_x509_certificates(data)
        else:
            key = serialization.load_pem_private_key(data, password=None)
            if kind == "ed25519" and not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"holds a {type(key).__name__}")
    except (ValueError, TypeError) as exc:
        why = _one_line(exc)
        if "Unable to load PEM" in why or "Could not deserialize" in why:
            why = "no PEM block it can read"
        raise ConfigError(f"{name}={str(path)!r} is not {expected} ({why})") from None


def _check_bindable(name: str, address: str) -> None:
    """Binds HOST:PORT once (then lets go), so that a port in use or a host that is not this
    machine's is reported before anything starts. Port 0 and unix: addresses are not tried."""
    if address.startswith(("unix:", "unix-abstract:")):
        return
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if int(port) == 0:
        return
    try:
        infos = socket.getaddrinfo(
            host or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, sockaddr = infos[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
    except OSError as exc:
        why = exc.strerror or _one_line(exc)
        raise ConfigError(
            f"{name}={address!r}: cannot listen there ({why}): expected a free port on an "
            "address of this host"
        ) from None


def _check_ndjson(path: Path) -> None:
    """METER_EXPORT_NDJSON: a file that can be appended to (created if missing)."""
    expected = "expected a file path whose directory exists and is writable, or - for stdout"
    if path.is_dir():
        raise ConfigError(f"METER_EXPORT_NDJSON={str(path)!r} is a directory: {expected}")
    parent = path.parent
    if not parent.is_dir():
        raise ConfigError(
            f"METER_EXPORT_NDJSON={str(path)!r}: {str(parent)!r} is not a directory: {expected}"
        )
    writable = os.access(path, os.W_OK) if path.exists() else os.access(parent, os.W_OK)
    if not writable:
        raise ConfigError(f"METER_EXPORT_NDJSON={str(path)!r} is not writable: {expected}")


def _check_data_dir(path: Path) -> None:
    name = f"METER_DATA_DIR={str(path)!r}"
    expected = "expected a writable directory (created when missing)"
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{name} is not a directory: {expected}")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{name} is not writable by this user: {expected}")
        return
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{name} cannot be created: {parent} is not a directory: {expected}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{name} cannot be created: {parent} is not writable: {expected}")
