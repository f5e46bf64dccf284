"""What the HTTP sinks share: one aiohttp session per sink, reading an answer into Outcomes,
and isolating the bad events of a batch the billing system refused.

Every answer falls in one of these (the same table for every billing system; a sink reads
the 2xx bodies and the refusals itself):

| answer | outcome |
| --- | --- |
| 2xx | delivered (unless the body reports events it did not take) |
| 429 | retry, after `Retry-After` / `X-RateLimit-Reset` (seconds, an epoch time or a date) |
| 408, 409, 5xx, a timeout, a refused or broken connection | retry (the exporter's backoff) |
| 401, 403, 404, 405, 3xx | retry, logged as an ERROR: a wrong key or URL is a configuration error, and dead-lettering good events for it would only make the admin replay them all |
| any other 4xx | refused: the sink isolates the bad event(s), which are dead, from the good ones |

A call that may have reached the billing system (a timeout, a 5xx) is simply sent again: every
event carries its deterministic id as the system's dedup key, and the same body on every try.
"""

from __future__ import annotations

import email.utils
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiohttp

from meter_grpc.domain.clock import Clock
from meter_grpc.export.model import ExportEvent, Outcome, Verdict

log = logging.getLogger("meter_grpc.export")

CONNECTIONS = 8  # per sink (Stripe: 32): open connections to its billing system at most
REASON_CHARS = 300  # what a reason keeps of an answer's body
BODY_BYTES = 65_536  # what is read of an answer's body at most
MAX_RETRY_AFTER_S = 3600.0  # a reset header further away than this is taken as this
AUTH_LOG_EVERY_S = 60.0  # a sink logs the same configuration error at most this often
RETRY_STATUSES = frozenset({408, 409, 425})
CONFIG_STATUSES = frozenset({401, 403, 404, 405, 407})
UNREACHABLE = "connection failed: cannot connect"  # the reason's start when no connection opened


def one_line(text: str, limit: int = REASON_CHARS) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def rfc3339(time_ms: int) -> str:
    """2024-03-14T13:09:00.123Z (UTC, milliseconds)."""
    seconds, ms = divmod(time_ms, 1000)
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{ms:03d}Z"


def retry_after(headers: Mapping[str, str], now_s: float | None = None) -> float | None:
    """Seconds to wait from a 429's `Retry-After` (seconds or an HTTP date) or else its
    `X-RateLimit-Reset` (seconds to wait, or an epoch time in seconds or milliseconds),
    between 0 and MAX_RETRY_AFTER_S; None when neither is there or readable."""
    now = time.time() if now_s is None else now_s
    for name in ("Retry-After", "X-RateLimit-Reset"):
        raw = headers.get(name, "").strip()
        if not raw:
            continue
        try:
            wait = float(raw)
        except ValueError:
            try:
                wait = email.utils.parsedate_to_datetime(raw).timestamp() - now
            except (TypeError, ValueError, IndexError, OverflowError):
                continue
        else:
            if wait > 1e12:
                wait = wait / 1000 - now
            elif wait > 1e9:
                wait -= now
        if math.isfinite(wait):
            return min(max(wait, 0.0), MAX_RETRY_AFTER_S)
    return None


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    @property
    def reason(self) -> str:
        return f"HTTP {self.status}: {one_line(self.text)}" if self.body else f"HTTP {self.status}"


@dataclass(frozen=True, slots=True)
class Refused:
    """A batch the billing system refused as a whole (a 4xx other than the retried ones).
    `known`: the outcome of some events of the batch (by index) when the answer says."""

    reason: str
    known: Mapping[int, Outcome] = field(default_factory=dict)


Send = Callable[[Sequence[ExportEvent]], Awaitable[Outcome | Refused]]


def retry(reason: str, after_s: float | None = None) -> Outcome:
    return Outcome(Verdict.RETRY, retry_after_s=after_s, reason=reason)


def dead(reason: str) -> Outcome:
    return Outcome(Verdict.DEAD, reason=reason)


