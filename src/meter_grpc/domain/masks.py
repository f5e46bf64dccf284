"""update_mask paths (AIP-134, AIP-161): the proto field names a caller writes, mapped to the
attributes of the domain dataclasses they set.

One table per resource names every field of its proto message: those an update may set (and
the attribute each one sets), and those it may not (output only, or fixed at creation), so
that every refusal says why and which names are accepted. The tests check the tables against
the message descriptors, so a field added to a proto and forgotten here fails a test.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from meter_grpc.domain.errors import invalid
from meter_grpc.domain.rules import Violations

# "*" replaces every updatable field with the request's value, unset ones included (AIP-134).
WILDCARD = "*"
_MASK = "update_mask"
_PATHS = "update_mask.paths"
# A refused request names at most this many bad paths (the rest are counted), and quotes at
# most this many characters of each: the error's details stay small whatever was sent.
_MAX_REPORTED = 10
_MAX_QUOTED = 80

OUTPUT_ONLY = "is output only"
AT_CREATION = "is set at creation only"


@dataclass(frozen=True, slots=True)
class MaskTable:
    resource: str
    # proto field name -> attribute it sets, for every field an update may set
    fields: Mapping[str, str]
    # proto field name -> why it cannot be updated (OUTPUT_ONLY, AT_CREATION, or a hint)
    fixed: Mapping[str, str]

    @property
    def accepted(self) -> str:
        return ", ".join(sorted(self.fields)) + f', or "{WILDCARD}" alone for all of them'

    def resolve(self, paths: Iterable[str]) -> dict[str, str]:
        """The paths of an update_mask as {proto name: attribute}, in the caller's order.

        Refuses (INVALID_ARGUMENT, BadRequest on update_mask / update_mask.paths) an empty
        mask, unknown or fixed fields, nested paths ("duration.seconds", "metadata.key": the
        field is replaced as a whole), and "*" mixed with other paths."""
        paths = list(paths)
        if not paths:
            raise invalid(
                _MASK,
                f"is required: name the {self.resource} fields to change ({self.accepted})",
            )
        if WILDCARD in paths:
            if len(set(paths)) > 1:
                raise invalid(
                    _PATHS,
                    f'"{WILDCARD}" replaces every field and must be the only path '
                    f"(got {len(paths)} paths)",
                )
            return dict(self.fields)
        v = Violations()
        bad = 0
        for path in paths:
            problem = self._problem(path)
            if problem is None:
                continue
            bad += 1
            if bad <= _MAX_REPORTED:
                v.add(_PATHS, f"{_quote(path)} {problem}")
        if bad > _MAX_REPORTED:
            v.add(_PATHS, f"... and {bad - _MAX_REPORTED} more paths that cannot be updated")
        v.raise_if_any()
        return {p: self.fields[p] for p in dict.fromkeys(paths)}

    def _problem(self, path: str) -> str | None:
        if path in self.fields:
            return None
        if path in self.fixed:
            return f"{self.fixed[path]}: it cannot be updated (accepted: {self.accepted})"
        head, dot, _ = path.partition(".")
        if dot and (head in self.fields or head in self.fixed):
            return (
                f"is a nested path, which Update{self.resource} does not take: name the whole "
                f"field {head!r} (it is replaced as a whole)"
            )
        hint = next((f for f, a in self.fields.items() if a == path and a != f), None)
        if hint is not None:
            return (
                f"is not a field of {self.resource}: update_mask takes the proto field names; "
                f"did you mean {hint!r}? (accepted: {self.accepted})"
            )
        return f"is not a field of {self.resource} (accepted: {self.accepted})"


def _quote(path: str) -> str:
    return repr(path if len(path) <= _MAX_QUOTED else path[:_MAX_QUOTED] + "...")


POLICY = MaskTable(
    "Policy",
    fields={
        "name": "name",
        "max_uses": "max_uses",
        "max_machines": "max_machines",
        "max_cores": "max_cores",
        "floating": "floating",
        "strict": "strict",
        "duration": "duration_ms",
        "expiration_strategy": "expiration_strategy",
        "require_check_in": "require_check_in",
        "check_in_interval": "check_in_interval_ms",
        "heartbeat_duration": "heartbeat_duration_ms",
        "entitlements": "entitlements",
        "overage_strategy": "overage_strategy",
        "usage_reset_interval": "usage_reset_interval",
        "metadata": "metadata",
        "meters": "meters",
    },
    fixed={
        "id": OUTPUT_ONLY + " (the policy is named by policy.id)",
        "create_time": OUTPUT_ONLY,
        "update_time": OUTPUT_ONLY,
        "revision": OUTPUT_ONLY,
        "propagated_revision": OUTPUT_ONLY,
    },
)

LICENSE = MaskTable(
    "License",
    fields={
        "name": "name",
        "expire_time": "expire_time_ms",
        "max_uses": "max_uses_override",
        "max_machines": "max_machines_override",
        "max_cores": "max_cores_override",
        "entitlements": "entitlements",
        "metadata": "metadata",
        "meter_overrides": "meter_overrides",
    },
    fixed={
        "id": OUTPUT_ONLY + " (the license is named by license.id)",
        "key": AT_CREATION,
        "policy_id": AT_CREATION,
        "status": OUTPUT_ONLY + " (SuspendLicense, ReinstateLicense, RenewLicense change it)",
        "uses": OUTPUT_ONLY + " (the UsageService changes it)",
        "machines_count": OUTPUT_ONLY,
        "cores_count": OUTPUT_ONLY,
        "last_check_in_time": OUTPUT_ONLY + " (CheckInLicense sets it)",
        "create_time": OUTPUT_ONLY,
        "update_time": OUTPUT_ONLY,
    },
)

MACHINE = MaskTable(
    "Machine",
    fields={"cores": "cores", "name": "name", "metadata": "metadata"},
    fixed={
        "id": OUTPUT_ONLY + " (the machine is named by machine.id)",
        "license_id": AT_CREATION,
        "fingerprint": AT_CREATION,
        "hostname": AT_CREATION,
        "platform": AT_CREATION,
        "last_heartbeat_time": OUTPUT_ONLY + " (MachineHeartbeat sets it)",
        "create_time": OUTPUT_ONLY,
    },
)
