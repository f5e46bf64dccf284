"""The billing sinks against local servers that enforce each system's contract
(tests/billing_emulators.py): generated increments, decrements and resets delivered in many
batches while the server fails 30% of calls (429 with reset headers, 503, calls taken but
never answered) and is down for a stretch, retried per Outcome by a small loop standing in for
the exporter. Every event ends held exactly once by the system's dedup key, the deltas held per
license sum to the counter, bad events are dead with a clear reason and the good ones of their
batch delivered."""

from __future__ import annotations

import asyncio
import logging
import random
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from aiohttp import web

from meter_grpc.config import (
    ConfigError,
    LagoExport,
    M3terExport,
    OpenMeterExport,
    Settings,
    StripeExport,
)
from meter_grpc.domain.clock import ManualClock
from meter_grpc.export.model import ExportEvent, Kind, Outcome, Sink, Verdict
from meter_grpc.export.sinks import (
    LagoSink,
    M3terSink,
    OpenMeterSink,
    StripeSink,
    build_sinks,
)
from meter_grpc.export.sinks._http import Answer, HttpSink, Refused, isolate, retry_after
from meter_grpc.export.sinks._http import dead as dead_outcome
from tests.billing_emulators import (
    M3TER_MAX_BYTES,
    Emulator,
    LagoEmulator,
    M3terEmulator,
    OpenMeterEmulator,
    StripeEmulator,
)

DAY_MS = 86_400_000
THROTTLE_S = 0.05  # what the emulators' 429s announce (and the driver waits)
FAULTS = {"throttle_rate": 0.1, "fail_rate": 0.15, "lost_rate": 0.05, "throttle_s": THROTTLE_S}


# --- generated usage ----------------------------------------------------------------------


@dataclass(frozen=True)
class License:
    id: str
    metadata: dict[str, str]
    bad: bool = False  # its billing-side ids are ones the emulators refuse


def licenses(n: int) -> list[License]:
    """n good licenses (the last two without metadata: ids fall back to the license id),
    plus one whose billing-side ids every emulator refuses."""
    out = []
    for i in range(n):
        metadata = {
            "external_subscription_id": f"sub_{i}",
            "m3ter_account": f"acct_{i}",
            "openmeter_subject": f"cust_{i}",
            "stripe_customer_id": f"cus_{i}",
        }
        out.append(License(f"lic-{i:03d}", metadata if i < n - 2 else {}))
    bad = {
        "external_subscription_id": "sub_bad",
        "m3ter_account": "acct_bad",
        "openmeter_subject": "cust_bad",
        "stripe_customer_id": "cus_bad",
    }
    out.append(License("lic-bad", bad, bad=True))
    return out


def generate(lics: Sequence[License], n: int, *, seed: int, now_ms: int) -> list[ExportEvent]:
    """n changes (70% increments, 20% decrements, 10% resets) of the licenses' own counters
    and an API_CALLS meter, in time order, each with its deterministic id; a bad license
    has a twentieth of a good one's share."""
    rng = random.Random(seed)
    counts: dict[tuple[str, str], int] = defaultdict(int)
    seq: dict[tuple[str, str], int] = defaultdict(int)
    events = []
    weights = [0.05 if lic.bad else 1.0 for lic in lics]  # bad events are few
    for k in range(n):
        lic = rng.choices(lics, weights)[0]
        meter = rng.choice(["", "API_CALLS"])
        key = (lic.id, meter)
        draw = rng.random()
        if draw < 0.1:
            kind, delta = Kind.RESET, -counts[key]
        elif draw < 0.3 and counts[key] > 0:
            kind, delta = Kind.DECREMENT, -rng.randint(1, counts[key])
        else:
            kind, delta = Kind.INCREMENT, rng.randint(1, 5)
        counts[key] += delta
        seq[key] += 1
        events.append(
            ExportEvent(
                id=f"{lic.id}.{meter or 'uses'}.{seq[key]:06d}",
                license_id=lic.id,
                policy_id="pol-1",
                meter=meter,
                kind=kind,
                delta=delta,
                uses=counts[key],
                request_id="",
                time_ms=now_ms - (n - k) * 1000,
                license_metadata=lic.metadata,
            )
        )
    return events


# --- the exporter stand-in ----------------------------------------------------------------


@dataclass
class Run:
    delivered: list[str] = field(default_factory=list)
    dead: dict[str, str] = field(default_factory=dict)
    retry_reasons: list[str] = field(default_factory=list)
    retry_afters: list[float] = field(default_factory=list)
    rounds: int = 0


