"""Spill by capacity and failback end to end: a real lbd, real backends, `lbctl route` explaining both."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.backends import Backend, backends
from tests.harness.daemon import Lbd, running_lbd, wait_until

FAST_HEALTH = "[health]\ninterval_ms = 100\ntimeout_ms = 80\ncooldown_ms = 300\nrise = 1\nfall = 1\n"


def start(tmp_path: Path, failover: str) -> Any:
    config = tmp_path / "lbd.toml"
    config.write_text(FAST_HEALTH + "[failover]\n" + failover)
    return running_lbd(["--mode", "dynamic", "--timeout-base-ms", "5000", "--config", str(config)])


def register(lbd: Lbd, backend: Backend, capacity: int) -> None:
    status, body = lbd.request("POST", "/v1/servers", backend.entry(capacity))
    assert status in (200, 201), body


def route(lbd: Lbd, client: str) -> dict[str, Any]:
    return lbd.get(f"/v1/route/{client}?region=us-east")  # type: ignore[no-any-return]


@pytest.fixture
def pool() -> Iterator[list[Backend]]:
    with backends("us1", "ca1", "eu1", regions=("us-east", "ca-central", "eu-west")) as started:
        yield started


def test_a_full_fallback_region_takes_what_its_capacity_allows_and_the_rest_spill_further(
    tmp_path: Path, pool: list[Backend]
) -> None:
    us1, ca1, eu1 = pool
    with start(tmp_path, "fallback_max_load = 0.5\n") as lbd:
        register(lbd, us1, 1)
        register(lbd, ca1, 4)
        register(lbd, eu1, 10)
        held: list[threading.Thread] = []

        def hold(client: str, server: str) -> None:
            """A slow request from a new us-east client, in flight until the test ends."""
            thread = threading.Thread(target=lbd.proxy_get, args=("/slow/8000", client, "us-east"), daemon=True)
            thread.start()
            held.append(thread)
            wait_until(lambda: lbd.servers()[server]["active"] >= sum(1 for t in held if t.is_alive()) - 2)

        hold("a", "us1")  # us-east full: 1 of 1
        wait_until(lambda: lbd.servers()["us1"]["active"] == 1)
        for client in ("b", "c"):  # ca-central takes up to half of its capacity of 4
            wait_until(lambda client=client: route(lbd, client)["server"] == "ca1")
            hold(client, "ca1")
        wait_until(lambda: lbd.servers()["ca1"]["active"] == 2)
        answer = wait_until(lambda: (r := route(lbd, "d"))["reason"] == "spill" and r)
        assert answer["server"] == "eu1"
        assert "us-east is full" in answer["detail"] and "ca-central is full" in answer["detail"]
        regions = {row["region"]: row for row in answer["regions"]}
        assert regions["ca-central"]["utilization"] == 0.5 and regions["ca-central"]["max_load"] == 0.5
        assert regions["us-east"]["home"] and not regions["us-east"]["room"] and regions["eu-west"]["room"]
        assert lbd.proxy_get("/echo", "d", "us-east")[1] == "eu1"  # the request goes where route said
        shown = lbd.lbctl("route", "e", "--region", "us-east")
        assert shown.returncode == 0, shown.stderr
        assert "spill" in shown.stdout and "ca-central is full (50% of capacity" in shown.stdout
        assert "regions (load/limit): us-east home 100%/90% full, ca-central 50%/50% full, eu-west" in shown.stdout


def test_a_session_away_from_home_fails_back_after_the_stable_period(tmp_path: Path, pool: list[Backend]) -> None:
    us1, ca1, _ = pool
    with start(tmp_path, "failback_stable_ms = 1500\nfailback_ramp_ms = 0\n") as lbd:
        register(lbd, us1, 10)
        register(lbd, ca1, 10)
        assert lbd.proxy_get("/echo", "away", "us-east")[1] == "us1"
        us1.stop()
        wait_until(lambda: not lbd.servers()["us1"]["in_rotation"])
        assert lbd.proxy_get("/echo", "away", "us-east")[1] == "ca1"  # moved
        us1.start()
        wait_until(lambda: lbd.servers()["us1"]["in_rotation"])
        waiting = route(lbd, "away")
        if waiting["reason"] == "sticky":  # within the stable period: still away, and route says until when
            assert waiting["failback"]["home"] == "us-east" and "away from home region us-east" in waiting["detail"]
        answer = wait_until(lambda: (r := route(lbd, "away"))["reason"] == "failback" and r)
        assert answer["server"] == "us1" and "moved back to us1" in answer["detail"]
        assert answer["failback"]["admitted"] == 1.0
        assert lbd.proxy_get("/echo", "away", "us-east")[1] == "us1"
        sessions = {s["client_id"]: s for s in lbd.get("/v1/sessions")["sessions"]}
        assert sessions["away"]["server"] == "us1"  # re-pinned home
        assert route(lbd, "away")["reason"] == "sticky"


def test_with_failback_off_a_session_stays_away(tmp_path: Path, pool: list[Backend]) -> None:
    us1, ca1, _ = pool
    with start(tmp_path, "failback = false\nfailback_stable_ms = 0\n") as lbd:
        register(lbd, us1, 10)
        register(lbd, ca1, 10)
        us1.stop()
        wait_until(lambda: not lbd.servers()["us1"]["in_rotation"])
        assert lbd.proxy_get("/echo", "away", "us-east")[1] == "ca1"
        us1.start()
        wait_until(lambda: lbd.servers()["us1"]["in_rotation"])
        wait_until(lambda: route(lbd, "fresh")["server"] == "us1")  # us-east takes new clients again
        answer = route(lbd, "away")
        assert answer["reason"] == "sticky" and answer["server"] == "ca1"
        assert "failback is off" in answer["detail"]
        assert lbd.proxy_get("/echo", "away", "us-east")[1] == "ca1"
