"""Input bounds and checks. Bad input is refused here, before anything reaches Redis.

Lua numbers are IEEE doubles, exact up to 2^53. Amounts and limits are capped at 2^50 so
that every sum and overage ceiling (at most 2x a limit, or a counter plus an amount) the
scripts compute stays exact; the counter itself never passes MAX_COUNTER.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence

from meter_grpc.domain.errors import FieldViolation, invalid_fields
from meter_grpc.domain.models import License, Machine, Meter, Policy

MAX_AMOUNT = 2**50
MAX_LIMIT = 2**50
MAX_COUNTER = 2**53 - 1
MAX_NAME_LEN = 256
MAX_ID_LEN = 128
# "<license id>.<32 hex digits>" (domain.ids.new_machine_id)
MAX_MACHINE_ID_LEN = MAX_ID_LEN + 33
MAX_FINGERPRINT_LEN = 256
# Cores of one machine: far above any real machine, and low enough that the summed cores of a
# license stay exact in Lua (IEEE doubles) for any number of machines Redis could hold.
MAX_MACHINE_CORES = 2**20
MAX_REQUEST_ID_LEN = 128
MAX_METADATA_ENTRIES = 64
MAX_METADATA_KEY_LEN = 128
MAX_METADATA_VALUE_LEN = 1024
# A metadata key named in a bad field's path: quoted by its first characters, at most this many
# bytes of UTF-8 (api.errors cuts paths above 128 bytes).
KEY_NAME_BYTES = 64
# A metadata map as stored and signed into license files: its JSON (ASCII-escaped, as the
# service writes it) is at most this many bytes. With MAX_MACHINES_PER_LICENSE it bounds a
# license file (README "Limits and bounds").
MAX_METADATA_BYTES = 4096
MAX_ENTITLEMENTS = 256
MAX_ENTITLEMENT_LEN = 128
MIN_KEY_LEN = 16
MAX_KEY_LEN = 256
MIN_DURATION_MS = 1000
MAX_DURATION_MS = 100 * 366 * 86_400_000  # a century
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_SYNC_RECORDS = 1000
# Timestamps a client may send: 1970-01-01 up to the end of year 9999 (google.protobuf.Timestamp).
MAX_TIMESTAMP_MS = 253_402_300_799_999

_PRINTABLE_TOKEN = re.compile(r"[\x21-\x7e]+")
# Request ids, record ids and fingerprints: printable ASCII without space, '{', '}' or ':'.
# Those three build Redis key names (hash tags, separators), so a client string can never
# name another key. Ids the server mints are checked by their exact shape instead.
SAFE_TOKEN_CHARS = "printable ASCII (0x21-0x7E) except '{', '}' and ':'"
_SAFE_TOKEN = re.compile(r"[\x21-\x39\x3b-\x7a\x7c\x7e]+")
_UUID7 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
_MACHINE_ID = re.compile(_UUID7.pattern + r"\.[0-9a-f]{32}")


def is_minted_id(value: str) -> bool:
    """A license or policy id as the server mints them: UUIDv7 text, lower case."""
    return _UUID7.fullmatch(value) is not None


def is_machine_id(value: str) -> bool:
    """`<license id>.<32 hex digits>` (domain.ids.new_machine_id)."""
    return _MACHINE_ID.fullmatch(value) is not None


_ENTITLEMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")
# Meter codes: they name fields of the license hash (`pm:<code>`, `m:<code>:u`), so no
# separator of those names (':', ',', '|') can appear.
_METER_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
MAX_METERS = 64
METER_CODE_RULE = "an upper-case letter, then up to 63 upper-case letters, digits or '_'"


def is_meter_code(value: str) -> bool:
    return _METER_CODE.fullmatch(value) is not None


def _key_name(key: str) -> str:
    """A map key quoted for a field name, by its first characters: the name stays short
    (at most 64 bytes of UTF-8 of quoted key, so an error never has to cut the field name
    itself) whatever the key holds: escapes and multi-byte characters leave fewer of them."""
    n = min(len(key), 32)
    quoted = repr(key if len(key) <= 32 else key[:32] + "...")
    while len(quoted.encode("utf-8", "replace")) > KEY_NAME_BYTES:
        n -= 1
        quoted = repr(key[:n] + "...")
    return quoted


class Violations:
    """Collects field violations; `raise_if_any()` raises one INVALID_ARGUMENT for all."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def raise_if_any(self) -> None:
        if self.items:
            raise invalid_fields(self.items)

    def identifier(self, field: str, value: str, *, required: bool = True) -> None:
        if not value:
            if required:
                self.add(field, "is required")
            return
        if not is_minted_id(value):
            self.add(field, "must be an id returned by this service (a lower-case UUIDv7)")

    def machine_id(self, field: str, value: str) -> None:
        if not value:
            self.add(field, "is required")
        elif not is_machine_id(value):
            self.add(
                field,
                "must be a machine id returned by this service ('<license id>.<32 hex digits>')",
            )

    def fingerprint(self, field: str, value: str, *, required: bool = True) -> None:
        if not value:
            if required:
                self.add(field, "is required")
            return
        self.token(field, value, MAX_FINGERPRINT_LEN)

    def token(self, field: str, value: str, max_len: int) -> None:
        """1 to max_len characters of SAFE_TOKEN_CHARS."""
        if len(value) > max_len or not _SAFE_TOKEN.fullmatch(value):
            self.add(field, f"must be 1 to {max_len} characters, each {SAFE_TOKEN_CHARS}")

    def record_id(self, field: str, value: str) -> None:
        if not value:
            self.add(field, "is required")
        else:
            self.token(field, value, MAX_REQUEST_ID_LEN)

    def cores(self, field: str, value: int) -> None:
        """0 is allowed here (no core limit); the machine scripts require >= 1 under a limit."""
        if value < 0:
            self.add(field, "must not be negative")
        elif value > MAX_MACHINE_CORES:
            self.add(field, f"must be at most 2^20 ({MAX_MACHINE_CORES})")

    def request_id(self, field: str, value: str) -> None:
        """Optional (empty: no idempotency); else 1 to 128 characters of SAFE_TOKEN_CHARS."""
        if value:
            self.token(field, value, MAX_REQUEST_ID_LEN)

    def amount(self, field: str, value: int) -> None:
        if value < 0:
            self.add(field, "must not be negative (0 means 1)")
        elif value > MAX_AMOUNT:
            self.add(field, f"must be at most 2^50 ({MAX_AMOUNT})")

    def timestamp(self, field: str, value_ms: int | None) -> None:
        if value_ms is not None and not 0 <= value_ms <= MAX_TIMESTAMP_MS:
            self.add(field, "must be between 1970-01-01 and 9999-12-31")

    def text(self, field: str, value: str, max_len: int = MAX_NAME_LEN) -> None:
        if len(value) > max_len:
            self.add(field, f"must be at most {max_len} characters")
        elif "\x00" in value:
            self.add(field, "must not contain NUL characters")

    def limit(self, field: str, value: int | None, *, minimum: int = 0) -> None:
        if value is None:
            return
        if value < minimum:
            self.add(field, f"must be at least {minimum} (leave unset for unlimited)")
        elif value > MAX_LIMIT:
            self.add(field, f"must be at most 2^50 ({MAX_LIMIT})")

    def duration(
        self, field: str, value_ms: int | None, *, minimum_ms: int = MIN_DURATION_MS
    ) -> None:
        if value_ms is None:
            return
        if value_ms < minimum_ms:
            self.add(field, f"must be at least {minimum_ms // 1000} second(s)")
        elif value_ms > MAX_DURATION_MS:
            self.add(field, "must be at most 100 years")

    def metadata(self, field: str, value: Mapping[str, str]) -> None:
        if len(value) > MAX_METADATA_ENTRIES:
            self.add(field, f"must have at most {MAX_METADATA_ENTRIES} entries")
            return
        for k, v in value.items():
            name = f"{field}[{_key_name(k)}]"
            if not k or len(k) > MAX_METADATA_KEY_LEN:
                self.add(name, f"keys must be 1 to {MAX_METADATA_KEY_LEN} characters")
            elif len(v) > MAX_METADATA_VALUE_LEN:
                self.add(name, f"values must be at most {MAX_METADATA_VALUE_LEN} characters")
        if value and len(json.dumps(value, separators=(",", ":"))) > MAX_METADATA_BYTES:
            self.add(
                field,
                f"must be at most {MAX_METADATA_BYTES} bytes as JSON (keys and values, "
                "non-ASCII characters escaped)",
            )

    def entitlements(self, field: str, value: Iterable[str]) -> None:
        codes = list(value)
        if len(codes) > MAX_ENTITLEMENTS:
            self.add(field, f"must have at most {MAX_ENTITLEMENTS} codes")
            return
        for i, code in enumerate(codes):
            if len(code) > MAX_ENTITLEMENT_LEN or not _ENTITLEMENT.fullmatch(code):
                self.add(
                    f"{field}[{i}]",
                    f"must be 1 to {MAX_ENTITLEMENT_LEN} characters of letters, digits, '_.:-'",
                )

    def meter(self, field: str, value: str) -> None:
        """Optional (empty: the license's own counter); else a meter code."""
        if value and not is_meter_code(value):
            self.add(
                field, f"must be a meter code: {METER_CODE_RULE} (empty: the license's own counter)"
            )

    def meters(self, field: str, meters: Sequence[Meter]) -> None:
        if len(meters) > MAX_METERS:
            self.add(field, f"must have at most {MAX_METERS} meters")
            return
        seen: set[str] = set()
        for i, m in enumerate(meters):
            if not m.code:
                self.add(f"{field}[{i}].code", "is required")
            elif not is_meter_code(m.code):
                self.add(f"{field}[{i}].code", f"must be {METER_CODE_RULE}")
            elif m.code in seen:
                self.add(f"{field}[{i}].code", f"repeats {m.code!r}: codes are unique per policy")
            seen.add(m.code)
            self.limit(f"{field}[{i}].max_uses", m.max_uses)
            if m.entitlement and (
                len(m.entitlement) > MAX_ENTITLEMENT_LEN
                or not _ENTITLEMENT.fullmatch(m.entitlement)
            ):
                self.add(
                    f"{field}[{i}].entitlement",
                    f"must be 1 to {MAX_ENTITLEMENT_LEN} characters of letters, digits, '_.:-'",
                )

    def meter_overrides(self, field: str, overrides: Mapping[str, int]) -> None:
        if len(overrides) > MAX_METERS:
            self.add(field, f"must have at most {MAX_METERS} entries")
            return
        for code, limit in overrides.items():
            name = f"{field}[{_key_name(code)}]"
            if not is_meter_code(code):
                self.add(name, f"keys must be meter codes: {METER_CODE_RULE}")
            else:
                self.limit(name, limit)

    def page(self, size_field: str, page_size: int) -> int:
        if page_size < 0:
            self.add(size_field, "must not be negative")
            return DEFAULT_PAGE_SIZE
        if page_size > MAX_PAGE_SIZE:
            self.add(size_field, f"must be at most {MAX_PAGE_SIZE}")
        return page_size or DEFAULT_PAGE_SIZE


