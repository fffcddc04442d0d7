"""State that survives a restart: real lbd processes restarted on the same state directory, a
kill -9 in the middle of a burst of registrations (and of a burst mixing every kind of change, with
state.json read all along), corrupt state files; and the pure parts (session snapshot and restore,
the store's files, the state_dir setting)."""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbd.balancer import Balancer
from lbd.config import Config, Regions, load_config
from lbd.models import ServerSpec
from lbd.registry import Registry
from lbd.sessions import SessionRecord, SessionTable
from lbd.state import PersistedState, StateError, StateKeeper, StateStore
from tests.harness.backends import backends
from tests.harness.daemon import Lbd, short_tempdir, wait_until, write_servers

SERVER_REGIONS = Regions().server_regions


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = short_tempdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def proxied(daemon: Lbd, client: str, region: str = "us-east") -> str:
    """One request through the proxy; returns the id of the backend that answered."""
    status, backend, _ = daemon.proxy_get("/echo", client, region)
    assert status == 200, status
    return backend


def register(daemon: Lbd, entry: dict[str, Any]) -> int:
    status, body = daemon.request("POST", "/v1/servers", entry)
    assert status in (200, 201), body
    return status


def session_rows(daemon: Lbd) -> list[tuple[str, str]]:
    """(client, server), most recently active first."""
    return [(row["client_id"], row["server"]) for row in daemon.get("/v1/sessions")["sessions"]]


# --- end to end -------------------------------------------------------------------------------


def test_restart_restores_registrations_drain_flags_mode_and_sessions(workdir: Path) -> None:
    with backends("s1", "s2", "s3") as started:
        daemon = Lbd(workdir, ["--mode", "dynamic"])
        try:
            daemon.start()
            for backend in started:
                assert register(daemon, backend.entry(capacity=10)) == 201
            assert daemon.request("POST", "/v1/servers/s3/drain")[0] == 200
            pinned = {f"c{i}": proxied(daemon, f"c{i}") for i in range(6)}
            assert set(pinned.values()) <= {"s1", "s2"}  # s3 drains: no new clients
            assert proxied(daemon, "c0") == pinned["c0"]  # c0 becomes the most recently active
            sessions_before = session_rows(daemon)
            assert sessions_before[0] == ("c0", pinned["c0"]) and len(sessions_before) == 6
            assert daemon.request("PUT", "/v1/mode", {"mode": "static"})[0] == 200
            servers_before = daemon.servers()
            assert daemon.stop() == 0

            saved = json.loads((daemon.state_dir / "state.json").read_text())
            assert saved["version"] == 1 and saved["mode"] == "static" and saved["draining"] == ["s3"]
            assert sorted(entry["id"] for entry in saved["servers"]) == ["s1", "s2", "s3"]
            assert (daemon.state_dir / "sessions.json").exists()

            daemon.start()  # same workdir, same state dir, the config still says --mode dynamic
            status = daemon.get("/v1/status")
            assert status["mode"] == "static"  # the operator's run-time choice wins over the config
            assert status["state_dir"] == str(daemon.state_dir)
            servers = daemon.servers()
            assert sorted(servers) == ["s1", "s2", "s3"]
            for server_id, before in servers_before.items():
                for key in ("url", "region", "capacity", "draining"):
                    assert servers[server_id][key] == before[key], (server_id, key)
            assert servers["s3"]["draining"] and not servers["s1"]["draining"]
            assert session_rows(daemon) == sessions_before  # same pins, same LRU order
            assert not (daemon.state_dir / "sessions.json").exists()  # consumed once serving

            assert daemon.request("PUT", "/v1/mode", {"mode": "dynamic"})[0] == 200
            for client, server in pinned.items():
                assert proxied(daemon, client) == server  # sticky across the restart
        finally:
            daemon.stop()


