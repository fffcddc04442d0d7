"""The supervisor's merges of its workers' answers (lbd/workers/merge.py): pure, no processes."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from lbd.workers import merge
from tests.harness.metrics import parse, value

HEALTHS = ("healthy", "degraded", "failing", "cooldown")


def server_view(**overrides: Any) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": "s1", "url": "http://10.0.0.1:80", "region": "us-east", "capacity": 10,
        "health": "healthy", "in_rotation": True, "draining": False,
        "active": 1, "requests": 10, "errors": 1, "latency_ewma_ms": 2.0,
        "checks": {"last_at": 100.0, "last_ok": True, "last_detail": "200", "passed": 5, "failed": 0,
                   "consecutive_failures": 0, "consecutive_passes": 5, "passive_failures": 0},
        "cooldown_remaining_s": 0.0, "ejections": 0, "last_transition_at": None, "last_transition_reason": None,
        "score": 0.3, "sessions": 1, "latency_factor": 1.0,
    }  # fmt: skip
    view.update(overrides)
    return view


def test_a_server_seen_by_two_workers_sums_its_traffic_and_shows_the_worst_health() -> None:
    late_check = {**server_view()["checks"], "last_at": 200.0, "last_ok": False, "last_detail": "refused"}
    merged = merge.merge_server(
        [server_view(), server_view(health="cooldown", in_rotation=False, active=2, checks=late_check)]
    )
    assert (merged["active"], merged["requests"], merged["errors"], merged["sessions"]) == (3, 20, 2, 2)
    assert merged["health"] == "cooldown" and merged["health_by_worker"] == ["healthy", "cooldown"]
    assert merged["in_rotation"] is False
    assert merged["checks"]["last_detail"] == "refused" and merged["checks"]["passed"] == 10
    assert merged["score"] == round(1.0 * (2 + 3 + 1) / 10, 4)


@given(st.lists(st.sampled_from(HEALTHS), min_size=1, max_size=8))
def test_the_worst_health_is_the_least_serving_one_reported(reported: list[str]) -> None:
    worst = merge.worst_health(reported)
    assert worst in reported
    assert all(merge.HEALTH_ORDER.index(worst) >= merge.HEALTH_ORDER.index(h) for h in reported)


@given(st.integers(1, 6), st.integers(0, 1000), st.integers(0, 50))
def test_n_identical_workers_merge_to_n_times_the_counts(workers: int, requests: int, active: int) -> None:
    merged = merge.merge_servers([[server_view(requests=requests, active=active)]] * workers)
    assert len(merged) == 1
    assert merged[0]["requests"] == workers * requests and merged[0]["active"] == workers * active
    assert merged[0]["latency_ewma_ms"] == 2.0


def test_status_counts_add_up_key_by_key() -> None:
    parts = [{"total": 3, "responses": {"2xx": 2, "5xx": 1}}, {"total": 4, "responses": {"2xx": 4}}]
    assert merge.sum_counts(parts) == {"total": 7, "responses": {"2xx": 6, "5xx": 1}}


def test_sessions_list_each_client_once_with_its_freshest_view() -> None:
    a = {"sessions": [{"client_id": "x", "server": "s1", "idle_s": 5.0}], "matched": 1, "total": 1}
    b = {"sessions": [{"client_id": "x", "server": "s1", "idle_s": 1.0}, {"client_id": "y", "server": "s2",
         "idle_s": 3.0}], "matched": 2, "total": 2}  # fmt: skip
    merged = merge.merge_sessions([a, b], limit=10)
    assert [(row["client_id"], row["idle_s"]) for row in merged["sessions"]] == [("x", 1.0), ("y", 3.0)]
    assert merge.merge_sessions([a, b], limit=1)["sessions"] == [merged["sessions"][0]]


SUPERVISOR = """\
# TYPE lbd_servers gauge
lbd_servers 3.0
# TYPE lbd_requests_total counter
lbd_requests_total 0.0
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 100.0
# TYPE process_start_time_seconds gauge
process_start_time_seconds 50.0
"""


def worker_text(requests: int, health: str, up: int, started: float) -> str:
    one_hot = "\n".join(
        f'lbd_server_health{{region="us-east",server="s1",state="{state}"}} {1.0 if state == health else 0.0}'
        for state in HEALTHS
    )
    return f"""\
# TYPE lbd_servers gauge
lbd_servers 3.0
# TYPE lbd_requests_total counter
lbd_requests_total {requests}
# TYPE lbd_server_up gauge
lbd_server_up{{region="us-east",server="s1"}} {up}
# TYPE lbd_server_health gauge
{one_hot}
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 1000.0
# TYPE process_start_time_seconds gauge
process_start_time_seconds {started}
"""


def rendered(families: list[Any]) -> dict[Any, float]:
    class Fixed(Collector):
        def collect(self) -> list[Any]:
            return families

    registry = CollectorRegistry()
    registry.register(Fixed())
    return parse(generate_latest(registry).decode())


def test_metrics_sum_traffic_keep_the_control_plane_and_show_the_worst_health() -> None:
    families = merge.merge_metrics(SUPERVISOR, [worker_text(7, "healthy", 1, 60.0), worker_text(5, "failing", 0, 70.0)])
    samples = rendered(families)
    assert value(samples, "lbd_requests_total") == 12  # traffic: the workers', summed
    assert value(samples, "lbd_servers") == 3  # control: the supervisor's, once
    assert value(samples, "lbd_server_up", region="us-east", server="s1") == 0  # up only where all are
    health = {s: value(samples, "lbd_server_health", region="us-east", server="s1", state=s) for s in HEALTHS}
    assert health == {"healthy": 0, "degraded": 0, "failing": 1, "cooldown": 0}
    assert value(samples, "process_resident_memory_bytes") == 2100  # every process of this lbd
    assert value(samples, "process_start_time_seconds") == 50  # the oldest: the supervisor's
    assert merge.requests_total(worker_text(7, "healthy", 1, 1.0)) == 7
