"""LicenseService RPCs of offline licensing (mixed into LicenseService)."""

from __future__ import annotations

from typing import Any

from meter.v1 import license_service_pb2 as pb
from meter_grpc.api import auth
from meter_grpc.api.convert import ts, ttl_ms
from meter_grpc.domain.offline import LicenseFiles

Ctx = Any


class OfflineRpcs:
    """CheckOutLicense, GetPublicKey."""

    license_files: LicenseFiles

    async def CheckOutLicense(
        self, request: pb.CheckOutLicenseRequest, context: Ctx
    ) -> pb.CheckOutLicenseResponse:
        f = await self.license_files.check_out(
            request.id,
            ttl_ms(request.ttl) if request.HasField("ttl") else None,
            request.encrypt,
            request.fingerprint,
            auth.current().key,
        )
        return pb.CheckOutLicenseResponse(
            certificate=f.certificate, issue_time=ts(f.issued_ms), expire_time=ts(f.expiry_ms)
        )

    async def GetPublicKey(
        self, request: pb.GetPublicKeyRequest, context: Ctx
    ) -> pb.GetPublicKeyResponse:
        key = self.license_files.public_key
        return pb.GetPublicKeyResponse(
            public_key=key,
            algorithm=self.license_files.algorithm,
            public_key_hex=key.hex(),
            public_key_pem=self.license_files.public_key_pem,
        )
