"""Prometheus metrics: `GET /metrics` on the admin socket and on `--metrics-listen`, with exact values
after known traffic, a failover, an ejection and a session eviction; the histogram's buckets."""

from __future__ import annotations

import asyncio
import http.client
from bisect import bisect_left
from collections.abc import Iterator
from pathlib import Path
from time import monotonic

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY, generate_latest

from lbd.balancer import Balancer
from lbd.config import Config, Regions, load_config
from lbd.metrics import metrics_registry
from lbd.models import LATENCY_BUCKETS_S, Outcome, ServerSpec, StatusCounts
from lbd.proxy.context import ProxyContext
from lbd.registry import Registry, latency_bucket
from lbd.sessions import SessionTable
from tests.harness.backends import Backend, backends
from tests.harness.daemon import Lbd, running_lbd, wait_until
from tests.harness.metrics import parse, scrape, value

CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


def tcp_get(address: str, path: str) -> tuple[int, str, str]:
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read().decode()
    finally:
        connection.close()


def proxied(lbd: Lbd, path: str, client: str | None = "alice", region: str | None = None) -> tuple[int, str]:
    return lbd.proxy_get(path, client, region)[:2]


def checks_agree(lbd: Lbd, server_ids: tuple[str, ...]) -> bool:
    """Health checks keep running: compare only when the counters did not move around the scrape."""
    before = lbd.servers()
    samples = scrape(lbd)
    after = lbd.servers()
    for server_id in server_ids:
        region = after[server_id]["region"]
        for result in ("passed", "failed"):
            expected = after[server_id]["checks"][result]
            if before[server_id]["checks"][result] != expected:
                return False
            labels = {"server": server_id, "region": region, "result": result}
            assert value(samples, "lbd_server_checks_total", **labels) == expected
    return True


@pytest.fixture
def one_backend() -> Iterator[Backend]:
    with backends("s1") as started:
        yield started[0]


def test_metrics_after_known_traffic_on_socket_and_tcp(tmp_path: Path, one_backend: Backend) -> None:
    config = tmp_path / "lbd.toml"
    config.write_text("[health]\ninterval_ms = 100\ntimeout_ms = 80\n")
    args = ["--config", str(config), "--metrics-listen", "127.0.0.1:0"]
    with running_lbd(args, entries=[one_backend.entry(capacity=10)]) as lbd:
        for _ in range(3):
            assert proxied(lbd, "/echo") == (200, "s1")
        assert proxied(lbd, "/status/404") == (404, "s1")
        assert proxied(lbd, "/status/503") == (503, "s1")
        assert proxied(lbd, "/echo", client=None)[0] == 400  # lbd's own answer: no server involved
        wait_until(lambda: lbd.get("/v1/status")["clients"]["connections"] == 0)
        # one keep-alive client stays connected
        held = http.client.HTTPConnection("127.0.0.1", lbd.port, timeout=10)
        held.request("GET", "/echo", headers={"client-id": "alice"})
        held.getresponse().read()

        samples = scrape(lbd)
        s1 = {"server": "s1", "region": "us-east"}
        assert value(samples, "lbd_requests_total") == 7
        assert {c: value(samples, "lbd_responses_total", **{"class": c}) for c in CLASSES} == {
            "1xx": 0, "2xx": 4, "3xx": 0, "4xx": 2, "5xx": 1,
        }  # fmt: skip
        assert value(samples, "lbd_server_requests_total", **s1) == 6
        assert {c: value(samples, "lbd_server_responses_total", **s1, **{"class": c}) for c in CLASSES} == {
            "1xx": 0, "2xx": 4, "3xx": 0, "4xx": 1, "5xx": 1,
        }  # fmt: skip
        assert value(samples, "lbd_server_errors_total", **s1) == 1  # the 503
        # every request got response headers: one latency observation each
        assert value(samples, "lbd_server_upstream_latency_seconds_count", **s1) == 6
        assert value(samples, "lbd_server_upstream_latency_seconds_bucket", **s1, le="+Inf") == 6
        assert 0 < value(samples, "lbd_server_upstream_latency_seconds_sum", **s1) < 6.0
        name = "lbd_server_upstream_latency_seconds_bucket"
        bounds = [value(samples, name, **s1, le=str(bound)) for bound in LATENCY_BUCKETS_S]
        assert bounds == sorted(bounds) and bounds[-1] == 6  # cumulative; loopback answers in under 10 s
        assert value(samples, "lbd_server_active_requests", **s1) == 0
        assert value(samples, "lbd_server_capacity", **s1) == 10
        assert value(samples, "lbd_server_health", **s1, state="healthy") == 1
        for state in ("failing", "cooldown", "degraded"):
            assert value(samples, "lbd_server_health", **s1, state=state) == 0
        assert value(samples, "lbd_server_up", **s1) == 1
        assert value(samples, "lbd_server_draining", **s1) == 0
        assert value(samples, "lbd_server_ejections_total", **s1) == 0
        assert value(samples, "lbd_client_connections") == 1
        assert value(samples, "lbd_mode", mode="static") == 1
        assert value(samples, "lbd_mode", mode="dynamic") == 0
        assert value(samples, "lbd_servers") == 1
        assert value(samples, "lbd_retries_total") == 0
        assert value(samples, "lbd_failovers_total") == 0
        assert value(samples, "lbd_sessions") == 0  # static mode keeps no sessions
        assert value(samples, "process_resident_memory_bytes") > 0
        wait_until(lambda: lbd.servers()["s1"]["checks"]["passed"] >= 2)
        wait_until(lambda: checks_agree(lbd, ("s1",)))
        held.close()

        # the TCP listener: the same metrics, and nothing else
        status = lbd.get("/v1/status")
        address = status["listeners"]["metrics"]
        assert address.startswith("127.0.0.1:") and not address.endswith(":0")
        code, content_type, text = tcp_get(address, "/metrics")
        assert code == 200 and content_type.startswith("text/plain")
        over_tcp = parse(text)
        assert value(over_tcp, "lbd_requests_total") == 7
        assert value(over_tcp, "lbd_server_upstream_latency_seconds_count", **s1) == 6
        assert tcp_get(address, "/v1/status")[0] == 404
        assert tcp_get(address, "/v1/servers")[0] == 404


