"""`lbctl status --watch`: NDJSON for scripts, printed frames for pipes, a live screen in a real terminal.

The terminal test drives the real CLI inside tmux (a real pty, a real Ctrl-C) and reads the screen
back with `tmux capture-pane`, while a backend really goes down under a fast health check.
"""

from __future__ import annotations

import http.client
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lbctl import main as lbctl_main
from lbctl.client import ApiError, Client
from lbctl.views import dashboard
from lbctl.watch import Sample, frame, rates
from tests.harness.backends import Backend, backends
from tests.harness.cli import render
from tests.harness.daemon import Lbd, running_lbd, short_tempdir, wait_until

REPO = Path(__file__).resolve().parent.parent
FAST_HEALTH = "[health]\ninterval_ms = 100\ntimeout_ms = 80\nfall = 2\ncooldown_ms = 5000\n"
OUT_OF_SERVICE = ("failing", "cooldown", "degraded")


def watch_command(lbd: Lbd, *args: str) -> list[str]:
    return [sys.executable, "-m", "lbctl.main", "--socket", str(lbd.socket), "status", "--watch", *args]


def watch_env() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "80", "NO_COLOR": "1"}


def traffic(lbd: Lbd, stop: threading.Event) -> None:
    """Requests through the proxy until told to stop, so the rates have something to count."""
    while not stop.is_set():
        connection = http.client.HTTPConnection("127.0.0.1", lbd.port, timeout=5)
        try:
            connection.request("GET", "/echo", headers={"client-id": "watcher"})
            connection.getresponse().read()
        finally:
            connection.close()
        time.sleep(0.01)


# --- NDJSON and printed frames -------------------------------------------------------------------


def test_watch_json_prints_one_object_per_refresh(static_lbd: Lbd) -> None:
    stop = threading.Event()
    sender = threading.Thread(target=traffic, args=(static_lbd, stop), daemon=True)
    sender.start()
    try:
        started = time.monotonic()
        result = static_lbd.lbctl("status", "--watch", "--json", "--count", "3", "--interval", "0.2")
        took = time.monotonic() - started
    finally:
        stop.set()
        sender.join(10)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stdout
    frames = [json.loads(line) for line in lines]
    for each in frames:
        assert set(each) == {"time", "status", "servers", "sessions", "rates"}
        assert each["status"]["mode"] == "static"
        assert [server["id"] for server in each["servers"]] == ["s1", "s2", "s3"]
        assert isinstance(each["sessions"], dict | None)
    assert frames[0]["rates"] is None
    for each in frames[1:]:
        assert set(each["rates"]["servers"]) == {"s1", "s2", "s3"}
        assert 0.1 < each["rates"]["elapsed_s"] < 2
        assert each["rates"]["errors_per_s"] == 0
    assert any(each["rates"]["requests_per_s"] > 0 for each in frames[1:]), frames
    assert frames[0]["time"] < frames[1]["time"] < frames[2]["time"]
    assert took >= 0.4, "three refreshes 0.2 s apart"


def test_watch_without_a_terminal_prints_each_frame(static_lbd: Lbd) -> None:
    result = static_lbd.lbctl("status", "--watch", "--count", "2", "--interval", "0.1", env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), result.stdout
    assert sum(line.startswith("ID ") for line in lines) == 2
    for server_id in ("s1", "s2", "s3"):
        rows = [line for line in lines if line.startswith(f"{server_id} ")]
        assert len(rows) == 2
        assert all("healthy" in row for row in rows)


def test_watch_usage_errors_exit_2(static_lbd: Lbd) -> None:
    for args, fragment in (
        (("--watch", "--interval", "0"), "--interval"),
        (("--watch", "--interval", "-1"), "--interval"),
        (("--watch", "--interval", "nan"), "--interval"),
        (("--watch", "--count", "0"), "--count"),
        (("--interval", "0.5"), "--watch"),
        (("--count", "2"), "--watch"),
    ):
        result = static_lbd.lbctl("status", *args)
        assert result.returncode == 2, (args, result)
        assert result.stdout == ""
        assert fragment in result.stderr
    assert static_lbd.lbctl("status", "--watch", "--interval", "soon").returncode == 2


