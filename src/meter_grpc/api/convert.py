"""Protobuf messages to domain dataclasses and back. Enum numbers are shared by both."""

from __future__ import annotations

import enum
from typing import TypeVar

from google.protobuf import duration_pb2, timestamp_pb2

from meter.v1 import license_pb2, machine_pb2, policy_pb2, usage_pb2, usage_service_pb2
from meter_grpc.domain.models import (
    ExpirationStrategy,
    License,
    Machine,
    Meter,
    MeterUsage,
    OverageStrategy,
    Policy,
    RecordResult,
    Reservation,
    ReservationAnswer,
    Usage,
    UsageRecord,
    UsageResetInterval,
)
from meter_grpc.domain.rules import Violations

E = TypeVar("E", bound=enum.IntEnum)


# google.protobuf.Timestamp's range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999Z.
_MIN_TS_MS = -62_135_596_800_000
_MAX_TS_MS = 253_402_300_799_999


def ts(ms: int | None) -> timestamp_pb2.Timestamp | None:
    """A stored time as a Timestamp, clamped into Timestamp's range: a value stored before
    the range was enforced (a renewal past year 9999) reads as the end of year 9999 instead
    of failing every read of its license."""
    if ms is None:
        return None
    t = timestamp_pb2.Timestamp()
    t.FromMilliseconds(min(max(ms, _MIN_TS_MS), _MAX_TS_MS))
    return t


def ms_of(t: timestamp_pb2.Timestamp) -> int:
    """Milliseconds of a Timestamp, out-of-range ones included (the domain rules refuse those;
    Timestamp.ToMilliseconds would raise and turn a client mistake into INTERNAL)."""
    return int(t.seconds) * 1000 + int(t.nanos) // 1_000_000


def duration_ms(d: duration_pb2.Duration) -> int:
    return int(d.seconds) * 1000 + int(d.nanos) // 1_000_000


def ttl_ms(d: duration_pb2.Duration) -> int:
    """A duration in ms where only an exact zero is 0 (a positive sub-millisecond ttl is 1)."""
    ns = int(d.ToNanoseconds())
    return ns // 1_000_000 or (1 if ns > 0 else 0)


def _enum(cls: type[E], value: int, field: str, v: Violations) -> E:
    try:
        return cls(value)
    except ValueError:
        v.add(field, f"unknown value {value}")
        return cls(0)


def _opt(msg: object, name: str) -> int | None:
    return getattr(msg, name) if msg.HasField(name) else None  # type: ignore[attr-defined]


def policy_from_proto(pb: policy_pb2.Policy, v: Violations, prefix: str = "policy") -> Policy:
    return Policy(
        id=pb.id,
        name=pb.name,
        max_uses=_opt(pb, "max_uses"),
        max_machines=_opt(pb, "max_machines"),
        max_cores=_opt(pb, "max_cores"),
        floating=pb.floating,
        strict=pb.strict,
        duration_ms=duration_ms(pb.duration) if pb.HasField("duration") else None,
        expiration_strategy=_enum(
            ExpirationStrategy, pb.expiration_strategy, f"{prefix}.expiration_strategy", v
        ),
        require_check_in=pb.require_check_in,
        check_in_interval_ms=duration_ms(pb.check_in_interval)
        if pb.HasField("check_in_interval")
        else None,
        heartbeat_duration_ms=duration_ms(pb.heartbeat_duration)
        if pb.HasField("heartbeat_duration")
        else None,
        entitlements=list(pb.entitlements),
        overage_strategy=_enum(
            OverageStrategy, pb.overage_strategy, f"{prefix}.overage_strategy", v
        ),
        usage_reset_interval=_enum(
            UsageResetInterval, pb.usage_reset_interval, f"{prefix}.usage_reset_interval", v
        ),
        metadata=dict(pb.metadata),
        meters=[
            Meter(
                code=m.code,
                max_uses=_opt(m, "max_uses"),
                overage_strategy=_enum(
                    OverageStrategy, m.overage_strategy, f"{prefix}.meters[{i}].overage_strategy", v
                ),
                usage_reset_interval=_enum(
                    UsageResetInterval,
                    m.usage_reset_interval,
                    f"{prefix}.meters[{i}].usage_reset_interval",
                    v,
                ),
                entitlement=m.entitlement,
            )
            for i, m in enumerate(pb.meters)
        ],
    )


def _dur(ms: int | None) -> duration_pb2.Duration | None:
    if ms is None:
        return None
    d = duration_pb2.Duration()
    d.FromMilliseconds(ms)
    return d


