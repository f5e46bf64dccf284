"""License keys at rest as digests (domain/keysecret.py, storage/migrate.py): nothing in
Redis reveals a key or SHA-256(key); license files still decrypt with Keygen's rule; the key
is returned only by CreateLicense (and its replay) and RotateLicenseKey; data of the earlier
format (keys in clear) is migrated on start, by several replicas at once and across a crash;
a replica with another secret refuses to start; the key check's caches."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import stat
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from meter.v1 import license_pb2
from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from meter_grpc.api import auth
from meter_grpc.config import ConfigError, Settings
from meter_grpc.domain.clock import SystemClock
from meter_grpc.domain.errors import MeterError
from meter_grpc.domain.keysecret import KeySecret
from meter_grpc.domain.models import ExpirationStrategy, KeyHolder
from meter_grpc.server import build_server
from meter_grpc.storage import keys, migrate
from meter_grpc.storage.commands import RedisClient
from meter_grpc.storage.embedded import EmbeddedServer
from meter_grpc.storage.store import RedisStore
from meter_grpc.storage.transport import is_cluster_url
from tests.conftest import Running
from tests.support import ADMIN_TOKEN, admin_md, expect_error, license_md
from tests.test_license_files import open_license_file
from tests.test_process import ServiceProcess


def _bytes_client(url: str) -> Any:
    """A redis-py client with raw (bytes) replies: values need not be UTF-8."""
    if is_cluster_url(url):
        hosts = url.split("://", 1)[1].split(",")
        nodes = [ClusterNode(h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1])) for h in hosts]
        return RedisCluster(startup_nodes=nodes, decode_responses=False)
    return aioredis.Redis.from_url(url, decode_responses=False)


async def _keyspace(url: str) -> list[bytes]:
    """Every key name and value of the store (all primaries), as bytes: SCANned, then read a
    page at a time in two pipelined rounds (the types, then the values), since the session's
    store holds every earlier test's keys."""
    client = _bytes_client(url)
    out: list[bytes] = []
    reads: dict[str, Callable[[Any, bytes], Any]] = {
        "string": lambda p, n: p.get(n),
        "hash": lambda p, n: p.hgetall(n),
        "zset": lambda p, n: p.zrange(n, 0, -1),
        "set": lambda p, n: p.smembers(n),
        "list": lambda p, n: p.lrange(n, 0, -1),
        "stream": lambda p, n: p.xrange(n),
    }
    try:
        names = [name async for name in client.scan_iter(count=1000)]
        for i in range(0, len(names), 500):
            page = names[i : i + 500]
            pipe = client.pipeline(transaction=False)
            for name in page:
                pipe.type(name)
            kinds = [k.decode() for k in await pipe.execute()]
            pipe = client.pipeline(transaction=False)
            for name, kind in zip(page, kinds, strict=True):
                reads.get(kind, lambda p, n: p.exists(n))(pipe, name)  # gone meanwhile: 0
            for name, value in zip(page, await pipe.execute(), strict=True):
                out.append(name)
                out += _flat(value)
    finally:
        await client.aclose()
    return out


def _flat(value: Any) -> list[bytes]:
    """The bytes in a reply: a string, a hash, members, or stream entries (id, fields)."""
    if value is None or isinstance(value, int):
        return []
    if isinstance(value, bytes):
        return [value]
    if isinstance(value, dict):
        return [b for kv in value.items() for b in kv]
    out: list[bytes] = []
    for item in value:
        if isinstance(item, tuple):  # a stream entry
            out += _flat(item[1])
        else:
            out.append(item)
    return out


def _needles(key: str) -> list[bytes]:
    """What must never be in Redis for a key: the key and SHA-256(key) in every usual form."""
    raw = hashlib.sha256(key.encode()).digest()
    return [
        key.encode(),
        raw.hex().encode(),
        raw.hex().upper().encode(),
        raw,
        base64.b64encode(raw).rstrip(b"="),
        base64.urlsafe_b64encode(raw).rstrip(b"="),
    ]


def _revealed(blobs: list[bytes], secrets: list[str]) -> list[str]:
    """The needles of `secrets` found in some blob: searched in one buffer of the blobs
    joined by a NUL byte, so that a needle without one is never found across two blobs (a
    raw digest holding a NUL is looked for blob by blob)."""
    joined = b"\0".join(blobs)
    found = []
    for key in secrets:
        for needle in _needles(key):
            if needle in joined if b"\0" not in needle else any(needle in b for b in blobs):
                found.append(f"{key}: {needle!r}")
    return found


