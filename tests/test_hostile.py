"""Hostile input (issue 8): no input yields INTERNAL or UNKNOWN, a refusal changes nothing,
and authorization is denied by default (one table, enforced by the interceptor)."""

from __future__ import annotations

import base64
import logging
import random
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from google.protobuf.message_factory import GetMessageClass
from google.rpc import error_details_pb2

from meter.v1 import license_pb2, license_service_pb2, usage_pb2, usage_service_pb2
from meter.v1 import license_service_pb2 as lpb
from meter.v1 import license_service_pb2_grpc as lgrpc
from meter.v1 import usage_service_pb2 as upb
from meter.v1 import usage_service_pb2_grpc as ugrpc
from meter_grpc.api import auth, errors
from meter_grpc.domain.errors import FieldViolation, MeterError, Reason
from meter_grpc.domain.metering import Metering
from meter_grpc.storage import keys
from tests.support import UNKNOWN_ID, admin_md, expect_error, license_md, rich_error

SERVICES = [
    license_service_pb2.DESCRIPTOR.services_by_name["LicenseService"],
    usage_service_pb2.DESCRIPTOR.services_by_name["UsageService"],
]
METHODS = [m for s in SERVICES for m in s.methods]


def path(m: MethodDescriptor) -> str:
    return f"/{m.containing_service.full_name}/{m.name}"


async def keyspace(redis: Any, license_id: str) -> Any:
    """What a refusal must leave unchanged: the key names and the license's hash. The usage
    export's leases and live-sinks entry are left out: an exporting replica of an earlier
    test leaves them, and they expire by themselves meanwhile (every other export key, the
    stream registry included, must stay as it was)."""
    names = sorted([k async for k in redis.scan_iter(match="*") if not _export_key(k)])
    return names, await redis.hgetall(keys.license(license_id))


_LEASE_PREFIX = keys.export_lease(0).rpartition(":")[0] + ":"


def _export_key(name: Any) -> bool:
    """An export key that expires by itself: a lease, or the live sinks' entry."""
    text = name.decode() if isinstance(name, bytes) else str(name)
    return text.startswith(_LEASE_PREFIX) or text == keys.export_sinks()


def assert_invalid(err: Any, field: str) -> None:
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT, err
    assert err.reason == "INVALID_ARGUMENT", err
    assert field in err.bad_fields, err


# --- the concrete cases of issue 8 -----------------------------------------------------------


async def test_deep_page_token_is_invalid_argument(
    licenses: lgrpc.LicenseServiceStub, make_license: Any
) -> None:
    lic = await make_license()
    for token in [
        base64.urlsafe_b64encode(b"[" * 5000).decode(),
        base64.urlsafe_b64encode(b"[" * 900).decode(),
        base64.urlsafe_b64encode(b'{"a":{"a":{"a":1}},"s":""}').decode(),
        "A" * 100_000,
        "not base64 !",
    ]:
        for call in [
            licenses.ListPolicies(lpb.ListPoliciesRequest(page_token=token), metadata=admin_md()),
            licenses.ListLicenses(lpb.ListLicensesRequest(page_token=token), metadata=admin_md()),
            licenses.ListMachines(
                lpb.ListMachinesRequest(license_id=lic.id, page_token=token), metadata=admin_md()
            ),
        ]:
            assert_invalid(await expect_error(call), "page_token")


@pytest.mark.parametrize(
    "event_id",
    [
        "18446744073709551616-0",
        "0-18446744073709551616",
        "99999999999999999999-0",
        "1-",
        "-1",
        "1-2-3",
        "\u0663-0",  # an Arabic-Indic digit: \d would take it
        "1" * 5000 + "-0",
        " 1-0",
    ],
)
async def test_malformed_stream_id_is_invalid_argument(
    usage: ugrpc.UsageServiceStub,
    make_license: Any,
    caplog: pytest.LogCaptureFixture,
    event_id: str,
) -> None:
    lic = await make_license()
    for md in [admin_md(), license_md(lic.key)]:
        call = usage.WatchUsage(
            upb.WatchUsageRequest(license_id=lic.id, after_event_id=event_id), metadata=md
        )
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            async for _ in call:
                pass
        assert_invalid(rich_error(exc.value), "after_event_id")
    assert not [r for r in caplog.records if r.exc_info], "a client mistake logged a traceback"