def test_watch_stops_cleanly_on_ctrl_c_and_closed_stdout(static_lbd: Lbd) -> None:
    interrupted = subprocess.Popen(
        watch_command(static_lbd, "--json", "--interval", "0.1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=watch_env(),
    )
    assert interrupted.stdout is not None
    assert json.loads(interrupted.stdout.readline())["status"]["mode"] == "static"
    interrupted.send_signal(signal.SIGINT)
    _, err = interrupted.communicate(timeout=10)
    assert (interrupted.returncode, err) == (0, "")

    for args in (("--json",), ()):  # NDJSON, and frames printed to a pipe
        closed = subprocess.Popen(
            watch_command(static_lbd, *args, "--interval", "0.05"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=watch_env(),
        )
        assert closed.stdout is not None
        assert closed.stdout.readline().startswith(b"{" if args else b"lbd ")
        closed.stdout.close()  # like `| head -1`
        assert closed.wait(timeout=10) == 0, args
        assert closed.stderr is not None
        assert closed.stderr.read() == b""
        closed.stderr.close()


def test_watch_exits_3_when_lbd_goes_away(static_lbd: Lbd) -> None:
    watcher = subprocess.Popen(
        watch_command(static_lbd, "--json", "--interval", "0.1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=watch_env(),
    )
    assert watcher.stdout is not None
    watcher.stdout.readline()
    assert static_lbd.stop() == 0
    _, err = watcher.communicate(timeout=20)
    assert watcher.returncode == 3, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lbctl: error: cannot reach lbd at {static_lbd.socket}")


# --- the pure pieces -----------------------------------------------------------------------------

STATUS: dict[str, Any] = {
    "mode": "dynamic",
    "version": "0.1.0",
    "pid": 4242,
    "uptime_s": 3725,
    "listeners": {"proxy": "127.0.0.1:8080", "admin": "/run/user/1000/lbd.sock"},
    "servers": {"total": 4, "in_rotation": 2, "by_health": {"healthy": 1, "failing": 1, "cooldown": 1, "degraded": 1}},
    "clients": {"connections": 3},
    "requests": {"total": 1200, "responses": {"2xx": 1100, "5xx": 100}, "retries": 2, "failovers": 1},
    "sessions": {"total": 42},
}
SERVERS: list[dict[str, Any]] = [
    {"id": "eu-web-1", "region": "eu-west", "url": "http://10.0.0.11:3000", "health": "healthy", "draining": False,
     "active": 3, "capacity": 10, "score": 2.61, "latency_ewma_ms": 26.1, "requests": 900, "errors": 0},
    {"id": "asia-web-2", "region": "asia-south", "url": "https://asia-web-2.asia-south.example.internal:8443",
     "health": "failing", "draining": True, "active": 9, "capacity": 10, "score": 12.5, "latency_ewma_ms": 1026.1,
     "requests": 250, "errors": 12},
    {"id": "us-web-3", "region": "us-east", "url": "http://10.0.0.13:3000", "health": "cooldown", "draining": False,
     "active": 0, "capacity": 5, "score": 1.0, "latency_ewma_ms": 10.0, "requests": 50, "errors": 50},
    {"id": "oc-web-4", "region": "oceania", "url": "http://10.0.0.14:3000", "health": "degraded", "active": 5,
     "capacity": 5},
]  # fmt: skip
SUMMARY = {"total": 42, "by_server": {"eu-web-1": 30, "asia-web-2": 12}, "by_region": {"eu-west": 30, "me-central": 12}}


def sample(at: float, total: int, errors_5xx: int, per_server: dict[str, int]) -> Sample:
    status = {**STATUS, "requests": {"total": total, "responses": {"5xx": errors_5xx}}}
    servers = [{**server, "requests": per_server.get(server["id"], 0)} for server in SERVERS]
    return Sample(monotonic=at, time=1_700_000_000 + at, status=status, servers=servers, sessions=SUMMARY)


def test_rates_between_two_samples() -> None:
    first = sample(10.0, 1000, 10, {"eu-web-1": 100, "asia-web-2": 50, "us-web-3": 7})
    second = sample(12.0, 1300, 14, {"eu-web-1": 300, "asia-web-2": 40})
    assert frame(None, first).rates is None
    computed = rates(first, second)
    assert computed is not None
    assert (computed["elapsed_s"], computed["requests_per_s"], computed["errors_per_s"]) == (2.0, 150.0, 2.0)
    servers = computed["servers"]
    assert servers["eu-web-1"]["requests_per_s"] == 100.0
    assert servers["asia-web-2"]["requests_per_s"] is None, "a counter that went down is no rate"
    assert servers["us-web-3"]["requests_per_s"] is None
    assert servers["oc-web-4"]["errors_per_s"] is None, "no errors counter, no rate"
    assert frame(first, second).to_json()["rates"] == computed


@pytest.mark.parametrize("width", [80, 100, 140])
def test_dashboard_fits_and_keeps_every_id(width: int) -> None:
    computed = rates(sample(0.0, 1000, 0, {}), sample(1.0, 1123, 2, {"eu-web-1": 100}))
    text = render(dashboard(STATUS, SERVERS, SUMMARY, computed), width)
    lines = text.splitlines()
    assert all(len(line.rstrip()) <= width for line in lines), text
    for server in SERVERS:
        row = next((line for line in lines if line.startswith(f"{server['id']} ")), None)
        assert row is not None, (server["id"], text)
        assert server["health"] in row.split(), row
    assert "123.0 req/s, 2.0 5xx/s" in text
    assert "42 pinned; by region: eu-west 30, me-central 12" in text
    assert "1200 total, 2 retries, 1 failovers; 3 client connections" in text
    assert "1 healthy, 1 failing, 1 cooldown, 1 degraded" in text
    if width >= 140:
        assert SERVERS[1]["url"] in text
    if width >= 100:
        assert "asia-south" in text


def test_dashboard_first_frame_and_old_daemons() -> None:
    text = render(dashboard(STATUS, SERVERS, None, None))
    assert "- req/s, - 5xx/s" in text
    assert "42 pinned (per region and server: unavailable from this lbd)" in text
    eu_row = next(line for line in text.splitlines() if line.startswith("eu-web-1 "))
    assert eu_row.split()[-3:] == ["-", "0", "-"], "REQ/S, ERRORS, SESS"
    assert "no servers registered" in render(dashboard({}, [], None, None))


def test_dashboard_narrow_terminal_folds_ids_rather_than_cutting_them() -> None:
    text = render(dashboard(STATUS, SERVERS, SUMMARY, None), 30)
    assert all(len(line.rstrip()) <= 30 for line in text.splitlines()), text
    squeezed = "".join(text.split())
    for server in SERVERS:
        assert server["id"] in squeezed


# --- a real terminal -----------------------------------------------------------------------------


@pytest.fixture
def tmux() -> Iterator[list[str]]:
    """`tmux -L <private server>`: the test's sessions never touch the user's tmux."""
    if shutil.which("tmux") is None:
        if os.environ.get("CI"):
            pytest.fail("tmux is not installed; `make test` installs it (make system-deps)")
        pytest.skip("tmux is not installed (make system-deps installs it)")
    directory = short_tempdir()
    command = ["tmux", "-S", str(directory / "tmux"), "-f", "/dev/null"]  # its socket goes with the directory
    try:
        yield command
    finally:
        subprocess.run([*command, "kill-server"], capture_output=True, check=False, timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def fast_health_lbd(tmp_path: Path) -> Iterator[tuple[Lbd, list[Backend]]]:
    config = tmp_path / "lbd.toml"
    config.write_text(FAST_HEALTH)
    with backends("alpha", "beta", "gamma") as started:
        entries = [backend.entry() for backend in started]
        with running_lbd(["--config", str(config)], entries=entries) as daemon:
            yield daemon, started


def test_watch_in_a_real_terminal(tmux: list[str], fast_health_lbd: tuple[Lbd, list[Backend]], tmp_path: Path) -> None:
    lbd, started = fast_health_lbd
    session = f"watch-{uuid.uuid4().hex[:8]}"
    watch = [sys.executable, "-m", "lbctl.main", "--socket", str(lbd.socket), "status", "--watch", "--interval", "0.3"]
    # The shell outlives lbctl to record its exit status (in a file: the pane's last output can be
    # lost when the pane ends) and keep the pane open; it catches Ctrl-C, which lbctl, its
    # foreground job, gets too, so it goes on instead of dying with it.
    status_file = tmp_path / "exit-status"
    command = f"trap : INT; {shlex.join(watch)}; echo $? > {shlex.quote(str(status_file))}; sleep 30"
    env = {key: value for key, value in os.environ.items() if key not in ("NO_COLOR", "TMUX", "LBD_SOCKET")}
    env["SHELL"] = "/bin/sh"  # tmux runs the command with the default shell, from $SHELL

    def tmux_run(*args: str) -> str:
        done = subprocess.run([*tmux, *args], capture_output=True, text=True, timeout=10, check=True, env=env)
        return done.stdout

    def screen() -> str:
        return tmux_run("capture-pane", "-p", "-t", session)

    def row(server_id: str) -> str:
        return next((line for line in screen().splitlines() if line.startswith(f"{server_id} ")), "")

    tmux_run("new-session", "-d", "-s", session, "-x", "100", "-y", "40", "-c", str(REPO), command)

    wait_until(lambda: all("healthy" in row(backend.id) for backend in started), timeout=15)
    text = screen()
    assert "Ctrl-C to quit" in text
    assert all(len(line.rstrip()) <= 100 for line in text.splitlines())

    started[1].stop()
    wait_until(lambda: any(word in row("beta").split() for word in OUT_OF_SERVICE), timeout=15)
    assert "healthy" in row("alpha").split()

    tmux_run("send-keys", "-t", session, "C-c")
    wait_until(lambda: status_file.exists() and status_file.read_text().strip(), timeout=10)
    assert status_file.read_text().strip() == "0"
    text = screen()
    assert "Traceback" not in text
    assert "Ctrl-C to quit" not in text, "the full-screen view is gone, the terminal restored"


def test_a_daemon_without_the_sessions_summary_is_shown_not_failed() -> None:
    class OlderLbd(Client):
        def get(self, path: str) -> Any:
            if path == "/v1/sessions/summary":
                raise ApiError(404, "not_found", "no such endpoint: GET /v1/sessions/summary")
            return {"/v1/status": STATUS, "/v1/servers": {"servers": SERVERS}}[path]

    taken = lbctl_main._sample(OlderLbd(Path("/nonexistent/lbd.sock")))
    assert (taken.status, taken.servers, taken.sessions) == (STATUS, SERVERS, None)
    assert frame(None, taken).to_json()["sessions"] is None
