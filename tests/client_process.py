"""A separate client process for the crash test: syncs a journal with OfflineMeter and kills
itself (SIGKILL, no cleanup of any kind) right after the N-th SyncUsage answer arrived and
before the journal recorded it.

    python -m tests.client_process TARGET LICENSE_KEY LICENSE_ID JOURNAL BATCH_SIZE DIE_AFTER
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence

from meter.v1 import usage_service_pb2 as upb
from meter_grpc.client import JournalRecord, MeterClient, OfflineMeter

EXIT_NOT_KILLED = 3


def main() -> None:
    target, license_key, license_id, journal, batch_size, die_after = sys.argv[1:]
    answered = 0

    def hook(records: Sequence[JournalRecord], response: upb.SyncUsageResponse) -> None:
        nonlocal answered
        answered += 1
        if answered == int(die_after):
            os.kill(os.getpid(), signal.SIGKILL)

    with MeterClient(target, license_key=license_key) as client:
        meter = OfflineMeter(
            client, license_id, journal, batch_size=int(batch_size), on_batch_answered=hook
        )
        meter.sync()
    sys.exit(EXIT_NOT_KILLED)


if __name__ == "__main__":
    main()