async def isolate(events: Sequence[ExportEvent], send: Send) -> list[Outcome]:
    """Sends `events`; when the batch is refused, finds which events are bad and sends the
    others again: the ones the answer names are settled (dead, or delivered for a duplicate)
    and the rest resent, else the batch is halved. A single refused event is dead. So a batch
    of n takes at most 2n - 1 calls. A retry answer stops it: every event not settled yet is
    retried (a throttled or failing system is not called again within the same delivery); those
    not in the failed call are marked unsent (no failed attempt of theirs)."""
    outcomes: list[Outcome | None] = [None] * len(events)
    pending = [list(range(len(events)))] if events else []
    while pending:
        idx = pending.pop()
        answer = await send([events[i] for i in idx])
        if isinstance(answer, Outcome):
            if answer.verdict is Verdict.RETRY:
                tried = set(idx)
                return [
                    o or (answer if i in tried else answer.unsent()) for i, o in enumerate(outcomes)
                ]
            for i in idx:
                outcomes[i] = answer
        elif len(idx) == 1:
            outcomes[idx[0]] = answer.known.get(0) or dead(answer.reason)
        elif known := {j: o for j, o in answer.known.items() if 0 <= j < len(idx)}:
            for j, outcome in known.items():
                outcomes[idx[j]] = outcome
            rest = [i for j, i in enumerate(idx) if j not in known]
            if rest:
                pending.append(rest)
        else:
            half = len(idx) // 2
            pending += [idx[half:], idx[:half]]
    return [o or retry("not sent").unsent() for o in outcomes]


class HttpSink:
    """One aiohttp session (made on first use, in the exporter's event loop), a timeout per
    call and at most `connections` connections."""

    name = "http"
    env_prefix = "METER_EXPORT"
    connections = CONNECTIONS

    def __init__(self, *, timeout_s: float, clock: Clock) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(timeout_s, 10.0))
        self._timeout_s = timeout_s
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._logged: dict[int, float] = {}

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=self.connections),
                headers={"User-Agent": "meter-grpc"},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self, url: str, *, headers: Mapping[str, str], data: bytes
    ) -> Answer | Outcome:
        """POSTs; the answer, or a retry outcome when there is none (timeout, connection)."""
        try:
            async with self.session().post(
                url, headers=dict(headers), data=data, allow_redirects=False
            ) as resp:
                body = await resp.content.read(BODY_BYTES)
                return Answer(resp.status, resp.headers, body)
        except TimeoutError:
            return retry(f"no answer within {self._timeout_s:g} s")
        except aiohttp.ClientConnectorError as exc:  # nothing sent: the system is unreachable
            return retry(f"{UNREACHABLE}: {one_line(str(exc) or type(exc).__name__)}")
        except (aiohttp.ClientError, OSError) as exc:
            return retry(f"connection failed: {one_line(str(exc) or type(exc).__name__)}")

    def not_taken(self, answer: Answer) -> Outcome | None:
        """The outcome of a non-2xx answer the sink need not read itself (a retry), or None
        for a 2xx or a refusal (an other 4xx)."""
        status = answer.status
        if answer.ok:
            return None
        if status == 429:
            return retry(answer.reason, retry_after(answer.headers))
        if status in RETRY_STATUSES or status >= 500:
            return retry(answer.reason)
        if status in CONFIG_STATUSES or status < 200 or 300 <= status < 400:
            self.config_error(answer.reason)
            return retry(answer.reason)
        return None

    def config_error(self, reason: str) -> None:
        """Logged as an ERROR (once a minute per kind): the events are kept and retried."""
        kind = hash(reason.partition(":")[0])
        now = time.monotonic()
        if now - self._logged.get(kind, -math.inf) >= AUTH_LOG_EVERY_S:
            self._logged[kind] = now
            log.error(
                "export to %s refused by the billing system (%s): check %s_* (key, URL); "
                "the events are kept and retried",
                self.name,
                reason,
                self.env_prefix,
            )
