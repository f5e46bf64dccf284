"""LicenseService RPCs of offline licensing (mixed into LicenseService)."""

from __future__ import annotations


class OfflineRpcs:
    """CheckOutLicense, GetPublicKey."""
