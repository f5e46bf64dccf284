"""Stripe Billing Meters: one meter event per call, `POST <url>/v1/billing/meter_events`
(form-encoded), with `Authorization: Bearer <METER_EXPORT_STRIPE_API_KEY>`.

Each call is `event_name=<METER_EXPORT_STRIPE_EVENT_NAMES for its meter, else the meter code,
`uses` for the license's own counter>&payload[stripe_customer_id]=<the license's metadata value
under METER_EXPORT_STRIPE_CUSTOMER_KEY>&payload[value]=<the signed delta, or the count after
it with METER_EXPORT_STRIPE_VALUE=uses>&identifier=<event id>&timestamp=<Unix seconds>`, with
`Idempotency-Key: <event id>` so that a try whose answer was lost gets the first answer back.

Why v1 and not the v2 event stream (100 events per call, 10,000/s): v1 validates each event
as it takes it, so an event Stripe will not bill is dead here with Stripe's reason; the stream
validates later and reports errors only through webhooks, after the event was taken as
delivered. v1 takes 1,000 calls/s but only one at a time per customer and meter: a batch's
events are sent one after another per customer (which keeps each license's order) and up to
CUSTOMERS_AT_ONCE customers at once. So one customer's events go at one per round trip (about
10/s at 100 ms), and many customers' at up to 32 per round trip (about 300/s at 100 ms, well
under v1's 1,000 calls/s). A retry (5xx, timeout) stops its customer's lane for this delivery,
the other customers go on; a 429 or a refused connection stops every lane.

Negative deltas are sent as they are (Stripe takes signed whole numbers): a `sum` meter nets
them within the billing period, and a period whose total is negative is billed as 0.

Stripe deduplicates `identifier` for a rolling 24 h only, and takes timestamps up to 35 days
back. So an event is dead, never sent, when
- its time is older than 35 days (less 5 minutes): "outside Stripe's 35-day window";
- it was first tried more than 23 h ago (`first_attempt_ms`): Stripe may have taken that
  first try, and would take this one as a new event: "may be a duplicate beyond Stripe's 24 h
  dedup window". An admin checks Stripe before replaying it.
- its license has no customer in its metadata: "no stripe_customer_id".
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from urllib.parse import urlencode

from meter_grpc.config import OWN_COUNTER, StripeExport
from meter_grpc.domain.clock import Clock
from meter_grpc.export.model import ExportEvent, Outcome, Verdict
from meter_grpc.export.sinks._http import UNREACHABLE, HttpSink, dead, one_line, retry

MAX_BATCH = 500  # events handed to one deliver(); each is its own call
DEDUP_WINDOW_MS = 24 * 3600 * 1000  # Stripe keeps an identifier at least this long
RESEND_LIMIT_MS = 23 * 3600 * 1000  # no resend once the first try is older than this
TIMESTAMP_WINDOW_MS = 35 * 24 * 3600 * 1000  # Stripe refuses older timestamps
TIMESTAMP_MARGIN_MS = 5 * 60 * 1000  # what an event may age between our check and Stripe's
CUSTOMERS_AT_ONCE = 32  # customers whose events are sent at the same time (a call each)


class StripeSink(HttpSink):
    name = "stripe"
    max_batch = MAX_BATCH
    env_prefix = "METER_EXPORT_STRIPE"
    connections = CUSTOMERS_AT_ONCE

    def __init__(self, config: StripeExport, *, timeout_s: float, clock: Clock) -> None:
        super().__init__(timeout_s=timeout_s, clock=clock)
        self._config = config
        self._url = f"{config.url}/v1/billing/meter_events"
        self._auth = f"Bearer {config.api_key}"

    def form(self, event: ExportEvent, customer: str) -> list[tuple[str, str]]:
        meter = event.meter or OWN_COUNTER
        value = event.uses if self._config.value == "uses" else event.delta
        return [
            ("event_name", self._config.event_names.get(meter, meter)),
            ("payload[stripe_customer_id]", customer),
            ("payload[value]", str(value)),
            ("identifier", event.id),
            ("timestamp", str(event.time_ms // 1000)),
        ]

    def refusal(self, event: ExportEvent, now_ms: int) -> Outcome | None:
        """Dead before sending, or None."""
        if event.first_attempt_ms and now_ms - event.first_attempt_ms > RESEND_LIMIT_MS:
            hours = (now_ms - event.first_attempt_ms) / 3_600_000
            return dead(
                f"first tried {hours:.1f} h ago: may be a duplicate beyond Stripe's 24 h "
                "dedup window; not sent again (check Stripe before replaying)"
            )
        if now_ms - event.time_ms > TIMESTAMP_WINDOW_MS - TIMESTAMP_MARGIN_MS:
            days = (now_ms - event.time_ms) / 86_400_000
            return dead(f"event time {days:.1f} days ago is outside Stripe's 35-day window")
        if not event.license_metadata.get(self._config.customer_key):
            return dead(
                f"license {event.license_id} has no metadata {self._config.customer_key!r}: "
                "Stripe needs the customer"
            )
        return None

    async def deliver(self, events: Sequence[ExportEvent]) -> list[Outcome]:
        now = self._clock.now_ms()
        outcomes: list[Outcome | None] = [self.refusal(e, now) for e in events]
        groups: dict[str, list[int]] = {}
        for i, event in enumerate(events):
            if outcomes[i] is None:
                customer = event.license_metadata[self._config.customer_key]
                groups.setdefault(customer, []).append(i)
        stopped: list[Outcome] = []  # a throttle or an unreachable Stripe: every lane stops
        held: dict[int, Outcome] = {}  # index -> the retry of its customer's lane
        slots = asyncio.Semaphore(CUSTOMERS_AT_ONCE)

        async def one_customer(customer: str, idx: list[int]) -> None:
            async with slots:
                for k, i in enumerate(idx):
                    if stopped:
                        return
                    outcome = await self._send(events[i], customer)
                    outcomes[i] = outcome
                    if outcome.verdict is Verdict.RETRY:
                        if _everyone(outcome):
                            stopped.append(outcome)
                        for j in idx[k + 1 :]:
                            held[j] = outcome.unsent()
                        return

        await asyncio.gather(*(one_customer(c, idx) for c, idx in groups.items()))
        # Not sent: held back behind their lane's retry (which keeps each license's order), or
        # stopped by a throttle; neither is a failed attempt of theirs.
        rest = stopped[0].unsent() if stopped else retry("not sent").unsent()
        return [o or held.get(i, rest) for i, o in enumerate(outcomes)]

    async def _send(self, event: ExportEvent, customer: str) -> Outcome:
        headers = {
            "Authorization": self._auth,
            "Content-Type": "application/x-www-form-urlencoded",
            "Idempotency-Key": event.id,
        }
        data = urlencode(self.form(event, customer)).encode()
        answer = await self.request(self._url, headers=headers, data=data)
        if isinstance(answer, Outcome):
            return answer
        if answer.ok:
            return Outcome.delivered()
        outcome = self.not_taken(answer)
        if outcome is not None:
            return outcome
        return dead(_stripe_reason(answer.status, answer.text))


def _everyone(outcome: Outcome) -> bool:
    """A retry that stops every customer's lane, not only its own: a 429 (Stripe asks to slow
    down) or no connection opened (Stripe unreachable). A 5xx, a timeout or a connection cut
    mid-call stops its lane only: the other customers' calls are independent."""
    return outcome.retry_after_s is not None or outcome.reason.startswith(("HTTP 429", UNREACHABLE))


def _stripe_reason(status: int, text: str) -> str:
    """`HTTP 400: <error code>: <message>` from Stripe's `{"error": {...}}`."""
    try:
        error = json.loads(text)["error"]
        parts = [str(error[k]) for k in ("code", "param", "message") if error.get(k)]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {one_line(text)}"
    return f"HTTP {status}: {one_line(': '.join(parts) or text)}"
