"""Property-based fuzzing of every RPC of meter.v1.LicenseService and meter.v1.UsageService.

Requests are generated from the request message descriptors (so an RPC or a field added to a
proto is fuzzed without touching this file): strings with control characters, odd unicode,
`{`, `}`, `:` and huge lengths, boundary integers of every integer type, unknown enum numbers,
out-of-range Timestamps and Durations, field masks, maps and repeated fields with many items;
each field leans toward values that pass validation (the ids, key, machine ids, request ids,
page tokens and event ids of real records made by the fixture), so the calls reach the store
and not only the checks. Raw bodies that are no valid message (random, truncated, bad UTF-8,
deep groups, field 0, wire types 6 and 7) go through identity serializers. Every RPC is
called as an admin, with the key of a real license, and without credentials.

What every call must satisfy:
- never INTERNAL or UNKNOWN; any other status is one of SPEC §4's, with an ErrorInfo of the
  right reason, and INVALID_ARGUMENT carries a BadRequest whose fields name fields of the
  request (or "" for a body that is no message at all);
- the server answers its health check with SERVING after every example;
- a refused call (or a call whose every item was refused) leaves the whole keyspace as it
  was (every key read back by type, with its TTL), except a refusal stored under the
  request's own `request_id` for a reason in STORED_REFUSALS (README, Errors); read-only RPCs
  (Get*, List*, Validate*, Watch*) never change it at all;
- the service logs no traceback, and malformed bodies at most one line per 10 s.

The server's clock stands still during the run, so time-driven upkeep (a floating machine
whose heartbeat died, a usage period that ended) never happens between two snapshots.

Budget: METER_FUZZ_EXAMPLES examples per RPC and caller (default below); CI=1 makes the run
deterministic (tests/conftest.py loads the "ci" hypothesis profile).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from google.api import field_behavior_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from meter.v1 import license_service_pb2, usage_service_pb2
from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from meter_grpc.api.errors import DOMAIN, STATUS_CODES
from meter_grpc.config import Settings
from meter_grpc.domain import ids, paging
from meter_grpc.domain.clock import ManualClock
from meter_grpc.domain.errors import Reason
from meter_grpc.server import build_server
from meter_grpc.storage import keys
from meter_grpc.storage.embedded import EmbeddedServer
from tests.support import ADMIN_TOKEN, UNKNOWN_ID, admin_md, license_md, rich_error

# Every service of the meter.v1 files: a service added to them is fuzzed too.
SERVICE_FILES = [license_service_pb2.DESCRIPTOR, usage_service_pb2.DESCRIPTOR]
SERVICES = [s for f in SERVICE_FILES for s in f.services_by_name.values()]
METHODS: list[MethodDescriptor] = [m for s in SERVICES for m in s.methods]
CALLERS = ("admin", "license key", "nobody")

# Examples per RPC for admin and license-key callers (unauthenticated calls are all refused at
# once, so they get a quarter; raw bodies half). A test knob, not a service setting.
EXAMPLES = int(os.environ.get("METER_FUZZ_EXAMPLES") or 25)
RAW_EXAMPLES = max(4, EXAMPLES // 2)
WATCH_DEADLINE_S = 0.15
CALL_TIMEOUT_S = 20.0

SPEC_CODES = {code for code in STATUS_CODES.values()}
# Refusals a script may store under the request's request_id (AIP-155), so that a retry gets
# the same answer: outcomes decided against the stored state, never validation or auth.
STORED_REFUSALS = {
    r.value
    for r in (
        Reason.USAGE_LIMIT_EXCEEDED,
        Reason.USAGE_UNDERFLOW,
        Reason.LICENSE_SUSPENDED,
        Reason.LICENSE_EXPIRED,
        Reason.MACHINE_LIMIT_EXCEEDED,
        Reason.CORE_LIMIT_EXCEEDED,
        Reason.FINGERPRINT_TAKEN,
    )
}
READ_ONLY_PREFIXES = ("Get", "List", "Validate", "Watch")


def path(m: MethodDescriptor) -> str:
    return f"/{m.containing_service.full_name}/{m.name}"


def method_id(m: MethodDescriptor) -> str:
    return m.name


# --- the server under test, and the records the generated requests point at ----------------


@dataclass(repr=False)
class World:
    """Real records for the generators to lean on. The license-key caller's own license and
    its policy are never handed to admin calls (an admin could delete or rotate it)."""

    target: str
    redis: Any
    own_id: str = ""
    own_key: str = ""
    own_policy: str = ""
    other_id: str = ""
    other_key: str = ""
    own_machines: list[str] = field(default_factory=list)
    own_fingerprints: list[str] = field(default_factory=list)
    policy_ids: list[str] = field(default_factory=list)
    license_ids: list[str] = field(default_factory=list)
    license_keys: list[str] = field(default_factory=list)
    machine_ids: list[str] = field(default_factory=list)
    fingerprints: list[str] = field(default_factory=list)
    page_tokens: list[str] = field(default_factory=list)
    event_ids: list[str] = field(default_factory=list)
    # open reservations (7 days) of the own license, and of license_ids[0]
    own_reservations: list[str] = field(default_factory=list)
    reservations: list[str] = field(default_factory=list)
    channel: Any = None
    calls: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    snap: dict[bytes, tuple[Any, int]] = field(default_factory=dict)
    snap_at: float = 0.0

    def __repr__(self) -> str:
        return f"World({self.target})"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))

    @property
    def licenses(self) -> lgrpc.LicenseServiceStub:
        return lgrpc.LicenseServiceStub(self.channel)

    @property
    def usage(self) -> ugrpc.UsageServiceStub:
        return ugrpc.UsageServiceStub(self.channel)


_world: World | None = None
# What the service logged during the module (WARNING and up).
LOGGED: list[logging.LogRecord] = []
# The status codes answered, by (RPC, caller), over the whole module.
CALLS: dict[tuple[str, str], list[str]] = {}


def world() -> World:
    assert _world is not None
    return _world


async def _policy(w: World, **fields: Any) -> str:
    fields.setdefault("name", "fuzz")
    resp = await w.licenses.CreatePolicy(
        lpb.CreatePolicyRequest(policy=fields), metadata=admin_md()
    )
    return str(resp.policy.id)


async def _license(w: World, policy_id: str) -> tuple[str, str]:
    """A license with 3 uses (so that decrements can succeed)."""
    resp = await w.licenses.CreateLicense(
        lpb.CreateLicenseRequest(license={"policy_id": policy_id, "name": "fuzz"}),
        metadata=admin_md(),
    )
    await w.usage.IncrementUsage(
        upb.IncrementUsageRequest(license_id=resp.license.id, amount=3), metadata=admin_md()
    )
    return str(resp.license.id), str(resp.license.key)


async def _machine(w: World, license_id: str, fingerprint: str) -> str:
    resp = await w.licenses.ActivateMachine(
        lpb.ActivateMachineRequest(license_id=license_id, fingerprint=fingerprint, cores=2),
        metadata=admin_md(),
    )
    return str(resp.machine.id)


FLOATING = {
    "floating": True,
    "max_machines": 4,
    "max_cores": 64,
    "max_uses": 1000,
    "entitlements": ["feat-a", "feat-b"],
    "heartbeat_duration": {"seconds": 600},
    "overage_strategy": 2,
    "duration": {"seconds": 365 * 86_400},
}


async def _populate(w: World) -> None:
    w.own_policy = await _policy(w, **FLOATING)
    w.own_id, w.own_key = await _license(w, w.own_policy)
    w.other_id, w.other_key = await _license(w, w.own_policy)
    for fp in ("own-fp-1", "own-fp-2"):
        w.own_machines.append(await _machine(w, w.own_id, fp))
        w.own_fingerprints.append(fp)
    await w.usage.IncrementUsage(
        upb.IncrementUsageRequest(license_id=w.own_id, amount=3, request_id="seed-1"),
        metadata=admin_md(),
    )
    policies = [
        await _policy(w, **FLOATING),
        await _policy(w, duration={"seconds": 30 * 86_400}, expiration_strategy=2, max_uses=5),
        await _policy(w, usage_reset_interval=4, max_uses=10, overage_strategy=5),
        await _policy(w, require_check_in=True, check_in_interval={"seconds": 3600}),
    ]
    # policies without licenses first: pools are drawn with a bias toward their start, and
    # DeletePolicy can delete only these
    w.policy_ids += [await _policy(w, **FLOATING) for _ in range(3)]
    w.policy_ids += policies
    for i, p in enumerate(policies):
        lic_id, key = await _license(w, p)
        w.license_ids.append(lic_id)
        w.license_keys.append(key)
        fp = f"fp-{i}"
        w.machine_ids.append(await _machine(w, lic_id, fp))
        w.fingerprints.append(fp)
    await w.usage.IncrementUsage(
        upb.IncrementUsageRequest(license_id=w.license_ids[0], amount=2), metadata=admin_md()
    )
    page = await w.licenses.ListPolicies(lpb.ListPoliciesRequest(page_size=1), metadata=admin_md())
    lics = await w.licenses.ListLicenses(lpb.ListLicensesRequest(page_size=1), metadata=admin_md())
    machines = await w.licenses.ListMachines(
        lpb.ListMachinesRequest(license_id=w.own_id, page_size=1), metadata=admin_md()
    )
    w.page_tokens += [page.next_page_token, lics.next_page_token, machines.next_page_token]
    w.page_tokens += [paging.encode(UNKNOWN_ID, ""), paging.encode("x}:{", "")]
    events = await w.redis.xrange(keys.license_events(w.own_id))
    w.event_ids += [e[0].decode() for e in events] + ["0-0"]
    for license_id, held in ((w.own_id, w.own_reservations), (w.license_ids[0], w.reservations)):
        for _ in range(8):  # CommitReservation and ReleaseReservation can succeed on these
            r = await w.usage.ReserveUsage(
                upb.ReserveUsageRequest(license_id=license_id, amount=1, ttl={"seconds": 604_800}),
                metadata=admin_md(),
            )
            held.append(str(r.reservation.id))


async def _replace(w: World, kind: str, gone: str) -> None:
    """A record an admin call deleted is replaced (under a policy of its own, since the
    others may have been changed by then), so later examples still reach real ones."""
    if kind == "policy" and gone in w.policy_ids:
        w.policy_ids[w.policy_ids.index(gone)] = await _policy(w, **FLOATING)
    elif kind == "license" and gone in w.license_ids:
        i = w.license_ids.index(gone)
        w.license_ids[i], w.license_keys[i] = await _license(w, await _policy(w, **FLOATING))
        for m in list(w.machine_ids):  # its machines went with it
            if m.startswith(gone):
                await _replace(w, "machine", m)
    elif kind == "machine" and gone in w.machine_ids:
        lic_id, key = await _license(w, await _policy(w, **FLOATING))
        fp = f"fp-r{time.monotonic_ns()}"
        w.machine_ids[w.machine_ids.index(gone)] = await _machine(w, lic_id, fp)
        w.fingerprints.append(fp)
        w.license_keys.append(key)


class _Collect(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        LOGGED.append(record)


FIRST_CALL: list[float] = []  # when the first example ran (monotonic)


@pytest.fixture(scope="module")
async def fuzz_world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    """A server of its own (one per module) on its own embedded valkey, so the keyspace holds
    only what this module made; its clock stands still."""
    global _world
    valkey = EmbeddedServer(tmp_path_factory.mktemp("fuzz-valkey"))
    url = await valkey.start()
    clock = ManualClock(fixed_ms=time.time_ns() // 1_000_000)
    service, port = await build_server(
        Settings(
            listen="127.0.0.1:0",
            redis_url=url,
            data_dir=Path(tmp_path_factory.mktemp("fuzz-data")),
            admin_tokens=[ADMIN_TOKEN],
            clock=clock,
            shutdown_grace_s=2,
        )
    )
    await service.start()
    r = aioredis.Redis.from_url(url, decode_responses=False)
    handler = _Collect(logging.WARNING)
    logging.getLogger("meter_grpc").addHandler(handler)
    FIRST_CALL.append(time.monotonic())
    try:
        # A client that refuses trailers above 8 KiB every time (gRPC's default refuses them
        # only by chance up to 16 KiB), so an error too large for a client fails here at once.
        strict = [("grpc.max_metadata_size", 8192), ("grpc.absolute_max_metadata_size", 8192)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=strict) as channel:
            w = World(target=f"127.0.0.1:{port}", redis=r, channel=channel, calls=CALLS)
            await _populate(w)
            w.snap, w.snap_at = await snapshot(r), time.monotonic()
            _world = w
            yield w
            _world = None
    finally:
        logging.getLogger("meter_grpc").removeHandler(handler)
        await r.aclose()
        await service.stop(1)
        await valkey.stop()


# --- the keyspace --------------------------------------------------------------------------


async def snapshot(r: Any) -> dict[bytes, tuple[Any, int]]:
    """Every key: its type and value, read by type (DUMP bytes of a hash or set in a hash
    table change when a read rehashes it), and its PTTL."""
    return await snapshot_of(r, [k async for k in r.scan_iter(count=1000)])


async def snapshot_of(r: Any, names: list[bytes]) -> dict[bytes, tuple[Any, int]]:
    pipe = r.pipeline(transaction=False)
    for k in names:
        pipe.type(k)
    kinds = [t.decode() for t in await pipe.execute()]
    pipe = r.pipeline(transaction=False)
    for k, kind in zip(names, kinds, strict=True):
        if kind == "hash":
            pipe.hgetall(k)
        elif kind in ("set", "zset"):
            pipe.zrange(k, 0, -1, withscores=True) if kind == "zset" else pipe.smembers(k)
        elif kind == "list":
            pipe.lrange(k, 0, -1)
        else:  # strings and streams (a stream's DUMP holds its last id and groups too)
            pipe.dump(k)
        pipe.pttl(k)
    out = await pipe.execute()
    snap = {}
    for i, (k, kind) in enumerate(zip(names, kinds, strict=True)):
        value, ttl = out[2 * i], out[2 * i + 1]
        if kind == "none" or ttl == -2:
            continue  # expired between SCAN and the read
        if isinstance(value, dict):
            value = sorted(value.items())
        elif isinstance(value, set):
            value = sorted(value)
        snap[k] = ((kind, value), ttl)
    return snap


async def readable(r: Any, key: bytes) -> Any:
    """A key's value by its type, for the failure message."""
    snap = await snapshot_of(r, [key])
    return snap.get(key, ("gone", -2))[0]