async def test_renewal_past_year_9999_is_refused_before_anything_is_stored(
    licenses: lgrpc.LicenseServiceStub, make_license: Any, redis: Any
) -> None:
    from google.protobuf import duration_pb2

    century = duration_pb2.Duration(seconds=100 * 366 * 86_400)
    lic = await make_license(policy_fields={"duration": century})
    late = timestamp_pb2.Timestamp(seconds=253_402_300_799 - 50 * 366 * 86_400)  # ~9949
    await licenses.UpdateLicense(
        lpb.UpdateLicenseRequest(
            license=license_pb2.License(id=lic.id, expire_time=late),
            update_mask={"paths": ["expire_time"]},
        ),
        metadata=admin_md(),
    )
    before = await keyspace(redis, lic.id)
    err = await expect_error(
        licenses.RenewLicense(lpb.RenewLicenseRequest(id=lic.id), metadata=admin_md())
    )
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.reason == "LICENSE_NOT_RENEWABLE"
    assert "9999" in err.message
    assert await keyspace(redis, lic.id) == before
    got = await licenses.GetLicense(lpb.GetLicenseRequest(id=lic.id), metadata=admin_md())
    assert got.license.expire_time == late


async def test_stored_expiry_past_year_9999_still_reads(
    licenses: lgrpc.LicenseServiceStub, make_license: Any, redis: Any
) -> None:
    """An expiry stored before renewals were bounded reads as the end of year 9999."""
    lic = await make_license()
    await redis.hset(keys.license(lic.id), "expire", str(400_000_000_000_000))
    end = timestamp_pb2.Timestamp(seconds=253_402_300_799, nanos=999_000_000)
    got = await licenses.GetLicense(lpb.GetLicenseRequest(id=lic.id), metadata=admin_md())
    assert got.license.expire_time == end
    v = await licenses.ValidateLicense(
        lpb.ValidateLicenseRequest(license_id=lic.id), metadata=admin_md()
    )
    assert v.valid
    page = await licenses.ListLicenses(
        lpb.ListLicensesRequest(policy_id=lic.policy_id), metadata=admin_md()
    )
    assert [x.expire_time for x in page.licenses] == [end]
    await licenses.CheckOutLicense(lpb.CheckOutLicenseRequest(id=lic.id), metadata=admin_md())
    await licenses.SuspendLicense(lpb.SuspendLicenseRequest(id=lic.id), metadata=admin_md())
    await licenses.ReinstateLicense(lpb.ReinstateLicenseRequest(id=lic.id), metadata=admin_md())


async def test_ids_accept_only_what_the_server_mints(
    licenses: lgrpc.LicenseServiceStub,
    usage: ugrpc.UsageServiceStub,
    make_license: Any,
    redis: Any,
) -> None:
    lic = await make_license()
    await usage.IncrementUsage(
        upb.IncrementUsageRequest(license_id=lic.id, request_id="ok-1"), metadata=admin_md()
    )
    before = await keyspace(redis, lic.id)
    refused = [
        (
            usage.IncrementUsage(
                upb.IncrementUsageRequest(license_id=lic.id, request_id="x}"), metadata=admin_md()
            ),
            "request_id",
        ),
        (
            usage.IncrementUsage(
                upb.IncrementUsageRequest(license_id=lic.id, request_id="a:b"),
                metadata=license_md(lic.key),
            ),
            "request_id",
        ),
        (
            usage.DecrementUsage(
                upb.DecrementUsageRequest(license_id=lic.id, request_id="{x"), metadata=admin_md()
            ),
            "request_id",
        ),
        (
            licenses.GetLicense(lpb.GetLicenseRequest(id=lic.id + "}:req:x"), metadata=admin_md()),
            "id",
        ),
        (licenses.GetLicense(lpb.GetLicenseRequest(id=lic.id.upper()), metadata=admin_md()), "id"),
        (
            usage.GetUsage(upb.GetUsageRequest(license_id="not-an-id"), metadata=admin_md()),
            "license_id",
        ),
        (
            licenses.ActivateMachine(
                lpb.ActivateMachineRequest(license_id=lic.id, fingerprint="aa:bb"),
                metadata=admin_md(),
            ),
            "fingerprint",
        ),
        (
            licenses.ActivateMachine(
                lpb.ActivateMachineRequest(license_id=lic.id, fingerprint="a b"),
                metadata=admin_md(),
            ),
            "fingerprint",
        ),
        (
            licenses.GetMachine(lpb.GetMachineRequest(id=lic.id + ".x}"), metadata=admin_md()),
            "id",
        ),
        (
            usage.SyncUsage(
                upb.SyncUsageRequest(
                    license_id=lic.id, records=[usage_pb2.UsageRecord(id="r:1", amount=1)]
                ),
                metadata=admin_md(),
            ),
            "records[0].id",
        ),
    ]
    for call, field in refused:
        assert_invalid(await expect_error(call), field)
    assert await keyspace(redis, lic.id) == before