async def _create(
    licenses: lgrpc.LicenseServiceStub, policy_id: str, request_id: str = "", key: str = ""
) -> license_pb2.License:
    resp = await licenses.CreateLicense(
        lpb.CreateLicenseRequest(
            license=license_pb2.License(policy_id=policy_id, key=key), request_id=request_id
        ),
        metadata=admin_md(),
    )
    return resp.license


@contextlib.asynccontextmanager
async def another_replica(running: Running, data_dir: Path) -> AsyncIterator[grpc.aio.Channel]:
    """A second meter-grpc server on the session's store (with its key secret), and a channel
    to it."""
    settings = Settings(
        listen="127.0.0.1:0",
        redis_url=running.redis_url,
        data_dir=data_dir,
        admin_tokens=[ADMIN_TOKEN],
        key_secret_file=running.key_secret_file,
    )
    service, port = await build_server(settings)
    await service.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield ch
    finally:
        await service.stop(1)


async def _key_works(usage: ugrpc.UsageServiceStub, license_id: str, key: str) -> bool:
    code = grpc.StatusCode.OK
    try:
        await usage.GetUsage(upb.GetUsageRequest(license_id=license_id), metadata=license_md(key))
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED)
    return code == grpc.StatusCode.OK


async def test_no_key_or_its_sha256_anywhere_in_redis(
    running: Running,
    licenses: lgrpc.LicenseServiceStub,
    usage: ugrpc.UsageServiceStub,
    make_policy: Any,
) -> None:
    """After creates (generated and given keys, with request ids and their replays), a
    rotation, increments and encrypted and plain checkouts by admin and license key, a SCAN
    of every key name and value finds no key and no SHA-256(key); the files still decrypt
    with SHA-256(key) (Keygen's rule)."""
    policy = await make_policy(name="digests", max_uses=100)
    rid = f"create-{os.urandom(4).hex()}"
    first = await _create(licenses, policy.id, rid)
    replay = await _create(licenses, policy.id, rid)
    assert replay.key == first.key and replay.id == first.id  # a lost answer, asked again
    given_key = f"GIVEN-{os.urandom(8).hex()}"
    given = await _create(licenses, policy.id, "given-" + rid, key=given_key)
    assert given.key == given_key
    assert (await _create(licenses, policy.id, "given-" + rid, key=given_key)).key == given_key
    plain = await _create(licenses, policy.id)
    old_key = plain.key
    rotated = (
        await licenses.RotateLicenseKey(
            lpb.RotateLicenseKeyRequest(id=plain.id), metadata=admin_md()
        )
    ).license
    assert rotated.key and rotated.key != old_key
    pub = (await licenses.GetPublicKey(lpb.GetPublicKeyRequest(), metadata=admin_md())).public_key
    for lic, key in ((first, first.key), (given, given_key), (plain, rotated.key)):
        await usage.IncrementUsage(
            upb.IncrementUsageRequest(license_id=lic.id, amount=1, request_id="r1"),
            metadata=license_md(key),
        )
        for md, carried in ((admin_md(), None), (license_md(key), key)):
            resp = await licenses.CheckOutLicense(
                lpb.CheckOutLicenseRequest(id=lic.id, encrypt=True), metadata=md
            )
            _, payload = open_license_file(resp.certificate, bytes(pub), key)
            assert payload["data"]["id"] == lic.id
            assert payload["data"]["attributes"]["key"] == carried
        got = (
            await licenses.GetLicense(lpb.GetLicenseRequest(id=lic.id), metadata=admin_md())
        ).license
        assert got.key == "" and got.id == lic.id  # reads never return the key
    listed = (
        await licenses.ListLicenses(
            lpb.ListLicensesRequest(policy_id=policy.id), metadata=admin_md()
        )
    ).licenses
    assert len(listed) == 3 and all(lic.key == "" for lic in listed)
    validated = await licenses.ValidateLicense(
        lpb.ValidateLicenseRequest(key=given_key), metadata=admin_md()
    )
    assert validated.valid and validated.license.id == given.id
    assert await _key_works(usage, plain.id, rotated.key)
    blobs = await _keyspace(running.redis_url)
    secret = KeySecret.load(running.key_secret_file)
    for lic, key in ((first, first.key), (given, given_key), (plain, rotated.key)):
        # the scan saw every node: each license and its index entry (slots spread over them)
        assert keys.license(lic.id).encode() in blobs
        assert keys.license_by_key(secret.digest(key)).encode() in blobs
    assert _revealed(blobs, [first.key, given_key, old_key, rotated.key]) == []
    # the check itself can fail: a planted copy of one key is found
    assert _revealed([b"x" + hashlib.sha256(given_key.encode()).hexdigest().encode()], [given_key])


