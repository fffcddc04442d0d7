"""lbctl end to end: the real CLI as a subprocess against a real lbd, plus its pure views and helpers."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbctl import main as lbctl_main
from lbctl.client import Client
from lbctl.completions import SCRIPT_FILES, write_completions
from lbctl.views import humanize_duration, reload_report, server_panel, servers_table, status_panel, wide_servers_table
from tests.harness.backends import Backend
from tests.harness.cli import assert_one_line_error, render
from tests.harness.daemon import Lbd, short_tempdir

REPO = Path(__file__).resolve().parent.parent
SERVER_FIELDS = ("id", "url", "region", "capacity", "health")


def run_lbctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """lbctl with no --socket and no inherited LBD_SOCKET / XDG_RUNTIME_DIR unless `env` sets them."""
    base = {k: v for k, v in os.environ.items() if k not in ("LBD_SOCKET", "XDG_RUNTIME_DIR")}
    full_env = {**base, "COLUMNS": "120", "NO_COLOR": "1", **(env or {})}
    command = [sys.executable, "-m", "lbctl.main", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=20, env=full_env, check=False)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory for socket paths that nothing listens on (Unix paths max out at 107 bytes)."""
    directory = short_tempdir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


# --- against a running lbd ---------------------------------------------------------------------


def test_status_json_is_the_api_object(static_lbd: Lbd) -> None:
    result = static_lbd.lbctl("status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["mode"] == "static"
    assert status["listeners"]["proxy"] == f"127.0.0.1:{static_lbd.port}"
    assert status["listeners"]["admin"] == str(static_lbd.socket)
    assert status["servers"]["total"] == 3


def test_status_human(static_lbd: Lbd) -> None:
    result = static_lbd.lbctl("status")
    assert result.returncode == 0, result.stderr
    for expected in ("static", f"127.0.0.1:{static_lbd.port}", str(static_lbd.socket), "3 total", "3 healthy"):
        assert expected in result.stdout
    assert result.stderr == ""


def test_servers_json_is_the_list(static_lbd: Lbd, three_backends: list[Backend]) -> None:
    result = static_lbd.lbctl("servers", "--json")
    assert result.returncode == 0, result.stderr
    servers = json.loads(result.stdout)
    assert isinstance(servers, list)
    assert [server["id"] for server in servers] == ["s1", "s2", "s3"]
    for server, backend, capacity in zip(servers, three_backends, (10, 5, 5), strict=True):
        assert all(field in server for field in SERVER_FIELDS), server
        assert (server["url"], server["capacity"], server["health"]) == (backend.url, capacity, "healthy")


def test_servers_table_shows_every_server(static_lbd: Lbd, three_backends: list[Backend]) -> None:
    result = static_lbd.lbctl("servers")
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0].split()
    assert header == [
        "ID", "REGION", "URL", "CAPACITY", "HEALTH", "DRAIN", "ACTIVE", "REQUESTS", "ERRORS", "LATENCY", "FACTOR",
        "SESS", "SCORE",
    ]  # fmt: skip
    for backend in three_backends:
        row = next(line for line in result.stdout.splitlines() if line.startswith(f"{backend.id} "))
        assert backend.url in row
        assert "healthy" in row