def check_policy(v: Violations, p: Policy, prefix: str = "policy") -> None:
    v.text(f"{prefix}.name", p.name)
    v.limit(f"{prefix}.max_uses", p.max_uses)
    v.limit(f"{prefix}.max_machines", p.max_machines)
    v.limit(f"{prefix}.max_cores", p.max_cores)
    v.duration(f"{prefix}.duration", p.duration_ms)
    v.duration(f"{prefix}.check_in_interval", p.check_in_interval_ms)
    v.duration(f"{prefix}.heartbeat_duration", p.heartbeat_duration_ms)
    if p.require_check_in and p.check_in_interval_ms is None:
        v.add(f"{prefix}.check_in_interval", "is required when require_check_in is set")
    if p.floating and p.max_machines is not None and p.max_machines < 1:
        v.add(f"{prefix}.max_machines", "must be at least 1 for a floating policy")
    if not p.floating and p.max_machines is not None and p.max_machines != 1:
        v.add(
            f"{prefix}.max_machines",
            "a node-locked policy (floating = false) allows exactly one machine: "
            "leave unset or set 1",
        )
    v.entitlements(f"{prefix}.entitlements", p.entitlements)
    v.metadata(f"{prefix}.metadata", p.metadata)
    v.meters(f"{prefix}.meters", p.meters)


