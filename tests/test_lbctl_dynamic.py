"""lbctl's commands that change a running lbd: register, deregister, drain, mode, sessions.

The real CLI as a subprocess against a real lbd in dynamic mode with no seed servers; every check
reads the result back through lbctl's --json output, so a command that only printed success fails.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lbctl.views import removal, sessions_table
from tests.harness.backends import Backend, backends
from tests.harness.cli import assert_one_line_error, render
from tests.harness.daemon import Lbd, running_lbd, wait_until


@pytest.fixture
def two_backends() -> Iterator[list[Backend]]:
    with backends("a", "b") as started:
        yield started


@pytest.fixture
def lbd() -> Iterator[Lbd]:
    """lbd in dynamic mode with no servers: everything here is registered through lbctl."""
    with running_lbd(["--mode", "dynamic"]) as daemon:
        yield daemon


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert result.stderr == ""
    return result.stdout


def register(
    lbd: Lbd, backend: Backend, region: str = "us-east", capacity: int = 10
) -> subprocess.CompletedProcess[str]:
    flags = ("--id", backend.id, "--url", backend.url, "--region", region, "--capacity", str(capacity))
    return lbd.lbctl("register", *flags)


def servers(lbd: Lbd) -> dict[str, dict[str, Any]]:
    return {server["id"]: server for server in json.loads(ok(lbd.lbctl("servers", "--json")))}


def sessions(lbd: Lbd, *args: str) -> dict[str, dict[str, Any]]:
    listed = json.loads(ok(lbd.lbctl("sessions", "--json", *args)))
    assert isinstance(listed, list)
    return {session["client_id"]: session for session in listed}


def proxied_get(lbd: Lbd, client_id: str, region: str, path: str = "/echo") -> tuple[int, bytes]:
    status, _, body = lbd.proxy_get(path, client_id, region)
    return status, body


# --- register ----------------------------------------------------------------------------------


def test_register_with_flags_is_listed_and_idempotent(lbd: Lbd, two_backends: list[Backend]) -> None:
    a = two_backends[0]
    out = ok(register(lbd, a, region="eu-west", capacity=7))
    assert out == f"registered a {a.url} (eu-west, capacity 7)\n"
    listed = servers(lbd)
    assert list(listed) == ["a"]
    assert (listed["a"]["url"], listed["a"]["region"], listed["a"]["capacity"]) == (a.url, "eu-west", 7)

    assert ok(register(lbd, a, region="eu-west", capacity=7)) == "a already registered (no change)\n"
    answer = json.loads(ok(lbd.lbctl("register", "--json", "--id", "a", "--url", a.url, "--region", "eu-west",
                                     "--capacity", "7")))  # fmt: skip
    assert answer["created"] == []
    assert [server["id"] for server in answer["servers"]] == ["a"]


def test_register_conflict_exits_5(lbd: Lbd, two_backends: list[Backend]) -> None:
    a, b = two_backends
    ok(register(lbd, a))
    other_url = ("--id", "a", "--url", b.url, "--region", "us-east", "--capacity", "10")
    assert_one_line_error(lbd.lbctl("register", *other_url), 5, "'a'", "already registered", a.url)
    assert servers(lbd)["a"]["url"] == a.url


def test_register_invalid_fields_exit_1_naming_the_field(lbd: Lbd, two_backends: list[Backend]) -> None:
    a = two_backends[0]
    assert_one_line_error(register(lbd, a, capacity=0), 1, "capacity")
    assert_one_line_error(register(lbd, a, region="mars"), 1, "region", "mars")
    assert servers(lbd) == {}


def test_register_from_file_sends_one_all_or_nothing_request(
    lbd: Lbd, two_backends: list[Backend], tmp_path: Path
) -> None:
    a, b = two_backends
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([a.entry(), b.entry(capacity=0)]))
    assert_one_line_error(lbd.lbctl("register", "--from-file", str(bad)), 1, "capacity")
    assert servers(lbd) == {}, "a list is one request: the valid entry must not be registered alone"

    good = tmp_path / "servers.json"
    good.write_text(json.dumps([a.entry(capacity=3), b.entry(region="eu-west")]))
    out = ok(lbd.lbctl("register", "--from-file", str(good)))
    assert out.splitlines() == [
        f"registered a {a.url} (us-east, capacity 3)",
        f"registered b {b.url} (eu-west, capacity 10)",
    ]
    listed = servers(lbd)
    assert {(s["id"], s["region"], s["capacity"]) for s in listed.values()} == {
        ("a", "us-east", 3),
        ("b", "eu-west", 10),
    }

    single = tmp_path / "one.json"
    single.write_text(json.dumps(a.entry(capacity=3)))
    assert ok(lbd.lbctl("register", "--from-file", str(single))) == "a already registered (no change)\n"


def test_register_usage_errors_exit_2(lbd: Lbd, two_backends: list[Backend], tmp_path: Path) -> None:
    missing = tmp_path / "absent.json"
    assert_one_line_error(lbd.lbctl("register", "--from-file", str(missing)), 2, str(missing), "No such file")
    not_json = tmp_path / "servers.txt"
    not_json.write_text("id=a\n")
    assert_one_line_error(lbd.lbctl("register", "--from-file", str(not_json)), 2, str(not_json), "not JSON")
    both = lbd.lbctl("register", "--from-file", str(not_json), "--id", "a", "--capacity", "3")
    assert_one_line_error(both, 2, "--from-file", "--id", "--capacity")
    assert_one_line_error(lbd.lbctl("register", "--id", "a"), 2, "--url", "--region", "--capacity")
    assert_one_line_error(lbd.lbctl("register"), 2, "--id", "--from-file")
    assert servers(lbd) == {}


# --- drain, deregister -------------------------------------------------------------------------


def test_drain_and_undrain(lbd: Lbd, two_backends: list[Backend]) -> None:
    ok(register(lbd, two_backends[0]))
    assert ok(lbd.lbctl("drain", "a")) == "a draining\n"
    assert servers(lbd)["a"]["draining"] is True
    assert ok(lbd.lbctl("undrain", "a")) == "a back in rotation\n"
    assert servers(lbd)["a"]["draining"] is False
    assert_one_line_error(lbd.lbctl("drain", "nope"), 4, "nope")
    assert_one_line_error(lbd.lbctl("undrain", "nope"), 4, "nope")


def test_deregister(lbd: Lbd, two_backends: list[Backend]) -> None:
    for backend in two_backends:
        ok(register(lbd, backend))
    out = ok(lbd.lbctl("deregister", "a"))
    assert out.startswith("removed a (drained in ")
    assert list(servers(lbd)) == ["b"]
    assert_one_line_error(lbd.lbctl("deregister", "nope"), 4, "no server with id 'nope'")
    assert_one_line_error(lbd.lbctl("deregister", "a"), 4, "'a'")


def test_deregister_waits_for_requests_in_flight(lbd: Lbd, two_backends: list[Backend]) -> None:
    """lbd answers only once the slow request is done: lbctl must wait for it, not time out."""
    ok(register(lbd, two_backends[0]))
    answers: list[tuple[int, bytes]] = []
    slow = threading.Thread(target=lambda: answers.append(proxied_get(lbd, "c1", "us-east", "/slow/1200")))
    slow.start()
    wait_until(lambda: lbd.servers()["a"]["active"] == 1)
    answer = json.loads(ok(lbd.lbctl("deregister", "a", "--json")))
    slow.join(10)
    assert (answer["removed"], answer["drained"], answer["in_flight_at_removal"]) == ("a", True, 0)
    assert answer["waited_ms"] >= 500
    assert answers and answers[0][0] == 200
    assert servers(lbd) == {}


def test_deregister_now_reports_requests_still_in_flight(lbd: Lbd, two_backends: list[Backend]) -> None:
    ok(register(lbd, two_backends[0]))
    slow = threading.Thread(target=proxied_get, args=(lbd, "c1", "us-east", "/slow/800"))
    slow.start()
    wait_until(lambda: lbd.servers()["a"]["active"] == 1)
    out = ok(lbd.lbctl("deregister", "a", "--now"))
    slow.join(10)
    assert out == "removed a with 1 request still in flight\n"
    assert servers(lbd) == {}


# --- mode --------------------------------------------------------------------------------------


def test_mode_shows_and_switches(lbd: Lbd) -> None:
    def status_mode() -> str:
        return str(json.loads(ok(lbd.lbctl("status", "--json")))["mode"])

    override = "switched at run time, the config says dynamic"
    assert ok(lbd.lbctl("mode")) == "mode: dynamic\n"
    assert ok(lbd.lbctl("mode", "static")) == f"mode: static (was dynamic; {override})\n"
    assert status_mode() == "static"
    assert json.loads(ok(lbd.lbctl("mode", "--json"))) == {
        "mode": "static",
        "config_mode": "dynamic",
        "from_config": False,
    }
    assert "static (switched at run time; the config says dynamic" in ok(lbd.lbctl("status"))
    assert ok(lbd.lbctl("mode", "dynamic")) == f"mode: dynamic (was static; {override})\n"
    assert status_mode() == "dynamic"
    assert ok(lbd.lbctl("mode", "static")) == f"mode: static (was dynamic; {override})\n"
    assert ok(lbd.lbctl("mode", "--from-config")) == "mode: dynamic (was static)\n"  # the config's again
    assert json.loads(ok(lbd.lbctl("status", "--json")))["mode_from_config"] is True
    assert_one_line_error(lbd.lbctl("mode", "static", "--from-config"), 2, "not both")

    bogus = lbd.lbctl("mode", "bogus")
    assert bogus.returncode == 2, bogus
    assert bogus.stdout == ""
    assert "bogus" in bogus.stderr
    assert status_mode() == "dynamic"


# --- sessions ----------------------------------------------------------------------------------


def test_sessions_list_filter_and_clear(lbd: Lbd, two_backends: list[Backend]) -> None:
    a, b = two_backends
    ok(register(lbd, a, region="us-east"))
    ok(register(lbd, b, region="eu-west"))
    clients = {"u1": "us-east", "u2": "us-east", "e1": "eu-west"}  # e1 last: the most recently active
    routed = {}
    for client_id, region in clients.items():
        status, body = proxied_get(lbd, client_id, region)
        assert status == 200, body
        routed[client_id] = json.loads(body)["server"]
    assert routed == {"u1": "a", "u2": "a", "e1": "b"}

    listed = sessions(lbd)
    assert {client: s["server"] for client, s in listed.items()} == routed
    assert {client: s["region"] for client, s in listed.items()} == clients
    assert set(sessions(lbd, "--server", "a")) == {"u1", "u2"}
    assert set(sessions(lbd, "--region", "eu-west")) == {"e1"}
    assert set(sessions(lbd, "--limit", "1")) == {"e1"}

    human = ok(lbd.lbctl("sessions", env={"COLUMNS": "80"})).splitlines()
    assert human[0].split() == ["CLIENT", "SERVER", "REGION", "IDLE", "EXPIRES", "IN"]
    assert human[1].split()[:3] == ["e1", "b", "eu-west"]
    assert human[-1] == "3 shown of 3 sessions"
    assert ok(lbd.lbctl("sessions", "--server", "a")).splitlines()[-1] == "2 shown of 3 sessions"

    status = ok(lbd.lbctl("status", env={"COLUMNS": "80"}))
    assert all(len(line) <= 80 for line in status.splitlines()), status
    assert "sessions      3" in status
    assert "3 total, 0 retries, 0 failovers" in status

    assert ok(lbd.lbctl("sessions", "clear", "u1")) == "cleared the session of u1\n"
    assert set(sessions(lbd)) == {"u2", "e1"}
    assert_one_line_error(lbd.lbctl("sessions", "clear", "u1"), 4, "u1")

    assert ok(lbd.lbctl("sessions", "clear", "--server", "a")) == "cleared 1 session on a\n"
    assert set(sessions(lbd)) == {"e1"}
    assert json.loads(ok(lbd.lbctl("sessions", "clear", "--server", "a", "--json"))) == {"cleared": 0, "server": "a"}

    assert_one_line_error(lbd.lbctl("sessions", "clear"), 2, "CLIENT_ID", "--server")
    assert_one_line_error(lbd.lbctl("sessions", "clear", "e1", "--server", "b"), 2, "exactly one")
    assert set(sessions(lbd)) == {"e1"}


# --- views -------------------------------------------------------------------------------------


def test_views_of_removal_and_sessions() -> None:
    in_flight = {"removed": "s1", "drained": False, "in_flight_at_removal": 2, "waited_ms": 30000}
    assert render(removal(in_flight)) == "removed s1 with 2 requests still in flight\n"
    assert render(removal({"removed": "s1", "drained": True, "in_flight_at_removal": 0, "waited_ms": 1520})) == (
        "removed s1 (drained in 1.5 s)\n"
    )
    rows = [
        {"client_id": "x" * 90, "server": "backend-1", "region": "asia-south", "idle_s": 75.2, "expires_in_s": -1},
        {"client_id": "c2", "server": "s2", "region": None},
    ]
    text = render(sessions_table({"sessions": rows, "total": 10}))
    assert all(len(line.rstrip()) <= 80 for line in text.splitlines()), text
    assert text.count("x") == 90, "the long client id folds but stays whole"
    assert "1m 15s" in text
    assert text.splitlines()[-1] == "2 shown of 10 sessions"
    assert render(sessions_table({"sessions": [], "total": 0})) == "0 shown of 0 sessions\n"
