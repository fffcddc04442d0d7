"""Dynamic mode spreading new clients, end to end: a real lbd, real backends, clients one after another.

Each new client becomes a sticky session, so the sessions a server holds are its load; these tests
send new client ids sequentially (nothing in flight between requests), as a new user of lbd would.
The pure version of each property is in tests/test_scoring.py.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.backends import Backend, backends
from tests.harness.daemon import Lbd, running_lbd, wait_until

FAST_HEALTH = "[health]\ninterval_ms = 100\ntimeout_ms = 80\ncooldown_ms = 300\nrise = 1\n"
# A region latency (the latency factor's scale) so large that a loaded machine's millisecond of
# answer-time jitter moves a server's factor by a thousandth, far below the 1/43 that separates the
# closest scores where a test counts load alone.
LATENCY_NEUTRAL = '[regions.latency_ms]\nus-east = 1000\n[regions.proximity]\nus-east = ["us-east"]\n'


def register(lbd: Lbd, backend: Backend, capacity: int) -> None:
    status, body = lbd.request("POST", "/v1/servers", backend.entry(capacity))
    assert status in (200, 201), body


def new_clients(lbd: Lbd, prefix: str, count: int, path: str = "/echo") -> Counter[str]:
    """`count` new client ids one after another over one keep-alive connection: backend id -> clients."""
    reached: Counter[str] = Counter()
    connection = http.client.HTTPConnection("127.0.0.1", lbd.port, timeout=10)
    try:
        for i in range(count):
            connection.request("GET", path, headers={"client-id": f"{prefix}-{i}", "client-region": "us-east"})
            response = connection.getresponse()
            response.read()
            assert response.status == 200, (response.status, lbd.log()[-2000:])
            reached[response.getheader("X-Backend-Id") or "?"] += 1
    finally:
        connection.close()
    return reached


def share(counts: Counter[str], backend: Backend) -> float:
    return counts[backend.id] / sum(counts.values())


def dynamic_lbd(tmp_path: Path, config_text: str) -> Iterator[Lbd]:
    config = tmp_path / "lbd.toml"
    config.write_text(config_text)
    with running_lbd(["--mode", "dynamic", "--config", str(config)]) as daemon:
        yield daemon


@pytest.fixture
def lbd(tmp_path: Path) -> Iterator[Lbd]:
    yield from dynamic_lbd(tmp_path, FAST_HEALTH)


@pytest.fixture
def latency_neutral_lbd(tmp_path: Path) -> Iterator[Lbd]:
    yield from dynamic_lbd(tmp_path, FAST_HEALTH + LATENCY_NEUTRAL)


@pytest.fixture
def three() -> Iterator[list[Backend]]:
    with backends("e1", "e2", "e3") as started:
        yield started


@pytest.mark.parametrize("capacities", [(10, 30), (20, 20)])
def test_new_clients_follow_capacity_and_a_late_server_takes_them_at_once(
    lbd: Lbd, three: list[Backend], capacities: tuple[int, int]
) -> None:
    """400 new clients over capacities 10 and 30 (or two equal ones) split by capacity, within 8
    points; a capacity-20 server registered then takes at least 20% of the next 300."""
    e1, e2, e3 = three
    for backend, capacity in zip((e1, e2), capacities, strict=True):
        register(lbd, backend, capacity)
    first = new_clients(lbd, "a", 400)
    for backend, capacity in zip((e1, e2), capacities, strict=True):
        assert abs(share(first, backend) - capacity / sum(capacities)) <= 0.08, first
    register(lbd, e3, 20)
    later = new_clients(lbd, "b", 300)
    assert share(later, e3) >= 0.20, later
    summary = lbd.get("/v1/sessions/summary")
    assert summary["by_server"] == {
        backend.id: first[backend.id] + later[backend.id] for backend in three if first[backend.id] + later[backend.id]
    }


def test_pinned_sessions_and_requests_in_flight_count_as_load(latency_neutral_lbd: Lbd, three: list[Backend]) -> None:
    """New clients go where sessions plus requests in flight are fewest, one by one: the last picks
    are decided by one unit of load in 43, so the latency factor is held neutral."""
    lbd = latency_neutral_lbd
    e1, e2, _ = three
    register(lbd, e1, 10)
    register(lbd, e2, 10)
    lbd.request("POST", "/v1/servers/e2/drain")
    assert new_clients(lbd, "early", 30) == Counter({"e1": 30})  # e1 now holds 30 sessions
    lbd.request("POST", "/v1/servers/e2/undrain")
    after = new_clients(lbd, "late", 40)
    assert after["e2"] >= 30, after  # the sessions pinned to e1 are its load: e2 catches up first
    # now about even in sessions; six slow requests in flight on e1 weigh like six more sessions
    pinned = {s["client_id"]: s["server"] for s in lbd.get("/v1/sessions?limit=1000")["sessions"]}
    on_e1 = [client for client, server in pinned.items() if server == "e1"][:6]
    slow = [
        threading.Thread(target=lbd.proxy_get, args=("/slow/3000", client, "us-east"), daemon=True) for client in on_e1
    ]
    for thread in slow:
        thread.start()
    wait_until(lambda: lbd.servers()["e1"]["active"] == 6)
    sessions = lbd.get("/v1/sessions/summary")["by_server"]
    busy = new_clients(lbd, "busy", 8)
    gap = sessions["e1"] + 6 - sessions["e2"]  # how far e1 (sessions + in flight) is ahead
    assert busy["e2"] >= min(8, gap), (busy, sessions)
    for thread in slow:
        thread.join(10)


def test_a_server_back_from_cooldown_gets_new_clients_at_once(lbd: Lbd, three: list[Backend]) -> None:
    e1, e2, _ = three
    register(lbd, e1, 10)
    register(lbd, e2, 10)
    new_clients(lbd, "a", 40)
    e2.stop()
    wait_until(lambda: lbd.servers()["e2"]["health"] in ("cooldown", "degraded"))
    assert new_clients(lbd, "b", 40) == Counter({"e1": 40})
    e2.start()
    wait_until(lambda: lbd.servers()["e2"]["health"] == "healthy", timeout=15)
    back = new_clients(lbd, "c", 100)
    assert back["e2"] >= 50, back  # it holds fewer sessions now: it gets new clients first


def test_a_clearly_slower_server_gets_fewer_new_clients_but_not_none(lbd: Lbd, three: list[Backend]) -> None:
    fast, slow, _ = three
    register(lbd, fast, 10)
    register(lbd, slow, 10)
    slow.delay_s = 0.04
    counts = new_clients(lbd, "a", 200)
    assert 0 < counts["e2"] < counts["e1"] / 2, counts
    servers = lbd.servers()
    assert servers["e2"]["latency_factor"] > servers["e1"]["latency_factor"]


def test_route_and_servers_show_the_terms_of_the_score(lbd: Lbd, three: list[Backend]) -> None:
    e1, e2, _ = three
    register(lbd, e1, 10)
    register(lbd, e2, 30)
    new_clients(lbd, "a", 20)
    result = lbd.lbctl("route", "newcomer", "--region", "us-east", "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    terms = {"score", "sessions", "active", "capacity", "latency_ms", "region_latency_ms", "latency_factor"}
    for candidate in answer["candidates"]:
        assert terms <= set(candidate), candidate
        load = candidate["sessions"] + candidate["active"] + 1
        expected = candidate["latency_factor"] * load / candidate["capacity"]
        assert candidate["score"] == pytest.approx(expected, rel=1e-3)
    assert lbd.proxy_get("/echo", "newcomer", "us-east")[1] == answer["server"]  # the explanation predicts it
    servers = json.loads(lbd.lbctl("servers", "--json").stdout)
    assert {server["id"]: server["sessions"] for server in servers} == lbd.get("/v1/sessions/summary")["by_server"]
    table = lbd.lbctl("servers").stdout
    assert "SESS" in table and "SCORE" in table, table