# --- malformed protobuf bodies ---------------------------------------------------------------


def _string_field(m: MethodDescriptor) -> FieldDescriptor | None:
    for f in m.input_type.fields:
        if f.type == FieldDescriptor.TYPE_STRING:
            return f
    return None


def bodies(m: MethodDescriptor) -> list[bytes]:
    """Bytes that are no valid message of the method's request type."""
    rng = random.Random(f"meter-{m.name}")
    out = [
        b"\x0a\x05ab",  # truncated: a length of 5, 2 bytes follow
        b"\x00\x01",  # field number 0
        b"\x0e\x01",  # wire type 6
        b"\x0b" * 200 + b"\x0c" * 200,  # groups 200 deep
        b"\x08" + b"\xff" * 11,  # a varint of 11 bytes
    ]
    f = _string_field(m)
    if f is not None:  # bad UTF-8 in a string field
        out.append(bytes([f.number << 3 | 2, 2]) + b"\xff\xfe")
    while len(out) < 9:
        out.append(rng.randbytes(rng.randrange(1, 64)))
    # only what the protobuf runtime itself refuses (upb takes field 0 in an empty message)
    return [b for b in out if not _parses(m, b)]


def _parses(m: MethodDescriptor, data: bytes) -> bool:
    try:
        GetMessageClass(m.input_type).FromString(data)
    except Exception:
        return False
    return True


async def call_raw(
    channel: grpc.aio.Channel, m: MethodDescriptor, body: bytes, md: Any
) -> grpc.aio.AioRpcError:
    identity = None  # bytes go out and come back as they are
    p = path(m)
    try:
        if m.client_streaming:

            async def one() -> AsyncIterator[bytes]:
                yield body

            call: Any = channel.stream_stream(p, identity, identity)(one(), metadata=md)
            async for _ in call:
                pass
        elif m.server_streaming:
            async for _ in channel.unary_stream(p, identity, identity)(body, metadata=md):
                pass
        else:
            await channel.unary_unary(p, identity, identity)(body, metadata=md)
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError(f"{m.name} accepted a malformed body {body!r}")


async def test_malformed_bodies_are_invalid_argument_on_every_method(
    channel: grpc.aio.Channel, make_license: Any, caplog: pytest.LogCaptureFixture
) -> None:
    lic = await make_license()
    callers = {"admin": admin_md(), "license key": license_md(lic.key), "nobody": ()}
    caplog.set_level(logging.INFO, logger="meter_grpc")
    for m in METHODS:
        for body in bodies(m):
            for who, md in callers.items():
                err = rich_error(await call_raw(channel, m, body, md))
                if m.client_streaming and who == "nobody":
                    # a stream is authenticated when it opens, before its first message
                    assert err.code == grpc.StatusCode.UNAUTHENTICATED, (m.name, err)
                    continue
                assert err.code == grpc.StatusCode.INVALID_ARGUMENT, (m.name, who, body, err)
                assert err.reason == "INVALID_ARGUMENT", (m.name, who, err)
                assert err.bad_fields == [""], (m.name, who, err)
    logged = [r for r in caplog.records if r.name.startswith("meter_grpc")]
    assert len(logged) <= 1, [r.getMessage() for r in logged]  # one line per burst at most
    assert not [r for r in logged if r.exc_info]


