"""The offline usage journal: a local SQLite file of usage records waiting for SyncUsage.

WAL mode with synchronous=FULL: a record is on disk when `record` returns, and a crash at
any point leaves either the old or the new state of each transaction. Records keep their
order (`seq`) and their id for life, so a batch resent after a crash is recognised by the
service (DUPLICATE) and nothing is counted twice. The journal also keeps, per license, the
last license file and the last usage count the service reported, which bound offline usage.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from meter_grpc.domain import ids

PENDING, APPLIED, DUPLICATE, REJECTED = "pending", "applied", "duplicate", "rejected"
STATES = (PENDING, APPLIED, DUPLICATE, REJECTED)
MAX_AMOUNT = 2**50
# The service's charset for record ids (domain.rules.SAFE_TOKEN_CHARS): printable ASCII
# without space, '{', '}' or ':'; a record it would refuse never enters the journal.
_RECORD_ID = re.compile(r"[\x21-\x39\x3b-\x7a\x7c\x7e]{1,128}")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    license_id TEXT NOT NULL,
    amount INTEGER NOT NULL CHECK (amount BETWEEN 1 AND {MAX_AMOUNT}),
    occur_ms INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'applied', 'duplicate', 'rejected')),
    reason TEXT NOT NULL DEFAULT '',
    done_ms INTEGER,
    meter TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS records_by_state ON records (license_id, state, seq);
CREATE TABLE IF NOT EXISTS licenses (
    license_id TEXT PRIMARY KEY,
    certificate TEXT,
    uses INTEGER,
    uses_ms INTEGER
);
CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value BLOB NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class JournalRecord:
    seq: int
    id: str
    license_id: str
    amount: int
    occur_ms: int
    state: str = PENDING
    reason: str = ""
    # The meter the record is of ("" = the license's own counter).
    meter: str = ""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _check(record_id: str, amount: int) -> None:
    if not _RECORD_ID.fullmatch(record_id):
        raise ValueError(
            "a record id is 1 to 128 printable ASCII characters without space, '{', '}' or ':'"
        )
    if not 1 <= amount <= MAX_AMOUNT:
        raise ValueError(f"an amount is 1 to 2^50, not {amount}")


class UsageJournal:
    """One SQLite file; safe to share between threads (one lock) and processes (SQLite's)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        with self._lock:
            self._db.executescript(_SCHEMA)
            columns = [row[1] for row in self._db.execute("PRAGMA table_info(records)")]
            if "meter" not in columns:  # a journal written before meters
                self._db.execute("ALTER TABLE records ADD COLUMN meter TEXT NOT NULL DEFAULT ''")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> UsageJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- writing ----------------------------------------------------------------------------

    def record(
        self,
        license_id: str,
        amount: int,
        *,
        record_id: str | None = None,
        occur_ms: int | None = None,
        max_pending: int | None = None,
        meter: str = "",
        state: str = PENDING,
    ) -> JournalRecord | None:
        """Appends a pending record, durably. With `max_pending`, appends only if the pending
        amount of the license's counter (or `meter`'s) stays within it (checked in the same
        transaction); else None. `state` APPLIED: a record the service has just counted
        online, kept so that what the license file allows offline accounts for it."""
        record_id = record_id or ids.new_id()
        _check(record_id, amount)
        occur_ms = _now_ms() if occur_ms is None else occur_ms
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if max_pending is not None:
                    pending = self._pending_amount(license_id, meter)
                    if pending + amount > max_pending:
                        self._db.execute("ROLLBACK")
                        return None
                done = None if state == PENDING else _now_ms()
                cur = self._db.execute(
                    "INSERT INTO records (id, license_id, amount, occur_ms, meter, state, "
                    "done_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (record_id, license_id, amount, occur_ms, meter, state, done),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        assert cur.lastrowid is not None
        return JournalRecord(
            cur.lastrowid, record_id, license_id, amount, occur_ms, state, "", meter
        )

    def record_many(
        self, license_id: str, amounts: Iterable[int], *, occur_ms: int | None = None
    ) -> list[JournalRecord]:
        """Appends several pending records in one transaction (one disk sync)."""
        occur_ms = _now_ms() if occur_ms is None else occur_ms
        rows = [(ids.new_id(), license_id, a, occur_ms) for a in amounts]
        for row in rows:
            _check(row[0], row[2])
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                first = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM records").fetchone()
                self._db.executemany(
                    "INSERT INTO records (id, license_id, amount, occur_ms) VALUES (?, ?, ?, ?)",
                    rows,
                )
                added = self._select("WHERE seq > ? ORDER BY seq", (first[0],))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return added

    def settle(
        self,
        license_id: str,
        outcomes: Sequence[tuple[str, str, str]],
        *,
        uses: int | None = None,
        observed_ms: int | None = None,
    ) -> None:
        """Marks records (id, state, reason) after the service answered, and stores the usage
        count it reported, in one transaction."""
        now = _now_ms()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "UPDATE records SET state = ?, reason = ?, done_ms = ? "
                    "WHERE id = ? AND license_id = ? AND state = 'pending'",
                    [(state, reason, now, rid, license_id) for rid, state, reason in outcomes],
                )
                if uses is not None:
                    self._observe(license_id, uses, now if observed_ms is None else observed_ms)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def observe_uses(self, license_id: str, uses: int, observed_ms: int) -> None:
        """Remembers a usage count of the service (kept only if newer than the last one)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._observe(license_id, uses, observed_ms)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _observe(self, license_id: str, uses: int, observed_ms: int) -> None:
        self._db.execute(
            "INSERT INTO licenses (license_id, uses, uses_ms) VALUES (?, ?, ?) "
            "ON CONFLICT (license_id) DO UPDATE SET uses = excluded.uses, "
            "uses_ms = excluded.uses_ms "
            "WHERE licenses.uses_ms IS NULL OR licenses.uses_ms <= excluded.uses_ms",
            (license_id, uses, observed_ms),
        )

    def save_license_file(self, license_id: str, certificate: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO licenses (license_id, certificate) VALUES (?, ?) "
                "ON CONFLICT (license_id) DO UPDATE SET certificate = excluded.certificate",
                (license_id, certificate),
            )

    def set_setting(self, name: str, value: bytes) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO settings (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, value),
            )

    # --- reading ----------------------------------------------------------------------------

    def _select(self, where: str, params: tuple[object, ...]) -> list[JournalRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, id, license_id, amount, occur_ms, state, reason, meter FROM records "
                + where,
                params,
            ).fetchall()
        return [JournalRecord(*row) for row in rows]

    def pending(self, license_id: str, limit: int = 1000) -> list[JournalRecord]:
        """The oldest pending records of a license, in the order they were made."""
        return self._select(
            "WHERE license_id = ? AND state = 'pending' ORDER BY seq LIMIT ?", (license_id, limit)
        )

    def records(self, license_id: str) -> list[JournalRecord]:
        return self._select("WHERE license_id = ? ORDER BY seq", (license_id,))

    def _pending_amount(self, license_id: str, meter: str | None = None) -> int:
        if meter is None:
            row = self._db.execute(
                "SELECT COALESCE(SUM(amount), 0) FROM records "
                "WHERE license_id = ? AND state = 'pending'",
                (license_id,),
            ).fetchone()
        else:
            row = self._db.execute(
                "SELECT COALESCE(SUM(amount), 0) FROM records "
                "WHERE license_id = ? AND state = 'pending' AND meter = ?",
                (license_id, meter),
            ).fetchone()
        return int(row[0])

    def pending_amount(self, license_id: str, meter: str | None = None) -> int:
        """Pending units of the license: all (None), or of one counter ("" its own)."""
        with self._lock:
            return self._pending_amount(license_id, meter)

    def counted_since(self, license_id: str, meter: str, since_ms: int) -> int:
        """Units of one counter the service answered APPLIED or DUPLICATE at or after
        `since_ms` (journal time): usage a license file issued at `since_ms` does not show."""
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(SUM(amount), 0) FROM records WHERE license_id = ? "
                "AND meter = ? AND state IN ('applied', 'duplicate') AND done_ms >= ?",
                (license_id, meter, since_ms),
            ).fetchone()
        return int(row[0])

    def counts(self, license_id: str) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT state, COUNT(*) FROM records WHERE license_id = ? GROUP BY state",
                (license_id,),
            ).fetchall()
        out = dict.fromkeys(STATES, 0)
        out.update({state: n for state, n in rows})
        return out

    def license_file(self, license_id: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT certificate FROM licenses WHERE license_id = ?", (license_id,)
            ).fetchone()
        return None if row is None else row[0]

    def observed_uses(self, license_id: str) -> tuple[int, int] | None:
        """The last usage count the service reported and when (ms), if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT uses, uses_ms FROM licenses WHERE license_id = ? AND uses IS NOT NULL",
                (license_id,),
            ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    def setting(self, name: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
        return None if row is None else bytes(row[0])
