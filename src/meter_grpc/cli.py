"""The `meter-grpc` command line: `serve` (the default), and admin commands over gRPC built on
meter_grpc.client (one MeterClient per invocation), and `verify` (offline).

Output is a human-readable table unless `--json` is given (then exactly one JSON document on
stdout). Every error is one line on stderr, `meter-grpc: REASON: message`, and the exit
status says what kind of error it was (EXIT_* below, listed in `--help`).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import datetime as dt
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, NoReturn

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from meter.v1 import license_pb2, policy_pb2
from meter_grpc.client import MeterClient, verify_license_file
from meter_grpc.client.errors import (
    MeterClientError,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from meter_grpc.client.license_file import LicenseFileError

PROG = "meter-grpc"
DEFAULT_TARGET = "127.0.0.1:50051"

EXIT_OK = 0
EXIT_REFUSED = 1  # the service refused the call (reason on stderr); a license file is refused
EXIT_USAGE = 2  # bad arguments or configuration (also: the server's startup errors)
EXIT_UNAVAILABLE = 3  # the service (or its store) cannot be reached or timed out
EXIT_NOT_FOUND = 4  # the policy, license or machine does not exist
EXIT_AUTH = 5  # no valid admin token (UNAUTHENTICATED / PERMISSION_DENIED)

EPILOG = f"""\
exit status:
  {EXIT_OK}  success
  {EXIT_REFUSED}  refused by the service (the reason is on stderr, e.g. USAGE_LIMIT_EXCEEDED),
     or a license file that does not verify; `serve`: the data dir is in use
  {EXIT_USAGE}  usage or configuration error (bad option, bad METER_* variable)
  {EXIT_UNAVAILABLE}  the service or its store is unavailable (or the call timed out)
  {EXIT_NOT_FOUND}  not found (policy, license or machine)
  {EXIT_AUTH}  authentication failed (wrong or missing admin token)

errors are one line on stderr: "{PROG}: REASON: message".

admin commands connect to --target (METER_TARGET, default {DEFAULT_TARGET}) with the admin
token from --token, METER_TOKEN, the first of METER_ADMIN_TOKENS, or the file
METER_DATA_DIR/admin-token (default ./var/admin-token) that the server writes.
"""


class CliError(Exception):
    """An error to report as one line and an exit status."""

    def __init__(self, reason: str, message: str, status: int) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = status


def version() -> str:
    try:
        return importlib_metadata.version("meter-grpc")
    except importlib_metadata.PackageNotFoundError:  # pragma: no cover - not installed
        return "unknown"


# --- parsing values --------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> dt.timedelta:
    """`90s`, `15m`, `12h`, `30d`, `1w`, `1h30m`, or a bare number of seconds."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return dt.timedelta(seconds=float(text))
    pos, seconds = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        seconds += float(m[1]) * _UNITS[m[2]]
        pos = m.end()
    if pos != len(text) or not text:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (e.g. 90s, 15m, 12h, 30d, 1h30m)"
        )
    return dt.timedelta(seconds=seconds)


def parse_limit(text: str) -> int | None:
    """A limit: a non-negative integer, or `unlimited` / `none` (unset)."""
    if text.lower() in ("unlimited", "none", "-"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'unlimited'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def parse_positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def parse_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def parse_meter(text: str) -> policy_pb2.Meter:
    """CODE[:MAX_USES[:OVERAGE[:RESET[:ENTITLEMENT]]]], e.g. API_CALLS:1000:ALLOW_2X_OVERAGE:DAILY
    (an empty part: the default; MAX_USES empty or "unlimited": no limit)."""
    parts = text.split(":")
    if len(parts) > 5 or not parts[0]:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not CODE[:MAX_USES[:OVERAGE[:RESET[:ENTITLEMENT]]]]"
        )
    parts += [""] * (5 - len(parts))
    fields: dict[str, Any] = {"code": parts[0], "entitlement": parts[4]}
    if parts[1] and parts[1] != "unlimited":
        fields["max_uses"] = parse_positive_or_zero(parts[1])
    if parts[2]:
        ovg = enum_choice(policy_pb2.OverageStrategy, "OVERAGE_STRATEGY_")
        fields["overage_strategy"] = ovg(parts[2])
    if parts[3]:
        reset = enum_choice(policy_pb2.UsageResetInterval, "USAGE_RESET_INTERVAL_")
        fields["usage_reset_interval"] = reset(parts[3])
    return policy_pb2.Meter(**fields)


