"""WatchUsage fan-out: one store reader per watched license, shared by all its watchers,
and the caps on how many streams may watch.

A `Feed` is the one blocking read (XREAD BLOCK on the license's event stream) of a license
that has watchers: it reads each batch of new events once and hands it to every watcher of
that license. So the blocking connections to the store grow with the number of licenses
being watched, never with the number of watchers: 4,000 watchers of one license share one
connection, and another license's watcher never waits for theirs.

Each watcher has a position (`tail`: the id of the last event it was given, or where it
started) and a bounded queue (WATCH_QUEUE events). Positions are stream ids, so a watcher
never depends on when it joined:

- a watcher whose position is at or after the feed's takes, from each batch the feed reads,
  the events after its position (in order, as many as its queue has room for);
- a watcher whose position is behind the feed's (it started at an older event, or it was
  slower than the events came and its queue filled up) reads the events after its position
  from the store by itself, without blocking, as fast as its client takes them, until it is
  level with the feed again.

So a slow watcher is never ended for being slow and never skips an event: it falls back to
reading on its own and catches up. Every watcher gets every event of its license in order,
or the stream ends with an error (after the events already queued for it are delivered):
the license was deleted (LICENSE_NOT_FOUND), the store failed (STORAGE_UNAVAILABLE,
UNAVAILABLE; a client resumes with `after_event_id` of the last event it got), or the events
after its position were trimmed (METER_EVENT_RETENTION) before it read them
(USAGE_EVENTS_TRIMMED, OUT_OF_RANGE: events_after.lua checks and reads in one step). A feed whose read fails ends; the
next watcher of that license starts a new one.

Caps (RESOURCE_EXHAUSTED, reason WATCH_LIMIT_EXCEEDED, checked before anything is read):
at most `per_key` streams at once per license key (callers authenticated by a license key;
admin streams are not counted per key), at most `total` streams at once in the process,
admin streams included, and at most WATCH_LICENSES_MAX licenses watched at once (so the
blocking reads stay within the transport's pool). A feed whose last watcher left keeps its
read until it returns (a watcher coming back soon finds it), unless its connection is
needed for another license.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import dataclasses
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

from meter_grpc.domain.errors import MeterError, Reason, not_found

if TYPE_CHECKING:
    from meter_grpc.domain.models import UsageEvent
    from meter_grpc.domain.ports import Store

# How long one blocking read waits for an event; when it times out, the feed checks that the
# license still exists (a deleted license ends its watchers with LICENSE_NOT_FOUND).
WATCH_BLOCK_MS = 5000
# Events read per store call (by a feed, or by a watcher catching up).
WATCH_BATCH = 100
# Events queued per watcher; a watcher whose queue is full reads the store by itself.
WATCH_QUEUE = 256
# Licenses watched at once per process: each has one blocking read, on one of the
# transport's blocking connections (storage/transport.py: 1,024 per node).
WATCH_LICENSES_MAX = 1000
# Defaults of METER_WATCH_PER_KEY and METER_WATCH_MAX.
DEFAULT_WATCH_PER_KEY = 16
DEFAULT_WATCH_MAX = 10_000

Position = tuple[int, int]


def position(event_id: str) -> Position:
    """The order of a stream id `<ms>-<seq>` (already checked by metering.is_event_id)."""
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


class Watcher:
    """One WatchUsage stream: its position, its queue, and how its feed reaches it."""

    __slots__ = ("error", "from_oldest", "queue", "tail", "tail_pos", "waiter")

    def __init__(self, tail: str, from_oldest: bool = False) -> None:
        # from_oldest: starts with whatever is the oldest event kept (no gap before it)
        self.from_oldest = from_oldest
        self.tail = tail
        self.tail_pos = position(tail)
        self.queue: collections.deque[UsageEvent] = collections.deque()
        self.error: Exception | None = None
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        fut, self.waiter = self.waiter, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    def take(self, events: list[UsageEvent], positions: list[Position]) -> None:
        """Queues the events after this watcher's position, as many as there is room for
        (`positions`: those of the events)."""
        room = WATCH_QUEUE - len(self.queue)
        if room <= 0 or positions[-1] <= self.tail_pos:
            return
        first = bisect.bisect_right(positions, self.tail_pos)
        last = min(len(events), first + room)
        self.queue.extend(events[first:last])
        self.tail, self.tail_pos = events[last - 1].event_id, positions[last - 1]
        self.from_oldest = False
        self.wake()


class Feed:
    """The one blocking reader of a license's events, shared by its watchers."""

    def __init__(self, hub: WatchHub, license_id: str, start: str) -> None:
        self.hub = hub
        self.license_id = license_id
        self.pos = start  # the id of the last event read (or where reading started)
        self.pos_key = position(start)
        self.watchers: set[Watcher] = set()
        self.ended = False
        self.task = asyncio.get_running_loop().create_task(
            self._run(), name=f"meter-watch-{license_id}"
        )

    async def _run(self) -> None:
        store, license_id = self.hub.store, self.license_id
        try:
            while True:
                events = await store.read_events(license_id, self.pos, WATCH_BLOCK_MS, WATCH_BATCH)
                if not self.watchers:
                    break  # the last watcher left during the read
                if not events:
                    if not await store.license_exists(license_id):
                        raise not_found(Reason.LICENSE_NOT_FOUND, "license", license_id)
                    continue
                self._deliver(events)
        except asyncio.CancelledError:
            self._fail(_closed())
            raise
        except MeterError as exc:
            self._fail(exc)
        except Exception as exc:  # a bug: its watchers end with it (INTERNAL), logged there
            self._fail(exc)
        finally:
            self._retire()

    def _deliver(self, events: list[UsageEvent]) -> None:
        """Hands a batch (the events right after self.pos, in order) to every watcher that is
        level with the feed; those behind read by themselves."""
        start = self.pos_key
        positions = [position(e.event_id) for e in events]
        for w in self.watchers:
            if w.tail_pos >= start:
                w.take(events, positions)
        self.pos, self.pos_key = events[-1].event_id, positions[-1]

    def _fail(self, error: Exception) -> None:
        self._retire()
        for w in self.watchers:
            if w.error is None:
                w.error = error
            w.wake()

    def _retire(self) -> None:
        """No watcher joins this feed any more (a new one is started for the next)."""
        self.ended = True
        if self.hub.feeds.get(self.license_id) is self:
            del self.hub.feeds[self.license_id]


