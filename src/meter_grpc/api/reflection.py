"""Server reflection, v1 and v1alpha, serving the protos with their comments.

grpcio-reflection answers from a DescriptorPool and serializes each file again with
`FileDescriptor.CopyToProto`, which drops `source_code_info`: `grpcurl describe` would print
no comments whatever pool it is given. This servicer keeps its lookups (a DescriptorPool) but
answers with the files exactly as protoc wrote them with `--include_source_info` into
`meter/v1/descriptor_set.binpb` (`make proto`, drift-checked by `make test`).

grpcio-reflection serves only `grpc.reflection.v1alpha`. `grpc.reflection.v1` is the same
messages under a new package (grpc-proto `grpc/reflection/v1/reflection.proto`), so one
servicer answers both names with the v1alpha message classes; the v1 file served to clients
is the v1alpha descriptor renamed.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from importlib import resources
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc import aio
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

V1ALPHA_SERVICE = "grpc.reflection.v1alpha.ServerReflection"
V1_SERVICE = "grpc.reflection.v1.ServerReflection"
SERVICE_NAMES = (V1_SERVICE, V1ALPHA_SERVICE)
DESCRIPTOR_SET = "descriptor_set.binpb"


def _proto_of(file: Any) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    return proto


def _reflection_v1() -> descriptor_pb2.FileDescriptorProto:
    """grpc/reflection/v1/reflection.proto: the v1alpha file under its v1 package."""
    proto = _proto_of(reflection_pb2.DESCRIPTOR)
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = "grpc.reflection.v1"
    proto.ClearField("options")
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(old, new)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    return proto


class DescriptorSet:
    """Files by name, as serialized by protoc, and a pool to find symbols in them."""

    def __init__(self, files: Iterable[descriptor_pb2.FileDescriptorProto]) -> None:
        self.pool = descriptor_pool.DescriptorPool()
        self._serialized: dict[str, bytes] = {}
        self._dependencies: dict[str, list[str]] = {}
        for file in files:  # each after its dependencies
            if file.name in self._serialized:
                continue
            self.pool.Add(file)
            self._serialized[file.name] = file.SerializeToString()
            self._dependencies[file.name] = list(file.dependency)

    def file_containing(self, symbol: str) -> str:
        """The file that defines `symbol`: a type, a service, or (which the upb pool does not
        find on its own) a method, such as `grpcurl describe meter.v1.UsageService.GetUsage`
        asks for, or a field (KeyError when unknown)."""
        try:
            return self.pool.FindFileContainingSymbol(symbol).name
        except KeyError:
            parent, _, member = symbol.rpartition(".")
            with contextlib.suppress(KeyError):
                service = self.pool.FindServiceByName(parent)
                if member in service.methods_by_name:
                    return service.file.name
            message = self.pool.FindMessageTypeByName(parent)
            if member in message.fields_by_name:
                return message.file.name
            raise

    def with_dependencies(self, name: str) -> list[bytes]:
        """The file, then every file it imports, directly or not (KeyError when unknown)."""
        order = [name]
        for current in order:
            order += [d for d in self._dependencies[current] if d not in order]
        return [self._serialized[n] for n in order]


@functools.cache
def served_files() -> DescriptorSet:
    """meter.v1 with its comments (and its imports), health, and reflection v1alpha and v1."""
    data = resources.files("meter.v1").joinpath(DESCRIPTOR_SET).read_bytes()
    files = list(descriptor_pb2.FileDescriptorSet.FromString(data).file)
    files += [_proto_of(health_pb2.DESCRIPTOR), _proto_of(reflection_pb2.DESCRIPTOR)]
    return DescriptorSet([*files, _reflection_v1()])


class ReflectionServicer(reflection_pb2_grpc.ServerReflectionServicer):  # type: ignore[misc]
    """grpc.reflection ServerReflectionInfo over a DescriptorSet."""

    def __init__(self, service_names: Iterable[str], files: DescriptorSet) -> None:
        self._service_names = sorted(service_names)
        self._files = files

    async def ServerReflectionInfo(
        self, requests: AsyncIterable[Any], context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async for request in requests:
            try:
                answer = self._answer(request)
            except KeyError:
                answer = self._error(grpc.StatusCode.NOT_FOUND, "not found")
            answer.valid_host = request.host
            answer.original_request.CopyFrom(request)
            yield answer

    def _answer(self, request: Any) -> Any:
        pool = self._files.pool
        kind = request.WhichOneof("message_request")
        if kind == "list_services":
            return reflection_pb2.ServerReflectionResponse(
                list_services_response=reflection_pb2.ListServiceResponse(
                    service=[reflection_pb2.ServiceResponse(name=n) for n in self._service_names]
                )
            )
        if kind == "file_by_filename":
            return self._file(request.file_by_filename)
        if kind == "file_containing_symbol":
            return self._file(self._files.file_containing(request.file_containing_symbol))
        if kind == "file_containing_extension":
            ask = request.file_containing_extension
            message = pool.FindMessageTypeByName(ask.containing_type)
            extension = pool.FindExtensionByNumber(message, ask.extension_number)
            return self._file(self._files.file_containing(extension.full_name))
        if kind == "all_extension_numbers_of_type":
            message = pool.FindMessageTypeByName(request.all_extension_numbers_of_type)
            return reflection_pb2.ServerReflectionResponse(
                all_extension_numbers_response=reflection_pb2.ExtensionNumberResponse(
                    base_type_name=message.full_name,
                    extension_number=sorted(e.number for e in pool.FindAllExtensions(message)),
                )
            )
        return self._error(grpc.StatusCode.INVALID_ARGUMENT, "no request")

    def _file(self, name: str) -> Any:
        return reflection_pb2.ServerReflectionResponse(
            file_descriptor_response=reflection_pb2.FileDescriptorResponse(
                file_descriptor_proto=self._files.with_dependencies(name)
            )
        )

    @staticmethod
    def _error(code: grpc.StatusCode, message: str) -> Any:
        return reflection_pb2.ServerReflectionResponse(
            error_response=reflection_pb2.ErrorResponse(
                error_code=code.value[0], error_message=message
            )
        )


def enable_server_reflection(service_names: Iterable[str], server: aio.Server) -> None:
    """Serves reflection v1 and v1alpha for `service_names` (list them in it too)."""
    servicer = ReflectionServicer(service_names, served_files())
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.method_handlers_generic_handler(
        V1_SERVICE,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((v1,))