def parse_override(text: str) -> tuple[str, int]:
    code, sep, limit = text.partition("=")
    if not sep or not code:
        raise argparse.ArgumentTypeError(f"{text!r} is not CODE=LIMIT")
    return code, parse_positive_or_zero(limit)


def parse_time(text: str) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time (e.g. 2027-01-31T00:00:00Z)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _names(enum: Any) -> list[str]:
    return [v.name for v in enum.DESCRIPTOR.values]


def enum_choice(enum: Any, prefix: str) -> Callable[[str], int]:
    names = [n.removeprefix(prefix) for n in _names(enum) if not n.endswith("_UNSPECIFIED")]

    def parse(text: str) -> int:
        name = text.upper().replace("-", "_").removeprefix(prefix)
        if name not in names:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(names)}")
        return int(enum.Value(prefix + name))

    return parse


def load_public_key(text: str) -> bytes | Any:
    """--public-key: 64 hex digits, base64 of the 32 bytes, or a file holding either, the raw
    32 bytes, or a PEM public key (SPKI)."""
    from cryptography.hazmat.primitives import serialization

    def decode(value: str) -> bytes | None:
        value = value.strip()
        if re.fullmatch(r"[0-9a-fA-F]{64}", value):
            return bytes.fromhex(value)
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return None
        return raw if len(raw) == 32 else None

    key = decode(text)
    if key is not None:
        return key
    path = Path(text)
    if not path.is_file():
        raise CliError(
            "BAD_PUBLIC_KEY",
            f"--public-key {text!r} is neither 64 hex digits, base64 of 32 bytes, nor a file",
            EXIT_USAGE,
        )
    data = path.read_bytes()
    if b"-----BEGIN" in data:
        try:
            return serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise CliError(
                "BAD_PUBLIC_KEY", f"{path}: not a PEM public key ({exc})", EXIT_USAGE
            ) from None
    if len(data) == 32:
        return data
    key = decode(data.decode("ascii", "replace"))
    if key is None:
        raise CliError(
            "BAD_PUBLIC_KEY", f"{path}: expected hex, base64, raw 32 bytes or PEM", EXIT_USAGE
        )
    return key


# --- output ----------------------------------------------------------------------------------