# --- the earlier format, migrated on start ------------------------------------------------


async def _to_old_format(
    redis: Any, secret: KeySecret, lic: license_pb2.License, record: str = ""
) -> None:
    """Rewrites a license (and its create record) as the earlier version stored them."""
    name = keys.license(lic.id)
    await redis.hdel(name, "kd", "kf")
    await redis.hset(name, "key", lic.key)
    await redis.delete(keys.license_by_key(secret.digest(lic.key)))
    await redis.set(keys.license_by_key_sha256(lic.key), lic.id)
    if record:
        answer = json.loads(await redis.hget(record, "answer"))
        for field in ("kd", "kf"):
            del answer["license"][field]
        answer["license"]["key"] = lic.key
        await redis.hdel(record, "sealed")
        await redis.hset(record, mapping={"secret": lic.key, "answer": json.dumps(answer)})


async def _old_data(
    running: Running, redis: Any, licenses: lgrpc.LicenseServiceStub, policy_id: str, n: int
) -> tuple[list[license_pb2.License], list[str], KeySecret]:
    """n licenses in the earlier format, every other one created with a request id."""
    secret = KeySecret.load(running.key_secret_file)
    made, rids = [], []
    for i in range(n):
        rid = f"old-{i}-{os.urandom(4).hex()}" if i % 2 == 0 else ""
        lic = await _create(licenses, policy_id, rid)
        record = keys.create_request("license", f"{policy_id}/{rid}") if rid else ""
        await _to_old_format(redis, secret, lic, record)
        made.append(lic)
        rids.append(rid)
    old = await redis.hget(keys.license(made[0].id), "key")
    assert old == made[0].key  # really the earlier format
    await redis.delete(keys.keys_migrated())  # the earlier version never marked a migration
    return made, rids, secret


async def _assert_migrated(
    running: Running,
    redis: Any,
    licenses: lgrpc.LicenseServiceStub,
    usage: ugrpc.UsageServiceStub,
    policy_id: str,
    made: list[license_pb2.License],
    rids: list[str],
) -> None:
    for lic, rid in zip(made, rids, strict=True):
        assert not await redis.hexists(keys.license(lic.id), "key")
        assert not await redis.exists(keys.license_by_key_sha256(lic.key))
        if rid:
            record = keys.create_request("license", f"{policy_id}/{rid}")
            assert not await redis.hexists(record, "secret")
            replay = await _create(licenses, policy_id, rid)
            assert (replay.id, replay.key) == (lic.id, lic.key)
        assert await _key_works(usage, lic.id, lic.key), lic.id
    blobs = await _keyspace(running.redis_url)
    assert _revealed(blobs, [lic.key for lic in made]) == []


async def test_old_format_is_migrated_on_start(
    running: Running,
    redis: Any,
    licenses: lgrpc.LicenseServiceStub,
    usage: ugrpc.UsageServiceStub,
    make_policy: Any,
    tmp_path: Path,
) -> None:
    """Licenses with their key in clear, old index entries and create records with clear keys,
    written as the earlier version did; a replica starting on them migrates them: every old
    key still authenticates (on that replica and this one), replays return the full key,
    and nothing of the earlier format remains."""
    policy = await make_policy(name="old format")
    made, rids, _ = await _old_data(running, redis, licenses, policy.id, 6)
    async with another_replica(running, tmp_path) as ch:
        other = ugrpc.UsageServiceStub(ch)
        for lic in made:
            assert await _key_works(other, lic.id, lic.key)
        await _assert_migrated(running, redis, licenses, usage, policy.id, made, rids)
        assert await redis.get(keys.keys_migrated()) == "1"  # later starts skip the SCAN
        if running.redis_url.startswith("unix://"):  # the embedded server: its files are here
            await _assert_not_in_append_only_file(running, redis, [lic.key for lic in made])


