"""Who is calling: an admin token or a license key (SPEC §5)."""

from __future__ import annotations

import contextvars
import hmac
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from meter_grpc.domain.clock import Clock
from meter_grpc.domain.errors import MeterError, Reason
from meter_grpc.domain.models import KeyHolder

LICENSE = "/meter.v1.LicenseService/"
USAGE = "/meter.v1.UsageService/"

# Methods a `License <key>` caller may use, each on its own license only.
LICENSE_KEY_METHODS = frozenset(
    [
        LICENSE + "ValidateLicense",
        LICENSE + "ActivateMachine",
        LICENSE + "DeactivateMachine",
        LICENSE + "MachineHeartbeat",
        LICENSE + "CheckInLicense",
        LICENSE + "CheckOutLicense",
        LICENSE + "GetPublicKey",
        USAGE + "IncrementUsage",
        USAGE + "BatchIncrementUsage",
        USAGE + "GetUsage",
        USAGE + "SyncUsage",
        USAGE + "StreamUsage",
        USAGE + "WatchUsage",
    ]
)


@dataclass(frozen=True, slots=True)
class Principal:
    """`license_id` is empty for an admin."""

    license_id: str = ""


ADMIN = Principal()
_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal", default=ADMIN)


def current() -> Principal:
    return _current.get()


def set_current(p: Principal) -> None:
    _current.set(p)


def require_license(license_id: str) -> None:
    """PERMISSION_DENIED when a license-key caller names another license."""
    p = _current.get()
    if p.license_id and p.license_id != license_id:
        raise MeterError(
            Reason.PERMISSION_DENIED,
            "a license key may only act on its own license",
            metadata={"license_id": license_id},
        )


def _denied(method: str) -> MeterError:
    return MeterError(
        Reason.PERMISSION_DENIED,
        f"a license key may not call {method.rsplit('/', 1)[-1]}",
        metadata={"method": method},
    )


def _unauthenticated(message: str) -> MeterError:
    return MeterError(Reason.UNAUTHENTICATED, message)


class KeyCache:
    """license key -> KeyHolder; ids are never reused and keys never change, so the id of a
    hit stays right until the license is deleted (then every script answers
    LICENSE_NOT_FOUND). Its expiry may have changed since: a refusal is always re-read."""

    def __init__(self, size: int = 10_000, ttl_s: float = 60.0) -> None:
        self.size, self.ttl_s = size, ttl_s
        self._items: OrderedDict[str, tuple[KeyHolder, float]] = OrderedDict()

    def get(self, key: str) -> KeyHolder | None:
        item = self._items.get(key)
        if item is None or item[1] < time.monotonic():
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: str, holder: KeyHolder) -> None:
        self._items[key] = (holder, time.monotonic() + self.ttl_s)
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)


class Authenticator:
    def __init__(
        self,
        admin_tokens: Sequence[str],
        key_holder: Callable[[str], Awaitable[KeyHolder | None]],
        clock: Clock,
    ) -> None:
        self._tokens = [t.encode() for t in admin_tokens]
        self._lookup = key_holder
        self._clock = clock
        self._cache = KeyCache()

    def _is_admin_token(self, token: str) -> bool:
        given = token.encode()
        ok = False
        for t in self._tokens:  # compare with every token: timing says nothing about which
            ok |= hmac.compare_digest(given, t)
        return ok

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
            holder = self._cache.get(credential)
            if holder is None or holder.revoked(self._clock.now_ms()):
                holder = await self._lookup(credential)  # a refusal is never from the cache
                if holder is None:
                    raise _unauthenticated("unknown license key")
                self._cache.put(credential, holder)
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
            return Principal(holder.license_id)
        raise _unauthenticated("authorization must be 'Bearer <admin token>' or 'License <key>'")
