"""Policies and licenses to and from their Redis representation.

A policy is stored as JSON. A license is a hash whose fields the scripts read directly:
the license's own fields, its limit overrides (`o_*`), a snapshot of the policy fields the
scripts read (`p_*`, and `p_rev`, the policy revision they come from) and its counters
(`uses`, `period`, `machines`, `cores`). The rest of the policy (name, entitlements,
check-in rules, metadata...) is read from the policy's own hash when a License is built
(`license_from_hash(h, policy)`); licenses written before carry the whole policy JSON in
`p_json`, which is ignored when the policy is given and dropped on start (store.py).
Its key is never stored: only `kd`, the key's digest, and `kf`, SHA-256(key) sealed under the
server secret (domain/keysecret.py).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict
from typing import Any

from meter_grpc.domain.models import (
    ExpirationStrategy,
    License,
    Machine,
    Meter,
    OverageStrategy,
    Policy,
    UsageResetInterval,
)


def _opt(value: int | None) -> str:
    return "" if value is None else str(value)


def _parse_opt(value: str | None) -> int | None:
    return None if value is None or value == "" else int(value)


def policy_to_json(p: Policy) -> str:
    d = asdict(p)
    del d["propagated_revision"]  # stored beside the JSON (`synced`), never in a snapshot
    return json.dumps(d, separators=(",", ":"), sort_keys=True)


def policy_from_json(text: str) -> Policy:
    d: dict[str, Any] = json.loads(text)
    d.pop("propagated_revision", None)
    meters = d.pop("meters", None) or []
    p = Policy(**d)
    p.meters = [
        Meter(
            code=m["code"],
            max_uses=m.get("max_uses"),
            overage_strategy=OverageStrategy(m.get("overage_strategy", 0)),
            usage_reset_interval=UsageResetInterval(m.get("usage_reset_interval", 0)),
            entitlement=m.get("entitlement", ""),
        )
        for m in meters
    ]
    p.expiration_strategy = ExpirationStrategy(p.expiration_strategy)
    p.overage_strategy = OverageStrategy(p.overage_strategy)
    p.usage_reset_interval = UsageResetInterval(p.usage_reset_interval)
    return p


# The field of licenses written by earlier versions that held the whole policy JSON.
LEGACY_POLICY_JSON = "p_json"


def meter_spec(m: Meter, policy_entitlements: list[str]) -> str:
    """The `pm:<code>` field of a license hash: "max|overage|reset|entitlement", what the
    scripts read of a meter (common.lua, load_counter). The entitlement is left out when the
    policy itself grants it (every license holds it)."""
    ent = "" if m.entitlement in policy_entitlements else m.entitlement
    return f"{_opt(m.max_uses)}|{int(m.overage_strategy)}|{int(m.usage_reset_interval)}|{ent}"


def meter_snapshot_fields(p: Policy) -> dict[str, str]:
    """`p_meters` (the codes, comma-separated) and one `pm:<code>` per meter; `p_meters` empty
    when the policy has no meter (the scripts then drop it: a license without meters carries
    no meter field)."""
    out = {"p_meters": ",".join(m.code for m in p.meters)}
    for m in p.meters:
        out[f"pm:{m.code}"] = meter_spec(m, p.entitlements)
    return out


def meter_counters(h: dict[str, str], p: Policy) -> dict[str, tuple[int, int, int]]:
    """code -> (uses, period start, reserved) of each meter of `p` in a license hash."""
    return {
        m.code: (
            int(h.get(f"m:{m.code}:u") or 0),
            int(h.get(f"m:{m.code}:per") or 0),
            int(h.get(f"m:{m.code}:r") or 0),
        )
        for m in p.meters
    }


def policy_snapshot_fields(p: Policy) -> dict[str, str]:
    """The `p_*` fields of a license hash (without `p_rev`): what the scripts read."""
    return {
        "p_uses": _opt(p.max_uses),
        "p_machines": _opt(p.max_machines),
        "p_cores": _opt(p.max_cores),
        "p_overage": str(int(p.overage_strategy)),
        "p_expiry_strategy": str(int(p.expiration_strategy)),
        "p_reset": str(int(p.usage_reset_interval)),
        "p_heartbeat": _opt(p.heartbeat_duration_ms),
        "p_floating": "1" if p.floating else "0",
        "p_duration": _opt(p.duration_ms),
        **meter_snapshot_fields(p),
    }


# License attribute -> (hash field, encoder) for the attributes an update may change.
_UPDATABLE: dict[str, tuple[str, Any]] = {
    "name": ("name", str),
    "expire_time_ms": ("expire", _opt),
    "max_uses_override": ("o_uses", _opt),
    "max_machines_override": ("o_machines", _opt),
    "max_cores_override": ("o_cores", _opt),
    "entitlements": ("ents", json.dumps),
    "metadata": ("meta", lambda m: json.dumps(m, sort_keys=True)),
    "suspended": ("suspended", lambda b: "1" if b else "0"),
    # RotateLicenseKey only (UpdateLicense's mask never names them); the key is never stored
    "key_digest": ("kd", str),
    "sealed_file_key": ("kf", str),
    "last_check_in_ms": ("check_in", _opt),
    # code -> limit, as JSON; "" (not kept in a new hash) when there is none
    "meter_overrides": ("mo", lambda o: json.dumps(o, sort_keys=True) if o else ""),
}


def license_fields(changes: dict[str, object]) -> dict[str, str]:
    """Hash fields for changed License attributes (KeyError for one that cannot change)."""
    out = {}
    for attr, value in changes.items():
        field, encode = _UPDATABLE[attr]
        out[field] = encode(value)
    return out


# Values a new license hash leaves out: every reader (the scripts' opt(), license_from_hash)
# takes a missing field for unset, and each field left out keeps the listpack smaller.
_EMPTY_JSON = {"ents": "[]", "meta": "{}"}


def license_to_hash(lic: License) -> dict[str, str]:
    """The hash of a new license, without its unset fields (`uses` is always there: the
    scripts take it for the license's existence)."""
    h = {
        "id": lic.id,
        "policy_id": lic.policy_id,
        **license_fields({attr: getattr(lic, attr) for attr in _UPDATABLE}),
        "created": str(lic.create_time_ms),
        "updated": str(lic.update_time_ms),
        "uses": str(lic.uses),
        "period": str(lic.period_start_ms),
        "machines": str(lic.machines_count),
        "cores": str(lic.cores_count),
        "p_rev": str(lic.policy.revision),
        **policy_snapshot_fields(lic.policy),
    }

    return {k: v for k, v in h.items() if v != "" and _EMPTY_JSON.get(k) != v}


def policy_rev(h: dict[str, str]) -> int:
    """The revision of its policy a license hash follows."""
    return int(h.get("p_rev") or 0)


def snapshot_meters(h: dict[str, str], base: Policy) -> list[Meter]:
    """The meters the license enforces (`p_meters`, `pm:<code>`), entitlements from `base`."""
    out = []
    for code in filter(None, h.get("p_meters", "").split(",")):
        spec = h.get(f"pm:{code}", "").split("|")
        if len(spec) < 4:
            continue
        known = base.meter(code)
        out.append(
            Meter(
                code=code,
                max_uses=_parse_opt(spec[0]),
                overage_strategy=OverageStrategy(int(spec[1] or 0)),
                usage_reset_interval=UsageResetInterval(int(spec[2] or 0)),
                entitlement=known.entitlement if known is not None else spec[3],
            )
        )
    return out


def snapshot_policy(h: dict[str, str], base: Policy | None) -> Policy:
    """The policy as the license follows it: `base` (the policy as stored, at the license's
    revision or newer) with the fields the scripts enforce taken from the license's snapshot
    and the license's revision. Without `base`: the legacy `p_json` copy, else only what the
    snapshot holds."""
    if base is None:
        legacy = h.get(LEGACY_POLICY_JSON)
        base = policy_from_json(legacy) if legacy else Policy(id=h.get("policy_id", ""))
    return dataclasses.replace(
        base,
        max_uses=_parse_opt(h.get("p_uses")),
        max_machines=_parse_opt(h.get("p_machines")),
        max_cores=_parse_opt(h.get("p_cores")),
        overage_strategy=OverageStrategy(int(h.get("p_overage") or 0)),
        expiration_strategy=ExpirationStrategy(int(h.get("p_expiry_strategy") or 0)),
        usage_reset_interval=UsageResetInterval(int(h.get("p_reset") or 0)),
        heartbeat_duration_ms=_parse_opt(h.get("p_heartbeat")),
        floating=h.get("p_floating") == "1",
        duration_ms=_parse_opt(h.get("p_duration")),
        entitlements=list(base.entitlements),
        metadata=dict(base.metadata),
        revision=policy_rev(h),
        propagated_revision=0,
        meters=snapshot_meters(h, base),
    )


def license_from_hash(h: dict[str, str], policy: Policy | None = None) -> License:
    """The License of a hash; `policy`: its policy as stored (see snapshot_policy)."""
    lic = License(
        id=h["id"],
        policy_id=h["policy_id"],
        name=h.get("name", ""),
        suspended=h.get("suspended") == "1",
        expire_time_ms=_parse_opt(h.get("expire")),
        max_uses_override=_parse_opt(h.get("o_uses")),
        max_machines_override=_parse_opt(h.get("o_machines")),
        max_cores_override=_parse_opt(h.get("o_cores")),
        entitlements=json.loads(h.get("ents") or "[]"),
        metadata=json.loads(h.get("meta") or "{}"),
        uses=int(h.get("uses") or 0),
        period_start_ms=int(h.get("period") or 0),
        machines_count=int(h.get("machines") or 0),
        cores_count=int(h.get("cores") or 0),
        last_check_in_ms=_parse_opt(h.get("check_in")),
        create_time_ms=int(h.get("created") or 0),
        update_time_ms=int(h.get("updated") or 0),
        policy=snapshot_policy(h, policy),
        key_digest=h.get("kd", ""),
        sealed_file_key=h.get("kf", ""),
        meter_overrides={k: int(v) for k, v in json.loads(h.get("mo") or "{}").items()},
    )
    lic.meter_counters = meter_counters(h, lic.policy)
    lic.reserved = int(h.get("rsv") or 0)
    return lic


def machine_to_json(m: Machine) -> str:
    """The machine as stored in the machines hash (without its heartbeat, kept in a zset).

    The scripts read `fingerprint` and `cores`; they never re-encode it.
    """
    return json.dumps(
        {
            "id": m.id,
            "license_id": m.license_id,
            "fingerprint": m.fingerprint,
            "cores": m.cores,
            "name": m.name,
            "hostname": m.hostname,
            "platform": m.platform,
            "metadata": m.metadata,
            "created": m.create_time_ms,
        },
        separators=(",", ":"),
        sort_keys=True,
    )


def machine_from_json(text: str, last_heartbeat_ms: int) -> Machine:
    d: dict[str, Any] = json.loads(text)
    return Machine(
        id=d["id"],
        license_id=d["license_id"],
        fingerprint=d["fingerprint"],
        cores=int(d["cores"]),
        name=d.get("name", ""),
        hostname=d.get("hostname", ""),
        platform=d.get("platform", ""),
        metadata=d.get("metadata") or {},
        last_heartbeat_ms=last_heartbeat_ms,
        create_time_ms=int(d.get("created", 0)),
    )


def flat_to_dict(flat: list[str]) -> dict[str, str]:
    """HGETALL as returned from a script (a flat field, value list)."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def answer_to_text(answer: Policy | License) -> str:
    """The stored answer of a create (create_record.lua)."""
    if isinstance(answer, Policy):
        return json.dumps(
            {
                "policy": policy_to_json(answer),
                "rev": answer.revision,
                "synced": answer.propagated_revision,
            }
        )
    return json.dumps({"license": license_to_hash(answer), "policy": policy_to_json(answer.policy)})


def answer_from_text(kind: str, text: str) -> Policy | License:
    d: dict[str, Any] = json.loads(text)
    if kind == "policy":
        p = policy_from_json(d["policy"])
        p.revision, p.propagated_revision = int(d["rev"]), int(d["synced"])
        return p
    # Answers stored by earlier versions carry the policy inside the hash (`p_json`).
    policy = policy_from_json(d["policy"]) if "policy" in d else None
    return license_from_hash(d["license"], policy)
