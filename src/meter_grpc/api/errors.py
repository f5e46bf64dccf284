"""Domain errors to rich gRPC statuses (SPEC §4), from one table.

Every error is a google.rpc.Status with an ErrorInfo (domain "meter.v1", the reason, the
numbers as metadata); bad fields add BadRequest, limits QuotaFailure, UNAVAILABLE RetryInfo.
"""

from __future__ import annotations

import re

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from meter_grpc.domain.errors import MeterError, Reason

DOMAIN = "meter.v1"

STATUS_CODES: dict[Reason, grpc.StatusCode] = {
    Reason.USAGE_LIMIT_EXCEEDED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.MACHINE_LIMIT_EXCEEDED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.CORE_LIMIT_EXCEEDED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.USAGE_UNDERFLOW: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.FINGERPRINT_TAKEN: grpc.StatusCode.ALREADY_EXISTS,
    Reason.LICENSE_SUSPENDED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.LICENSE_EXPIRED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.LICENSE_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Reason.POLICY_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Reason.MACHINE_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Reason.REQUEST_ID_REUSED: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Reason.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Reason.STORAGE_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Reason.POLICY_IN_USE: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.LICENSE_KEY_TAKEN: grpc.StatusCode.ALREADY_EXISTS,
    Reason.LICENSE_NOT_RENEWABLE: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.WATCH_LIMIT_EXCEEDED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.LICENSE_FILE_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.USAGE_EVENTS_DISABLED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.USAGE_EVENTS_TRIMMED: grpc.StatusCode.OUT_OF_RANGE,
    Reason.METER_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Reason.METER_NOT_ENTITLED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.RESERVATION_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Reason.RESERVATION_EXPIRED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.RESERVATION_LIMIT_EXCEEDED: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def _pack(msg: object) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)  # type: ignore[arg-type]
    return a


# An error echoes what the client sent (an id, a metadata key, a bad path), and it travels in
# the trailers: grpc-message (the message, UTF-8 with every byte outside printable ASCII
# percent-encoded, so up to 3 bytes per byte) and grpc-status-details-bin (the whole Status,
# base64). A gRPC client refuses trailers above its metadata limit: 8 KiB by default, and
# between 8 and 16 KiB by chance. So every string of a status is clipped (in UTF-8 bytes),
# at most MAX_VIOLATIONS fields are named (the message counts the others), and violations are
# left out from the last until both trailers together fit MAX_STATUS_TRAILER_BYTES, whatever
# the request held.
MAX_MESSAGE_LEN = 512
MAX_METADATA_VALUE_LEN = 128
MAX_FIELD_LEN = 128
MAX_DESCRIPTION_LEN = 256
MAX_VIOLATIONS = 20
MAX_STATUS_TRAILER_BYTES = 6 * 1024


def clip(text: str, limit: int) -> str:
    """`text` in at most `limit` bytes of UTF-8 (cut between characters), plus a note of how
    many characters were cut."""
    if len(text) * 4 <= limit:
        return text
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    kept = data[:limit].decode("utf-8", "ignore")
    return f"{kept}... ({len(text) - len(kept)} more characters)"


# One step of a field path: a name (after a dot but the first) or a subscript (an index, or a
# map key quoted with ' or " and backslash escapes, as domain.rules writes them).
_PATH_STEP = re.compile(
    r"""\.?[A-Za-z_][A-Za-z0-9_]*|\[(?:\d+|'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")\]"""
)


def clip_field(path: str, limit: int) -> str:
    """A BadRequest field path in at most `limit` bytes of UTF-8 that still names a field: the
    steps that do not fit are left off from the end, so `policy.metadata['<a long key>']`
    becomes `policy.metadata` (the description says the rest). Only a first name longer than
    `limit` (or no path at all) is cut like any text."""
    if len(path) * 4 <= limit or len(path.encode("utf-8", "replace")) <= limit:
        return path
    end = 0
    while (step := _PATH_STEP.match(path, end)) and len(
        path[: step.end()].encode("utf-8", "replace")
    ) <= limit:
        end = step.end()
    return path[:end] if end else clip(path, limit)


def trailer_bytes(status: status_pb2.Status) -> int:
    """What `status` puts into the trailers: grpc-message percent-encoded, grpc-status-details-bin
    in base64."""
    message = status.message.encode("utf-8")
    escaped = sum(1 for b in message if b < 0x20 or b > 0x7E or b == 0x25)
    size: int = status.ByteSize()
    return len(message) + 2 * escaped + 4 * ((size + 2) // 3)


def to_status_proto(err: MeterError) -> status_pb2.Status:
    code = STATUS_CODES[err.reason]
    metadata = {k: clip(v, MAX_METADATA_VALUE_LEN) for k, v in err.metadata.items()}
    details = [
        _pack(error_details_pb2.ErrorInfo(reason=str(err.reason), domain=DOMAIN, metadata=metadata))
    ]
    if err.quota_subject:
        details.append(
            _pack(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(
                            subject=clip(err.quota_subject, MAX_FIELD_LEN),
                            description=clip(err.message, MAX_MESSAGE_LEN),
                        )
                    ]
                )
            )
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(err.retry_after_ms or 1000)
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    status = status_pb2.Status(
        code=code.value[0], message=clip(err.message, MAX_MESSAGE_LEN), details=details
    )
    if err.violations:
        violations = [
            error_details_pb2.BadRequest.FieldViolation(
                field=clip_field(v.field, MAX_FIELD_LEN),
                description=clip(v.description, MAX_DESCRIPTION_LEN),
            )
            for v in err.violations[:MAX_VIOLATIONS]
        ]
        # BadRequest goes second, after ErrorInfo, as clients read it.
        while True:
            bad = status_pb2.Status()
            bad.CopyFrom(status)
            bad.details.insert(1, _pack(error_details_pb2.BadRequest(field_violations=violations)))
            if len(violations) == 1 or trailer_bytes(bad) <= MAX_STATUS_TRAILER_BYTES:
                return bad
            violations.pop()
    return status


def to_grpc_status(err: MeterError) -> grpc.Status:
    return rpc_status.to_status(to_status_proto(err))


def internal_status() -> status_pb2.Status:
    return status_pb2.Status(
        code=grpc.StatusCode.INTERNAL.value[0], message="internal error; see the server log"
    )
