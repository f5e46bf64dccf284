"""Local stand-ins for the billing systems usage is exported to, for tests: each an aiohttp.web
server on a real port (127.0.0.1) that enforces that system's documented contract (from the
research notes on Lago, m3ter, OpenMeter and Stripe Meters) and keeps what it was sent.

Every emulator (`await Emu(...).start()`, then `emu.url` is its base URL; `await emu.close()`)
takes these faults, drawn per call from `random.Random(seed)`:

- `throttle_rate`: answer 429 before reading the call, with the system's reset headers
  (`throttle_s`, default 1, is the wait they announce);
- `fail_rate`: answer 503 before reading the call (nothing kept);
- `lost_rate`: take the call (keep its events), then cut the connection instead of
  answering: the client does not know whether it was taken.
- `latency_s`: every answer comes this much later (a distant billing system);
- `await emu.down()`: stop listening (connections refused) and cut the open ones;
  `await emu.up()`: listen again on the same port.

Counters: `emu.calls`, `emu.statuses` (Counter of answered statuses), `emu.lost` (calls
taken but not answered), `emu.cut` (calls cut while down). `emu.held_events()`: (event id
as the system's dedup key, signed delta) per event held, the same form for every system. `emu.faults_off()` stops drawing
faults (to drain at the end of a test).

What each keeps, by its dedup key, and its own rules:

- `LagoEmulator(api_key, store="postgres"|"clickhouse", invalid_subscriptions=(),
  max_batch=100)`: `POST /api/v1/events/batch`, Bearer key (else 401), JSON `{"events": [...]}`
  (0 -> 422 no_events, > max_batch -> 422 too_many_events). Each event needs
  transaction_id, external_subscription_id, code (strings), a Unix-seconds timestamp
  (number or numeric string; else 422 timestamp invalid_format) and properties (an object of
  numbers/strings). Atomic: any bad event -> 422 `validation_errors` with `error_details`
  keyed by index, nothing kept. postgres: `(external_subscription_id, transaction_id)` kept
  once, a repeat is 422 `transaction_id: value_already_exist`; clickhouse: keyed by
  `(transaction_id, timestamp, external_subscription_id, code)`, a repeat replaces (200).
  `held` maps key -> event; `double_billed()` lists transaction_ids held under two keys.
  `invalid_subscriptions`: events for these are refused (`value_is_invalid`), standing for
  any per-event validation error (e.g. a billable metric's failing expression). Stricter
  than Lago on purpose: an event without a timestamp is refused (Lago would take the time of
  receipt, so each try of it would be a new event to its ClickHouse store).
- `M3terEmulator(org_id, access_key_id, api_secret, token_ttl_s=3600, invalid_accounts=())`:
  `POST /oauth/token` (`emu.token_url`; Basic key:secret, `grant_type=client_credentials`;
  else 401/400) gives `{access_token, expires_in, token_type}`; `POST
  /organizations/{org}/measurements` needs a live Bearer token (else 403, as for an expired
  one), a JSON body under 512,000 bytes (else 403), 1-1000 measurements each with meter,
  account, ISO-8601 ts, a uid and a numeric measure (else 400, nothing kept: taken as
  atomic; `uid` is optional at m3ter, required here so that nothing arrives without its
  dedup key). `held` maps uid -> measurement, a repeated uid is taken (200) and kept once;
  `bodies` lists the size of each body taken; `expire_tokens()` expires every token given.
- `OpenMeterEmulator(token, invalid_subjects=(), dedupe=True)`: `POST /api/v1/events`,
  Bearer token (else 401), content type `application/cloudevents+json` (one event),
  `application/cloudevents-batch+json` (an array) or `application/json` (either), else 400.
  CloudEvents 1.0: specversion "1.0", id, source, type, subject (non-empty strings), time
  RFC 3339 or null, data an object or null. Not atomic: events are taken in order until the
  first bad one (400, the earlier ones kept). `held` maps (source, id) -> event; with
  `dedupe=False` a repeat is kept again (`double_billed()`). 204 on success.
- `StripeEmulator(api_key, customers=None, now_ms=None)`: `POST /v1/billing/meter_events`,
  Bearer or Basic secret key (else 401), form-encoded event_name, payload[stripe_customer_id]
  (one of `customers` when given, else 400 resource_missing), payload[value] (a whole
  number), identifier (optional at Stripe, required here: the dedup key), timestamp (Unix
  seconds within the past 35 days or 5 minutes ahead of `now_ms()`, else 400). One call at a
  time per customer and event_name (a concurrent one is 429, `concurrent_refusals`).
  `identifier` kept for 24 h: a repeat inside is 400, after it the event is kept again
  (`double_billed()`). `Idempotency-Key`: a repeat within 24 h replays the first 200
  (`replays`). `held` maps identifier -> the event's form.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import math
import random
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _rfc3339(v: object) -> bool:
    if not isinstance(v, str) or not re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", v):
        return False
    try:
        datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


class Emulator:
    routes: list[tuple[str, str, str]] = []  # (method, path, handler attribute)

    def __init__(
        self,
        *,
        throttle_rate: float = 0.0,
        fail_rate: float = 0.0,
        lost_rate: float = 0.0,
        throttle_s: float = 1.0,
        latency_s: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.throttle_rate, self.fail_rate, self.lost_rate = throttle_rate, fail_rate, lost_rate
        self.throttle_s, self.latency_s = throttle_s, latency_s
        self.random = random.Random(seed)
        self.calls = 0
        self.statuses: collections.Counter[int] = collections.Counter()
        self.lost = 0
        self.cut = 0
        self.is_down = False
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def faults_off(self) -> None:
        self.throttle_rate = self.fail_rate = self.lost_rate = 0.0

    async def start(self) -> Any:
        app = web.Application(middlewares=[self._faults], client_max_size=4 * 1024 * 1024)
        for method, path, attr in self.routes:
            app.router.add_route(method, path, getattr(self, attr))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await self.up()
        return self

    async def up(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()
        if not self.port:
            self.port = self._runner.addresses[0][1]
        self.is_down = False

    async def down(self) -> None:
        self.is_down = True
        if self._site is not None:
            await self._site.stop()
            self._site = None

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def throttle_headers(self) -> dict[str, str]:
        return {}

    def held_events(self) -> list[tuple[str, int]]:
        """(event id as the system's dedup key, signed delta) of every event held, one pair
        per entry held (so an event held twice shows twice)."""
        raise NotImplementedError

    @web.middleware
    async def _faults(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.is_down:  # a connection kept alive from before: cut it
            self.cut += 1
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError
        self.calls += 1
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        draw = self.random.random()
        if draw < self.throttle_rate:
            response: web.StreamResponse = _json(
                429, {"error": "Too Many Requests"}, self.throttle_headers()
            )
        elif draw < self.throttle_rate + self.fail_rate:
            response = _json(503, {"error": "Service Unavailable"})
        else:
            response = await handler(request)
            if response.status < 300 and self.random.random() < self.lost_rate:
                self.lost += 1
                assert request.transport is not None
                request.transport.abort()
                raise asyncio.CancelledError
        self.statuses[response.status] += 1
        return response


# --- Lago ---------------------------------------------------------------------------------


class LagoEmulator(Emulator):
    routes = [("POST", "/api/v1/events/batch", "_batch")]

    def __init__(
        self,
        api_key: str = "lago-test-key",
        *,
        store: str = "postgres",
        invalid_subscriptions: Iterable[str] = (),
        max_batch: int = 100,
        **faults: Any,
    ) -> None:
        super().__init__(**faults)
        assert store in ("postgres", "clickhouse")
        self.api_key, self.store, self.max_batch = api_key, store, max_batch
        self.invalid_subscriptions = set(invalid_subscriptions)
        self.held: dict[tuple[str, ...], dict[str, Any]] = {}
        self.duplicates = 0  # repeats answered value_already_exist (postgres)

    def throttle_headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": "500",
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": f"{self.throttle_s:g}",
        }

    def key(self, e: dict[str, Any]) -> tuple[str, ...]:
        if self.store == "postgres":
            return (e["external_subscription_id"], e["transaction_id"])
        ts = str(Decimal(str(e["timestamp"])))
        return (e["transaction_id"], ts, e["external_subscription_id"], e["code"])

    def held_events(self) -> list[tuple[str, int]]:
        return [(e["transaction_id"], e["properties"]["delta"]) for e in self.held.values()]

    def double_billed(self) -> list[str]:
        seen = collections.Counter(e["transaction_id"] for e in self.held.values())
        return [t for t, n in seen.items() if n > 1]

    @staticmethod
    def _error(status: int, details: dict[str, Any]) -> web.Response:
        return _json(
            status,
            {
                "status": status,
                "error": "Unprocessable Entity",
                "code": "validation_errors",
                "error_details": details,
            },
        )

    def _check(self, e: object) -> dict[str, list[str]]:
        if not isinstance(e, dict):
            return {"event": ["invalid_format"]}
        errors: dict[str, list[str]] = {}
        for name in ("transaction_id", "external_subscription_id", "code"):
            if not isinstance(e.get(name), str) or not e[name]:
                errors[name] = ["value_is_mandatory"]
        ts = e.get("timestamp")
        if ts is not None:
            try:
                if isinstance(ts, bool) or not Decimal(str(ts)).is_finite():
                    raise InvalidOperation
            except InvalidOperation:
                errors["timestamp"] = ["invalid_format"]
        else:  # accepted by Lago, but then each try is a new time: refused here
            errors["timestamp"] = ["value_is_mandatory"]
        props = e.get("properties", {})
        if not isinstance(props, dict) or not all(
            _is_number(v) or isinstance(v, str) for v in props.values()
        ):
            errors["properties"] = ["invalid_format"]
        if e.get("external_subscription_id") in self.invalid_subscriptions:
            errors["external_subscription_id"] = ["value_is_invalid"]
        return errors

    async def _batch(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _json(401, {"status": 401, "error": "Unauthorized", "code": "unauthorized"})
        if request.content_type != "application/json":
            return _json(400, {"status": 400, "error": "BadRequest: content type"})
        try:
            events = (await request.json())["events"]
            assert isinstance(events, list)
        except (ValueError, KeyError, TypeError, AssertionError):
            return _json(400, {"status": 400, "error": "BadRequest: events is missing"})
        if not events:
            return self._error(422, {"events": ["no_events"]})
        if len(events) > self.max_batch:
            return self._error(422, {"events": ["too_many_events"]})
        details: dict[str, Any] = {}
        batch: dict[tuple[str, ...], dict[str, Any]] = {}
        for i, e in enumerate(events):
            errors = self._check(e)
            if not errors:
                key = self.key(e)
                if self.store == "postgres" and key in self.held:
                    errors = {"transaction_id": ["value_already_exist"]}
                    self.duplicates += 1
                else:
                    batch.setdefault(key, e)  # a repeat within the payload is one event
            if errors:
                details[str(i)] = errors
        if details:  # atomic: nothing kept
            return self._error(422, details)
        self.held.update(batch)
        return _json(200, {"events": [{"lago_id": secrets.token_hex(8), **e} for e in events]})


# --- m3ter --------------------------------------------------------------------------------

M3TER_MAX_BYTES = 512_000


class M3terEmulator(Emulator):
    routes = [
        ("POST", "/oauth/token", "_token"),
        ("POST", "/organizations/{org}/measurements", "_measurements"),
    ]

    def __init__(
        self,
        org_id: str = "org-test",
        access_key_id: str = "ak-test",
        api_secret: str = "secret-test",
        *,
        token_ttl_s: float = 3600.0,
        invalid_accounts: Iterable[str] = (),
        **faults: Any,
    ) -> None:
        super().__init__(**faults)
        self.org_id, self.access_key_id, self.api_secret = org_id, access_key_id, api_secret
        self.token_ttl_s = token_ttl_s
        self.invalid_accounts = set(invalid_accounts)
        self.tokens: dict[str, float] = {}  # token -> expiry (time.monotonic())
        self.tokens_issued = 0
        self.expired_refusals = 0
        self.oversize_refusals = 0
        self.bodies: list[int] = []  # the size of every body taken
        self.held: dict[str, dict[str, Any]] = {}

    def held_events(self) -> list[tuple[str, int]]:
        return [(uid, m["measure"]["delta"]) for uid, m in self.held.items()]

    def double_billed(self) -> list[str]:
        """Always empty: m3ter keeps a uid once (for 35 days), as `held` does."""
        return []

    @property
    def token_url(self) -> str:
        return f"{self.url}/oauth/token"

    def expire_tokens(self) -> None:
        self.tokens = dict.fromkeys(self.tokens, 0.0)

    async def _token(self, request: web.Request) -> web.Response:
        basic = base64.b64encode(f"{self.access_key_id}:{self.api_secret}".encode()).decode()
        if request.headers.get("Authorization") != f"Basic {basic}":
            return _json(401, {"error": "invalid_client"})
        form = await request.post()
        if form.get("grant_type") != "client_credentials":
            return _json(400, {"error": "unsupported_grant_type"})
        token = secrets.token_urlsafe(24)
        self.tokens[token] = time.monotonic() + self.token_ttl_s
        self.tokens_issued += 1
        return _json(
            200, {"access_token": token, "expires_in": self.token_ttl_s, "token_type": "bearer"}
        )

    def _check(self, m: object) -> str | None:
        if not isinstance(m, dict):
            return "measurement is not an object"
        for name in ("uid", "meter", "account"):
            if not isinstance(m.get(name), str) or not m[name]:
                return f"{name} is required"
        if not _rfc3339(m.get("ts")):
            return "ts is not an ISO-8601 date-time"
        measure = m.get("measure")
        if not isinstance(measure, dict) or not all(_is_number(v) for v in measure.values()):
            return "measure must map field codes to numbers"
        if m["account"] in self.invalid_accounts:
            return f"account {m['account']} is not valid"
        return None

    async def _measurements(self, request: web.Request) -> web.Response:
        if request.match_info["org"] != self.org_id:
            return _json(404, {"message": "Not Found"})
        auth = request.headers.get("Authorization", "")
        expiry = (
            self.tokens.get(auth.removeprefix("Bearer ")) if auth.startswith("Bearer ") else None
        )
        if expiry is None or expiry <= time.monotonic():
            self.expired_refusals += expiry is not None
            return _json(403, {"message": "Forbidden"})
        body = await request.read()
        if len(body) >= M3TER_MAX_BYTES:
            self.oversize_refusals += 1
            return _json(403, {"message": "Request entity too large"})
        if request.content_type != "application/json":
            return _json(400, {"message": "content type must be application/json"})
        try:
            measurements = json.loads(body)["measurements"]
            assert isinstance(measurements, list)
        except (ValueError, KeyError, TypeError, AssertionError):
            return _json(400, {"message": "measurements is required"})
        if not 1 <= len(measurements) <= 1000:
            return _json(400, {"message": "measurements must hold 1 to 1000 items"})
        for i, m in enumerate(measurements):
            why = self._check(m)
            if why:
                return _json(400, {"message": f"measurements[{i}]: {why}"})
        for m in measurements:
            self.held.setdefault(m["uid"], m)
        self.bodies.append(len(body))
        return _json(200, {"result": "accepted"})


# --- OpenMeter ----------------------------------------------------------------------------

CLOUDEVENTS = "application/cloudevents+json"
CLOUDEVENTS_BATCH = "application/cloudevents-batch+json"


class OpenMeterEmulator(Emulator):
    routes = [("POST", "/api/v1/events", "_events")]

    def __init__(
        self,
        token: str = "om-test-token",
        *,
        invalid_subjects: Iterable[str] = (),
        dedupe: bool = True,
        **faults: Any,
    ) -> None:
        super().__init__(**faults)
        self.token, self.dedupe = token, dedupe
        self.invalid_subjects = set(invalid_subjects)
        self.held: dict[tuple[str, str], dict[str, Any]] = {}
        self.repeats: list[tuple[str, str]] = []  # kept again (dedupe off)
        self.partial_batches = 0  # refused batches whose first events were kept

    def throttle_headers(self) -> dict[str, str]:
        reset = int(time.time() + self.throttle_s)
        return {
            "Retry-After": f"{self.throttle_s:g}",
            "X-RateLimit-Limit": "100",
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": str(reset),
        }

    def double_billed(self) -> list[tuple[str, str]]:
        return list(self.repeats)

    def held_events(self) -> list[tuple[str, int]]:
        out = [(e["id"], e["data"]["delta"]) for e in self.held.values()]
        return out + [(i, self.held[(s, i)]["data"]["delta"]) for s, i in self.repeats]

    def _check(self, e: object) -> str | None:
        if not isinstance(e, dict):
            return "event is not an object"
        if e.get("specversion") != "1.0":
            return "specversion must be 1.0"
        for name in ("id", "source", "type", "subject"):
            if not isinstance(e.get(name), str) or not e[name]:
                return f"{name} is required"
        if e.get("time") is not None and not _rfc3339(e["time"]):
            return "time is not RFC 3339"
        if e.get("data") is not None and not isinstance(e["data"], dict):
            return "data must be an object"
        if e["subject"] in self.invalid_subjects:
            return f"subject {e['subject']} is not valid"
        return None

    @staticmethod
    def _bad(detail: str) -> web.Response:
        return _json(
            400, {"type": "about:blank", "title": "Bad Request", "status": 400, "detail": detail}
        )

    async def _events(self, request: web.Request) -> web.Response:
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return _json(401, {"title": "Unauthorized", "status": 401})
        kind = request.content_type
        if kind not in (CLOUDEVENTS, CLOUDEVENTS_BATCH, "application/json"):
            return self._bad("invalid content type")
        try:
            body = await request.json()
        except ValueError:
            return self._bad("invalid JSON")
        if kind == CLOUDEVENTS_BATCH and not isinstance(body, list):
            return self._bad("a batch must be an array")
        if kind == CLOUDEVENTS and not isinstance(body, dict):
            return self._bad("an event must be an object")
        events = body if isinstance(body, list) else [body]
        for i, e in enumerate(events):
            why = self._check(e)
            if why:
                self.partial_batches += i > 0
                return self._bad(f"event {i}: {why}")
            key = (e["source"], e["id"])
            if key in self.held:
                if not self.dedupe:
                    self.repeats.append(key)
                continue
            self.held[key] = e
        return web.Response(status=204)


# --- Stripe -------------------------------------------------------------------------------

STRIPE_DAY_MS = 86_400_000


class StripeEmulator(Emulator):
    routes = [("POST", "/v1/billing/meter_events", "_meter_event")]

    def __init__(
        self,
        api_key: str = "sk_test_emulator",
        *,
        customers: Iterable[str] | None = None,
        now_ms: Callable[[], int] | None = None,
        **faults: Any,
    ) -> None:
        super().__init__(**faults)
        self.api_key = api_key
        self.customers = None if customers is None else set(customers)
        self.now_ms = now_ms or (lambda: time.time_ns() // 1_000_000)
        self.held: dict[str, dict[str, str]] = {}
        self.held_at: dict[str, int] = {}  # identifier -> when kept (now_ms)
        self.repeats: list[str] = []  # identifiers kept again after their 24 h
        self.idempotent: dict[
            str, tuple[int, dict[str, str], int]
        ] = {}  # key -> (at, form, status)
        self.replays = 0
        self.in_flight: set[tuple[str, str]] = set()
        self.concurrent_refusals = 0

    def double_billed(self) -> list[str]:
        return list(self.repeats)

    def held_events(self) -> list[tuple[str, int]]:
        """payload[value] is the delta (METER_EXPORT_STRIPE_VALUE=delta, the default)."""
        out = [(i, int(f["payload[value]"])) for i, f in self.held.items()]
        return out + [(i, int(self.held[i]["payload[value]"])) for i in self.repeats]

    def throttle_headers(self) -> dict[str, str]:
        return {"Retry-After": f"{self.throttle_s:g}"}

    @staticmethod
    def _error(status: int, message: str, code: str = "", param: str = "") -> web.Response:
        error = {"type": "invalid_request_error", "message": message}
        if code:
            error["code"] = code
        if param:
            error["param"] = param
        return _json(status, {"error": error})

    def _authorized(self, header: str) -> bool:
        if header == f"Bearer {self.api_key}":
            return True
        basic = base64.b64encode(f"{self.api_key}:".encode()).decode()
        return header == f"Basic {basic}"

    async def _meter_event(self, request: web.Request) -> web.Response:
        if not self._authorized(request.headers.get("Authorization", "")):
            return self._error(401, "Invalid API Key provided")
        if request.content_type != "application/x-www-form-urlencoded":
            return self._error(400, "form-encoded body expected")
        form = {k: str(v) for k, v in (await request.post()).items()}
        now = self.now_ms()
        key = request.headers.get("Idempotency-Key", "")
        while self.idempotent:  # kept in the order taken: the expired ones come first
            first = next(iter(self.idempotent))
            if now - self.idempotent[first][0] < STRIPE_DAY_MS:
                break
            del self.idempotent[first]
        if key in self.idempotent:
            _, first, status = self.idempotent[key]
            if first != form:
                return self._error(
                    400,
                    "Keys for idempotent requests can only be used with the same parameters",
                    "idempotency_key_in_use",
                )
            self.replays += 1
            return _json(status, {"object": "billing.meter_event", **first})
        why = self._invalid(form, now)
        if why:
            return why
        lane = (form["payload[stripe_customer_id]"], form["event_name"])
        if lane in self.in_flight:
            self.concurrent_refusals += 1
            return self._error(429, "one call at a time per customer and meter", "rate_limit")
        self.in_flight.add(lane)
        try:
            await asyncio.sleep(0)
            identifier = form["identifier"]
            kept = self.held_at.get(identifier)
            if kept is not None and now - kept < STRIPE_DAY_MS:
                return self._error(
                    400, f"An event with identifier {identifier} already exists", param="identifier"
                )
            if kept is not None:
                self.repeats.append(identifier)
            self.held[identifier] = form
            self.held_at[identifier] = now
            if key:
                self.idempotent[key] = (now, form, 200)
            return _json(200, {"object": "billing.meter_event", **form})
        finally:
            self.in_flight.discard(lane)

    def _invalid(self, form: dict[str, str], now: int) -> web.Response | None:
        for name in ("event_name", "payload[stripe_customer_id]", "payload[value]", "identifier"):
            if not form.get(name):
                return self._error(
                    400, f"Missing required param: {name}.", "parameter_missing", name
                )
        if len(form["event_name"]) > 100:
            return self._error(400, "event_name is longer than 100 characters", param="event_name")
        if not re.fullmatch(r"-?[0-9]+", form["payload[value]"]):
            return self._error(400, "payload[value] must be a whole number", param="payload[value]")
        customer = form["payload[stripe_customer_id]"]
        if self.customers is not None and customer not in self.customers:
            return self._error(400, f"No such customer: '{customer}'", "resource_missing")
        ts = form.get("timestamp", "")
        if ts:
            if not ts.isdigit():
                return self._error(400, "Invalid integer: timestamp", param="timestamp")
            at = int(ts) * 1000
            if at < now - 35 * STRIPE_DAY_MS or at > now + 5 * 60_000:
                return self._error(
                    400,
                    "timestamp must be within the past 35 calendar days or up to 5 minutes in the future",
                    param="timestamp",
                )
        return None
