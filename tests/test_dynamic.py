"""Dynamic mode end to end: a real lbd process, real backends, registration over the admin socket."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.backends import Backend, backends
from tests.harness.daemon import Lbd, running_lbd, wait_until

TOKEN = "test-token-0123456789abcdef"


def get(lbd: Lbd, client: str, region: str | None = "us-east", path: str = "/echo") -> tuple[int, str, bytes]:
    """One request through the proxy: (status, backend id, body)."""
    return lbd.proxy_get(path, client, region)


def register(lbd: Lbd, backend: Backend, capacity: int = 10, region: str | None = None) -> dict[str, Any]:
    status, body = lbd.request("POST", "/v1/servers", backend.entry(capacity, region))
    assert status in (200, 201), body
    return body


def config_file(directory: Path, **keys: object) -> str:
    lines = [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    path = directory / "lbd.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def pool() -> Iterator[list[Backend]]:
    with backends("us1", "us2", "ca1", "eu1", regions=("us-east", "us-east", "ca-central", "eu-west")) as started:
        yield started


FAST_HEALTH = "[health]\ninterval_ms = 100\ntimeout_ms = 80\ncooldown_ms = 300\nrise = 1\n"


@pytest.fixture
def dynamic_lbd(tmp_path: Path) -> Iterator[Lbd]:
    config = tmp_path / "lbd.toml"
    config.write_text(FAST_HEALTH)
    with running_lbd(["--mode", "dynamic", "--timeout-base-ms", "1000", "--config", str(config)]) as daemon:
        yield daemon


def test_registration_is_validated_and_idempotent(dynamic_lbd: Lbd, pool: list[Backend]) -> None:
    us1 = pool[0]
    assert dynamic_lbd.request("POST", "/v1/servers", us1.entry())[0] == 201
    assert dynamic_lbd.request("POST", "/v1/servers", us1.entry())[0] == 200  # same again: no-op
    moved = {**us1.entry(), "url": "http://127.0.0.1:1"}
    moved.pop("port")
    status, body = dynamic_lbd.request("POST", "/v1/servers", moved)
    assert status == 409 and body["error"]["code"] == "conflict"
    bad_cases = {
        "capacity": {**us1.entry(), "id": "x", "capacity": 0},
        "region": {**us1.entry(), "id": "x", "region": "mars"},
        "url": {"id": "x", "url": "ftp://host:1", "region": "us-east", "capacity": 1},
        "id": {"url": "http://127.0.0.1:1", "region": "us-east", "capacity": 1},
    }
    for field, entry in bad_cases.items():
        status, body = dynamic_lbd.request("POST", "/v1/servers", entry)
        assert status == 422, (field, body)
        assert body["error"]["field"] == field and field in body["error"]["message"]
    status, body = dynamic_lbd.request("POST", "/v1/servers", b"{not json")
    assert status == 400 and body["error"]["code"] == "bad_json"
    status, body = dynamic_lbd.request("DELETE", "/v1/servers/nope")
    assert status == 404 and body["error"]["code"] == "server_not_found"
    assert set(dynamic_lbd.servers()) == {"us1"}  # nothing bad got in; the daemon still answers


def test_clients_go_to_their_region_then_the_nearest_one(dynamic_lbd: Lbd, pool: list[Backend]) -> None:
    for backend in pool:
        register(dynamic_lbd, backend)
    assert get(dynamic_lbd, "e1", "eu-west")[1] == "eu1"
    assert get(dynamic_lbd, "c1", "ca-central")[1] == "ca1"
    assert get(dynamic_lbd, "u1", "us-east")[1] in ("us1", "us2")
    assert get(dynamic_lbd, "m1", "me-central")[1] == "eu1"  # me-central: eu-west first
    assert get(dynamic_lbd, "w1", "us-west")[1] in ("us1", "us2")  # a client-only region
    status, _, body = get(dynamic_lbd, "x", None)
    assert status == 400 and b"client-region" in body
    status, _, body = get(dynamic_lbd, "x", "mars")
    assert status == 400 and b"eu-west" in body  # lists the known regions
    # eu-west draining: its clients fall back through eu-west's order (us-east next)
    dynamic_lbd.request("POST", "/v1/servers/eu1/drain")
    assert get(dynamic_lbd, "e2", "eu-west")[1] in ("us1", "us2")
    assert get(dynamic_lbd, "e1", "eu-west")[1] in ("us1", "us2")  # sticky client moved too
    sessions = {s["client_id"]: s for s in dynamic_lbd.get("/v1/sessions")["sessions"]}
    assert sessions["e1"]["server"] in ("us1", "us2")  # re-pinned


def test_full_region_falls_back_and_nearly_full_server_gets_relief(dynamic_lbd: Lbd, pool: list[Backend]) -> None:
    us1, _, ca1, _ = pool
    register(dynamic_lbd, us1, capacity=2)
    register(dynamic_lbd, ca1, capacity=10)
    assert get(dynamic_lbd, "sticky", "us-east")[1] == "us1"
    # two slow requests from new us-east clients: us1 is below capacity for each, so both land there
    slow = [threading.Thread(target=get, args=(dynamic_lbd, f"slow{i}", "us-east", "/slow/1500")) for i in range(2)]
    for thread in slow:
        thread.start()
    wait_until(lambda: dynamic_lbd.servers()["us1"]["active"] == 2)
    # us1 is full: a new us-east client falls back to ca-central, the sticky one gets a backup
    assert get(dynamic_lbd, "newcomer", "us-east")[1] == "ca1"
    assert get(dynamic_lbd, "sticky", "us-east")[1] == "ca1"
    sessions = {s["client_id"]: s for s in dynamic_lbd.get("/v1/sessions")["sessions"]}
    assert sessions["sticky"]["server"] == "us1"  # served by a backup without losing its session
    assert sessions["newcomer"]["server"] == "ca1"
    for thread in slow:
        thread.join()
    assert get(dynamic_lbd, "sticky", "us-east")[1] == "us1"


def test_sessions_stick_and_expire_after_idle_timeout(pool: list[Backend], tmp_path: Path) -> None:
    us1, us2, _, _ = pool
    config = config_file(tmp_path, session_idle_timeout=1)
    with running_lbd(["--mode", "dynamic", "--config", config]) as lbd:
        register(lbd, us1)
        assert get(lbd, "alice")[1] == "us1"
        us1.delay_s = 0.06  # us1 turns slow: its measured latency (EWMA) rises above us2's seed
        for _ in range(3):
            assert get(lbd, "alice")[1] == "us1"
        register(lbd, us2)
        assert get(lbd, "newcomer")[1] == "us2"  # the better score wins for a client without a session
        for _ in range(3):
            time.sleep(0.3)  # inside the 1 s idle timeout each time: the session slides
            assert get(lbd, "alice")[1] == "us1"  # sticky despite the better server
        time.sleep(1.3)
        assert all(s["client_id"] != "alice" for s in lbd.get("/v1/sessions")["sessions"])  # expired
        assert get(lbd, "alice")[1] == "us2"  # chosen afresh
        us1.delay_s = 0


def test_failover_when_pinned_server_dies_get_and_small_post(dynamic_lbd: Lbd, pool: list[Backend]) -> None:
    us1, us2, _, _ = pool
    register(dynamic_lbd, us1)
    assert get(dynamic_lbd, "alice")[1] == "us1"
    register(dynamic_lbd, us2)
    assert get(dynamic_lbd, "alice")[1] == "us1"  # sticky
    us1.stop()
    status, backend, _ = get(dynamic_lbd, "alice")
    assert (status, backend) == (200, "us2")  # retried on the backup, not a 502
    sessions = {s["client_id"]: s for s in dynamic_lbd.get("/v1/sessions")["sessions"]}
    assert sessions["alice"]["server"] == "us2"  # re-pinned
    assert dynamic_lbd.servers()["us1"]["health"] in ("cooldown", "degraded")  # passively ejected
    # a small POST pinned to a dead server is replayed too (its body was fully buffered)
    us1.start()
    wait_until(lambda: dynamic_lbd.servers()["us1"]["health"] == "healthy", timeout=10)
    dynamic_lbd.request("DELETE", "/v1/sessions/bob")
    dynamic_lbd.request("POST", "/v1/servers/us2/drain")
    assert get(dynamic_lbd, "bob")[1] == "us1"
    dynamic_lbd.request("POST", "/v1/servers/us2/undrain")
    us1.stop()
    connection = http.client.HTTPConnection("127.0.0.1", dynamic_lbd.port, timeout=10)
    payload = b"x" * 5000
    connection.request("POST", "/upload", body=payload, headers={"client-id": "bob", "client-region": "us-east"})
    response = connection.getresponse()
    raw = response.read()
    assert response.status == 200, (raw, dynamic_lbd.log()[-3000:])
    body = json.loads(raw)
    assert body["server"] == "us2" and body["length"] == len(payload)
    status = dynamic_lbd.get("/v1/status")
    assert status["requests"]["failovers"] >= 2
    assert dynamic_lbd.servers()["us1"]["errors"] >= 2  # reported as passive failures


def test_a_server_that_times_out_is_not_retried_elsewhere(dynamic_lbd: Lbd, pool: list[Backend]) -> None:
    """The deadline is the request's budget: a silent server costs a 504 at the deadline, not a second
    full wait on a backup (retrying on timeouts is opt-in in HAProxy and Envoy)."""
    us1, us2, _, _ = pool
    register(dynamic_lbd, us1)
    assert get(dynamic_lbd, "carol")[1] == "us1"
    register(dynamic_lbd, us2)
    started = time.monotonic()
    status, _, body = get(dynamic_lbd, "carol", path="/slow/3000")
    elapsed = time.monotonic() - started
    assert status == 504 and b"us1" in body, body
    assert 1.0 <= elapsed < 2.0, f"504 after {elapsed:.2f} s; the timeout is 1 s + 10 ms"
    assert us2.hits["/slow/3000"] == 0
    assert dynamic_lbd.get("/v1/status")["requests"]["failovers"] == 0


def test_a_reregistered_id_never_gets_a_connection_to_its_old_address(dynamic_lbd: Lbd, pool: list[Backend]) -> None:
    """A request in flight on s1 (at us1) while s1 is removed and registered again at us2: when it ends,
    its keep-alive connection to us1 must not be handed to the new s1."""
    us1, us2, _, _ = pool
    dynamic_lbd.request("POST", "/v1/servers", {**us1.entry(), "id": "s1"})
    result: list[tuple[int, str, bytes]] = []
    slow = threading.Thread(target=lambda: result.append(get(dynamic_lbd, "dave", path="/slow/600")))
    slow.start()
    wait_until(lambda: us1.hits["/slow/600"] == 1)
    assert dynamic_lbd.request("DELETE", "/v1/servers/s1?now=1")[0] == 200
    assert dynamic_lbd.request("POST", "/v1/servers", {**us2.entry(), "id": "s1"})[0] == 201
    slow.join(5)
    assert result and result[0][:2] == (200, "us1")
    for _ in range(3):
        assert get(dynamic_lbd, "dave")[1] == "us2"


def _load(lbd: Lbd, stop: threading.Event, results: Counter[int], clients: int = 8) -> None:
    """Steady traffic from several clients over keep-alive connections, bounded by `stop` and 2,000 requests."""
    connection = http.client.HTTPConnection("127.0.0.1", lbd.port, timeout=10)
    sent = 0
    while not stop.is_set() and sent < 2000:
        client = f"load-{sent % clients}"
        try:
            connection.request("GET", "/echo", headers={"client-id": client, "client-region": "us-east"})
            response = connection.getresponse()
            response.read()
            results[response.status] += 1
        except (OSError, http.client.HTTPException):
            results[0] += 1
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", lbd.port, timeout=10)
        sent += 1
    connection.close()


def test_drain_deregister_and_mode_switch_under_traffic_lose_nothing(dynamic_lbd: Lbd, pool: list[Backend]) -> None:
    us1, us2, ca1, _ = pool
    for backend in (us1, us2, ca1):
        register(dynamic_lbd, backend)
    stop = threading.Event()
    results: Counter[int] = Counter()
    workers = [threading.Thread(target=_load, args=(dynamic_lbd, stop, results)) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        wait_until(lambda: sum(results.values()) > 100)
        assert dynamic_lbd.request("POST", "/v1/servers/us1/drain")[0] == 200
        hits_when_drained = us1.total_hits
        wait_until(lambda: sum(results.values()) > 300)
        assert us1.total_hits - hits_when_drained <= 3 * 2  # at most what was already in flight
        for mode in ("static", "dynamic", "static", "dynamic"):
            assert dynamic_lbd.request("PUT", "/v1/mode", {"mode": mode})[0] == 200
            time.sleep(0.1)
        status, body = dynamic_lbd.request("DELETE", "/v1/servers/us2")
        assert status == 200 and body["removed"] == "us2"
        hits_after_removal = us2.total_hits
        wait_until(lambda: sum(results.values()) > 700)
        assert us2.total_hits == hits_after_removal
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert set(results) == {200}, results
    assert dynamic_lbd.get("/v1/status")["mode"] == "dynamic"


def test_seed_register_only_on_token_guarded_admin_listener(pool: list[Backend], tmp_path: Path) -> None:
    us1 = pool[0]
    config = config_file(tmp_path, admin_token=TOKEN)
    with (
        backends("plain") as (plain,),
        running_lbd(
            ["--mode", "dynamic", "--config", config, "--admin-listen", "127.0.0.1:0"],
            entries=[plain.entry()],
        ) as lbd,
    ):
        admin_tcp = lbd.get("/v1/status")["listeners"]["admin_tcp"]
        host, port = admin_tcp.rsplit(":", 1)
        assert int(port) != 0
        body = json.dumps(us1.entry()).encode()
        request = urllib.request.Request(f"http://{host}:{port}/register", data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        assert refused.value.code == 401
        request.add_header("Authorization", f"Bearer {TOKEN}")
        assert urllib.request.urlopen(request, timeout=5).status == 201
        assert "us1" in lbd.servers()
        # the proxy port never registers anything: /register there is ordinary traffic
        connection = http.client.HTTPConnection("127.0.0.1", lbd.port, timeout=5)
        entry = {**us1.entry(), "id": "sneaky"}
        connection.request(
            "POST", "/register", body=json.dumps(entry), headers={"client-id": "z", "client-region": "us-east"}
        )
        assert connection.getresponse().status == 200
        assert "sneaky" not in lbd.servers()
