"""Fixtures: a real valkey-server (the embedded one, and METER_TEST_REDIS_URL when set), a
real meter-grpc server on a real port, and stubs over real channels.

One server per backend serves the whole session; every test makes its own policies and
licenses, so tests never see each other's data. The server's clock is a ManualClock that
tests may move (it is put back after each test).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from hypothesis import settings as hypothesis_settings

from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import policy_pb2
from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from meter_grpc.config import Settings
from meter_grpc.domain import failpoints
from meter_grpc.domain.clock import ManualClock
from meter_grpc.domain.keysecret import KeySecret
from meter_grpc.server import Service, build_server
from meter_grpc.storage import keys
from meter_grpc.storage.embedded import EmbeddedServer
from meter_grpc.storage.transport import is_cluster_url
from tests.cluster import LocalCluster, redis_py_cluster
from tests.support import ADMIN_TOKEN, admin_md, shared_key_secret_file

# tests/test_fuzz.py: with CI set, the same examples on every run (no example database);
# otherwise a new random seed each run (`--hypothesis-seed=N` repeats one).
hypothesis_settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
hypothesis_settings.register_profile("dev", print_blob=True)
hypothesis_settings.load_profile("ci" if os.environ.get("CI") else "dev")

BACKENDS = [
    "embedded",
    pytest.param("cluster", marks=pytest.mark.cluster),
    *(["external"] if os.environ.get("METER_TEST_REDIS_URL") else []),
]


@pytest.fixture(scope="session", autouse=True)
def _key_secret_file_removed() -> Iterator[None]:
    yield
    shared_key_secret_file().unlink(missing_ok=True)


@pytest.fixture(scope="session")
async def embedded_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    server = EmbeddedServer(tmp_path_factory.mktemp("valkey"))
    url = await server.start()
    yield url
    await server.stop()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[EmbeddedServer]:
    """A valkey-server of the test's own (the embedded one, in a fresh data dir)."""
    s = EmbeddedServer(tmp_path / "v")
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
def failpoint() -> Iterator[Any]:
    """failpoint(name, action="raise") arms one failpoint (domain/failpoints.py) for the
    test; all are disarmed after it."""
    yield lambda name, action="raise": failpoints.arm({name: action})
    failpoints.arm({})


@pytest.fixture(scope="session")
async def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        await cluster.start()
        yield cluster.url
    finally:
        await cluster.stop()


@pytest.fixture(scope="session", params=BACKENDS)
def redis_url(request: pytest.FixtureRequest) -> str:
    """Every test that talks to the service runs once per backend: the embedded server, a
    three-node Redis Cluster, and METER_TEST_REDIS_URL when it is set."""
    if request.param == "external":
        return os.environ["METER_TEST_REDIS_URL"]
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@dataclass
class Running:
    service: Service
    port: int
    clock: ManualClock
    redis_url: str

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def key_secret_file(self) -> Path:
        """The server secret of the service (another server on its store must share it)."""
        path = self.service.settings.key_secret_file
        assert path is not None
        return path


@pytest.fixture(scope="session")
async def running(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Running]:
    clock = ManualClock()
    settings = Settings(
        listen="127.0.0.1:0",
        redis_url=redis_url,
        data_dir=Path(tmp_path_factory.mktemp("data")),
        admin_tokens=[ADMIN_TOKEN],
        clock=clock,
        shutdown_grace_s=2,
        key_secret_file=shared_key_secret_file(),
    )
    service, port = await build_server(settings)
    await service.start()
    yield Running(service, port, clock, redis_url)
    await service.stop(1)


@pytest.fixture
def key_index(running: Running) -> Any:
    """key_index(license_key) -> the name of its index entry (named by its digest under the
    service's key secret)."""
    secret = KeySecret.load(running.key_secret_file)
    return lambda key: keys.license_by_key(secret.digest(key))


@pytest.fixture
def clock(running: Running) -> Iterator[ManualClock]:
    yield running.clock
    running.clock.offset_ms = 0
    running.clock.fixed_ms = None


@pytest.fixture
async def redis(running: Running) -> AsyncIterator[aioredis.Redis]:
    """A direct client on the service's store, to read counters back."""
    client: Any
    if is_cluster_url(running.redis_url):
        client = redis_py_cluster(running.redis_url)
    else:
        client = aioredis.Redis.from_url(running.redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
async def channel(running: Running) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(running.target) as ch:
        yield ch


@pytest.fixture
def licenses(channel: grpc.aio.Channel) -> lgrpc.LicenseServiceStub:
    return lgrpc.LicenseServiceStub(channel)


@pytest.fixture
def usage(channel: grpc.aio.Channel) -> ugrpc.UsageServiceStub:
    return ugrpc.UsageServiceStub(channel)


@pytest.fixture
def make_policy(licenses: lgrpc.LicenseServiceStub) -> Any:
    async def make(**fields: Any) -> policy_pb2.Policy:
        fields.setdefault("name", "test policy")
        resp = await licenses.CreatePolicy(
            lpb.CreatePolicyRequest(policy=policy_pb2.Policy(**fields)), metadata=admin_md()
        )
        return resp.policy

    return make


@pytest.fixture
def make_license(licenses: lgrpc.LicenseServiceStub, make_policy: Any) -> Any:
    """make_license(policy=None, **license_fields); without a policy, one is made from
    `policy_fields`."""

    async def make(
        policy_id: str = "", policy_fields: dict[str, Any] | None = None, **fields: Any
    ) -> Any:
        if not policy_id:
            policy_id = (await make_policy(**(policy_fields or {}))).id
        resp = await licenses.CreateLicense(
            lpb.CreateLicenseRequest(license={"policy_id": policy_id, **fields}),
            metadata=admin_md(),
        )
        return resp.license

    return make


__all__ = ["upb"]
