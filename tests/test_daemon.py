"""The daemon's lifecycle and listeners: socket permissions, graceful stop, config errors."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.harness.backends import Backend
from tests.harness.daemon import Lbd, running_lbd, short_tempdir, wait_until


def lbd_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lbd", *args], capture_output=True, text=True, timeout=20, check=False)


def test_admin_socket_is_owner_only_and_removed_on_sigterm(static_lbd: Lbd) -> None:
    mode = stat.S_IMODE(os.stat(static_lbd.socket).st_mode)
    assert mode == 0o600
    assert static_lbd.stop() == 0
    assert not static_lbd.socket.exists()


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
