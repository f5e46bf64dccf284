"""Usage reservations held by a client: `with client.reserve(...) as r: ... r.commit(n)`.

A Reservation (blocking) or AsyncReservation holds units of a counter (ReserveUsage) for
work whose cost is known only when it ends. `commit(amount)` pays what was used (at most the
amount held; 0 = all) and frees the rest; `release()` frees everything. Leaving the `with`
block without a commit releases the hold, on an exception as on a normal exit, so a failed
job never keeps units out of reach until its ttl. Each handle sends its commit and its
release under request ids of its own (the same on every retry), so calling commit() again
after an UNAVAILABLE error never counts twice.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Any

from meter.v1 import usage_service_pb2 as upb

if TYPE_CHECKING:
    from meter_grpc.client.aio import AsyncMeterClient
    from meter_grpc.client.sync import MeterClient

log = logging.getLogger("meter_grpc.client")


class _Held:
    def __init__(self, response: upb.ReserveUsageResponse) -> None:
        self.response = response
        self.reservation: upb.Reservation = response.reservation
        self.usage: upb.MeterUsage = response.usage
        # The answer of the commit or release that closed it (None while open).
        self.closed_by: upb.CommitReservationResponse | upb.ReleaseReservationResponse | None = None
        token = uuid.uuid4().hex
        self._commit_id = f"commit-{token}"
        self._release_id = f"release-{token}"

    @property
    def id(self) -> str:
        return self.reservation.id

    @property
    def license_id(self) -> str:
        return self.reservation.license_id

    @property
    def amount(self) -> int:
        return self.reservation.amount

    @property
    def closed(self) -> bool:
        return self.closed_by is not None

    def _commit_request(self, amount: int) -> upb.CommitReservationRequest:
        return upb.CommitReservationRequest(
            license_id=self.license_id,
            reservation_id=self.id,
            amount=amount,
            request_id=self._commit_id,
        )

    def _release_request(self) -> upb.ReleaseReservationRequest:
        return upb.ReleaseReservationRequest(
            license_id=self.license_id, reservation_id=self.id, request_id=self._release_id
        )


class Reservation(_Held):
    """A hold made by MeterClient.reserve(); a context manager that releases it unless
    committed."""

    def __init__(self, client: MeterClient, response: upb.ReserveUsageResponse) -> None:
        super().__init__(response)
        self._client = client

    def commit(self, amount: int = 0) -> upb.CommitReservationResponse:
        """Counts `amount` (0: all held) and frees the rest."""
        r = self._client._call(self._client._usage.CommitReservation, self._commit_request(amount))
        self.closed_by = r
        return r

    def release(self) -> upb.ReleaseReservationResponse:
        r = self._client._call(self._client._usage.ReleaseReservation, self._release_request())
        self.closed_by = r
        return r

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.closed:
            return
        try:
            self.release()
        except Exception:
            if exc is None:
                raise
            # the block's own exception matters more; the hold expires at its expire_time
            log.warning("could not release reservation %s", self.id, exc_info=True)


class AsyncReservation(_Held):
    """A hold made by AsyncMeterClient.reserve(); `async with` releases it unless committed."""

    def __init__(self, client: AsyncMeterClient, response: upb.ReserveUsageResponse) -> None:
        super().__init__(response)
        self._client = client

    async def commit(self, amount: int = 0) -> upb.CommitReservationResponse:
        r = await self._client._call(
            self._client._usage.CommitReservation, self._commit_request(amount)
        )
        self.closed_by = r
        return r

    async def release(self) -> upb.ReleaseReservationResponse:
        r = await self._client._call(
            self._client._usage.ReleaseReservation, self._release_request()
        )
        self.closed_by = r
        return r

    async def __aenter__(self) -> AsyncReservation:
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.closed:
            return
        try:
            await self.release()
        except Exception:
            if exc is None:
                raise
            log.warning("could not release reservation %s", self.id, exc_info=True)
