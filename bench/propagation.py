"""How long a policy change takes to reach every license: UpdatePolicy of a policy with
--licenses licenses, answered once all of them follow the new revision.

    python bench/propagation.py --licenses 5000 --rounds 3

The service runs in this process on a fresh embedded valkey-server (appendfsync always); the
licenses are created through CreateLicense first. Prints the time of each UpdatePolicy and
licenses per second (medians over the rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import uvloop
from _serving import MD, serving
from google.protobuf import field_mask_pb2

from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import policy_pb2


async def create(licenses: lgrpc.LicenseServiceStub, policy_id: str, n: int) -> None:
    todo = iter(range(n))

    async def worker() -> None:
        for _ in todo:
            await licenses.CreateLicense(
                lpb.CreateLicenseRequest(license={"policy_id": policy_id}), metadata=MD
            )

    await asyncio.gather(*(worker() for _ in range(64)))


async def main(args: argparse.Namespace) -> None:
    async with serving() as (_, ch):
        licenses = lgrpc.LicenseServiceStub(ch)
        policy = (
            await licenses.CreatePolicy(
                lpb.CreatePolicyRequest(policy=policy_pb2.Policy(max_uses=10)), metadata=MD
            )
        ).policy
        await create(licenses, policy.id, args.licenses)
        times = []
        for r in range(args.rounds):
            start = time.perf_counter()
            p = (
                await licenses.UpdatePolicy(
                    lpb.UpdatePolicyRequest(
                        policy=policy_pb2.Policy(id=policy.id, max_uses=11 + r),
                        update_mask=field_mask_pb2.FieldMask(paths=["max_uses"]),
                    ),
                    metadata=MD,
                )
            ).policy
            times.append(time.perf_counter() - start)
            assert p.propagated_revision == p.revision
            print(f"round {r + 1}: {times[-1]:.3f} s")
    median = statistics.median(times)
    print(
        f"UpdatePolicy of {args.licenses} licenses: {median:.3f} s "
        f"({args.licenses / median:,.0f} licenses/s), median of {args.rounds}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--licenses", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    uvloop.run(main(parser.parse_args()))