def changed_keys(
    before: dict[bytes, tuple[Any, int]], after: dict[bytes, tuple[Any, int]], elapsed_ms: int
) -> list[bytes]:
    """Keys added, removed or changed; a key gone because its TTL ran out is not a change."""
    out = []
    for k in before.keys() | after.keys():
        b, a = before.get(k), after.get(k)
        if b is not None and a is None and 0 <= b[1] <= elapsed_ms + 1000:
            continue
        if b is None or a is None or b[0] != a[0]:
            out.append(k)
    return sorted(out)


def stored_refusal_keys(items: Iterable[Message]) -> set[bytes]:
    """Where a refusal under the request_id of a request (or of an item) may be stored."""
    out: set[bytes] = set()
    for msg in items:
        fields = msg.DESCRIPTOR.fields_by_name
        rid = getattr(msg, "request_id", "") if "request_id" in fields else ""
        lic = getattr(msg, "license_id", "") if "license_id" in fields else ""
        if rid and lic:
            out.add(keys.request_record(lic, rid).encode())
    return out


# --- strategies, from the descriptors ------------------------------------------------------

T = FieldDescriptor
_INT_RANGES = {
    T.TYPE_INT32: (-(2**31), 2**31 - 1),
    T.TYPE_SINT32: (-(2**31), 2**31 - 1),
    T.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    T.TYPE_ENUM: (-(2**31), 2**31 - 1),
    T.TYPE_INT64: (-(2**63), 2**63 - 1),
    T.TYPE_SINT64: (-(2**63), 2**63 - 1),
    T.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    T.TYPE_UINT32: (0, 2**32 - 1),
    T.TYPE_FIXED32: (0, 2**32 - 1),
    T.TYPE_UINT64: (0, 2**64 - 1),
    T.TYPE_FIXED64: (0, 2**64 - 1),
}
_BOUNDARIES = [
    0, 1, -1, 2, 255, 256, 257, 1000, 1001, 2**20, 2**20 + 1, 2**31 - 1, 2**31, 2**32,
    2**50 - 1, 2**50, 2**50 + 1, 2**53 - 1, 2**53, 2**53 + 1, -(2**53) - 1, 2**63 - 1,
    -(2**63), 2**64 - 1, -(2**31),
]  # fmt: skip

