"""Generate the Python code of protos/meter/v1 (messages, gRPC stubs, mypy stubs) and its
FileDescriptorSet with source info (the comments that server reflection serves).

python scripts/gen_protos.py src            # write src/meter/v1/*
python scripts/gen_protos.py --check src    # exit 1 when the committed code has drifted

Only protos/ and the well-known types of grpcio-tools are on the include path: the googleapis
files meter.v1 imports are vendored under protos/google. Python code is generated for
meter/v1 only; at run time google.rpc and google.api come from googleapis-common-protos.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc_tools
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = Path("meter") / "v1"
# meter.v1 and every file it imports, comments included (served by reflection), and the
# error details its errors carry, so that reflection clients (grpcurl, buf curl) decode them.
DESCRIPTOR_SET = "descriptor_set.binpb"
ERROR_DETAILS = "google/rpc/error_details.proto"


def _include_dirs() -> list[Path]:
    wellknown = Path(grpc_tools.__file__).parent / "_proto"
    return [PROTO_ROOT, wellknown]


def _strip_wellknown_comments(path: Path) -> None:
    """Keep source info for meter.v1 and the vendored googleapis files only: the comments of
    google/protobuf/*.proto (descriptor.proto alone is ~100 kB) are in every protobuf runtime."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())
    for f in fds.file:
        if f.name.startswith("google/protobuf/"):
            f.ClearField("source_code_info")
    path.write_bytes(fds.SerializeToString(deterministic=True))


def generate(out: Path) -> None:
    bindir = Path(sys.executable).parent
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE).glob("*.proto"))
    protoc = [sys.executable, "-m", "grpc_tools.protoc", *(f"-I{d}" for d in _include_dirs())]
    cmd = [
        *protoc,
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out=quiet:{out}",
        f"--mypy_grpc_out=quiet:{out}",
        *protos,
    ]
    subprocess.run(cmd, check=True, cwd=ROOT)
    descriptors = [
        *protoc,
        f"--descriptor_set_out={out / PACKAGE / DESCRIPTOR_SET}",
        "--include_imports",
        "--include_source_info",
        *protos,
        ERROR_DETAILS,
    ]
    subprocess.run(descriptors, check=True, cwd=ROOT)
    _strip_wellknown_comments(out / PACKAGE / DESCRIPTOR_SET)
    for pkg in (out / "meter", out / PACKAGE):
        (pkg / "__init__.py").write_text('"""Generated from protos/; do not edit."""\n')


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("dest", type=Path)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    dest: Path = args.dest / PACKAGE
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / PACKAGE
        if args.check:
            cmp = filecmp.dircmp(fresh, dest) if dest.exists() else None
            drift = (
                ["(missing)"]
                if cmp is None
                else sorted(
                    [*cmp.left_only, *cmp.right_only, *cmp.diff_files]
                    + [f for f in cmp.common_files if not filecmp.cmp(fresh / f, dest / f, False)]
                )
            )
            drift = [d for d in drift if d != "__pycache__"]
            if drift:
                print(f"generated code in {dest} is out of date: {sorted(set(drift))}")
                print("run `make proto` and commit the result")
                return 1
            print("generated code is up to date")
            return 0
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(fresh, dest)
        shutil.copy(Path(tmp) / "meter" / "__init__.py", dest.parent / "__init__.py")
        print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
