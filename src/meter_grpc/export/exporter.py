"""The exporter: reads the outbox and hands its events to the sinks, beside the request path.

The outbox is one Redis stream per cluster slot (storage/keys.py `outbox_of_slot`), appended by
the scripts that move a counter (storage/lua/common.lua `outbox`). Each sink has one consumer
group (`<sink name>`) on every outbox stream: an entry stays until every group acknowledged it.

Who reads which stream: the 16,384 slots fall in BUCKETS buckets (slot mod BUCKETS). A
replica exports a bucket while it holds the bucket's lease (keys.export_lease, renewed every
third of METER_EXPORT_LEASE_S); a bucket whose replica died is taken over by another once the
lease expired. The consumer name in every group is the bucket's (`b<n>`), so a new holder
first reads the entries its predecessor had read but not acknowledged (XREADGROUP from 0:
the pending entries of that consumer; the same as XAUTOCLAIM of a dead consumer, without
waiting for an idle time) and then new ones (`>`). One holder per bucket keeps each license's
events in order (a license's events are all in its slot's stream).

Per sink: at most `max_batch` events per delivery, oldest first, a license whose earlier event
waits for a retry holding its later events back; RETRY waits an exponential backoff with jitter
(at least the sink's retry_after_s) that grows with the event's failed attempts; an event the
sink held back unsent (Outcome.sent False) waits only the sink's retry_after_s; DEAD goes to
the sink's dead-letter stream (keys.export_dead, capped at METER_EXPORT_DEAD_LETTERS_MAX), then
is acknowledged. Entries every group acknowledged are trimmed (XTRIM MINID). A stream read to
its end is read again only once its newest entry changed (outbox_heads.lua: one call per node
for many streams), looked at less and less often while nothing changes (up to
IDLE_POLL_MAX_S). Streams are found in a registry (keys.export_streams) that
every replica adds a stream to before its first write there, read every SWEEP_S; a SCAN at
start and every RESCAN_S finds streams written before the registry existed.
Nothing here runs on the request path: it shares only the Redis connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import random
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from meter_grpc.config import Settings
from meter_grpc.domain import failpoints
from meter_grpc.domain.watching import position
from meter_grpc.export.model import ExportEvent, Kind, Outcome, Sink, Verdict
from meter_grpc.export.sinks import build_sinks
from meter_grpc.export.sinks.ndjson import build_ndjson
from meter_grpc.storage import keys
from meter_grpc.storage.commands import pairs
from meter_grpc.storage.store import RedisStore
from meter_grpc.storage.transport import Node, StoreError
from meter_grpc.tasks import cancel_and_wait

log = logging.getLogger(__name__)

BUCKETS = 64
SWEEP_S = 10.0  # the registry of outbox streams (keys.export_streams) is read again after this
RESCAN_S = 600.0  # the keyspace is SCANned again for unregistered outbox streams after this
POLL_S = 0.05  # a stream that had entries is read again after this
IDLE_POLL_MAX_S = 2.0  # a stream with nothing new is looked at again at most this long after
HEADS_PER_CALL = 1000  # streams looked at in one outbox_heads.lua call
READ_COUNT = 500  # entries read from one stream at once, at most
READ_MIN = 50  # ... and at least (when the queue has room)
QUEUE_MAX = 5000  # events held in memory per sink (read, not yet acknowledged)
BACKOFF_BASE_S = 0.2
BACKOFF_MAX_S = 60.0
METADATA_TTL_S = 10.0
METADATA_MAX = 10_000
TRIM_EVERY_S = 1.0
EXPORT_STATUS_EVERY_S = 30.0  # the Prometheus gauges' refresh (only with metrics on)
# A replica's configured sinks (keys.export_sinks) count for this long after it last renewed
# them: a sink keeps holding the trimming back while a replica configuring it is down or
# restarting for less than this.
SINKS_TTL_S = 600.0


class ExportMetrics(Protocol):
    """What the exporter reports to (api/metrics.py Metrics)."""

    def export_outcomes(self, sink: str, delivered: int, retried: int, dead: int) -> None: ...

    def export_status(self, sink: str, lag_events: int, lag_s: float, dead: int) -> None: ...


def sinks_of(settings: Settings) -> list[Sink]:
    """Every sink the settings turn on: the HTTP sinks of export/sinks (`build_sinks`) and the
    NDJSON sink (`build_ndjson`)."""
    found: list[Sink] = build_sinks(settings)
    ndjson = build_ndjson(settings)
    if ndjson is not None:
        found.append(ndjson)
    return found


def event_of(
    fields: dict[str, str], metadata: dict[str, str] | None = None, policy_id: str = ""
) -> ExportEvent:
    """An outbox entry's fields (common.lua `outbox`: id, k, d, u, rid, t; a dead letter
    also has pol and m) as an ExportEvent. The license id is the id up to its last ':'."""
    return ExportEvent(
        id=fields["id"],
        license_id=fields["id"].rpartition(":")[0],
        policy_id=fields.get("pol", policy_id),
        meter=fields.get("m", ""),
        kind=Kind(fields["k"]),
        delta=int(fields["d"]),
        uses=int(fields["u"]),
        request_id=fields.get("rid", ""),
        time_ms=int(fields["t"]),
        license_metadata=metadata or {},
    )


def fields_of(e: ExportEvent) -> dict[str, str]:
    return {
        "id": e.id,
        "pol": e.policy_id,
        "m": e.meter,
        "k": e.kind.value,
        "d": str(e.delta),
        "u": str(e.uses),
        "rid": e.request_id,
        "t": str(e.time_ms),
    }


def _id_ms(entry_id: str) -> int:
    return int(entry_id.partition("-")[0])


def _no_such_stream(exc: Exception) -> bool:
    """The error of XGROUP or XINFO on a stream that does not exist (any more)."""
    return any(t in str(exc).lower() for t in ("no such key", "key to exist"))


def _next_id(entry_id: str) -> str:
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq) + 1}"


@dataclass(slots=True)
class _Item:
    stream: str
    entry_id: str
    fields: dict[str, str]
    bucket: int
    attempts: int = 0
    not_before: float = 0.0
    first_attempt_ms: int = 0

    @property
    def license_id(self) -> str:
        return self.fields.get("id", "").rpartition(":")[0]


@dataclass(slots=True)
class _StreamState:
    bucket: int
    cursor: str = "0"  # "0..": the bucket consumer's pending entries first; then ">"
    next_poll: float = 0.0
    idle_s: float = POLL_S
    drained: bool = False  # the last read (">") got every new entry there was
    head: str | None = None  # the stream's newest entry id before that read (_heads)


@dataclass
class SinkStatus:
    name: str
    lag_events: int = 0
    lag_seconds: float = 0.0
    last_error: str = ""
    last_error_ms: int = 0
    dead_letters: int = 0


@dataclass(slots=True)
class _SinkRun:
    sink: Sink
    queue: list[_Item] = field(default_factory=list)
    streams: dict[str, _StreamState] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    delivered: int = 0
    retried: int = 0
    dead: int = 0


class Exporter:
    """Runs one task per sink plus the leases' task; `start()` then `close()`."""

    def __init__(
        self,
        store: RedisStore,
        sinks: Sequence[Sink],
        *,
        lease_s: float = 10.0,
        dead_letters_max: int = 100_000,
        owner: str = "",
        backoff_max_s: float = BACKOFF_MAX_S,
        sweep_s: float = SWEEP_S,
        metrics: ExportMetrics | None = None,
    ) -> None:
        self.store = store
        self.runs = {s.name: _SinkRun(s) for s in sinks}
        self.lease_s = lease_s
        self.dead_letters_max = dead_letters_max
        self.owner = owner or secrets.token_hex(8)
        self.backoff_max_s = backoff_max_s
        self.sweep_s = sweep_s
        self.metrics = metrics
        self.buckets: set[int] = set()  # held now
        self._known: dict[int, set[str]] = {}  # bucket -> outbox streams that exist
        self._sweep_at = 0.0  # the registry is read again from then on
        self._sweeping = asyncio.Lock()
        self._rescan_at = 0.0  # the keyspace is SCANned again from then on
        # license id -> (until, metadata, policy id), looked up for the events of a batch
        self._meta: dict[str, tuple[float, dict[str, str], str]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._trimmed: dict[str, float] = {}
        self._wake = asyncio.Event()
        # sinks configured on some live replica (this one's always): the groups trimmed for
        self._live_sinks: set[str] = set(self.runs)
        self._reported = False  # the groups of sinks configured nowhere: logged once a start

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._lease_loop(), name="export-leases"))
        if self.metrics is not None:
            self._tasks.append(asyncio.create_task(self._status_loop(), name="export-status"))
        for run in self.runs.values():
            self._tasks.append(
                asyncio.create_task(self._sink_loop(run), name=f"export-{run.sink.name}")
            )

    async def close(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        for b in list(self.buckets):
            with contextlib.suppress(Exception):
                await self.store.scripts.cas(keys=[keys.export_lease(b)], args=["del", self.owner])
        self.buckets.clear()
        if self._reported:  # it advertised its sinks: a replica stopped is no longer live
            with contextlib.suppress(Exception):
                await self.store.client.hdel(keys.export_sinks(), self.owner)
        for run in self.runs.values():
            with contextlib.suppress(Exception):
                await run.sink.close()

    async def _status_loop(self) -> None:
        assert self.metrics is not None
        while True:
            try:
                for st in await self.status():
                    self.metrics.export_status(
                        st.name, st.lag_events, st.lag_seconds, st.dead_letters
                    )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("export status: %s", exc)
            await asyncio.sleep(EXPORT_STATUS_EVERY_S)

    # --- leases ---------------------------------------------------------------------------

    async def _lease_loop(self) -> None:
        while True:
            try:
                await self._advertise()
                await self._leases()
                if not self._reported:
                    self._reported = True
                    await self._report_removed()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("export leases: %s", exc)
                self._drop(set(self.buckets))
            await asyncio.sleep(self.lease_s / 3)

    async def _advertise(self) -> None:
        """Renews this replica's configured sinks in keys.export_sinks and reads the others'
        (dropping those not renewed within SINKS_TTL_S) into `_live_sinks`."""
        now_ms = int(time.time() * 1000)
        until = now_ms + int(SINKS_TTL_S * 1000)
        name = keys.export_sinks()
        await self.store.client.hset(name, mapping={self.owner: f"{until} {','.join(self.runs)}"})
        self._live_sinks = await self.live_sinks(now_ms)

    async def live_sinks(self, now_ms: int | None = None) -> set[str]:
        """The sinks this replica and every live replica configure (keys.export_sinks)."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        name = keys.export_sinks()
        rows: dict[str, str] = await self.store.client.hgetall(name)
        live = set(self.runs)
        stale = []
        for owner, value in rows.items():
            until, _, names = str(value).partition(" ")
            if not until.isdigit() or int(until) < now_ms:
                stale.append(owner)
            else:
                live.update(n for n in names.split(",") if n)
        if stale:
            await self.store.client.hdel(name, *stale)
        return live

    async def _report_removed(self) -> None:
        """Once per start: a WARNING naming the sinks configured on no live replica whose
        groups or dead letters are still in the store."""
        removed = await self.removed_sinks()
        for st in removed:
            log.warning(
                "export: sink %r is configured on no replica, but its consumer groups (%d "
                "events it has not acknowledged) and %d dead letters are kept; "
                "they no longer hold the outbox's trimming back. `meter-grpc export forget %s` "
                "removes them",
                st.name,
                st.lag_events,
                st.dead_letters,
                st.name,
            )

    async def _leases(self) -> None:
        ttl = str(int(self.lease_s * 1000))
        order = list(range(BUCKETS))
        random.shuffle(order)  # replicas starting together spread over the buckets

        async def one(b: int) -> tuple[int, bool]:
            held = b in self.buckets
            row = await self.store.scripts.cas(
                keys=[keys.export_lease(b)],
                args=["set", self.owner if held else "", self.owner, ttl],
            )
            return b, bool(row[0])

        results = await asyncio.gather(*(one(b) for b in order))
        lost = {b for b, ok in results if not ok and b in self.buckets}
        self._drop(lost)
        for b, ok in results:
            if ok and b not in self.buckets:
                self.buckets.add(b)
                self._known[b] = set()
                self._sweep_at = 0.0
        self._wake.set()

    def _drop(self, lost: set[int]) -> None:
        """Buckets no longer held: what was read from them is forgotten (the next holder
        reads it again from the bucket consumer's pending entries)."""
        if not lost:
            return
        self.buckets -= lost
        for b in lost:
            self._known.pop(b, None)
        for run in self.runs.values():
            run.queue = [i for i in run.queue if i.bucket not in lost]
            run.streams = {s: st for s, st in run.streams.items() if st.bucket not in lost}

    # --- discovery ------------------------------------------------------------------------

    async def _sweep(self) -> None:
        """Adds the registered outbox streams (keys.export_streams) of the buckets held to
        `_known`, creating the sinks' groups on each. The first sweep, and one every
        RESCAN_S, also SCANs for streams written before the registry existed. One sweep at a
        time: another sink's round waits for it, so that no round reads a sweep half done
        (its first batches would then hold the licenses of a few streams only)."""
        async with self._sweeping:
            now = time.monotonic()
            if now < self._sweep_at or not self.buckets:
                return
            self._sweep_at = now + self.sweep_s
            registry = keys.export_streams()
            if now >= self._rescan_at:
                self._rescan_at = now + RESCAN_S
                found = [n async for n in self.store.client.scan_iter(keys.outbox_pattern())]
                if found:
                    await self.store.client.sadd(registry, *found)
            registered: set[str] = await self.store.client.smembers(registry)
            new: list[tuple[int, str]] = []
            for name in sorted(registered):
                b = keys.slot_of(name) % BUCKETS
                known = self._known.get(b)
                if known is not None and name not in known:
                    new.append((b, name))
            await asyncio.gather(*(self._groups(name) for _, name in new))
            for b, name in new:
                known = self._known.get(b)
                if known is not None and b in self.buckets:
                    known.add(name)

    async def _groups(self, stream: str) -> None:
        for name in self.runs:
            try:
                await self._call("XGROUP", "CREATE", stream, name, "0", "MKSTREAM")
            except Exception as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def _call(self, *args: Any) -> Any:
        key = str(args[2]) if args[0] in ("XGROUP", "XINFO") else None
        if args[0] == "XREADGROUP":
            key = str(args[args.index("STREAMS") + 1])
        elif key is None:
            key = str(args[1])
        return await self.store.client.router.call(args, key)

    # --- one sink -------------------------------------------------------------------------

    async def _sink_loop(self, run: _SinkRun) -> None:
        while True:
            try:
                worked = await self._round(run)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("export to %s: %s", run.sink.name, exc)
                worked = False
                await asyncio.sleep(1.0)
            if not worked:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_S):
                        await self._wake.wait()

    async def _round(self, run: _SinkRun) -> bool:
        await self._sweep()
        await self._fill(run)
        batch = self._batch(run)
        if not batch:
            return False
        await self._deliver(run, batch)
        await self._trim(run)
        return True

    async def _fill(self, run: _SinkRun) -> None:
        """Reads the streams due for a look. Each stream holds at most its share of the queue
        (QUEUE_MAX over the streams known, READ_MIN..READ_COUNT), so one busy stream cannot
        fill the queue and starve the others' licenses. A stream read to its end before is
        read again only if its newest entry changed since (`_heads`, one script call per
        node)."""
        now = time.monotonic()
        known = [(b, s) for b in list(self.buckets) for s in list(self._known.get(b, ()))]
        share = min(READ_COUNT, max(READ_MIN, QUEUE_MAX // max(1, len(known))))
        queued = collections.Counter(i.stream for i in run.queue)
        due: list[tuple[str, _StreamState]] = []
        for b, stream in known:
            st = run.streams.get(stream)
            if st is None:
                st = run.streams[stream] = _StreamState(b)
            if st.next_poll <= now and queued[stream] < share:
                due.append((stream, st))
        heads = await self._heads([s for s, st in due if st.cursor == ">"])
        for stream, st in due:
            if len(run.queue) >= QUEUE_MAX:
                return
            head = heads.get(stream)
            if st.drained and head is not None and head == st.head:
                got = 0  # nothing new: not read
            else:
                got = await self._read(run, stream, st, share - queued[stream])
                st.head = head
            if got:
                st.idle_s = POLL_S
            else:
                st.idle_s = min(IDLE_POLL_MAX_S, st.idle_s * 2)
            st.next_poll = now + st.idle_s

    async def _heads(self, streams: Sequence[str]) -> dict[str, str]:
        """Stream -> the id of its newest entry ("" when empty), one outbox_heads.lua call
        per node and HEADS_PER_CALL streams. A stream missing from the answer (its node not
        known yet, or a slot that moved during the call) is read."""
        router = self.store.client.router
        by_node: dict[int, tuple[Node, list[str]]] = {}
        for stream in streams:
            node = router.node_of(stream)
            if node is not None:
                by_node.setdefault(id(node), (node, []))[1].append(stream)
        out: dict[str, str] = {}

        async def one(node: Node, names: list[str]) -> None:
            for i in range(0, len(names), HEADS_PER_CALL):
                chunk = names[i : i + HEADS_PER_CALL]
                try:
                    ids = await self.store.scripts.outbox_heads(args=chunk, node=node)
                except (StoreError, OSError) as exc:
                    log.debug("export heads on %s: %s", node.name, exc)
                    continue
                out.update(zip(chunk, map(str, ids), strict=True))

        await asyncio.gather(*(one(node, names) for node, names in by_node.values()))
        return out

    async def _read(self, run: _SinkRun, stream: str, st: _StreamState, room: int) -> int:
        count = min(room, QUEUE_MAX - len(run.queue))
        name = run.sink.name
        try:
            reply = await self._call(
                "XREADGROUP", "GROUP", name, f"b{st.bucket}", "COUNT", count,
                "STREAMS", stream, st.cursor,
            )  # fmt: skip
        except Exception as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self._groups(stream)
            return 0
        rows = reply[0][1] if reply else []
        pending = st.cursor != ">"
        n = 0
        for entry_id, flat in rows:
            if flat is None:  # acknowledged meanwhile and trimmed
                continue
            item = _Item(stream, str(entry_id), pairs(flat), st.bucket)
            if pending:  # read by an earlier holder: it may have been tried already
                item.first_attempt_ms = int(item.fields.get("t", "0"))
            run.queue.append(item)
            n += 1
        if pending:
            st.cursor = str(rows[-1][0]) if rows else ">"
        else:
            st.drained = len(rows) < count
        return n if not pending else max(n, 1 if rows else 0)

    def _batch(self, run: _SinkRun) -> list[_Item]:
        """Up to max_batch events due, taken in turn from each license (its oldest first), so
        a batch spreads over as many licenses as are waiting: a sink that calls per license
        or per customer (Stripe) works on all of them at once, not one license's backlog. A
        license whose earlier event waits for a retry holds its later events back."""
        now = time.monotonic()
        held: set[str] = set()
        lanes: dict[str, list[_Item]] = {}
        for item in run.queue:
            lic = item.license_id
            if lic in held:
                continue
            if item.not_before > now:
                held.add(lic)
                continue
            lanes.setdefault(lic, []).append(item)
        out: list[_Item] = []
        depth = 0
        while len(out) < run.sink.max_batch and lanes:
            for lic in list(lanes):
                lane = lanes[lic]
                if depth >= len(lane):
                    del lanes[lic]
                    continue
                out.append(lane[depth])
                if len(out) >= run.sink.max_batch:
                    break
            depth += 1
        return out

    async def _metadata(self, license_ids: set[str]) -> dict[str, tuple[dict[str, str], str]]:
        """License id -> (its metadata, its policy id), cached METADATA_TTL_S; ({}, "") when
        the license is gone."""
        now = time.monotonic()
        out: dict[str, tuple[dict[str, str], str]] = {}
        todo = []
        for lid in license_ids:
            hit = self._meta.get(lid)
            if hit is not None and hit[0] > now:
                out[lid] = (hit[1], hit[2])
            else:
                todo.append(lid)
        if todo:
            raw = await asyncio.gather(
                *(self.store.client.hmget(keys.license(lid), ["meta", "policy_id"]) for lid in todo)
            )
            if len(self._meta) > METADATA_MAX:
                self._meta.clear()
            for lid, (text, policy) in zip(todo, raw, strict=True):
                try:
                    meta = {str(k): str(v) for k, v in json.loads(text or "{}").items()}
                except (ValueError, AttributeError):
                    meta = {}
                self._meta[lid] = (now + METADATA_TTL_S, meta, policy or "")
                out[lid] = (meta, policy or "")
        return out

    async def _deliver(self, run: _SinkRun, batch: list[_Item]) -> None:
        meta = await self._metadata({i.license_id for i in batch})
        now_ms = int(time.time() * 1000)
        events = []
        for item in batch:
            if not item.first_attempt_ms:
                item.first_attempt_ms = now_ms
            m, policy = meta[item.license_id]
            e = event_of(item.fields, m, policy)
            events.append(dataclasses.replace(e, first_attempt_ms=item.first_attempt_ms))
        async with run.lock:
            outcomes = await run.sink.deliver(events)
        if len(outcomes) != len(events):
            raise RuntimeError(
                f"sink {run.sink.name} answered {len(outcomes)} outcomes for {len(events)} events"
            )
        done: list[_Item] = []
        error = ""
        counts = [0, 0, 0]
        for item, event, outcome in zip(batch, events, outcomes, strict=True):
            if outcome.verdict is Verdict.DELIVERED:
                done.append(item)
                counts[0] += 1
            elif outcome.verdict is Verdict.DEAD:
                await self._dead_letter(run.sink.name, event, outcome.reason)
                done.append(item)
                counts[2] += 1
                error = outcome.reason or "refused"
            elif not outcome.sent:  # held back unsent: waits only what the system asked
                item.not_before = time.monotonic() + (outcome.retry_after_s or 0.0)
                counts[1] += 1
            else:
                item.attempts += 1
                wait = min(self.backoff_max_s, BACKOFF_BASE_S * 2 ** (item.attempts - 1))
                wait = wait / 2 + random.uniform(0, wait / 2)  # jitter
                if outcome.retry_after_s is not None:
                    wait = max(wait, outcome.retry_after_s)
                item.not_before = time.monotonic() + wait
                counts[1] += 1
                error = outcome.reason or "retry"
        run.delivered += counts[0]
        run.retried += counts[1]
        run.dead += counts[2]
        if self.metrics is not None:
            self.metrics.export_outcomes(run.sink.name, *counts)
        if error:
            await self.store.client.hset(
                keys.export_error(run.sink.name),
                mapping={"at": str(now_ms), "reason": error[:500]},
            )
        await self._ack(run, done)

    async def _ack(self, run: _SinkRun, done: list[_Item]) -> None:
        if not done:
            return
        by_stream: dict[str, list[str]] = {}
        for item in done:
            by_stream.setdefault(item.stream, []).append(item.entry_id)
        await asyncio.gather(
            *(self._call("XACK", s, run.sink.name, *ids) for s, ids in by_stream.items())
        )
        gone = {id(i) for i in done}
        run.queue = [i for i in run.queue if id(i) not in gone]

    async def _dead_letter(self, sink: str, event: ExportEvent, reason: str) -> None:
        fields = fields_of(event)
        fields["reason"] = reason[:500]
        fields["at"] = str(int(time.time() * 1000))
        await self.store.client.xadd(
            keys.export_dead(sink), fields, maxlen=self.dead_letters_max, approximate=True
        )

    # --- trimming -------------------------------------------------------------------------

    async def _trim(self, run: _SinkRun) -> None:
        now = time.monotonic()
        streams = {i for i in self._known_streams()}
        for stream in streams:
            if now - self._trimmed.get(stream, 0.0) < TRIM_EVERY_S:
                continue
            self._trimmed[stream] = now
            await self.trim(stream)

    def _known_streams(self) -> set[str]:
        out: set[str] = set()
        for b in self.buckets:
            out |= self._known.get(b, set())
        return out

    async def trim(self, stream: str) -> None:
        """XTRIM MINID to the oldest entry some group has not acknowledged."""
        low = await self._oldest_unacked(stream)
        if low is not None:
            await self._call("XTRIM", stream, "MINID", low)

    async def _oldest_unacked(self, stream: str) -> str | None:
        """Over the groups of the sinks configured on a live replica only: a removed sink's
        group does not hold the trimming back (ExportStatus reports it)."""
        try:
            groups = [pairs(g) for g in await self._call("XINFO", "GROUPS", stream)]
        except Exception as exc:  # a registered stream deleted since: nothing to trim
            if not _no_such_stream(exc):
                raise
            return None
        groups = [g for g in groups if str(g["name"]) in self._live_sinks]
        if not groups:
            return None
        low: str | None = None
        for g in groups:
            # Pending at XINFO time may be acknowledged by the XPENDING (another sink's task):
            # then nothing the group read is unacknowledged, and the entry after its last
            # delivered id (as XINFO saw it) is still a bound below every unacknowledged one.
            first = _next_id(str(g["last-delivered-id"]))
            if int(g["pending"]) > 0:
                oldest = (await self._call("XPENDING", stream, str(g["name"])))[1]
                if oldest is not None:
                    first = str(oldest)
            if low is None or position(first) < position(low):
                low = first
        return low

    # --- status and dead letters ----------------------------------------------------------

    async def status(self) -> list[SinkStatus]:
        """Per sink: events not acknowledged yet (read or not) and the age of the oldest,
        the last error, dead letters held. Reads every outbox stream."""
        return await self._status(list(self.runs))

    async def removed_sinks(self) -> list[SinkStatus]:
        """The sinks configured on no live replica that still have a consumer group on some
        outbox stream or dead letters, by name, with their status (what they have not
        acknowledged that is still in the streams)."""
        live = await self.live_sinks()
        found: set[str] = set()
        for stream in await self.outbox_streams():
            try:
                found.update(
                    str(pairs(g)["name"]) for g in await self._call("XINFO", "GROUPS", stream)
                )
            except Exception:
                continue
        async for name in self.store.client.scan_iter(keys.export_dead("*")):
            found.add(str(name).removeprefix(keys.export_dead("")))
        gone = sorted(found - live)
        return await self._status(gone, missing_group_lags=False) if gone else []

    async def _status(
        self, names: list[str], *, missing_group_lags: bool = True
    ) -> list[SinkStatus]:
        out = {name: SinkStatus(name) for name in names}
        now_ms = int(time.time() * 1000)
        streams = await self.outbox_streams()
        for stream in streams:
            try:
                groups = [pairs(g) for g in await self._call("XINFO", "GROUPS", stream)]
            except Exception:
                continue
            present = {str(g["name"]): g for g in groups}
            for name, st in out.items():
                g = present.get(name)
                if g is None and not missing_group_lags:
                    continue
                if g is None:
                    n = int(await self.store.client.execute_command("XLEN", stream))
                    if n:
                        st.lag_events += n
                        first = await self.store.client.xrange(stream, count=1)
                        if first:
                            age = (now_ms - _id_ms(first[0][0])) / 1000
                            st.lag_seconds = max(st.lag_seconds, age)
                    continue
                lag = g.get("lag")
                pending = int(g["pending"])
                unread = int(lag) if lag is not None else 0
                if lag is None and not missing_group_lags:  # trimmed past it: what is left
                    rows = await self.store.client.xrange(
                        stream, min="(" + str(g["last-delivered-id"]), count=READ_COUNT
                    )
                    unread = len(rows)
                st.lag_events += pending + unread
                oldest: str | None = None
                if pending:  # None when acknowledged since XINFO
                    first = (await self._call("XPENDING", stream, name))[1]
                    oldest = None if first is None else str(first)
                if oldest is None and unread:
                    rows = await self.store.client.xrange(
                        stream, min="(" + str(g["last-delivered-id"]), count=1
                    )
                    oldest = rows[0][0] if rows else None
                if oldest is not None:
                    st.lag_seconds = max(st.lag_seconds, (now_ms - _id_ms(oldest)) / 1000)
        for name, st in out.items():
            err = await self.store.client.hgetall(keys.export_error(name))
            st.last_error = err.get("reason", "")
            st.last_error_ms = int(err.get("at", "0") or 0)
            st.dead_letters = int(
                await self.store.client.execute_command("XLEN", keys.export_dead(name))
            )
        return list(out.values())

    async def forget(self, sink: str) -> tuple[int, int]:
        """Destroys `sink`'s consumer group on every outbox stream, deletes its dead letters
        and last error, and trims the streams it held back. Returns (groups destroyed, dead
        letters deleted). ValueError: the sink is configured on a live replica, or nothing
        of it is left."""
        self._live_sinks = await self.live_sinks()
        if sink in self._live_sinks:
            raise ValueError(
                f"sink {sink!r} is configured on a live replica: remove its METER_EXPORT_* "
                f"settings from every replica first (a replica counts as live for "
                f"{SINKS_TTL_S / 60:g} minutes after it last ran)"
            )
        # Each step is idempotent and what it removes is what the check below finds, so a
        # forget cut short anywhere (a crash, a deadline, the store gone) is finished by
        # running it again; the trimming after it is also done by every exporter's own.
        groups = 0
        streams = await self.outbox_streams()
        for stream in streams:
            try:
                destroyed = int(await self._call("XGROUP", "DESTROY", stream, sink))
            except Exception as exc:  # a registered stream deleted since: nothing to destroy
                if not _no_such_stream(exc):
                    raise
                destroyed = 0
            groups += destroyed
            if destroyed:
                await failpoints.hit("forget_export_sink.group")
        erased = int(await self.store.client.delete(keys.export_error(sink)))
        await failpoints.hit("forget_export_sink.error_deleted")
        dead = int(await self.store.client.execute_command("XLEN", keys.export_dead(sink)))
        await self.store.client.delete(keys.export_dead(sink))
        await failpoints.hit("forget_export_sink.dead_deleted")
        if not groups and not dead and not erased:
            raise ValueError(f"sink {sink!r} has no consumer group and no dead letters here")
        for stream in streams:
            await self.trim(stream)
        log.info("export: forgot sink %r (%d consumer groups, %d dead letters)", sink, groups, dead)
        return groups, dead

    async def outbox_streams(self) -> list[str]:
        """The outbox streams registered (keys.export_streams), in name order."""
        return sorted(await self.store.client.smembers(keys.export_streams()))

    async def dead_letters(self, sink: str, limit: int) -> list[tuple[str, ExportEvent, str]]:
        rows = await self.store.client.xrange(keys.export_dead(sink), count=limit or None)
        return [(eid, event_of(f), f.get("reason", "")) for eid, f in rows]

    async def replay(self, sink: str, limit: int = 0) -> tuple[int, int, int]:
        """Delivers up to `limit` dead letters of `sink` (0: all) again, oldest first; those
        delivered leave the dead-letter stream, the others stay (a refusal's reason updated).
        Returns (delivered, failed, left in the list). KeyError: no such sink here."""
        run = self.runs[sink]
        rows = await self.dead_letters(sink, limit)
        delivered = failed = 0
        name = keys.export_dead(sink)
        for start in range(0, len(rows), run.sink.max_batch):
            chunk = rows[start : start + run.sink.max_batch]
            meta = await self._metadata({e.license_id for _, e, _ in chunk})
            # a replay is a first attempt again (Stripe's 24 h window counts from it)
            events = [
                dataclasses.replace(e, license_metadata=meta[e.license_id][0], first_attempt_ms=0)
                for _, e, _ in chunk
            ]
            async with run.lock:
                outcomes = await run.sink.deliver(events)
            for (eid, event, _), outcome in zip(chunk, outcomes, strict=True):
                if outcome.verdict is Verdict.DELIVERED:
                    await self.store.client.execute_command("XDEL", name, eid)
                    delivered += 1
                else:
                    failed += 1
                    if outcome.verdict is Verdict.DEAD and outcome.reason:
                        await self.store.client.execute_command("XDEL", name, eid)
                        await self._dead_letter(sink, event, outcome.reason)
        left = int(await self.store.client.execute_command("XLEN", name))
        return delivered, failed, left


__all__ = ["BUCKETS", "Exporter", "Outcome", "SinkStatus", "event_of", "sinks_of"]