def _closed() -> MeterError:
    return MeterError(
        Reason.STORAGE_UNAVAILABLE,
        "the service is shutting down; watch again (after_event_id: the last event received)",
        metadata={"outcome": "not_applied", "error": "shutdown"},
        retry_after_ms=500,
    )


class WatchHub:
    """The feeds of the watched licenses, and the counts the caps are checked against."""

    def __init__(
        self,
        store: Store,
        *,
        per_key: int = DEFAULT_WATCH_PER_KEY,
        total: int = DEFAULT_WATCH_MAX,
    ) -> None:
        self.store = store
        self.per_key = per_key
        self.total = total
        self.feeds: dict[str, Feed] = {}
        self.streams = 0  # WatchUsage streams open (admin and license keys)
        self.by_key: dict[str, int] = {}  # license id of a license key -> its streams open
        self.licenses: dict[str, int] = {}  # license id -> its streams open

    def acquire(self, key_license_id: str, license_id: str) -> None:
        """Counts one more stream of `license_id`, or refuses it (RESOURCE_EXHAUSTED, nothing
        counted). `key_license_id`: the license of the calling license key; "" for an admin."""
        if self.streams >= self.total:
            raise _limit(
                f"this server already has {self.streams} WatchUsage streams open, its maximum",
                scope="process",
                limit=self.total,
                metadata={"open_streams": str(self.streams), "setting": "METER_WATCH_MAX"},
                subject="process",
            )
        n = self.by_key.get(key_license_id, 0) if key_license_id else 0
        if key_license_id and n >= self.per_key:
            raise _limit(
                f"this license key already has {n} WatchUsage streams open, its maximum; "
                "end one first",
                scope="license_key",
                limit=self.per_key,
                metadata={
                    "open_streams": str(n),
                    "setting": "METER_WATCH_PER_KEY",
                    "license_id": key_license_id,
                },
                subject=f"license:{key_license_id}",
            )
        watched = len(self.licenses)
        if license_id not in self.licenses and watched >= WATCH_LICENSES_MAX:
            raise _limit(
                f"this server already watches {watched} licenses, its maximum (one store "
                "connection each); watch through another replica, or later",
                scope="licenses",
                limit=WATCH_LICENSES_MAX,
                metadata={"watched_licenses": str(watched)},
                subject="process",
            )
        if key_license_id:
            self.by_key[key_license_id] = n + 1
        self.licenses[license_id] = self.licenses.get(license_id, 0) + 1
        self.streams += 1

    def release(self, key_license_id: str, license_id: str) -> None:
        self.streams -= 1
        _decrement(self.licenses, license_id)
        if key_license_id:
            _decrement(self.by_key, key_license_id)

    async def events(
        self, license_id: str, start: str, newest: str, *, from_oldest: bool = False
    ) -> AsyncGenerator[UsageEvent, None]:
        """The events of a license after `start`, in order, as they come (see the module
        docstring); ends only with an error. `newest`: the id of the license's newest event
        when the watch began (where a new feed starts reading; "0-0" when none)."""
        w = Watcher(start, from_oldest)
        feed = self.feeds.get(license_id)
        if feed is None or feed.ended:
            feed = self.feeds[license_id] = Feed(self, license_id, newest)
            if len(self.feeds) > WATCH_LICENSES_MAX:
                self._evict_idle()
        feed.watchers.add(w)
        loop = asyncio.get_running_loop()
        try:
            while True:
                if w.queue:
                    yield w.queue.popleft()
                    continue
                if w.error is not None:
                    # A fresh exception per watcher (one shared by many streams would collect
                    # all of their tracebacks).
                    err = w.error
                    raise (dataclasses.replace(err) if isinstance(err, MeterError) else err)
                if w.tail_pos < feed.pos_key:
                    await self._catch_up(w, license_id, feed)
                    continue
                w.waiter = loop.create_future()
                await w.waiter
        finally:
            feed.watchers.discard(w)

    async def _catch_up(self, w: Watcher, license_id: str, feed: Feed) -> None:
        """One non-blocking read of the events after a watcher's position (it is behind its
        feed's): on the request path's connection, never a blocking one."""
        events, oldest = await self.store.events_after(license_id, w.tail, WATCH_BATCH)
        if w.from_oldest:  # its first read: the events trimmed before it are not its concern
            w.from_oldest, oldest = False, ""
        if oldest:
            # Events after its position were trimmed (METER_EVENT_RETENTION) before it read
            # them: it is told, never given a stream with a hole in it.
            raise MeterError(
                Reason.USAGE_EVENTS_TRIMMED,
                f"the usage events of license {license_id!r} after {w.tail} are no longer "
                f"kept (the oldest kept is {oldest}): read the counter with GetUsage, then "
                "watch again",
                metadata={
                    "license_id": license_id,
                    "after_event_id": w.tail,
                    "oldest_event_id": oldest,
                },
            )
        if events:
            w.take(events, [position(e.event_id) for e in events])
            return
        # Nothing after its position although the feed read an event after it: that event is
        # gone from the store, which happens when the license is deleted (with its events).
        if not await self.store.license_exists(license_id):
            raise not_found(Reason.LICENSE_NOT_FOUND, "license", license_id)
        if w.tail_pos < feed.pos_key:  # its stream was cut while it read: level with the feed
            w.tail, w.tail_pos = feed.pos, feed.pos_key

    def _evict_idle(self) -> None:
        """Stops a feed that no watcher uses any more (it waits for its read to end before
        it goes by itself), so that the blocking reads stay within WATCH_LICENSES_MAX."""
        for feed in self.feeds.values():
            if not feed.watchers and feed.license_id not in self.licenses:
                feed._retire()
                feed.task.cancel()
                return

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stops every feed (a shutdown): their watchers end with STORAGE_UNAVAILABLE."""
        tasks = [f.task for f in self.feeds.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)


def _decrement(counts: dict[str, int], key: str) -> None:
    n = counts[key] - 1
    if n:
        counts[key] = n
    else:
        del counts[key]


def _limit(
    message: str, *, scope: str, limit: int, metadata: dict[str, str], subject: str
) -> MeterError:
    return MeterError(
        Reason.WATCH_LIMIT_EXCEEDED,
        message,
        metadata={"scope": scope, "limit": str(limit), **metadata},
        quota_subject=subject,
    )
