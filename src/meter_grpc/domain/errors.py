"""Domain errors: one exception type carrying a SPEC §4 reason and the numbers involved.

The API layer maps each Reason to its gRPC status code through one table
(`meter_grpc.api.errors`); nothing here knows about gRPC.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


class Reason(enum.StrEnum):
    """`google.rpc.ErrorInfo.reason` values (domain `meter.v1`)."""

    USAGE_LIMIT_EXCEEDED = "USAGE_LIMIT_EXCEEDED"
    MACHINE_LIMIT_EXCEEDED = "MACHINE_LIMIT_EXCEEDED"
    CORE_LIMIT_EXCEEDED = "CORE_LIMIT_EXCEEDED"
    USAGE_UNDERFLOW = "USAGE_UNDERFLOW"
    FINGERPRINT_TAKEN = "FINGERPRINT_TAKEN"
    LICENSE_SUSPENDED = "LICENSE_SUSPENDED"
    LICENSE_EXPIRED = "LICENSE_EXPIRED"
    LICENSE_NOT_FOUND = "LICENSE_NOT_FOUND"
    POLICY_NOT_FOUND = "POLICY_NOT_FOUND"
    MACHINE_NOT_FOUND = "MACHINE_NOT_FOUND"
    REQUEST_ID_REUSED = "REQUEST_ID_REUSED"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    STORAGE_UNAVAILABLE = "STORAGE_UNAVAILABLE"
    # Beyond SPEC §4: states a client can act on.
    POLICY_IN_USE = "POLICY_IN_USE"
    LICENSE_KEY_TAKEN = "LICENSE_KEY_TAKEN"
    # RenewLicense on a license whose policy has no duration.
    LICENSE_NOT_RENEWABLE = "LICENSE_NOT_RENEWABLE"
    # WatchUsage beyond the streams a license key (METER_WATCH_PER_KEY) or the process
    # (METER_WATCH_MAX) may have open at once.
    WATCH_LIMIT_EXCEEDED = "WATCH_LIMIT_EXCEEDED"
    LICENSE_FILE_TOO_LARGE = "LICENSE_FILE_TOO_LARGE"
    # WatchUsage on a server that keeps no usage events (METER_EVENT_RETENTION=0).
    USAGE_EVENTS_DISABLED = "USAGE_EVENTS_DISABLED"
    # WatchUsage from a position whose next events were trimmed (METER_EVENT_RETENTION).
    USAGE_EVENTS_TRIMMED = "USAGE_EVENTS_TRIMMED"
    # Meters (Policy.meters) and reservations (ReserveUsage).
    METER_NOT_FOUND = "METER_NOT_FOUND"
    METER_NOT_ENTITLED = "METER_NOT_ENTITLED"
    RESERVATION_NOT_FOUND = "RESERVATION_NOT_FOUND"
    RESERVATION_EXPIRED = "RESERVATION_EXPIRED"
    RESERVATION_LIMIT_EXCEEDED = "RESERVATION_LIMIT_EXCEEDED"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request (becomes a google.rpc.BadRequest field violation)."""

    field: str
    description: str


@dataclass(slots=True)
class MeterError(Exception):
    """A refusal with a reason, a message and the numbers involved."""

    reason: Reason
    message: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    violations: Sequence[FieldViolation] = ()
    # For limits: what the quota is about, e.g. "license:<id>" (google.rpc.QuotaFailure).
    quota_subject: str = ""
    # For STORAGE_UNAVAILABLE: how long a client should wait before retrying.
    retry_after_ms: int = 0

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


def invalid(field_name: str, description: str) -> MeterError:
    """A single bad field."""
    return invalid_fields([FieldViolation(field_name, description)])


def invalid_fields(violations: Sequence[FieldViolation]) -> MeterError:
    """Several bad fields, reported together."""
    first = violations[0]
    message = f"invalid {first.field}: {first.description}"
    if len(violations) > 1:
        message += f" (and {len(violations) - 1} more)"
    return MeterError(
        Reason.INVALID_ARGUMENT,
        message,
        metadata={"field": first.field},
        violations=tuple(violations),
    )


def not_found(reason: Reason, kind: str, ident: str) -> MeterError:
    return MeterError(reason, f"{kind} {ident!r} not found", metadata={"id": ident})


def request_id_reused(request_id: str, **metadata: str) -> MeterError:
    """AIP-155: the same request_id with other arguments (INVALID_ARGUMENT, REQUEST_ID_REUSED)."""
    return MeterError(
        Reason.REQUEST_ID_REUSED,
        f"request_id {request_id!r} was used with other arguments",
        metadata={**metadata, "request_id": request_id, "field": "request_id"},
        violations=(FieldViolation("request_id", "was used before with other arguments"),),
    )
