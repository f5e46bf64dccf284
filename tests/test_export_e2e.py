"""Usage export end to end, the whole way a deployment runs it: replica A (in process) takes
10,000 increments, decrements and resets over 4 gRPC channels and appends them to the outbox;
replica B, `python -m meter_grpc` configured only through METER_EXPORT_* variables, exports
them to all four billing systems at once (each an emulator of its documented contract,
tests/billing_emulators.py) and to NDJSON, while every emulator fails about 30% of its calls,
answers some with a 429 and its reset header, takes a few without answering, and is down for a
stretch; B is SIGKILLed twice mid-export and started again. In the end each system holds each
event exactly once by its dedup key, the deltas it holds per license sum to the counter, and
no consumer group has anything pending. On the embedded server and the Cluster."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import policy_pb2
from meter_grpc.config import Settings
from meter_grpc.server import build_server
from meter_grpc.storage import keys
from tests.billing_emulators import (
    Emulator,
    LagoEmulator,
    M3terEmulator,
    OpenMeterEmulator,
    StripeEmulator,
)
from tests.conftest import Running
from tests.support import ADMIN_TOKEN, admin_md, shared_key_secret_file
from tests.test_export import (
    _counters,
    _outbox_total,
    _traffic,
    ndjson_lines,
    until_async,
)
from tests.test_process import ServiceProcess

LICENSES = 64  # Stripe takes one call at a time per customer: one customer per license
CHANGES = 10_000
SINKS = ("lago", "m3ter", "openmeter", "stripe", "ndjson")
# Per emulator: 30% of calls fail (503), 5% are throttled (429 with the system's reset
# header announcing THROTTLE_S), 2% are taken and never answered.
THROTTLE_S = 0.1
FAULTS = {"fail_rate": 0.3, "lost_rate": 0.02, "throttle_s": THROTTLE_S}
# Lago, m3ter and OpenMeter take batches (a few dozen calls in all): 10% of them throttled;
# Stripe takes a call per event, and its 429 holds every customer back: 1%.
THROTTLE = {"lago": 0.1, "m3ter": 0.1, "openmeter": 0.1, "stripe": 0.01}
# With 30% of calls failing, one event in a thousand fails 6 times in a row; a backoff of at
# most 2 s keeps that from holding its license's later events back for a minute.
BACKOFF_MAX_S = "2"
DOWN_S = 2.0  # how long each emulator is down (one after another)


async def _licenses(ch: grpc.aio.Channel) -> list[str]:
    """LICENSES licenses, each with its id in every billing system (metadata)."""
    ls = lgrpc.LicenseServiceStub(ch)
    p = (
        await ls.CreatePolicy(
            lpb.CreatePolicyRequest(policy=policy_pb2.Policy(name="e2e export")),
            metadata=admin_md(),
        )
    ).policy
    out = []
    for i in range(LICENSES):
        meta = {
            "external_subscription_id": f"sub-{i}",
            "m3ter_account": f"acct-{i}",
            "openmeter_subject": f"subj-{i}",
            "stripe_customer_id": f"cus_{i}",
        }
        req = lpb.CreateLicenseRequest(license={"policy_id": p.id, "metadata": meta})
        out.append((await ls.CreateLicense(req, metadata=admin_md())).license.id)
    return out


def _mine(pairs: Sequence[tuple[str, int]], mine: set[str]) -> list[tuple[str, int]]:
    return [(i, d) for i, d in pairs if i.rpartition(":")[0] in mine]


async def _group_idle(redis: aioredis.Redis, streams: set[str]) -> bool:
    """No entry pending or unread in any sink's group on these streams."""
    for stream in streams:
        groups = {g["name"]: g for g in await redis.xinfo_groups(stream)}  # type: ignore[misc]
        for name in SINKS:
            g = groups.get(name)
            if g is None or g["pending"] or g["lag"]:
                return False
    return True


