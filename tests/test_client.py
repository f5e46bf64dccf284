"""meter_grpc.client: typed clients over the real server, errors as exceptions, and
verify_license_file without any network."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import socket
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meter.v1 import license_pb2, policy_pb2, usage_pb2
from meter.v1 import usage_service_pb2 as upb
from meter_grpc.client import (
    AsyncMeterClient,
    InvalidArgument,
    LicenseFileError,
    LicenseNotFound,
    LimitExceeded,
    MeterClient,
    MeterClientError,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    UsageLimitExceeded,
    verify_license_file,
)
from tests.conftest import Running
from tests.support import ADMIN_TOKEN


def closed_port_target() -> str:
    """An address where nothing listens."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


async def test_async_client_end_to_end(running: Running) -> None:
    async with AsyncMeterClient(running.target, admin_token=ADMIN_TOKEN) as admin:
        policy = await admin.create_policy(policy_pb2.Policy(name="p", max_uses=3))
        lic = await admin.create_license(license_pb2.License(policy_id=policy.id))
        assert (await admin.get_license(lic.id)).id == lic.id
    async with AsyncMeterClient(running.target, license_key=lic.key) as client:
        r = await client.increment_usage(lic.id, 2, request_id="a")
        assert (r.uses, r.remaining) == (2, 1)
        assert (await client.get_usage(lic.id)).uses == 2
        with pytest.raises(UsageLimitExceeded) as info:
            await client.increment_usage(lic.id, 2)
        err = info.value
        assert isinstance(err, LimitExceeded) and isinstance(err, MeterClientError)
        assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.reason == "USAGE_LIMIT_EXCEEDED"
        assert (err.metadata["limit"], err.metadata["uses"]) == ("3", "2")
        with pytest.raises(InvalidArgument) as bad:
            await client.increment_usage(lic.id, -1)
        assert [v.field for v in bad.value.field_violations] == ["amount"]
        with pytest.raises(PermissionDenied):
            await client.decrement_usage(lic.id)
        resp = await client.sync_usage(lic.id, [usage_pb2.UsageRecord(id="x", amount=1)])
        assert resp.uses == 3
        assert len(await client.get_public_key()) == 32
        checked_out = await client.check_out_license(lic.id, ttl=dt.timedelta(hours=2))
        assert checked_out.expire_time.seconds - checked_out.issue_time.seconds == 7200

        async def more() -> Any:
            yield upb.IncrementUsageRequest(license_id=lic.id, request_id="s1")

        answers = [a async for a in client.stream_usage(more())]
        assert answers[0].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        batch = await client.batch_increment_usage(
            [upb.IncrementUsageRequest(license_id=lic.id, amount=n) for n in (1, 0)]
        )
        assert [r.error.code for r in batch.results] == [
            grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        ] * 2
        with pytest.raises(PermissionDenied):  # a key batches only its own license
            await client.batch_increment_usage([upb.IncrementUsageRequest(license_id="x")])


async def test_sync_client_end_to_end(running: Running) -> None:
    def scenario() -> None:
        with MeterClient(running.target, admin_token=ADMIN_TOKEN) as admin:
            policy = admin.create_policy(policy_pb2.Policy(name="p", max_uses=5))
            lic = admin.create_license(license_pb2.License(policy_id=policy.id))
            with pytest.raises(LicenseNotFound) as nf:
                admin.get_license("01900000-0000-7000-8000-000000000000")
            assert nf.value.code == grpc.StatusCode.NOT_FOUND
            assert nf.value.metadata["id"] == "01900000-0000-7000-8000-000000000000"
        with MeterClient(running.target, license_key=lic.key) as client:
            assert client.increment_usage(lic.id, 4).uses == 4
            batch = client.batch_increment_usage(
                [upb.IncrementUsageRequest(license_id=lic.id, amount=1)] * 2
            )
            assert [r.WhichOneof("outcome") for r in batch.results] == ["result", "error"]
            assert batch.results[0].result.uses == 5
            with pytest.raises(UsageLimitExceeded):
                client.increment_usage(lic.id)
            with pytest.raises(PermissionDenied):
                client.get_license(lic.id)
        with MeterClient(running.target, license_key="not-a-key") as client:
            with pytest.raises(Unauthenticated) as unauth:
                client.get_usage(lic.id)
            assert unauth.value.code == grpc.StatusCode.UNAUTHENTICATED

    await asyncio.to_thread(scenario)


async def test_unreachable_service_is_unavailable() -> None:
    def call() -> None:
        with MeterClient(closed_port_target(), admin_token="t", timeout=5) as client:
            client.get_usage("x")

    with pytest.raises(Unavailable) as info:
        await asyncio.to_thread(call)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    async with AsyncMeterClient(closed_port_target(), admin_token="t", timeout=5) as client:
        with pytest.raises(Unavailable):
            await client.get_usage("x")


def test_admin_token_and_license_key_are_exclusive() -> None:
    with pytest.raises(ValueError, match="not both"):
        MeterClient("127.0.0.1:1", admin_token="a", license_key="b")


