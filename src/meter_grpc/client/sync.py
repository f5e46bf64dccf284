"""MeterClient: the blocking client of both meter.v1 services (grpc)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import grpc

from meter.v1 import license_pb2, machine_pb2, policy_pb2, usage_pb2
from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from meter_grpc.client import _common as c
from meter_grpc.client.errors import from_rpc_error
from meter_grpc.client.reservations import Reservation

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class MeterClient:
    """Blocking client of LicenseService and UsageService.

    Authenticates with an admin token or a license key (SPEC §5); plaintext unless `tls` (or
    root certificates, or a client key for mutual TLS) is given. Every failed call raises a
    `meter_grpc.client.MeterClientError` subclass. Use as a context manager, or call close().
    """

    def __init__(
        self,
        target: str,
        *,
        admin_token: str | None = None,
        license_key: str | None = None,
        tls: bool | grpc.ChannelCredentials = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        timeout: float | None = c.DEFAULT_TIMEOUT_S,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.license_key = license_key
        self.timeout = timeout
        self._metadata = c.auth_metadata(admin_token, license_key)
        creds = c.channel_credentials(tls, root_certificates, private_key, certificate_chain)
        opts = c.channel_options(options)
        self._channel = (
            grpc.insecure_channel(target, opts)
            if creds is None
            else grpc.secure_channel(target, creds, opts)
        )
        self._licenses = lgrpc.LicenseServiceStub(self._channel)
        self._usage = ugrpc.UsageServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> MeterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: grpc.UnaryUnaryMultiCallable[Req, Resp], request: Req) -> Resp:
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    def _stream(self, responses: Iterable[Resp]) -> Iterator[Resp]:
        try:
            yield from responses
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    # --- policies -------------------------------------------------------------------------

    def create_policy(self, policy: policy_pb2.Policy) -> policy_pb2.Policy:
        req = lpb.CreatePolicyRequest(policy=policy)
        return self._call(self._licenses.CreatePolicy, req).policy

    def get_policy(self, id: str) -> policy_pb2.Policy:
        return self._call(self._licenses.GetPolicy, lpb.GetPolicyRequest(id=id)).policy

    def list_policies(self, page_size: int = 0, page_token: str = "") -> lpb.ListPoliciesResponse:
        req = lpb.ListPoliciesRequest(page_size=page_size, page_token=page_token)
        return self._call(self._licenses.ListPolicies, req)

    def update_policy(
        self, policy: policy_pb2.Policy, update_mask: Iterable[str]
    ) -> policy_pb2.Policy:
        req = lpb.UpdatePolicyRequest(policy=policy, update_mask=c.field_mask(update_mask))
        return self._call(self._licenses.UpdatePolicy, req).policy

    def delete_policy(self, id: str) -> None:
        self._call(self._licenses.DeletePolicy, lpb.DeletePolicyRequest(id=id))

    # --- licenses -------------------------------------------------------------------------

    def create_license(self, license: license_pb2.License) -> license_pb2.License:
        req = lpb.CreateLicenseRequest(license=license)
        return self._call(self._licenses.CreateLicense, req).license

    def get_license(self, id: str) -> license_pb2.License:
        return self._call(self._licenses.GetLicense, lpb.GetLicenseRequest(id=id)).license

    def list_licenses(
        self, policy_id: str = "", page_size: int = 0, page_token: str = ""
    ) -> lpb.ListLicensesResponse:
        req = lpb.ListLicensesRequest(
            policy_id=policy_id, page_size=page_size, page_token=page_token
        )
        return self._call(self._licenses.ListLicenses, req)

    def update_license(
        self, license: license_pb2.License, update_mask: Iterable[str]
    ) -> license_pb2.License:
        req = lpb.UpdateLicenseRequest(license=license, update_mask=c.field_mask(update_mask))
        return self._call(self._licenses.UpdateLicense, req).license

    def delete_license(self, id: str) -> None:
        self._call(self._licenses.DeleteLicense, lpb.DeleteLicenseRequest(id=id))

    def rotate_license_key(self, id: str, key: str = "") -> license_pb2.License:
        """A new key for the license (generated unless given); the old one stops working."""
        req = lpb.RotateLicenseKeyRequest(id=id, key=key)
        return self._call(self._licenses.RotateLicenseKey, req).license

    def suspend_license(self, id: str) -> license_pb2.License:
        return self._call(self._licenses.SuspendLicense, lpb.SuspendLicenseRequest(id=id)).license

    def reinstate_license(self, id: str) -> license_pb2.License:
        req = lpb.ReinstateLicenseRequest(id=id)
        return self._call(self._licenses.ReinstateLicense, req).license

    def renew_license(self, id: str) -> license_pb2.License:
        return self._call(self._licenses.RenewLicense, lpb.RenewLicenseRequest(id=id)).license

    def validate_license(
        self,
        license_id: str = "",
        *,
        key: str = "",
        fingerprint: str = "",
        entitlements: Iterable[str] = (),
    ) -> lpb.ValidateLicenseResponse:
        req = lpb.ValidateLicenseRequest(fingerprint=fingerprint, entitlements=list(entitlements))
        if key:
            req.key = key
        else:
            req.license_id = license_id
        return self._call(self._licenses.ValidateLicense, req)

    # --- machines -------------------------------------------------------------------------

    def activate_machine(
        self,
        license_id: str,
        fingerprint: str,
        *,
        cores: int = 0,
        name: str = "",
        hostname: str = "",
        platform: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> machine_pb2.Machine:
        req = lpb.ActivateMachineRequest(
            license_id=license_id,
            fingerprint=fingerprint,
            cores=cores,
            name=name,
            hostname=hostname,
            platform=platform,
            metadata=c.string_map(metadata),
        )
        return self._call(self._licenses.ActivateMachine, req).machine

    def deactivate_machine(self, id: str) -> None:
        self._call(self._licenses.DeactivateMachine, lpb.DeactivateMachineRequest(id=id))

    def get_machine(self, id: str) -> machine_pb2.Machine:
        return self._call(self._licenses.GetMachine, lpb.GetMachineRequest(id=id)).machine

    def list_machines(
        self, license_id: str, page_size: int = 0, page_token: str = ""
    ) -> lpb.ListMachinesResponse:
        req = lpb.ListMachinesRequest(
            license_id=license_id, page_size=page_size, page_token=page_token
        )
        return self._call(self._licenses.ListMachines, req)

    def update_machine(
        self, machine: machine_pb2.Machine, update_mask: Iterable[str]
    ) -> machine_pb2.Machine:
        req = lpb.UpdateMachineRequest(machine=machine, update_mask=c.field_mask(update_mask))
        return self._call(self._licenses.UpdateMachine, req).machine

    def machine_heartbeat(self, id: str) -> machine_pb2.Machine:
        req = lpb.MachineHeartbeatRequest(id=id)
        return self._call(self._licenses.MachineHeartbeat, req).machine

    def check_in_license(self, id: str) -> license_pb2.License:
        return self._call(self._licenses.CheckInLicense, lpb.CheckInLicenseRequest(id=id)).license

    # --- license files --------------------------------------------------------------------

    def check_out_license(
        self,
        id: str,
        *,
        ttl: dt.timedelta | None = None,
        encrypt: bool = False,
        fingerprint: str = "",
    ) -> lpb.CheckOutLicenseResponse:
        """A signed license file; `ttl` None = 30 days, timedelta(0) = never expires."""
        req = lpb.CheckOutLicenseRequest(
            id=id, ttl=c.duration(ttl), encrypt=encrypt, fingerprint=fingerprint
        )
        return self._call(self._licenses.CheckOutLicense, req)

    def get_public_key(self) -> bytes:
        """The raw 32-byte Ed25519 key that verifies license files."""
        return bytes(self._call(self._licenses.GetPublicKey, lpb.GetPublicKeyRequest()).public_key)

    # --- usage ----------------------------------------------------------------------------

    def increment_usage(
        self, license_id: str, amount: int = 1, request_id: str = "", *, meter: str = ""
    ) -> upb.IncrementUsageResponse:
        """`meter`: a meter of the license's policy ("" = the license's own counter)."""
        req = upb.IncrementUsageRequest(
            license_id=license_id, amount=amount, request_id=request_id, meter=meter
        )
        return self._call(self._usage.IncrementUsage, req)

    def decrement_usage(
        self, license_id: str, amount: int = 1, request_id: str = "", *, meter: str = ""
    ) -> upb.DecrementUsageResponse:
        req = upb.DecrementUsageRequest(
            license_id=license_id, amount=amount, request_id=request_id, meter=meter
        )
        return self._call(self._usage.DecrementUsage, req)

    def reset_usage(
        self, license_id: str, request_id: str = "", *, meter: str = ""
    ) -> upb.ResetUsageResponse:
        req = upb.ResetUsageRequest(license_id=license_id, request_id=request_id, meter=meter)
        return self._call(self._usage.ResetUsage, req)

    def get_usage(self, license_id: str, *, meter: str = "") -> upb.GetUsageResponse:
        return self._call(
            self._usage.GetUsage, upb.GetUsageRequest(license_id=license_id, meter=meter)
        )

    def list_usage(self, license_id: str) -> upb.ListUsageResponse:
        """Every counter of the license: its own (`meter` ""), then each meter."""
        return self._call(self._usage.ListUsage, upb.ListUsageRequest(license_id=license_id))

    def reserve_usage(
        self,
        license_id: str,
        amount: int,
        *,
        meter: str = "",
        ttl: dt.timedelta | float | None = None,
        request_id: str = "",
    ) -> upb.ReserveUsageResponse:
        """Holds `amount` units of a counter for `ttl` (seconds or a timedelta; None: 10 min)."""
        return self._call(
            self._usage.ReserveUsage, c.reserve_request(license_id, amount, meter, ttl, request_id)
        )

    def commit_reservation(
        self, license_id: str, reservation_id: str, amount: int = 0, request_id: str = ""
    ) -> upb.CommitReservationResponse:
        req = upb.CommitReservationRequest(
            license_id=license_id,
            reservation_id=reservation_id,
            amount=amount,
            request_id=request_id,
        )
        return self._call(self._usage.CommitReservation, req)

    def release_reservation(
        self, license_id: str, reservation_id: str, request_id: str = ""
    ) -> upb.ReleaseReservationResponse:
        req = upb.ReleaseReservationRequest(
            license_id=license_id, reservation_id=reservation_id, request_id=request_id
        )
        return self._call(self._usage.ReleaseReservation, req)

    def reserve(
        self,
        license_id: str,
        amount: int,
        *,
        meter: str = "",
        ttl: dt.timedelta | float | None = None,
        request_id: str = "",
    ) -> Reservation:
        """`with client.reserve(lic, 1000, meter="GPU_SECONDS", ttl=600) as r: ...
        r.commit(734)`: released on leaving the block uncommitted (an exception included)."""
        r = self.reserve_usage(license_id, amount, meter=meter, ttl=ttl, request_id=request_id)
        return Reservation(self, r)

    def export_status(self) -> upb.ExportStatusResponse:
        """Per export sink: lag in events and seconds, last error, dead letters (admin)."""
        return self._call(self._usage.ExportStatus, upb.ExportStatusRequest())

    def replay_dead_letters(self, sink: str, limit: int = 0) -> upb.ReplayDeadLettersResponse:
        """Delivers up to `limit` (0: all) dead letters of `sink` again (admin)."""
        req = upb.ReplayDeadLettersRequest(sink=sink, limit=limit)
        return self._call(self._usage.ReplayDeadLetters, req)

    def forget_export_sink(self, sink: str) -> upb.ForgetExportSinkResponse:
        """Removes the consumer groups and dead letters of a sink no replica configures any
        longer (admin)."""
        req = upb.ForgetExportSinkRequest(sink=sink)
        return self._call(self._usage.ForgetExportSink, req)

    def batch_increment_usage(
        self, items: Sequence[upb.IncrementUsageRequest]
    ) -> upb.BatchIncrementUsageResponse:
        """Up to 1,000 increments for any licenses: `results[i]` answers `items[i]` with its
        `result` or its `error` (a google.rpc.Status), each as increment_usage would."""
        req = upb.BatchIncrementUsageRequest(items=items)
        return self._call(self._usage.BatchIncrementUsage, req)

    def sync_usage(
        self, license_id: str, records: Sequence[usage_pb2.UsageRecord]
    ) -> upb.SyncUsageResponse:
        """Applies offline records (at most 1000 a call); see UsageRecordOutcome."""
        req = upb.SyncUsageRequest(license_id=license_id, records=records)
        return self._call(self._usage.SyncUsage, req)

    def stream_usage(
        self, requests: Iterable[upb.IncrementUsageRequest]
    ) -> Iterator[upb.StreamUsageResponse]:
        return self._stream(
            self._usage.StreamUsage(iter(requests), timeout=None, metadata=self._metadata)
        )

    def watch_usage(
        self, license_id: str, after_event_id: str = "", *, from_oldest: bool = False
    ) -> Iterator[upb.WatchUsageResponse]:
        """Usage events: new ones, those after `after_event_id`, or every retained one
        (`from_oldest`)."""
        req = upb.WatchUsageRequest(
            license_id=license_id, after_event_id=after_event_id, from_oldest=from_oldest
        )
        return self._stream(self._usage.WatchUsage(req, timeout=None, metadata=self._metadata))
