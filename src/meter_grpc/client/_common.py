"""What the sync and async clients share: credentials, channel options, request building."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2

from meter.v1 import usage_pb2
from meter.v1 import usage_service_pb2 as upb

Metadata = tuple[tuple[str, str], ...]
DEFAULT_TIMEOUT_S = 10.0
_KEEPALIVE = [("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000)]


def auth_metadata(admin_token: str | None, license_key: str | None) -> Metadata:
    if admin_token and license_key:
        raise ValueError("give an admin token or a license key, not both")
    if admin_token:
        return (("authorization", f"Bearer {admin_token}"),)
    if license_key:
        return (("authorization", f"License {license_key}"),)
    return ()


def channel_credentials(
    tls: bool | grpc.ChannelCredentials,
    root_certificates: bytes | None,
    private_key: bytes | None,
    certificate_chain: bytes | None,
) -> grpc.ChannelCredentials | None:
    """None for plaintext; TLS with the system roots or `root_certificates`; mutual TLS when
    a client key and certificate chain are given."""
    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    if not tls and root_certificates is None and private_key is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


def channel_options(options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    given = {name for name, _ in options}
    return [*options, *(o for o in _KEEPALIVE if o[0] not in given)]


def duration(value: dt.timedelta | None) -> duration_pb2.Duration | None:
    if value is None:
        return None
    d = duration_pb2.Duration()
    d.FromTimedelta(value)
    return d


def field_mask(paths: Iterable[str]) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


def usage_record(
    record_id: str, amount: int, occur_ms: int | None, meter: str = ""
) -> usage_pb2.UsageRecord:
    r = usage_pb2.UsageRecord(id=record_id, amount=amount, meter=meter)
    if occur_ms is not None:
        t = timestamp_pb2.Timestamp()
        t.FromMilliseconds(occur_ms)
        r.occur_time.CopyFrom(t)
    return r


def string_map(value: Mapping[str, str] | None) -> dict[str, str]:
    return dict(value or {})


def reserve_request(
    license_id: str,
    amount: int,
    meter: str,
    ttl: dt.timedelta | float | None,
    request_id: str,
) -> upb.ReserveUsageRequest:
    if ttl is not None and not isinstance(ttl, dt.timedelta):
        ttl = dt.timedelta(seconds=ttl)
    return upb.ReserveUsageRequest(
        license_id=license_id,
        meter=meter,
        amount=amount,
        ttl=duration(ttl),
        request_id=request_id,
    )