async def _assert_not_in_append_only_file(running: Running, redis: Any, secrets: list[str]) -> None:
    """The migration had the append-only file rewritten: the commands that wrote the keys in
    clear are gone from the store's files."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        info = await redis.info("persistence")
        if not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
            break
        assert loop.time() < deadline, "the append-only file was not rewritten"
        await asyncio.sleep(0.05)
    data_dir = Path(running.redis_url.removeprefix("unix://")).parent
    files = [p.read_bytes() for p in data_dir.rglob("*.aof")]
    assert files  # the files were found: the check below can fail
    assert _revealed(files, secrets) == []


async def test_replicas_migrating_at_once_each_license_once(
    running: Running,
    redis: Any,
    licenses: lgrpc.LicenseServiceStub,
    usage: ugrpc.UsageServiceStub,
    make_policy: Any,
) -> None:
    """Four migrations at once over their own connections (replicas starting together):
    every license is moved exactly once in all, every old entry removed once."""
    policy = await make_policy(name="concurrent migration")
    made, rids, secret = await _old_data(running, redis, licenses, policy.id, 8)
    stores = [RedisStore(RedisClient(running.redis_url)) for _ in range(4)]
    try:
        done = await asyncio.gather(*(migrate.migrate(s, secret) for s in stores))
    finally:
        for s in stores:
            await s.close()
    assert sum(d.licenses for d in done) == len(made)
    assert sum(d.create_records for d in done) == sum(1 for r in rids if r)
    await _assert_migrated(running, redis, licenses, usage, policy.id, made, rids)


async def test_a_migration_killed_midway_completes_on_restart(
    running: Running,
    redis: Any,
    licenses: lgrpc.LicenseServiceStub,
    usage: ugrpc.UsageServiceStub,
    make_policy: Any,
    tmp_path: Path,
) -> None:
    """The process is SIGKILLed during the migration (after a license's new entry, and after
    a license is moved but before its old entry goes); the next start completes it."""
    policy = await make_policy(name="killed migration")
    made, rids, _ = await _old_data(running, redis, licenses, policy.id, 4)
    proc = ServiceProcess(tmp_path / "data")
    env = {
        "METER_REDIS_URL": running.redis_url,
        "METER_KEY_SECRET_FILE": str(running.key_secret_file),
        "METER_ADMIN_TOKENS": ADMIN_TOKEN,
    }
    for point in ("migrate_keys.claimed", "migrate_keys.license"):
        with pytest.raises(AssertionError, match="service exited -9"):
            await proc.start(METER_FAILPOINTS=f"{point}=kill", **env)
    left = [
        lic.id
        for lic in made
        if await redis.hexists(keys.license(lic.id), "key")
        or await redis.exists(keys.license_by_key_sha256(lic.key))
    ]
    assert left  # cut short: something of the earlier format is still there
    await proc.start(**env)
    try:
        await _assert_migrated(running, redis, licenses, usage, policy.id, made, rids)
        assert "license keys now stored as digests" in proc.log
        code, _ = await proc.terminate()
        assert code == 0
    finally:
        await proc.close()


async def test_a_start_the_store_did_not_answer_migrates_once_it_does(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    """The store is down when a replica starts on data of the earlier format: it serves
    (NOT_SERVING, calls UNAVAILABLE), and migrates as soon as the store answers again."""
    settings = Settings(
        listen="127.0.0.1:0",
        redis_url=server.url,
        data_dir=tmp_path / "data",
        admin_tokens=[ADMIN_TOKEN],
        shutdown_grace_s=1,
    )
    service, port = await build_server(settings)
    await service.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = lgrpc.LicenseServiceStub(ch)
            policy = (
                await stub.CreatePolicy(
                    lpb.CreatePolicyRequest(policy={"name": "p"}), metadata=admin_md()
                )
            ).policy
            lic = await _create(stub, policy.id)
    finally:
        await service.stop(1)
    secret = KeySecret.configured(None, tmp_path / "data")
    client = aioredis.Redis.from_url(server.url, decode_responses=True)
    try:
        await _to_old_format(client, secret, lic)
        await client.delete(keys.keys_migrated())
    finally:
        await client.aclose()
    await server.stop()
    service, port = await build_server(settings)
    assert not service.prepared
    await service.start()
    try:
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            usage = ugrpc.UsageServiceStub(ch)

            async def works() -> bool:
                try:
                    return await _key_works(usage, lic.id, lic.key)
                except AssertionError:  # UNAVAILABLE until the store answers
                    return False

            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while not await works():
                assert loop.time() < deadline, "the key of the earlier format never worked"
                await asyncio.sleep(0.1)
        assert service.prepared
        client = aioredis.Redis.from_url(server.url, decode_responses=True)
        try:
            assert not await client.hexists(keys.license(lic.id), "key")
            assert not await client.exists(keys.license_by_key_sha256(lic.key))
            assert await client.get(keys.keys_migrated()) == "1"
        finally:
            await client.aclose()
    finally:
        await service.stop(1)


# --- the server secret ----------------------------------------------------------------------


async def test_a_replica_with_another_secret_refuses_to_start(
    running: Running, tmp_path: Path
) -> None:
    other = tmp_path / "other-secret"
    other.write_bytes(os.urandom(32))
    settings = Settings(
        listen="127.0.0.1:0",
        redis_url=running.redis_url,
        data_dir=tmp_path / "data",
        admin_tokens=[ADMIN_TOKEN],
        key_secret_file=other,
    )
    with pytest.raises(migrate.KeySecretMismatch, match="METER_KEY_SECRET_FILE"):
        await build_server(settings)
    proc = ServiceProcess(tmp_path / "data")
    env = proc.env(METER_REDIS_URL=running.redis_url, METER_KEY_SECRET_FILE=str(other))
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meter_grpc",
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode == 2
    lines = err.decode().strip().splitlines()
    assert lines[-1].startswith("meter-grpc: the license key secret differs"), err.decode()
    assert "Traceback" not in err.decode()


def test_the_secret_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    first = KeySecret.configured(None, tmp_path)
    path = tmp_path / "key-secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_bytes()) == 32
    again = KeySecret.configured(None, tmp_path)
    assert again.digest("k" * 20) == first.digest("k" * 20)
    assert KeySecret.configured(path, tmp_path / "elsewhere").check == first.check
    hex_file = tmp_path / "hex"
    hex_file.write_text(path.read_bytes().hex() + "\n")
    assert KeySecret.load(hex_file).check == first.check


@pytest.mark.parametrize("content", [b"", b"short", b"z" * 64, os.urandom(33)])
def test_a_bad_secret_file_is_a_one_line_config_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "secret"
    path.write_bytes(content)
    settings = Settings.from_env(
        {
            "METER_DATA_DIR": str(tmp_path / "d"),
            "METER_LISTEN": "127.0.0.1:0",
            "METER_KEY_SECRET_FILE": str(path),
        }
    )
    with pytest.raises(ConfigError) as info:
        settings.check_files()
    assert str(info.value).startswith("METER_KEY_SECRET_FILE: ")
    assert "\n" not in str(info.value)


def test_sealed_values_open_only_for_their_purpose_and_secret() -> None:
    a, b = KeySecret(os.urandom(32)), KeySecret(os.urandom(32))
    sealed = a.seal_file_key("lic-1", "K" * 20)
    assert a.open_file_key("lic-1", sealed) == hashlib.sha256(b"K" * 20).digest()
    for opener, lid in ((a, "lic-2"), (b, "lic-1")):
        with pytest.raises(Exception, match="does not open"):
            opener.open_file_key(lid, sealed)
    assert a.seal(b"x", "p") != a.seal(b"x", "p")  # a fresh nonce each time
    assert a.digest("k") != b.digest("k")


# --- the key check: caches ----------------------------------------------------------------


async def test_an_unknown_key_then_created_works_at_once(
    licenses: lgrpc.LicenseServiceStub, usage: ugrpc.UsageServiceStub, make_policy: Any
) -> None:
    """A key refused as unknown (and remembered as such) works as soon as a license is
    created with it on this replica, and after a rotation to it."""
    policy = await make_policy(name="negative cache")
    key = f"SOON-{os.urandom(8).hex()}"
    for _ in range(3):
        err = await expect_error(
            usage.GetUsage(upb.GetUsageRequest(license_id="x"), metadata=license_md(key))
        )
        assert (err.code, err.message) == (grpc.StatusCode.UNAUTHENTICATED, "unknown license key")
    lic = await _create(licenses, policy.id, key=key)
    assert await _key_works(usage, lic.id, key)
    later = f"LATER-{os.urandom(8).hex()}"
    assert not await _key_works(usage, lic.id, later)
    await licenses.RotateLicenseKey(
        lpb.RotateLicenseKeyRequest(id=lic.id, key=later), metadata=admin_md()
    )
    assert await _key_works(usage, lic.id, later)


async def test_an_unknown_key_created_on_another_replica_works_within_the_bound(
    running: Running,
    licenses: lgrpc.LicenseServiceStub,
    make_policy: Any,
    tmp_path: Path,
) -> None:
    """Replica B remembers a key as unknown; replica A creates a license with it: B accepts
    it once its entry is older than the unknown-key bound (a second), as the loop shows."""
    policy = await make_policy(name="negative cache, two replicas")
    key = f"ELSEWHERE-{os.urandom(8).hex()}"
    async with another_replica(running, tmp_path) as ch:
        other = ugrpc.UsageServiceStub(ch)
        assert not await _key_works(other, "x", key)  # now remembered as unknown on B
        lic = await _create(licenses, policy.id, key=key)  # on A
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10 * auth.UNKNOWN_KEY_TTL_S
        while not await _key_works(other, lic.id, key):
            assert loop.time() < deadline, "B still refuses the key"
            await asyncio.sleep(0.05)


class _Counting:
    def __init__(self, store: RedisStore, delay_s: float = 0) -> None:
        self.store, self.delay_s, self.reads = store, delay_s, 0

    async def __call__(self, digest: str) -> KeyHolder | None:
        self.reads += 1
        await asyncio.sleep(self.delay_s)
        return await self.store.key_holder(digest)


async def test_random_keys_cost_one_read_each_and_bounded_memory(
    running: Running, make_license: Any
) -> None:
    """Against the real store: 200 concurrent checks of one unknown key read it once; 300
    distinct random keys asked 3 times each read 300 times; the unknown-key cache never
    holds more than its bound; a known key is read once, then served from the cache."""
    store = RedisStore(RedisClient(running.redis_url))
    secret = KeySecret.load(running.key_secret_file)
    lookup = _Counting(store, delay_s=0.05)
    authenticator = auth.Authenticator([], lookup, SystemClock(), secret.digest)
    authenticator.cache.unknown_size = 100
    authenticator.cache.unknown_ttl_s = authenticator.cache.ttl_s = 60
    method = "/meter.v1.UsageService/GetUsage"
    try:
        results = await asyncio.gather(
            *(
                authenticator.authenticate(method, "License NOPE-0000000000000000")
                for _ in range(200)
            ),
            return_exceptions=True,
        )
        assert all(
            isinstance(r, MeterError) and r.reason.name == "UNAUTHENTICATED" for r in results
        )
        assert lookup.reads == 1
        lookup.delay_s = 0
        lookup.reads = 0
        flood = [f"RAND-{os.urandom(8).hex()}" for _ in range(300)]
        for key in flood[:100] * 3:
            with pytest.raises(MeterError):
                await authenticator.authenticate(method, f"License {key}")
        assert lookup.reads == 100  # each distinct key once while it is remembered
        for key in flood[100:]:
            with pytest.raises(MeterError):
                await authenticator.authenticate(method, f"License {key}")
        assert lookup.reads == 300
        assert len(authenticator.cache) <= 100  # the bound: the oldest were dropped
        lic = await make_license()
        lookup.reads = 0
        for _ in range(50):
            principal = await authenticator.authenticate(method, f"License {lic.key}")
            assert principal.license_id == lic.id
        assert lookup.reads == 1
    finally:
        await store.close()


async def test_key_holder_reads_the_three_fields_it_needs(
    running: Running, make_license: Any
) -> None:
    """The store's key check answers from the index and the license's kd / expire / strategy,
    and refuses an index entry the license no longer backs."""
    store = RedisStore(RedisClient(running.redis_url))
    secret = KeySecret.load(running.key_secret_file)
    try:
        lic = await make_license(expire_time={"seconds": 4_000_000_000})
        holder = await store.key_holder(secret.digest(lic.key))
        assert holder == KeyHolder(lic.id, 4_000_000_000_000, ExpirationStrategy.UNSPECIFIED)
        assert await store.key_holder(secret.digest(lic.key + "x")) is None
        stale = secret.digest("STALE-" + lic.key)
        assert await store.claim_key(stale, lic.id) == ""  # an entry the license does not hold
        assert await store.key_holder(stale) is None
        await store.release_key(stale, lic.id)
    finally:
        await store.close()