def test_servers_table_at_80_columns(static_lbd: Lbd) -> None:
    result = static_lbd.lbctl("servers", env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(len(line.rstrip()) <= 80 for line in lines), result.stdout
    assert "HEALTH" in lines[0]
    for server_id in ("s1", "s2", "s3"):
        assert any(line.startswith(f"{server_id} ") for line in lines), result.stdout


def test_server_detail(static_lbd: Lbd, three_backends: list[Backend]) -> None:
    result = static_lbd.lbctl("server", "s2", "--json")
    assert result.returncode == 0, result.stderr
    server = json.loads(result.stdout)
    assert (server["id"], server["url"], server["capacity"]) == ("s2", three_backends[1].url, 5)

    human = static_lbd.lbctl("server", "s2")
    assert human.returncode == 0, human.stderr
    assert "s2" in human.stdout
    assert three_backends[1].url in human.stdout


def test_server_not_found_exits_4(static_lbd: Lbd) -> None:
    for args in (("server", "nope"), ("server", "nope", "--json")):
        assert_one_line_error(static_lbd.lbctl(*args), 4, "no server with id 'nope'")


def test_lbd_socket_env_is_honoured(static_lbd: Lbd) -> None:
    result = run_lbctl("status", "--json", env={"LBD_SOCKET": str(static_lbd.socket)})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["listeners"]["admin"] == str(static_lbd.socket)


def test_default_socket_is_in_xdg_runtime_dir(static_lbd: Lbd) -> None:
    """The same default as `lbd start`: $XDG_RUNTIME_DIR/lbd.sock (the harness's socket is named so)."""
    assert static_lbd.socket.name == "lbd.sock"
    result = run_lbctl("servers", "--json", env={"XDG_RUNTIME_DIR": str(static_lbd.socket.parent)})
    assert result.returncode == 0, result.stderr


def test_socket_flag_wins_over_env(static_lbd: Lbd, socket_dir: Path) -> None:
    env = {"LBD_SOCKET": str(socket_dir / "absent.sock")}
    result = run_lbctl("--socket", str(static_lbd.socket), "status", "--json", env=env)
    assert result.returncode == 0, result.stderr


# --- without a usable lbd ----------------------------------------------------------------------


@pytest.mark.parametrize("args", [("status",), ("servers", "--json"), ("server", "s1")])
def test_daemon_not_running_exits_3(socket_dir: Path, args: tuple[str, ...]) -> None:
    path = socket_dir / "absent.sock"
    result = run_lbctl("--socket", str(path), *args)
    assert_one_line_error(result, 3, f"cannot reach lbd at {path}", "no such file", "lbd start", "--socket")


def test_daemon_not_running_via_env(socket_dir: Path) -> None:
    path = socket_dir / "absent.sock"
    assert_one_line_error(run_lbctl("status", env={"LBD_SOCKET": str(path)}), 3, str(path))


def test_stale_socket_exits_3(socket_dir: Path) -> None:
    """A crashed lbd leaves its socket file behind with nobody listening."""
    path = socket_dir / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        assert_one_line_error(run_lbctl("--socket", str(path), "status"), 3, str(path), "connection refused")


def test_socket_that_is_not_lbd_exits_3(socket_dir: Path) -> None:
    path = socket_dir / "other.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen()
        thread = threading.Thread(target=_answer_garbage, args=(server,), daemon=True)
        thread.start()
        result = run_lbctl("--socket", str(path), "servers")
        thread.join(5)
    assert_one_line_error(result, 3, str(path), "not HTTP")


def _answer_garbage(server: socket.socket) -> None:
    connection, _ = server.accept()
    with connection:
        connection.recv(65536)
        connection.sendall(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")


def test_unexpected_error_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def broken(self: Client, path: str) -> object:
        raise RuntimeError("boom")

    monkeypatch.setattr(Client, "get", broken)
    monkeypatch.setattr(sys, "argv", ["lbctl", "--socket", "/nonexistent/lbd.sock", "status"])
    with pytest.raises(SystemExit) as exit_info:
        lbctl_main.main()
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "lbctl: error: unexpected RuntimeError: boom\n")


def test_usage_errors_exit_2_and_help_documents_exit_codes() -> None:
    assert run_lbctl("no-such-command").returncode == 2
    assert run_lbctl("server").returncode == 2
    help_text = run_lbctl("--help")
    assert help_text.returncode == 0
    assert "3 lbd not reachable" in help_text.stdout
    assert "LBD_SOCKET" in help_text.stdout


# --- pure pieces -------------------------------------------------------------------------------


def test_views_tolerate_missing_and_extra_fields() -> None:
    sparse = {"id": "x1", "weight": 3}
    table = render(servers_table([sparse, {"id": "x2", "health": "cooldown", "draining": True}]))
    assert "x1" in table
    assert "x2" in table
    assert "cooldown" in table
    panel = render(server_panel(sparse))
    assert "x1" in panel
    assert "weight" in panel
    assert "mode" in render(status_panel({"future": {"nested": 1}}))
    assert "no servers" in render(servers_table([]))


def test_status_shows_the_config_file_and_how_the_last_reload_went() -> None:
    last_ok = {"config_file": "/etc/lbd/lbd.toml", "succeeded": 1, "failed": 0, "last": {"ok": True, "error": None}}
    assert "config        /etc/lbd/lbd.toml, last reload ok" in render(status_panel({"reload": last_ok}), 120)
    refused = {"config_file": "/etc/lbd/lbd.toml", "last": {"ok": False, "error": "lbd.toml: unknown key 'x'"}}
    assert "last reload refused: lbd.toml: unknown key 'x'" in render(status_panel({"reload": refused}), 200)
    assert "no --config" in render(status_panel({"reload": {"config_file": None, "last": None}}))
    assert "config        -" in render(status_panel({}))  # an lbd from before reloads


def test_reload_report_lists_changes_servers_and_warnings() -> None:
    answer = {
        "config_file": "/etc/lbd/lbd.toml",
        "changed": [{"key": "health.path", "old": "/health", "new": "/ready"}, {"key": "x", "old": None, "new": [1]}],
        "servers": {"added": ["s4", "s5"], "replaced": [], "removed": ["s2"]},
        "warnings": ["mode: stays"],
    }
    assert render(reload_report(answer), 120).splitlines() == [
        "reloaded /etc/lbd/lbd.toml",
        '  health.path: "/health" -> "/ready"',
        "  x: unset -> [1]",
        "  servers added: s4, s5",
        "  servers removed: s2",
        "  warning: mode: stays",
    ]
    assert render(reload_report({"config_file": "a.toml", "changed": []})).strip() == "reloaded a.toml: nothing changed"


def test_views_stay_within_80_columns_with_long_urls() -> None:
    servers = [
        {"id": f"backend-{n}", "url": f"https://backend-{n}.eu-west.example.internal:8443", "region": "asia-south"}
        for n in range(3)
    ]
    for width in (120, 80, 60):
        text = render(servers_table(servers), width)
        assert all(len(line.rstrip()) <= width for line in text.splitlines()), text
        for n in range(3):
            assert f"backend-{n}" in text


def test_humanize_duration() -> None:
    assert [humanize_duration(s) for s in (1.122, 75, 3 * 3600 + 300, 2 * 86400 + 7200)] == [
        "1s",
        "1m 15s",
        "3h 05m",
        "2d 02h",
    ]


def test_completions_are_up_to_date(tmp_path: Path) -> None:
    write_completions(tmp_path)
    for name in SCRIPT_FILES.values():
        committed = REPO / "completions" / name
        assert committed.exists(), f"completions/{name} is missing; run `make completions`"
        assert (tmp_path / name).read_text() == committed.read_text(), (
            f"completions/{name} is out of date with the lbctl app; run `make completions`"
        )


def test_the_servers_table_never_folds_a_value_and_says_what_it_left_out() -> None:
    servers = [
        {
            "id": f"backend-{n}", "url": f"https://backend-{n}.eu-west.example.internal:8443", "region": "asia-south",
            "capacity": 100, "health": "cooldown" if n else "healthy", "draining": n == 2, "active": 3,
            "requests": 123456, "errors": 7, "latency_ewma_ms": 12.5, "latency_factor": 1.25, "sessions": 4200,
            "score": 43.1,
        }
        for n in range(3)
    ]  # fmt: skip
    wide = render(servers_table(servers), 200)
    assert "not shown" not in wide and all(s["url"] in wide for s in servers)
    narrow = render(servers_table(servers), 80)
    lines = narrow.splitlines()
    assert all(len(line.rstrip()) <= 80 for line in lines), narrow
    assert "not shown at this width: URL" in lines[-1] and "-o wide" in lines[-1]
    for server in servers:  # what is shown is whole: no id, health or number cut or folded
        row = next(line for line in lines if line.startswith(f"{server['id']} "))
        assert server["health"] in row and "…" not in narrow
    full = render(wide_servers_table(servers), 400)
    assert all(header in full for header in ("URL", "FACTOR", "SESS", "SCORE")) and servers[0]["url"] in full


def test_the_server_panel_reads_as_sentences() -> None:
    now = 1_800_000_000.0
    server = {
        "id": "s1", "health": "cooldown", "in_rotation": False, "cooldown_remaining_s": 78.4, "ejections": 1,
        "checks": {"last_at": now - 3, "last_ok": False, "last_detail": "HTTP 404", "passed": 10, "failed": 3,
                   "consecutive_failures": 3, "consecutive_passes": 0, "passive_failures": 0},
        "last_transition_at": now - 40, "last_transition_reason": "3 checks failed: HTTP 404",
    }  # fmt: skip
    text = render(server_panel(server, now), 100)
    assert "HTTP 404 (failed), 3s ago" in text and "10 passed, 3 failed; 3 failed in a row" in text
    assert "1m 18s left" in text and "40s ago: 3 checks failed: HTTP 404" in text
    assert "{" not in text and "1800000" not in text  # no raw JSON, no epoch seconds
