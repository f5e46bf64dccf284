"""Error statuses of meter-grpc as Python exceptions.

Every failed call raises a MeterClientError subclass chosen by the ErrorInfo reason (SPEC §4),
or by the status code when there is none (e.g. the service could not be reached). The
exception carries what the rich status said: `code`, `reason`, `metadata` (the numbers
involved), `field_violations` (BadRequest) and `retry_delay` (RetryInfo, in seconds).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

DOMAIN = "meter.v1"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str


class MeterClientError(Exception):
    """A call to meter-grpc failed."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[FieldViolation] = (),
        retry_delay: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations = list(field_violations)
        self.retry_delay = retry_delay

    def __str__(self) -> str:
        head = self.reason or self.code.name
        return f"{head}: {self.message}"


class InvalidArgument(MeterClientError):
    """A field is malformed or out of range; `field_violations` names it."""


class RequestIdReused(InvalidArgument):
    pass


class NotFound(MeterClientError):
    pass


class LicenseNotFound(NotFound):
    pass


class PolicyNotFound(NotFound):
    pass


class MachineNotFound(NotFound):
    pass


class LimitExceeded(MeterClientError):
    """A usage, machine or core limit refused the call; nothing was counted."""


class UsageLimitExceeded(LimitExceeded):
    pass


class MachineLimitExceeded(LimitExceeded):
    pass


class CoreLimitExceeded(LimitExceeded):
    pass


class WatchLimitExceeded(LimitExceeded):
    """WatchUsage beyond the streams a license key or the server may have open at once
    (metadata `scope`, `limit`, `setting`); nothing was opened."""


class LicenseFileTooLarge(LimitExceeded):
    """CheckOutLicense's file would pass the server's size limit (metadata `size`, `limit`);
    check out one machine's file with `fingerprint`."""


class FailedPrecondition(MeterClientError):
    pass


class UsageEventsDisabled(FailedPrecondition):
    """WatchUsage on a server that keeps no usage events (METER_EVENT_RETENTION=0)."""


class UsageEventsTrimmed(MeterClientError):
    """WatchUsage from a position whose next events are no longer kept (metadata
    `oldest_event_id`): read the counter with GetUsage, then watch again."""


class UsageUnderflow(FailedPrecondition):
    pass


class LicenseSuspended(FailedPrecondition):
    pass


class LicenseExpired(FailedPrecondition):
    pass


class PolicyInUse(FailedPrecondition):
    pass


class MeterNotFound(NotFound):
    """The license's policy has no meter with this code."""


class ReservationNotFound(NotFound):
    """No reservation with this id on this license (or its record passed its retention)."""


class MeterNotEntitled(FailedPrecondition):
    """The meter needs an entitlement the license does not hold."""


class ReservationExpired(FailedPrecondition):
    """The reservation is closed: expired, committed or released (metadata `state`)."""


class ReservationLimitExceeded(LimitExceeded):
    """The license holds as many open reservations as the server allows."""


class AlreadyExists(MeterClientError):
    pass


class FingerprintTaken(AlreadyExists):
    pass


class LicenseKeyTaken(AlreadyExists):
    pass


class Unauthenticated(MeterClientError):
    pass


class PermissionDenied(MeterClientError):
    pass


class Unavailable(MeterClientError):
    """The service (or its store) could not be reached or did not answer in time. A write may
    or may not have happened; retrying with the same request_id / record id is safe."""


class NoValidLicenseFile(Unavailable):
    """Offline, and no license file that verifies now allows usage (`reason` says why)."""


class InternalError(MeterClientError):
    pass