_SPECIALS = [
    "", " ", "{", "}", ":", "x}", "{x", "a:b", "}:req:x", "{lic:x}", "\x00", "a\x00b", "\t\n\r",
    "\x7f", "\u0663-0", "\u202e", "\ufeff", "\u200b", "\U0001f600", "%d%s", "*", "-", ".", "..",
    "../..", "[", '"', "\\", "'", "0-0", "1-", "-1", "18446744073709551616-0", "9" * 40 + "-0",
    "\uffff", "\U0010ffff",
]  # fmt: skip

SAFE_TOKEN = st.text(
    alphabet=st.sampled_from("abcXYZ019-_.~!@#$%^&*()+=/?<>,;'\"|`[]"), min_size=1, max_size=24
)


def ints(fd: FieldDescriptor) -> st.SearchStrategy[int]:
    lo, hi = _INT_RANGES[fd.type]
    boundaries = [b for b in _BOUNDARIES if lo <= b <= hi] + [lo, hi]
    return st.one_of(st.sampled_from(boundaries), st.integers(lo, hi))


def valid_ints(fd: FieldDescriptor) -> st.SearchStrategy[int]:
    lo, hi = _INT_RANGES[fd.type]
    return st.one_of(st.integers(max(lo, 0), min(hi, 3)), st.integers(max(lo, 0), min(hi, 64)))


def hostile_text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(_SPECIALS),
        st.text(max_size=40),
        st.text(alphabet=st.characters(codec="utf-8", categories=["Cc", "Cf", "Zs"]), max_size=8),
        st.tuples(
            st.sampled_from("A{}:\x00é😀"), st.sampled_from([129, 257, 1025, 2049, 70_000])
        ).map(lambda t: t[0] * t[1]),
    )


def pool(get: Callable[[World], list[str]]) -> st.SearchStrategy[str]:
    """A value of a live list of the world (read when drawn: records may be replaced)."""
    return st.integers(0, 2**16).map(lambda i: (lambda p: p[i % len(p)] if p else "")(get(world())))


