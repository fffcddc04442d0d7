"""Live config reload (`lbctl reload`, `POST /v1/reload`, SIGHUP) against a real lbd: settings take
effect, connections and requests in flight survive, an invalid file changes nothing, the servers file
is applied as an edit; and the pure plan of that edit."""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lbd.models import ServerSpec
from lbd.reload import SeedPlan, plan_seed
from tests.harness.backends import backends
from tests.harness.cli import assert_one_line_error
from tests.harness.clients import RawConnection, build_request
from tests.harness.daemon import Lbd, short_tempdir, wait_until, write_servers

LATENCIES = {"us-east": 10, "eu-west": 50, "asia-south": 100, "oceania": 150, "ca-central": 30}
TOKEN = "reload-token-0123456789"


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = short_tempdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def write_config(workdir: Path, text: str = "", **latency: int) -> Path:
    """lbd.toml with `text` and, when given, region latencies (the other regions keep their defaults)."""
    table = "".join(f'"{region}" = {ms}\n' for region, ms in {**LATENCIES, **latency}.items())
    path = workdir / "lbd.toml"
    path.write_text(f'servers = "servers.json"\n{text}\n[regions.latency_ms]\n{table}')
    return path


def start(workdir: Path, entries: list[dict[str, Any]], *args: str, env: dict[str, str] | None = None) -> Lbd:
    write_servers(workdir, entries)
    return Lbd(workdir, ["--config", str(workdir / "lbd.toml"), *args], env=env).start()