_BY_REASON: dict[str, type[MeterClientError]] = {
    "INVALID_ARGUMENT": InvalidArgument,
    "REQUEST_ID_REUSED": RequestIdReused,
    "LICENSE_NOT_FOUND": LicenseNotFound,
    "POLICY_NOT_FOUND": PolicyNotFound,
    "MACHINE_NOT_FOUND": MachineNotFound,
    "USAGE_LIMIT_EXCEEDED": UsageLimitExceeded,
    "MACHINE_LIMIT_EXCEEDED": MachineLimitExceeded,
    "CORE_LIMIT_EXCEEDED": CoreLimitExceeded,
    "WATCH_LIMIT_EXCEEDED": WatchLimitExceeded,
    "LICENSE_FILE_TOO_LARGE": LicenseFileTooLarge,
    "USAGE_EVENTS_DISABLED": UsageEventsDisabled,
    "USAGE_EVENTS_TRIMMED": UsageEventsTrimmed,
    "USAGE_UNDERFLOW": UsageUnderflow,
    "LICENSE_SUSPENDED": LicenseSuspended,
    "LICENSE_EXPIRED": LicenseExpired,
    "POLICY_IN_USE": PolicyInUse,
    "FINGERPRINT_TAKEN": FingerprintTaken,
    "LICENSE_KEY_TAKEN": LicenseKeyTaken,
    "UNAUTHENTICATED": Unauthenticated,
    "PERMISSION_DENIED": PermissionDenied,
    "STORAGE_UNAVAILABLE": Unavailable,
    "METER_NOT_FOUND": MeterNotFound,
    "METER_NOT_ENTITLED": MeterNotEntitled,
    "RESERVATION_NOT_FOUND": ReservationNotFound,
    "RESERVATION_EXPIRED": ReservationExpired,
    "RESERVATION_LIMIT_EXCEEDED": ReservationLimitExceeded,
}

_BY_CODE: dict[grpc.StatusCode, type[MeterClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: LimitExceeded,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNKNOWN: InternalError,
    grpc.StatusCode.UNIMPLEMENTED: InternalError,
    grpc.StatusCode.DATA_LOSS: InternalError,
}


def error_for(
    reason: str,
    message: str,
    *,
    code: grpc.StatusCode | None = None,
    metadata: Mapping[str, str] | None = None,
    field_violations: Sequence[FieldViolation] = (),
    retry_delay: float | None = None,
) -> MeterClientError:
    """The exception of a reason (or, without one, of a status code)."""
    cls = _BY_REASON.get(reason) or _BY_CODE.get(code or grpc.StatusCode.UNKNOWN, MeterClientError)
    if code is None:
        code = _CODE_OF_CLASS.get(cls, grpc.StatusCode.UNKNOWN)
    return cls(
        message,
        code=code,
        reason=reason,
        metadata=metadata,
        field_violations=field_violations,
        retry_delay=retry_delay,
    )


_CODE_OF_CLASS: dict[type[MeterClientError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    RequestIdReused: grpc.StatusCode.INVALID_ARGUMENT,
    LicenseNotFound: grpc.StatusCode.NOT_FOUND,
    PolicyNotFound: grpc.StatusCode.NOT_FOUND,
    MachineNotFound: grpc.StatusCode.NOT_FOUND,
    UsageLimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    MachineLimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    CoreLimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UsageUnderflow: grpc.StatusCode.FAILED_PRECONDITION,
    LicenseSuspended: grpc.StatusCode.FAILED_PRECONDITION,
    LicenseExpired: grpc.StatusCode.FAILED_PRECONDITION,
    PolicyInUse: grpc.StatusCode.FAILED_PRECONDITION,
    FingerprintTaken: grpc.StatusCode.ALREADY_EXISTS,
    LicenseKeyTaken: grpc.StatusCode.ALREADY_EXISTS,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def from_rpc_error(exc: grpc.RpcError) -> MeterClientError:
    """The exception for a failed call (sync grpc.RpcError or grpc.aio.AioRpcError)."""
    call: grpc.Call = exc  # type: ignore[assignment]  # every RpcError raised by a call is one
    code = call.code()
    message = call.details() or code.name
    reason, metadata = "", {}
    violations: list[FieldViolation] = []
    retry_delay = None
    try:
        status = rpc_status.from_call(call)
    except ValueError:  # a status whose details contradict the call's code: keep the code
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == DOMAIN:
                reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info_r = error_details_pb2.RetryInfo()
            detail.Unpack(info_r)
            retry_delay = info_r.retry_delay.ToTimedelta().total_seconds()
    return error_for(
        reason,
        message,
        code=code,
        metadata=metadata,
        field_violations=violations,
        retry_delay=retry_delay,
    )
