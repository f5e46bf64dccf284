"""The license hash holds only the policy fields its scripts read (no `p_json` copy of the
whole policy); responses still carry the policy; licenses written with the copy keep working
and lose it on start."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio as aioredis

from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import policy_pb2
from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from meter_grpc.config import Settings
from meter_grpc.domain.clock import ManualClock
from meter_grpc.server import build_server
from meter_grpc.storage import keys
from meter_grpc.storage.store import LISTPACK_VALUE_NEEDED
from tests.conftest import Running
from tests.support import ADMIN_TOKEN, admin_md, expect_error, shared_key_secret_file

NOW_MS = 1_900_000_000_000
RICH_POLICY: dict[str, Any] = {
    "name": "rich policy",
    "max_uses": 40,
    "max_cores": 16,
    "floating": True,
    "max_machines": 3,
    "strict": True,
    "require_check_in": True,
    "check_in_interval": {"seconds": 3600},
    "entitlements": ["export", "sso"],
    "overage_strategy": policy_pb2.OVERAGE_STRATEGY_ALLOW_1_5X_OVERAGE,
    "metadata": {"tier": "gold", "region": "eu"},
}


async def _views(ls: lgrpc.LicenseServiceStub, license_id: str) -> tuple[bytes, ...]:
    """What a client sees of a license: GetLicense, ValidateLicense, a license file (whose
    payload carries the whole policy), as bytes."""
    md = admin_md()
    got = await ls.GetLicense(lpb.GetLicenseRequest(id=license_id), metadata=md)
    valid = await ls.ValidateLicense(lpb.ValidateLicenseRequest(license_id=license_id), metadata=md)
    out = await ls.CheckOutLicense(lpb.CheckOutLicenseRequest(id=license_id), metadata=md)
    return (
        got.SerializeToString(deterministic=True),
        valid.SerializeToString(deterministic=True),
        out.SerializeToString(deterministic=True),
    )


async def _rich_license(ls: lgrpc.LicenseServiceStub, **fields: Any) -> tuple[Any, Any]:
    p = (
        await ls.CreatePolicy(
            lpb.CreatePolicyRequest(policy=policy_pb2.Policy(**RICH_POLICY)), metadata=admin_md()
        )
    ).policy
    req = lpb.CreateLicenseRequest(license={"policy_id": p.id, "name": "acme"}, **fields)
    lic = (await ls.CreateLicense(req, metadata=admin_md())).license
    return p, lic


async def _make_legacy(redis: aioredis.Redis, license_id: str, policy_id: str) -> None:
    """The license as earlier versions wrote it: with `p_json`, the policy's JSON as stored."""
    policy_json = await redis.hget(keys.policy(policy_id), "json")  # type: ignore[misc]
    assert policy_json
    await redis.hset(keys.license(license_id), "p_json", policy_json)  # type: ignore[misc]


async def test_license_hash_holds_no_policy_copy_and_responses_carry_the_policy(
    licenses: lgrpc.LicenseServiceStub,
    redis: aioredis.Redis,
    clock: ManualClock,
) -> None:
    clock.set(NOW_MS)
    policy, lic = await _rich_license(licenses)
    h = await redis.hgetall(keys.license(lic.id))  # type: ignore[misc]
    assert "p_json" not in h
    assert (h["p_uses"], h["p_machines"], h["p_cores"], h["p_overage"]) == ("40", "3", "16", "3")
    # Every value fits a listpack entry (hash-max-listpack-value 128, as the embedded store and
    # the test cluster are configured): the hash stays compact.
    assert all(len(v.encode()) <= LISTPACK_VALUE_NEEDED for v in h.values())
    assert len(h) * 2 <= 128
    assert await redis.object("encoding", keys.license(lic.id)) == "listpack"  # type: ignore[misc]

    got, valid, out = await _views(licenses, lic.id)
    g = lpb.GetLicenseResponse.FromString(got).license
    assert (g.max_uses, g.max_machines, g.max_cores) == (40, 3, 16)
    v = lpb.ValidateLicenseResponse.FromString(valid)
    assert v.license.max_uses == 40
    # The license file carries the whole policy: the fields no script reads come from the
    # policy itself.
    cert = lpb.CheckOutLicenseResponse.FromString(out).certificate
    payload = _payload(cert)
    (included,) = [r for r in payload["included"] if r["type"] == "policies"]
    attrs = included["attributes"]
    assert attrs["name"] == "rich policy"
    assert attrs["metadata"] == {"tier": "gold", "region": "eu"}
    assert attrs["entitlements"] == ["export", "sso"]
    assert (attrs["strict"], attrs["requireCheckIn"], attrs["checkInInterval"]) == (
        True,
        True,
        3600,
    )
    assert (attrs["maxUses"], attrs["maxMachines"], attrs["floating"]) == (40, 3, True)
    assert sorted(payload["data"]["attributes"]["entitlements"]) == ["export", "sso"]

    # The same license written the earlier way (with the copy) reads exactly the same.
    await _make_legacy(redis, lic.id, policy.id)
    assert await _views(licenses, lic.id) == (got, valid, out)


def _payload(certificate: str) -> dict[str, Any]:
    import base64

    body = "".join(certificate.split("\n")[1:-2])
    outer = json.loads(base64.b64decode(body))
    payload: dict[str, Any] = json.loads(base64.b64decode(outer["enc"]))
    return payload


