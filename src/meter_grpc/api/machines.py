"""LicenseService RPCs of machine activations and validation (mixed into LicenseService)."""

from __future__ import annotations

from typing import Any

from meter.v1 import license_service_pb2 as pb
from meter_grpc.api.convert import license_to_proto, machine_from_proto, machine_to_proto
from meter_grpc.domain.licensing import Licensing
from meter_grpc.domain.machines import Machines
from meter_grpc.domain.models import Machine
from meter_grpc.domain.validation import Validator

Ctx = Any


class MachineRpcs:
    """ActivateMachine, DeactivateMachine, GetMachine, ListMachines, UpdateMachine,
    MachineHeartbeat, ValidateLicense, CheckInLicense."""

    licensing: Licensing
    machines: Machines
    validator: Validator

    async def ValidateLicense(
        self, request: pb.ValidateLicenseRequest, context: Ctx
    ) -> pb.ValidateLicenseResponse:
        license_id = await self.validator.resolve(
            request.license_id,
            request.key,
            request.WhichOneof("license"),
            request.fingerprint,
            request.entitlements,
        )
        result = await self.validator.validate(
            license_id, request.fingerprint, request.entitlements
        )
        lic = result.license
        return pb.ValidateLicenseResponse(
            valid=result.valid,
            code=int(result.code),  # type: ignore[arg-type]
            detail=result.detail,
            license=license_to_proto(lic, self.licensing.clock.now_ms()) if lic else None,
        )

    async def ActivateMachine(
        self, request: pb.ActivateMachineRequest, context: Ctx
    ) -> pb.ActivateMachineResponse:
        machine = await self.machines.activate(
            Machine(
                license_id=request.license_id,
                fingerprint=request.fingerprint,
                cores=request.cores,
                name=request.name,
                hostname=request.hostname,
                platform=request.platform,
                metadata=dict(request.metadata),
            ),
            request.request_id,
        )
        return pb.ActivateMachineResponse(machine=machine_to_proto(machine))

    async def DeactivateMachine(
        self, request: pb.DeactivateMachineRequest, context: Ctx
    ) -> pb.DeactivateMachineResponse:
        await self.machines.deactivate(request.id)
        return pb.DeactivateMachineResponse()

    async def GetMachine(
        self, request: pb.GetMachineRequest, context: Ctx
    ) -> pb.GetMachineResponse:
        return pb.GetMachineResponse(machine=machine_to_proto(await self.machines.get(request.id)))

    async def ListMachines(
        self, request: pb.ListMachinesRequest, context: Ctx
    ) -> pb.ListMachinesResponse:
        machines, token = await self.machines.list(
            request.license_id, request.page_size, request.page_token
        )
        return pb.ListMachinesResponse(
            machines=[machine_to_proto(m) for m in machines], next_page_token=token
        )

    async def UpdateMachine(
        self, request: pb.UpdateMachineRequest, context: Ctx
    ) -> pb.UpdateMachineResponse:
        machine = await self.machines.update(
            machine_from_proto(request.machine), request.update_mask.paths
        )
        return pb.UpdateMachineResponse(machine=machine_to_proto(machine))

    async def MachineHeartbeat(
        self, request: pb.MachineHeartbeatRequest, context: Ctx
    ) -> pb.MachineHeartbeatResponse:
        machine = await self.machines.heartbeat(request.id)
        return pb.MachineHeartbeatResponse(machine=machine_to_proto(machine))

    async def CheckInLicense(
        self, request: pb.CheckInLicenseRequest, context: Ctx
    ) -> pb.CheckInLicenseResponse:
        lic = await self.licensing.check_in(request.id)
        return pb.CheckInLicenseResponse(
            license=license_to_proto(lic, self.licensing.clock.now_ms())
        )
