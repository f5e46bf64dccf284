"""OfflineMeter: usage journaled while the service is unreachable, bounded by the license
file, synced exactly once — also across a client process killed in the middle of a sync."""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from meter_grpc.client import (
    AsyncMeterClient,
    AsyncOfflineMeter,
    LicenseSuspended,
    MeterClient,
    NoValidLicenseFile,
    OfflineMeter,
    UsageJournal,
    UsageLimitExceeded,
)
from meter_grpc.storage import keys
from tests.client_process import EXIT_NOT_KILLED
from tests.conftest import Running
from tests.test_client import closed_port_target

ROOT = Path(__file__).resolve().parent.parent


async def stored_uses(redis: aioredis.Redis, license_id: str) -> int:
    return int(await redis.hget(keys.license(license_id), "uses"))


def meters(
    running: Running, lic: Any, journal: Path, **kw: Any
) -> tuple[OfflineMeter, OfflineMeter]:
    """The same journal seen by a meter that reaches the service and one that cannot."""
    online = OfflineMeter(MeterClient(running.target, license_key=lic.key), lic.id, journal, **kw)
    offline = OfflineMeter(
        MeterClient(closed_port_target(), license_key=lic.key, timeout=5), lic.id, journal, **kw
    )
    return online, offline


def test_journal_is_durable_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    with UsageJournal(path) as journal:
        rec = journal.record("lic", 3)
        assert rec is not None and len(rec.id) == 36
        mode = journal._db.execute("PRAGMA journal_mode").fetchone()[0]
        sync = journal._db.execute("PRAGMA synchronous").fetchone()[0]
        assert (mode, sync) == ("wal", 2)  # 2 = FULL
        assert journal.record("lic", 5, max_pending=7) is None  # 3 + 5 > 7
        with pytest.raises(ValueError, match="amount"):
            journal.record("lic", 0)
        with pytest.raises(ValueError, match="record id"):
            journal.record("lic", 1, record_id="has space")
        for refused in ("a:b", "{x", "x}"):  # what the service refuses never enters it
            with pytest.raises(ValueError, match="record id"):
                journal.record("lic", 1, record_id=refused)
    # A second connection (another process would do the same) sees the committed record.
    db = sqlite3.connect(path)
    assert db.execute("SELECT id, amount, state FROM records").fetchall() == [
        (rec.id, 3, "pending")
    ]
    db.close()


async def test_offline_usage_is_bounded_by_the_license_file_then_synced(
    running: Running, make_license: Any, redis: aioredis.Redis, tmp_path: Path
) -> None:
    lic = await make_license(policy_fields={"max_uses": 10})
    online, offline = meters(running, lic, tmp_path / "journal.sqlite3")

    def scenario() -> None:
        with pytest.raises(NoValidLicenseFile) as info:
            offline.use(1)  # offline, and no license file yet
        assert info.value.reason == "LICENSE_FILE_MISSING"
        online.refresh_license_file()
        r = online.use(2)
        assert (r.online, r.uses) == (True, 2)
        assert offline.allowance() == 8
        r = offline.use(5)
        assert (r.online, r.offline_remaining) == (False, 3)
        with pytest.raises(UsageLimitExceeded) as refused:
            offline.use(4)
        assert refused.value.metadata["offline"] == "true"
        assert refused.value.metadata["remaining"] == "3"
        assert offline.use(3).offline_remaining == 0
        with pytest.raises(UsageLimitExceeded):
            offline.use(1)
        assert offline.journal.counts(lic.id)["pending"] == 2

    await asyncio.to_thread(scenario)
    assert await stored_uses(redis, lic.id) == 2  # nothing reached the service while offline

    report = await asyncio.to_thread(online.sync)
    assert (report.applied, report.duplicate, report.rejected, report.uses) == (2, 0, 0, 10)
    assert await stored_uses(redis, lic.id) == 10
    assert online.journal.counts(lic.id) == {
        "pending": 0,
        "applied": 2,
        "duplicate": 0,
        "rejected": 0,
    }
    # The file allows nothing more, and the service agrees.
    assert offline.allowance() == 0
    with pytest.raises(UsageLimitExceeded):
        await asyncio.to_thread(online.use, 1)
    assert (await asyncio.to_thread(online.sync)).batches == 0


async def test_records_rejected_at_sync_are_kept_as_rejected(
    running: Running, make_license: Any, redis: aioredis.Redis, tmp_path: Path
) -> None:
    lic = await make_license(policy_fields={"max_uses": 5})
    online, offline = meters(running, lic, tmp_path / "journal.sqlite3")

    def scenario() -> Any:
        online.refresh_license_file()
        for _ in range(4):
            offline.use(1)
        # Meanwhile another machine of the same license used 3 of the 5.
        with MeterClient(running.target, license_key=lic.key) as other:
            other.increment_usage(lic.id, 3)
        return online.sync()

    report = await asyncio.to_thread(scenario)
    assert (report.applied, report.rejected) == (2, 2)
    assert report.rejected_reasons == {"USAGE_LIMIT_EXCEEDED": 2}
    assert [(r.state, r.reason) for r in online.journal.records(lic.id)] == [
        ("applied", ""),
        ("applied", ""),
        ("rejected", "USAGE_LIMIT_EXCEEDED"),
        ("rejected", "USAGE_LIMIT_EXCEEDED"),
    ]
    assert await stored_uses(redis, lic.id) == 5