def reload_json(daemon: Lbd) -> dict[str, Any]:
    result = daemon.lbctl("reload", "--json")
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def changes(answer: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {change["key"]: (change["old"], change["new"]) for change in answer["changed"]}


def slow_get(daemon: Lbd, ms: int) -> int:
    return daemon.proxy_get(f"/slow/{ms}")[0]


def check_config_error(config: Path) -> str:
    """What `lbd check-config` prints for this file, without its `lbd: error: ` prefix."""
    command = [sys.executable, "-m", "lbd", "check-config", str(config)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=20, check=False)
    assert done.returncode == 2, done.stdout
    return done.stderr.strip().removeprefix("lbd: error: ")


def metric(daemon: Lbd, line_start: str) -> float:
    status, text = daemon.request("GET", "/metrics")
    assert status == 200
    return float(next(line for line in text.splitlines() if line.startswith(line_start)).rsplit(" ", 1)[1])


def test_reload_applies_region_latency_and_timeout_base(workdir: Path) -> None:
    with backends("s1") as (backend,):
        config = write_config(workdir, "timeout_base_ms = 100", **{"us-east": 1000})
        daemon = start(workdir, [backend.entry()])
        try:
            assert slow_get(daemon, 300) == 200  # 100 + 1000 ms
            write_config(workdir, "timeout_base_ms = 100", **{"us-east": 10})
            result = daemon.lbctl("reload")
            assert result.returncode == 0, result.stderr
            assert result.stdout.splitlines() == [f"reloaded {config}", "  regions.latency_ms.us-east: 1000 -> 10"]
            assert slow_get(daemon, 300) == 504  # 100 + 10 ms
            write_config(workdir, "timeout_base_ms = 2000", **{"us-east": 10})
            answer = reload_json(daemon)
            assert changes(answer) == {"timeout_base_ms": (100, 2000)}
            assert answer["servers"] == {"added": [], "replaced": [], "removed": []} and answer["warnings"] == []
            assert slow_get(daemon, 300) == 200
            assert daemon.get("/v1/config")["timeout_base_ms"] == 2000
            reloads = daemon.get("/v1/status")["reload"]
            assert (reloads["config_file"], reloads["succeeded"], reloads["failed"]) == (str(config), 2, 0)
            assert reloads["last"]["ok"] is True
            assert metric(daemon, 'lbd_config_reloads_total{result="ok"}') == 2
            assert daemon.lbctl("reload").stdout.strip() == f"reloaded {config}: nothing changed"
        finally:
            daemon.stop()


def test_reload_drops_no_connection_and_requests_in_flight_keep_their_timeout(workdir: Path) -> None:
    with backends("s1") as (backend,):
        write_config(workdir, "timeout_base_ms = 2000")
        daemon = start(workdir, [backend.entry()])
        slow: dict[str, Any] = {}

        def in_flight() -> None:
            connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
            connection.request("GET", "/slow/800", headers={"client-id": "bob"})
            response = connection.getresponse()
            slow["status"], slow["body"] = response.status, response.read()

        request = build_request("GET", "/echo", {"client-id": "alice", "Host": "lb"})
        try:
            with RawConnection(daemon.port) as keep_alive:
                keep_alive.send(request)
                assert keep_alive.read_response().status == 200
                worker = threading.Thread(target=in_flight)
                worker.start()
                wait_until(lambda: backend.hits["/slow/800"] == 1)
                write_config(workdir, "timeout_base_ms = 100\n[health]\ninterval_ms = 500\ntimeout_ms = 200")
                changed = changes(reload_json(daemon))
                assert changed.keys() == {"timeout_base_ms", "health.interval_ms", "health.timeout_ms"}
                worker.join(10)
                assert slow == {"status": 200, "body": b"slow from s1\n"}  # started with 2010 ms: kept it
                assert keep_alive.still_open()
                keep_alive.send(request)  # the same keep-alive connection, after the reload
                assert keep_alive.read_response().json()["server"] == "s1"
            assert slow_get(daemon, 800) == 504  # a new request: 110 ms
        finally:
            daemon.stop()


def test_an_invalid_file_is_refused_with_check_configs_message_and_changes_nothing(workdir: Path) -> None:
    with backends("s1") as (backend,):
        write_config(workdir, "timeout_base_ms = 2000")
        daemon = start(workdir, [backend.entry()])
        try:
            before = daemon.get("/v1/config")
            bad_servers = [{**backend.entry(), "region": "atlantis"}]
            cases: list[tuple[str, list[dict[str, Any]] | None, str]] = [
                ("mode = \n", None, "not valid TOML"),
                ("colour = 1", None, "unknown key 'colour'"),
                ("timeout_base_ms = -5", None, "timeout_base_ms: must be a non-negative integer; got -5"),
                ("[regions.proximity]\nus-east = ['us-east', 'atlantis']", None, "region 'atlantis' has no latency"),
                ("timeout_base_ms = 100", bad_servers, "field 'region' is 'atlantis'"),
            ]
            for text, entries, fragment in cases:
                config = write_config(workdir, text)
                write_servers(workdir, entries or [backend.entry()])
                expected = check_config_error(config)
                assert fragment in expected, expected
                status, body = daemon.request("POST", "/v1/reload")
                assert status == 422 and body["error"] == {"code": "invalid_config", "message": expected}
                assert_one_line_error(daemon.lbctl("reload"), 1, expected)
                assert daemon.get("/v1/config") == before
                assert daemon.proxy_get("/echo")[0] == 200
            write_servers(workdir, [backend.entry()])
            write_config(workdir, 'timeout_base_ms = 100\nmetrics_listen = "127.0.0.1:0"')
            refused = assert_one_line_error(daemon.lbctl("reload"), 1, "metrics_listen changed from unset to")
            assert "restart" in refused and "nothing was reloaded" in refused
            assert daemon.get("/v1/config")["timeout_base_ms"] == 2000  # nor the key that could have applied
            reloads = daemon.get("/v1/status")["reload"]
            assert (reloads["succeeded"], reloads["failed"], reloads["last"]["ok"]) == (0, 11, False)
            assert "metrics_listen" in reloads["last"]["error"]
            assert metric(daemon, 'lbd_config_reloads_total{result="failed"}') == 11
            assert metric(daemon, "lbd_config_last_reload_successful") == 0
            assert "Traceback" not in daemon.log()
        finally:
            daemon.stop()


def test_sighup_reloads_and_a_bad_file_is_logged_and_ignored(workdir: Path) -> None:
    with backends("s1") as (backend,):
        write_config(workdir, "timeout_base_ms = 2000")
        daemon = start(workdir, [backend.entry()])
        try:
            write_config(workdir, "timeout_base_ms = 100")
            daemon.signal(signal.SIGHUP)
            wait_until(lambda: daemon.get("/v1/config")["timeout_base_ms"] == 100)
            assert "INFO reload " in daemon.log() and "by SIGHUP: timeout_base_ms 2000 -> 100" in daemon.log()
            config = write_config(workdir, "timeout_base_ms = 'soon'")
            daemon.signal(signal.SIGHUP)
            expected = check_config_error(config)
            wait_until(lambda: f"config not reloaded, the running config stays: {expected}" in daemon.log())
            assert daemon.get("/v1/config")["timeout_base_ms"] == 100
            last = daemon.get("/v1/status")["reload"]["last"]
            assert (last["ok"], last["error"]) == (False, expected)
            assert slow_get(daemon, 300) == 504  # still running, with the last good config
            assert daemon.process is not None and daemon.process.poll() is None
        finally:
            assert daemon.stop() == 0


def test_reload_without_a_config_file_is_a_conflict(workdir: Path) -> None:
    daemon = Lbd(workdir, []).start()
    try:
        status, body = daemon.request("POST", "/v1/reload")
        assert status == 409 and body["error"]["code"] == "no_config_file"
        assert_one_line_error(daemon.lbctl("reload"), 5, "started without --config", "no file to re-read")
        assert daemon.get("/v1/status")["reload"]["config_file"] is None
    finally:
        daemon.stop()


def test_the_servers_file_is_applied_as_an_edit(workdir: Path) -> None:
    with backends("a", "b", "c", "d", "e") as (a, b, c, d, e):
        write_config(workdir)
        daemon = start(workdir, [a.entry(capacity=10), b.entry(), c.entry()])
        try:
            assert daemon.request("POST", "/v1/servers", d.entry())[0] == 201  # registered at run time
            assert daemon.request("DELETE", "/v1/servers/b?now=1")[0] == 200  # a seed server removed at run time
            assert daemon.request("POST", "/v1/servers/a/drain")[0] == 200
            # the edit: a's capacity changes, b is untouched, c leaves the file, e joins it
            write_servers(workdir, [a.entry(capacity=3), b.entry(), e.entry()])
            answer = reload_json(daemon)
            assert answer["servers"] == {"added": ["e"], "replaced": ["a"], "removed": ["c"]}
            servers = daemon.servers()
            assert sorted(servers) == ["a", "d", "e"]  # b stays deregistered, d stays registered
            assert servers["a"]["capacity"] == 3 and servers["a"]["draining"]  # the drain flag outlives the edit
            saved = json.loads((daemon.state_dir / "state.json").read_text())
            assert [entry["id"] for entry in saved["servers"]] == ["d"] and saved["draining"] == ["a"]
            assert daemon.proxy_get("/echo", "someone")[1] in {"d", "e"}  # a drains
            assert daemon.stop() == 0
            daemon.start()  # a restart reads the file whole: b is back
            assert sorted(daemon.servers()) == ["a", "b", "d", "e"]
        finally:
            daemon.stop()


def test_new_health_settings_restart_the_checks(workdir: Path) -> None:
    with backends("s1") as (backend,):
        write_config(workdir, "[health]\ninterval_ms = 600000")
        daemon = start(workdir, [backend.entry()])
        try:
            write_config(workdir, '[health]\ninterval_ms = 100\npath = "/ready"\nfall = 1')
            assert changes(reload_json(daemon)) == {
                "health.interval_ms": (600000, 100), "health.path": ("/health", "/ready"), "health.fall": (3, 1),
            }  # fmt: skip
            wait_until(lambda: backend.hits["/ready"] >= 3, timeout=5)
            backend.stop()  # one failed check is enough now (fall = 1)
            wait_until(lambda: daemon.servers()["s1"]["health"] == "cooldown", timeout=5)
        finally:
            daemon.stop()


def test_the_files_mode_applies_unless_switched_at_run_time(workdir: Path) -> None:
    with backends("s1") as (backend,):
        write_config(workdir, 'mode = "static"')
        daemon = start(workdir, [backend.entry()])
        try:
            write_config(workdir, 'mode = "dynamic"\ndefault_client_region = "us-east"')
            answer = reload_json(daemon)
            assert changes(answer) == {"mode": ("static", "dynamic"), "default_client_region": (None, "us-east")}
            assert daemon.get("/v1/mode")["mode"] == "dynamic" and answer["warnings"] == []
            assert daemon.proxy_get("/echo", "c1")[0] == 200  # no client-region header: the new default
            assert json.loads((daemon.state_dir / "state.json").read_text())["mode"] is None  # config, not state
            assert daemon.lbctl("mode", "static").returncode == 0  # the operator's run-time choice
            write_config(workdir, 'mode = "static"\ndefault_client_region = "us-east"')
            assert reload_json(daemon)["warnings"] == []
            write_config(workdir, 'mode = "dynamic"\ndefault_client_region = "us-east"')
            result = daemon.lbctl("reload")
            assert result.returncode == 0, result.stderr
            assert "switched to static at run time and that choice stands" in result.stdout
            assert daemon.get("/v1/mode")["mode"] == "static"
            assert json.loads((daemon.state_dir / "state.json").read_text())["mode"] == "static"
        finally:
            daemon.stop()


def test_smaller_session_limits_apply_at_once(workdir: Path) -> None:
    with backends("s1") as (backend,):
        write_config(workdir, 'mode = "dynamic"\ndefault_client_region = "us-east"')
        daemon = start(workdir, [backend.entry()])
        try:
            for client in ("c1", "c2", "c3", "c4", "c5"):
                assert daemon.proxy_get("/echo", client)[0] == 200
            write_config(workdir, 'mode = "dynamic"\ndefault_client_region = "us-east"\nmax_sessions = 2')
            reload_json(daemon)
            summary = daemon.get("/v1/sessions/summary")
            assert (summary["total"], summary["evicted"]) == (2, 3)
            assert [row["client_id"] for row in daemon.get("/v1/sessions")["sessions"]] == ["c5", "c4"]
        finally:
            daemon.stop()


def test_reload_rotates_the_admin_token(workdir: Path) -> None:
    def tcp_status(address: str, token: str) -> int:
        host, port = address.rsplit(":", 1)
        connection = http.client.HTTPConnection(host, int(port), timeout=5)
        connection.request("GET", "/v1/status", headers={"Authorization": f"Bearer {token}"})
        return connection.getresponse().status

    write_config(workdir, f'admin_token = "{TOKEN}"')
    daemon = start(workdir, [], "--admin-listen", "127.0.0.1:0")
    try:
        address = daemon.get("/v1/status")["listeners"]["admin_tcp"]
        assert tcp_status(address, TOKEN) == 200
        write_config(workdir, f'admin_token = "{TOKEN}-next"')
        assert changes(reload_json(daemon)) == {"admin_token": ("(hidden)", "(hidden)")}  # never the values
        assert tcp_status(address, TOKEN) == 401
        assert tcp_status(address, f"{TOKEN}-next") == 200
    finally:
        daemon.stop()


# --- the servers file as an edit (pure) -------------------------------------------------------


def spec(server_id: str, capacity: int = 1) -> ServerSpec:
    return ServerSpec(server_id, "http", "127.0.0.1", 9000, "us-east", capacity)


def test_plan_seed_applies_only_what_the_file_changed() -> None:
    old = {s.id: s for s in (spec("same"), spec("resized"), spec("dropped"), spec("gone"), spec("taken"))}
    new = {s.id: s for s in (spec("same"), spec("resized", 5), spec("fresh"), spec("known"))}
    live = {
        "same": spec("same"),
        "resized": spec("resized"),
        "dropped": spec("dropped"),  # leaves the file: removed
        "taken": spec("taken", 9),  # leaves the file, but registered again at run time with other settings: kept
        "known": spec("known"),  # registered at run time exactly as the file now says: nothing to do
        "own": spec("own"),  # registered at run time, not in either file: untouched
    }  # "gone" was deregistered at run time and leaves the file: nothing to do
    assert plan_seed(old, new, live) == SeedPlan(added=(spec("fresh"),), replaced=(spec("resized", 5),),
                                                  removed=("dropped",))  # fmt: skip
    assert plan_seed(old, old, {}) == SeedPlan()  # an untouched file never brings back what run time removed
