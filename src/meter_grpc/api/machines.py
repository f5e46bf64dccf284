"""LicenseService RPCs of machine activations and validation (mixed into LicenseService)."""

from __future__ import annotations


class MachineRpcs:
    """ActivateMachine, DeactivateMachine, GetMachine, ListMachines, UpdateMachine,
    MachineHeartbeat, ValidateLicense, CheckInLicense."""