# --- verify_license_file -------------------------------------------------------------------


def armor(outer: dict[str, str]) -> str:
    text = base64.b64encode(json.dumps(outer).encode()).decode()
    lines = "".join(text[i : i + 60] + "\n" for i in range(0, len(text), 60))
    return f"-----BEGIN LICENSE FILE-----\n{lines}-----END LICENSE FILE-----\n"


def unarmor(cert: str) -> dict[str, str]:
    body = "".join(cert.strip().split("\n")[1:-1])
    data: dict[str, str] = json.loads(base64.b64decode(body))
    return data


async def _file(running: Running, **fields: Any) -> tuple[str, bytes, Any, Any]:
    async with AsyncMeterClient(running.target, admin_token=ADMIN_TOKEN) as admin:
        policy = await admin.create_policy(policy_pb2.Policy(name="p", max_uses=10))
        lic = await admin.create_license(license_pb2.License(policy_id=policy.id))
        resp = await admin.check_out_license(lic.id, **fields)
        return resp.certificate, await admin.get_public_key(), lic, resp


async def test_verify_license_file_accepts_a_genuine_file(running: Running) -> None:
    cert, key, lic, _ = await _file(running)
    payload = verify_license_file(cert, key)
    assert payload["data"]["id"] == lic.id
    assert verify_license_file(cert, key.hex())["data"]["attributes"]["maxUses"] == 10
    cert, key, lic, _ = await _file(running, encrypt=True)
    # issued to an admin (the server holds no key in clear): decrypts with the key, no key in it
    assert verify_license_file(cert, key, lic.key)["data"]["id"] == lic.id
    with pytest.raises(LicenseFileError) as info:
        verify_license_file(cert, key)
    assert info.value.reason == "LICENSE_KEY_REQUIRED"
    with pytest.raises(LicenseFileError) as info:
        verify_license_file(cert, key, lic.key + "0")
    assert info.value.reason == "DECRYPTION_FAILED"


async def test_verify_license_file_refuses_tampered_files(running: Running) -> None:
    cert, key, _, _ = await _file(running)
    outer = unarmor(cert)
    payload = json.loads(base64.b64decode(outer["enc"]))
    payload["data"]["attributes"]["maxUses"] = 1_000_000
    forged = {**outer, "enc": base64.b64encode(json.dumps(payload).encode()).decode()}
    cases = {
        "changed payload, old signature": armor(forged),
        "signed by another key": armor(
            {
                **forged,
                "sig": base64.b64encode(
                    Ed25519PrivateKey.generate().sign(b"license/" + forged["enc"].encode())
                ).decode(),
            }
        ),
    }
    for name, bad in cases.items():
        with pytest.raises(LicenseFileError) as info:
            verify_license_file(bad, key)
        assert info.value.reason == "BAD_SIGNATURE", name
    # `alg` is outside the signature (as in Keygen's format), but a changed one reads nothing.
    with pytest.raises(LicenseFileError) as info:
        verify_license_file(armor({**outer, "alg": "aes-256-gcm+ed25519"}), key, "some key")
    assert info.value.reason == "MALFORMED"
    with pytest.raises(LicenseFileError) as info:
        verify_license_file(armor({**outer, "alg": "none"}), key)
    assert info.value.reason == "UNSUPPORTED_ALGORITHM"
    lines = cert.split("\n")
    flipped = lines[3][:10] + ("A" if lines[3][10] != "A" else "B") + lines[3][11:]
    with pytest.raises(LicenseFileError):
        verify_license_file("\n".join([*lines[:3], flipped, *lines[4:]]), key)
    with pytest.raises(LicenseFileError) as info:
        verify_license_file(cert, Ed25519PrivateKey.generate().public_key())
    assert info.value.reason == "BAD_SIGNATURE"
    with pytest.raises(LicenseFileError) as info:
        verify_license_file("hello", key)
    assert info.value.reason == "MALFORMED"


async def test_verify_license_file_checks_expiry_and_clock_skew(running: Running) -> None:
    cert, key, _, resp = await _file(running, ttl=dt.timedelta(hours=1))
    issued = resp.issue_time.ToDatetime(dt.UTC)
    expires = resp.expire_time.ToDatetime(dt.UTC)
    verify_license_file(cert, key, now=expires - dt.timedelta(seconds=1))
    with pytest.raises(LicenseFileError) as info:
        verify_license_file(cert, key, now=expires)
    assert info.value.reason == "EXPIRED"
    verify_license_file(cert, key, now=issued - dt.timedelta(minutes=4))
    with pytest.raises(LicenseFileError) as info:
        verify_license_file(cert, key, now=issued - dt.timedelta(minutes=6))
    assert info.value.reason == "ISSUED_IN_FUTURE"
    forever, key, _, _ = await _file(running, ttl=dt.timedelta(0))
    verify_license_file(forever, key, now=issued + dt.timedelta(days=36500))