def keyed(get: Callable[[World], str]) -> st.SearchStrategy[str]:
    return st.just(0).map(lambda _: get(world()))


_FRESH = itertools.count()


def fresh(prefix: str) -> st.SearchStrategy[str]:
    """A value never drawn before in this run (hypothesis draws the simplest values again and
    again: reused request ids would mostly answer REQUEST_ID_REUSED)."""
    return st.just(0).map(lambda _: f"{prefix}-{next(_FRESH):012d}")


def weird_variant(valid: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A valid value made invalid by a little: a special character around it, upper case."""
    return st.one_of(
        st.tuples(valid, st.sampled_from(_SPECIALS)).map(lambda t: t[0] + t[1]),
        st.tuples(st.sampled_from(_SPECIALS), valid).map(lambda t: t[0] + t[1]),
        valid.map(str.upper),
        valid.map(lambda s: s[:-1]),
    )


@dataclass(frozen=True)
class Ctx:
    caller: str
    method: str

    @property
    def mine(self) -> bool:
        return self.caller != "admin"


def license_ids(ctx: Ctx) -> st.SearchStrategy[str]:
    if ctx.mine:
        return st.sampled_from(["own"] * 6 + ["other", "unknown"]).map(
            lambda which: {"own": world().own_id, "other": world().other_id}.get(which, UNKNOWN_ID)
        )
    return st.one_of(*[pool(lambda w: w.license_ids)] * 4, st.just(UNKNOWN_ID))


def machine_ids(ctx: Ctx) -> st.SearchStrategy[str]:
    if ctx.mine:
        return st.one_of(
            pool(lambda w: w.own_machines),
            keyed(lambda w: w.own_id).map(lambda i: f"{i}.{'0' * 32}"),
            pool(lambda w: w.machine_ids),
        )
    return st.one_of(
        pool(lambda w: w.machine_ids),
        pool(lambda w: w.machine_ids),
        pool(lambda w: w.machine_ids),
        pool(lambda w: w.license_ids).map(lambda i: f"{i}.{'a' * 32}"),
    )


def string_hint(fd: FieldDescriptor, ctx: Ctx) -> st.SearchStrategy[str] | None:
    """Values of a known field name that pass validation (and name real records)."""
    name, owner = fd.name, fd.containing_type.name
    if name == "license_id":
        return license_ids(ctx)
    if name == "policy_id":
        return st.one_of(*[pool(lambda w: w.policy_ids)] * 4, st.just(UNKNOWN_ID))
    if name == "id":
        if "Machine" in owner or "Machine" in ctx.method:
            return machine_ids(ctx)
        if "Policy" in owner or "Polic" in ctx.method:
            return st.one_of(*[pool(lambda w: w.policy_ids)] * 4, st.just(UNKNOWN_ID))
        if owner == "UsageRecord":
            return st.one_of(st.sampled_from(["rec-1", "rec-2"]), SAFE_TOKEN)
        return license_ids(ctx)
    if name == "meter" or (name == "code" and owner == "Meter"):
        # the license's own counter, meter codes (mostly unknown to the world's policies)
        return st.sampled_from(["", "API_CALLS", "GPU_SECONDS", "A"])
    if name == "reservation_id":  # open ones of the license the caller names most often
        held = pool(lambda w: w.own_reservations if ctx.mine else w.reservations)
        return st.one_of(held, held, st.just(UNKNOWN_ID), st.builds(ids.new_id))
    if name == "request_id":  # mostly new ones; a few reused (replays, REQUEST_ID_REUSED)
        # one_of leans toward its first branch
        return st.one_of(fresh("rid"), st.sampled_from(["r-1", "seed-1"]), SAFE_TOKEN)
    if name == "fingerprint":
        return st.one_of(
            pool(lambda w: w.own_fingerprints if ctx.mine else w.fingerprints),
            st.sampled_from(["new-fp-1", "new-fp-2"]),
            SAFE_TOKEN,
        )
    if name == "key":
        return st.one_of(
            fresh("FUZZ-KEY"),  # a key no license has (yet)
            keyed(lambda w: w.own_key),
            keyed(lambda w: w.other_key),
            pool(lambda w: w.license_keys),
        )
    if name == "page_token":
        return st.one_of(
            st.just(""),
            pool(lambda w: w.page_tokens),
            st.tuples(st.text(max_size=20), st.sampled_from(["", UNKNOWN_ID])).map(
                lambda t: paging.encode(*t)
            ),
        )
    if name == "after_event_id":
        return st.one_of(
            pool(lambda w: w.event_ids),
            st.tuples(st.sampled_from([0, 1, 2**63 - 1, 2**64 - 1]), st.integers(0, 2**64)).map(
                lambda t: f"{t[0]}-{t[1]}"
            ),
            st.just(""),
        )
    if name in ("name", "hostname", "platform"):
        return st.text(max_size=30).filter(lambda s: "\x00" not in s)
    if name == "entitlements":
        return st.sampled_from(["feat-a", "feat-b", "feat-c"])
    return None


def hostile_hint(fd: FieldDescriptor, ctx: Ctx) -> st.SearchStrategy[str]:
    hint = string_hint(fd, ctx)
    if hint is None:
        return hostile_text()
    if fd.name == "page_token":
        return st.one_of(
            hostile_text(),
            st.binary(max_size=300).map(lambda b: base64.urlsafe_b64encode(b).decode()),
            st.sampled_from([b"[" * 5000, b'{"a":1,"s":""}', b'{"a":"x","s":"y"}' * 50]).map(
                lambda b: base64.urlsafe_b64encode(b).decode()
            ),
        )
    return st.one_of(hostile_text(), weird_variant(hint))


_TS_MAX = 253_402_300_799


def well_known(desc: Descriptor, fd: FieldDescriptor | None, valid: bool) -> Any:
    """Strategies of the well-known types the protos use: dicts of their fields."""
    full = desc.full_name
    if full == "google.protobuf.Timestamp":
        if valid:
            return st.fixed_dictionaries(
                {"seconds": st.integers(0, _TS_MAX), "nanos": st.integers(0, 999_999_999)}
            )
        return st.fixed_dictionaries(
            {
                "seconds": st.sampled_from(
                    [-(2**63), -62_135_596_801, -1, 0, _TS_MAX, _TS_MAX + 1, 2**63 - 1]
                )
                | st.integers(-(2**63), 2**63 - 1),
                "nanos": st.sampled_from([-1, 0, 999_999_999, 10**9, -(2**31), 2**31 - 1]),
            }
        )
    if full == "google.protobuf.Duration":
        if valid:
            seconds = st.one_of(  # an hour to a century (a license file's ttl: an hour or more)
                st.sampled_from([3600, 86_400, 30 * 86_400, 365 * 86_400]),
                st.integers(3600, 100 * 365 * 86_400),
            )
            return st.fixed_dictionaries({"seconds": seconds, "nanos": st.just(0)})
        return st.fixed_dictionaries(
            {
                "seconds": st.sampled_from(
                    [-(2**63), -1, 0, 315_576_000_000, 315_576_000_001, 2**63 - 1, 3_155_760_001]
                )
                | st.integers(-(2**63), 2**63 - 1),
                "nanos": st.sampled_from([-1, 0, 1, 999_999_999, 10**9, -(2**31), 2**31 - 1]),
            }
        )
    if full == "google.protobuf.FieldMask":
        names: list[str] = []
        if fd is not None:  # the paths name fields of the resource next to the mask
            for sibling in fd.containing_type.fields:
                if sibling.message_type is not None and sibling is not fd:
                    names += [
                        f.name
                        for f in sibling.message_type.fields
                        if not {field_behavior_pb2.OUTPUT_ONLY, field_behavior_pb2.IMMUTABLE}
                        & set(_behaviors(f))
                    ]
        names = names or ["name"]
        if valid:
            return st.one_of(
                st.lists(st.sampled_from(names), min_size=1, max_size=3),
                st.just(["*"]),
            ).map(lambda p: {"paths": p})
        return st.one_of(
            st.lists(st.one_of(st.sampled_from(names), hostile_text()), max_size=5),
            st.sampled_from([["*", "name"], ["duration.seconds"], ["metadata.k"], ["id"], []]),
            st.sampled_from(names).map(lambda n: [n] * 1000),
        ).map(lambda p: {"paths": p})
    return None


def scalar(fd: FieldDescriptor, ctx: Ctx, valid: bool) -> st.SearchStrategy[Any]:
    t = fd.type
    if t == T.TYPE_STRING:
        hint = string_hint(fd, ctx)
        if valid:
            return hint if hint is not None else SAFE_TOKEN
        return hostile_hint(fd, ctx)
    if t == T.TYPE_BYTES:
        return st.binary(max_size=64) if valid else st.binary(max_size=5000)
    if t == T.TYPE_BOOL:
        return st.booleans()
    if t in (T.TYPE_DOUBLE, T.TYPE_FLOAT):
        return st.floats(allow_nan=not valid, allow_infinity=not valid, width=32)
    if t == T.TYPE_ENUM:
        known = [v.number for v in fd.enum_type.values]
        if valid:
            return st.sampled_from(known)
        return st.one_of(
            st.sampled_from(known), st.sampled_from([max(known) + 1, 99, -1]), ints(fd)
        )
    if t in _INT_RANGES:
        if valid and fd.name == "cores":  # a core limit needs 1 or more
            return st.integers(1, 8)
        return valid_ints(fd) if valid else ints(fd)
    raise AssertionError(f"no strategy for {fd.full_name}")


MAX_DEPTH = 4


def value(fd: FieldDescriptor, ctx: Ctx, valid: bool, depth: int) -> st.SearchStrategy[Any]:
    """One value of a (singular) field, or one element of a repeated field."""
    if fd.type == T.TYPE_MESSAGE:
        return message(fd.message_type, ctx, "valid" if valid else "hostile", depth + 1, fd)
    return scalar(fd, ctx, valid)


def is_map(fd: FieldDescriptor) -> bool:
    return fd.type == T.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry and fd.is_repeated


def field_strategy(
    fd: FieldDescriptor, ctx: Ctx, valid: bool, depth: int
) -> st.SearchStrategy[Any]:
    if is_map(fd):
        k_fd, v_fd = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
        # map<string, string> (metadata) or map<string, int64> (meter_overrides)
        text_values = v_fd.type == T.TYPE_STRING
        filler: str | int = "v" if text_values else 1
        if valid:
            values = SAFE_TOKEN if text_values else value(v_fd, ctx, True, depth)
            return st.dictionaries(SAFE_TOKEN, values, max_size=3)
        return st.one_of(
            st.dictionaries(
                value(k_fd, ctx, False, depth), value(v_fd, ctx, False, depth), max_size=4
            ),
            st.integers(65, 300).map(lambda n: {f"k{i}": filler for i in range(n)}),
        )
    if fd.is_repeated:
        elem_valid = value(fd, ctx, True, depth)
        if valid:
            return st.lists(elem_valid, max_size=3)
        elem = value(fd, ctx, False, depth)
        return st.one_of(
            st.lists(st.one_of(elem, elem_valid), max_size=5),
            st.tuples(elem_valid, st.sampled_from([257, 1001, 2000])).map(lambda t: [t[0]] * t[1]),
        )
    return value(fd, ctx, valid, depth)


_STRATEGIES: dict[tuple[str, Ctx, str, int, str], st.SearchStrategy[dict[str, Any]]] = {}


def message(
    desc: Descriptor, ctx: Ctx, mode: str, depth: int = 0, fd: FieldDescriptor | None = None
) -> st.SearchStrategy[dict[str, Any]]:
    """A dict of a message's fields (for the message constructor). Modes: "valid" (every
    field valid or unset), "mutant" (valid but for one field), "hostile" (anything). Built
    once per message, context and mode."""
    key = (desc.full_name, ctx, mode, depth, fd.full_name if fd is not None else "")
    if key not in _STRATEGIES:
        _STRATEGIES[key] = _message(desc, ctx, mode, depth, fd)
    return _STRATEGIES[key]


def _message(
    desc: Descriptor, ctx: Ctx, mode: str, depth: int, fd: FieldDescriptor | None
) -> st.SearchStrategy[dict[str, Any]]:
    wk = well_known(desc, fd, mode == "valid")
    if wk is not None:
        return wk  # type: ignore[no-any-return]
    if depth > MAX_DEPTH:
        return st.just({})

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        fields = list(desc.fields)
        mutated = draw(st.sampled_from(fields)) if mode == "mutant" and fields else None
        out: dict[str, Any] = {}
        chosen_oneofs: dict[str, FieldDescriptor | None] = {}
        for f in fields:
            oneof = f.containing_oneof
            if oneof is not None and len(oneof.fields) > 1:  # a real oneof: one member at most
                if oneof.name not in chosen_oneofs:
                    chosen_oneofs[oneof.name] = draw(st.sampled_from([None, *oneof.fields]))
                if chosen_oneofs[oneof.name] is not f:
                    continue
            elif f is not mutated and not draw(st.integers(0, 99)) < _set_percent(f, mode):
                continue
            valid = mode == "valid" or (mode == "mutant" and f is not mutated)
            out[f.name] = draw(field_strategy(f, ctx, valid, depth))
        return out

    return build()


def _behaviors(f: FieldDescriptor) -> list[int]:
    return list(f.GetOptions().Extensions[field_behavior_pb2.field_behavior])


def _set_percent(f: FieldDescriptor, mode: str) -> int:
    """How often a field is set: a valid request sets its REQUIRED fields and the fields that
    name records (they reach the store), seldom the output-only ones."""
    if mode == "hostile":
        return 50
    behaviors = _behaviors(f)
    if field_behavior_pb2.REQUIRED in behaviors or f.name == "id":  # an update names its record
        return 95
    if field_behavior_pb2.OUTPUT_ONLY in behaviors:
        return 10
    if f.name in ("fingerprint", "key"):  # optional: must name a machine / be a free key
        return 25
    if f.type == T.TYPE_STRING and string_hint(f, Ctx("admin", "")) is not None:
        return 60
    return 30


def request_strategy(m: MethodDescriptor, ctx: Ctx) -> st.SearchStrategy[Message]:
    cls = GetMessageClass(m.input_type)
    return (
        st.sampled_from(["valid", "valid", "valid", "mutant", "mutant", "hostile"])
        .flatmap(lambda mode: message(m.input_type, ctx, mode))
        .map(lambda d: cls(**d))
    )


def malformed_bodies(m: MethodDescriptor, ctx: Ctx) -> st.SearchStrategy[bytes]:
    """Bytes that are (most likely) no valid message of the method's request type."""
    strings = [f for f in m.input_type.fields if f.type == T.TYPE_STRING]
    valid = request_strategy(m, ctx).map(lambda r: r.SerializeToString())
    options = [
        st.binary(min_size=1, max_size=200),
        st.tuples(valid, st.integers(1, 50)).map(
            lambda t: t[0][: max(0, len(t[0]) - t[1])] + b"\x0a\x7f"
        ),
        st.sampled_from(
            [
                b"\x0a\x05ab",
                b"\x00\x01",
                b"\x0e\x01",
                b"\x0f\x01",
                b"\x0b" * 200 + b"\x0c" * 200,
                b"\x0b" * 5000,
                b"\x08" + b"\xff" * 11,
                b"\x12\xff\xff\xff\xff\x0f",
            ]
        ),
        st.tuples(valid, st.binary(min_size=1, max_size=8)).map(lambda t: t[0] + b"\x07" + t[1]),
    ]
    if strings:
        options.append(
            st.tuples(
                st.sampled_from(strings),
                st.sampled_from([b"\xff\xfe", b"\xc0\x80", b"\xed\xa0\x80", b"a\x80"]),
            ).map(lambda t: bytes([t[0].number << 3 | 2, len(t[1])]) + t[1])
        )
    return st.one_of(options)