def policy_to_proto(p: Policy) -> policy_pb2.Policy:
    return policy_pb2.Policy(
        id=p.id,
        name=p.name,
        max_uses=p.max_uses,
        max_machines=p.max_machines,
        max_cores=p.max_cores,
        floating=p.floating,
        strict=p.strict,
        duration=_dur(p.duration_ms),
        expiration_strategy=int(p.expiration_strategy),  # type: ignore[arg-type]
        require_check_in=p.require_check_in,
        check_in_interval=_dur(p.check_in_interval_ms),
        heartbeat_duration=_dur(p.heartbeat_duration_ms),
        entitlements=p.entitlements,
        overage_strategy=int(p.overage_strategy),  # type: ignore[arg-type]
        usage_reset_interval=int(p.usage_reset_interval),  # type: ignore[arg-type]
        metadata=p.metadata,
        create_time=ts(p.create_time_ms),
        update_time=ts(p.update_time_ms),
        revision=p.revision,
        propagated_revision=p.propagated_revision,
        meters=[
            policy_pb2.Meter(
                code=m.code,
                max_uses=m.max_uses,
                overage_strategy=int(m.overage_strategy),  # type: ignore[arg-type]
                usage_reset_interval=int(m.usage_reset_interval),  # type: ignore[arg-type]
                entitlement=m.entitlement,
            )
            for m in p.meters
        ],
    )


def license_from_proto(pb: license_pb2.License) -> License:
    return License(
        id=pb.id,
        key=pb.key,
        policy_id=pb.policy_id,
        name=pb.name,
        expire_time_ms=ms_of(pb.expire_time) if pb.HasField("expire_time") else None,
        max_uses_override=_opt(pb, "max_uses"),
        max_machines_override=_opt(pb, "max_machines"),
        max_cores_override=_opt(pb, "max_cores"),
        entitlements=list(pb.entitlements),
        metadata=dict(pb.metadata),
        meter_overrides=dict(pb.meter_overrides),
    )


def license_to_proto(lic: License, now_ms: int) -> license_pb2.License:
    return license_pb2.License(
        id=lic.id,
        key=lic.key,
        policy_id=lic.policy_id,
        name=lic.name,
        status=int(lic.status(now_ms)),  # type: ignore[arg-type]
        expire_time=ts(lic.expire_time_ms),
        max_uses=lic.max_uses,
        max_machines=lic.max_machines,
        max_cores=lic.max_cores,
        entitlements=lic.entitlements,
        metadata=lic.metadata,
        uses=lic.uses,
        machines_count=lic.machines_count,
        cores_count=lic.cores_count,
        last_check_in_time=ts(lic.last_check_in_ms),
        create_time=ts(lic.create_time_ms),
        update_time=ts(lic.update_time_ms),
        meter_overrides=lic.meter_overrides,
    )


def machine_from_proto(pb: machine_pb2.Machine) -> Machine:
    """The caller-settable fields of a machine (output-only fields are ignored)."""
    return Machine(
        id=pb.id,
        fingerprint=pb.fingerprint,
        cores=pb.cores,
        name=pb.name,
        hostname=pb.hostname,
        platform=pb.platform,
        metadata=dict(pb.metadata),
    )


def machine_to_proto(m: Machine) -> machine_pb2.Machine:
    return machine_pb2.Machine(
        id=m.id,
        license_id=m.license_id,
        fingerprint=m.fingerprint,
        cores=m.cores,
        name=m.name,
        hostname=m.hostname,
        platform=m.platform,
        metadata=m.metadata,
        last_heartbeat_time=ts(m.last_heartbeat_ms),
        create_time=ts(m.create_time_ms),
    )


def usage_fields(u: Usage) -> dict[str, object]:
    """Keyword arguments shared by every usage response message."""
    return {
        "uses": u.uses,
        "max_uses": u.max_uses,
        "remaining": u.remaining,
        "overage_limit": u.overage_limit,
        "period_end_time": ts(u.period_end_ms),
        "reserved": u.reserved,
    }


def meter_usage_to_proto(m: MeterUsage) -> usage_service_pb2.MeterUsage:
    u = m.usage
    return usage_service_pb2.MeterUsage(
        meter=m.meter,
        uses=u.uses,
        max_uses=u.max_uses,
        remaining=u.remaining,
        overage_limit=u.overage_limit,
        period_end_time=ts(u.period_end_ms),
        entitled=m.entitled,
        reserved=u.reserved,
    )


def reservation_to_proto(r: Reservation) -> usage_service_pb2.Reservation:
    return usage_service_pb2.Reservation(
        id=r.id,
        license_id=r.license_id,
        meter=r.meter,
        amount=r.amount,
        expire_time=ts(r.expire_time_ms),
        state=int(r.state),  # type: ignore[arg-type]
        committed_amount=r.committed_amount,
        create_time=ts(r.create_time_ms),
    )


def reservation_fields(a: ReservationAnswer) -> dict[str, object]:
    """Keyword arguments of the three reservation responses."""
    return {
        "reservation": reservation_to_proto(a.reservation),
        "usage": meter_usage_to_proto(a.usage),
        "replayed": a.replayed,
    }


def usage_record_from_proto(pb: usage_pb2.UsageRecord) -> UsageRecord:
    return UsageRecord(
        id=pb.id,
        amount=pb.amount,
        occur_time_ms=ms_of(pb.occur_time) if pb.HasField("occur_time") else None,
        meter=pb.meter,
    )


def record_result_to_proto(r: RecordResult) -> usage_pb2.UsageRecordResult:
    return usage_pb2.UsageRecordResult(
        id=r.id,
        outcome=int(r.outcome),  # type: ignore[arg-type]
        reason=r.reason,
    )
