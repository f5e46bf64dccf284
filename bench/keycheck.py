"""What the per-call license key check costs, in this process against a fresh embedded
valkey-server (appendfsync always), with --licenses licenses created through CreateLicense:

- baseline: the read the key check used to make on a miss (GET of the index entry, then
  HGETALL of the license hash and its decoding, policy JSON included);
- miss: the read it makes now (GET of the index entry, HMGET of three fields);
- hit: Authenticator.authenticate from the key cache (no store call);
- unknown: a key no license holds, remembered as unknown (no store call).

    python bench/keycheck.py --licenses 1000 --calls 5000

Prints microseconds per check (median of --rounds) and each as a ratio to the baseline.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Awaitable, Callable

import uvloop
from _serving import MD, serving

from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import policy_pb2
from meter_grpc.api.auth import Authenticator
from meter_grpc.domain.clock import SystemClock
from meter_grpc.storage import codec, keys

METHOD = "/meter.v1.UsageService/GetUsage"


async def timed(calls: int, check: Callable[[int], Awaitable[object]]) -> float:
    """Microseconds per check, one after the other."""
    start = time.perf_counter()
    for i in range(calls):
        await check(i)
    return (time.perf_counter() - start) / calls * 1e6


async def main(args: argparse.Namespace) -> None:
    async with serving() as (service, ch):
        stub = lgrpc.LicenseServiceStub(ch)
        policy = (
            await stub.CreatePolicy(
                lpb.CreatePolicyRequest(policy=policy_pb2.Policy(name="bench")),
                metadata=MD,
            )
        ).policy
        made = [
            (
                await stub.CreateLicense(
                    lpb.CreateLicenseRequest(license={"policy_id": policy.id}),
                    metadata=MD,
                )
            ).license
            for _ in range(args.licenses)
        ]
        store, licensing = service.store, service.licensing
        digests = [licensing.key_digest(lic.key) for lic in made]
        n = len(digests)

        async def baseline(i: int) -> object:
            d = digests[i % n]
            license_id = await store.client.get(keys.license_by_key(d))
            h = await store.client.hgetall(keys.license(str(license_id)))
            return codec.license_from_hash(h)

        async def miss(i: int) -> object:
            return await store.key_holder(digests[i % n])

        auth = Authenticator([], licensing.key_holder, SystemClock(), licensing.key_digest)
        auth.cache.ttl_s = auth.cache.unknown_ttl_s = 3600.0

        async def hit(i: int) -> object:
            return await auth.authenticate(METHOD, f"License {made[i % n].key}")

        async def unknown(i: int) -> object:
            try:
                await auth.authenticate(METHOD, "License NO-SUCH-KEY-00000000")
            except Exception as exc:
                return exc
            raise AssertionError("an unknown key authenticated")

        for i in range(n):  # fill the cache
            await hit(i)
        results: dict[str, list[float]] = {
            "baseline": [],
            "miss": [],
            "hit": [],
            "unknown": [],
        }
        for _ in range(args.rounds):
            for name, check in (
                ("baseline", baseline),
                ("miss", miss),
                ("hit", hit),
                ("unknown", unknown),
            ):
                results[name].append(await timed(args.calls, check))
    base = statistics.median(results["baseline"])
    print(
        f"# key check, {args.licenses} licenses, {args.calls} checks x {args.rounds} rounds, "
        "one at a time; store: embedded valkey"
    )
    print("| check | µs per check | vs baseline |")
    print("| --- | --- | --- |")
    labels = {
        "baseline": "baseline: GET + HGETALL + decode (the earlier miss)",
        "miss": "miss: GET + HMGET of 3 fields",
        "hit": "hit: from the key cache (HMAC + dict)",
        "unknown": "unknown key, remembered",
    }
    for name, label in labels.items():
        us = statistics.median(results[name])
        print(f"| {label} | {us:.1f} | {us / base:.2f}x |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--licenses", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    uvloop.run(main(parser.parse_args()))
