"""A Node client (tests/interop/node: @grpc/grpc-js + @grpc/proto-loader, no generated code)
against a real meter-grpc server: usage limits with the ErrorInfo of `grpc-status-details-bin`,
cores, StreamUsage, WatchUsage, and license files verified with Node's crypto alone.

Skipped, with the reason, when node or npm is missing. `npm ci` runs here (once, and again
only when package.json, package-lock.json or .npmrc changes), so `make test` needs nothing more.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
from pathlib import Path

import pytest
from google.rpc import status_pb2

from tests.conftest import Running
from tests.support import ADMIN_TOKEN

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "tests" / "interop" / "node"
STAMP = NODE_DIR / "node_modules" / ".meter-installed"
MIN_NODE = 18
NPM_TIMEOUT_S = 300
CLIENT_TIMEOUT_S = 60


def _googleapis_protos() -> str:
    """The directory holding google/rpc/status.proto in the googleapis-common-protos wheel:
    the client uses it only while protos/ lacks google/rpc/status.proto."""
    site = Path(status_pb2.__file__).resolve().parents[2]
    return str(site) if (site / "google" / "rpc" / "status.proto").is_file() else ""


def _lock_digest() -> str:
    h = hashlib.sha256()
    for name in ("package.json", "package-lock.json", ".npmrc"):
        h.update(name.encode() + b"\0" + (NODE_DIR / name).read_bytes() + b"\0")
    return h.hexdigest()


NODE, NPM = shutil.which("node"), shutil.which("npm")
_MISSING = [name for name, path in (("node", NODE), ("npm", NPM)) if path is None]

# Decided before any fixture starts a server: a skip raised from a fixture after the session's
# server fixtures have started can hang their teardown.
pytestmark = pytest.mark.skipif(
    bool(_MISSING),
    reason=(
        f"Node interop client not run: {' and '.join(_MISSING)} not found on PATH "
        f"(install Node.js >= {MIN_NODE} with npm to run tests/interop/node)"
    ),
)


async def _run(argv: list[str], timeout_s: float, **env: str) -> tuple[int, str]:
    """Runs a command beside the server (which lives in this event loop: a blocking
    subprocess.run would stop it answering); returns its exit status and output."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=NODE_DIR,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        pytest.fail(f"{' '.join(argv)} did not finish in {timeout_s} s:\n{out.decode()}")
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def _node() -> str:
    """The node binary, with tests/interop/node/node_modules installed by `npm ci`."""
    assert NODE is not None
    assert NPM is not None
    status, version = await _run([NODE, "--version"], 30)
    found = re.match(r"v(\d+)\.", version.strip())
    if status != 0 or found is None or int(found.group(1)) < MIN_NODE:
        pytest.skip(
            f"Node interop client not run: node {version.strip()} is older than v{MIN_NODE}"
        )
    digest = _lock_digest()
    if not (STAMP.is_file() and STAMP.read_text() == digest):
        # --prefer-offline: packages already in npm's cache are not fetched again.
        status, out = await _run([NPM, "ci", "--prefer-offline"], NPM_TIMEOUT_S)
        assert status == 0, f"npm ci failed in {NODE_DIR} (exit {status}):\n{out}"
        STAMP.write_text(digest)
    return NODE


async def test_node_client(running: Running) -> None:
    node = await _node()
    status, out = await _run(
        [node, "client.js"],
        CLIENT_TIMEOUT_S,
        METER_TARGET=running.target,
        METER_ADMIN_TOKEN=ADMIN_TOKEN,
        METER_PROTOS_DIR=str(ROOT / "protos"),
        METER_GOOGLEAPIS_PROTOS=_googleapis_protos(),
    )
    print(out)
    assert status == 0, f"the Node client failed (exit {status}):\n{out}"
    assert "all Node checks passed" in out, out