async def test_policy_update_reaches_the_license_and_its_responses(
    licenses: lgrpc.LicenseServiceStub,
    usage: ugrpc.UsageServiceStub,
    redis: aioredis.Redis,
) -> None:
    policy, lic = await _rich_license(licenses)
    await _make_legacy(redis, lic.id, policy.id)  # propagation drops an earlier copy too
    changed = policy_pb2.Policy(id=policy.id, name="renamed", max_uses=2, entitlements=["x"])
    await licenses.UpdatePolicy(
        lpb.UpdatePolicyRequest(
            policy=changed, update_mask={"paths": ["name", "max_uses", "entitlements"]}
        ),
        metadata=admin_md(),
    )

    async def propagated() -> bool:
        return await redis.hget(keys.license(lic.id), "p_uses") == "2"  # type: ignore[misc,no-any-return]

    for _ in range(500):
        if await propagated():
            break
        await asyncio.sleep(0.02)
    assert await propagated()
    assert await redis.hexists(keys.license(lic.id), "p_json") == 0  # type: ignore[misc]
    got = await licenses.GetLicense(lpb.GetLicenseRequest(id=lic.id), metadata=admin_md())
    assert got.license.max_uses == 2
    out = await licenses.CheckOutLicense(lpb.CheckOutLicenseRequest(id=lic.id), metadata=admin_md())
    (included,) = [r for r in _payload(out.certificate)["included"] if r["type"] == "policies"]
    assert (included["attributes"]["name"], included["attributes"]["entitlements"]) == (
        "renamed",
        ["x"],
    )
    md = admin_md()
    for _ in range(2):
        await usage.IncrementUsage(upb.IncrementUsageRequest(license_id=lic.id), metadata=md)
    # The new limit (2, overage 1.5x: granted up to 3) is enforced by the script.
    await usage.IncrementUsage(upb.IncrementUsageRequest(license_id=lic.id), metadata=md)
    err = await expect_error(
        usage.IncrementUsage(upb.IncrementUsageRequest(license_id=lic.id), metadata=md)
    )
    assert (err.code, err.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "USAGE_LIMIT_EXCEEDED")


async def test_licenses_written_with_the_policy_copy_are_migrated_on_start(
    running: Running,
    licenses: lgrpc.LicenseServiceStub,
    redis: aioredis.Redis,
    clock: ManualClock,
    tmp_path: Path,
) -> None:
    clock.set(NOW_MS)
    request_id = f"legacy-create-{tmp_path.name}"
    made = [await _rich_license(licenses) for _ in range(3)]
    made.append(await _rich_license(licenses, request_id=request_id))
    before = {lic.id: await _views(licenses, lic.id) for _, lic in made}
    # Data as an earlier version left it: every license with its copy, the stored answer of a
    # create with the copy inside the license hash, and no record of a migration.
    for policy, lic in made:
        await _make_legacy(redis, lic.id, policy.id)
    record = keys.create_request("license", f"{made[-1][0].id}/{request_id}")
    answer = json.loads(await redis.hget(record, "answer"))  # type: ignore[misc]
    answer.pop("policy")
    answer["license"]["p_json"] = await redis.hget(keys.policy(made[-1][0].id), "json")  # type: ignore[misc]
    await redis.hset(record, "answer", json.dumps(answer))  # type: ignore[misc]
    await redis.delete(keys.license_format())

    settings = Settings(
        listen="127.0.0.1:0",
        redis_url=running.redis_url,
        data_dir=running.service.settings.data_dir,  # the same signing key
        admin_tokens=[ADMIN_TOKEN],
        key_secret_file=shared_key_secret_file(),
        clock=ManualClock(fixed_ms=NOW_MS),
    )
    service, port = await build_server(settings)
    await service.start()
    try:

        async def migrated() -> bool:
            marks = [await redis.hexists(keys.license(lic.id), "p_json") for _, lic in made]  # type: ignore[misc]
            return not any(marks) and await redis.get(keys.license_format()) == "2"

        for _ in range(1500):
            if await migrated():
                break
            await asyncio.sleep(0.02)
        assert await migrated()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            ls = lgrpc.LicenseServiceStub(ch)
            for _, lic in made:
                assert await _views(ls, lic.id) == before[lic.id]
            # The retried create answers from its record, stored the earlier way.
            again = await ls.CreateLicense(
                lpb.CreateLicenseRequest(
                    license={"policy_id": made[-1][0].id, "name": "acme"}, request_id=request_id
                ),
                metadata=admin_md(),
            )
            assert again.license.id == made[-1][1].id
            assert again.license.max_uses == 40
            us = ugrpc.UsageServiceStub(ch)
            r = await us.IncrementUsage(
                upb.IncrementUsageRequest(license_id=made[0][1].id, amount=5), metadata=admin_md()
            )
            assert (r.uses, r.max_uses) == (5, 40)
    finally:
        await service.stop(0)
    # A start after the migration does not scan again (the format is recorded).
    await redis.hset(keys.license(made[0][1].id), "p_json", "{}")  # type: ignore[misc]
    service, port = await build_server(settings)
    await service.start()
    try:
        await asyncio.sleep(0.3)
        assert await redis.hexists(keys.license(made[0][1].id), "p_json")  # type: ignore[misc]
    finally:
        await service.stop(0)
        await redis.hdel(keys.license(made[0][1].id), "p_json")  # type: ignore[misc]