def to_dict(message: Message) -> dict[str, Any]:
    """The proto3 JSON mapping (int64 as strings, enums by name, durations as "3600s"),
    with every non-optional field present; an unset limit (unlimited) stays absent."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _human_duration(text: str) -> str:
    seconds = float(text[:-1])
    if seconds == 0:
        return "0"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            n = int(seconds // size)
            seconds -= n * size
            parts.append(f"{n}{unit}")
    return "".join(parts) or text


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(_cell(v) for v in value) or "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    if isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?s", value):
        return _human_duration(value)
    return str(value) if value != "" else "-"


def _short_enum(value: Any) -> Any:
    if isinstance(value, str):
        for prefix in (
            "EXPIRATION_STRATEGY_",
            "OVERAGE_STRATEGY_",
            "USAGE_RESET_INTERVAL_",
            "LICENSE_STATUS_",
            "VALIDATION_CODE_",
        ):
            if value.startswith(prefix):
                return value.removeprefix(prefix)
    return value


class Output:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def document(self, doc: Any) -> None:
        json.dump(doc, sys.stdout, indent=2, sort_keys=False)
        sys.stdout.write("\n")

    def record(self, doc: dict[str, Any], fields: Sequence[str] = ()) -> None:
        """One resource: `field  value` lines (the given fields first, then the rest)."""
        if self.as_json:
            self.document(doc)
            return
        keys = [*fields, *(k for k in doc if k not in fields)]
        width = max((len(k) for k in keys), default=0)
        for k in keys:
            print(f"{k.ljust(width)}  {_cell(_short_enum(doc.get(k)))}")

    def table(self, name: str, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
        if self.as_json:
            self.document({name: rows})
            return
        cells = [[_cell(_short_enum(r.get(c))) for c in columns] for r in rows]
        header = [c.upper() for c in columns]
        widths = [max(len(x) for x in col) for col in zip(header, *cells, strict=False)]
        for line in (header, *cells):
            print("  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip())


POLICY_COLUMNS = ("id", "name", "max_uses", "max_machines", "max_cores", "floating", "duration")
LICENSE_COLUMNS = ("id", "policy_id", "name", "status", "uses", "max_uses", "expire_time")
MACHINE_COLUMNS = ("id", "fingerprint", "cores", "name", "hostname", "last_heartbeat_time")
LICENSE_FIELDS = ("id", "key", "policy_id", "name", "status", "uses", "max_uses")
USAGE_FIELDS = ("uses", "max_uses", "remaining", "overage_limit", "period_end_time")


# --- connecting ------------------------------------------------------------------------------


def admin_token(args: argparse.Namespace) -> str:
    if args.token:
        return str(args.token)
    for var in ("METER_TOKEN", "METER_ADMIN_TOKENS"):
        tokens = [t.strip() for t in os.environ.get(var, "").split(",") if t.strip()]
        if tokens:
            return tokens[0]
    path = Path(os.environ.get("METER_DATA_DIR", "").strip() or "./var") / "admin-token"
    try:
        token = path.read_text().strip()
    except OSError:
        token = ""
    if not token:
        raise CliError(
            "NO_TOKEN",
            f"no admin token: pass --token, set METER_TOKEN, or run where {path} is readable",
            EXIT_USAGE,
        )
    return token


def _read(path: str | None, option: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CliError("BAD_ARGUMENT", f"{option} {path}: {exc.strerror}", EXIT_USAGE) from None


def connect(args: argparse.Namespace) -> MeterClient:
    if bool(args.client_cert) != bool(args.client_key):
        raise CliError(
            "BAD_ARGUMENT", "--client-cert and --client-key go together (mutual TLS)", EXIT_USAGE
        )
    return MeterClient(
        args.target,
        admin_token=admin_token(args),
        tls=bool(args.tls),
        root_certificates=_read(args.ca, "--ca"),
        private_key=_read(args.client_key, "--client-key"),
        certificate_chain=_read(args.client_cert, "--client-cert"),
        timeout=args.timeout,
    )


def _pages(fetch: Callable[[str], Any], field: str) -> Iterator[Message]:
    token = ""
    while True:
        page = fetch(token)
        yield from getattr(page, field)
        token = page.next_page_token
        if not token:
            return


# --- commands --------------------------------------------------------------------------------

LIMITS = ("max_uses", "max_machines", "max_cores")
POLICY_DURATIONS = ("duration", "check_in_interval", "heartbeat_duration")
POLICY_FLAGS = ("floating", "strict", "require_check_in")
POLICY_ENUMS = ("expiration_strategy", "overage_strategy", "usage_reset_interval")


def _fill(message: Any, args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    """Copies the options given into `message`; returns their field names (the update mask)."""
    mask: list[str] = []
    for name in names:
        value = getattr(args, name, None)
        if value is None:
            continue
        if name in LIMITS and value == "unset":
            message.ClearField(name)
        elif isinstance(value, dt.timedelta):
            getattr(message, name).FromTimedelta(value)
        elif isinstance(value, dt.datetime):
            getattr(message, name).FromDatetime(value)
        elif name == "metadata":
            message.metadata.update(dict(value))
        elif name == "entitlements":
            message.entitlements[:] = value
        elif name == "meters":
            message.meters.extend(value)
        elif name == "meter_overrides":
            message.meter_overrides.update(dict(value))
        else:
            setattr(message, name, value)
        mask.append(name)
    return mask


POLICY_FIELDS = (
    "name",
    *LIMITS,
    *POLICY_FLAGS,
    *POLICY_DURATIONS,
    *POLICY_ENUMS,
    "entitlements",
    "metadata",
    "meters",
)
LICENSE_UPDATE_FIELDS = (
    "name",
    *LIMITS,
    "expire_time",
    "entitlements",
    "metadata",
    "meter_overrides",
)


def cmd_policies(args: argparse.Namespace, out: Output) -> None:
    with connect(args) as client:
        if args.action == "create":
            policy = policy_pb2.Policy()
            _fill(policy, args, POLICY_FIELDS)
            out.record(to_dict(client.create_policy(policy)), POLICY_COLUMNS)
        elif args.action == "get":
            out.record(to_dict(client.get_policy(args.id)), POLICY_COLUMNS)
        elif args.action == "list":
            rows = [to_dict(p) for p in _pages(lambda t: client.list_policies(100, t), "policies")]
            out.table("policies", rows, POLICY_COLUMNS)
        elif args.action == "update":
            policy = policy_pb2.Policy(id=args.id)
            mask = _fill(policy, args, POLICY_FIELDS)
            if not mask:
                raise CliError("BAD_ARGUMENT", "nothing to update: give an option", EXIT_USAGE)
            out.record(to_dict(client.update_policy(policy, mask)), POLICY_COLUMNS)
        elif args.action == "delete":
            client.delete_policy(args.id)
            out.record({"id": args.id, "deleted": True})


def cmd_licenses(args: argparse.Namespace, out: Output) -> None:
    with connect(args) as client:
        action = args.action
        if action == "create":
            lic = license_pb2.License(policy_id=args.policy)
            if args.key:
                lic.key = args.key
            _fill(lic, args, LICENSE_UPDATE_FIELDS)
            out.record(to_dict(client.create_license(lic)), LICENSE_FIELDS)
        elif action == "get":
            out.record(to_dict(client.get_license(args.id)), LICENSE_FIELDS)
        elif action == "list":
            rows = [
                to_dict(x)
                for x in _pages(
                    lambda t: client.list_licenses(args.policy or "", 100, t), "licenses"
                )
            ]
            out.table("licenses", rows, LICENSE_COLUMNS)
        elif action == "update":
            lic = license_pb2.License(id=args.id)
            mask = _fill(lic, args, LICENSE_UPDATE_FIELDS)
            if not mask:
                raise CliError("BAD_ARGUMENT", "nothing to update: give an option", EXIT_USAGE)
            out.record(to_dict(client.update_license(lic, mask)), LICENSE_FIELDS)
        elif action == "delete":
            client.delete_license(args.id)
            out.record({"id": args.id, "deleted": True})
        elif action == "rotate-key":
            out.record(to_dict(client.rotate_license_key(args.id, args.key or "")), LICENSE_FIELDS)
        else:
            call = {
                "suspend": client.suspend_license,
                "reinstate": client.reinstate_license,
                "renew": client.renew_license,
            }[action]
            out.record(to_dict(call(args.id)), LICENSE_FIELDS)


def cmd_usage(args: argparse.Namespace, out: Output) -> None:
    with connect(args) as client:
        result: Message
        meter = getattr(args, "meter", None) or ""
        if args.action in ("reserve", "commit", "release"):
            _reservation(client, args, out)
            return
        if args.action == "list":
            rows = [to_dict(u) for u in client.list_usage(args.license_id).usages]
            for row in rows:
                row.setdefault("meter", "")
                if not out.as_json:
                    row.setdefault("max_uses", "unlimited")
                    row.setdefault("remaining", "unlimited")
            out.table("usages", rows, ("meter", *USAGE_FIELDS, "reserved", "entitled"))
            return
        if args.action == "get":
            result = client.get_usage(args.license_id, meter=meter)
        elif args.action == "increment":
            result = client.increment_usage(
                args.license_id, args.amount, args.request_id or "", meter=meter
            )
        elif args.action == "decrement":
            result = client.decrement_usage(
                args.license_id, args.amount, args.request_id or "", meter=meter
            )
        else:
            result = client.reset_usage(args.license_id, args.request_id or "", meter=meter)
        doc = {"license_id": args.license_id, **({"meter": meter} if meter else {})}
        doc.update(to_dict(result))
        if not out.as_json:
            doc.setdefault("max_uses", "unlimited")
            doc.setdefault("remaining", "unlimited")
        out.record(doc, ("license_id", *USAGE_FIELDS))


RESERVATION_FIELDS = (
    "id",
    "license_id",
    "meter",
    "amount",
    "state",
    "committed_amount",
    "expire_time",
)


def _reservation(client: Any, args: argparse.Namespace, out: Output) -> None:
    rid = args.request_id or ""
    if args.action == "reserve":
        ttl = dt.timedelta(seconds=args.ttl) if args.ttl else None
        answer = client.reserve_usage(
            args.license_id, args.amount, meter=args.meter or "", ttl=ttl, request_id=rid
        )
    elif args.action == "commit":
        answer = client.commit_reservation(args.license_id, args.reservation_id, args.amount, rid)
    else:
        answer = client.release_reservation(args.license_id, args.reservation_id, rid)
    doc = to_dict(answer.reservation)
    doc.setdefault("meter", "")
    usage = to_dict(answer.usage)
    doc.update({f"usage_{k}": v for k, v in usage.items() if k != "meter"})
    out.record(doc, (*RESERVATION_FIELDS, "usage_uses", "usage_reserved", "usage_remaining"))


EXPORT_COLUMNS = (
    "sink",
    "lag_events",
    "lag_seconds",
    "dead_letters",
    "last_error_time",
    "last_error",
)


def cmd_export(args: argparse.Namespace, out: Output) -> None:
    with connect(args) as client:
        if args.action == "status":
            answer = client.export_status()
            rows, removed = [], []
            for s in answer.sinks:
                row = {c: "" for c in EXPORT_COLUMNS} | to_dict(s)
                row.setdefault("lag_events", 0)
                rows.append(row)
            for s in answer.removed_sinks:
                row = {c: "" for c in EXPORT_COLUMNS} | to_dict(s)
                row.setdefault("lag_events", 0)
                removed.append(row)
            if out.as_json:
                out.document({"sinks": rows, "removed_sinks": removed})
                return
            out.table("sinks", rows, EXPORT_COLUMNS)
            for row in removed:
                print(
                    f"{PROG}: sink {row['sink']} is configured on no replica but its consumer "
                    f"groups ({row['lag_events']} events left) and {row.get('dead_letters') or 0}"
                    f" dead letters are kept: `{PROG} export forget {row['sink']}` removes them",
                    file=sys.stderr,
                )
            return
        if args.action == "forget":
            f = client.forget_export_sink(args.sink)
            out.record(
                {"sink": args.sink, "groups": 0, "dead_letters": 0} | to_dict(f),
                ("sink", "groups", "dead_letters"),
            )
            return
        r = client.replay_dead_letters(args.sink, args.limit)
        out.record(
            {"sink": args.sink, "delivered": 0, "failed": 0, "remaining": 0} | to_dict(r),
            ("sink", "delivered", "failed", "remaining"),
        )


def cmd_machines(args: argparse.Namespace, out: Output) -> None:
    with connect(args) as client:
        if args.action == "activate":
            machine = client.activate_machine(
                args.license_id,
                args.fingerprint,
                cores=args.cores,
                name=args.name or "",
                hostname=args.hostname or "",
                platform=args.platform or "",
                metadata=dict(args.metadata or []),
            )
            out.record(to_dict(machine), MACHINE_COLUMNS)
        elif args.action == "get":
            out.record(to_dict(client.get_machine(args.id)), MACHINE_COLUMNS)
        elif args.action == "list":
            rows = [
                to_dict(m)
                for m in _pages(lambda t: client.list_machines(args.license_id, 100, t), "machines")
            ]
            out.table("machines", rows, MACHINE_COLUMNS)
        elif args.action == "deactivate":
            client.deactivate_machine(args.id)
            out.record({"id": args.id, "deactivated": True})


def cmd_checkout(args: argparse.Namespace, out: Output) -> None:
    with connect(args) as client:
        resp = client.check_out_license(
            args.license_id, ttl=args.ttl, encrypt=args.encrypt, fingerprint=args.fingerprint or ""
        )
    if args.output == "-":
        sys.stdout.write(resp.certificate)
        return
    path = Path(args.output)
    try:
        path.write_text(resp.certificate)
    except OSError as exc:
        raise CliError("BAD_ARGUMENT", f"cannot write {path}: {exc.strerror}", EXIT_USAGE) from None
    doc = {"license_id": args.license_id, "file": str(path), "encrypted": args.encrypt}
    for name in ("issue_time", "expire_time"):
        if resp.HasField(name):
            doc[name] = json_format.MessageToDict(getattr(resp, name))
    out.record(doc)


def cmd_public_key(args: argparse.Namespace, out: Output) -> None:
    with connect(args) as client:
        raw = client.get_public_key()
    if out.as_json:
        out.document(
            {"algorithm": "ed25519", "hex": raw.hex(), "base64": base64.b64encode(raw).decode()}
        )
    else:
        print(raw.hex())


def cmd_verify(args: argparse.Namespace, out: Output) -> None:
    key = load_public_key(args.public_key)
    try:
        certificate = Path(args.file).read_text() if args.file != "-" else sys.stdin.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError("BAD_ARGUMENT", f"cannot read {args.file}: {exc}", EXIT_USAGE) from None
    try:
        payload = verify_license_file(certificate, key, args.license_key)
    except LicenseFileError as exc:
        raise CliError(exc.reason, str(exc), EXIT_REFUSED) from None
    except ValueError as exc:  # e.g. a key of the wrong length
        raise CliError("BAD_PUBLIC_KEY", str(exc), EXIT_USAGE) from None
    if out.as_json:
        out.document({"valid": True, "payload": payload})
        return
    meta = payload.get("meta") or {}
    data = payload.get("data") or {}
    attrs = data.get("attributes") or {}
    print(f"OK: {args.file} is genuine and current")
    rows = {
        "license_id": data.get("id"),
        "name": attrs.get("name"),
        "status": attrs.get("status"),
        "uses": attrs.get("uses"),
        "max_uses": attrs.get("maxUses"),
        "issued": meta.get("issued"),
        "expires": meta.get("expiry") or "never",
    }
    for k, v in rows.items():
        print(f"{k.ljust(10)}  {_cell(v)}")


# --- the parser ------------------------------------------------------------------------------


def _connection_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    g.add_argument(
        "--target",
        default=os.environ.get("METER_TARGET", "").strip() or DEFAULT_TARGET,
        help=f"HOST:PORT of the service (METER_TARGET, default {DEFAULT_TARGET})",
    )
    g.add_argument("--token", help="admin token (METER_TOKEN; default: METER_DATA_DIR/admin-token)")
    g.add_argument("--tls", action="store_true", help="TLS with the system's roots")
    g.add_argument("--ca", metavar="FILE", help="TLS with this CA certificate (PEM)")
    g.add_argument("--client-cert", metavar="FILE", help="client certificate for mutual TLS (PEM)")
    g.add_argument("--client-key", metavar="FILE", help="client private key for mutual TLS (PEM)")
    g.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default 10)")
    g.add_argument("--json", action="store_true", help="one JSON document on stdout")


def _limit_options(p: argparse.ArgumentParser, update: bool) -> None:
    for name in LIMITS:
        p.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=parse_limit_update if update else parse_positive_or_zero,
            help="a number" + (", or 'unlimited' to clear" if update else " (default unlimited)"),
        )


def parse_limit_update(text: str) -> int | str:
    value = parse_limit(text)
    return "unset" if value is None else value


def parse_positive_or_zero(text: str) -> int:
    value = parse_limit(text)
    if value is None:
        raise argparse.ArgumentTypeError("leave the option out for unlimited")
    return value


def _policy_options(p: argparse.ArgumentParser, update: bool) -> None:
    p.add_argument("--name")
    _limit_options(p, update)
    for name in POLICY_FLAGS:
        flag = name.replace("_", "-")
        p.add_argument(f"--{flag}", dest=name, action=argparse.BooleanOptionalAction, default=None)
    for name in POLICY_DURATIONS:
        p.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=parse_duration,
            metavar="DURATION",
            help="e.g. 30d, 12h, 90m",
        )
    enums = {
        "expiration_strategy": (policy_pb2.ExpirationStrategy, "EXPIRATION_STRATEGY_"),
        "overage_strategy": (policy_pb2.OverageStrategy, "OVERAGE_STRATEGY_"),
        "usage_reset_interval": (policy_pb2.UsageResetInterval, "USAGE_RESET_INTERVAL_"),
    }
    for name, (enum, prefix) in enums.items():
        choices = [n.removeprefix(prefix) for n in _names(enum) if not n.endswith("UNSPECIFIED")]
        p.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=enum_choice(enum, prefix),
            metavar="|".join(choices),
        )
    _list_options(p)


def _list_options(p: argparse.ArgumentParser, kind: str = "policy") -> None:
    if kind == "license":
        p.add_argument(
            "--meter-override",
            dest="meter_overrides",
            action="append",
            type=parse_override,
            metavar="CODE=LIMIT",
            help="a meter's max_uses for this license; repeatable (on update: replaces the map)",
        )
    else:
        p.add_argument(
            "--meter",
            dest="meters",
            action="append",
            type=parse_meter,
            metavar="CODE[:MAX[:OVERAGE[:RESET[:ENTITLEMENT]]]]",
            help="a meter, e.g. API_CALLS:1000:ALLOW_2X_OVERAGE:DAILY; repeatable (on update: "
            "replaces the list)",
        )
    p.add_argument(
        "--entitlement",
        dest="entitlements",
        action="append",
        metavar="CODE",
        help="repeat for several (on update: replaces the list)",
    )
    p.add_argument(
        "--metadata",
        action="append",
        type=parse_pair,
        metavar="KEY=VALUE",
        help="repeatable (on update: replaces the map)",
    )


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        fail("USAGE", f"{message} (see `{self.prog} --help`)", EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=(
            "meter-grpc: metered software licenses over gRPC. With no command, or `serve`, "
            "runs the service (configured by METER_* variables); the other commands "
            "administer a running service, and `verify` checks a license file offline."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser(
        "serve",
        help="run the service (the default)",
        description="Run the service: configured by the METER_* variables (README, Configuration).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    def group(name: str, help: str) -> Any:
        p = sub.add_parser(
            name, help=help, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        return p.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(
        actions: Any,
        name: str,
        help: str,
        func: Callable[[argparse.Namespace, Output], None],
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = actions.add_parser(
            name,
            help=help,
            description=help,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _connection_options(p)
        p.set_defaults(func=func)
        return p

    # policies
    pol = group("policies", "create, get, list, update, delete policies")
    p = action(pol, "create", "create a policy", cmd_policies)
    _policy_options(p, update=False)
    p = action(pol, "get", "show a policy", cmd_policies)
    p.add_argument("id")
    action(pol, "list", "list every policy", cmd_policies)
    p = action(
        pol, "update", "change the fields given (update_mask = the options given)", cmd_policies
    )
    p.add_argument("id")
    _policy_options(p, update=True)
    p = action(pol, "delete", "delete a policy (refused while licenses use it)", cmd_policies)
    p.add_argument("id")

    # licenses
    lic = group(
        "licenses",
        "create, get, list, update, suspend, reinstate, renew, rotate-key, delete licenses",
    )
    p = action(lic, "create", "create a license under a policy", cmd_licenses)
    p.add_argument("--policy", required=True, metavar="POLICY_ID")
    p.add_argument("--key", dest="key", metavar="LICENSE_KEY", help="default: generated")
    p.add_argument("--name")
    _limit_options(p, update=False)
    p.add_argument("--expire-time", dest="expire_time", type=parse_time, metavar="ISO_TIME")
    _list_options(p, "license")
    p = action(lic, "get", "show a license (with its key)", cmd_licenses)
    p.add_argument("id")
    p = action(lic, "list", "list licenses", cmd_licenses)
    p.add_argument("--policy", metavar="POLICY_ID", help="only this policy's licenses")
    p = action(lic, "update", "change the fields given", cmd_licenses)
    p.add_argument("id")
    p.add_argument("--name")
    _limit_options(p, update=True)
    p.add_argument("--expire-time", dest="expire_time", type=parse_time, metavar="ISO_TIME")
    _list_options(p, "license")
    for name, help in (
        ("suspend", "suspend a license"),
        ("reinstate", "reinstate a suspended license"),
        ("renew", "extend a license's expiry by its policy's duration"),
        ("delete", "delete a license"),
    ):
        p = action(lic, name, help, cmd_licenses)
        p.add_argument("id")
    p = action(
        lic, "rotate-key", "give a license a new key (the old one stops working)", cmd_licenses
    )
    p.add_argument("id")
    p.add_argument("--key", dest="key", metavar="LICENSE_KEY", help="default: generated")

    # usage
    use = group(
        "usage",
        "get, list, increment, decrement, reset a license's usage (or a meter's); reserve, "
        "commit, release units",
    )
    meter_help = "a meter of the license's policy (default: the license's own counter)"
    p = action(use, "get", "show the usage of a license (or of one meter)", cmd_usage)
    p.add_argument("license_id")
    p.add_argument("--meter", metavar="CODE", help=meter_help)
    p = action(use, "list", "every counter of a license: its own, then each meter", cmd_usage)
    p.add_argument("license_id")
    for name in ("increment", "decrement"):
        p = action(use, name, f"{name} the usage (refused past the limit)", cmd_usage)
        p.add_argument("license_id")
        p.add_argument("amount", nargs="?", type=parse_positive, default=1, help="default 1")
        p.add_argument("--meter", metavar="CODE", help=meter_help)
        p.add_argument("--request-id", help="idempotency key: a retry with it counts once")
    p = action(use, "reset", "set the usage to 0", cmd_usage)
    p.add_argument("license_id")
    p.add_argument("--meter", metavar="CODE", help=meter_help)
    p.add_argument("--request-id", help="idempotency key")
    p = action(
        use,
        "reserve",
        "hold units against the limit until committed, released or expired",
        cmd_usage,
    )
    p.add_argument("license_id")
    p.add_argument("amount", type=parse_positive)
    p.add_argument("--meter", metavar="CODE", help=meter_help)
    p.add_argument(
        "--ttl", type=parse_positive, metavar="SECONDS", help="how long (default 600, max 7 days)"
    )
    p.add_argument("--request-id", help="idempotency key: a retry holds nothing more")
    p = action(use, "commit", "count what a reservation used and free the rest", cmd_usage)
    p.add_argument("license_id")
    p.add_argument("reservation_id")
    p.add_argument(
        "amount", nargs="?", type=parse_positive_or_zero, default=0, help="default: all held"
    )
    p.add_argument("--request-id", help="idempotency key")
    p = action(use, "release", "give every unit of a reservation back", cmd_usage)
    p.add_argument("license_id")
    p.add_argument("reservation_id")
    p.add_argument("--request-id", help="idempotency key")

    # usage export
    exp = group(
        "export",
        "usage export to billing: status per sink, replay of dead letters, forget a removed sink",
    )
    action(
        exp, "status", "per sink: lag in events and seconds, last error, dead letters", cmd_export
    )
    p = action(exp, "replay", "deliver a sink's dead letters again", cmd_export)
    p.add_argument("sink", help="lago, m3ter, openmeter, stripe or ndjson")
    p.add_argument(
        "--limit", type=parse_positive_or_zero, default=0, help="at most this many (default: all)"
    )
    p = action(
        exp,
        "forget",
        "remove the consumer groups and dead letters of a sink no replica configures any more",
        cmd_export,
    )
    p.add_argument("sink", help="a sink removed from every replica's configuration")

    # machines
    mac = group("machines", "activate, list, get, deactivate machines")
    p = action(mac, "activate", "activate a machine on a license", cmd_machines)
    p.add_argument("license_id")
    p.add_argument("fingerprint")
    p.add_argument("--cores", type=int, default=0)
    p.add_argument("--name")
    p.add_argument("--hostname")
    p.add_argument("--platform")
    p.add_argument("--metadata", action="append", type=parse_pair, metavar="KEY=VALUE")
    p = action(mac, "list", "list a license's machines", cmd_machines)
    p.add_argument("license_id")
    p = action(mac, "get", "show a machine", cmd_machines)
    p.add_argument("id")
    p = action(mac, "deactivate", "deactivate a machine", cmd_machines)
    p.add_argument("id")

    # license files
    p = sub.add_parser(
        "checkout",
        help="write a signed license file (CheckOutLicense)",
        description="Write a signed license file of LICENSE_ID to FILE (`-`: stdout).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _connection_options(p)
    p.add_argument("license_id")
    p.add_argument("-o", "--output", required=True, metavar="FILE")
    p.add_argument("--ttl", type=parse_duration, help="default 30d; 0 = never expires")
    p.add_argument("--encrypt", action="store_true", help="encrypt with the license key")
    p.add_argument("--fingerprint", help="scope the file to a machine")
    p.set_defaults(func=cmd_checkout)

    p = sub.add_parser(
        "public-key",
        help="print the key that verifies license files (hex)",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _connection_options(p)
    p.set_defaults(func=cmd_public_key)

    p = sub.add_parser(
        "verify",
        help="check a license file offline",
        description=(
            "Check a license file offline: its signature against --public-key, then that it "
            "is current. Exit 0 when it verifies, 1 (and the reason) when it does not."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", metavar="FILE", help="the license file (`-`: stdin)")
    p.add_argument(
        "--public-key",
        required=True,
        metavar="KEY",
        help="64 hex digits, base64, or a file (hex, base64, raw 32 bytes or PEM)",
    )
    p.add_argument("--license-key", help="the license key, for an encrypted file")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.set_defaults(func=cmd_verify)
    return parser


def fail(reason: str, message: str, status: int) -> NoReturn:
    message = " ".join(message.split())
    print(f"{PROG}: {reason}: {message}", file=sys.stderr)
    sys.exit(status)


def _status_of(exc: MeterClientError) -> int:
    if isinstance(exc, NotFound):
        return EXIT_NOT_FOUND
    if isinstance(exc, Unavailable):
        return EXIT_UNAVAILABLE
    if isinstance(exc, Unauthenticated | PermissionDenied):
        return EXIT_AUTH
    return EXIT_REFUSED


def parse(argv: Sequence[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def run(args: argparse.Namespace) -> None:
    """Runs an admin command; errors become one line and an exit status."""
    out = Output(bool(getattr(args, "json", False)))
    try:
        args.func(args, out)
    except CliError as exc:
        fail(exc.reason, exc.message, exc.status)
    except MeterClientError as exc:
        fail(exc.reason or exc.code.name, exc.message, _status_of(exc))
    except grpc.RpcError as exc:  # pragma: no cover - the client maps these
        fail("UNKNOWN", str(exc), EXIT_REFUSED)
    except BrokenPipeError:  # e.g. `meter-grpc policies list | head`
        sys.stderr.close()
        sys.exit(EXIT_OK)