def test_the_servers_file_is_config_and_wins_over_state(workdir: Path) -> None:
    with backends("a", "b") as (a, b):
        servers_file = write_servers(workdir, [a.entry()])
        first = Lbd(workdir, [])
        try:  # no seed yet: "a" registered at run time with b's address
            first.start()
            assert register(first, {**b.entry(), "id": "a"}) == 201
            assert register(first, b.entry()) == 201
        finally:
            assert first.stop() == 0
        daemon = Lbd(workdir, ["--servers", str(servers_file), "--mode", "dynamic"])
        try:
            daemon.start()
            servers = daemon.servers()
            assert servers["a"]["url"] == a.url and servers["b"]["url"] == b.url
            assert "the servers file wins" in daemon.log()
            assert daemon.get("/v1/status")["mode"] == "dynamic"  # never switched at run time: config
            assert daemon.request("POST", "/v1/servers/a/drain")[0] == 200  # a seed server's flag is state
            saved = json.loads((daemon.state_dir / "state.json").read_text())
            assert [entry["id"] for entry in saved["servers"]] == ["b"]  # the seed's "a" is config
            assert saved["mode"] is None and saved["draining"] == ["a"]
            assert daemon.stop() == 0
            daemon.start()
            assert daemon.servers()["a"]["draining"]
        finally:
            daemon.stop()


def test_kill_9_during_a_burst_of_registrations_loses_no_acknowledged_one(workdir: Path) -> None:
    rng = random.Random()
    kill_points: list[int] = []
    acknowledged: set[str] = set()
    attempted: set[str] = set()
    with backends("b") as (backend,):
        daemon = Lbd(workdir, [])
        try:
            for burst in range(3):
                daemon.start()
                assert acknowledged <= set(daemon.servers()), kill_points
                acked_now: list[str] = []

                def register_one_by_one(burst: int = burst, acked_now: list[str] = acked_now) -> None:
                    for i in range(200):
                        entry = {**backend.entry(capacity=5), "id": f"r{burst}-s{i}"}
                        attempted.add(entry["id"])
                        try:
                            status, _ = daemon.request("POST", "/v1/servers", entry)
                        except (OSError, http.client.HTTPException):
                            return  # killed
                        if status == 201:
                            acked_now.append(entry["id"])

                kill_after = rng.randint(10, 120)
                kill_points.append(kill_after)
                worker = threading.Thread(target=register_one_by_one)
                worker.start()
                wait_until(lambda n=kill_after, acked=acked_now: len(acked) >= n, timeout=20)
                time.sleep(rng.uniform(0, 0.004))  # anywhere inside the next registration
                daemon.kill()
                worker.join(10)
                acknowledged.update(acked_now)
                saved = json.loads((daemon.state_dir / "state.json").read_text())  # parses: atomic rename
                on_disk = {entry["id"] for entry in saved["servers"]}
                assert set(acked_now) <= on_disk, (kill_points, sorted(set(acked_now) - on_disk))
            daemon.start()
            present = set(daemon.servers())
            assert acknowledged <= present, (kill_points, sorted(acknowledged - present))
            assert present <= attempted  # and nothing appeared that was never asked for
            assert len(present - acknowledged) <= 3  # at most the one in flight at each kill
        finally:
            daemon.stop()


@dataclass(frozen=True)
class Operator:
    """What the acknowledged changes say lbd's state is."""

    servers: frozenset[str] = frozenset()
    draining: frozenset[str] = frozenset()
    mode: str = "static"

    def after(self, change: tuple[str, str]) -> Operator:
        kind, arg = change
        if kind == "register":
            return replace(self, servers=self.servers | {arg})
        if kind == "deregister":
            return replace(self, servers=self.servers - {arg}, draining=self.draining - {arg})
        if kind == "drain":
            return replace(self, draining=self.draining | {arg})
        if kind == "undrain":
            return replace(self, draining=self.draining - {arg})
        return replace(self, mode=arg)


def next_change(rng: random.Random, state: Operator, fresh_id: str) -> tuple[str, str]:
    servers = sorted(state.servers)
    kind = rng.choice(["register", "register", "deregister", "drain", "undrain", "mode"]) if servers else "register"
    if kind == "register":
        return kind, fresh_id
    if kind == "mode":
        return kind, rng.choice(["static", "dynamic"])
    return kind, rng.choice(servers)