async def drive(
    sink: Sink,
    events: Sequence[ExportEvent],
    emulator: Emulator,
    *,
    down: tuple[int, int] = (4, 10),
    clock: ManualClock | None = None,
    max_rounds: int = 20_000,
) -> Run:
    """Delivers `events` in order, at most max_batch at a time, the first still pending first;
    retried events stay at the front (after waiting what a 429 announced); the emulator is
    down from round down[0] to round down[1]. Afterwards faults are turned off and the rest
    drained."""
    import asyncio

    run = Run()
    pending = list(events)
    first_attempt: dict[str, int] = {}
    while pending:
        run.rounds += 1
        assert run.rounds < max_rounds, "delivery does not converge"
        if run.rounds == down[0]:
            await emulator.down()
        elif run.rounds == down[1]:
            await emulator.up()
        elif run.rounds == max_rounds // 2:
            emulator.faults_off()
        now = clock.now_ms() if clock else 0
        batch = [
            replace(e, first_attempt_ms=first_attempt.get(e.id, 0))
            for e in pending[: sink.max_batch]
        ]
        outcomes = await sink.deliver(batch)
        assert len(outcomes) == len(batch)
        settled: set[str] = set()
        wait = 0.0
        for event, outcome in zip(batch, outcomes, strict=True):
            first_attempt.setdefault(event.id, now)
            if outcome.verdict is Verdict.DELIVERED:
                run.delivered.append(event.id)
                settled.add(event.id)
            elif outcome.verdict is Verdict.DEAD:
                assert outcome.reason
                run.dead[event.id] = outcome.reason
                settled.add(event.id)
            else:
                run.retry_reasons.append(outcome.reason)
                if outcome.retry_after_s is not None:
                    run.retry_afters.append(outcome.retry_after_s)
                    wait = max(wait, outcome.retry_after_s)
        pending = [e for e in pending if e.id not in settled]
        if wait:
            await asyncio.sleep(wait)
    return run


def expected(events: Sequence[ExportEvent], lics: Sequence[License]) -> tuple[set[str], set[str]]:
    bad = {lic.id for lic in lics if lic.bad}
    good_ids = {e.id for e in events if e.license_id not in bad}
    return good_ids, {e.id for e in events} - good_ids


def sums(events: Sequence[ExportEvent], ids: set[str]) -> dict[str, int]:
    total: dict[str, int] = defaultdict(int)
    for e in events:
        if e.id in ids:
            total[e.license_id] += e.delta
    return dict(total)


def check_order(held_ids: Sequence[str], events: Sequence[ExportEvent]) -> None:
    """Each license's events were first taken in the order they were counted."""
    position = {e.id: k for k, e in enumerate(events)}
    per_license: dict[str, list[int]] = defaultdict(list)
    for event_id in held_ids:
        per_license[event_id.split(".")[0]].append(position[event_id])
    for positions in per_license.values():
        assert positions == sorted(positions)


def check_faults_seen(run: Run, emulator: Emulator, *, announced: bool = True) -> None:
    """The run met every fault: 429s (whose announced wait came back, for the systems that
    announce one), 503s, calls taken and never answered, and connections refused while
    down."""
    assert emulator.statuses[429] > 0
    assert emulator.statuses[503] > 0
    assert emulator.lost > 0
    assert any(r.startswith("connection failed") for r in run.retry_reasons)
    assert any("Cannot connect to host" in r for r in run.retry_reasons)  # refused while down
    assert any(r.startswith("HTTP 429") for r in run.retry_reasons)
    assert bool(run.retry_afters) == announced
    assert all(a == pytest.approx(THROTTLE_S) for a in run.retry_afters)


@pytest.fixture
async def closing() -> AsyncIterator[list[Any]]:
    """Sinks and emulators to close after the test."""
    things: list[Any] = []
    yield things
    for thing in reversed(things):
        await thing.close()


NOW_MS = 1_800_000_000_000


def clock() -> ManualClock:
    return ManualClock(fixed_ms=NOW_MS)


# --- Lago ---------------------------------------------------------------------------------


def lago_sink(emu: LagoEmulator, **config: Any) -> LagoSink:
    cfg = LagoExport(url=emu.url, api_key=emu.api_key, **config)
    return LagoSink(cfg, timeout_s=5, clock=clock())