# --- calling, and what every answer must satisfy --------------------------------------------


def metadata(caller: str) -> tuple[tuple[str, str], ...]:
    if caller == "admin":
        return admin_md()
    if caller == "license key":
        return license_md(world().own_key)
    return ()


_PATH_PART = re.compile(
    r"([A-Za-z_][A-Za-z0-9_]*)(\[(?:\d+|'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")\])?"
)


def field_path_exists(desc: Descriptor, field_path: str) -> bool:
    """A BadRequest field like `items[3].amount`, `policy.metadata['k']`, `update_mask.paths`
    names fields of the request message."""
    pos, current = 0, desc
    while True:
        m = _PATH_PART.match(field_path, pos)
        if m is None or current is None:
            return False
        fd = current.fields_by_name.get(m[1])
        if fd is None:
            return False
        pos = m.end()
        if pos == len(field_path):
            return True
        if field_path[pos] != ".":
            return False
        pos += 1
        current = fd.message_type
        if current is not None and is_map(fd):
            current = fd.message_type.fields_by_name["value"].message_type


@dataclass
class Outcome:
    code: grpc.StatusCode
    effect: bool  # something was applied (an OK answer, or an OK item)
    reasons: set[str] = field(default_factory=set)  # of the call's refusal and its items'


def check_error(
    m: MethodDescriptor,
    code: grpc.StatusCode,
    reason: str,
    domain: str,
    bad_fields: list[str],
    field_ok: Callable[[str], bool],
    where: str,
) -> None:
    """A status answered for a client's request: a SPEC §4 error with its details."""
    assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), where
    if m.server_streaming and not m.client_streaming and code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return  # a watch that waits for events (the call's deadline is short)
    assert code in SPEC_CODES, where
    assert domain == DOMAIN, where
    assert reason in {r.value for r in Reason} and STATUS_CODES[Reason(reason)] == code, where
    if reason == "INVALID_ARGUMENT":
        assert bad_fields, where
        for f in bad_fields:
            assert field_ok(f), (f, where)