def send_change(daemon: Lbd, change: tuple[str, str], backend_entry: dict[str, Any]) -> int:
    kind, arg = change
    if kind == "register":
        return daemon.request("POST", "/v1/servers", {**backend_entry, "id": arg})[0]
    if kind == "deregister":
        return daemon.request("DELETE", f"/v1/servers/{arg}?now=1")[0]
    if kind in ("drain", "undrain"):
        return daemon.request("POST", f"/v1/servers/{arg}/{kind}")[0]
    return daemon.request("PUT", "/v1/mode", {"mode": arg})[0]


@dataclass
class Burst:
    """One change after the other until lbd is killed, each acknowledged before the next."""

    daemon: Lbd
    rng: random.Random
    state: Operator
    prefix: str
    entry: dict[str, Any]
    done: list[tuple[str, str]] = field(default_factory=list)
    in_flight: tuple[str, str] | None = None  # sent when lbd was killed: it may or may not have been saved
    problem: str | None = None

    def run(self) -> None:
        for i in range(400):
            change = self.in_flight = next_change(self.rng, self.state, f"{self.prefix}-s{i}")
            try:
                status = send_change(self.daemon, change, self.entry)
            except (OSError, http.client.HTTPException):
                return
            if status not in (200, 201):
                self.problem = f"{change} refused with {status}"
                return
            self.state = self.state.after(change)
            self.done.append(change)
            self.in_flight = None
            saved = on_disk(self.daemon.state_dir)  # an acknowledged change is on disk already
            if saved != self.state:
                self.problem = f"{change} acknowledged but state.json says {saved}"
                return


def on_disk(state_dir: Path) -> Operator:
    saved = json.loads((state_dir / "state.json").read_text())
    return Operator(
        frozenset(entry["id"] for entry in saved["servers"]), frozenset(saved["draining"]), saved["mode"] or "static"
    )


def running(daemon: Lbd) -> Operator:
    servers = daemon.servers()
    draining = frozenset(server_id for server_id, server in servers.items() if server["draining"])
    return Operator(frozenset(servers), draining, daemon.get("/v1/mode")["mode"])


def test_kill_9_during_mixed_changes_keeps_every_acknowledged_one_and_state_json_always_parses(workdir: Path) -> None:
    rng = random.Random()
    kill_points: list[int] = []
    acknowledged = Operator()
    reads = {"parsed": 0, "broken": 0}
    stop_reading = threading.Event()

    def read_state_all_along(path: Path) -> None:
        """Another process's view of the file while lbd rewrites it: always a whole document."""
        while not stop_reading.is_set():
            try:
                json.loads(path.read_bytes())
                reads["parsed"] += 1
            except FileNotFoundError:
                pass
            except ValueError:
                reads["broken"] += 1

    with backends("b") as (backend,):
        daemon = Lbd(workdir, [])
        reader = threading.Thread(target=read_state_all_along, args=(daemon.state_dir / "state.json",))
        reader.start()
        try:
            for round_ in range(3):
                daemon.start()
                assert running(daemon) == acknowledged, kill_points
                burst = Burst(daemon, rng, acknowledged, f"r{round_}", backend.entry(capacity=5))
                worker = threading.Thread(target=burst.run)
                kill_after = rng.randint(20, 150)
                kill_points.append(kill_after)
                worker.start()
                wait_until(lambda n=kill_after, b=burst: len(b.done) >= n or b.problem, timeout=30)
                time.sleep(rng.uniform(0, 0.004))  # anywhere inside the next change
                daemon.kill()
                worker.join(10)
                assert burst.problem is None, burst.problem
                possible = [burst.state]
                if burst.in_flight is not None:
                    possible.append(burst.state.after(burst.in_flight))
                    if burst.in_flight[0] == "deregister":  # saved in two steps: drained, then removed
                        possible.append(burst.state.after(("drain", burst.in_flight[1])))
                saved = on_disk(daemon.state_dir)
                assert saved in possible, (kill_points, burst.done[-3:], burst.in_flight, saved)
                acknowledged = saved  # the change in flight at the kill counts if it was saved
            daemon.start()
            assert running(daemon) == acknowledged, kill_points
        finally:
            stop_reading.set()
            reader.join(10)
            daemon.stop()
    assert reads["broken"] == 0 and reads["parsed"] > 100, reads