@pytest.mark.parametrize("store", ["postgres", "clickhouse"])
async def test_lago_every_event_held_once_despite_faults(store: str, closing: list[Any]) -> None:
    emu = await LagoEmulator(
        store=store, invalid_subscriptions={"sub_bad"}, seed=1, **FAULTS
    ).start()
    sink = lago_sink(emu, codes={"API_CALLS": "api_calls", "uses": "seats"})
    closing += [emu, sink]
    lics = licenses(12)
    events = generate(lics, 2500, seed=2, now_ms=NOW_MS)
    good, bad = expected(events, lics)
    assert bad

    run = await drive(sink, events, emu)

    assert set(run.delivered) == good and len(run.delivered) == len(good)
    assert set(run.dead) == bad
    for reason in run.dead.values():
        assert reason.startswith("HTTP 422") and "value_is_invalid" in reason
    held = list(emu.held.values())
    assert sorted(e["transaction_id"] for e in held) == sorted(good)  # once each
    assert emu.double_billed() == []
    check_order([e["transaction_id"] for e in held], events)
    by_license: dict[str, int] = defaultdict(int)
    for e in held:
        lic = e["transaction_id"].split(".")[0]
        by_license[lic] += e["properties"]["delta"]
    assert dict(by_license) == sums(events, good)
    check_faults_seen(run, emu)
    if store == "postgres":
        assert emu.duplicates > 0  # taken-but-unanswered calls came back as duplicates


async def test_lago_body_and_a_refused_batch_split(closing: list[Any]) -> None:
    """One bad event and one Lago already holds, in a batch of 6: the duplicate counts as
    delivered, the bad one is dead with Lago's error, the 4 others delivered, in 3 calls."""
    emu = await LagoEmulator(invalid_subscriptions={"sub_bad"}).start()
    sink = lago_sink(emu, codes={"API_CALLS": "api_calls"})
    closing += [emu, sink]
    lics = licenses(4)
    events = generate(lics[:2], 6, seed=3, now_ms=NOW_MS + 123)
    events[2] = replace(events[2], license_metadata={"external_subscription_id": "sub_bad"})
    assert await sink.deliver([events[4]]) == [Outcome.delivered()]
    calls = emu.calls

    outcomes = await sink.deliver(events)

    assert [o.verdict for o in outcomes] == [Verdict.DELIVERED] * 2 + [Verdict.DEAD] + [
        Verdict.DELIVERED
    ] * 3
    assert (
        "value_is_invalid" in outcomes[2].reason
        and "external_subscription_id" in outcomes[2].reason
    )
    assert emu.calls - calls == 2  # the refusal names both: one resend of the 4 others
    body = emu.held[(events[0].license_metadata["external_subscription_id"], events[0].id)]
    e = events[0]
    assert body == {
        "transaction_id": e.id,
        "external_subscription_id": e.license_metadata["external_subscription_id"],
        "code": "api_calls" if e.meter else "uses",
        "timestamp": f"{e.time_ms // 1000}.{e.time_ms % 1000:03d}",
        "properties": {"delta": e.delta, "uses": e.uses},
    }
    no_meta = replace(e, id="x.1", license_metadata={})
    assert sink.body(no_meta)["external_subscription_id"] == e.license_id


async def test_lago_refusal_naming_no_event_is_halved(closing: list[Any]) -> None:
    """A Lago whose batch limit is lower than 100 (LAGO_EVENTS_BATCH_MAX_LENGTH) refuses the
    whole batch (too_many_events): halving gets every event through, none dead."""
    emu = await LagoEmulator(max_batch=30).start()
    sink = lago_sink(emu)
    closing += [emu, sink]
    events = generate(licenses(3)[:3], 100, seed=4, now_ms=NOW_MS)

    outcomes = await sink.deliver(events)

    assert outcomes == [Outcome.delivered()] * 100
    assert len(emu.held) == 100
    assert emu.calls <= 2 * 100 - 1