def check_status_proto(m: MethodDescriptor, s: status_pb2.Status, where: str) -> str:
    """An item's error inside an OK answer (StreamUsage, BatchIncrementUsage)."""
    code = grpc.StatusCode.OK
    for c in grpc.StatusCode:
        if c.value[0] == s.code:
            code = c
    reason = domain = ""
    bad: list[str] = []
    for d in s.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            reason, domain = info.reason, info.domain
        elif d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            d.Unpack(br)
            bad += [v.field for v in br.field_violations]
    if code == grpc.StatusCode.INTERNAL:
        raise AssertionError(f"an item answered INTERNAL: {where}")
    # an item's error names the field in the request (`items[3].amount`) or in the item
    # (a StreamUsage message, an IncrementUsageRequest)
    check_error(
        _INCREMENT,
        code,
        reason,
        domain,
        bad,
        lambda f: field_path_exists(m.input_type, f) or field_path_exists(_INCREMENT.input_type, f),
        where,
    )
    return reason


_INCREMENT = usage_service_pb2.DESCRIPTOR.services_by_name["UsageService"].methods_by_name[
    "IncrementUsage"
]


async def invoke(
    m: MethodDescriptor, caller: str, bodies: list[bytes], raw: bool, where: str
) -> Outcome:
    """Sends the bodies (one, or several on a request stream) with identity serializers and
    checks every answer."""
    w = world()
    ch = w.channel
    p = path(m)
    md = metadata(caller)
    out_cls = GetMessageClass(m.output_type)
    answers: list[Message] = []
    reasons: set[str] = set()
    timeout = WATCH_DEADLINE_S if m.server_streaming and not m.client_streaming else CALL_TIMEOUT_S
    try:
        if m.client_streaming:
            call: Any = ch.stream_stream(p, None, None)(metadata=md, timeout=timeout)
            # Without credentials the call is refused when it opens, whatever it would carry.
            # Else in lockstep: each message written once the previous one is answered, so no
            # write races the server ending the call (the client would report that write as
            # its own INTERNAL, hiding the server's status).
            for b in bodies if caller != "nobody" else []:
                try:
                    await call.write(b)
                except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
                    break
                if m.server_streaming:
                    a = await call.read()
                    if a is grpc.aio.EOF:
                        break
                    answers.append(out_cls.FromString(a))
            try:
                await call.done_writing()
            except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
                pass
            while m.server_streaming:
                a = await call.read()
                if a is grpc.aio.EOF:
                    break
                answers.append(out_cls.FromString(a))
            if not m.server_streaming:
                answers.append(out_cls.FromString(await call))
            if await call.code() != grpc.StatusCode.OK:
                raise grpc.aio.AioRpcError(
                    await call.code(),
                    await call.initial_metadata(),
                    await call.trailing_metadata(),
                    await call.details(),
                )
        elif m.server_streaming:
            call = ch.unary_stream(p, None, None)(bodies[0], metadata=md, timeout=timeout)
            async for a in call:
                answers.append(out_cls.FromString(a))
        else:
            answers.append(
                out_cls.FromString(
                    await ch.unary_unary(p, None, None)(bodies[0], metadata=md, timeout=timeout)
                )
            )
        code = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        err = rich_error(exc)
        code = err.code
        reasons.add(err.reason)
        CALLS.setdefault((m.name + " fields", caller), []).extend(err.bad_fields[:1])
        check_error(
            m,
            code,
            err.reason,
            err.domain,
            err.bad_fields,
            lambda f: (raw and f == "") or field_path_exists(m.input_type, f),
            f"{where}: {err}",
        )
    # per-item answers (StreamUsage messages, BatchIncrementUsage results): `result` or `error`
    items = [x for a in answers for x in _outcomes(a)]
    for item in items:
        if item.WhichOneof("outcome") == "error":
            reasons.add(check_status_proto(m, item.error, f"{where}: {item}"))
    if items:
        effect = any(i.WhichOneof("outcome") == "result" for i in items)
    else:  # a watch only reads; a stream without answers did nothing
        effect = code == grpc.StatusCode.OK and not m.server_streaming and not m.client_streaming
    return Outcome(code, effect, reasons)