def check_license(v: Violations, lic: License, prefix: str = "license") -> None:
    v.text(f"{prefix}.name", lic.name)
    v.timestamp(f"{prefix}.expire_time", lic.expire_time_ms)
    v.limit(f"{prefix}.max_uses", lic.max_uses_override)
    v.limit(f"{prefix}.max_machines", lic.max_machines_override)
    v.limit(f"{prefix}.max_cores", lic.max_cores_override)
    v.entitlements(f"{prefix}.entitlements", lic.entitlements)
    v.metadata(f"{prefix}.metadata", lic.metadata)
    v.meter_overrides(f"{prefix}.meter_overrides", lic.meter_overrides)


def check_license_with_policy(
    v: Violations, lic: License, policy: Policy, prefix: str = "license"
) -> None:
    """Overrides that only make sense under the license's policy."""
    if not policy.floating and lic.max_machines_override not in (None, 1):
        v.add(
            f"{prefix}.max_machines",
            "the policy is node-locked (floating = false): a license allows exactly one machine; "
            "leave unset or set 1",
        )
    elif policy.floating and lic.max_machines_override == 0:
        v.add(f"{prefix}.max_machines", "must be at least 1 for a floating policy")


def check_machine(v: Violations, m: Machine, prefix: str = "") -> None:
    v.cores(f"{prefix}cores", m.cores)
    v.text(f"{prefix}name", m.name)
    v.text(f"{prefix}hostname", m.hostname)
    v.text(f"{prefix}platform", m.platform)
    v.metadata(f"{prefix}metadata", m.metadata)


def check_key(v: Violations, field: str, key: str) -> None:
    if not MIN_KEY_LEN <= len(key) <= MAX_KEY_LEN or not _PRINTABLE_TOKEN.fullmatch(key):
        v.add(
            field,
            f"must be {MIN_KEY_LEN} to {MAX_KEY_LEN} printable ASCII characters without spaces",
        )
