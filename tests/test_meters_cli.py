"""The command line with meters and reservations (a subprocess against the running server)."""

from __future__ import annotations

from typing import Any

from tests.conftest import Running
from tests.test_cli import cli


async def test_cli_meters_list_usage_and_reservations(running: Running) -> None:
    r = await cli(
        running,
        "policies", "create", "--name", "metered",
        "--meter", "API_CALLS:100:ALLOW_2X_OVERAGE:DAILY",
        "--meter", "GPU_SECONDS:1000",
        "--json",
    )  # fmt: skip
    assert r.status == 0, r.stderr
    policy: Any = r.json()
    assert [m["code"] for m in policy["meters"]] == ["API_CALLS", "GPU_SECONDS"]
    assert policy["meters"][0]["overage_strategy"] == "OVERAGE_STRATEGY_ALLOW_2X_OVERAGE"
    r = await cli(
        running, "licenses", "create", "--policy", policy["id"],
        "--meter-override", "GPU_SECONDS=800", "--json",
    )  # fmt: skip
    assert r.status == 0, r.stderr
    lic: Any = r.json()
    assert lic["meter_overrides"] == {"GPU_SECONDS": "800"}
    r = await cli(running, "usage", "increment", lic["id"], "5", "--meter", "API_CALLS", "--json")
    assert r.status == 0 and r.json()["uses"] == "5", r.stderr
    r = await cli(
        running, "usage", "reserve", lic["id"], "700", "--meter", "GPU_SECONDS",
        "--ttl", "600", "--json",
    )  # fmt: skip
    assert r.status == 0, r.stderr
    held: Any = r.json()
    assert (held["amount"], held["state"], held["usage_reserved"]) == (
        "700",
        "RESERVATION_STATE_OPEN",
        "700",
    )
    r = await cli(running, "usage", "list", lic["id"], "--json")
    assert r.status == 0, r.stderr
    rows: Any = r.json()["usages"]
    assert [(u["meter"], u.get("uses", "0"), u.get("reserved", "0")) for u in rows] == [
        ("", "0", "0"),
        ("API_CALLS", "5", "0"),
        ("GPU_SECONDS", "0", "700"),
    ]
    r = await cli(running, "usage", "commit", lic["id"], held["id"], "650", "--json")
    assert r.status == 0, r.stderr
    assert (r.json()["state"], r.json()["usage_uses"]) == ("RESERVATION_STATE_COMMITTED", "650")
    r = await cli(running, "usage", "release", lic["id"], held["id"])
    assert r.status != 0 and "RESERVATION_EXPIRED" in r.error_line
    r = await cli(running, "usage", "get", lic["id"], "--meter", "NOPE")
    assert r.status != 0 and "METER_NOT_FOUND" in r.error_line
    r = await cli(running, "usage", "list", lic["id"])  # the table form
    assert r.status == 0 and "GPU_SECONDS" in r.stdout, r.stderr