async def test_expired_or_suspended_license_file_refuses_offline_usage(
    running: Running, make_license: Any, tmp_path: Path
) -> None:
    lic = await make_license(policy_fields={"max_uses": 5})
    now = [0]
    online, _ = meters(running, lic, tmp_path / "a.sqlite3")
    offline = OfflineMeter(
        MeterClient(closed_port_target(), license_key=lic.key, timeout=5),
        lic.id,
        tmp_path / "a.sqlite3",
        clock=lambda: now[0],
    )

    def scenario() -> None:
        payload = online.refresh_license_file(ttl=dt.timedelta(hours=1))
        issued = dt.datetime.fromisoformat(payload["meta"]["issued"].replace("Z", "+00:00"))
        now[0] = int(issued.timestamp() * 1000) + 3_600_000
        with pytest.raises(NoValidLicenseFile) as info:
            offline.use(1)
        assert info.value.reason == "LICENSE_FILE_EXPIRED"

    await asyncio.to_thread(scenario)

    suspended = await make_license(policy_fields={"max_uses": 5})
    online, offline = meters(running, suspended, tmp_path / "b.sqlite3")

    def suspend_then_use() -> None:
        with MeterClient(running.target, admin_token="test-admin-token") as admin:
            admin.suspend_license(suspended.id)
        online.refresh_license_file(encrypt=True)
        with pytest.raises(LicenseSuspended):
            offline.use(1)

    await asyncio.to_thread(suspend_then_use)


async def test_async_meter_goes_offline_and_back(
    running: Running, make_license: Any, redis: aioredis.Redis, tmp_path: Path
) -> None:
    lic = await make_license(policy_fields={"max_uses": 4, "overage_strategy": 4})  # ceiling 8
    journal = UsageJournal(tmp_path / "journal.sqlite3")
    async with (
        AsyncMeterClient(running.target, license_key=lic.key) as up,
        AsyncMeterClient(closed_port_target(), license_key=lic.key, timeout=5) as down,
    ):
        online = AsyncOfflineMeter(up, lic.id, journal)
        offline = AsyncOfflineMeter(down, lic.id, journal)
        await online.refresh_license_file(encrypt=True)
        assert offline.allowance() == 8
        assert not (await offline.use(6)).online
        with pytest.raises(UsageLimitExceeded):
            await offline.use(3)
        # Back online: use() sends the journal first, then itself.
        r = await online.use(2)
        assert (r.online, r.uses) == (True, 8)
    assert await stored_uses(redis, lic.id) == 8
    assert journal.counts(lic.id)["applied"] == 1


@pytest.mark.slow
async def test_client_killed_mid_sync_counts_nothing_twice(
    running: Running, make_license: Any, redis: aioredis.Redis, tmp_path: Path
) -> None:
    lic = await make_license(policy_fields={"max_uses": 10_000})
    path = tmp_path / "journal.sqlite3"
    amounts = list(range(1, 26))  # 25 records, 325 units
    with UsageJournal(path) as journal:
        journal.record_many(lic.id, amounts)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.client_process",
        running.target,
        lic.key,
        lic.id,
        str(path),
        "10",  # batch size
        "2",  # killed right after the 2nd answer, before the journal recorded it
        cwd=ROOT,
    )
    assert await proc.wait() == -signal.SIGKILL
    assert proc.returncode != EXIT_NOT_KILLED
    # The service counted batches 1 and 2; the journal knows of batch 1 only.
    assert await stored_uses(redis, lic.id) == sum(amounts[:20])
    with UsageJournal(path) as journal:
        assert journal.counts(lic.id) == {
            "pending": 15,
            "applied": 10,
            "duplicate": 0,
            "rejected": 0,
        }
        meter = OfflineMeter(MeterClient(running.target, license_key=lic.key), lic.id, journal)
        report = await asyncio.to_thread(meter.sync)
        assert (report.applied, report.duplicate, report.rejected) == (5, 10, 0)
        assert report.uses == sum(amounts)
        assert journal.counts(lic.id)["pending"] == 0
    assert await stored_uses(redis, lic.id) == sum(amounts)  # 325: nothing counted twice


@pytest.mark.slow
async def test_ten_thousand_records_sync_exactly(
    running: Running, make_license: Any, redis: aioredis.Redis, tmp_path: Path
) -> None:
    limit = 14_990
    lic = await make_license(policy_fields={"max_uses": limit})
    amounts = [1 + i % 2 for i in range(10_000)]  # 15,000 units asked for
    expected, uses = [], 0  # in order, each record against the limit
    for a in amounts:
        fits = uses + a <= limit
        uses += a if fits else 0
        expected.append("applied" if fits else "rejected")
    with UsageJournal(tmp_path / "journal.sqlite3") as journal:
        journal.record_many(lic.id, amounts)
        async with AsyncMeterClient(running.target, license_key=lic.key) as client:
            meter = AsyncOfflineMeter(client, lic.id, journal, batch_size=1000)
            report = await meter.sync()
            again = await meter.sync()
        states = [r.state for r in journal.records(lic.id)]
    assert (report.batches, again.batches) == (10, 0)
    assert states == expected
    assert (report.applied, report.rejected) == (
        expected.count("applied"),
        expected.count("rejected"),
    )
    assert report.rejected_reasons == {"USAGE_LIMIT_EXCEEDED": report.rejected}
    assert report.uses == uses == limit
    assert await stored_uses(redis, lic.id) == limit
