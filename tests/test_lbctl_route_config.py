"""`lbctl route` and `lbctl config dump` against a real lbd.

`route` must predict the server a real request reaches next (then the session makes it sticky);
`config dump` must print TOML that `lbd check-config` and `lbd start --config` take back as is.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.backends import Backend, backends
from tests.harness.cli import assert_one_line_error
from tests.harness.daemon import Lbd, running_lbd, short_tempdir

# Keys the harness sets with flags on every daemon it starts (flags override the config file).
HARNESS_FLAG_KEYS = frozenset(("listen", "admin_socket", "state_dir"))


@pytest.fixture
def eu_backends() -> Iterator[list[Backend]]:
    with backends("eu1", "eu2", "us1") as started:
        yield started


@pytest.fixture
def dynamic_lbd(eu_backends: list[Backend]) -> Iterator[Lbd]:
    """lbd in dynamic mode with two eu-west servers and one us-east server, registered through lbctl."""
    with running_lbd(["--mode", "dynamic"]) as daemon:
        for backend, region in zip(eu_backends, ("eu-west", "eu-west", "us-east"), strict=True):
            flags = ("--id", backend.id, "--url", backend.url, "--region", region, "--capacity", "10")
            ok(daemon.lbctl("register", *flags))
        yield daemon


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert result.stderr == ""
    return result.stdout


def route(lbd: Lbd, *args: str) -> dict[str, Any]:
    answer = json.loads(ok(lbd.lbctl("route", *args, "--json")))
    assert isinstance(answer, dict)
    return answer


def backend_reached(lbd: Lbd, client_id: str, region: str | None = None) -> str:
    """Send one real request through lbd's proxy port; the backend that answered."""
    status, backend, body = lbd.proxy_get("/echo", client_id, region)
    assert status == 200, (status, body)
    return backend


# --- route -------------------------------------------------------------------------------------


def test_route_predicts_the_server_then_says_sticky(dynamic_lbd: Lbd) -> None:
    before = route(dynamic_lbd, "alice", "--region", "eu-west")
    assert before["reason"] == "best_in_region", before
    assert before["server"] in ("eu1", "eu2")
    assert before["server_region"] == "eu-west"
    assert before["session"] is None
    assert {c["server"] for c in before["candidates"]} == {"eu1", "eu2", "us1"}

    assert backend_reached(dynamic_lbd, "alice", "eu-west") == before["server"]

    after = route(dynamic_lbd, "alice", "--region", "eu-west")
    assert (after["server"], after["reason"]) == (before["server"], "sticky")
    assert after["session"]["server"] == before["server"]

    human = ok(dynamic_lbd.lbctl("route", "alice", "--region", "eu-west")).splitlines()
    assert human[0] == f"alice -> {before['server']} (eu-west): sticky"
    assert human[1] == after["detail"]
    chosen = next(line for line in human if line.startswith(">"))
    assert chosen.split()[2] == before["server"]


def test_route_ids_are_one_path_segment(dynamic_lbd: Lbd) -> None:
    odd = "team/a?b=1 c"
    answer = route(dynamic_lbd, odd, "--region", "eu-west")
    assert answer["client_id"] == odd
    assert answer["server"] == backend_reached(dynamic_lbd, odd, "eu-west")


def test_route_bad_region_exits_1_naming_it(dynamic_lbd: Lbd) -> None:
    assert_one_line_error(dynamic_lbd.lbctl("route", "x", "--region", "mars"), 1, "mars")
    assert_one_line_error(dynamic_lbd.lbctl("route", "x", "--region", "mars", "--json"), 1, "mars")
    assert_one_line_error(dynamic_lbd.lbctl("route", "x"), 1, "pass --region REGION", "us-west (client only)")
    assert_one_line_error(dynamic_lbd.lbctl("route", ""), 2, "CLIENT_ID")


def test_route_with_no_servers_exits_1() -> None:
    with running_lbd(["--mode", "dynamic"]) as daemon:
        assert_one_line_error(daemon.lbctl("route", "alice", "--region", "eu-west"), 1)


def test_route_in_static_mode_is_the_hash(static_lbd: Lbd) -> None:
    for client_id in ("alice", "bob", "carol"):
        answer = route(static_lbd, client_id)
        assert answer["mode"] == "static"
        assert answer["reason"] == "hash", answer
        assert answer["candidates"][0]["server"] == answer["server"]
        assert backend_reached(static_lbd, client_id) == answer["server"]
    human = ok(static_lbd.lbctl("route", "alice")).splitlines()
    assert human[0].startswith("alice -> ")
    assert human[0].endswith(": hash")


# --- config dump -------------------------------------------------------------------------------


def test_config_dump_round_trips_through_lbd(dynamic_lbd: Lbd, tmp_path: Path) -> None:
    text = ok(dynamic_lbd.lbctl("config", "dump"))
    dumped = tomllib.loads(text)
    assert dumped["mode"] == "dynamic"
    assert dumped["listen"] == "127.0.0.1:0"  # as configured; the bound port is in `status`
    assert dumped["admin_socket"] == str(dynamic_lbd.socket)
    assert "admin_token" not in dumped
    assert not text.startswith("#"), "the token comment is only for configs with admin_listen"
    assert json.loads(ok(dynamic_lbd.lbctl("config", "dump", "--json"))) == dumped

    path = tmp_path / "dumped.toml"
    path.write_text(text)
    check = subprocess.run(
        [sys.executable, "-m", "lbd", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert check.returncode == 0, (check.stdout, check.stderr)

    # The dump names the first daemon's socket and state; the harness's flags override them.
    with running_lbd(["--config", str(path)]) as second:
        assert second.socket != dynamic_lbd.socket
        again = tomllib.loads(ok(second.lbctl("config", "dump")))
        assert again["admin_socket"] == str(second.socket)
    assert without(again, HARNESS_FLAG_KEYS) == without(dumped, HARNESS_FLAG_KEYS)


def test_config_dump_with_admin_listener_mentions_the_token() -> None:
    workdir = short_tempdir()
    daemon = Lbd(workdir, ["--admin-listen", "127.0.0.1:0"], env={"LBD_ADMIN_TOKEN": "t" * 32})
    try:
        text = ok(daemon.start().lbctl("config", "dump"))
    finally:
        daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    first, rest = text.split("\n", 1)
    assert first.startswith("# lbd effective configuration")
    assert "LBD_ADMIN_TOKEN" in first
    dumped = tomllib.loads(rest)
    assert "admin_listen" in dumped
    assert "t" * 32 not in text


def without(mapping: dict[str, Any], keys: frozenset[str]) -> dict[str, Any]:
    return {key: value for key, value in mapping.items() if key not in keys}
