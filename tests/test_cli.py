"""The `meter-grpc` command line, run as a separate process the way an operator runs it: the
installed console script (next to this interpreter) when there is one, else
`python -m meter_grpc`, with this tree's src first on PYTHONPATH.

Admin commands run against the real server of the `running` fixture; startup errors run the
server with one bad METER_* value each, in an empty directory that must stay empty.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import meter_grpc
from meter_grpc.cli import EXIT_NOT_FOUND, EXIT_REFUSED, EXIT_UNAVAILABLE, EXIT_USAGE
from tests.conftest import Running
from tests.support import ADMIN_TOKEN

SRC = Path(meter_grpc.__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "meter-grpc"


def command(module: bool = False) -> list[str]:
    if SCRIPT.exists() and not module:
        return [str(SCRIPT)]
    return [sys.executable, "-m", "meter_grpc"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METER_")}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


@dataclass
class Result:
    status: int
    stdout: str
    stderr: str

    def json(self) -> dict[str, object]:
        doc: dict[str, object] = json.loads(self.stdout)
        return doc

    @property
    def error_line(self) -> str:
        lines = self.stderr.splitlines()
        assert len(lines) == 1, self.stderr
        assert "Traceback" not in self.stderr
        return lines[0]


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, module: bool = False
) -> Result:
    proc = subprocess.run(
        [*command(module), *args],
        cwd=cwd,
        env=env if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


async def cli(running: Running, *args: str) -> Result:
    """An admin command against the running server (in a thread: the server shares this loop)."""
    env = clean_env(METER_TARGET=running.target, METER_TOKEN=ADMIN_TOKEN)
    return await asyncio.to_thread(run_cli, *args, env=env)


# --- help and version: no server, no ./var ----------------------------------------------------


@pytest.mark.parametrize(
    ("args", "module"),
    [
        (["--help"], False),
        (["-h"], False),
        (["--version"], False),
        (["--help"], True),
        (["serve", "--help"], False),
        (["licenses", "create", "--help"], False),
    ],
)
def test_help_and_version_print_and_exit_without_serving(
    tmp_path: Path, args: list[str], module: bool
) -> None:
    r = run_cli(*args, cwd=tmp_path, module=module)
    assert r.status == 0, r.stderr
    assert r.stderr == ""
    if args == ["--version"]:
        assert r.stdout.startswith("meter-grpc ")
        assert r.stdout.split()[1][0].isdigit()
    else:
        assert "usage: meter-grpc" in r.stdout
    if args[0] == "--help" or args == ["-h"]:
        assert "exit status:" in r.stdout and "USAGE_LIMIT_EXCEEDED" in r.stdout
    assert list(tmp_path.iterdir()) == []


def test_usage_errors_are_one_line_with_status_2(tmp_path: Path) -> None:
    for args in (["frobnicate"], ["usage", "increment"], ["licenses", "rotate", "x"]):
        r = run_cli(*args, cwd=tmp_path)
        assert r.status == EXIT_USAGE
        assert r.error_line.startswith("meter-grpc: USAGE: ")
    r = run_cli("policies", "list", cwd=tmp_path)  # no token anywhere
    assert r.status == EXIT_USAGE
    assert r.error_line.startswith("meter-grpc: NO_TOKEN: ")
    assert list(tmp_path.iterdir()) == []


# --- startup errors ---------------------------------------------------------------------------


def _bad_values(tmp: Path) -> list[tuple[dict[str, str], str]]:
    a_file = tmp / "a-file"
    a_file.write_text("x")
    junk = tmp / "junk.pem"
    junk.write_text("not a pem\n")
    ec_key = tmp / "ec.pem"
    ec_key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    missing = str(tmp / "missing.pem")
    return [
        ({"METER_REDIS_URL": "localhost:6379"}, "redis+cluster://"),
        ({"METER_REDIS_URL": "http://h:1"}, "redis+cluster://"),
        ({"METER_REDIS_URL": "redis://user:s3cret@h:port"}, "METER_REDIS_URL"),
        ({"METER_LISTEN": "50061"}, "HOST:PORT"),
        ({"METER_LISTEN": "127.0.0.1:70000"}, "HOST:PORT"),
        ({"METER_LOG_LEVEL": "verbose"}, "DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        ({"METER_DATA_DIR": str(a_file)}, "not a directory"),
        ({"METER_DATA_DIR": str(a_file / "sub")}, "cannot be created"),
        ({"METER_METRICS_LISTEN": "metrics"}, "HOST:PORT"),
        ({"METER_SHUTDOWN_GRACE": "soon"}, "number of seconds"),
        ({"METER_SHUTDOWN_GRACE": "0"}, "number of seconds"),
        ({"METER_REDIS_TIMEOUT": "5s"}, "number of seconds"),
        ({"METER_REDIS_TIMEOUT": "nan"}, "number of seconds"),
        ({"METER_SIGNING_KEY_FILE": missing}, "cannot read"),
        ({"METER_SIGNING_KEY_FILE": str(junk)}, "Ed25519"),
        ({"METER_SIGNING_KEY_FILE": str(ec_key)}, "Ed25519"),
        ({"METER_KEY_SECRET_FILE": missing}, "cannot read"),
        ({"METER_KEY_SECRET_FILE": str(junk)}, "expected 32 random bytes or 64 hex digits"),
        ({"METER_TLS_CERT": missing, "METER_TLS_KEY": missing}, "cannot read"),
        ({"METER_TLS_CERT": str(junk), "METER_TLS_KEY": str(ec_key)}, "PEM certificate"),
        ({"METER_TLS_CERT": str(junk)}, "METER_TLS_KEY"),
        ({"METER_TLS_CLIENT_CA": str(junk)}, "METER_TLS_CERT"),
        ({"METER_ADMIN_TOKENS": "one token"}, "comma-separated"),
        ({"METER_FAILPOINTS": "nonsense"}, "name=action"),
    ]


def test_every_bad_variable_is_one_line_exit_2_nothing_created(tmp_path: Path) -> None:
    files = tmp_path / "files"
    files.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for env, expected in _bad_values(files):
        r = run_cli(cwd=cwd, env=clean_env(**env))
        assert r.status == EXIT_USAGE, (env, r.stderr)
        line = r.error_line
        assert line.startswith("meter-grpc: "), line
        assert any(name in line for name in env), (env, line)
        assert expected in line, (env, line)
        assert "s3cret" not in line
        assert list(cwd.iterdir()) == [], env


def test_address_in_use_is_one_line_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = f"127.0.0.1:{busy.getsockname()[1]}"
        for env in (
            {"METER_LISTEN": taken},
            {"METER_LISTEN": "127.0.0.1:0", "METER_METRICS_LISTEN": taken},
        ):
            r = run_cli(cwd=tmp_path, env=clean_env(**env))
            assert r.status == EXIT_USAGE
            name = list(env)[-1]
            assert r.error_line.startswith(f"meter-grpc: {name}='{taken}': cannot listen there")
    assert list(tmp_path.iterdir()) == []


def test_read_only_data_dir_is_refused(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere: a read-only directory is no error for it")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for data_dir in (ro, ro / "sub"):
            r = run_cli(cwd=tmp_path, env=clean_env(METER_DATA_DIR=str(data_dir)))
            assert r.status == EXIT_USAGE
            assert "METER_DATA_DIR" in r.error_line and "writable" in r.error_line
    finally:
        ro.chmod(0o755)


def test_serve_is_the_default_and_reports_a_bad_variable(tmp_path: Path) -> None:
    for args in ((), ("serve",)):
        r = run_cli(*args, cwd=tmp_path, env=clean_env(METER_LISTEN="50061"))
        assert r.status == EXIT_USAGE
        assert "METER_LISTEN" in r.error_line
    assert list(tmp_path.iterdir()) == []


# --- admin commands against the running server ------------------------------------------------


async def test_policy_license_usage_flow_tables_and_json(running: Running) -> None:
    r = await cli(running, "policies", "create", "--name", "cli-metered", "--max-uses", "3",
                  "--duration", "30d", "--entitlement", "PRO", "--json")  # fmt: skip
    assert r.status == 0, r.stderr
    policy = r.json()
    assert (policy["name"], policy["max_uses"], policy["duration"]) == (
        "cli-metered",
        "3",
        "2592000s",
    )
    policy_id = str(policy["id"])

    r = await cli(running, "policies", "get", policy_id)
    assert r.status == 0 and policy_id in r.stdout and "30d" in r.stdout

    r = await cli(running, "licenses", "create", "--policy", policy_id, "--name", "acme", "--json")
    assert r.status == 0, r.stderr
    lic = r.json()
    license_id = str(lic["id"])
    assert lic["key"] and lic["policy_id"] == policy_id

    r = await cli(running, "usage", "increment", license_id, "2", "--request-id", "cli-1")
    assert r.status == 0, r.stderr
    assert "uses" in r.stdout and "remaining" in r.stdout
    r = await cli(running, "usage", "increment", license_id, "2", "--request-id", "cli-1")
    assert r.status == 0  # the same request id: counted once

    r = await cli(running, "usage", "get", license_id, "--json")
    assert r.status == 0
    usage = r.json()
    assert (usage["uses"], usage["max_uses"], usage["remaining"]) == ("2", "3", "1")
    r = await cli(running, "usage", "get", license_id)
    lines = dict(line.split(None, 1) for line in r.stdout.splitlines())
    assert (lines["uses"], lines["max_uses"], lines["remaining"]) == ("2", "3", "1")

    # refused: one line with the reason, exit 1, nothing counted
    r = await cli(running, "usage", "increment", license_id, "2")
    assert r.status == EXIT_REFUSED
    assert r.error_line.startswith("meter-grpc: USAGE_LIMIT_EXCEEDED: ")
    assert r.stdout == ""
    r = await cli(running, "usage", "get", license_id, "--json")
    assert r.json()["uses"] == "2"

    r = await cli(running, "usage", "decrement", license_id, "--json")
    assert r.json()["uses"] == "1"
    r = await cli(running, "usage", "reset", license_id, "--json")
    assert r.json()["uses"] == "0"

    r = await cli(running, "licenses", "list", "--policy", policy_id)
    assert r.status == 0
    header, *rows = r.stdout.splitlines()
    assert header.split()[:2] == ["ID", "POLICY_ID"] and len(rows) == 1 and license_id in rows[0]
    r = await cli(running, "policies", "list", "--json")
    assert policy_id in [p["id"] for p in r.json()["policies"]]  # type: ignore[attr-defined]


async def test_license_lifecycle_and_not_found(running: Running) -> None:
    r = await cli(
        running, "policies", "create", "--name", "cli-life", "--duration", "30d", "--json"
    )
    policy_id = str(r.json()["id"])
    r = await cli(running, "licenses", "create", "--policy", policy_id, "--json")
    license_id = str(r.json()["id"])

    r = await cli(running, "licenses", "suspend", license_id, "--json")
    assert r.json()["status"] == "LICENSE_STATUS_SUSPENDED"
    r = await cli(running, "usage", "increment", license_id)
    assert r.status == EXIT_REFUSED and "LICENSE_SUSPENDED" in r.error_line
    r = await cli(running, "licenses", "reinstate", license_id, "--json")
    assert r.json()["status"] == "LICENSE_STATUS_ACTIVE"
    before = (await cli(running, "licenses", "get", license_id, "--json")).json()["expire_time"]
    r = await cli(running, "licenses", "renew", license_id, "--json")
    assert r.status == 0 and str(r.json()["expire_time"]) > str(before)
    r = await cli(
        running, "licenses", "update", license_id, "--max-uses", "7", "--name", "n", "--json"
    )
    assert (r.json()["max_uses"], r.json()["name"]) == ("7", "n")
    r = await cli(running, "licenses", "update", license_id, "--max-uses", "unlimited", "--json")
    assert "max_uses" not in r.json()

    r = await cli(running, "policies", "update", policy_id, "--max-uses", "5", "--floating",
                  "--max-machines", "2", "--json")  # fmt: skip
    assert r.status == 0, r.stderr
    assert (r.json()["max_uses"], r.json()["floating"]) == ("5", True)
    r = await cli(running, "policies", "delete", policy_id)
    assert r.status == EXIT_REFUSED and "POLICY_IN_USE" in r.error_line

    old_key = (await cli(running, "licenses", "get", license_id, "--json")).json()["key"]
    r = await cli(running, "licenses", "rotate-key", license_id, "--json")
    assert r.status == 0, r.stderr
    assert r.json()["key"] and r.json()["key"] != old_key
    r = await cli(running, "licenses", "rotate-key", license_id, "--key", "K" * 20, "--json")
    assert r.json()["key"] == "K" * 20

    r = await cli(running, "licenses", "delete", license_id)
    assert r.status == 0
    r = await cli(running, "licenses", "get", license_id)
    assert r.status == EXIT_NOT_FOUND
    assert r.error_line.startswith("meter-grpc: LICENSE_NOT_FOUND: ")
    r = await cli(running, "policies", "delete", policy_id)
    assert r.status == 0


async def test_machines(running: Running) -> None:
    r = await cli(
        running, "policies", "create", "--max-machines", "1", "--max-cores", "8", "--json"
    )
    policy_id = str(r.json()["id"])
    r = await cli(running, "licenses", "create", "--policy", policy_id, "--json")
    license_id = str(r.json()["id"])
    r = await cli(running, "machines", "activate", license_id, "fp-1", "--cores", "4",
                  "--hostname", "h1", "--json")  # fmt: skip
    assert r.status == 0, r.stderr
    machine_id = str(r.json()["id"])
    r = await cli(running, "machines", "activate", license_id, "fp-2", "--cores", "2")
    assert r.status == EXIT_REFUSED and "MACHINE_LIMIT_EXCEEDED" in r.error_line
    r = await cli(running, "machines", "list", license_id)
    assert r.status == 0 and machine_id in r.stdout and "fp-1" in r.stdout
    r = await cli(running, "machines", "get", machine_id, "--json")
    assert (r.json()["cores"], r.json()["hostname"]) == ("4", "h1")
    r = await cli(running, "machines", "deactivate", machine_id)
    assert r.status == 0
    r = await cli(running, "machines", "get", machine_id)
    assert r.status == EXIT_NOT_FOUND and "MACHINE_NOT_FOUND" in r.error_line


async def test_checkout_then_verify_offline(running: Running, tmp_path: Path) -> None:
    r = await cli(running, "policies", "create", "--name", "cli-files", "--json")
    policy_id = str(r.json()["id"])
    r = await cli(running, "licenses", "create", "--policy", policy_id, "--json")
    lic = r.json()
    license_id, key = str(lic["id"]), str(lic["key"])
    r = await cli(running, "public-key", "--json")
    public_hex = str(r.json()["hex"])
    key_file = tmp_path / "public.hex"
    key_file.write_text(public_hex + "\n")

    plain = tmp_path / "plain.lic"
    r = await cli(running, "checkout", license_id, "-o", str(plain), "--ttl", "1d")
    assert r.status == 0, r.stderr
    assert plain.read_text().startswith("-----BEGIN LICENSE FILE-----")

    def verify(*args: str) -> Result:
        return run_cli("verify", *args, cwd=tmp_path)  # offline: no target, no token

    r = await asyncio.to_thread(verify, str(plain), "--public-key", public_hex)
    assert r.status == 0, r.stderr
    assert "OK" in r.stdout and license_id in r.stdout
    b64 = base64.b64encode(bytes.fromhex(public_hex)).decode()
    r = await asyncio.to_thread(verify, str(plain), "--public-key", b64, "--json")
    assert r.status == 0 and r.json()["valid"] is True
    r = await asyncio.to_thread(verify, str(plain), "--public-key", str(key_file))
    assert r.status == 0

    # tampered: the payload changed, the signature kept
    lines = plain.read_text().splitlines()
    body = json.loads(base64.b64decode("".join(lines[1:-1])))
    payload = json.loads(base64.b64decode(body["enc"]))
    payload["data"]["attributes"]["maxUses"] = 1_000_000
    body["enc"] = base64.b64encode(json.dumps(payload).encode()).decode()
    tampered = tmp_path / "tampered.lic"
    armored = base64.b64encode(json.dumps(body).encode()).decode()
    tampered.write_text(f"{lines[0]}\n{armored}\n{lines[-1]}\n")
    r = await asyncio.to_thread(verify, str(tampered), "--public-key", public_hex)
    assert r.status == EXIT_REFUSED
    assert r.error_line.startswith("meter-grpc: BAD_SIGNATURE: ")

    encrypted = tmp_path / "encrypted.lic"
    r = await cli(running, "checkout", license_id, "-o", str(encrypted), "--encrypt", "--json")
    assert r.status == 0 and r.json()["encrypted"] is True
    r = await asyncio.to_thread(verify, str(encrypted), "--public-key", public_hex)
    assert r.status == EXIT_REFUSED and "LICENSE_KEY_REQUIRED" in r.error_line
    r = await asyncio.to_thread(
        verify, str(encrypted), "--public-key", public_hex, "--license-key", key
    )
    assert r.status == 0, r.stderr
    r = await asyncio.to_thread(verify, str(plain), "--public-key", "not-a-key")
    assert r.status == EXIT_USAGE and "BAD_PUBLIC_KEY" in r.error_line


async def test_wrong_token_and_unreachable_service(running: Running, tmp_path: Path) -> None:
    env = clean_env(METER_TARGET=running.target, METER_TOKEN="wrong")
    r = await asyncio.to_thread(run_cli, "policies", "list", env=env)
    assert r.status == 5 and "meter-grpc: " in r.error_line
    # the token the server writes in METER_DATA_DIR is found there
    (tmp_path / "admin-token").write_text(ADMIN_TOKEN + "\n")
    env = clean_env(METER_TARGET=running.target, METER_DATA_DIR=str(tmp_path))
    r = await asyncio.to_thread(run_cli, "policies", "list", "--json", env=env)
    assert r.status == 0, r.stderr
    assert isinstance(r.json()["policies"], list)
    r = await asyncio.to_thread(
        run_cli, "policies", "list", "--target", "127.0.0.1:1", "--timeout", "3", env=env
    )
    assert r.status == EXIT_UNAVAILABLE and r.error_line.startswith("meter-grpc: UNAVAILABLE: ")


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_clean_keeps_var() -> None:
    root = SRC.parent
    out = subprocess.run(
        ["make", "-n", "clean"], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    assert "rm" in out and " var" not in out and "var/" not in out
    out = subprocess.run(
        ["make", "-n", "destroy-data"], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    assert "var" in out
