"""What an operator reaches for at run time, end to end with the real lbctl against a real lbd: the
audit trail (log lines, JSON logs, /metrics), several ids per command, `check`, `regions`,
`mode --from-config`, one-line usage errors, filters that refuse unknown values, `--version`, and
shell completion offering the running lbd's server ids and regions."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbd import __version__
from tests.harness.backends import Backend, backends
from tests.harness.cli import assert_one_line_error
from tests.harness.daemon import Lbd, running_lbd, short_tempdir, wait_until


@pytest.fixture(scope="module")
def four() -> Iterator[list[Backend]]:
    with backends("a1", "a2", "a3", "a4") as started:
        yield started


@pytest.fixture
def operated(four: list[Backend]) -> Iterator[Lbd]:
    with running_lbd(["--mode", "dynamic", "--log-format", "json"], [b.entry() for b in four]) as daemon:
        yield daemon


def audit_lines(daemon: Lbd) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    return [line["audit"] for line in lines if line.get("logger") == "lbd.audit"]  # type: ignore[misc]


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_change_is_one_audit_line_saying_who_and_counted(operated: Lbd) -> None:
    ok(operated.lbctl("drain", "a1", "a2"))
    ok(operated.lbctl("undrain", "a1"))
    ok(operated.lbctl("mode", "static"))
    ok(operated.lbctl("mode", "--from-config"))
    ok(
        operated.lbctl(
            "register", "--id", "x9", "--url", "http://127.0.0.1:9", "--region", "eu-west", "--capacity", "3"
        )
    )
    ok(operated.lbctl("deregister", "x9", "--now"))
    audited = wait_until(lambda: audit_lines(operated) if len(audit_lines(operated)) >= 7 else None)
    actions = [(line["action"], line["subject"]) for line in audited]
    assert actions == [
        ("drain", "a1"),
        ("drain", "a2"),
        ("undrain", "a1"),
        ("mode", ""),
        ("mode", ""),
        ("register", "x9"),
        ("deregister", "x9"),
    ]
    assert (audited[0]["old"], audited[0]["new"]) == (False, True)
    assert (audited[3]["old"], audited[3]["new"]) == ("dynamic", "static")
    who = str(audited[0]["by"])
    assert re.fullmatch(rf"uid {os.getuid()} \(\S+, pid \d+\)", who), who  # the kernel's word, not the client's
    metrics = operated.request("GET", "/metrics")[1]
    assert 'lbd_admin_changes_total{action="drain"} 2.0' in metrics
    assert 'lbd_admin_changes_total{action="mode"} 2.0' in metrics
    for line in operated.log().splitlines():  # every line of the log is one JSON object
        assert {"time", "level", "logger", "message"} <= json.loads(line).keys()


def test_text_logs_carry_the_same_line(four: list[Backend]) -> None:
    with running_lbd(entries=[b.entry() for b in four]) as daemon:
        ok(daemon.lbctl("drain", "a3"))
        line = wait_until(lambda: next((x for x in daemon.log().splitlines() if "INFO drain a3 by uid" in x), None))
        assert line.endswith(": draining no -> yes")


def test_an_unknown_id_among_several_changes_nothing(operated: Lbd) -> None:
    assert_one_line_error(operated.lbctl("drain", "a1", "nosuch", "a2"), 4, "'nosuch'", "nothing was changed")
    assert not any(server["draining"] for server in operated.servers().values())


def test_several_ids_give_a_list_in_json(operated: Lbd) -> None:
    answers = json.loads(ok(operated.lbctl("drain", "a1", "a2", "--json")))
    assert [(a["id"], a["draining"]) for a in answers] == [("a1", True), ("a2", True)]
    assert json.loads(ok(operated.lbctl("undrain", "a1", "--json")))["id"] == "a1"  # one id: the object


def test_check_probes_now_and_ends_a_cooldown(four: list[Backend], tmp_path: Path) -> None:
    """Scheduled checks ten minutes apart and a ten-minute cooldown: only `lbctl check` probes here."""
    config = tmp_path / "lbd.toml"
    config.write_text("[health]\ninterval_ms = 600000\ncooldown_ms = 600000\nrise = 1\n")
    backend = four[3]
    with running_lbd(["--config", str(config)], [backend.entry()]) as daemon:
        backend.health_status = 503
        try:
            for _ in range(3):  # fall = 3 failed checks: into cooldown
                ok(daemon.lbctl("check", "a4"))
            assert daemon.servers()["a4"]["health"] == "cooldown"
        finally:
            backend.health_status = 200
        answer = json.loads(ok(daemon.lbctl("check", "a4", "--json")))
        assert answer["passed"] and answer["cooldown_ended"]
        assert (answer["health"]["before"], answer["health"]["after"]) == ("cooldown", "healthy")
        assert "check passed (HTTP 200)" in ok(daemon.lbctl("check", "a4"))


def test_regions_lists_each_once_marking_client_only(operated: Lbd) -> None:
    rows = {row["region"]: row for row in json.loads(ok(operated.lbctl("regions", "--json")))}
    assert rows["us-west"]["client_only"] and rows["us-west"]["latency_ms"] is None
    assert rows["us-east"]["servers"] == 4 and not rows["us-east"]["client_only"]
    table = ok(operated.lbctl("regions"))
    assert "us-west (client only)" in table and "10 ms" in table


def test_filters_refuse_what_does_not_exist(operated: Lbd) -> None:
    assert_one_line_error(operated.lbctl("sessions", "--server", "nosuch"), 4, "'nosuch'")
    assert_one_line_error(operated.lbctl("sessions", "--region", "mars"), 1, "'mars'", "us-west")


def test_route_explains_what_is_missing_and_notes_what_is_ignored(four: list[Backend]) -> None:
    with running_lbd(entries=[b.entry() for b in four]) as static:
        result = static.lbctl("route", "zoe", "--region", "eu-west")
        assert result.returncode == 0 and "--region has no effect in static mode" in result.stderr


def test_usage_errors_are_one_line_naming_the_command() -> None:
    def lbctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lbctl.main", *args], capture_output=True, text=True, check=False)

    assert_one_line_error(lbctl("drain"), 2, "Missing argument", "lbctl drain --help")
    assert_one_line_error(lbctl("status", "--bogus"), 2, "--bogus", "lbctl status --help")
    assert_one_line_error(lbctl("mode", "weird"), 2, "weird")
    assert lbctl("--version").stdout == f"lbctl {__version__}\n"
    helped = lbctl("drain", "--help").stdout
    assert "Example: lbctl drain s1 s2" in helped and "<bool>" not in helped


def complete(daemon: Lbd, words: str) -> list[str]:
    """What bash completion offers after `words` (click's protocol, as completions/lbctl.bash uses it)."""
    typed = words.split()
    current = len(typed) if words.endswith(" ") else len(typed) - 1
    env = {
        **os.environ,
        "_LBCTL_COMPLETE": "complete_bash",
        "COMP_WORDS": words,
        "COMP_CWORD": str(current),
        "LBD_SOCKET": str(daemon.socket),
    }
    command = [sys.executable, "-m", "lbctl.main"]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=20, check=False).stdout.split()


