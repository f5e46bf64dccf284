"""The protos as other languages see them: self-contained, annotated, every error reason listed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc_tools
from google.api import field_behavior_pb2
from google.protobuf import descriptor_pb2

from meter.v1 import error_reason_pb2, license_pb2, machine_pb2, policy_pb2
from meter_grpc.domain.errors import Reason

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def test_every_proto_builds_with_protos_and_the_well_known_types_only(tmp_path: Path) -> None:
    wellknown = Path(grpc_tools.__file__).parent / "_proto"
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    assert "google/rpc/status.proto" in files
    assert "google/api/field_behavior.proto" in files
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"-I{wellknown}",
            f"--descriptor_set_out={tmp_path / 'all.binpb'}",
            *files,
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert (PROTOS / "google" / "LICENSE").read_text().lstrip().startswith("Apache License")


def test_error_reason_enum_lists_exactly_the_reasons_the_service_emits() -> None:
    values = error_reason_pb2.ErrorReason.DESCRIPTOR.values_by_name
    assert values["ERROR_REASON_UNSPECIFIED"].number == 0
    # ErrorInfo.reason carries the value name without the ERROR_REASON_ prefix.
    listed = {name.removeprefix("ERROR_REASON_") for name in values} - {"UNSPECIFIED"}
    assert listed == {reason.value for reason in Reason}
    for reason in Reason:
        assert error_reason_pb2.ErrorReason.Value(f"ERROR_REASON_{reason.value}") > 0


def _behaviors(message: type, field: str) -> set[str]:
    options = message.DESCRIPTOR.fields_by_name[field].GetOptions()  # type: ignore[attr-defined]
    return {
        field_behavior_pb2.FieldBehavior.Name(b)
        for b in options.Extensions[field_behavior_pb2.field_behavior]
    }


def test_server_set_fields_are_output_only() -> None:
    for message, fields in (
        (
            policy_pb2.Policy,
            ["id", "create_time", "update_time", "revision", "propagated_revision"],
        ),
        (
            license_pb2.License,
            ["id", "status", "uses", "machines_count", "cores_count", "create_time"],
        ),
        (machine_pb2.Machine, ["id", "license_id", "last_heartbeat_time", "create_time"]),
    ):
        for field in fields:
            assert _behaviors(message, field) == {"OUTPUT_ONLY"}, (message, field)
    assert _behaviors(license_pb2.License, "policy_id") == {"REQUIRED", "IMMUTABLE"}


def test_every_meter_file_names_its_package_for_other_languages() -> None:
    data = (ROOT / "src" / "meter" / "v1" / "descriptor_set.binpb").read_bytes()
    files = [
        f for f in descriptor_pb2.FileDescriptorSet.FromString(data).file if f.package == "meter.v1"
    ]
    assert len(files) == len(list((PROTOS / "meter" / "v1").glob("*.proto")))
    for f in files:
        assert f.options.go_package and f.options.java_package, f.name
        assert f.options.java_multiple_files and f.options.csharp_namespace, f.name
        assert f.source_code_info.location, f.name