def _outcomes(answer: Message) -> list[Any]:
    """The messages of an answer that carry a per-item `outcome` (result or error)."""
    out: list[Any] = []
    if "outcome" in answer.DESCRIPTOR.oneofs_by_name:
        out.append(answer)
    for f in answer.DESCRIPTOR.fields:
        carries = f.message_type is not None and "outcome" in f.message_type.oneofs_by_name
        if f.is_repeated and carries and not is_map(f):
            out += list(getattr(answer, f.name))
    return out


async def healthy() -> None:
    stub = health_pb2_grpc.HealthStub(world().channel)
    resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def one_call(
    m: MethodDescriptor,
    caller: str,
    bodies: list[bytes],
    requests: list[Message | None],
    raw: bool,
) -> Outcome:
    """One example: the call, then the keyspace and health checks."""
    w = world()
    where = f"{m.name} as {caller}: {[r for r in requests if r is not None] or bodies!r}"[:3000]
    try:
        outcome = await invoke(m, caller, bodies, raw, where)
        w.calls.setdefault((m.name, caller), []).append(outcome.code.name)
        await _check_state(m, outcome, requests, where)
    except BaseException:
        w.snap, w.snap_at = await snapshot(w.redis), time.monotonic()  # the next example's base
        raise
    await healthy()
    return outcome


async def _check_state(
    m: MethodDescriptor, outcome: Outcome, requests: list[Message | None], where: str
) -> None:
    w = world()
    after = await snapshot(w.redis)
    if outcome.effect and not m.name.startswith(READ_ONLY_PREFIXES):
        await _after_success(m, requests[0] if requests else None)
        w.snap, w.snap_at = await snapshot(w.redis), time.monotonic()
    else:
        elapsed = int((time.monotonic() - w.snap_at) * 1000)
        changed = changed_keys(w.snap, after, elapsed)
        allowed: set[bytes] = set()
        if not m.name.startswith(READ_ONLY_PREFIXES) and outcome.reasons & STORED_REFUSALS:
            items = [i for r in requests if r is not None for i in _items(r)]
            allowed = {
                k
                for k in stored_refusal_keys(items)
                if k not in w.snap  # a new record of this refusal; an existing one is replayed
            }
        bad = [k for k in changed if k not in allowed]
        before, w.snap, w.snap_at = w.snap, after, time.monotonic()
        if bad:
            detail = [(k, await readable(w.redis, k), k in before) for k in bad[:5]]
            raise AssertionError(f"{where} answered {outcome.code.name} and changed {detail}")


def _items(request: Message) -> list[Message]:
    """The request and the sub-requests it carries (a batch's items)."""
    out = [request]
    for f in request.DESCRIPTOR.fields:
        if f.is_repeated and f.message_type is not None and not is_map(f):
            out += list(getattr(request, f.name))
    return out


