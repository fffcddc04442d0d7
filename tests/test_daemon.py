"""The daemon's lifecycle and listeners: socket permissions (another user is refused, a directory
others can write is refused), graceful stop, config errors."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.harness.backends import Backend
from tests.harness.cli import assert_one_line_error
from tests.harness.daemon import Lbd, running_lbd, short_tempdir, wait_until

NOBODY = 65534  # the unprivileged user and group every Debian-like system has


def lbd_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lbd", *args], capture_output=True, text=True, timeout=20, check=False)


def test_admin_socket_is_owner_only_and_removed_on_sigterm(static_lbd: Lbd) -> None:
    mode = stat.S_IMODE(os.stat(static_lbd.socket).st_mode)
    assert mode == 0o600
    assert static_lbd.stop() == 0
    assert not static_lbd.socket.exists()


def as_nobody(*command: str) -> subprocess.CompletedProcess[str]:
    """Run as uid/gid 65534 with no supplementary groups. The one capability kept, CAP_DAC_READ_SEARCH,
    lets it read files wherever the interpreter and this checkout live (/root, a 0700 temporary clone
    in CI); it grants no write permission, which is what connecting to a Unix socket checks."""
    setpriv = [
        "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
        "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", "--",
    ]  # fmt: skip
    env = {**os.environ, "NO_COLOR": "1", "HOME": "/nonexistent"}
    return subprocess.run(
        [*setpriv, *command], cwd="/", capture_output=True, text=True, timeout=20, check=False, env=env
    )


def test_lbctl_as_another_user_is_refused_by_the_owner_only_socket(static_lbd: Lbd) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux): it runs lbctl as the user nobody against a root-owned lbd")
    probe = as_nobody(sys.executable, "-c", "import lbctl.main")
    if probe.returncode != 0:
        pytest.skip(f"user nobody cannot run this Python and import lbctl: {probe.stderr.strip()[-200:]}")
    os.chmod(static_lbd.socket.parent, 0o755)  # others may reach the socket: only its own 0600 refuses them
    assert stat.S_IMODE(os.stat(static_lbd.socket).st_mode) == 0o600
    refused = as_nobody(sys.executable, "-m", "lbctl.main", "--socket", str(static_lbd.socket), "status")
    assert_one_line_error(refused, 3, f"cannot reach lbd at {static_lbd.socket}", "permission denied", "owner-only")
    assert static_lbd.lbctl("status", "--json").returncode == 0  # its owner is served


@pytest.mark.parametrize("mode", [0o777, 0o770])
def test_a_socket_directory_others_can_write_is_refused(mode: int) -> None:
    directory = short_tempdir()
    os.chmod(directory, mode)  # others could replace the socket and answer lbctl in lbd's place
    done = lbd_command(
        "start", "--listen", "127.0.0.1:0", "--admin-socket", str(directory / "lbd.sock"),
        "--state-dir", str(directory / "state"),
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        f"lbd: error: admin socket directory {directory} is writable by others (mode {mode:o}), who could replace "
        "the socket; remove their write permission (chmod go-w) or use a directory that is not shared "
        "(e.g. $XDG_RUNTIME_DIR)"
    ]
    assert not (directory / "lbd.sock").exists()


def test_a_sticky_shared_directory_like_tmp_is_accepted() -> None:
    workdir = short_tempdir()
    os.chmod(workdir, 0o1777)  # only a file's owner may remove or rename it there
    daemon = Lbd(workdir, [])
    try:
        daemon.start()
        assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600
    finally:
        daemon.stop()


def test_a_socket_directory_of_another_user_is_refused() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the directory to another user")
    directory = short_tempdir()
    os.chown(directory, NOBODY, NOBODY)
    done = lbd_command("start", "--listen", "127.0.0.1:0", "--admin-socket", str(directory / "lbd.sock"))
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"lbd: error: admin socket directory {directory} belongs to uid {NOBODY}, who could replace the socket; "
        "use a directory owned by lbd's user or root (e.g. $XDG_RUNTIME_DIR)"
    ]


def test_admin_api_is_not_on_the_proxy_port(static_lbd: Lbd) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", static_lbd.port, timeout=5)
    connection.request("GET", "/v1/status", headers={"client-id": "alice"})
    response = connection.getresponse()
    body = json.loads(response.read())
    assert body["path"] == "/v1/status"  # a backend answered: it was proxied, not the admin API
    assert "mode" not in body


def test_sigterm_lets_a_request_in_flight_finish(static_lbd: Lbd, three_backends: list[Backend]) -> None:
    result: dict[str, object] = {}

    def slow_request() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", static_lbd.port, timeout=10)
        connection.request("GET", "/slow/800", headers={"client-id": "alice"})
        response = connection.getresponse()
        result["status"] = response.status
        result["body"] = response.read()

    worker = threading.Thread(target=slow_request)
    worker.start()
    wait_until(lambda: sum(b.hits["/slow/800"] for b in three_backends) == 1)
    static_lbd.signal(signal.SIGTERM)
    time.sleep(0.2)
    with socket.socket() as probe:  # no longer accepting
        assert probe.connect_ex(("127.0.0.1", static_lbd.port)) != 0
    worker.join(10)
    assert result["status"] == 200 and b"slow from" in result["body"]  # type: ignore[operator]
    assert static_lbd.process is not None and static_lbd.process.wait(10) == 0


def test_a_second_daemon_on_a_live_socket_is_refused(static_lbd: Lbd) -> None:
    second = lbd_command("start", "--listen", "127.0.0.1:0", "--admin-socket", str(static_lbd.socket))
    assert second.returncode != 0
    assert "another lbd is already serving" in second.stderr and "Traceback" not in second.stderr
    assert static_lbd.get("/v1/status")["mode"] == "static"  # the first one is untouched


def test_a_stale_socket_from_a_crash_is_replaced() -> None:
    workdir = short_tempdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(workdir / "lbd.sock"))
    stale.close()  # the file stays, nobody listens: what a kill -9 leaves behind
    daemon = Lbd(workdir, [])
    try:
        daemon.start()
        assert daemon.get("/v1/status")["servers"]["total"] == 0
    finally:
        daemon.stop()


def test_config_errors_name_the_key_and_exit_2(tmp_path: Path) -> None:
    cases = {
        'mode = "fast"\n': "mode: must be one of static, dynamic",
        "timeout_base_ms = -5\n": "timeout_base_ms: must be a non-negative integer",
        'listen = "nowhere"\n': "listen: 'nowhere' is not HOST:PORT",
        "colour = 1\n": "unknown key 'colour'",
        "[regions.proximity]\nus-east = ['us-east', 'atlantis']\n": "region 'atlantis' has no latency",
        "mode = \n": "not valid TOML",
    }
    for text, expected in cases.items():
        path = tmp_path / "lbd.toml"
        path.write_text(text)
        result = lbd_command("start", "--config", str(path), "--admin-socket", str(tmp_path / "x.sock"))
        assert result.returncode == 2, (text, result.stderr)
        assert expected in result.stderr, (text, result.stderr)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_flags_override_the_config_file(tmp_path: Path, three_backends: list[Backend]) -> None:
    config = tmp_path / "lbd.toml"
    config.write_text('mode = "static"\ntimeout_base_ms = 5000\n')
    with running_lbd(["--config", str(config), "--mode", "dynamic"]) as daemon:
        assert daemon.get("/v1/status")["mode"] == "dynamic"