def test_sessions_past_their_idle_expiry_are_dropped_on_restore(workdir: Path) -> None:
    config = workdir / "lbd.toml"
    config.write_text('mode = "dynamic"\nsession_idle_timeout = 1\n')
    with backends("s1") as (backend,):
        daemon = Lbd(workdir, ["--config", str(config)])
        try:
            daemon.start()
            register(daemon, backend.entry())
            assert proxied(daemon, "alice") == "s1"
            assert daemon.stop() == 0
            snapshot = json.loads((daemon.state_dir / "sessions.json").read_text())
            assert [row[:2] for row in snapshot["sessions"]] == [["alice", "s1"]]  # live when saved
            time.sleep(1.2)
            daemon.start()
            assert daemon.get("/v1/sessions")["sessions"] == []
            assert "restored 0 of 1 sticky sessions" in daemon.log()
            assert daemon.servers()["s1"]["url"] == backend.url  # the registration itself is kept
        finally:
            daemon.stop()


def start_lbd(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, "-m", "lbd", "start",
        "--listen", "127.0.0.1:0",
        "--admin-socket", str(workdir / "s.sock"),
        *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=15, check=False, cwd=workdir)


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lbd: error: "), output
    return lines[0]


GOOD_ENTRY = {"id": "a", "url": "http://127.0.0.1:9001", "region": "us-east", "capacity": 1}
CORRUPT = [
    ("garbage", "not json at all", ("not valid JSON", "line 1")),
    ("truncated", '{"version": 1, "servers": [', ("not valid JSON",)),
    ("not-an-object", "[]", ("expected a JSON object",)),
    ("version", json.dumps({"version": 99, "servers": []}), ("version 99", "not supported")),
    ("entry", json.dumps({"version": 1, "servers": [{**GOOD_ENTRY, "region": "mars"}]}), ("entry 0", "region")),
    ("draining", json.dumps({"version": 1, "servers": [], "draining": "a"}), ("draining",)),
    ("mode", json.dumps({"version": 1, "servers": [], "mode": "chaos"}), ("mode", "chaos")),
]


@pytest.mark.parametrize(("text", "expected"), [(text, expected) for _, text, expected in CORRUPT],
                         ids=[name for name, _, _ in CORRUPT])  # fmt: skip
def test_a_corrupt_state_file_refuses_to_start_with_one_line(
    workdir: Path, text: str, expected: tuple[str, ...]
) -> None:
    state_dir = workdir / "state"
    state_dir.mkdir()
    (state_dir / "state.json").write_text(text)
    done = start_lbd(workdir, "--state-dir", str(state_dir))
    assert done.returncode == 2
    line = one_error_line(done)
    assert str(state_dir / "state.json") in line
    for fragment in expected:
        assert fragment in line, (fragment, line)
    assert (state_dir / "state.json").read_text() == text  # the operator's state is left alone
    assert not (workdir / "s.sock").exists()


def test_a_second_daemon_on_the_same_state_dir_is_refused(workdir: Path) -> None:
    daemon = Lbd(workdir, [])
    try:
        daemon.start()
        assert daemon.process is not None
        done = start_lbd(workdir, "--state-dir", str(daemon.state_dir))
        assert done.returncode == 2
        line = one_error_line(done)
        assert str(daemon.state_dir) in line and f"pid {daemon.process.pid}" in line
        assert daemon.get("/v1/status")["state_dir"] == str(daemon.state_dir)  # the first is untouched
    finally:
        daemon.stop()


# --- sessions: snapshot and restore (pure) ----------------------------------------------------


