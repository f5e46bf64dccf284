"""OpenMeter: CloudEvents batches to `POST <url>/api/v1/events`
(`Content-Type: application/cloudevents-batch+json`, a JSON array), at most 100 per call.

Each event is `{"specversion": "1.0", "id": <event id>, "source": METER_EXPORT_OPENMETER_SOURCE,
"type": <METER_EXPORT_OPENMETER_TYPES for its meter, else METER_EXPORT_OPENMETER_TYPE>,
"subject": <the license's metadata value under METER_EXPORT_OPENMETER_SUBJECT_KEY, else the
license id>, "time": <RFC 3339>, "data": {"delta", "uses", "meter", "license_id"}}`, with
`Authorization: Bearer <METER_EXPORT_OPENMETER_TOKEN>` when a token is set. A meter sums
`$.delta` (or takes the LATEST `$.uses`) and may group by `$.meter`.

A batch is not atomic: OpenMeter takes the events in order and stops at the first bad one,
the earlier ones kept. So a refused batch (400) is halved until each bad event is alone
(`_http.isolate`), and every resend, after a refusal or a 5xx or a timeout, relies on
OpenMeter's deduplication by `source` + `id` (32 days on OpenMeter Cloud; self-hosted, it is
off unless `dedupe.enabled` with the redis driver, and must be on).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from meter_grpc.config import OWN_COUNTER, OpenMeterExport
from meter_grpc.domain.clock import Clock
from meter_grpc.export.model import ExportEvent, Outcome
from meter_grpc.export.sinks._http import HttpSink, Refused, isolate, rfc3339

MAX_BATCH = 100  # ours: OpenMeter states no limit
CONTENT_TYPE = "application/cloudevents-batch+json"


class OpenMeterSink(HttpSink):
    name = "openmeter"
    max_batch = MAX_BATCH
    env_prefix = "METER_EXPORT_OPENMETER"

    def __init__(self, config: OpenMeterExport, *, timeout_s: float, clock: Clock) -> None:
        super().__init__(timeout_s=timeout_s, clock=clock)
        self._config = config
        self._url = f"{config.url}/api/v1/events"
        self._headers = {"Content-Type": CONTENT_TYPE}
        if config.token:
            self._headers["Authorization"] = f"Bearer {config.token}"

    def cloudevent(self, event: ExportEvent) -> dict[str, Any]:
        meter = event.meter or OWN_COUNTER
        subject = event.license_metadata.get(self._config.subject_key)
        return {
            "specversion": "1.0",
            "id": event.id,
            "source": self._config.source,
            "type": self._config.types.get(meter, self._config.type),
            "subject": subject or event.license_id,
            "time": rfc3339(event.time_ms),
            "data": {
                "delta": event.delta,
                "uses": event.uses,
                "meter": event.meter,
                "license_id": event.license_id,
            },
        }

    async def deliver(self, events: Sequence[ExportEvent]) -> list[Outcome]:
        return await isolate(events, self._send)

    async def _send(self, batch: Sequence[ExportEvent]) -> Outcome | Refused:
        data = json.dumps([self.cloudevent(e) for e in batch], separators=(",", ":"))
        answer = await self.request(self._url, headers=self._headers, data=data.encode())
        if isinstance(answer, Outcome):
            return answer
        if answer.ok:  # 204 (v1), 202 (v3): no body, nothing reported per event
            return Outcome.delivered()
        return self.not_taken(answer) or Refused(answer.reason)