@pytest.mark.timeout(600)
async def test_four_billing_systems_and_ndjson_hold_each_event_once_through_two_kills(
    running: Running, redis: aioredis.Redis, tmp_path: Path
) -> None:
    began = time.monotonic()
    lago = await LagoEmulator(seed=1, throttle_rate=THROTTLE["lago"], **FAULTS).start()
    m3ter = await M3terEmulator(seed=2, throttle_rate=THROTTLE["m3ter"], **FAULTS).start()
    openmeter = await OpenMeterEmulator(
        seed=3, throttle_rate=THROTTLE["openmeter"], **FAULTS
    ).start()
    stripe = await StripeEmulator(seed=4, throttle_rate=THROTTLE["stripe"], **FAULTS).start()
    emulators: dict[str, Emulator] = {
        "lago": lago,
        "m3ter": m3ter,
        "openmeter": openmeter,
        "stripe": stripe,
    }
    ndjson = tmp_path / "b.ndjson"
    env = {
        "METER_REDIS_URL": running.redis_url,
        "METER_KEY_SECRET_FILE": str(shared_key_secret_file()),
        "METER_EXPORT_LEASE": "1",
        "METER_EXPORT_HTTP_TIMEOUT": "5",
        "METER_EXPORT_BACKOFF_MAX": BACKOFF_MAX_S,
        "METER_EXPORT_NDJSON": str(ndjson),
        "METER_EXPORT_LAGO_URL": lago.url,
        "METER_EXPORT_LAGO_API_KEY": lago.api_key,
        "METER_EXPORT_M3TER_ORG_ID": m3ter.org_id,
        "METER_EXPORT_M3TER_ACCESS_KEY_ID": m3ter.access_key_id,
        "METER_EXPORT_M3TER_API_SECRET": m3ter.api_secret,
        "METER_EXPORT_M3TER_URL": m3ter.url,
        "METER_EXPORT_M3TER_TOKEN_URL": m3ter.token_url,
        "METER_EXPORT_OPENMETER_URL": openmeter.url,
        "METER_EXPORT_OPENMETER_TOKEN": openmeter.token,
        "METER_EXPORT_STRIPE_API_KEY": stripe.api_key,
        "METER_EXPORT_STRIPE_URL": stripe.url,
    }
    b = ServiceProcess(tmp_path / "b")
    settings = Settings(
        listen="127.0.0.1:0",
        redis_url=running.redis_url,
        data_dir=tmp_path / "a",
        admin_tokens=[ADMIN_TOKEN],
        key_secret_file=shared_key_secret_file(),
        export_ndjson=str(tmp_path / "a.ndjson"),  # export on: A appends to the outbox
    )
    a, port = await build_server(settings)
    assert a.exporter is not None
    await a.exporter.close()
    a.exporter = None  # A only appends to the outbox; B exports
    await a.start()
    kills = 0
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            ids = await _licenses(ch)
            mine = set(ids)
            streams = {keys.outbox(lid) for lid in ids}

            def held(sink: str) -> set[str]:
                if sink == "ndjson":
                    return {e["id"] for e in ndjson_lines(ndjson) if e["subject"] in mine}
                return {i for i, _ in _mine(emulators[sink].held_events(), mine)}

            traffic = asyncio.create_task(
                _traffic([f"127.0.0.1:{port}"] * 4, ids, CHANGES, seed=41)
            )

            async def outbox_streams_made() -> bool:  # B's first look finds them all
                if await _outbox_total(redis, ids) >= 1000:
                    return True
                await asyncio.sleep(0.1)
                return False

            await until_async(outbox_streams_made, 60)
            await b.start(**env)

            async def outages() -> None:  # each system down for a stretch, one after another
                for emu in emulators.values():
                    await asyncio.sleep(1.0)
                    await emu.down()
                    await asyncio.sleep(DOWN_S)
                    await emu.up()

            outage = asyncio.create_task(outages())
            for _ in range(2):
                start = {s: len(held(s)) for s in SINKS}

                async def mid_export(start: dict[str, int] = start) -> bool:
                    # It delivered some since it started, and some counted are not yet held.
                    now = {s: len(held(s)) for s in SINKS}
                    moved = sum(now[s] - start[s] for s in SINKS)
                    total = await _outbox_total(redis, ids)
                    if moved > 500 and min(now.values()) < total:
                        return True
                    await asyncio.sleep(0.2)
                    return False

                await until_async(mid_export, 120)
                assert b.proc is not None
                b.proc.kill()  # SIGKILL mid-export
                await b.wait_exit()
                kills += 1
                await b.start(**env)
            await traffic
            await outage
            total = await _outbox_total(redis, ids)
            assert total >= CHANGES * 0.8  # decrements at 0 and resets of 0 count nothing
            for sink in SINKS:  # checked twice a second: the test's loop serves the emulators
                deadline = time.monotonic() + 240
                while len(held(sink)) < total:
                    assert time.monotonic() < deadline, ({s: len(held(s)) for s in SINKS}, total)
                    await asyncio.sleep(0.5)
            await until_async(lambda: _group_idle(redis, streams), 60)
            counters = await _counters(ch, ids)
    finally:
        await b.close()
        await a.stop(0)
        for emu in emulators.values():
            await emu.close()
    assert kills == 2
    elapsed = time.monotonic() - began
    # Exactly once by each system's dedup key, and no event missing or foreign.
    expected = {f"{lid}:{n}" for lid in ids for n in range(1, await _xseq(redis, lid) + 1)}
    assert len(expected) == total
    for name, emu in emulators.items():
        pairs = _mine(emu.held_events(), mine)
        assert len(pairs) == total, (name, len(pairs), total)
        assert {i for i, _ in pairs} == expected, name
        assert emu.double_billed() == [], name
        _sums_match(name, pairs, counters)
        # The faults happened: failures, throttles with a reset header, an outage.
        assert emu.statuses[503] > 0 and emu.statuses[429] > 0, (name, emu.statuses)
    lines = [e for e in ndjson_lines(ndjson, complete=True) if e["subject"] in mine]
    by_id = {e["id"]: e for e in lines}
    assert set(by_id) == expected
    for e in lines:  # a line written twice (after a kill) is the same event
        assert e == by_id[e["id"]]
    _sums_match("ndjson", [(i, e["data"]["delta"]) for i, e in by_id.items()], counters)
    for sink in SINKS:  # nothing refused for good
        dead = await redis.xrange(keys.export_dead(sink))  # type: ignore[misc]
        assert not [f for _, f in dead if f["id"].rpartition(":")[0] in mine], sink
    assert await _group_idle(redis, streams)
    print(f"\nexport e2e: {total} events to 5 sinks in {elapsed:.1f} s")


async def _xseq(redis: aioredis.Redis, lid: str) -> int:
    return int(await redis.hget(keys.license(lid), "xseq") or 0)  # type: ignore[misc]


def _sums_match(name: str, pairs: Sequence[tuple[str, int]], counters: dict[str, int]) -> None:
    sums: dict[str, int] = {}
    for event_id, delta in pairs:
        lid = event_id.rpartition(":")[0]
        sums[lid] = sums.get(lid, 0) + delta
    assert sums == {lid: n for lid, n in counters.items() if n or lid in sums}, name
