"""Ids sort in the order they were minted, also within one millisecond."""

from __future__ import annotations

import uuid

from meter_grpc.domain import ids


def test_ids_minted_in_one_process_are_strictly_increasing() -> None:
    minted = [ids.new_id() for _ in range(20_000)]  # thousands per millisecond
    assert minted == sorted(minted)
    assert len(set(minted)) == len(minted)
    for text in (minted[0], minted[-1]):
        value = uuid.UUID(text)
        assert (value.version, value.variant) == (7, uuid.RFC_4122)
        assert abs(ids.wall_ms() - (ids.minted_ms(text) or 0)) < 60_000


def test_minted_ms_rejects_what_is_not_a_uuid7() -> None:
    assert ids.minted_ms("not-an-id") is None
    assert ids.minted_ms(str(uuid.uuid4())) is None
