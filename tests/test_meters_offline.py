"""OfflineMeter with meters: a meter's offline allowance comes from the license file's
`meters` and what the journal saw counted since; its records sync with their meter."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from meter.v1 import policy_pb2
from meter.v1 import usage_service_pb2 as upb
from meter_grpc.client import MeterNotFound, UsageJournal, UsageLimitExceeded
from tests.conftest import Running
from tests.support import admin_md
from tests.test_offline_client import meters


async def test_meter_usage_offline_is_bounded_by_the_file_and_synced(
    running: Running, make_license: Any, usage: Any, tmp_path: Path
) -> None:
    lic = await make_license(
        policy_fields={"max_uses": 100, "meters": [policy_pb2.Meter(code="GPU", max_uses=10)]}
    )
    online, offline = meters(running, lic, tmp_path / "journal.sqlite3")

    def scenario() -> None:
        online.refresh_license_file()
        r = online.use(3, meter="GPU")
        assert r.online and r.uses is None
        assert offline.allowance(meter="GPU") == 7  # the file said 0, the journal saw 3
        assert offline.allowance() == 100  # the license's own counter is another one
        r = offline.use(5, meter="GPU")
        assert (r.online, r.offline_remaining) == (False, 2)
        with pytest.raises(UsageLimitExceeded) as refused:
            offline.use(3, meter="GPU")
        assert refused.value.metadata["meter"] == "GPU"
        assert refused.value.metadata["remaining"] == "2"
        with pytest.raises(MeterNotFound):
            offline.use(1, meter="NOPE")
        assert offline.use(4).offline_remaining == 96
        report = online.sync()
        assert (report.applied, report.rejected, report.uses) == (2, 0, 4)
        assert offline.allowance(meter="GPU") == 2  # 3 online + 5 synced since the file
        online.refresh_license_file()
        assert offline.allowance(meter="GPU") == 2  # the new file agrees

    await asyncio.to_thread(scenario)
    got = await usage.GetUsage(
        upb.GetUsageRequest(license_id=lic.id, meter="GPU"), metadata=admin_md()
    )
    assert got.uses == 8


def test_a_journal_from_before_meters_gets_the_column(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE records (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
            license_id TEXT NOT NULL, amount INTEGER NOT NULL, occur_ms INTEGER NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending', reason TEXT NOT NULL DEFAULT '',
            done_ms INTEGER
        );
        INSERT INTO records (id, license_id, amount, occur_ms) VALUES ('r1', 'lic', 2, 1);
        """
    )
    db.commit()
    db.close()
    with UsageJournal(path) as journal:
        (old,) = journal.pending("lic")
        assert (old.id, old.amount, old.meter) == ("r1", 2, "")
        journal.record("lic", 3, meter="GPU")
        assert journal.pending_amount("lic", "") == 2
        assert journal.pending_amount("lic", "GPU") == 3
        assert journal.pending_amount("lic") == 5
