"""What the exporter hands a sink, and what a sink answers for each event.

An `ExportEvent` is one counted change of one counter (a license's own counter or one of
its meters), read from the outbox. Its `id` is deterministic: the same on every retry and
every replica, so a sink that deduplicates by it bills the change exactly once.
A sink answers one `Outcome` per event, in the order given: delivered (also when the
billing system says it already has it), retry later (throttled, 5xx, network), or dead
(the billing system refuses it for good: it goes to the dead-letter list an admin can
read and replay).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


class Kind(enum.StrEnum):
    INCREMENT = "increment"
    DECREMENT = "decrement"
    RESET = "reset"  # delta = -(count before the reset); uses = the count after (0)
    SYNC = "sync"  # a SyncUsage record
    COMMIT = "commit"  # a reservation's commit


@dataclass(frozen=True, slots=True)
class ExportEvent:
    id: str  # deterministic: the same on every retry and replica (the sinks' dedup key)
    license_id: str
    policy_id: str
    meter: str  # "" for the license's own counter
    kind: Kind
    delta: int  # signed change of the counter
    uses: int  # the counter after the change (the absolute value for LATEST-style meters)
    request_id: str  # the caller's idempotency key, "" when none
    time_ms: int  # when the change was counted (Unix ms); identical on every retry
    # The license's metadata at export time (for Lago's external_subscription_id,
    # OpenMeter's subject, Stripe's customer mapping); empty when the license is gone.
    license_metadata: Mapping[str, str] = field(default_factory=dict)
    # When this sink was first tried with this event (Unix ms); 0 = never before. A sink
    # whose billing system deduplicates only for a while (Stripe: 24 h) refuses to resend
    # an event first tried longer ago than that, rather than risk billing it twice.
    first_attempt_ms: int = 0


class Verdict(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: Verdict
    # RETRY: seconds to wait at least (a 429's reset header), None = the exporter's backoff.
    retry_after_s: float | None = None
    # RETRY and DEAD: what the billing system said (status code and body, shortened).
    reason: str = ""
    # RETRY: False when the event was not sent at all (held back behind another event's
    # retry in the same delivery): not a failed attempt, so it adds nothing to its backoff.
    sent: bool = True

    @staticmethod
    def delivered() -> Outcome:
        return _DELIVERED

    def unsent(self) -> Outcome:
        """This retry for an event held back without being sent."""
        return dataclasses.replace(self, sent=False)


_DELIVERED = Outcome(Verdict.DELIVERED)


class Sink(Protocol):
    """One billing system. `deliver` never raises for what the billing system answers; it
    raises only for a bug. It is called with at most `max_batch` events, in per-license
    order, and never concurrently with itself."""

    name: str  # "lago", "m3ter", "openmeter", "stripe", "ndjson"
    max_batch: int

    async def deliver(self, events: Sequence[ExportEvent]) -> list[Outcome]: ...

    async def close(self) -> None: ...
