"""verify_license_file: trust a license file with no network at all."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from meter_grpc.domain import license_file
from meter_grpc.domain.license_file import MAX_CLOCK_SKEW_MS, LicenseFileError

__all__ = ["MAX_CLOCK_SKEW_MS", "LicenseFileError", "verify_license_file"]


def _ms(now: dt.datetime | None) -> int:
    if now is None:
        return time.time_ns() // 1_000_000
    if now.tzinfo is None:
        raise ValueError("`now` must be timezone-aware")
    return int(now.timestamp() * 1000)


def verify_license_file(
    certificate: str,
    public_key: bytes | str | Ed25519PublicKey,
    license_key: str | None = None,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """The payload of a license file, once it is proven genuine and current.

    Checks the armor, the Ed25519 signature (`public_key`: the 32 raw bytes of GetPublicKey,
    their hex, or a key object), decrypts an encrypted file with `license_key`, and refuses a
    file that has expired or was issued more than 5 minutes after `now` (default: this
    machine's clock). Raises LicenseFileError (`.reason` says which check failed).
    """
    return license_file.verify(certificate, public_key, license_key, now_ms=_ms(now))
