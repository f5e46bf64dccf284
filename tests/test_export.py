"""Usage export end to end (export/exporter.py): changes made over real gRPC connections reach
the NDJSON sink and a sink that fails, throttles and goes down, each exactly once by id, with
per-license sums equal to the counters and nothing left pending; on the embedded server and
the Cluster."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import urllib.request
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import policy_pb2
from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from meter_grpc.config import ConfigError, OpenMeterExport, Settings
from meter_grpc.domain import failpoints
from meter_grpc.domain.errors import MeterError
from meter_grpc.export.exporter import Exporter
from meter_grpc.export.model import ExportEvent, Kind, Outcome, Sink, Verdict
from meter_grpc.export.sinks.ndjson import NdjsonSink
from meter_grpc.server import Service, build_server
from meter_grpc.storage import keys
from tests.billing_emulators import OpenMeterEmulator
from tests.conftest import Running
from tests.support import (
    ADMIN_TOKEN,
    admin_md,
    expect_error,
    license_md,
    shared_key_secret_file,
    until,
)
from tests.test_cli import clean_env, run_cli


class FlakySink:
    """A billing system in the test: deduplicates by event id (like every real one), fails a
    share of calls (RETRY, as a 5xx), answers some with a throttle and a reset time (as a 429
    with its reset header), is down while `down` is set, and refuses for good (DEAD) the ids
    in `refuse` until they are removed. `held`: id -> event, once each."""

    name = "flaky"

    def __init__(self, *, fail: float = 0.3, throttle: float = 0.1, max_batch: int = 50) -> None:
        self.max_batch = max_batch
        self.fail, self.throttle = fail, throttle
        self.down = False
        self.refuse: set[str] = set()
        self.held: dict[str, ExportEvent] = {}
        self.order: dict[str, list[int]] = {}  # license -> uses in delivery order
        self.calls = 0
        self.rng = random.Random(7)
        self.busy = False

    async def deliver(self, events: Sequence[ExportEvent]) -> list[Outcome]:
        assert not self.busy, "deliver called concurrently with itself"
        assert 0 < len(events) <= self.max_batch
        self.busy = True
        try:
            self.calls += 1
            await asyncio.sleep(0)
            if self.down:
                return [Outcome(Verdict.RETRY, reason="connection refused")] * len(events)
            roll = self.rng.random()
            if roll < self.fail:
                return [Outcome(Verdict.RETRY, reason="503")] * len(events)
            if roll < self.fail + self.throttle:
                return [Outcome(Verdict.RETRY, retry_after_s=0.05, reason="429")] * len(events)
            out = []
            for e in events:
                if e.id in self.refuse:
                    out.append(Outcome(Verdict.DEAD, reason="422 invalid"))
                    continue
                if e.id not in self.held:
                    self.held[e.id] = e
                    self.order.setdefault(e.license_id, []).append(e.uses)
                out.append(Outcome.delivered())
            return out
        finally:
            self.busy = False

    async def close(self) -> None:
        pass


@asynccontextmanager
async def exporting(
    running: Running,
    data_dir: Path,
    sinks: Sequence[Sink],
    *,
    export: bool = True,
    **extra: Any,
) -> AsyncIterator[tuple[Service, grpc.aio.Channel]]:
    """A second server on the session's store with export on; `export` False: its outbox is
    written, its exporter never started."""
    ndjson = data_dir / "usage.ndjson"
    settings = Settings(
        listen="127.0.0.1:0",
        redis_url=running.redis_url,
        data_dir=data_dir,
        admin_tokens=[ADMIN_TOKEN],
        key_secret_file=shared_key_secret_file(),
        export_ndjson=str(ndjson),
        export_lease_s=1.0,
        export_backoff_max_s=1.0,
        export_sweep_s=0.5,
        **extra,
    )
    service, port = await build_server(settings, extra_sinks=sinks)
    assert service.exporter is not None and service.store.export
    if not export:
        service.exporter = None
    await service.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield service, ch
    finally:
        await service.stop(0)


def ndjson_lines(path: Path, *, complete: bool = False) -> list[dict[str, Any]]:
    """The file's lines; one being written (no newline yet) is left out unless `complete`,
    which asserts there is none."""
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.split("\n")
    if complete:
        assert lines[-1] == "", f"a torn last line: {lines[-1][:80]!r}"
    return [json.loads(line) for line in lines[:-1] if line]


async def _licenses(ch: grpc.aio.Channel, n: int) -> list[str]:
    ls = lgrpc.LicenseServiceStub(ch)
    p = (
        await ls.CreatePolicy(
            lpb.CreatePolicyRequest(policy=policy_pb2.Policy(name="export")),
            metadata=admin_md(),
        )
    ).policy
    out = []
    for i in range(n):
        req = lpb.CreateLicenseRequest(
            license={"policy_id": p.id, "metadata": {"external_subscription_id": f"sub-{i}"}}
        )
        out.append((await ls.CreateLicense(req, metadata=admin_md())).license.id)
    return out


async def _traffic(targets: Sequence[str], ids: Sequence[str], total: int, seed: int) -> None:
    """`total` increments, decrements and resets over 4 channels, 8 callers each."""
    rng = random.Random(seed)
    plan = [(rng.choice(ids), rng.random()) for _ in range(total)]
    chans = [grpc.aio.insecure_channel(targets[i % len(targets)]) for i in range(4)]
    stubs = [ugrpc.UsageServiceStub(c) for c in chans]
    md = admin_md()

    async def caller(k: int) -> None:
        us = stubs[k % 4]
        for lid, r in plan[k::32]:
            if r < 0.8:
                await us.IncrementUsage(
                    upb.IncrementUsageRequest(license_id=lid, amount=1 + int(r * 10)), metadata=md
                )
            elif r < 0.98:
                try:
                    await us.DecrementUsage(
                        upb.DecrementUsageRequest(license_id=lid, amount=1), metadata=md
                    )
                except grpc.aio.AioRpcError as exc:  # USAGE_UNDERFLOW at 0: nothing moved
                    if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                        raise
            else:
                await us.ResetUsage(upb.ResetUsageRequest(license_id=lid), metadata=md)

    try:
        await asyncio.gather(*(caller(k) for k in range(32)))
    finally:
        for c in chans:
            await c.close()


async def _counters(ch: grpc.aio.Channel, ids: Sequence[str]) -> dict[str, int]:
    us = ugrpc.UsageServiceStub(ch)
    out = {}
    for lid in ids:
        out[lid] = (
            await us.GetUsage(upb.GetUsageRequest(license_id=lid), metadata=admin_md())
        ).uses
    return out


async def _outbox_total(redis: aioredis.Redis, ids: Sequence[str]) -> int:
    """Changes counted so far (the last id of each license's sequence)."""
    total = 0
    for lid in ids:
        total += int(await redis.hget(keys.license(lid), "xseq") or 0)  # type: ignore[misc]
    return total


async def _nothing_pending(
    redis: aioredis.Redis, ids: Sequence[str], groups: Sequence[str]
) -> None:
    for stream in {keys.outbox(lid) for lid in ids}:
        for g in groups:
            summary = await redis.xpending(stream, g)  # type: ignore[misc]
            assert summary["pending"] == 0, (stream, g, summary)
        for info in await redis.xinfo_groups(stream):  # type: ignore[misc]
            if info["name"] in groups:
                assert info["lag"] == 0, info


@pytest.mark.timeout(600)
async def test_export_under_faults_holds_each_event_once(
    running: Running, redis: aioredis.Redis, tmp_path: Path
) -> None:
    flaky = FlakySink()
    async with exporting(running, tmp_path, [flaky]) as (service, ch):
        ids = await _licenses(ch, 20)
        target = f"127.0.0.1:{service.port}"
        await _traffic([target], ids, 5000, seed=1)
        flaky.down = True  # down for a stretch while changes keep coming
        await _traffic([target], ids, 2000, seed=2)
        await asyncio.sleep(0.5)
        flaky.down = False
        await _traffic([target], ids, 3000, seed=3)
        counters = await _counters(ch, ids)
        total = await _outbox_total(redis, ids)
        ndjson = tmp_path / "usage.ndjson"
        mine = set(ids)

        def held() -> dict[str, ExportEvent]:
            return {i: e for i, e in flaky.held.items() if e.license_id in mine}

        await until(lambda: len(held()) >= total, 120, "the flaky sink to hold every event")
        await until(
            lambda: len({e["id"] for e in ndjson_lines(ndjson) if e["subject"] in mine}) >= total,
            60,
            "the NDJSON file",
        )
        await until(lambda: _idle(service), 30, "the exporter to acknowledge everything")
    assert len(held()) == total
    lines = [e for e in ndjson_lines(ndjson, complete=True) if e["subject"] in mine]
    by_id = {e["id"]: e for e in lines}
    assert len(by_id) == total == len(lines)  # no crash here: no line twice
    for name, events in (
        ("flaky", [(e.license_id, e.delta, e.uses) for e in held().values()]),
        (
            "ndjson",
            [(e["subject"], e["data"]["delta"], e["data"]["uses"]) for e in by_id.values()],
        ),
    ):
        sums: dict[str, int] = {}
        for lid, delta, _ in events:
            sums[lid] = sums.get(lid, 0) + delta
        assert sums == {lid: n for lid, n in counters.items() if n or lid in sums}, name
    # Delivery order per license: each `uses` follows from the previous one.
    for lid in ids:
        uses = flaky.order.get(lid, [])
        deltas = sorted(
            (int(e.id.rsplit(":", 1)[1]), e.delta, e.uses)
            for e in flaky.held.values()
            if e.license_id == lid
        )
        assert uses == [u for _, _, u in deltas], lid
    # The license metadata reached the sink.
    some = next(iter(held().values()))
    assert some.license_metadata["external_subscription_id"].startswith("sub-")
    assert some.policy_id and some.policy_id == next(iter(held().values())).policy_id
    line = lines[0]
    assert line["specversion"] == "1.0" and line["type"].startswith("meter.usage.")
    assert line["time"].endswith("Z") and line["source"] == "meter-grpc"
    assert set(line["data"]) == {
        "delta", "uses", "meter", "license_id", "policy_id", "request_id", "kind",
    }  # fmt: skip
    await _nothing_pending(redis, ids, ["flaky", "ndjson"])


@pytest.mark.timeout(600)
async def test_export_to_the_openmeter_emulator_under_faults(
    running: Running, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """The real OpenMeter sink over HTTP against the emulator of its contract: 30% of calls
    answered 503, 10% 429 with its reset header, some taken but never answered, and down
    (connections refused) for a stretch; 10,000 changes over 4 channels."""
    emu = await OpenMeterEmulator(
        seed=5, fail_rate=0.3, throttle_rate=0.1, lost_rate=0.03, throttle_s=0.2
    ).start()
    try:
        om = OpenMeterExport(url=emu.url, token=emu.token)
        async with exporting(running, tmp_path, [], export_openmeter=om) as (service, ch):
            ids = await _licenses(ch, 16)
            target = f"127.0.0.1:{service.port}"
            await _traffic([target], ids, 4000, seed=21)
            await emu.down()
            await _traffic([target], ids, 2000, seed=22)
            await asyncio.sleep(1)
            await emu.up()
            await _traffic([target], ids, 4000, seed=23)
            counters = await _counters(ch, ids)
            total = await _outbox_total(redis, ids)
            mine = set(ids)

            def held() -> dict[str, Any]:
                return {i: e for (_, i), e in emu.held.items() if e["data"]["license_id"] in mine}

            await until(lambda: len(held()) >= total, 300, "every event held by the emulator")
            await until(lambda: _idle(service), 60, "the exporter to acknowledge everything")
        assert len(held()) == total and emu.double_billed() == []
        assert emu.calls > 0 and emu.statuses[503] > 0 and emu.statuses[429] > 0
        sums: dict[str, int] = {}
        for e in held().values():
            lid = e["data"]["license_id"]
            sums[lid] = sums.get(lid, 0) + e["data"]["delta"]
        assert sums == {lid: n for lid, n in counters.items() if n or lid in sums}
        await _nothing_pending(redis, ids, ["openmeter", "ndjson"])
    finally:
        await emu.close()


def _idle(service: Service) -> bool:
    assert service.exporter is not None
    return all(not run.queue for run in service.exporter.runs.values())


async def test_dead_letters_are_kept_and_a_replay_delivers_them_once(
    running: Running, redis: aioredis.Redis, tmp_path: Path
) -> None:
    flaky = FlakySink(fail=0, throttle=0)
    async with exporting(running, tmp_path, [flaky], metrics_listen="127.0.0.1:0") as (
        service,
        ch,
    ):
        ids = await _licenses(ch, 1)
        lid = ids[0]
        for n in range(1, 11):
            if n in (3, 7):
                flaky.refuse.add(f"{lid}:{n}")
        us = ugrpc.UsageServiceStub(ch)
        for _ in range(10):
            await us.IncrementUsage(upb.IncrementUsageRequest(license_id=lid), metadata=admin_md())
        await until(lambda: sum(e.license_id == lid for e in flaky.held.values()) == 8, 30, "8")
        dead_name = keys.export_dead("flaky")
        await until_async(lambda: _xlen(redis, dead_name, 2), 30)
        md = admin_md()
        status = {
            s.sink: s for s in (await us.ExportStatus(upb.ExportStatusRequest(), metadata=md)).sinks
        }
        assert list(status) == ["ndjson", "flaky"]
        assert status["flaky"].dead_letters == 2
        assert "422" in status["flaky"].last_error
        assert status["flaky"].last_error_time.seconds > 0
        assert status["ndjson"].dead_letters == 0 and status["ndjson"].last_error == ""

        async def replay(limit: int = 0) -> tuple[int, int, int]:
            r = await us.ReplayDeadLetters(
                upb.ReplayDeadLettersRequest(sink="flaky", limit=limit), metadata=md
            )
            return r.delivered, r.failed, r.remaining

        # Still refused: a replay leaves them dead.
        assert await replay() == (0, 2, 2)
        assert await redis.xlen(dead_name) == 2  # type: ignore[misc]
        flaky.refuse.clear()  # the fix
        assert await replay(1) == (1, 0, 1)
        assert await replay() == (1, 0, 0)
        assert await redis.xlen(dead_name) == 0  # type: ignore[misc]
        assert await replay() == (0, 0, 0)
        # Bad input changes nothing; a license key may not call either.
        for bad, field in (
            (upb.ReplayDeadLettersRequest(sink="nope"), "sink"),
            (upb.ReplayDeadLettersRequest(), "sink"),
            (upb.ReplayDeadLettersRequest(sink="flaky", limit=-1), "limit"),
        ):
            err = await expect_error(us.ReplayDeadLetters(bad, metadata=md))
            assert err.code == grpc.StatusCode.INVALID_ARGUMENT
            assert err.reason == "INVALID_ARGUMENT" and err.bad_fields == [field]
        key = await _license_key(ch, lid)
        for call in (
            us.ExportStatus(upb.ExportStatusRequest(), metadata=license_md(key)),
            us.ReplayDeadLetters(
                upb.ReplayDeadLettersRequest(sink="flaky"), metadata=license_md(key)
            ),
        ):
            err = await expect_error(call)
            assert err.code == grpc.StatusCode.PERMISSION_DENIED
        # The same over the command line.
        env = clean_env(METER_TARGET=f"127.0.0.1:{service.port}", METER_TOKEN=ADMIN_TOKEN)
        shown = await asyncio.to_thread(run_cli, "export", "status", "--json", env=env)
        assert shown.status == 0, shown.stderr
        rows = {r["sink"]: r for r in json.loads(shown.stdout)["sinks"]}
        assert set(rows) == {"ndjson", "flaky"} and "422" in rows["flaky"]["last_error"]
        table = await asyncio.to_thread(run_cli, "export", "status", env=env)
        assert table.stdout.splitlines()[0].split()[:4] == [
            "SINK", "LAG_EVENTS", "LAG_SECONDS", "DEAD_LETTERS",
        ]  # fmt: skip
        replayed = await asyncio.to_thread(
            run_cli, "export", "replay", "flaky", "--limit", "5", "--json", env=env
        )
        assert replayed.status == 0, replayed.stderr
        assert json.loads(replayed.stdout)["sink"] == "flaky"
        bad = await asyncio.to_thread(run_cli, "export", "replay", "nope", env=env)
        assert bad.status != 0 and "sink" in bad.stderr
        # Prometheus: what the sink answered, per outcome.
        assert service.metrics_port is not None
        text = await asyncio.to_thread(_get, f"http://127.0.0.1:{service.metrics_port}/metrics")
        assert 'meter_grpc_export_events_total{outcome="dead",sink="flaky"} 2.0' in text
        assert 'meter_grpc_export_lag_events{sink="flaky"}' in text
        got = sorted(i for i, e in flaky.held.items() if e.license_id == lid)
        assert got == sorted(f"{lid}:{n}" for n in range(1, 11))
        await until(lambda: _idle(service), 30, "idle")
    await _nothing_pending(redis, ids, ["flaky", "ndjson"])


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return str(r.read().decode())


async def _license_key(ch: grpc.aio.Channel, license_id: str) -> str:
    ls = lgrpc.LicenseServiceStub(ch)
    r = await ls.RotateLicenseKey(lpb.RotateLicenseKeyRequest(id=license_id), metadata=admin_md())
    return str(r.license.key)


async def _xlen(redis: aioredis.Redis, name: str, n: int) -> bool:
    return int(await redis.xlen(name)) >= n  # type: ignore[misc]


async def until_async(check: Any, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await check():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.fixture(autouse=True)
async def _fresh_dead_letters(redis: aioredis.Redis) -> None:
    await redis.delete(keys.export_dead("flaky"), keys.export_error("flaky"))  # type: ignore[misc]


@pytest.mark.timeout(600)
async def test_exporting_replica_killed_twice_mid_export_loses_nothing(
    running: Running, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """Replica A takes the calls (export on, no exporter of its own); replica B, `python -m
    meter_grpc` on the same store, exports to its NDJSON file and is SIGKILLed twice while
    it has a backlog. Each event is in the file (once its duplicates by id are dropped)."""
    from tests.test_process import ServiceProcess

    ndjson = tmp_path / "b.ndjson"
    b = ServiceProcess(tmp_path / "b")
    env = {
        "METER_REDIS_URL": running.redis_url,
        "METER_KEY_SECRET_FILE": str(shared_key_secret_file()),
        "METER_EXPORT_NDJSON": str(ndjson),
        "METER_EXPORT_LEASE": "1",
    }
    settings = Settings(
        listen="127.0.0.1:0",
        redis_url=running.redis_url,
        data_dir=tmp_path / "a",
        admin_tokens=[ADMIN_TOKEN],
        key_secret_file=shared_key_secret_file(),
        export_ndjson=str(tmp_path / "a.ndjson"),
    )
    a, port = await build_server(settings)
    assert a.exporter is not None
    await a.exporter.close()
    a.exporter = None  # A only appends to the outbox
    await a.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            ids = await _licenses(ch, 12)
            mine = set(ids)

            def exported() -> set[str]:
                return {e["id"] for e in ndjson_lines(ndjson) if e["subject"] in mine}

            await b.start(**env)
            stop = asyncio.Event()

            async def calls() -> None:  # until both kills are done: 10,000 at least
                seed = 11
                while seed < 21 or not stop.is_set():
                    await _traffic([f"127.0.0.1:{port}"], ids, 1000, seed=seed)
                    seed += 1

            traffic = asyncio.create_task(calls())
            for _ in range(2):
                start = len(exported())

                async def backlog(start: int = start) -> bool:
                    # Mid-export: it wrote some since its start, and some counted are not yet.
                    done = len(exported())
                    return done > start + 300 and await _outbox_total(redis, ids) > done

                await until_async(backlog, 120)
                assert b.proc is not None
                b.proc.kill()  # SIGKILL while calls come and its backlog is being written
                await b.wait_exit()
                await b.start(**env)
            stop.set()
            await traffic
            total = await _outbox_total(redis, ids)
            await until(lambda: len(exported()) >= total, 120, "every event in the file")
            counters = await _counters(ch, ids)
    finally:
        await b.close()
        await a.stop(0)
    lines = [e for e in ndjson_lines(ndjson, complete=True) if e["subject"] in mine]
    by_id = {e["id"]: e for e in lines}
    assert len(by_id) == total
    for e in lines:  # a line written twice is the same event
        assert e == by_id[e["id"]]
    sums: dict[str, int] = {}
    for e in by_id.values():
        sums[e["subject"]] = sums.get(e["subject"], 0) + e["data"]["delta"]
    assert sums == {lid: n for lid, n in counters.items() if n or lid in sums}
    await until_async(lambda: _acked(redis, ids), 30)
    await _nothing_pending(redis, ids, ["ndjson"])


async def _acked(redis: aioredis.Redis, ids: Sequence[str]) -> bool:
    for stream in {keys.outbox(lid) for lid in ids}:
        if (await redis.xpending(stream, "ndjson"))["pending"]:  # type: ignore[misc]
            return False
    return True


async def test_ndjson_cuts_a_torn_last_line_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "u.ndjson"
    path.write_bytes(b'{"id":"a"}\n{"id":"b","spec')  # killed mid-write
    sink = NdjsonSink(str(path))
    e = ExportEvent("l:1", "l", "p", "", Kind.INCREMENT, 2, 2, "", 1_700_000_000_000)
    assert await sink.deliver([e]) == [Outcome.delivered()]
    await sink.close()
    lines = ndjson_lines(path, complete=True)
    assert [x["id"] for x in lines] == ["a", "l:1"]
    assert lines[1]["time"] == "2023-11-14T22:13:20.000Z" and lines[1]["data"]["delta"] == 2


def test_export_settings(tmp_path: Path) -> None:
    s = Settings.from_env({})
    assert (s.export_ndjson, s.export_ndjson_source) == ("", "meter-grpc")
    assert (s.export_lease_s, s.export_dead_letters_max) == (10.0, 100_000)
    assert s.export_backoff_max_s == 60.0
    s = Settings.from_env(
        {
            "METER_EXPORT_NDJSON": str(tmp_path / "u.ndjson"),
            "METER_EXPORT_NDJSON_SOURCE": "billing-a",
            "METER_EXPORT_LEASE": "2.5",
            "METER_EXPORT_DEAD_LETTERS_MAX": "500",
            "METER_EXPORT_BACKOFF_MAX": "2.5",
        }
    )
    assert s.export_backoff_max_s == 2.5
    assert s.export_ndjson == str(tmp_path / "u.ndjson") and s.export_ndjson_source == "billing-a"
    assert (s.export_lease_s, s.export_dead_letters_max) == (2.5, 500)
    for name, bad in (
        ("METER_EXPORT_LEASE", "0"),
        ("METER_EXPORT_LEASE", "-1"),
        ("METER_EXPORT_LEASE", "soon"),
        ("METER_EXPORT_DEAD_LETTERS_MAX", "0"),
        ("METER_EXPORT_DEAD_LETTERS_MAX", "many"),
        ("METER_EXPORT_BACKOFF_MAX", "0"),
    ):
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({name: bad})
    # The file's directory must exist and be writable; a directory is no file.
    for path in (tmp_path / "missing" / "u.ndjson", tmp_path):
        s = Settings(listen="127.0.0.1:0", data_dir=tmp_path, export_ndjson=str(path))
        with pytest.raises(ConfigError, match="METER_EXPORT_NDJSON"):
            s.check_files()
    Settings(listen="127.0.0.1:0", data_dir=tmp_path, export_ndjson="-").check_files()
    Settings(
        listen="127.0.0.1:0", data_dir=tmp_path, export_ndjson=str(tmp_path / "u.ndjson")
    ).check_files()


async def test_licenses_written_before_export_was_on_export_from_then_on(
    running: Running, channel: grpc.aio.Channel, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """Data of a server without export (or of an earlier version): the same keys, no
    `xseq`. Once export is on, its changes go out numbered from 1, `uses` the full count."""
    ids = await _licenses(channel, 2)  # the session's server: export off
    us = ugrpc.UsageServiceStub(channel)
    for lid in ids:
        await us.IncrementUsage(
            upb.IncrementUsageRequest(license_id=lid, amount=5), metadata=admin_md()
        )
    assert await _outbox_total(redis, ids) == 0
    async with exporting(running, tmp_path, []) as (_service, ch):
        us2 = ugrpc.UsageServiceStub(ch)
        for lid in ids:
            await us2.IncrementUsage(
                upb.IncrementUsageRequest(license_id=lid, amount=2), metadata=admin_md()
            )
            await us2.DecrementUsage(upb.DecrementUsageRequest(license_id=lid), metadata=admin_md())
        path = tmp_path / "usage.ndjson"
        mine = set(ids)
        await until(
            lambda: len([e for e in ndjson_lines(path) if e["subject"] in mine]) == 4, 30, "4 lines"
        )
    lines = [e for e in ndjson_lines(path, complete=True) if e["subject"] in mine]
    for lid in ids:
        got = [
            (e["id"], e["data"]["delta"], e["data"]["uses"]) for e in lines if e["subject"] == lid
        ]
        assert got == [(f"{lid}:1", 2, 7), (f"{lid}:2", -1, 6)]


async def test_outbox_streams_missing_from_the_registry_are_found_by_a_scan(
    running: Running, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """Streams written before the registry of outbox streams existed (an earlier version, or
    the registry lost): the exporter SCANs for them when it starts and exports them."""
    async with exporting(running, tmp_path, [], export=False) as (service, ch):
        ids = await _licenses(ch, 12)
        await _traffic([f"127.0.0.1:{service.port}"], ids, 200, seed=31)
    total = await _outbox_total(redis, ids)
    streams = {keys.outbox(lid) for lid in ids}
    assert streams <= await redis.smembers(keys.export_streams())  # type: ignore[misc]
    await redis.delete(keys.export_streams())
    flaky = FlakySink(fail=0, throttle=0)
    mine = set(ids)
    async with exporting(running, tmp_path, [flaky]) as (service, _ch):

        def held() -> int:
            return sum(1 for e in flaky.held.values() if e.license_id in mine)

        await until(lambda: held() >= total, 60, "every event of the unregistered streams")
        assert streams <= await redis.smembers(keys.export_streams())  # type: ignore[misc]
    assert held() == total > 0


async def test_idle_streams_are_not_read_until_their_newest_entry_changes(
    running: Running, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """An exporter with 600 outbox streams and nothing new reads none of them again: it looks
    at their newest ids in one script call per node (outbox_heads.lua), and reads only the
    stream whose head moved, then delivers its event."""
    slots = range(7, keys.SLOTS, keys.SLOTS // 600)
    await redis.sadd(keys.export_streams(), *(keys.outbox_of_slot(s) for s in slots))  # type: ignore[misc]
    flaky = FlakySink(fail=0, throttle=0)
    async with exporting(running, tmp_path, [flaky]) as (service, ch):
        exporter = service.exporter
        assert exporter is not None
        reads: list[str] = []
        read = exporter._read

        async def counted(run: Any, stream: str, st: Any, room: int) -> int:
            reads.append(stream)
            return await read(run, stream, st, room)

        exporter._read = counted  # type: ignore[method-assign]
        await until(lambda: len(set(reads)) >= len(slots), 30, "every stream read once")
        await asyncio.sleep(3 * 2.0)  # past the longest idle interval (IDLE_POLL_MAX_S)
        reads.clear()
        await asyncio.sleep(2 * 2.0)
        assert reads == []
        [lid] = await _licenses(ch, 1)
        await ugrpc.UsageServiceStub(ch).IncrementUsage(
            upb.IncrementUsageRequest(license_id=lid, amount=3), metadata=admin_md()
        )
        await until(lambda: f"{lid}:1" in flaky.held, 30, "the new event delivered")
        assert set(reads) == {keys.outbox(lid)}


class RecordingSink:
    """Takes every event at once and keeps each batch it was handed."""

    name = "recorder"
    max_batch = 32

    def __init__(self) -> None:
        self.batches: list[list[ExportEvent]] = []

    async def deliver(self, events: Sequence[ExportEvent]) -> list[Outcome]:
        self.batches.append(list(events))
        return [Outcome.delivered()] * len(events)

    async def close(self) -> None:
        pass


async def test_a_batch_spreads_over_the_licenses_waiting(
    running: Running, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """A backlog of 16 licenses, 60 events each (each license in a stream of its own, as a
    slot is): the first batches take from every license in turn, not 32 events of the first
    license read. (A sink that calls per customer, Stripe, worked on one license at a time:
    the queue filled with the first streams' 500 entries each and a batch took the oldest.)"""
    async with exporting(running, tmp_path, [], export=False) as (_service, ch):
        ids = await _licenses(ch, 16)
        us = ugrpc.UsageServiceStub(ch)
        for _ in range(60):
            await asyncio.gather(
                *(
                    us.IncrementUsage(
                        upb.IncrementUsageRequest(license_id=lid), metadata=admin_md()
                    )
                    for lid in ids
                )
            )
    total = await _outbox_total(redis, ids)
    assert total == 16 * 60
    recorder = RecordingSink()
    mine = set(ids)
    async with exporting(running, tmp_path, [recorder]):

        def held() -> int:
            return sum(e.license_id in mine for b in recorder.batches for e in b)

        await until(lambda: held() >= total, 60, "every event")
    first = [b for b in recorder.batches if any(e.license_id in mine for e in b)][:5]
    for batch in first:
        licenses = {e.license_id for e in batch}
        assert len(licenses) >= 12, [len(licenses) for licenses in first]
    # Each license's events still in order, across and within batches.
    for lid in ids:
        seq = [
            int(e.id.rsplit(":", 1)[1]) for b in recorder.batches for e in b if e.license_id == lid
        ]
        assert seq == sorted(seq) and len(set(seq)) == 60, lid


async def test_a_removed_sink_no_longer_holds_the_outbox_back_and_can_be_forgotten(
    running: Running, redis: aioredis.Redis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A sink taken out of the configuration: its consumer group stays on the outbox streams,
    but trimming follows the sinks configured on live replicas only, so the outbox does not
    grow for ever behind it. The removed sink is reported (a WARNING once per start,
    ExportStatus.removed_sinks, `meter-grpc export status`), and `meter-grpc export forget`
    destroys its groups and its dead letters; a sink still configured cannot be forgotten."""
    gone = FlakySink(fail=0, throttle=0)
    gone.name = "gone"
    await redis.delete(keys.export_dead("gone"), keys.export_error("gone"))  # type: ignore[misc]
    async with exporting(running, tmp_path, [gone]) as (service, ch):
        ids = await _licenses(ch, 6)
        us = ugrpc.UsageServiceStub(ch)
        for lid in ids:
            gone.refuse.add(f"{lid}:1")  # a dead letter each
            await us.IncrementUsage(upb.IncrementUsageRequest(license_id=lid), metadata=admin_md())
        await until_async(lambda: _xlen(redis, keys.export_dead("gone"), 6), 30)
        gone.down = True  # from now on it holds what it read pending
        await _traffic([f"127.0.0.1:{service.port}"], ids, 300, seed=51)
        await until(lambda: _idle_but(service, "gone"), 30, "ndjson to take everything")
    streams = {keys.outbox(lid) for lid in ids}
    held_back = sum([await redis.xlen(s) for s in streams])  # type: ignore[misc]
    assert held_back > 0  # the "gone" group holds them (pending or unread)
    caplog.set_level(logging.WARNING, logger="meter_grpc.export.exporter")
    async with exporting(running, tmp_path, []) as (service, ch):  # "gone" is configured no more
        await until(lambda: "'gone' is configured on no replica" in caplog.text, 30, "warning")
        assert caplog.text.count("'gone' is configured on no replica") == 1
        us = ugrpc.UsageServiceStub(ch)
        await _traffic([f"127.0.0.1:{service.port}"], ids, 100, seed=52)

        async def trimmed() -> bool:  # ndjson acknowledged all: nothing of mine is kept
            assert service.exporter is not None
            for s in streams:
                await service.exporter.trim(s)
            return sum([await redis.xlen(s) for s in streams]) == 0  # type: ignore[misc]

        await until_async(trimmed, 30)
        for stream in streams:  # the group is still there, behind the trimmed entries
            names = {g["name"] for g in await redis.xinfo_groups(stream)}  # type: ignore[misc]
            assert "gone" in names
        status = await us.ExportStatus(upb.ExportStatusRequest(), metadata=admin_md())
        assert [s.sink for s in status.sinks] == ["ndjson"]
        removed = {s.sink: s for s in status.removed_sinks}
        assert "gone" in removed and removed["gone"].dead_letters == 6
        assert "ndjson" not in removed
        env = clean_env(METER_TARGET=f"127.0.0.1:{service.port}", METER_TOKEN=ADMIN_TOKEN)
        shown = await asyncio.to_thread(run_cli, "export", "status", "--json", env=env)
        assert shown.status == 0, shown.stderr
        doc = json.loads(shown.stdout)
        assert "gone" in {r["sink"] for r in doc["removed_sinks"]}
        table = await asyncio.to_thread(run_cli, "export", "status", env=env)
        assert "export forget gone" in table.stderr
        # A sink configured here (or on any live replica) is not forgotten.
        kept = await asyncio.to_thread(run_cli, "export", "forget", "ndjson", env=env)
        assert kept.status != 0 and "configured on a live replica" in kept.stderr
        forgot = await asyncio.to_thread(run_cli, "export", "forget", "gone", "--json", env=env)
        assert forgot.status == 0, forgot.stderr
        answer = json.loads(forgot.stdout)
        assert answer["sink"] == "gone" and int(answer["groups"]) >= len(streams)
        assert int(answer["dead_letters"]) == 6
        for stream in streams:
            names = {g["name"] for g in await redis.xinfo_groups(stream)}  # type: ignore[misc]
            assert "gone" not in names and "ndjson" in names
        for name in (keys.export_dead("gone"), keys.export_error("gone")):
            assert not await redis.exists(name)  # type: ignore[misc]
        status = await us.ExportStatus(upb.ExportStatusRequest(), metadata=admin_md())
        assert "gone" not in {s.sink for s in status.removed_sinks}
        again = await asyncio.to_thread(run_cli, "export", "forget", "gone", env=env)
        assert again.status != 0 and "no consumer group" in again.stderr
    await _nothing_pending(redis, ids, ["ndjson"])


@pytest.fixture
async def first_stream_registered(redis: aioredis.Redis) -> AsyncIterator[str]:
    """The first outbox name of all registered in keys.export_streams() without a stream (as
    after it was deleted), for the test: it comes before any stream a test uses."""
    first = min(keys.outbox_of_slot(slot) for slot in range(16384))
    added = await redis.sadd(keys.export_streams(), first)  # type: ignore[misc]
    yield first
    if added:
        await redis.srem(keys.export_streams(), first)  # type: ignore[misc]


@pytest.mark.parametrize(
    "step",
    [
        "forget_export_sink.group",
        "forget_export_sink.error_deleted",
        "forget_export_sink.dead_deleted",
    ],
)
async def test_a_forget_cut_short_at_any_step_is_finished_by_running_it_again(
    running: Running,
    redis: aioredis.Redis,
    failpoint: Any,
    first_stream_registered: str,
    step: str,
) -> None:
    """ForgetExportSink is several steps (destroy the sink's group on every outbox stream,
    delete its last error, delete its dead letters, trim): cut short after any of them (a
    crash, a deadline, the store gone), the sink is half forgotten. Running it again removes
    exactly what is left, whether or not the sink ever had dead letters (before, a forget cut
    after its groups left the last error behind for good: the next run found no group and no
    dead letter and refused); trimming needs nothing of it (it follows live sinks only), and
    once nothing is left, forget says so."""
    exporter = Exporter(running.service.store, [])
    # Streams of other licenses come first in name order and hold no group of the sink (here
    # the first name of all, registered without a stream): the cut after the sink's first
    # group is still after its first group, and trimming passes over the missing stream.
    for with_dead in (True, False):
        sink = f"half-{step.rsplit('.', 1)[1]}-{int(with_dead)}"
        streams = [keys.outbox(f"forget-{sink}-{n}") for n in range(3)]
        assert first_stream_registered not in streams
        for stream in streams:
            await redis.delete(stream)  # type: ignore[misc]
            await redis.xadd(stream, {"id": "x:1", "k": "increment"})  # type: ignore[misc]
            await redis.xgroup_create(stream, sink, id="0")  # type: ignore[misc]
            await redis.sadd(keys.export_streams(), stream)  # type: ignore[misc]
        if with_dead:
            await redis.xadd(keys.export_dead(sink), {"id": "x:1", "reason": "refused"})  # type: ignore[misc]
        await redis.hset(keys.export_error(sink), mapping={"reason": "down", "at": "1"})  # type: ignore[misc]
        try:
            failpoint(step)
            with pytest.raises(MeterError):
                await exporter.forget(sink)
            failpoints.arm({})
            left = [
                s
                for s in streams
                if sink in {g["name"] for g in await redis.xinfo_groups(s)}  # type: ignore[misc]
            ]
            dead_left = await redis.xlen(keys.export_dead(sink))  # type: ignore[misc]
            error_left = await redis.exists(keys.export_error(sink))  # type: ignore[misc]
            if step == "forget_export_sink.group":
                assert len(left) == 2  # the cut came after the first of three
            if left or dead_left or error_left:
                groups, dead = await exporter.forget(sink)
                assert (groups, dead) == (len(left), dead_left)
            else:  # cut after its last removal: it is done, and says so
                with pytest.raises(ValueError, match="no consumer group"):
                    await exporter.forget(sink)
            for stream in streams:
                names = {g["name"] for g in await redis.xinfo_groups(stream)}  # type: ignore[misc]
                assert sink not in names
            for name in (keys.export_dead(sink), keys.export_error(sink)):
                assert not await redis.exists(name)  # type: ignore[misc]
            with pytest.raises(ValueError, match="no consumer group"):
                await exporter.forget(sink)
        finally:
            failpoints.arm({})
            for stream in streams:
                await redis.delete(stream)  # type: ignore[misc]
                await redis.srem(keys.export_streams(), stream)  # type: ignore[misc]
            await redis.delete(keys.export_dead(sink), keys.export_error(sink))  # type: ignore[misc]


def _idle_but(service: Service, sink: str) -> bool:
    assert service.exporter is not None
    return all(not run.queue for name, run in service.exporter.runs.items() if name != sink)


async def test_trim_and_status_survive_acknowledgements_racing_them(
    running: Running, redis: aioredis.Redis
) -> None:
    """A group's entries acknowledged between the XINFO GROUPS that says it has some pending
    and the XPENDING that asks for the oldest (another sink's task acknowledges while this one
    trims): XPENDING answers no oldest id. Trimming and ExportStatus read that as nothing
    pending; they failed on int('None') (or sent XTRIM MINID None), which stalled the sink's
    task a second and made ExportStatus answer INTERNAL."""
    stream = keys.outbox("race-license")
    await redis.delete(stream)  # type: ignore[misc]
    sink = RecordingSink()
    sink.name = "racer"
    exporter = Exporter(running.service.store, [sink])
    await redis.xgroup_create(stream, sink.name, id="0", mkstream=True)  # type: ignore[misc]
    await redis.sadd(keys.export_streams(), stream)  # type: ignore[misc]
    stop = asyncio.Event()

    async def acknowledger() -> None:  # pending goes 1, 0, 1, 0 ... as fast as it can
        n = 0
        while not stop.is_set():
            n += 1
            fields = {"id": f"race-license:{n}", "k": "increment", "d": "1", "u": str(n)}
            await redis.xadd(stream, {**fields, "rid": "", "t": "1"})  # type: ignore[misc]
            got = await redis.xreadgroup(sink.name, "b0", {stream: ">"}, count=1)  # type: ignore[misc]
            for _, rows in got:
                await redis.xack(stream, sink.name, *[r[0] for r in rows])  # type: ignore[misc]

    task = asyncio.create_task(acknowledger())
    try:
        for n in range(300):
            await exporter.trim(stream)
            if n % 5 == 0:  # reads every outbox stream of the session: less often
                await exporter._status([sink.name])
    finally:
        stop.set()
        await task
        await redis.delete(stream)  # type: ignore[misc]
        await redis.srem(keys.export_streams(), stream)  # type: ignore[misc]


class HoldBackSink:
    """Answers the events of `mine` 'held back, not sent' (a retry with sent False) in its
    first `rounds` calls that carry any, then takes them; takes every other event at once."""

    name = "holdback"
    max_batch = 10

    def __init__(self, mine: set[str], rounds: int) -> None:
        self.mine, self.rounds = mine, rounds
        self.calls = 0
        self.first_call = 0.0
        self.delivered_at = 0.0

    async def deliver(self, events: Sequence[ExportEvent]) -> list[Outcome]:
        if not any(e.license_id in self.mine for e in events):
            return [Outcome.delivered()] * len(events)
        self.calls += 1
        now = asyncio.get_running_loop().time()
        self.first_call = self.first_call or now
        if self.calls <= self.rounds:
            unsent = Outcome(Verdict.RETRY, reason="held back").unsent()
            return [unsent if e.license_id in self.mine else Outcome.delivered() for e in events]
        self.delivered_at = now
        return [Outcome.delivered()] * len(events)

    async def close(self) -> None:
        pass


async def test_events_held_back_unsent_are_retried_without_backoff(
    running: Running, tmp_path: Path
) -> None:
    """A sink that holds events back without sending them (behind another event's retry in
    the same delivery: Stripe's lanes, a halved batch) answers them `sent=False`: no failed
    attempt of theirs, so they go again at once instead of after a backoff that doubles each
    time (0.1-0.2 s, then 0.2-0.4 s, ... up to METER_EXPORT_BACKOFF_MAX, 1 s here): 8 rounds
    held back took about 5 s before."""
    async with exporting(running, tmp_path, [], export=False) as (_service, ch):
        ids = await _licenses(ch, 1)
        us = ugrpc.UsageServiceStub(ch)
        await us.IncrementUsage(upb.IncrementUsageRequest(license_id=ids[0]), metadata=admin_md())
    sink = HoldBackSink(set(ids), rounds=8)
    async with exporting(running, tmp_path, [sink]):
        await until(lambda: sink.delivered_at > 0, 60, "the event delivered")
    assert sink.calls == 9
    assert sink.delivered_at - sink.first_call < 1.5