def test_failover_ejection_and_sessions(tmp_path: Path) -> None:
    config = tmp_path / "lbd.toml"
    # a long cooldown keeps the ejected server in `cooldown` (not probed, so not `degraded`)
    config.write_text("max_sessions = 2\n[health]\ninterval_ms = 100\ntimeout_ms = 80\ncooldown_ms = 60000\n")
    with (
        backends("us1", "us2") as (us1, us2),
        running_lbd(["--mode", "dynamic", "--config", str(config)]) as lbd,
    ):
        assert lbd.request("POST", "/v1/servers", us1.entry())[0] == 201
        assert proxied(lbd, "/echo", "alice", "us-east") == (200, "us1")
        assert lbd.request("POST", "/v1/servers", us2.entry())[0] == 201
        assert proxied(lbd, "/echo", "alice", "us-east") == (200, "us1")  # sticky
        us1.stop()
        assert proxied(lbd, "/echo", "alice", "us-east") == (200, "us2")  # failed over, re-pinned
        assert proxied(lbd, "/echo", "bob", "us-east") == (200, "us2")
        assert proxied(lbd, "/echo", "carol", "us-east") == (200, "us2")  # the table is full: alice evicted

        samples = scrape(lbd)
        status = lbd.get("/v1/status")
        first = {"server": "us1", "region": "us-east"}
        second = {"server": "us2", "region": "us-east"}
        assert value(samples, "lbd_mode", mode="dynamic") == 1
        assert value(samples, "lbd_failovers_total") == 1
        # one retry on the backup, plus one on a fresh connection if the pooled one to us1 was reused
        retries = value(samples, "lbd_retries_total")
        assert retries == status["requests"]["retries"] and retries in (1, 2)
        assert value(samples, "lbd_server_requests_total", **first) == 2 + retries
        assert value(samples, "lbd_server_errors_total", **first) == 1
        assert value(samples, "lbd_server_responses_total", **first, **{"class": "2xx"}) == 2
        assert value(samples, "lbd_server_upstream_latency_seconds_count", **first) == 2
        assert value(samples, "lbd_server_ejections_total", **first) == 1
        assert value(samples, "lbd_server_health", **first, state="cooldown") == 1
        assert value(samples, "lbd_server_health", **first, state="healthy") == 0
        assert value(samples, "lbd_server_up", **first) == 0
        assert value(samples, "lbd_server_requests_total", **second) == 3
        assert value(samples, "lbd_server_responses_total", **second, **{"class": "2xx"}) == 3
        assert value(samples, "lbd_server_upstream_latency_seconds_count", **second) == 3
        assert value(samples, "lbd_server_ejections_total", **second) == 0
        assert value(samples, "lbd_server_up", **second) == 1
        assert value(samples, "lbd_sessions") == 2
        assert value(samples, "lbd_sessions_evicted_total") == 1
        assert value(samples, "lbd_sessions_expired_total") == 0
        assert value(samples, "lbd_requests_total") == 5
        assert value(samples, "lbd_responses_total", **{"class": "2xx"}) == 5
        wait_until(lambda: checks_agree(lbd, ("us1", "us2")))
        assert "metrics" not in status["listeners"]  # no TCP listener unless asked


