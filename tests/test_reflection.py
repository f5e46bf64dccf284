"""Server reflection (v1 and v1alpha) serves the protos with their comments (issue 10 #3)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tests.conftest import Running

VERSIONS = ["grpc.reflection.v1", "grpc.reflection.v1alpha"]
INCREMENT_USAGE_DOC = "Adds `amount` to the counter if the result stays within the limit"


async def _ask(
    channel: grpc.aio.Channel, version: str, *requests: reflection_pb2.ServerReflectionRequest
) -> list[Any]:
    call = channel.stream_stream(
        f"/{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )

    async def send() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        for r in requests:
            yield r

    return [r async for r in call(send())]


def _files(response: Any) -> list[descriptor_pb2.FileDescriptorProto]:
    assert response.WhichOneof("message_response") == "file_descriptor_response", response
    return [
        descriptor_pb2.FileDescriptorProto.FromString(b)
        for b in response.file_descriptor_response.file_descriptor_proto
    ]


def _comment(file: descriptor_pb2.FileDescriptorProto, path: list[int]) -> str:
    for location in file.source_code_info.location:
        if list(location.path) == path:
            return location.leading_comments
    raise AssertionError(f"no source info for {path} in {file.name}")


def _method_path(file: descriptor_pb2.FileDescriptorProto, service: str, method: str) -> list[int]:
    s = next(i for i, x in enumerate(file.service) if x.name == service)
    m = next(i for i, x in enumerate(file.service[s].method) if x.name == method)
    return [6, s, 2, m]  # FileDescriptorProto.service = 6, ServiceDescriptorProto.method = 2


def _message_path(file: descriptor_pb2.FileDescriptorProto, message: str) -> list[int]:
    return [4, next(i for i, x in enumerate(file.message_type) if x.name == message)]


@pytest.mark.parametrize("version", VERSIONS)
async def test_describe_a_method_and_its_request_prints_the_proto_comments(
    channel: grpc.aio.Channel, version: str
) -> None:
    # What `grpcurl describe meter.v1.UsageService.IncrementUsage` and
    # `grpcurl describe meter.v1.IncrementUsageRequest` ask for.
    by_method, by_message = await _ask(
        channel,
        version,
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="meter.v1.UsageService.IncrementUsage"
        ),
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="meter.v1.IncrementUsageRequest"
        ),
    )
    for response in (by_method, by_message):
        files = _files(response)
        assert files[0].name == "meter/v1/usage_service.proto"
        names = {f.name for f in files}
        assert {"meter/v1/usage.proto", "google/rpc/status.proto"} <= names
        assert "google/api/field_behavior.proto" in names
        file = files[0]
        assert INCREMENT_USAGE_DOC in _comment(
            file, _method_path(file, "UsageService", "IncrementUsage")
        )
        assert "Request message for IncrementUsage" in _comment(
            file, _message_path(file, "IncrementUsageRequest")
        )
        service_doc = _comment(file, [6, 0])
        assert "The usage counter of a license" in service_doc
    assert by_method.original_request.file_containing_symbol.endswith("IncrementUsage")


@pytest.mark.parametrize("version", VERSIONS)
async def test_every_listed_service_is_described(channel: grpc.aio.Channel, version: str) -> None:
    (listing,) = await _ask(
        channel, version, reflection_pb2.ServerReflectionRequest(list_services="")
    )
    names = [s.name for s in listing.list_services_response.service]
    assert set(names) == {
        "meter.v1.LicenseService",
        "meter.v1.UsageService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    answers = await _ask(
        channel,
        version,
        *(reflection_pb2.ServerReflectionRequest(file_containing_symbol=n) for n in names),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="google.rpc.ErrorInfo"),
        reflection_pb2.ServerReflectionRequest(file_by_filename="meter/v1/error_reason.proto"),
    )
    # grpcurl decodes the error details of a status through reflection.
    assert _files(answers[-2])[0].name == "google/rpc/error_details.proto"
    for name, answer in zip(names, answers[:-2], strict=True):
        file = _files(answer)[0]
        assert name.rpartition(".")[2] in {s.name for s in file.service}, name
    (error_reasons,) = _files(answers[-1])
    assert error_reasons.enum_type[0].name == "ErrorReason"
    assert "AIP-193" in _comment(error_reasons, [5, 0])


@pytest.mark.parametrize("version", VERSIONS)
async def test_unknown_symbols_and_files_answer_not_found(
    channel: grpc.aio.Channel, version: str
) -> None:
    answers = await _ask(
        channel,
        version,
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="meter.v1.Nope"),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="meter.v1.UsageService.Nope"),
        reflection_pb2.ServerReflectionRequest(file_by_filename="meter/v1/nope.proto"),
        reflection_pb2.ServerReflectionRequest(
            all_extension_numbers_of_type="google.protobuf.FieldOptions"
        ),
    )
    for answer in answers[:3]:
        assert answer.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    extensions = answers[3].all_extension_numbers_response
    assert extensions.base_type_name == "google.protobuf.FieldOptions"
    assert list(extensions.extension_number) == [1052]  # google.api.field_behavior


async def test_grpcio_reflection_client_builds_the_services(running: Running) -> None:
    """grpcio-reflection's own client (v1alpha) resolves every type of UsageService."""

    def describe() -> list[str]:
        with grpc.insecure_channel(running.target) as ch:
            pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(ch))
            service = pool.FindServiceByName("meter.v1.UsageService")
            return [
                f"{m.name}({m.input_type.full_name}) {m.output_type.full_name}"
                for m in service.methods
            ]

    methods = await asyncio.to_thread(describe)
    assert (
        "IncrementUsage(meter.v1.IncrementUsageRequest) meter.v1.IncrementUsageResponse" in methods
    )
    assert (
        "BatchIncrementUsage(meter.v1.BatchIncrementUsageRequest) "
        "meter.v1.BatchIncrementUsageResponse" in methods
    )
    # with ExportStatus, ReplayDeadLetters, ForgetExportSink, ListUsage, ReserveUsage,
    # CommitReservation and ReleaseReservation
    assert len(methods) == 15
