"""Who is calling: an admin token or a license key (SPEC §5)."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hmac
import inspect
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor

from meter_grpc.domain.clock import Clock
from meter_grpc.domain.errors import MeterError, Reason
from meter_grpc.domain.ids import license_id_of_machine
from meter_grpc.domain.models import KeyHolder

LICENSE = "/meter.v1.LicenseService/"
USAGE = "/meter.v1.UsageService/"

# Services anyone may call without credentials; every other method of the server is
# authenticated, and a license key may call only the methods of LICENSE_KEY_METHODS.
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


@dataclass(frozen=True, slots=True)
class Owns:
    """Which request field names the license a license-key caller acts on.

    `field` holds a license id, or with `machine` a machine id (its license id is its
    prefix); `key_field`, when that member of the request's `license` oneof is set, holds a
    license key instead (the caller's own key, or PERMISSION_DENIED). `field = None`: the
    method names no license (GetPublicKey). `each`: the request carries a repeated message
    field of that name, and every element names a license by `field` (a batch)."""

    field: str | None
    machine: bool = False
    key_field: str | None = None
    each: str | None = None


# The one table of what a `License <key>` caller may do (SPEC §5): each method it may call,
# and the request field naming the license, which must be its own. The interceptor enforces
# it for unary and streaming requests alike (every message of a request stream); anything
# not listed is PERMISSION_DENIED for a license key.
LICENSE_KEY_METHODS: dict[str, Owns] = {
    LICENSE + "ValidateLicense": Owns("license_id", key_field="key"),
    LICENSE + "ActivateMachine": Owns("license_id"),
    LICENSE + "DeactivateMachine": Owns("id", machine=True),
    LICENSE + "MachineHeartbeat": Owns("id", machine=True),
    LICENSE + "CheckInLicense": Owns("id"),
    LICENSE + "CheckOutLicense": Owns("id"),
    LICENSE + "GetPublicKey": Owns(None),
    USAGE + "IncrementUsage": Owns("license_id"),
    USAGE + "BatchIncrementUsage": Owns("license_id", each="items"),
    USAGE + "GetUsage": Owns("license_id"),
    USAGE + "ListUsage": Owns("license_id"),
    USAGE + "ReserveUsage": Owns("license_id"),
    USAGE + "CommitReservation": Owns("license_id"),
    USAGE + "ReleaseReservation": Owns("license_id"),
    USAGE + "SyncUsage": Owns("license_id"),
    USAGE + "StreamUsage": Owns("license_id"),
    USAGE + "WatchUsage": Owns("license_id"),
}


@dataclass(frozen=True, slots=True)
class Principal:
    """`license_id` is empty for an admin; `key`: the license key it authenticated with."""

    license_id: str = ""
    key: str = field(default="", repr=False)


ADMIN = Principal()
# No default: a code path that runs without the interceptor having authenticated its
# caller has no principal, and current() refuses it (deny by default).
_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal")


def current() -> Principal:
    """The authenticated caller of this call; PERMISSION_DENIED when none was set."""
    p = _current.get(None)
    if p is None:
        raise MeterError(
            Reason.PERMISSION_DENIED,
            "no authenticated caller: every call must pass through the authenticating interceptor",
        )
    return p


def set_current(p: Principal) -> None:
    _current.set(p)


def _other_license(license_id: str) -> MeterError:
    return MeterError(
        Reason.PERMISSION_DENIED,
        "a license key may only act on its own license",
        metadata={"license_id": license_id},
    )


def named_license(owns: Owns, request: Any) -> str:
    """The license id a request names under `owns` ('' when none); not for key_field."""
    if owns.field is None:
        return ""
    value = getattr(request, owns.field, "")
    if not isinstance(value, str):
        return ""
    if owns.machine:
        return license_id_of_machine(value) or ""
    return value


def guard(servicer: Any, service: ServiceDescriptor) -> Any:
    """Makes every RPC of `servicer` (the methods of `service`) refuse a call without a
    principal, so a servicer reached by any path that skipped the interceptor answers
    PERMISSION_DENIED instead of acting as someone. Returns the servicer."""
    for m in service.methods:
        inner = getattr(servicer, m.name)
        setattr(servicer, m.name, _guarded(inner))
    return servicer


def _guarded(inner: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(inner):

        @functools.wraps(inner)
        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            current()
            async for item in inner(request, context):
                yield item

        return stream

    @functools.wraps(inner)
    async def unary(request: Any, context: Any) -> Any:
        current()
        return await inner(request, context)

    return unary


def _denied(method: str) -> MeterError:
    return MeterError(
        Reason.PERMISSION_DENIED,
        f"a license key may not call {method.rsplit('/', 1)[-1]}",
        metadata={"method": method},
    )


def _unauthenticated(message: str) -> MeterError:
    return MeterError(Reason.UNAUTHENTICATED, message)


# The key cache (per replica): how long an answer about a license key is trusted, and how
# many keys it remembers. A rotated, deleted or expired (REVOKE_ACCESS) key stops
# authenticating within KEY_CACHE_TTL_S on every replica; a key unknown when looked up is
# refused from the cache for at most UNKNOWN_KEY_TTL_S (at once on the replica that creates it).
KEY_CACHE_TTL_S = 1.0
KEY_CACHE_SIZE = 10_000
UNKNOWN_KEY_TTL_S = 1.0
UNKNOWN_KEY_CACHE_SIZE = 10_000


class KeyCache:
    """key digest -> KeyHolder (or "unknown"), each for at most a second, in two LRUs of
    bounded size: a flood of random keys costs one store read per distinct key per second
    (while fewer than UNKNOWN_KEY_CACHE_SIZE distinct keys arrive in a second) and never more
    memory than the bound. A holder's expiry may have changed since: a refusal by expiry is
    always re-read."""

    def __init__(
        self,
        size: int = KEY_CACHE_SIZE,
        ttl_s: float = KEY_CACHE_TTL_S,
        unknown_size: int = UNKNOWN_KEY_CACHE_SIZE,
        unknown_ttl_s: float = UNKNOWN_KEY_TTL_S,
    ) -> None:
        self.size, self.ttl_s = size, ttl_s
        self.unknown_size, self.unknown_ttl_s = unknown_size, unknown_ttl_s
        self._items: OrderedDict[str, tuple[KeyHolder, float]] = OrderedDict()
        self._unknown: OrderedDict[str, float] = OrderedDict()

    def get(self, digest: str) -> KeyHolder | None:
        item = self._items.get(digest)
        if item is None or item[1] < time.monotonic():
            return None
        self._items.move_to_end(digest)
        return item[0]

    def put(self, digest: str, holder: KeyHolder) -> None:
        self._unknown.pop(digest, None)
        self._items[digest] = (holder, time.monotonic() + self.ttl_s)
        self._items.move_to_end(digest)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def is_unknown(self, digest: str) -> bool:
        until = self._unknown.get(digest)
        if until is None:
            return False
        if until < time.monotonic():
            del self._unknown[digest]
            return False
        return True

    def put_unknown(self, digest: str) -> None:
        self._unknown[digest] = time.monotonic() + self.unknown_ttl_s
        self._unknown.move_to_end(digest)
        while len(self._unknown) > self.unknown_size:
            self._unknown.popitem(last=False)

    def forget(self, digest: str) -> None:
        self._items.pop(digest, None)
        self._unknown.pop(digest, None)

    def __len__(self) -> int:
        return len(self._items) + len(self._unknown)


class Authenticator:
    def __init__(
        self,
        admin_tokens: Sequence[str],
        key_holder: Callable[[str], Awaitable[KeyHolder | None]],
        clock: Clock,
        key_digest: Callable[[str], str],
    ) -> None:
        """`key_holder` reads the holder of a key digest from the store; `key_digest` is how
        keys are stored (HMAC-SHA256 under the server secret)."""
        self._tokens = [t.encode() for t in admin_tokens]
        self._lookup = key_holder
        self._digest = key_digest
        self._clock = clock
        self.cache = KeyCache()
        self._reads: dict[str, asyncio.Task[KeyHolder | None]] = {}
        self._claims = 0  # keys made valid on this replica: an older "unknown" is not cached

    def key_claimed(self, digest: str) -> None:
        """A key was made valid on this replica (create, rotation): forget it was unknown."""
        self._claims += 1
        self.cache.forget(digest)

    def _is_admin_token(self, token: str) -> bool:
        given = token.encode()
        ok = False
        for t in self._tokens:  # compare with every token: timing says nothing about which
            ok |= hmac.compare_digest(given, t)
        return ok

    async def _holder(self, key: str) -> KeyHolder | None:
        """The holder of `key`: from the cache (no store call), else one read shared by every
        concurrent caller with the same key (a GET of the index and an HMGET of the license)."""
        digest = self._digest(key)
        holder = self.cache.get(digest)
        if holder is not None and not holder.revoked(self._clock.now_ms()):
            return holder
        if holder is None and self.cache.is_unknown(digest):
            return None
        read = self._reads.get(digest)
        if read is None:
            read = asyncio.ensure_future(self._read(digest))
            self._reads[digest] = read
            read.add_done_callback(functools.partial(self._read_done, digest))
        return await asyncio.shield(read)

    def _read_done(self, digest: str, read: asyncio.Task[KeyHolder | None]) -> None:
        if self._reads.get(digest) is read:
            del self._reads[digest]
        if not read.cancelled():
            read.exception()  # retrieved: every waiter may have been cancelled meanwhile

    async def _read(self, digest: str) -> KeyHolder | None:
        claims = self._claims
        holder = await self._lookup(digest)
        if holder is not None:
            self.cache.put(digest, holder)
        elif claims == self._claims:  # no key was made valid here while it was read
            self.cache.put_unknown(digest)
        return holder

    async def authorize(self, method: str, principal: Principal, request: Any) -> None:
        """PERMISSION_DENIED unless `principal` may make this request: an admin may make any;
        a license key only those of LICENSE_KEY_METHODS naming its own license."""
        if not principal.license_id:
            return
        owns = LICENSE_KEY_METHODS.get(method)
        if owns is None:
            raise _denied(method)
        if owns.field is None:
            return
        if owns.key_field is not None and request.WhichOneof("license") == owns.key_field:
            key = getattr(request, owns.key_field)
            holder = await self._holder(key) if key else None
            if holder is None or holder.license_id != principal.license_id:
                raise _other_license("")
            return
        for item in getattr(request, owns.each) if owns.each else (request,):
            license_id = named_license(owns, item)
            if license_id != principal.license_id:
                raise _other_license(license_id)

    async def authenticate(self, method: str, authorization: str | None) -> Principal:
        if not authorization:
            raise _unauthenticated(
                "missing authorization metadata: 'Bearer <admin token>' or 'License <key>'"
            )
        scheme, _, credential = authorization.strip().partition(" ")
        credential = credential.strip()
        scheme = scheme.lower()
        if scheme == "bearer":
            if credential and self._is_admin_token(credential):
                return ADMIN
            raise _unauthenticated("invalid admin token")
        if scheme == "license":
            if not credential:
                raise _unauthenticated("empty license key")
            holder = await self._holder(credential)
            if holder is None:
                raise _unauthenticated("unknown license key")
            if method not in LICENSE_KEY_METHODS:
                raise _denied(method)
            if holder.revoked(self._clock.now_ms()):
                raise MeterError(
                    Reason.LICENSE_EXPIRED,
                    "the license has expired and its policy revokes access: "
                    "its key no longer authenticates",
                    metadata={
                        "license_id": holder.license_id,
                        "expiration_strategy": "REVOKE_ACCESS",
                    },
                )
            return Principal(holder.license_id, credential)
        raise _unauthenticated("authorization must be 'Bearer <admin token>' or 'License <key>'")