def test_histogram_buckets_follow_le_and_registry_is_private() -> None:
    """In process: a value equal to a bound counts in that bucket; beyond the last only in +Inf."""
    spec = ServerSpec("a", "http", "127.0.0.1", 1, "us-east", 4)
    registry = Registry({"us-east": 10}, None, [spec])
    sessions = SessionTable(60, 10)
    balancer = Balancer(registry, "static", Regions(), sessions, None)
    loop = asyncio.new_event_loop()
    try:
        proxy = ProxyContext(loop, registry, balancer, Config())
        server = registry.get("a")
        assert server is not None
        for latency in (0.001, 0.0011, 0.25, 20.0):
            registry.record_outcome(server, Outcome.OK, latency, monotonic())
        registry.record_outcome(server, Outcome.CONNECT_FAILED, None, monotonic())  # no response: no observation
        proxy.count_response(200, server)
        proxy.count_response(502, server)
        proxy.count_response(400, None)
        collectors = metrics_registry(registry, balancer, sessions, proxy)
        samples = parse(generate_latest(collectors).decode())
    finally:
        loop.close()
    labels = {"server": "a", "region": "us-east"}

    def bucket(le: str) -> float:
        return value(samples, "lbd_server_upstream_latency_seconds_bucket", **labels, le=le)

    assert bucket("0.001") == 1
    assert bucket("0.0025") == 2
    assert bucket("0.25") == 3
    assert bucket("10.0") == 3
    assert bucket("+Inf") == 4
    assert value(samples, "lbd_server_upstream_latency_seconds_sum", **labels) == pytest.approx(20.2521)
    assert value(samples, "lbd_server_responses_total", **labels, **{"class": "2xx"}) == 1
    assert value(samples, "lbd_server_responses_total", **labels, **{"class": "5xx"}) == 1
    assert value(samples, "lbd_server_responses_total", **labels, **{"class": "4xx"}) == 0
    assert value(samples, "lbd_responses_total", **{"class": "4xx"}) == 1
    # nothing leaks into prometheus_client's global registry
    assert b"lbd_" not in generate_latest(REGISTRY)


def test_metrics_listen_is_a_config_key(tmp_path: Path) -> None:
    path = tmp_path / "lbd.toml"
    path.write_text('metrics_listen = "127.0.0.1:9180"\n')
    config = load_config(path, {})
    assert config.metrics_listen is not None and str(config.metrics_listen) == "127.0.0.1:9180"
    assert load_config(path, {"metrics_listen": "[::1]:0"}).metrics_listen is not None
    assert Config().metrics_listen is None


@given(st.one_of(st.sampled_from(LATENCY_BUCKETS_S), st.floats(min_value=0, max_value=100, allow_nan=False)))
def test_a_latency_counts_in_the_bucket_whose_bound_is_the_first_not_below_it(latency_s: float) -> None:
    assert latency_bucket(latency_s) == bisect_left(LATENCY_BUCKETS_S, latency_s)


@given(st.lists(st.integers(min_value=100, max_value=599)))
def test_responses_are_counted_by_the_hundred_of_their_status(statuses: list[int]) -> None:
    counts = StatusCounts()
    for status in statuses:
        counts.add(status)
    assert counts.counts() == [sum(1 for s in statuses if s // 100 == c) for c in range(1, 6)]