async def test_wrong_key_is_retried_and_logged_never_dead(
    closing: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    emu = await LagoEmulator().start()
    sink = LagoSink(LagoExport(url=emu.url, api_key="wrong-secret-key"), timeout_s=5, clock=clock())
    closing += [emu, sink]
    events = generate(licenses(2), 5, seed=5, now_ms=NOW_MS)
    with caplog.at_level(logging.ERROR, logger="meter_grpc.export"):
        first = await sink.deliver(events)
        second = await sink.deliver(events)
    assert {o.verdict for o in first + second} == {Verdict.RETRY}
    assert first[0].reason.startswith("HTTP 401") and first[0].retry_after_s is None
    logged = [r for r in caplog.records if r.name == "meter_grpc.export"]
    assert len(logged) == 1  # once a minute, not per call
    assert "METER_EXPORT_LAGO" in logged[0].getMessage()
    assert "wrong-secret-key" not in caplog.text


# --- m3ter --------------------------------------------------------------------------------


def m3ter_sink(emu: M3terEmulator, **config: Any) -> M3terSink:
    cfg = M3terExport(
        org_id=emu.org_id,
        access_key_id=emu.access_key_id,
        api_secret=emu.api_secret,
        url=emu.url,
        token_url=emu.token_url,
        **config,
    )
    return M3terSink(cfg, timeout_s=5, clock=clock())


async def test_m3ter_every_event_held_once_despite_faults_and_expired_tokens(
    closing: list[Any],
) -> None:
    emu = await M3terEmulator(invalid_accounts={"acct_bad"}, seed=6, **FAULTS).start()
    sink = m3ter_sink(emu, meters={"API_CALLS": "api_calls"})
    closing += [emu, sink]
    lics = licenses(12)
    events = generate(lics, 3000, seed=7, now_ms=NOW_MS)
    good, bad = expected(events, lics)
    rounds = 0
    original = sink.deliver

    async def deliver_expiring(batch: Sequence[ExportEvent]) -> list[Outcome]:
        nonlocal rounds
        rounds += 1
        if rounds % 3 == 0:
            emu.expire_tokens()  # the kept token is now refused (403)
        return await original(batch)

    sink.deliver = deliver_expiring  # type: ignore[method-assign]
    run = await drive(sink, events, emu)

    assert set(run.delivered) == good and len(run.delivered) == len(good)
    assert set(run.dead) == bad
    assert all("acct_bad is not valid" in r and r.startswith("HTTP 400") for r in run.dead.values())
    assert sorted(emu.held) == sorted(good)
    check_order(list(emu.held), events)
    by_license: dict[str, int] = defaultdict(int)
    for m in emu.held.values():
        by_license[m["uid"].split(".")[0]] += m["measure"]["delta"]
    assert dict(by_license) == sums(events, good)
    check_faults_seen(run, emu, announced=False)  # m3ter's 429 has no reset header
    assert emu.expired_refusals > 0
    assert emu.tokens_issued >= emu.expired_refusals
    assert not any(r.startswith("HTTP 403") for r in run.retry_reasons)  # renewed, not retried


async def test_m3ter_body_under_512000_bytes(closing: list[Any]) -> None:
    """Measurements of ~800 bytes: 1,000 of them are cut into bodies under 512,000 bytes; one
    too big to send alone is dead unsent."""
    emu = await M3terEmulator().start()
    sink = m3ter_sink(emu)
    closing += [emu, sink]
    big = [License(f"lic-{i}", {"m3ter_account": f"acct-{i}-" + "x" * 700}) for i in range(5)]
    events = generate(big, 1000, seed=8, now_ms=NOW_MS)
    huge = replace(events[10], license_metadata={"m3ter_account": "y" * M3TER_MAX_BYTES})
    events[10] = huge

    outcomes = await sink.deliver(events)

    assert outcomes[10].verdict is Verdict.DEAD and "512000" in outcomes[10].reason
    assert all(o.verdict is Verdict.DELIVERED for i, o in enumerate(outcomes) if i != 10)
    assert len(emu.held) == 999 and huge.id not in emu.held
    assert emu.oversize_refusals == 0
    assert M3TER_MAX_BYTES * 0.9 < max(emu.bodies) < M3TER_MAX_BYTES
    assert len(emu.bodies) == 2  # two bodies, nearly full
    m = emu.held[events[0].id]
    assert m == {
        "uid": events[0].id,
        "meter": events[0].meter or "uses",
        "account": big[0].metadata["m3ter_account"]
        if events[0].license_id == "lic-0"
        else m["account"],
        "ts": m["ts"],
        "measure": {"delta": events[0].delta, "uses": events[0].uses},
    }
    assert m["ts"].endswith("Z") and len(m["ts"]) == len("2027-01-15T08:00:00.000Z")


async def test_m3ter_token_kept_then_renewed_and_bad_credentials_retried(
    closing: list[Any],
) -> None:
    emu = await M3terEmulator(token_ttl_s=3600).start()
    sink = m3ter_sink(emu)
    closing += [emu, sink]
    events = generate(licenses(3), 30, seed=9, now_ms=NOW_MS)
    for chunk in (events[:10], events[10:20]):
        assert await sink.deliver(chunk) == [Outcome.delivered()] * 10
    assert emu.tokens_issued == 1 == sink.tokens_fetched  # kept
    emu.expire_tokens()
    assert await sink.deliver(events[20:]) == [Outcome.delivered()] * 10
    assert emu.tokens_issued == 2 and emu.expired_refusals == 1

    wrong = M3terSink(
        M3terExport(
            org_id=emu.org_id,
            access_key_id=emu.access_key_id,
            api_secret="not-the-secret",
            url=emu.url,
            token_url=emu.token_url,
        ),
        timeout_s=5,
        clock=clock(),
    )
    closing.append(wrong)
    outcomes = await wrong.deliver(events[:3])
    assert {o.verdict for o in outcomes} == {Verdict.RETRY}
    assert outcomes[0].reason.startswith("token: HTTP 401")


# --- OpenMeter ----------------------------------------------------------------------------


def openmeter_sink(emu: OpenMeterEmulator, **config: Any) -> OpenMeterSink:
    cfg = OpenMeterExport(url=emu.url, token=emu.token, source="meter-test", **config)
    return OpenMeterSink(cfg, timeout_s=5, clock=clock())


async def test_openmeter_every_event_held_once_despite_faults(closing: list[Any]) -> None:
    emu = await OpenMeterEmulator(invalid_subjects={"cust_bad"}, seed=10, **FAULTS).start()
    sink = openmeter_sink(emu, types={"API_CALLS": "api.calls"})
    closing += [emu, sink]
    lics = licenses(12)
    events = generate(lics, 2500, seed=11, now_ms=NOW_MS)
    good, bad = expected(events, lics)
    assert bad

    run = await drive(sink, events, emu)

    assert set(run.delivered) == good and len(run.delivered) == len(good)
    assert set(run.dead) == bad
    assert all("cust_bad is not valid" in r and r.startswith("HTTP 400") for r in run.dead.values())
    assert sorted(i for _, i in emu.held) == sorted(good)
    assert emu.double_billed() == []
    assert emu.partial_batches > 0  # refused batches whose first events were kept
    check_order([i for _, i in emu.held], events)
    by_license: dict[str, int] = defaultdict(int)
    for e in emu.held.values():
        by_license[e["data"]["license_id"]] += e["data"]["delta"]
    assert dict(by_license) == sums(events, good)
    check_faults_seen(run, emu)


async def test_openmeter_cloudevent_and_resend_needs_dedup(closing: list[Any]) -> None:
    """The CloudEvent sent; and a batch resent whole after a partial refusal is counted twice
    by an OpenMeter whose dedupe is off (which the README says must be on)."""
    emu = await OpenMeterEmulator(dedupe=False, invalid_subjects={"cust_bad"}).start()
    sink = openmeter_sink(emu, type="usage", types={"API_CALLS": "api.calls"})
    closing += [emu, sink]
    lics = licenses(4)
    events = generate(lics[:2], 4, seed=12, now_ms=NOW_MS + 7)
    events[2] = replace(events[2], license_metadata={"openmeter_subject": "cust_bad"})

    outcomes = await sink.deliver(events)

    assert [o.verdict for o in outcomes] == [Verdict.DELIVERED] * 2 + [
        Verdict.DEAD,
        Verdict.DELIVERED,
    ]
    assert emu.double_billed()  # the first two were kept by the refused call, then resent
    e = events[0]
    assert emu.held[("meter-test", e.id)] == {
        "specversion": "1.0",
        "id": e.id,
        "source": "meter-test",
        "type": "api.calls" if e.meter else "usage",
        "subject": e.license_metadata["openmeter_subject"],
        "time": emu.held[("meter-test", e.id)]["time"],
        "data": {"delta": e.delta, "uses": e.uses, "meter": e.meter, "license_id": e.license_id},
    }
    assert emu.held[("meter-test", e.id)]["time"].endswith(f".{e.time_ms % 1000:03d}Z")


# --- Stripe -------------------------------------------------------------------------------


def stripe_sink(emu: StripeEmulator, clk: ManualClock, **config: Any) -> StripeSink:
    cfg = StripeExport(api_key=emu.api_key, url=emu.url, **config)
    return StripeSink(cfg, timeout_s=5, clock=clk)


async def test_stripe_every_event_held_once_despite_faults(closing: list[Any]) -> None:
    clk = clock()
    lics = licenses(12)
    customers = {lic.metadata["stripe_customer_id"] for lic in lics if lic.metadata and not lic.bad}
    emu = await StripeEmulator(customers=customers, now_ms=clk.now_ms, seed=13, **FAULTS).start()
    sink = stripe_sink(emu, clk, event_names={"API_CALLS": "api_calls"})
    closing += [emu, sink]
    events = generate(lics, 1200, seed=14, now_ms=NOW_MS)
    no_customer = {lic.id for lic in lics if not lic.metadata}
    good, bad = expected(events, lics)
    good_sent = {i for i in good if i.split(".")[0] not in no_customer}

    run = await drive(sink, events, emu, clock=clk)

    assert set(run.delivered) == good_sent and len(run.delivered) == len(good_sent)
    assert set(run.dead) == bad | (good - good_sent)
    for event_id, reason in run.dead.items():
        if event_id.startswith("lic-bad"):
            assert reason.startswith("HTTP 400: resource_missing: No such customer")
        else:
            assert "no metadata 'stripe_customer_id'" in reason
    assert sorted(emu.held) == sorted(good_sent)
    assert emu.double_billed() == []
    assert emu.concurrent_refusals == 0  # one call at a time per customer and meter
    assert emu.replays > 0  # calls taken but unanswered got their first answer back
    check_order(list(emu.held), events)
    by_license: dict[str, int] = defaultdict(int)
    for form in emu.held.values():
        by_license[form["identifier"].split(".")[0]] += int(form["payload[value]"])
    assert dict(by_license) == sums(events, good_sent)  # negative deltas sent as they are
    check_faults_seen(run, emu)


async def test_stripe_windows(closing: list[Any]) -> None:
    """Older than 35 days: dead unsent. First tried more than 23 h ago: dead unsent (Stripe
    may hold the first try and no longer know its identifier). A timestamp Stripe refuses
    (in the future): dead with Stripe's reason."""
    clk = clock()
    emu = await StripeEmulator(now_ms=clk.now_ms).start()
    sink = stripe_sink(emu, clk)
    closing += [emu, sink]
    lic = licenses(3)[0]
    e = generate([lic], 1, seed=15, now_ms=NOW_MS)[0]
    old = replace(e, id="old", time_ms=NOW_MS - 35 * DAY_MS + 60_000)
    fine = replace(e, id="fine", time_ms=NOW_MS - 34 * DAY_MS)
    retried_22h = replace(e, id="r22", first_attempt_ms=NOW_MS - 22 * 3600_000)
    retried_24h = replace(e, id="r24", first_attempt_ms=NOW_MS - 23 * 3600_000 - 1)
    future = replace(e, id="future", time_ms=NOW_MS + 10 * 60_000)

    outcomes = await sink.deliver([old, fine, retried_22h, retried_24h, future])

    assert [o.verdict for o in outcomes] == [
        Verdict.DEAD,
        Verdict.DELIVERED,
        Verdict.DELIVERED,
        Verdict.DEAD,
        Verdict.DEAD,
    ]
    assert "outside Stripe's 35-day window" in outcomes[0].reason
    assert "may be a duplicate beyond Stripe's 24 h dedup window" in outcomes[3].reason
    assert outcomes[4].reason.startswith("HTTP 400: timestamp: timestamp must be within")
    assert set(emu.held) == {"fine", "r22"}
    assert emu.held["fine"]["timestamp"] == str(fine.time_ms // 1000)


async def test_stripe_lost_answer_replayed_then_dead_after_23h(closing: list[Any]) -> None:
    """A call Stripe took whose answer was lost: the resend (same Idempotency-Key) gets the
    first answer back, nothing kept twice. A resend Stripe keeps failing is retried until 23 h
    after the first try, then dead."""
    clk = clock()
    emu = await StripeEmulator(now_ms=clk.now_ms, lost_rate=1.0).start()
    sink = stripe_sink(emu, clk, value="uses")
    closing += [emu, sink]
    lic = licenses(3)[0]
    a, b = generate([lic], 2, seed=16, now_ms=NOW_MS)
    first = await sink.deliver([a])
    assert first[0].verdict is Verdict.RETRY and first[0].reason.startswith("connection failed")
    emu.faults_off()
    assert await sink.deliver([replace(a, first_attempt_ms=NOW_MS)]) == [Outcome.delivered()]
    assert emu.replays == 1 and list(emu.held) == [a.id]
    assert emu.held[a.id]["payload[value]"] == str(a.uses)

    emu.fail_rate = 1.0
    clk.advance(23 * 3600_000 - 1000)
    assert (await sink.deliver([replace(b, first_attempt_ms=NOW_MS)]))[0].verdict is Verdict.RETRY
    clk.advance(2000)
    calls = emu.calls
    outcome = (await sink.deliver([replace(b, first_attempt_ms=NOW_MS)]))[0]
    assert outcome.verdict is Verdict.DEAD and "24 h dedup window" in outcome.reason
    assert emu.calls == calls  # not sent


# --- common -------------------------------------------------------------------------------


def test_retry_after_headers() -> None:
    now = 1_700_000_000.0
    assert retry_after({"Retry-After": "7"}, now) == 7
    assert retry_after({"X-RateLimit-Reset": "2.5"}, now) == 2.5
    assert retry_after({"X-RateLimit-Reset": str(int(now) + 30)}, now) == 30  # epoch seconds
    assert retry_after({"X-RateLimit-Reset": str(int(now * 1000) + 4000)}, now) == 4  # epoch ms
    assert retry_after({"Retry-After": "Tue, 14 Nov 2023 22:13:40 GMT"}, now) == 20
    assert retry_after({"Retry-After": "soon", "X-RateLimit-Reset": "3"}, now) == 3
    assert retry_after({"X-RateLimit-Reset": str(int(now) - 5)}, now) == 0
    assert retry_after({"Retry-After": "999999"}, now) == 3600
    assert retry_after({}, now) is None


async def test_no_answer_in_time_is_retried(closing: list[Any]) -> None:
    import asyncio

    from aiohttp import web

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(1)
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/api/v1/events/batch", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    sink = LagoSink(
        LagoExport(url=f"http://127.0.0.1:{port}", api_key="k"), timeout_s=0.2, clock=clock()
    )
    try:
        outcomes = await sink.deliver(generate(licenses(1), 2, seed=17, now_ms=NOW_MS))
    finally:
        await sink.close()
        await runner.cleanup()
    assert {o.verdict for o in outcomes} == {Verdict.RETRY}
    assert outcomes[0].reason == "no answer within 0.2 s" and outcomes[0].retry_after_s is None


def test_settings_and_build_sinks() -> None:
    env = {
        "METER_EXPORT_LAGO_URL": "https://api.getlago.com/",
        "METER_EXPORT_LAGO_API_KEY": "lago-secret",
        "METER_EXPORT_LAGO_CODES": "API_CALLS=api_calls, uses=seats",
        "METER_EXPORT_M3TER_ORG_ID": "org-1",
        "METER_EXPORT_M3TER_ACCESS_KEY_ID": "ak",
        "METER_EXPORT_M3TER_API_SECRET": "m3ter-secret",
        "METER_EXPORT_OPENMETER_URL": "https://openmeter.cloud",
        "METER_EXPORT_STRIPE_API_KEY": "sk_live_secret",
        "METER_EXPORT_STRIPE_VALUE": "uses",
        "METER_EXPORT_HTTP_TIMEOUT": "12.5",
    }
    s = Settings.from_env(env)
    assert s.export_lago == LagoExport(
        url="https://api.getlago.com",
        api_key="lago-secret",
        codes={"API_CALLS": "api_calls", "uses": "seats"},
    )
    assert s.export_m3ter is not None and s.export_m3ter.url == "https://ingest.m3ter.com"
    assert s.export_m3ter.token_url == "https://api.m3ter.com/oauth/token"
    assert s.export_openmeter == OpenMeterExport(url="https://openmeter.cloud")
    assert s.export_stripe is not None and s.export_stripe.value == "uses"
    assert s.export_http_timeout_s == 12.5
    for secret in ("lago-secret", "m3ter-secret", "sk_live_secret"):
        assert secret not in repr(s)
    assert [k.name for k in build_sinks(s)] == ["lago", "m3ter", "openmeter", "stripe"]
    assert build_sinks(Settings.from_env({})) == []


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"METER_EXPORT_LAGO_URL": "api.getlago.com", "METER_EXPORT_LAGO_API_KEY": "k"},
            "METER_EXPORT_LAGO_URL='api.getlago.com' is not an http(s) URL",
        ),
        ({"METER_EXPORT_LAGO_URL": "https://x"}, "METER_EXPORT_LAGO_API_KEY is not set"),
        ({"METER_EXPORT_LAGO_API_KEY": "k"}, "METER_EXPORT_LAGO_URL='' is not an http(s) URL"),
        (
            {
                "METER_EXPORT_LAGO_URL": "https://x",
                "METER_EXPORT_LAGO_API_KEY": "k",
                "METER_EXPORT_LAGO_CODES": "API_CALLS",
            },
            "METER_EXPORT_LAGO_CODES='API_CALLS' is not a mapping",
        ),
        (
            {"METER_EXPORT_M3TER_ORG_ID": "o", "METER_EXPORT_M3TER_ACCESS_KEY_ID": "a"},
            "METER_EXPORT_M3TER_API_SECRET is not set",
        ),
        (
            {"METER_EXPORT_STRIPE_API_KEY": "sk", "METER_EXPORT_STRIPE_VALUE": "max"},
            "METER_EXPORT_STRIPE_VALUE='max' is not a choice",
        ),
        (
            {"METER_EXPORT_OPENMETER_URL": "ftp://x"},
            "METER_EXPORT_OPENMETER_URL='ftp://x' is not an http(s) URL",
        ),
        ({"METER_EXPORT_HTTP_TIMEOUT": "-1"}, "METER_EXPORT_HTTP_TIMEOUT='-1' is out of range"),
    ],
)
def test_bad_settings_are_one_line_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env(env)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("named", [False, True, "out of range"])
async def test_isolate_finds_bad_events_in_bounded_calls(named: bool | str) -> None:
    """A refused batch of 64 with 5 bad events: the bad ones dead, the rest delivered, in at
    most 2n - 1 calls, whether the refusal names the bad events or not (or names nonsense)."""
    events = generate(licenses(4), 64, seed=18, now_ms=NOW_MS)
    bad = {events[i].id for i in (0, 7, 8, 40, 63)}
    calls = 0

    async def send(batch: Sequence[ExportEvent]) -> Outcome | Refused:
        nonlocal calls
        calls += 1
        if not any(e.id in bad for e in batch):
            return Outcome.delivered()
        if named is True:
            known = {j: dead_outcome("named") for j, e in enumerate(batch) if e.id in bad}
        elif named:
            known = {len(batch) + 3: dead_outcome("nonsense")}
        else:
            known = {}
        return Refused("HTTP 400: bad", known)

    outcomes = await isolate(events, send)

    assert [o.verdict is Verdict.DEAD for o in outcomes] == [e.id in bad for e in events]
    assert calls <= 2 * 64 - 1
    if named is True:
        assert calls == 2


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, None),
        (400, None),
        (413, None),
        (422, None),
        (401, Verdict.RETRY),
        (403, Verdict.RETRY),
        (404, Verdict.RETRY),
        (302, Verdict.RETRY),
        (408, Verdict.RETRY),
        (409, Verdict.RETRY),
        (429, Verdict.RETRY),
        (500, Verdict.RETRY),
        (503, Verdict.RETRY),
    ],
)
def test_answer_table(status: int, verdict: Verdict | None) -> None:
    """None: delivered (2xx) or refused (other 4xx), read by the sink itself."""
    sink = HttpSink(timeout_s=1, clock=clock())
    outcome = sink.not_taken(Answer(status, {"Retry-After": "2"}, b'{"error": "x"}'))
    assert (outcome and outcome.verdict) == verdict
    if outcome is not None:
        assert outcome.reason == f'HTTP {status}: {{"error": "x"}}'
        assert outcome.retry_after_s == (2 if status == 429 else None)


