"""How long paging through a license's machines takes: --machines machines activated through
ActivateMachine, then ListMachines through all of them at several page sizes.

    python bench/list_machines.py --machines 10000

The service runs in this process on a fresh embedded valkey-server (appendfsync always).
Pages come from the license's id index (ZRANGEBYLEX), so a page costs O(log N + page size)
and paging through N machines O(N); the time a page takes should not grow with N.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import uvloop
from _serving import MD, serving

from meter.v1 import license_pb2, policy_pb2
from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc


async def main(args: argparse.Namespace) -> None:
    async with serving() as (_, ch):
        stub = lgrpc.LicenseServiceStub(ch)
        policy = await stub.CreatePolicy(
            lpb.CreatePolicyRequest(policy=policy_pb2.Policy(name="b", floating=True)),
            metadata=MD,
        )
        lic = await stub.CreateLicense(
            lpb.CreateLicenseRequest(license=license_pb2.License(policy_id=policy.policy.id)),
            metadata=MD,
        )
        license_id = lic.license.id
        t0 = time.perf_counter()
        for start in range(0, args.machines, 200):
            await asyncio.gather(
                *(
                    stub.ActivateMachine(
                        lpb.ActivateMachineRequest(license_id=license_id, fingerprint=f"f{i}"),
                        metadata=MD,
                    )
                    for i in range(start, min(args.machines, start + 200))
                )
            )
        print(f"{args.machines} machines activated in {time.perf_counter() - t0:.1f} s")
        for size in (50, 1000):
            t0 = time.perf_counter()
            token, listed, pages = "", 0, 0
            while True:
                resp = await stub.ListMachines(
                    lpb.ListMachinesRequest(
                        license_id=license_id, page_size=size, page_token=token
                    ),
                    metadata=MD,
                )
                listed, pages = listed + len(resp.machines), pages + 1
                token = resp.next_page_token
                if not token:
                    break
            took = time.perf_counter() - t0
            assert listed == args.machines
            print(
                f"page_size {size:4d}: {pages} pages in {took:.2f} s "
                f"({took / pages * 1000:.1f} ms a page)"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--machines", type=int, default=10_000)
    uvloop.run(main(parser.parse_args()))