async def test_stream_usage_answers_until_a_malformed_message(
    channel: grpc.aio.Channel, make_license: Any
) -> None:
    lic = await make_license()
    good = upb.IncrementUsageRequest(license_id=lic.id).SerializeToString()

    async def requests() -> AsyncIterator[bytes]:
        yield good
        yield b"\x0a\x05ab"
        yield good

    call: Any = channel.stream_stream("/meter.v1.UsageService/StreamUsage", None, None)(
        requests(), metadata=license_md(lic.key)
    )
    answers: list[upb.StreamUsageResponse] = []

    async def drain() -> None:
        async for a in call:
            answers.append(upb.StreamUsageResponse.FromString(a))

    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await drain()
    assert_invalid(rich_error(exc.value), "")
    assert [a.result.uses for a in answers] == [1]
    u = await ugrpc.UsageServiceStub(channel).GetUsage(
        upb.GetUsageRequest(license_id=lic.id), metadata=admin_md()
    )
    assert u.uses == 1


# --- bugs in streaming handlers ---------------------------------------------------------------


async def test_a_bug_in_a_streaming_handler_is_internal_and_logged(
    usage: ugrpc.UsageServiceStub,
    make_license: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    lic = await make_license()

    async def broken_increment(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    async def broken_watch(self: Any, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        raise RuntimeError("a bug")
        yield  # pragma: no cover

    monkeypatch.setattr(Metering, "increment", broken_increment)
    monkeypatch.setattr(Metering, "watch", broken_watch)

    async def one() -> AsyncIterator[upb.IncrementUsageRequest]:
        yield upb.IncrementUsageRequest(license_id=lic.id)

    # StreamUsage answers a bug in one request as that request's INTERNAL error and goes on
    # (one request's failure never ends the stream); WatchUsage's stream ends with INTERNAL.
    answers = [a async for a in usage.StreamUsage(one(), metadata=license_md(lic.key))]
    assert [a.error.code for a in answers] == [grpc.StatusCode.INTERNAL.value[0]]
    assert "a bug" not in answers[0].error.message
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for _ in usage.WatchUsage(
            upb.WatchUsageRequest(license_id=lic.id), metadata=admin_md()
        ):
            pass
    assert exc.value.code() == grpc.StatusCode.INTERNAL
    assert "a bug" not in (exc.value.details() or "")
    assert len([r for r in caplog.records if r.exc_info]) == 2


# --- deny by default ---------------------------------------------------------------------------


def naming(m: MethodDescriptor, lic: Any) -> Any:
    """A request of `m` naming license `lic` the way auth.LICENSE_KEY_METHODS reads it."""
    request = GetMessageClass(m.input_type)()
    owns = auth.LICENSE_KEY_METHODS.get(path(m))
    if owns is not None and owns.each is not None:
        item = getattr(request, owns.each).add()
        setattr(item, owns.field or "", lic.id)
        return request
    if owns is None or owns.field is None:
        for name in ("license_id", "id"):
            if name in m.input_type.fields_by_name:
                setattr(request, name, lic.id)
        return request
    setattr(request, owns.field, lic.id + "." + "0" * 32 if owns.machine else lic.id)
    return request


async def test_every_method_refuses_a_key_of_another_license(
    channel: grpc.aio.Channel, make_license: Any, redis: Any
) -> None:
    mine, other = await make_license(), await make_license()
    md = license_md(mine.key)
    before = await keyspace(redis, other.id)
    for m in METHODS:
        owns = auth.LICENSE_KEY_METHODS.get(path(m))
        if owns is not None and owns.field is None:
            continue  # GetPublicKey names no license
        body = naming(m, other).SerializeToString()
        err = rich_error(await call_raw(channel, m, body, md))
        assert err.code == grpc.StatusCode.PERMISSION_DENIED, (m.name, err)
        assert err.reason == "PERMISSION_DENIED", (m.name, err)
    # ValidateLicense by another license's key (or by no license's key)
    for key in (other.key, "NOPE00-NOPE00-NOPE00-NOPE00-NOPE00"):
        err = await expect_error(
            lgrpc.LicenseServiceStub(channel).ValidateLicense(
                lpb.ValidateLicenseRequest(key=key), metadata=md
            )
        )
        assert err.code == grpc.StatusCode.PERMISSION_DENIED
    assert await keyspace(redis, other.id) == before


async def test_the_table_names_only_real_methods_and_fields() -> None:
    by_path = {path(m): m for m in METHODS}
    for method, owns in auth.LICENSE_KEY_METHODS.items():
        assert method in by_path, method
        request_type = by_path[method].input_type
        if owns.each is not None:
            request_type = request_type.fields_by_name[owns.each].message_type
        if owns.field is not None:
            assert owns.field in request_type.fields_by_name, method
        if owns.key_field is not None:
            assert owns.key_field in by_path[method].input_type.fields_by_name, method


async def test_a_servicer_reached_without_the_interceptor_refuses() -> None:
    from meter_grpc.api.usage_service import UsageService
    from meter_grpc.domain.errors import MeterError

    servicer = auth.guard(
        UsageService(None),  # type: ignore[arg-type]
        usage_service_pb2.DESCRIPTOR.services_by_name["UsageService"],
    )

    with pytest.raises(MeterError) as exc:
        await servicer.GetUsage(upb.GetUsageRequest(), None)
    assert exc.value.reason.value == "PERMISSION_DENIED"

    async def watch() -> None:
        async for _ in servicer.WatchUsage(upb.WatchUsageRequest(), None):
            pass

    with pytest.raises(MeterError):
        await watch()


async def test_a_batch_entry_checks_every_element(monkeypatch: pytest.MonkeyPatch) -> None:
    """Owns(each=...) for a request carrying many sub-requests (a batch RPC)."""
    from meter_grpc.domain.clock import SystemClock
    from meter_grpc.domain.errors import MeterError

    async def no_key(key: str) -> None:
        return None

    authenticator = auth.Authenticator([], no_key, SystemClock(), str)  # type: ignore[arg-type]
    monkeypatch.setitem(auth.LICENSE_KEY_METHODS, "/t/Batch", auth.Owns("id", each="records"))
    mine = auth.Principal(UNKNOWN_ID)
    batch = upb.SyncUsageRequest(records=[usage_pb2.UsageRecord(id=UNKNOWN_ID)] * 2)
    await authenticator.authorize("/t/Batch", mine, batch)
    batch.records.add(id=UNKNOWN_ID[:-1] + "1")
    with pytest.raises(MeterError) as exc:
        await authenticator.authorize("/t/Batch", mine, batch)
    assert exc.value.reason.value == "PERMISSION_DENIED"
    await authenticator.authorize("/t/Batch", auth.ADMIN, batch)  # an admin may do anything


# --- found by tests/test_fuzz.py ---------------------------------------------------------------


async def test_a_refused_create_leaves_its_request_id_free(
    licenses: lgrpc.LicenseServiceStub, make_license: Any, make_policy: Any, redis: Any
) -> None:
    """A create refused before the license is written (unknown policy, a rule of the policy, a
    key another license has) stores nothing under its request_id: a corrected retry with the
    same id creates the license instead of answering REQUEST_ID_REUSED."""
    taken = await make_license()
    node_locked = await make_policy(floating=False)
    floating = await make_policy(floating=True)
    before = await keyspace(redis, taken.id)
    refused = [
        (lpb.CreateLicenseRequest(license={"policy_id": UNKNOWN_ID}, request_id="rid-1"), ""),
        (
            lpb.CreateLicenseRequest(
                license={"policy_id": node_locked.id, "max_machines": 2}, request_id="rid-2"
            ),
            "license.max_machines",
        ),
        (
            lpb.CreateLicenseRequest(
                license={"policy_id": floating.id, "key": taken.key}, request_id="rid-3"
            ),
            "",
        ),
    ]
    codes = []
    for request, field in refused:
        err = await expect_error(licenses.CreateLicense(request, metadata=admin_md()))
        codes.append(err.reason)
        if field:
            assert_invalid(err, field)
    assert codes == ["POLICY_NOT_FOUND", "INVALID_ARGUMENT", "LICENSE_KEY_TAKEN"]
    assert await keyspace(redis, taken.id) == before
    for i, policy_id in enumerate([floating.id, node_locked.id, floating.id]):
        got = await licenses.CreateLicense(
            lpb.CreateLicenseRequest(license={"policy_id": policy_id}, request_id=f"rid-{i + 1}"),
            metadata=admin_md(),
        )
        assert got.license.policy_id == policy_id


async def test_error_details_stay_small_whatever_the_request_holds(
    licenses: lgrpc.LicenseServiceStub,
    usage: ugrpc.UsageServiceStub,
    make_license: Any,
) -> None:
    """An error echoes what was sent (a metadata key, an id): its status stays far below the
    16 KiB a gRPC client accepts in one trailer, so the client gets the details, not
    RESOURCE_EXHAUSTED 'Stream removed'."""
    lic = await make_license()
    huge = "A" * 70_000
    err = await expect_error(
        licenses.CreatePolicy(
            lpb.CreatePolicyRequest(policy={"name": "p", "metadata": {huge: "v"}}),
            metadata=admin_md(),
        )
    )
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.reason == "INVALID_ARGUMENT"
    # the key's length, and the map's size as JSON
    assert err.bad_fields == ["policy.metadata['" + "A" * 32 + "...']", "policy.metadata"]
    err = await expect_error(
        licenses.CreatePolicy(
            lpb.CreatePolicyRequest(policy={"name": "p", "metadata": {"\x00" * 200: "v"}}),
            metadata=admin_md(),
        )
    )
    # as many first characters as fit 64 bytes quoted: each escape takes 4
    assert err.bad_fields == ["policy.metadata['" + "\\x00" * 14 + "...']"]
    for md in (admin_md(), license_md(lic.key)):
        err = await expect_error(
            usage.IncrementUsage(upb.IncrementUsageRequest(license_id=huge), metadata=md)
        )
        assert err.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED)
        assert err.reason in ("INVALID_ARGUMENT", "PERMISSION_DENIED")
        assert len(err.message) < 1024
    err = await expect_error(
        licenses.CreatePolicy(
            lpb.CreatePolicyRequest(
                policy={"name": "p", "entitlements": [f"bad code {i}" for i in range(256)]}
            ),
            metadata=admin_md(),
        )
    )
    assert err.bad_fields == [f"policy.entitlements[{i}]" for i in range(20)]
    assert "(and 255 more)" in err.message


async def test_an_activation_missing_its_cores_stores_nothing_under_its_request_id(
    licenses: lgrpc.LicenseServiceStub, make_license: Any, redis: Any
) -> None:
    """`cores` is required under a core limit: bad input, so its refusal is not stored under
    the request_id, and the retry with the cores set activates the machine."""
    lic = await make_license(policy_fields={"floating": True, "max_cores": 8})
    before = await keyspace(redis, lic.id)
    request = lpb.ActivateMachineRequest(license_id=lic.id, fingerprint="fp-1", request_id="a-1")
    assert_invalid(
        await expect_error(licenses.ActivateMachine(request, metadata=admin_md())), "cores"
    )
    assert await keyspace(redis, lic.id) == before
    request.cores = 2
    got = await licenses.ActivateMachine(request, metadata=license_md(lic.key))
    assert got.machine.cores == 2


async def test_error_trailers_fit_a_strict_client_whatever_the_request_holds(
    running: Any, make_license: Any
) -> None:
    """A gRPC client refuses trailers above its metadata limit (8 KiB soft, by chance up to
    16 KiB): a status must fit 8 KiB however many multi-byte characters it echoes, which the
    grpc-message trailer percent-encodes at 3 bytes each. This client refuses anything above
    8 KiB every time."""
    lic = await make_license()
    emoji = "\U0001f600" * 3000
    options = [("grpc.max_metadata_size", 8192), ("grpc.absolute_max_metadata_size", 8192)]
    async with grpc.aio.insecure_channel(running.target, options=options) as ch:
        licenses = lgrpc.LicenseServiceStub(ch)
        usage = ugrpc.UsageServiceStub(ch)
        calls = [
            usage.IncrementUsage(upb.IncrementUsageRequest(license_id=emoji), metadata=admin_md()),
            usage.IncrementUsage(
                upb.IncrementUsageRequest(license_id=lic.id, request_id=emoji),
                metadata=admin_md(),
            ),
            usage.ReplayDeadLetters(
                upb.ReplayDeadLettersRequest(sink=emoji, limit=257), metadata=admin_md()
            ),
            licenses.CreatePolicy(
                lpb.CreatePolicyRequest(
                    policy={
                        "name": emoji,
                        "entitlements": [emoji[:300]] * 256,
                        "metadata": {emoji[: 200 + i]: "v" for i in range(40)},
                    }
                ),
                metadata=admin_md(),
            ),
            licenses.CreateLicense(
                lpb.CreateLicenseRequest(
                    license={"policy_id": emoji, "name": emoji, "metadata": {emoji: emoji}},
                    request_id=emoji,
                ),
                metadata=admin_md(),
            ),
        ]
        for call in calls:
            err = await expect_error(call)
            assert err.code == grpc.StatusCode.INVALID_ARGUMENT, err
            assert err.reason == "INVALID_ARGUMENT" and err.bad_fields
            for f in err.bad_fields:
                assert len(f.encode()) <= errors.MAX_FIELD_LEN and "more characters" not in f, f
        # A metadata key of 37 emoji (4 bytes each, 148 bytes quoted) under a field name: the
        # key is quoted by as many first characters as fit 64 bytes, never cut by the error's
        # clipping into something that is no field path.
        err = await expect_error(
            licenses.ActivateMachine(
                lpb.ActivateMachineRequest(
                    license_id=lic.id, fingerprint="fp-1", metadata={emoji[:37]: "v" * 1025}
                ),
                metadata=admin_md(),
            )
        )
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT, err
        assert err.bad_fields == ["metadata[" + repr(emoji[:14] + "...") + "]"]


@pytest.mark.parametrize(
    ("path", "clipped"),
    [
        ("items[3].amount", "items[3].amount"),
        ("policy.metadata['" + "k" * 300 + "']", "policy.metadata"),
        ("policy.metadata['" + "\\'" * 100 + "'].x", "policy.metadata"),
        ('license.metadata["' + "\U0001f600" * 40 + '"]', "license.metadata"),
        ("items[" + "7" * 200 + "].amount", "items"),
        ("a" * 40 + ".b[1]" + ".c" * 60, "a" * 40 + ".b[1]" + ".c" * 41),
    ],
)
def test_a_field_path_too_long_loses_its_last_parts_not_its_form(path: str, clipped: str) -> None:
    """A bad field's path longer than MAX_FIELD_LEN bytes keeps its longest prefix that is
    still a path (whole names, whole subscripts): clients and the fuzz suite read it as one."""
    assert errors.clip_field(path, errors.MAX_FIELD_LEN) == clipped


BAD_REQUEST = error_details_pb2.BadRequest.DESCRIPTOR


@pytest.mark.parametrize("text", ["A" * 5000, "\U0001f600" * 5000, "\x00%" * 5000])
@pytest.mark.parametrize("reason", [Reason.INVALID_ARGUMENT, Reason.STORAGE_UNAVAILABLE])
def test_every_status_fits_its_trailer_budget(text: str, reason: Reason) -> None:
    """The largest status an error can make (every string at its longest in the costliest
    characters, every detail) stays within MAX_STATUS_TRAILER_BYTES, names the first bad field
    always, and as many of the others as fit."""
    err = MeterError(
        reason,
        text,
        metadata={f"key{i}": text for i in range(8)},
        violations=[FieldViolation(text, text) for _ in range(100)],
        quota_subject=text,
    )
    status = errors.to_status_proto(err)
    assert errors.trailer_bytes(status) <= errors.MAX_STATUS_TRAILER_BYTES
    assert len([d for d in status.details if d.Is(BAD_REQUEST)]) == 1
    bad_request = error_details_pb2.BadRequest()
    next(d for d in status.details if d.Is(BAD_REQUEST)).Unpack(bad_request)
    assert 1 <= len(bad_request.field_violations) <= errors.MAX_VIOLATIONS
    small = MeterError(reason, "m", violations=[FieldViolation(f"f{i}", "d") for i in range(30)])
    bad_request = error_details_pb2.BadRequest()
    next(d for d in errors.to_status_proto(small).details if d.Is(BAD_REQUEST)).Unpack(bad_request)
    assert [v.field for v in bad_request.field_violations] == [f"f{i}" for i in range(20)]