async def test_stripe_a_failing_customer_holds_back_only_its_own_events(
    closing: list[Any],
) -> None:
    """Stripe answers 503 (or 429) to one customer's first event and 200, a little later, to
    everything else. A 503 stops that customer's lane only: its later event comes back unsent
    (no failed attempt of its own), the other customer's events are delivered in the same
    delivery. A 429 stops every lane: the other customer's second event is held back unsent
    with the 429's wait. (Every lane stopped at the first retry of any customer, and the
    events held back counted as failed attempts: under 30% failures Stripe crawled.)"""
    status = {"code": 503}

    async def handler(request: web.Request) -> web.Response:
        form = await request.post()
        if form["payload[stripe_customer_id]"] == "cus_bad":
            if status["code"] == 429:
                return web.json_response({}, status=429, headers={"Retry-After": "0.5"})
            return web.json_response({"error": {"message": "down"}}, status=503)
        await asyncio.sleep(0.05)  # answered after the bad customer's refusal
        return web.json_response({"object": "billing.meter_event"})

    app = web.Application()
    app.router.add_post("/v1/billing/meter_events", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    sink = StripeSink(
        StripeExport(api_key="sk_test", url=f"http://127.0.0.1:{port}"), timeout_s=5, clock=clock()
    )
    closing += [_Closer(runner), sink]

    def ev(lic: str, n: int, customer: str) -> ExportEvent:
        return ExportEvent(
            f"{lic}:{n}", lic, "p", "", Kind.INCREMENT, 1, n, "", NOW_MS,
            license_metadata={"stripe_customer_id": customer},
        )  # fmt: skip

    events = [
        ev("a", 1, "cus_bad"),
        ev("a", 2, "cus_bad"),
        ev("b", 1, "cus_ok"),
        ev("b", 2, "cus_ok"),
    ]
    out = await sink.deliver(events)
    assert [o.verdict for o in out] == [
        Verdict.RETRY,
        Verdict.RETRY,
        Verdict.DELIVERED,
        Verdict.DELIVERED,
    ]
    assert out[0].sent and not out[1].sent and out[1].reason.startswith("HTTP 503")

    status["code"] = 429
    out = await sink.deliver(events)
    assert [o.verdict for o in out] == [
        Verdict.RETRY,
        Verdict.RETRY,
        Verdict.DELIVERED,
        Verdict.RETRY,
    ]
    assert out[0].sent and out[0].retry_after_s == pytest.approx(0.5)
    assert not out[1].sent and not out[3].sent and out[3].retry_after_s == pytest.approx(0.5)


class _Closer:
    def __init__(self, runner: web.AppRunner) -> None:
        self.runner = runner

    async def close(self) -> None:
        await self.runner.cleanup()