async def _after_success(m: MethodDescriptor, request: Message | None) -> None:
    if request is None:
        return
    w = world()
    rid = getattr(request, "id", "") if "id" in request.DESCRIPTOR.fields_by_name else ""
    if m.name.startswith(("Delete", "Deactivate")) and rid:
        kind = "policy" if "Polic" in m.name else "machine" if "Machine" in m.name else "license"
        await _replace(w, kind, rid)


# --- the tests -------------------------------------------------------------------------------


def test_every_rpc_of_the_services_is_fuzzed() -> None:
    """The RPCs fuzzed are those the service descriptors hold, every one of them."""
    declared = [
        f"meter.v1.{s.name}"
        for f in SERVICE_FILES
        for s in descriptor_pb2.FileDescriptorProto.FromString(f.serialized_pb).service
    ]
    assert sorted(s.full_name for s in SERVICES) == sorted(declared)
    assert len(METHODS) == sum(len(s.methods) for s in SERVICES)
    assert len({path(m) for m in METHODS}) == len(METHODS)


# No shrinking: the examples run against one server whose state each call may change, so a
# replay is not the same test, and shrinking a failure would take minutes; the first failing
# example is reported as it was (with the state changes it made, in the message).
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


async def _generated(m: MethodDescriptor, caller: str, data: st.DataObject) -> None:
    ctx = Ctx(caller, m.name)
    if m.client_streaming:
        requests = data.draw(st.lists(request_strategy(m, ctx), min_size=1, max_size=4))
    else:
        requests = [data.draw(request_strategy(m, ctx))]
    await one_call(m, caller, [r.SerializeToString() for r in requests], list(requests), False)


@pytest.mark.parametrize("m", METHODS, ids=method_id)
@FUZZ
@given(data=st.data())
async def test_generated_requests_as_admin(
    fuzz_world: World, m: MethodDescriptor, data: st.DataObject
) -> None:
    await _generated(m, "admin", data)


@pytest.mark.parametrize("m", METHODS, ids=method_id)
@FUZZ
@given(data=st.data())
async def test_generated_requests_with_a_license_key(
    fuzz_world: World, m: MethodDescriptor, data: st.DataObject
) -> None:
    await _generated(m, "license key", data)


@pytest.mark.parametrize("m", METHODS, ids=method_id)
@settings(FUZZ, max_examples=max(3, EXAMPLES // 4))
@given(data=st.data())
async def test_generated_requests_without_credentials(
    fuzz_world: World, m: MethodDescriptor, data: st.DataObject
) -> None:
    await _generated(m, "nobody", data)


def _parses(m: MethodDescriptor, body: bytes) -> Message | None:
    try:
        return GetMessageClass(m.input_type).FromString(body)  # type: ignore[no-any-return]
    except Exception:
        return None


@pytest.mark.parametrize("m", METHODS, ids=method_id)
@settings(FUZZ, max_examples=RAW_EXAMPLES)
@given(data=st.data())
async def test_malformed_bodies(
    fuzz_world: World, m: MethodDescriptor, data: st.DataObject
) -> None:
    caller = data.draw(st.sampled_from(CALLERS))
    ctx = Ctx(caller, m.name)
    if m.client_streaming:
        bodies = data.draw(
            st.lists(
                st.one_of(
                    malformed_bodies(m, ctx),
                    request_strategy(m, ctx).map(lambda r: r.SerializeToString()),
                ),
                min_size=1,
                max_size=4,
            )
        )
    else:
        bodies = [data.draw(malformed_bodies(m, ctx))]
    parsed = [_parses(m, b) for b in bodies]
    outcome = await one_call(m, caller, bodies, parsed, True)
    first_bad = next((i for i, p in enumerate(parsed) if p is None), None)
    if first_bad is None:
        return  # the bytes happen to be a message: any answer the checks above allow
    if m.client_streaming and caller == "nobody":
        assert outcome.code == grpc.StatusCode.UNAUTHENTICATED
    elif not m.client_streaming:
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (bodies, outcome)
    else:  # a request stream ends at its first malformed message, or at an earlier refusal
        assert outcome.code in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.PERMISSION_DENIED,
        ), (bodies, outcome)


def test_each_rpc_was_called_by_every_caller(request: pytest.FixtureRequest) -> None:
    """The fuzz tests above ran (they are collected before this one): every RPC, every caller;
    and the generated requests reached past validation (some call of each RPC succeeded)."""
    selected = [
        item
        for item in request.session.items
        if item.module is request.module and item.name.startswith(("test_generated", "test_malf"))
    ]
    if len(selected) < 4 * len(METHODS):
        pytest.skip("only some of the fuzz tests were selected")
    w = CALLS
    for (name, caller), codes in sorted(w.items()):
        print(
            f"{name:22} {caller:12} "
            + " ".join(f"{c}={codes.count(c)}" for c in sorted(set(codes)))
        )
    w = {k: v for k, v in w.items() if not k[0].endswith(" fields")}
    missing = [(m.name, c) for m in METHODS for c in CALLERS if (m.name, c) not in w]
    assert not missing, missing
    never_ok = [
        m.name
        for m in METHODS
        if not any("OK" in w[(m.name, c)] for c in ("admin", "license key"))
        and not (m.server_streaming and any("DEADLINE_EXCEEDED" in w[(m.name, c)] for c in CALLERS))
        # Succeeds only for a configured export sink: the fuzz server has none (its keyspace
        # must not change behind the snapshots), so every call names an unknown sink;
        # tests/test_export.py replays dead letters and forgets removed sinks with sinks.
        and m.name not in ("ReplayDeadLetters", "ForgetExportSink")
    ]
    # client mistakes are logged at most once per burst (10 s), never with a traceback
    assert not [r for r in LOGGED if r.exc_info], [r.getMessage() for r in LOGGED if r.exc_info]
    elapsed = time.monotonic() - FIRST_CALL[0] if FIRST_CALL else 0.0
    assert len(LOGGED) <= 2 + elapsed / 10, [r.getMessage() for r in LOGGED]
    # Reaching past validation is a matter of chance per run: asserted where the examples are
    # the same on every run (CI), reported otherwise.
    if os.environ.get("CI") and EXAMPLES >= 20:
        assert not never_ok, never_ok
    elif never_ok:
        print(f"no call of {never_ok} succeeded in this run")
