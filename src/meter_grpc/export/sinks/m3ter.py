"""m3ter: measurements to `POST <url>/organizations/<org id>/measurements`, at most 1,000 per
call and under 512,000 bytes of body (m3ter answers 403 beyond that).

Each measurement is `{"uid": <event id>, "meter": <the meter code, `uses` for the license's
own counter, through METER_EXPORT_M3TER_METERS>, "account": <the license's metadata value
under METER_EXPORT_M3TER_ACCOUNT_KEY, else the license id>, "ts": <RFC 3339 time of the
change>, "measure": {"delta": <signed change>, "uses": <count after>}}`: the m3ter meter's
MEASURE data fields are `delta` (aggregate with SUM) and `uses` (LATEST). m3ter deduplicates by
`uid` for 35 days, so a batch is resent whole and a refused batch is halved until each bad
measurement is alone (`_http.isolate`); one measurement too big to send alone is dead unsent.

Authentication is OAuth2 client credentials: `POST <token url>` with `Basic
base64(<access key id>:<api secret>)` and `grant_type=client_credentials` gives a bearer token
for `expires_in` seconds; it is kept and fetched again a minute (or a tenth of its life)
before it expires. m3ter answers 403 to an expired token: the token is fetched again once and
the call repeated; a 403 after that is a configuration error (retried, logged).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from meter_grpc.config import OWN_COUNTER, M3terExport
from meter_grpc.domain.clock import Clock
from meter_grpc.export.model import ExportEvent, Outcome, Verdict
from meter_grpc.export.sinks._http import (
    Answer,
    HttpSink,
    Refused,
    dead,
    isolate,
    retry,
    rfc3339,
)

MAX_BATCH = 1000  # measurements per call
MAX_BYTES = 512_000  # a body must be smaller than this
TOKEN_MARGIN_S = 60.0  # a token is renewed this long before it expires (or 1/10 of its life)
_OPEN, _SEP, _CLOSE = b'{"measurements":[', b",", b"]}"


class M3terSink(HttpSink):
    name = "m3ter"
    max_batch = MAX_BATCH
    env_prefix = "METER_EXPORT_M3TER"

    def __init__(self, config: M3terExport, *, timeout_s: float, clock: Clock) -> None:
        super().__init__(timeout_s=timeout_s, clock=clock)
        self._config = config
        self._url = f"{config.url}/organizations/{quote(config.org_id, safe='')}/measurements"
        basic = base64.b64encode(f"{config.access_key_id}:{config.api_secret}".encode())
        self._token_headers = {
            "Authorization": f"Basic {basic.decode()}",
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
        }
        self._token = ""
        self._token_renew_at = 0.0  # time.monotonic()
        self.tokens_fetched = 0

    def measurement(self, event: ExportEvent) -> dict[str, Any]:
        meter = event.meter or OWN_COUNTER
        account = event.license_metadata.get(self._config.account_key)
        return {
            "uid": event.id,
            "meter": self._config.meters.get(meter, meter),
            "account": account or event.license_id,
            "ts": rfc3339(event.time_ms),
            "measure": {"delta": event.delta, "uses": event.uses},
        }

    def encode(self, event: ExportEvent) -> bytes:
        return json.dumps(self.measurement(event), separators=(",", ":")).encode()

    async def deliver(self, events: Sequence[ExportEvent]) -> list[Outcome]:
        """Cut into bodies under MAX_BYTES, sent one after another until one is retried."""
        encoded = {e.id: self.encode(e) for e in events}
        outcomes: list[Outcome | None] = [None] * len(events)
        chunks: list[list[int]] = []
        size = 0  # of the last chunk's body
        for i, event in enumerate(events):
            item = len(encoded[event.id])
            if len(_OPEN) + item + len(_CLOSE) >= MAX_BYTES:  # too big even alone
                outcomes[i] = dead(
                    f"measurement of {item} bytes: m3ter takes bodies under {MAX_BYTES} bytes"
                )
            elif chunks and len(chunks[-1]) < MAX_BATCH and size + len(_SEP) + item < MAX_BYTES:
                chunks[-1].append(i)
                size += len(_SEP) + item
            else:
                chunks.append([i])
                size = len(_OPEN) + item + len(_CLOSE)

        async def send(batch: Sequence[ExportEvent]) -> Outcome | Refused:
            return await self._send(batch, encoded)

        for chunk in chunks:
            results = await isolate([events[i] for i in chunk], send)
            for i, outcome in zip(chunk, results, strict=True):
                outcomes[i] = outcome
            stop = next((o for o in results if o.verdict is Verdict.RETRY), None)
            if stop is not None:
                return [o or stop.unsent() for o in outcomes]
        return [o or retry("not sent").unsent() for o in outcomes]

    async def _send(
        self, batch: Sequence[ExportEvent], encoded: dict[str, bytes]
    ) -> Outcome | Refused:
        data = _OPEN + _SEP.join(encoded[e.id] for e in batch) + _CLOSE
        answer: Answer | Outcome | None = None
        for fresh in (False, True):
            token = await self._bearer(renew=fresh)
            if isinstance(token, Outcome):
                return token
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
            answer = await self.request(self._url, headers=headers, data=data)
            if isinstance(answer, Outcome):
                return answer
            if answer.status != 403 or fresh:
                break
        assert isinstance(answer, Answer)
        if answer.ok:
            return _accepted(answer)
        return self.not_taken(answer) or Refused(answer.reason)

    async def _bearer(self, *, renew: bool) -> str | Outcome:
        """The kept token, or a new one (when asked, or when it is about to expire)."""
        if self._token and not renew and time.monotonic() < self._token_renew_at:
            return self._token
        self._token = ""
        answer = await self.request(
            self._config.token_url,
            headers=self._token_headers,
            data=b"grant_type=client_credentials",
        )
        if isinstance(answer, Outcome):
            return retry(f"token: {answer.reason}")
        if not answer.ok:
            outcome = self.not_taken(answer)
            if outcome is None:  # 400 invalid_client and the like: the credentials
                self.config_error(f"token: {answer.reason}")
                return retry(f"token: {answer.reason}")
            return retry(f"token: {outcome.reason}", outcome.retry_after_s)
        try:
            reply = json.loads(answer.body)
            token, life = reply["access_token"], float(reply.get("expires_in", 0))
        except (ValueError, KeyError, TypeError, AttributeError):
            return retry(f"token: not a token answer: {answer.reason}")
        if not isinstance(token, str) or not token:
            return retry("token: the answer has no access_token")
        self._token = token
        self._token_renew_at = time.monotonic() + life - min(TOKEN_MARGIN_S, life / 10)
        self.tokens_fetched += 1
        return token


def _accepted(answer: Answer) -> Outcome:
    """m3ter answers `{"result": "accepted"}`; a 2xx that says otherwise is tried again (the
    uid makes that safe)."""
    try:
        reply = json.loads(answer.body) if answer.body.strip() else {}
    except ValueError:
        return Outcome.delivered()
    result = reply.get("result") if isinstance(reply, dict) else None
    if result is None or str(result).lower() == "accepted":
        return Outcome.delivered()
    return retry(f"not accepted: {answer.reason}")
