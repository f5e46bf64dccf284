"""Domain errors to rich gRPC statuses (SPEC §4), from one table.

Every error is a google.rpc.Status with an ErrorInfo (domain "meter.v1", the reason, the
numbers as metadata); bad fields add BadRequest, limits QuotaFailure, UNAVAILABLE RetryInfo.
"""

from __future__ import annotations

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
}


def _pack(msg: object) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)  # type: ignore[arg-type]
    return a


def to_status_proto(err: MeterError) -> status_pb2.Status:
    code = STATUS_CODES[err.reason]
    details = [
        _pack(
            error_details_pb2.ErrorInfo(
                reason=str(err.reason), domain=DOMAIN, metadata=dict(err.metadata)
            )
        )
    ]
    if err.violations:
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description
                        )
                        for v in err.violations
                    ]
                )
            )
        )
    if err.quota_subject:
        details.append(
            _pack(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(
                            subject=err.quota_subject, description=err.message
                        )
                    ]
                )
            )
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(err.retry_after_ms or 1000)
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return status_pb2.Status(code=code.value[0], message=err.message, details=details)


def to_grpc_status(err: MeterError) -> grpc.Status:
    return rpc_status.to_status(to_status_proto(err))


def internal_status() -> status_pb2.Status:
    return status_pb2.Status(
        code=grpc.StatusCode.INTERNAL.value[0], message="internal error; see the server log"
    )