def test_snapshot_is_lru_ordered_with_idle_ages() -> None:
    table = SessionTable(idle_timeout_s=100, max_sessions=10)
    table.pin("a", "s1", "us-east", 0.0)
    table.pin("b", "s2", "eu-west", 1.0)
    table.pin("c", "s1", None, 2.0)
    assert table.get("a", 3.0) is not None  # touched: now the most recent
    assert table.snapshot(4.0) == [
        SessionRecord("b", "s2", "eu-west", 3.0),
        SessionRecord("c", "s1", None, 2.0),
        SessionRecord("a", "s1", "us-east", 1.0),
    ]
    assert table.snapshot(102.5) == [SessionRecord("a", "s1", "us-east", 99.5)]  # b and c expired


def test_snapshot_is_in_last_use_order_even_where_the_table_is_not() -> None:
    """A touch within the table's reorder slack (1/64 of the idle timeout) leaves the session where
    it was; the snapshot is still least recently used first, so a restart (whose saved ages are
    rounded to the millisecond) keeps the order an operator saw."""
    table = SessionTable(idle_timeout_s=6400, max_sessions=10)  # 100 s of slack
    for n, client in enumerate(("a", "b", "c")):
        table.pin(client, "s1", None, float(n))
    assert table.get("a", 3.0) is not None  # the most recent, not moved
    assert [record.client_id for record in table.snapshot(4.0)] == ["b", "c", "a"]


def test_restore_keeps_order_and_adds_the_downtime_to_idle_ages() -> None:
    records = [SessionRecord("b", "s2", "eu-west", 3.0), SessionRecord("c", "s1", None, 2.0),
               SessionRecord("a", "s1", "us-east", 1.0)]  # fmt: skip
    table = SessionTable(idle_timeout_s=100, max_sessions=10)
    assert table.restore(records, now=500.0, downtime_s=10.0) == 3
    assert [(client, s.server_id, s.last_seen) for client, s in table.items(500.0)] == [
        ("b", "s2", 487.0), ("c", "s1", 488.0), ("a", "s1", 489.0),
    ]  # fmt: skip
    assert table.by_server == Counter({"s1": 2, "s2": 1})
    assert table.get("c", 500.0) is not None and table.snapshot(500.0)[-1].client_id == "c"


def test_restore_drops_expired_sessions_and_sessions_of_servers_that_left() -> None:
    records = [
        SessionRecord("old", "s1", None, 8.0),  # 8 + 2.5 of downtime >= 10: expired
        SessionRecord("edge", "s1", None, 7.5),  # exactly at the timeout: expired, as in `get`
        SessionRecord("gone", "s9", None, 1.0),  # its server no longer exists
        SessionRecord("fresh", "s1", None, 1.0),
    ]
    table = SessionTable(idle_timeout_s=10, max_sessions=10)
    restored = table.restore(records, now=50.0, downtime_s=2.5, servers={"s1", "s2"})
    assert restored == 1
    assert [client for client, _ in table.items(50.0)] == ["fresh"]
    assert table.get("fresh", 56.0) is not None and table.get("fresh", 66.1) is None  # 3.5 s idle at restore


def test_restore_respects_max_sessions_and_live_sessions() -> None:
    table = SessionTable(idle_timeout_s=100, max_sessions=3)
    table.pin("live", "s1", None, 99.0)
    records = [SessionRecord(f"c{i}", "s2", None, float(10 - i)) for i in range(4)]  # c3 most recent
    records.append(SessionRecord("live", "s2", None, 0.0))  # the live session wins over the snapshot
    table.restore(records, now=100.0)
    assert [(client, s.server_id) for client, s in table.items(100.0)] == [("c2", "s2"), ("c3", "s2"), ("live", "s1")]
    assert table.evicted == 2 and len(table) == 3
    assert table.by_server == Counter({"s1": 1, "s2": 2})