def test_completion_offers_the_running_lbd_s_ids_and_regions(operated: Lbd) -> None:
    assert complete(operated, "lbctl drain ") == ["a1", "a2", "a3", "a4"]
    assert complete(operated, "lbctl deregister a") == ["a1", "a2", "a3", "a4"]
    assert "us-west" in complete(operated, "lbctl route x --region ")
    assert "us-west" not in complete(operated, "lbctl register --region ")  # no server may be placed there
    assert complete(operated, "lbctl mode ") == ["static", "dynamic"]


def test_completion_is_quiet_without_a_daemon(operated: Lbd) -> None:
    operated.stop()
    assert complete(operated, "lbctl drain ") == []


def test_systemd_hears_ready_reloading_and_stopping(four: list[Backend], tmp_path: Path) -> None:
    """`Type=notify`: READY=1 once serving, RELOADING=1 then READY=1 around a SIGHUP, STOPPING=1."""
    notices = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = short_tempdir() / "notify"
    notices.bind(str(address))
    notices.settimeout(15)
    config = tmp_path / "lbd.toml"
    config.write_text("timeout_base_ms = 2000\n")
    try:
        with running_lbd(["--config", str(config)], [four[0].entry()], env={"NOTIFY_SOCKET": str(address)}) as daemon:
            ready = notices.recv(4096).decode().splitlines()
            assert ready[0] == "READY=1" and ready[1].startswith("STATUS=serving on 127.0.0.1:")
            daemon.signal(signal.SIGHUP)
            reloading = notices.recv(4096).decode().splitlines()
            assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
            assert notices.recv(4096) == b"READY=1"
            assert daemon.stop() == 0
            assert notices.recv(4096) == b"STOPPING=1"
    finally:
        notices.close()
        shutil.rmtree(address.parent, ignore_errors=True)


def routes(daemon: Lbd, clients: range) -> dict[str, str]:
    return {f"c{n}": daemon.get(f"/v1/route/c{n}")["server"] for n in clients}


def test_set_capacity_moves_only_the_clients_the_new_weight_implies(four: list[Backend]) -> None:
    with running_lbd(entries=[b.entry(capacity=10) for b in four]) as daemon:
        before = routes(daemon, range(600))
        assert ok(daemon.lbctl("set", "capacity", "a1", "30")) == "a1 capacity 30 (was 10)\n"
        grown = routes(daemon, range(600))
        moved = {client for client in before if grown[client] != before[client]}
        assert moved and all(grown[client] == "a1" for client in moved)  # only towards the grown server
        answer = json.loads(ok(daemon.lbctl("set", "capacity", "a1", "5", "--json")))
        assert (answer["capacity"], answer["previous_capacity"]) == (5, 30)
        shrunk = routes(daemon, range(600))
        moved = {client for client in grown if shrunk[client] != grown[client]}
        assert moved and all(grown[client] == "a1" for client in moved)  # only away from it
        assert daemon.servers()["a1"]["capacity"] == 5
        assert_one_line_error(daemon.lbctl("set", "capacity", "nosuch", "5"), 4, "'nosuch'")
        assert_one_line_error(daemon.lbctl("set", "capacity", "a1", "0"), 2, "N")
        assert daemon.request("PUT", "/v1/servers/a1/capacity", {"capacity": "x"})[0] == 422
        assert "INFO capacity a1 by uid" in daemon.log() and "capacity 30 -> 5" in daemon.log()


def test_servers_wide_shows_every_column_at_any_width(operated: Lbd) -> None:
    narrow = ok(operated.lbctl("servers", env={"COLUMNS": "60"}))
    assert "URL" not in narrow.splitlines()[0] and "-o wide shows them" in narrow
    wide = ok(operated.lbctl("servers", "-o", "wide", env={"COLUMNS": "60"}))
    assert all(header in wide.splitlines()[0] for header in ("URL", "REGION", "FACTOR", "SESS", "SCORE"))
