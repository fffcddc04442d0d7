"""Health end to end: active checks with fall/rise, cooldown, degraded, recovery; passive ejection;
the panic guard; and how routing reacts. Real lbd, real backends whose /health can be switched."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lbd.config import HealthSettings
from lbd.health import machine
from lbd.models import Health, Outcome, ServerState
from tests.harness.backends import Backend, backends
from tests.harness.daemon import Lbd, running_lbd, wait_until

FAST_HEALTH = """
[health]
interval_ms = 100
timeout_ms = 80
fall = 3
rise = 2
cooldown_ms = 400
max_cooldown_ms = 1600
"""


def lbd_with(tmp_path: Path, extra_toml: str, entries: list[dict[str, Any]], *args: str) -> Any:
    config = tmp_path / "lbd.toml"
    config.write_text(FAST_HEALTH + extra_toml)
    return running_lbd(["--config", str(config), *args], entries=entries)


def health_of(lbd: Lbd, server_id: str) -> str:
    return str(lbd.servers()[server_id]["health"])


def route(lbd: Lbd, client: str) -> tuple[int, str]:
    return lbd.proxy_get("/echo", client)[:2]


@pytest.fixture
def trio() -> Iterator[list[Backend]]:
    with backends("s1", "s2", "s3") as started:
        yield started


def test_fall_cooldown_degraded_and_rise(tmp_path: Path, trio: list[Backend]) -> None:
    s1 = trio[0]
    with lbd_with(tmp_path, "", [b.entry() for b in trio]) as lbd:
        wait_until(lambda: lbd.servers()["s1"]["checks"]["passed"] >= 2)
        s1.health_status = 503
        wait_until(lambda: health_of(lbd, "s1") == "failing", timeout=5)
        assert lbd.servers()["s1"]["in_rotation"] is True  # failing is still in rotation
        wait_until(lambda: health_of(lbd, "s1") == "cooldown", timeout=5)
        server = lbd.servers()["s1"]
        assert server["in_rotation"] is False and server["ejections"] == 1
        assert server["checks"]["consecutive_failures"] >= 3 and "HTTP 503" in server["last_transition_reason"]
        wait_until(lambda: health_of(lbd, "s1") == "degraded", timeout=5)  # probed after cooldown, failed
        assert lbd.servers()["s1"]["cooldown_remaining_s"] > 0.4  # the cooldown doubled
        s1.health_status = 200
        wait_until(lambda: health_of(lbd, "s1") == "healthy", timeout=10)
        assert lbd.servers()["s1"]["checks"]["consecutive_passes"] >= 2
        log = lbd.log()
        for transition in ("healthy -> failing", "failing -> cooldown", "cooldown -> degraded", "degraded -> healthy"):
            assert log.count(f"server s1: {transition}") == 1, transition  # once per transition


def test_one_lost_probe_does_not_flap(tmp_path: Path, trio: list[Backend]) -> None:
    s1 = trio[0]
    with lbd_with(tmp_path, "", [b.entry() for b in trio]) as lbd:
        wait_until(lambda: lbd.servers()["s1"]["checks"]["passed"] >= 1)
        failed_before = lbd.servers()["s1"]["checks"]["failed"]
        s1.health_status = 500
        wait_until(lambda: lbd.servers()["s1"]["checks"]["failed"] > failed_before, timeout=5, interval=0.01)
        s1.health_status = 200
        wait_until(lambda: lbd.servers()["s1"]["checks"]["consecutive_passes"] >= 3, timeout=5)
        assert health_of(lbd, "s1") == "healthy"
        assert lbd.servers()["s1"]["ejections"] == 0
        assert "failing -> cooldown" not in lbd.log()


def test_static_mode_moves_only_the_down_servers_clients_and_back(tmp_path: Path, trio: list[Backend]) -> None:
    with lbd_with(tmp_path, "", [b.entry() for b in trio]) as lbd:
        clients = [f"client-{i}" for i in range(60)]
        before = {c: route(lbd, c)[1] for c in clients}
        assert "s2" in before.values()
        trio[1].health_status = 503
        wait_until(lambda: health_of(lbd, "s2") == "cooldown", timeout=5)
        during = {c: route(lbd, c)[1] for c in clients}
        for client in clients:
            if before[client] == "s2":
                assert during[client] in ("s1", "s3")
            else:
                assert during[client] == before[client]  # nobody else moved
        trio[1].health_status = 200
        wait_until(lambda: health_of(lbd, "s2") == "healthy", timeout=10)
        assert {c: route(lbd, c)[1] for c in clients} == before  # its clients came back


def test_passive_ejection_on_connection_refused(tmp_path: Path, trio: list[Backend]) -> None:
    config = tmp_path / "lbd.toml"
    config.write_text("[health]\ninterval_ms = 60000\ncooldown_ms = 5000\n")  # no active check will run
    with running_lbd(["--config", str(config)], entries=[b.entry() for b in trio]) as lbd:
        victim = next(c for c in (f"c{i}" for i in range(100)) if route(lbd, c)[1] == "s3")
        trio[2].stop()
        status, backend = route(lbd, victim)
        assert status == 200 and backend in ("s1", "s2")  # failed over
        server = lbd.servers()["s3"]
        assert server["health"] == "cooldown" and server["ejections"] == 1  # ejected at once, no active check
        assert "request(s) failed: connect_failed" in server["last_transition_reason"]
        assert route(lbd, victim)[1] in ("s1", "s2")


def test_panic_guard_keeps_the_last_server_of_a_region(tmp_path: Path) -> None:
    config = tmp_path / "lbd.toml"
    config.write_text("[health]\ninterval_ms = 60000\n")
    with backends("only") as (only,), running_lbd(["--config", str(config)], entries=[only.entry()]) as lbd:
        only.stop()
        for i in range(3):
            assert route(lbd, f"c{i}")[0] == 502
        assert lbd.servers()["only"]["health"] == "healthy"  # passive signals alone never empty a region
        only.start()
        assert route(lbd, "c0")[0] == 200


# --- the pure state machine ----------------------------------------------------------------------


SETTINGS = HealthSettings(fall=3, rise=2, cooldown_ms=1000, max_cooldown_ms=4000, passive_fall=3)


def test_machine_cooldown_doubles_up_to_the_cap() -> None:
    state = ServerState()
    now = 0.0
    for _ in range(3):
        machine.after_probe(state, False, "x", now, now, SETTINGS)
    assert state.health is Health.COOLDOWN and state.cooldown_until == 1.0
    assert not machine.probe_due(state, 0.5) and machine.probe_due(state, 1.0)
    cooldowns = []
    for step in range(4):
        now = state.cooldown_until
        machine.after_probe(state, False, "x", now, now, SETTINGS)
        cooldowns.append(state.cooldown_ms)
        assert state.health is Health.DEGRADED, step
    assert cooldowns == [2000, 4000, 4000, 4000]
    now = state.cooldown_until
    machine.after_probe(state, True, "ok", now, now, SETTINGS)
    assert state.health is Health.DEGRADED  # rise = 2
    machine.after_probe(state, True, "ok", now + 0.1, now + 0.1, SETTINGS)
    assert state.health is Health.HEALTHY and state.cooldown_ms == 0


def test_machine_passive_failures_reset_on_success() -> None:
    state = ServerState()
    for _ in range(2):
        machine.after_outcome(state, Outcome.TIMEOUT, 0.0, SETTINGS, may_eject=lambda: True)
    machine.after_outcome(state, Outcome.OK, 0.0, SETTINGS, may_eject=lambda: True)
    for _ in range(2):
        assert machine.after_outcome(state, Outcome.RESET, 0.0, SETTINGS, may_eject=lambda: True) is None
    transition = machine.after_outcome(state, Outcome.RESET, 0.0, SETTINGS, may_eject=lambda: True)
    assert transition is not None and transition.new is Health.COOLDOWN
    assert json.dumps(state.health.value) == '"cooldown"'


def test_machine_cooldown_straight_back_to_healthy_after_rise_passes() -> None:
    state = ServerState()
    for _ in range(3):
        machine.after_probe(state, False, "x", 0.0, 0.0, SETTINGS)
    assert state.health is Health.COOLDOWN
    machine.after_probe(state, True, "ok", 1.0, 1.0, SETTINGS)
    assert state.health is Health.COOLDOWN and not state.health.serving  # rise = 2: not yet
    transition = machine.after_probe(state, True, "ok", 1.1, 1.1, SETTINGS)
    assert transition is not None and (transition.old, transition.new) == (Health.COOLDOWN, Health.HEALTHY)
    assert state.ejections == 1 and state.last_transition_reason == "2 checks passed"


@pytest.mark.parametrize("passed", [False, True])
def test_machine_a_check_in_flight_at_an_ejection_moves_nothing(passed: bool) -> None:
    """A check sent while the server served, answered after a request's failure ejected it, is not
    the check after the cooldown: it neither degrades the server (doubling the cooldown) nor counts
    towards `rise`. It is still shown and counted."""
    state = ServerState()
    transition = machine.after_outcome(state, Outcome.CONNECT_FAILED, 5.0, SETTINGS, may_eject=lambda: True)
    assert transition is not None and transition.new is Health.COOLDOWN and state.cooldown_until == 6.0
    assert machine.after_probe(state, passed, "late", 4.99, 5.01, SETTINGS) is None
    assert (state.health, state.cooldown_ms, state.cooldown_until) == (Health.COOLDOWN, 1000, 6.0)
    assert state.consecutive_passes == 0 and state.last_check_detail == "late"
    assert (state.checks_passed, state.checks_failed) == ((1, 0) if passed else (0, 1))
    # the check sent when the cooldown ends counts as before
    transition = machine.after_probe(state, False, "refused", 6.0, 6.01, SETTINGS)
    assert transition is not None and transition.new is Health.DEGRADED and state.cooldown_ms == 2000


def test_machine_consults_the_panic_guard_only_when_it_would_eject() -> None:
    state = ServerState()
    asked: list[int] = []

    def guard() -> bool:
        asked.append(state.passive_failures)
        return False

    for _ in range(2):
        assert machine.after_outcome(state, Outcome.TIMEOUT, 0.0, SETTINGS, guard) is None
    assert asked == []  # below passive_fall: no region scan
    assert machine.after_outcome(state, Outcome.TIMEOUT, 0.0, SETTINGS, guard) is None
    assert asked == [3] and state.health is Health.HEALTHY  # asked once, and it refused
