"""Configuration from the environment, TLS and mutual TLS, Prometheus metrics."""

from __future__ import annotations

import datetime as dt
import urllib.request
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter_grpc.config import ConfigError, Settings
from meter_grpc.server import build_server
from tests.conftest import Running
from tests.support import admin_md


def test_settings_defaults_and_parsing(tmp_path: Path) -> None:
    s = Settings.from_env({})
    assert (s.listen, s.redis_url, s.data_dir, s.admin_tokens) == (
        "127.0.0.1:50051",
        "",
        Path("./var"),
        [],
    )
    s = Settings.from_env(
        {
            "METER_LISTEN": "0.0.0.0:6000",
            "METER_REDIS_URL": "redis+cluster://a:1,b:2",
            "METER_DATA_DIR": str(tmp_path),
            "METER_ADMIN_TOKENS": " one, two ,,",
            "METER_METRICS_LISTEN": "127.0.0.1:9100",
        }
    )
    assert s.admin_tokens == ["one", "two"]
    assert s.redis_url == "redis+cluster://a:1,b:2"
    assert s.data_dir == tmp_path
    for env in (
        {"METER_TLS_CERT": "c.pem"},
        {"METER_TLS_CLIENT_CA": "ca.pem"},
        {"METER_REDIS_TIMEOUT": "lots"},
        {"METER_REDIS_TIMEOUT": "0"},
    ):
        with pytest.raises(ConfigError):
            Settings.from_env(env)


def _cert(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey | None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        )
    return builder.sign(issuer_key or key, hashes.SHA256())


def _pem(obj: x509.Certificate | ec.EllipticCurvePrivateKey) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


async def test_mutual_tls(tmp_path: Path, running: Running) -> None:
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("meter test CA", ca_key, None, None)
    server_cert = _cert("localhost", server_key, ca, ca_key)
    client_cert = _cert("billing", client_key, ca, ca_key)
    files = {
        "ca.pem": _pem(ca),
        "server.pem": _pem(server_cert),
        "server.key": _pem(server_key),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    settings = Settings(
        listen="127.0.0.1:0",
        redis_url=running.redis_url,
        data_dir=tmp_path,
        admin_tokens=["test-admin-token"],
        key_secret_file=running.key_secret_file,
        tls_cert=tmp_path / "server.pem",
        tls_key=tmp_path / "server.key",
        tls_client_ca=tmp_path / "ca.pem",
    )
    service, port = await build_server(settings)
    await service.start()
    options = (("grpc.ssl_target_name_override", "localhost"),)
    try:
        good = grpc.ssl_channel_credentials(_pem(ca), _pem(client_key), _pem(client_cert))
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", good, options=options) as ch:
            page = await lgrpc.LicenseServiceStub(ch).ListPolicies(
                lpb.ListPoliciesRequest(page_size=1), metadata=admin_md()
            )
            assert len(page.policies) <= 1
        no_client_cert = grpc.ssl_channel_credentials(_pem(ca))
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{port}", no_client_cert, options=options
        ) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await lgrpc.LicenseServiceStub(ch).ListPolicies(
                    lpb.ListPoliciesRequest(), metadata=admin_md(), timeout=5
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await service.stop(0)


async def test_metrics_endpoint_counts_calls(tmp_path: Path, running: Running) -> None:
    settings = Settings(
        listen="127.0.0.1:0",
        redis_url=running.redis_url,
        data_dir=tmp_path,
        admin_tokens=["test-admin-token"],
        key_secret_file=running.key_secret_file,
        metrics_listen="127.0.0.1:0",
    )
    service, port = await build_server(settings)
    await service.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = lgrpc.LicenseServiceStub(ch)
            await stub.ListPolicies(lpb.ListPoliciesRequest(page_size=1), metadata=admin_md())
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.GetPolicy(
                    lpb.GetPolicyRequest(id="01900000-0000-7000-8000-000000000000"),
                    metadata=admin_md(),
                )
        assert service.metrics_port
        with urllib.request.urlopen(  # noqa: ASYNC210 - a test, the loop has nothing else to do
            f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=5
        ) as resp:
            text = resp.read().decode()
        assert 'meter_grpc_calls_total{code="OK",method="ListPolicies"} 1.0' in text
        assert 'meter_grpc_calls_total{code="NOT_FOUND",method="GetPolicy"} 1.0' in text
        assert "meter_grpc_call_seconds_bucket" in text
    finally:
        await service.stop(0)
