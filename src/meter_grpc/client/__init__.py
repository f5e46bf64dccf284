"""meter_grpc.client: Python clients of meter-grpc, license file verification, and usage that
keeps working offline.

    from meter_grpc.client import MeterClient, OfflineMeter

    client = MeterClient("meter.example.com:443", license_key=KEY, tls=True)
    meter = OfflineMeter(client, LICENSE_ID, "usage-journal.sqlite3", public_key=PUBLIC_KEY)
    meter.refresh_license_file()  # while online: the offline allowance comes from this file
    meter.use(1)                  # online, or journaled offline within the allowance
    meter.sync()                  # sends the journal once the service is back

Every failed call raises a MeterClientError subclass (`.code`, `.reason`, `.metadata`,
`.field_violations`, `.retry_delay`).
"""

from meter_grpc.client.aio import AsyncMeterClient
from meter_grpc.client.errors import (
    AlreadyExists,
    CoreLimitExceeded,
    FailedPrecondition,
    FieldViolation,
    FingerprintTaken,
    InternalError,
    InvalidArgument,
    LicenseExpired,
    LicenseFileTooLarge,
    LicenseKeyTaken,
    LicenseNotFound,
    LicenseSuspended,
    LimitExceeded,
    MachineLimitExceeded,
    MachineNotFound,
    MeterClientError,
    MeterNotEntitled,
    MeterNotFound,
    NotFound,
    NoValidLicenseFile,
    PermissionDenied,
    PolicyInUse,
    PolicyNotFound,
    RequestIdReused,
    ReservationExpired,
    ReservationLimitExceeded,
    ReservationNotFound,
    Unauthenticated,
    Unavailable,
    UsageEventsDisabled,
    UsageEventsTrimmed,
    UsageLimitExceeded,
    UsageUnderflow,
    WatchLimitExceeded,
)
from meter_grpc.client.journal import JournalRecord, UsageJournal
from meter_grpc.client.license_file import LicenseFileError, verify_license_file
from meter_grpc.client.offline import AsyncOfflineMeter, OfflineMeter, SyncReport, UseResult
from meter_grpc.client.reservations import AsyncReservation, Reservation
from meter_grpc.client.sync import MeterClient

__all__ = [
    "AlreadyExists",
    "AsyncMeterClient",
    "AsyncOfflineMeter",
    "AsyncReservation",
    "CoreLimitExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "FingerprintTaken",
    "InternalError",
    "InvalidArgument",
    "JournalRecord",
    "LicenseExpired",
    "LicenseFileError",
    "LicenseFileTooLarge",
    "LicenseKeyTaken",
    "LicenseNotFound",
    "LicenseSuspended",
    "LimitExceeded",
    "MachineLimitExceeded",
    "MachineNotFound",
    "MeterClient",
    "MeterClientError",
    "MeterNotEntitled",
    "MeterNotFound",
    "NoValidLicenseFile",
    "NotFound",
    "OfflineMeter",
    "PermissionDenied",
    "PolicyInUse",
    "PolicyNotFound",
    "RequestIdReused",
    "Reservation",
    "ReservationExpired",
    "ReservationLimitExceeded",
    "ReservationNotFound",
    "SyncReport",
    "Unauthenticated",
    "Unavailable",
    "UsageEventsDisabled",
    "UsageEventsTrimmed",
    "UsageJournal",
    "UsageLimitExceeded",
    "UsageUnderflow",
    "UseResult",
    "WatchLimitExceeded",
    "verify_license_file",
]
