"""The NDJSON sink (METER_EXPORT_NDJSON): one CloudEvents 1.0 JSON object per line, appended to
a file (fsynced before the events count as delivered) or written to stdout (`-`, flushed).

A line: `specversion` "1.0", `id` the event id (the same on every retry: a line written again
after a crash has the same id), `source` METER_EXPORT_NDJSON_SOURCE (default "meter-grpc"),
`type` "meter.usage.<kind>", `subject` the license id, `time` RFC 3339 (UTC, milliseconds),
`datacontenttype` "application/json", and `data` with `delta`, `uses`, `meter`, `license_id`,
`policy_id`, `request_id`, `kind`. Delivery is at least once: a reader deduplicates by `id`.
A last line left without its newline by a kill mid-write is cut off when the file is opened
again (its events were not acknowledged, so they are written again).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import BinaryIO

from meter_grpc.config import Settings
from meter_grpc.export.model import ExportEvent, Outcome, Verdict

MAX_BATCH = 1000


def cloudevent(e: ExportEvent, source: str) -> dict[str, object]:
    when = datetime.fromtimestamp(e.time_ms / 1000, tz=UTC)
    return {
        "specversion": "1.0",
        "id": e.id,
        "source": source,
        "type": f"meter.usage.{e.kind.value}",
        "subject": e.license_id,
        "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": {
            "delta": e.delta,
            "uses": e.uses,
            "meter": e.meter,
            "license_id": e.license_id,
            "policy_id": e.policy_id,
            "request_id": e.request_id,
            "kind": e.kind.value,
        },
    }


def _drop_torn_line(path: str) -> None:
    """A process killed in the middle of a write leaves a last line without its newline: it
    was never acknowledged (its events are written again), so it is cut off, and the next
    line does not run into it."""
    try:
        f = open(path, "rb+")  # noqa: SIM115
    except FileNotFoundError:
        return
    with f:
        size = f.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            chunk = f.read(end - start)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                end = start + cut + 1
                break
            end = start
        if end != size:
            f.truncate(end)
            os.fsync(f.fileno())


class NdjsonSink:
    name = "ndjson"
    max_batch = MAX_BATCH

    def __init__(self, path: str, source: str = "meter-grpc") -> None:
        self.path = path
        self.source = source
        self._file: BinaryIO | None = None

    def _write(self, data: bytes) -> None:
        if self.path == "-":
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
            return
        if self._file is None:
            _drop_torn_line(self.path)
            self._file = open(self.path, "ab")  # noqa: SIM115 - kept open across batches
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())

    async def deliver(self, events: Sequence[ExportEvent]) -> list[Outcome]:
        lines = "".join(
            json.dumps(cloudevent(e, self.source), separators=(",", ":")) + "\n" for e in events
        )
        try:
            await asyncio.to_thread(self._write, lines.encode())
        except OSError as exc:
            if self._file is not None:
                self._file.close()
                self._file = None
            return [Outcome(Verdict.RETRY, reason=f"{self.path}: {exc}")] * len(events)
        return [Outcome.delivered()] * len(events)

    async def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def build_ndjson(settings: Settings) -> NdjsonSink | None:
    """The NDJSON sink when METER_EXPORT_NDJSON is set, else None."""
    if not settings.export_ndjson:
        return None
    return NdjsonSink(settings.export_ndjson, settings.export_ndjson_source)