@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c", "d", "e"]), st.sampled_from(["s1", "s2"]), st.floats(0, 50)),
        max_size=30,
    )
)
def test_a_snapshot_restored_at_once_is_the_same_table(pins: list[tuple[str, str, float]]) -> None:
    table = SessionTable(idle_timeout_s=60, max_sessions=4)
    now = 0.0
    for client, server, step in pins:
        now += step
        table.pin(client, server, None, now)
    copy = SessionTable(idle_timeout_s=60, max_sessions=4)
    copy.restore(table.snapshot(now), now + 1000.0)
    expected = [(client, s.server_id, round(now - s.last_seen, 6)) for client, s in table.items(now)]
    actual = [(client, s.server_id, round(now + 1000.0 - s.last_seen, 6)) for client, s in copy.items(now + 1000.0)]
    assert actual == expected


# --- the store (files) and the keeper (what is saved) -----------------------------------------


def spec(server_id: str, port: int = 9001, region: str = "us-east", capacity: int = 5) -> ServerSpec:
    return ServerSpec(server_id, "http", "127.0.0.1", port, region, capacity)


def test_store_round_trip_is_atomic_and_owner_only(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "deep" / "state")
    store.open()
    try:
        assert store.load(SERVER_REGIONS) is None
        state = PersistedState((spec("a"), spec("b", 9002, "eu-west", 3)), frozenset({"b"}), "dynamic")
        store.save(state)
        assert store.load(SERVER_REGIONS) == state
        assert stat.S_IMODE(os.stat(store.directory).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(store.state_path).st_mode) == 0o600
        assert sorted(path.name for path in store.directory.iterdir()) == ["lock", "state.json"]  # no temp file
        records = [SessionRecord("c1", "a", "us-east", 1.5), SessionRecord("c2", "b", None, 0.25)]
        assert store.save_sessions(records, saved_at=1234.5) == 2
        assert store.load_sessions() == (records, 1234.5)
        store.discard_sessions()
        assert store.load_sessions() is None
    finally:
        store.close()


def test_store_errors_name_the_file(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.open()
    try:
        store.sessions_path.write_text('{"version": 1, "saved_at": 1, "sessions": [["c", "s", null, -1]]}')
        with pytest.raises(StateError, match=r"sessions\.json: session 0 is not"):
            store.load_sessions()
        second = StateStore(tmp_path)
        with pytest.raises(StateError, match=f"in use by another lbd \\(pid {os.getpid()}\\)"):
            second.open()
    finally:
        store.close()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StateError, match="cannot create the state directory"):
        StateStore(blocker / "state").open()


def test_keeper_saves_run_time_registrations_and_the_mode_only_once_switched(tmp_path: Path) -> None:
    seed = [spec("seed1"), spec("seed2", 9002)]
    registry = Registry(Regions().latency_ms, specs=seed)
    balancer = Balancer(registry, "static", Regions(), SessionTable(100, 10))
    keeper = StateKeeper(StateStore(tmp_path), registry, balancer, seed)
    keeper.restore(PersistedState((spec("seed1", 9999), spec("dyn")), frozenset({"seed2", "nope"}), None))
    seed1 = registry.get("seed1")
    assert seed1 is not None and seed1.spec == seed[0]  # the servers file wins
    assert keeper.current() == PersistedState((spec("dyn"),), frozenset({"seed2"}), None)
    balancer.set_mode("dynamic")
    assert keeper.current().mode == "dynamic"
    balancer.set_mode("static")
    assert keeper.current().mode == "static"  # the last run-time decision, even if it equals the config


def test_state_dir_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert Config().state_dir == tmp_path / "xdg" / "lbd"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")  # the XDG rule: only absolute paths count
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Config().state_dir == tmp_path / "home" / ".local" / "state" / "lbd"
    config_file = tmp_path / "etc" / "lbd.toml"
    config_file.parent.mkdir()
    config_file.write_text('state_dir = "state"\n')
    assert load_config(config_file, {}).state_dir == tmp_path / "etc" / "state"  # relative to the file
    assert load_config(config_file, {"state_dir": "/srv/lbd"}).state_dir == Path("/srv/lbd")  # the flag wins
