"""CheckOutLicense and GetPublicKey: license files checked against the format of SPEC §6 with
the `cryptography` library alone (never with the server's own helpers), and the signing key."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from meter_grpc.config import Settings
from meter_grpc.domain.clock import ManualClock
from meter_grpc.domain.signing import SigningKeyError
from meter_grpc.server import build_server
from tests.conftest import Running
from tests.support import ADMIN_TOKEN, admin_md, expect_error, license_md

BEGIN = "-----BEGIN LICENSE FILE-----"
END = "-----END LICENSE FILE-----"
DAY_S = 86_400


def parse_time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def open_license_file(
    certificate: str, public_key: bytes, license_key: str | None = None
) -> tuple[str, dict[str, Any]]:
    """An independent reading of SPEC §6: returns (alg, payload); fails on any deviation."""
    lines = certificate.split("\n")
    assert lines[0] == BEGIN
    assert lines[-2:] == [END, ""], "ends with the END line and a newline"
    body = lines[1:-2]
    assert body, "no base64 body"
    assert all(len(line) == 60 for line in body[:-1]), "base64 wrapped at 60 columns"
    assert 0 < len(body[-1]) <= 60
    outer = json.loads(base64.b64decode("".join(body), validate=True))
    assert list(outer) == ["enc", "sig", "alg"]
    enc, sig, alg = outer["enc"], outer["sig"], outer["alg"]
    Ed25519PublicKey.from_public_bytes(public_key).verify(
        base64.b64decode(sig, validate=True), b"license/" + enc.encode()
    )
    if alg == "base64+ed25519":
        return alg, json.loads(base64.b64decode(enc, validate=True))
    assert alg == "aes-256-gcm+ed25519"
    assert license_key is not None
    ciphertext, iv, tag = (base64.b64decode(p, validate=True) for p in enc.split("."))
    assert (len(iv), len(tag)) == (12, 16)
    key = hashlib.sha256(license_key.encode()).digest()
    dec = Cipher(algorithms.AES(key), modes.GCM(iv, None, len(tag))).decryptor()
    plaintext = dec.update(ciphertext) + dec.finalize_with_tag(tag)
    return alg, json.loads(plaintext)


async def public_key(licenses: lgrpc.LicenseServiceStub, md: Any = None) -> bytes:
    resp = await licenses.GetPublicKey(lpb.GetPublicKeyRequest(), metadata=md or admin_md())
    assert resp.algorithm == "ed25519"
    assert len(resp.public_key) == 32
    return bytes(resp.public_key)


async def check_out(
    licenses: lgrpc.LicenseServiceStub, license_id: str, md: Any = None, **fields: Any
) -> lpb.CheckOutLicenseResponse:
    return await licenses.CheckOutLicense(
        lpb.CheckOutLicenseRequest(id=license_id, **fields), metadata=md or admin_md()
    )


async def test_license_file_verifies_and_carries_the_license(
    licenses: lgrpc.LicenseServiceStub, usage: ugrpc.UsageServiceStub, make_license: Any
) -> None:
    lic = await make_license(
        policy_fields={
            "max_uses": 10,
            "overage_strategy": 2,
            "entitlements": ["export"],
            "max_cores": 64,
        },
        entitlements=["batch"],
        name="acme",
        metadata={"customer": "acme"},
    )
    await usage.IncrementUsage(
        upb.IncrementUsageRequest(license_id=lic.id, amount=3), metadata=admin_md()
    )
    resp = await check_out(licenses, lic.id)
    alg, payload = open_license_file(resp.certificate, await public_key(licenses))
    assert alg == "base64+ed25519"
    meta = payload["meta"]
    assert meta["ttl"] == 30 * DAY_S
    issued, expiry = parse_time(meta["issued"]), parse_time(meta["expiry"])
    assert expiry - issued == dt.timedelta(days=30)
    assert resp.issue_time.ToDatetime(dt.UTC) == issued
    assert resp.expire_time.ToDatetime(dt.UTC) == expiry
    data = payload["data"]
    assert (data["type"], data["id"]) == ("licenses", lic.id)
    attrs = data["attributes"]
    # keys are stored only as digests: the file carries the key only for its own holder
    assert attrs["key"] is None and attrs["name"] == "acme"
    assert (attrs["uses"], attrs["maxUses"], attrs["usesLimit"]) == (3, 10, 12)
    assert attrs["maxCores"] == 64
    assert attrs["maxMachines"] == 1  # node-locked (floating = false): exactly one machine
    assert sorted(attrs["entitlements"]) == ["batch", "export"]
    assert attrs["status"] == "ACTIVE" and attrs["suspended"] is False
    assert attrs["metadata"] == {"customer": "acme"}
    assert attrs["overageStrategy"] == "ALLOW_1_25X_OVERAGE"
    policy = [r for r in payload["included"] if r["type"] == "policies"]
    assert [p["id"] for p in policy] == [lic.policy_id]
    assert data["relationships"]["policy"]["data"] == {"type": "policies", "id": lic.policy_id}
    assert policy[0]["attributes"]["maxUses"] == 10
    assert data["relationships"]["machines"]["meta"]["count"] == 0


async def test_keygens_published_python_parsing_reads_the_file(
    licenses: lgrpc.LicenseServiceStub, make_license: Any
) -> None:
    """Keygen's example verifier strips the armor with str.lstrip/str.rstrip (character sets),
    then base64-decodes the rest: the body must not start or end with one of those
    characters."""
    for name in ("a", "ab", "abc"):  # three lengths: every base64 padding case
        lic = await make_license(name=name)
        for encrypt in (False, True):
            cert = (await check_out(licenses, lic.id, encrypt=encrypt)).certificate
            # Keygen's character-set stripping, quirk included, on purpose.
            body = cert.lstrip(f"{BEGIN}\n").rstrip(f"{END}\n")
            data = json.loads(base64.b64decode(body))
            assert set(data) == {"enc", "sig", "alg"}


async def test_public_key_as_hex_and_spki_pem_verifies_a_checked_out_file(
    licenses: lgrpc.LicenseServiceStub, make_license: Any
) -> None:
    """GetPublicKey gives the one key three ways: raw bytes, hex (Keygen's Python and JS
    verifiers) and SPKI PEM (OpenSSL, Node's crypto; its body is the DER Keygen's Node
    verifier takes). Each verifies a file from CheckOutLicense."""
    lic = await make_license(name="formats")
    resp = await licenses.GetPublicKey(lpb.GetPublicKeyRequest(), metadata=license_md(lic.key))
    assert resp.algorithm == "ed25519"
    assert resp.public_key_hex == resp.public_key_hex.lower()
    assert bytes.fromhex(resp.public_key_hex) == resp.public_key
    pem_key = serialization.load_pem_public_key(resp.public_key_pem.encode())
    assert isinstance(pem_key, Ed25519PublicKey)
    raw = pem_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert raw == resp.public_key
    lines = resp.public_key_pem.splitlines()
    assert (lines[0], lines[-1]) == ("-----BEGIN PUBLIC KEY-----", "-----END PUBLIC KEY-----")
    der = base64.b64decode("".join(lines[1:-1]), validate=True)
    assert serialization.load_der_public_key(der) == pem_key
    for encrypt in (False, True):
        cert = (await check_out(licenses, lic.id, encrypt=encrypt)).certificate
        body = "".join(cert.split("\n")[1:-2])
        outer = json.loads(base64.b64decode(body, validate=True))
        signed = f"license/{outer['enc']}".encode()
        signature = base64.b64decode(outer["sig"], validate=True)
        pem_key.verify(signature, signed)  # raises InvalidSignature on any mismatch
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(resp.public_key_hex)).verify(
            signature, signed
        )


async def test_encrypted_license_file_decrypts_with_sha256_of_the_key(
    licenses: lgrpc.LicenseServiceStub, make_license: Any
) -> None:
    lic = await make_license(policy_fields={"max_uses": 5})
    resp = await check_out(licenses, lic.id, encrypt=True)
    key = await public_key(licenses)
    alg, payload = open_license_file(resp.certificate, key, lic.key)
    assert alg == "aes-256-gcm+ed25519"
    assert payload["data"]["attributes"]["maxUses"] == 5
    assert lic.key not in base64.b64decode("".join(resp.certificate.split("\n")[1:-2])).decode()
    with pytest.raises(InvalidTag):
        open_license_file(resp.certificate, key, lic.key + "x")


async def test_ttl_rules(licenses: lgrpc.LicenseServiceStub, make_license: Any) -> None:
    lic = await make_license()
    key = await public_key(licenses)
    never = await check_out(licenses, lic.id, ttl={"seconds": 0})
    _, payload = open_license_file(never.certificate, key)
    assert payload["meta"]["expiry"] is None and payload["meta"]["ttl"] is None
    assert not never.HasField("expire_time")
    two_hours = await check_out(licenses, lic.id, ttl={"seconds": 7200})
    _, payload = open_license_file(two_hours.certificate, key)
    assert payload["meta"]["ttl"] == 7200
    assert two_hours.expire_time.seconds - two_hours.issue_time.seconds == 7200
    for bad in (
        {"seconds": 3599},
        {"seconds": -3600},
        {"nanos": 1},
        {"seconds": 101 * 366 * DAY_S},
    ):
        err = await expect_error(check_out(licenses, lic.id, ttl=bad))
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert err.bad_fields == ["ttl"], bad


async def test_machines_in_the_file_and_fingerprint_scope(
    licenses: lgrpc.LicenseServiceStub, make_license: Any, clock: ManualClock
) -> None:
    lic = await make_license(
        policy_fields={"floating": True, "max_machines": 3, "heartbeat_duration": {"seconds": 60}}
    )
    err = await expect_error(check_out(licenses, lic.id, fingerprint="fp-1"))
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert err.reason == "MACHINE_NOT_FOUND"
    assert err.metadata["fingerprint"] == "fp-1"
    # fp-3 misses its heartbeat (60 s) and is dead by the time fp-1 and fp-2 are activated:
    # a license file carries only live machines.
    for fp, cores, later_ms in (("fp-3", 2, 61_000), ("fp-1", 4, 0), ("fp-2", 8, 0)):
        await licenses.ActivateMachine(
            lpb.ActivateMachineRequest(license_id=lic.id, fingerprint=fp, cores=cores),
            metadata=admin_md(),
        )
        clock.advance(later_ms)
    key = await public_key(licenses)
    _, payload = open_license_file((await check_out(licenses, lic.id)).certificate, key)
    machines = [r for r in payload["included"] if r["type"] == "machines"]
    assert sorted(m["attributes"]["fingerprint"] for m in machines) == ["fp-1", "fp-2"]
    assert payload["data"]["relationships"]["machines"]["meta"]["count"] == 2
    scoped = await check_out(licenses, lic.id, fingerprint="fp-2")
    _, payload = open_license_file(scoped.certificate, key)
    machines = [r for r in payload["included"] if r["type"] == "machines"]
    assert [(m["attributes"]["fingerprint"], m["attributes"]["cores"]) for m in machines] == [
        ("fp-2", 8)
    ]


async def test_license_key_checks_out_its_own_license_only(
    licenses: lgrpc.LicenseServiceStub, make_license: Any
) -> None:
    mine = await make_license()
    other = await make_license()
    key = await public_key(licenses, md=license_md(mine.key))
    resp = await check_out(licenses, mine.id, md=license_md(mine.key), encrypt=True)
    _, payload = open_license_file(resp.certificate, key, mine.key)
    assert payload["data"]["id"] == mine.id
    assert payload["data"]["attributes"]["key"] == mine.key  # the caller's own key
    err = await expect_error(check_out(licenses, other.id, md=license_md(mine.key)))
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    err = await expect_error(check_out(licenses, "01900000-0000-7000-8000-000000000000"))
    assert (err.code, err.reason) == (grpc.StatusCode.NOT_FOUND, "LICENSE_NOT_FOUND")
    err = await expect_error(licenses.GetPublicKey(lpb.GetPublicKeyRequest()))
    assert err.code == grpc.StatusCode.UNAUTHENTICATED


async def _public_key_of(settings: Settings) -> bytes:
    service, port = await build_server(settings)
    await service.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            return await public_key(lgrpc.LicenseServiceStub(ch))
    finally:
        await service.stop(0)


def _settings(running: Running, data_dir: Path, **fields: Any) -> Settings:
    return Settings(
        listen="127.0.0.1:0",
        redis_url=running.redis_url,
        data_dir=data_dir,
        admin_tokens=[ADMIN_TOKEN],
        key_secret_file=running.key_secret_file,
        **fields,
    )


async def test_signing_key_survives_a_restart(
    running: Running,
    licenses: lgrpc.LicenseServiceStub,
    make_license: Any,
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    first = await _public_key_of(_settings(running, data_dir))
    key_file = data_dir / "signing-key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in key_file.read_bytes()
    assert await _public_key_of(_settings(running, data_dir)) == first
    assert await _public_key_of(_settings(running, tmp_path / "elsewhere")) != first
    # The session server too: a file it signed verifies with the key of its restarted self.
    lic = await make_license()
    cert = (await check_out(licenses, lic.id)).certificate
    again = await _public_key_of(_settings(running, running.service.settings.data_dir))
    assert again == await public_key(licenses)
    open_license_file(cert, again)


async def test_signing_key_file_setting_is_honored(running: Running, tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "key.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(path, 0o600)
    env = {
        "METER_LISTEN": "127.0.0.1:0",
        "METER_REDIS_URL": running.redis_url,
        "METER_DATA_DIR": str(tmp_path / "data"),
        "METER_ADMIN_TOKENS": ADMIN_TOKEN,
        "METER_SIGNING_KEY_FILE": str(path),
        "METER_KEY_SECRET_FILE": str(running.key_secret_file),
    }
    expected = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert await _public_key_of(Settings.from_env(env)) == expected
    assert not (tmp_path / "data" / "signing-key.pem").exists()
    with pytest.raises(SigningKeyError, match="cannot read"):
        await build_server(Settings.from_env({**env, "METER_SIGNING_KEY_FILE": str(path) + "x"}))
    ec_path = tmp_path / "ec.pem"
    ec_path.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(SigningKeyError, match="not an Ed25519 key"):
        await build_server(Settings.from_env({**env, "METER_SIGNING_KEY_FILE": str(ec_path)}))
