"""meter.v1.LicenseService: policies, licenses (and, from their own modules, machines,
validation and license files)."""

from __future__ import annotations

from typing import Any

from meter.v1 import license_service_pb2 as pb
from meter.v1 import license_service_pb2_grpc as pb_grpc
from meter_grpc.api.convert import (
    license_from_proto,
    license_to_proto,
    policy_from_proto,
    policy_to_proto,
)
from meter_grpc.api.machines import MachineRpcs
from meter_grpc.api.offline import OfflineRpcs
from meter_grpc.domain.licensing import Licensing
from meter_grpc.domain.machines import Machines
from meter_grpc.domain.offline import LicenseFiles
from meter_grpc.domain.rules import Violations
from meter_grpc.domain.validation import Validator

Ctx = Any


class LicenseService(MachineRpcs, OfflineRpcs, pb_grpc.LicenseServiceServicer):
    """Policies and licenses here; machines/validation in MachineRpcs, license files in
    OfflineRpcs. RPCs not implemented answer UNIMPLEMENTED (the generated base class)."""

    def __init__(
        self,
        licensing: Licensing,
        *,
        machines: Machines,
        validator: Validator,
        license_files: LicenseFiles,
    ) -> None:
        self.licensing = licensing
        self.machines = machines
        self.validator = validator
        self.license_files = license_files

    def _now(self) -> int:
        return self.licensing.clock.now_ms()

    # --- policies -------------------------------------------------------------------------

    async def CreatePolicy(
        self, request: pb.CreatePolicyRequest, context: Ctx
    ) -> pb.CreatePolicyResponse:
        v = Violations()
        policy = policy_from_proto(request.policy, v)
        v.raise_if_any()
        return pb.CreatePolicyResponse(
            policy=policy_to_proto(await self.licensing.create_policy(policy, request.request_id))
        )

    async def GetPolicy(self, request: pb.GetPolicyRequest, context: Ctx) -> pb.GetPolicyResponse:
        return pb.GetPolicyResponse(
            policy=policy_to_proto(await self.licensing.get_policy(request.id))
        )

    async def ListPolicies(
        self, request: pb.ListPoliciesRequest, context: Ctx
    ) -> pb.ListPoliciesResponse:
        policies, token = await self.licensing.list_policies(request.page_size, request.page_token)
        return pb.ListPoliciesResponse(
            policies=[policy_to_proto(p) for p in policies], next_page_token=token
        )

    async def UpdatePolicy(
        self, request: pb.UpdatePolicyRequest, context: Ctx
    ) -> pb.UpdatePolicyResponse:
        v = Violations()
        patch = policy_from_proto(request.policy, v)
        v.raise_if_any()
        policy = await self.licensing.update_policy(patch, request.update_mask.paths)
        return pb.UpdatePolicyResponse(policy=policy_to_proto(policy))

    async def DeletePolicy(
        self, request: pb.DeletePolicyRequest, context: Ctx
    ) -> pb.DeletePolicyResponse:
        await self.licensing.delete_policy(request.id)
        return pb.DeletePolicyResponse()

    # --- licenses -------------------------------------------------------------------------

    async def CreateLicense(
        self, request: pb.CreateLicenseRequest, context: Ctx
    ) -> pb.CreateLicenseResponse:
        lic = await self.licensing.create_license(
            license_from_proto(request.license), request.request_id
        )
        return pb.CreateLicenseResponse(license=license_to_proto(lic, self._now()))

    async def GetLicense(
        self, request: pb.GetLicenseRequest, context: Ctx
    ) -> pb.GetLicenseResponse:
        lic = await self.licensing.get_license(request.id)
        return pb.GetLicenseResponse(license=license_to_proto(lic, self._now()))

    async def ListLicenses(
        self, request: pb.ListLicensesRequest, context: Ctx
    ) -> pb.ListLicensesResponse:
        licenses, token = await self.licensing.list_licenses(
            request.policy_id, request.page_size, request.page_token
        )
        now = self._now()
        return pb.ListLicensesResponse(
            licenses=[license_to_proto(lic, now) for lic in licenses], next_page_token=token
        )

    async def UpdateLicense(
        self, request: pb.UpdateLicenseRequest, context: Ctx
    ) -> pb.UpdateLicenseResponse:
        lic = await self.licensing.update_license(
            license_from_proto(request.license), request.update_mask.paths
        )
        return pb.UpdateLicenseResponse(license=license_to_proto(lic, self._now()))

    async def DeleteLicense(
        self, request: pb.DeleteLicenseRequest, context: Ctx
    ) -> pb.DeleteLicenseResponse:
        await self.licensing.delete_license(request.id)
        return pb.DeleteLicenseResponse()

    async def RotateLicenseKey(
        self, request: pb.RotateLicenseKeyRequest, context: Ctx
    ) -> pb.RotateLicenseKeyResponse:
        lic = await self.licensing.rotate_license_key(request.id, request.key)
        return pb.RotateLicenseKeyResponse(license=license_to_proto(lic, self._now()))

    async def SuspendLicense(
        self, request: pb.SuspendLicenseRequest, context: Ctx
    ) -> pb.SuspendLicenseResponse:
        lic = await self.licensing.suspend_license(request.id)
        return pb.SuspendLicenseResponse(license=license_to_proto(lic, self._now()))

    async def ReinstateLicense(
        self, request: pb.ReinstateLicenseRequest, context: Ctx
    ) -> pb.ReinstateLicenseResponse:
        lic = await self.licensing.reinstate_license(request.id)
        return pb.ReinstateLicenseResponse(license=license_to_proto(lic, self._now()))

    async def RenewLicense(
        self, request: pb.RenewLicenseRequest, context: Ctx
    ) -> pb.RenewLicenseResponse:
        lic = await self.licensing.renew_license(request.id)
        return pb.RenewLicenseResponse(license=license_to_proto(lic, self._now()))
