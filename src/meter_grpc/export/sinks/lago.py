"""Lago: events to `POST <base>/api/v1/events/batch`, at most 100 per call.

Each event is `{"transaction_id": <event id>, "external_subscription_id": <the license's
metadata value under METER_EXPORT_LAGO_SUBSCRIPTION_KEY, else the license id>, "code": <the
meter code, `uses` for the license's own counter, through METER_EXPORT_LAGO_CODES>,
"timestamp": "<Unix seconds>.<ms>", "properties": {"delta": <signed change>, "uses": <count
after>}}`, sent with `Authorization: Bearer <METER_EXPORT_LAGO_API_KEY>`. The body is the same
on every try: Lago deduplicates by `transaction_id` + `external_subscription_id` (its Postgres
store, for good) and also by `timestamp` + `code` (its ClickHouse store), so a changed
timestamp would bill again.

A batch is atomic: one invalid event makes Lago refuse all of it (422) and store nothing. The
422's `error_details` name the failing events by index: a duplicate (`transaction_id:
value_already_exist`, the Postgres store's answer to an event it already holds) is delivered,
another error is dead with Lago's words, and the others are sent again without them; when the
answer names none, the batch is halved until each bad event is alone (`_http.isolate`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from meter_grpc.config import OWN_COUNTER, LagoExport
from meter_grpc.domain.clock import Clock
from meter_grpc.export.model import ExportEvent, Outcome
from meter_grpc.export.sinks._http import Answer, HttpSink, Refused, dead, isolate, one_line

MAX_BATCH = 100  # Lago's limit per call (LAGO_EVENTS_BATCH_MAX_LENGTH on its side)
DUPLICATE = "value_already_exist"


def lago_timestamp(time_ms: int) -> str:
    """Unix seconds with the milliseconds as decimals, as a string (Lago reads it with
    BigDecimal): exact, and the same on every try."""
    seconds, ms = divmod(time_ms, 1000)
    return f"{seconds}.{ms:03d}"


class LagoSink(HttpSink):
    name = "lago"
    max_batch = MAX_BATCH
    env_prefix = "METER_EXPORT_LAGO"

    def __init__(self, config: LagoExport, *, timeout_s: float, clock: Clock) -> None:
        super().__init__(timeout_s=timeout_s, clock=clock)
        self._config = config
        self._url = f"{config.url}/api/v1/events/batch"
        self._headers = {
            "Authorization": f"Bearer {config.api_key}",
            "Content-Type": "application/json",
        }

    def body(self, event: ExportEvent) -> dict[str, Any]:
        meter = event.meter or OWN_COUNTER
        subscription = event.license_metadata.get(self._config.subscription_key)
        return {
            "transaction_id": event.id,
            "external_subscription_id": subscription or event.license_id,
            "code": self._config.codes.get(meter, meter),
            "timestamp": lago_timestamp(event.time_ms),
            "properties": {"delta": event.delta, "uses": event.uses},
        }

    async def deliver(self, events: Sequence[ExportEvent]) -> list[Outcome]:
        return await isolate(events, self._send)

    async def _send(self, batch: Sequence[ExportEvent]) -> Outcome | Refused:
        data = json.dumps({"events": [self.body(e) for e in batch]}, separators=(",", ":"))
        answer = await self.request(self._url, headers=self._headers, data=data.encode())
        if isinstance(answer, Outcome):
            return answer
        if answer.ok:
            return Outcome.delivered()
        return self.not_taken(answer) or Refused(answer.reason, _per_event(answer, len(batch)))


def _per_event(answer: Answer, n: int) -> dict[int, Outcome]:
    """What a 422 says of each event: `error_details` keyed by the event's index in the batch
    (`{"0": {"transaction_id": ["value_already_exist"]}}`), or for a batch of one, the event's
    own errors (`{"transaction_id": [...]}`)."""
    try:
        details = json.loads(answer.body).get("error_details")
    except (ValueError, AttributeError):
        return {}
    if not isinstance(details, dict) or not details:
        return {}
    if all(str(k).isdigit() for k in details):
        errors = {int(k): v for k, v in details.items() if int(k) < n}
    elif n == 1:
        errors = {0: details}
    else:
        return {}
    return {
        i: Outcome.delivered()
        if _is_duplicate(err)
        else dead(f"HTTP {answer.status}: {one_line(json.dumps(err, sort_keys=True))}")
        for i, err in errors.items()
    }


def _is_duplicate(errors: object) -> bool:
    """Only `transaction_id: value_already_exist`: Lago already holds this event."""
    if not isinstance(errors, Mapping) or set(errors) != {"transaction_id"}:
        return False
    value = errors["transaction_id"]
    codes = value if isinstance(value, list) else [value]
    return bool(codes) and all(c == DUPLICATE for c in codes)
