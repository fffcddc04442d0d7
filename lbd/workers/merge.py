"""What a supervisor answers from its workers' answers (pure: JSON and Prometheus text in and out).

Every worker is a whole data plane with its own counters and its own health checks, so what the
admin API shows of traffic is summed over workers, and what it shows of health is the worst any
worker sees (a server one worker ejected is not fully in rotation). What the control plane holds
(servers, drain flags, mode, config, reloads, the audit counts, the cluster) is the supervisor's.
"""

from __future__ import annotations

import copy
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from lbd.models import Health

# worst last: a server's merged health is the highest of these any worker reports
HEALTH_ORDER: Final = (Health.HEALTHY.value, Health.DEGRADED.value, Health.FAILING.value, Health.COOLDOWN.value)
SUMMED_SERVER_FIELDS: Final = ("active", "requests", "errors", "ejections", "sessions")
SUMMED_CHECK_FIELDS: Final = ("passed", "failed", "passive_failures")


def worst_health(values: Iterable[str]) -> str:
    return max(values, key=lambda value: HEALTH_ORDER.index(value) if value in HEALTH_ORDER else len(HEALTH_ORDER))


def merge_servers(answers: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Each worker's `GET /v1/servers` list into one, in the first answer's order."""
    by_id: dict[str, list[Mapping[str, Any]]] = {}
    for servers in answers:
        for server in servers:
            by_id.setdefault(str(server["id"]), []).append(server)
    return [merge_server(views) for views in by_id.values()]


def merge_server(views: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One server as every worker sees it: counts summed, health the worst, the latest check."""
    merged = copy.deepcopy(dict(views[0]))
    for field in SUMMED_SERVER_FIELDS:
        if field in merged:
            merged[field] = sum(view.get(field, 0) for view in views)
    merged["health"] = worst_health(str(view["health"]) for view in views)
    merged["health_by_worker"] = [view["health"] for view in views]
    merged["in_rotation"] = all(view["in_rotation"] for view in views)
    merged["latency_ewma_ms"] = round(statistics.fmean(view["latency_ewma_ms"] for view in views), 3)
    merged["cooldown_remaining_s"] = max(view["cooldown_remaining_s"] for view in views)
    latest = max(views, key=lambda view: view["checks"]["last_at"] or 0)
    checks = dict(latest["checks"])
    for field in SUMMED_CHECK_FIELDS:
        checks[field] = sum(view["checks"][field] for view in views)
    merged["checks"] = checks
    transitioned = max(views, key=lambda view: view["last_transition_at"] or 0)
    merged["last_transition_at"] = transitioned["last_transition_at"]
    merged["last_transition_reason"] = transitioned["last_transition_reason"]
    if "latency_factor" in merged:  # the dynamic score, with the summed load
        load = merged["sessions"] + merged["active"] + 1
        merged["score"] = round(merged["latency_factor"] * load / merged["capacity"], 4)
    return merged


def servers_summary(servers: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """`/v1/status`'s server counts, from merged servers (lbd/admin/views.py's, for one process)."""
    by_health = Counter(str(server["health"]) for server in servers)
    return {
        "total": len(servers),
        "in_rotation": sum(1 for server in servers if server["in_rotation"]),
        "by_health": {health: by_health.get(health, 0) for health in HEALTH_ORDER},
    }


def sum_counts(parts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Nested counters added key by key (`{"responses": {"2xx": 3}}` and the like)."""
    total: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, Mapping):
                total[key] = sum_counts([total.get(key, {}), value])
            elif isinstance(value, int | float) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value
    return total


def merge_sessions(answers: Sequence[Mapping[str, Any]], limit: int) -> dict[str, Any]:
    """`GET /v1/sessions` of every worker: each client once (its most recent view), counts summed (a
    client a worker's cache and another's both hold counts in each)."""
    newest: dict[str, dict[str, Any]] = {}
    for answer in answers:
        for row in answer["sessions"]:
            seen = newest.get(row["client_id"])
            if seen is None or row["idle_s"] < seen["idle_s"]:
                newest[row["client_id"]] = dict(row)
    rows = sorted(newest.values(), key=lambda row: row["idle_s"])[:limit]
    return {
        "sessions": rows,
        "matched": sum(answer["matched"] for answer in answers),
        "total": sum(answer["total"] for answer in answers),
    }


# --- Prometheus ------------------------------------------------------------------------------------

# what the control plane holds: the supervisor's own figures, never summed over workers
CONTROL_FAMILIES: Final = frozenset(
    {
        "lbd_mode",
        "lbd_servers",
        "lbd_admin_changes",
        "lbd_config_reloads",
        "lbd_config_last_reload_successful",
        "lbd_tls_certificate_expiry_seconds",
    }
)
CONTROL_PREFIXES: Final = ("lbd_cluster_",)
# families where a sum over workers means nothing: how to combine them instead
SAME_IN_EVERY_WORKER: Final = frozenset({"lbd_server_capacity", "lbd_server_draining", "process_max_fds"})
LOWEST: Final = frozenset({"lbd_server_up", "process_start_time_seconds"})
MEAN: Final = frozenset({"lbd_server_latency_ewma_seconds"})


def is_control_family(name: str) -> bool:
    return name in CONTROL_FAMILIES or name.startswith(CONTROL_PREFIXES)


def merge_metrics(supervisor: str, workers: Sequence[str], extra: Iterable[Metric] = ()) -> list[Metric]:
    """The supervisor's control-plane families and process figures, the workers' traffic families
    combined (summed, unless the family says otherwise), then `extra` (per-worker families)."""
    families: dict[str, Metric] = {}
    samples: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]] = {}
    sources = [(supervisor, True), *((text, False) for text in workers)]
    for text, from_supervisor in sources:
        for family in text_string_to_metric_families(text):
            control = is_control_family(family.name)
            if control != from_supervisor and not family.name.startswith("process_"):
                continue  # traffic from workers only, control from the supervisor only
            families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            bucket = samples.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                bucket.setdefault(key, []).append(sample.value)
    merged: list[Metric] = []
    for name, family in families.items():
        if name == "lbd_server_health":
            _add_worst_health(family, samples[name])
        else:
            for (sample_name, labels), values in samples[name].items():
                family.add_sample(sample_name, dict(labels), _combine(name, values))
        merged.append(family)
    return [*merged, *extra]


def requests_total(text: str) -> float:
    """A worker's `lbd_requests_total`, for the per-worker series (0 when it did not answer)."""
    for family in text_string_to_metric_families(text):
        if family.name == "lbd_requests":
            return sum(sample.value for sample in family.samples if sample.name == "lbd_requests_total")
    return 0.0


def _combine(family: str, values: list[float]) -> float:
    if family in SAME_IN_EVERY_WORKER:
        return values[0]
    if family in LOWEST:
        return min(values)
    if family in MEAN:
        return statistics.fmean(values)
    return sum(values)


def _add_worst_health(family: Metric, samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], list[float]]) -> None:
    """`lbd_server_health{state}` is one-hot per server: 1 for the worst state any worker reports."""
    states: dict[tuple[tuple[str, str], ...], list[str]] = {}
    for (_, labels), values in samples.items():
        state = dict(labels)["state"]
        server = tuple((key, value) for key, value in labels if key != "state")
        reported = states.setdefault(server, [])
        reported += [state] * sum(1 for value in values if value == 1)
    for server, reported in states.items():
        worst = worst_health(reported) if reported else Health.HEALTHY.value
        for state in HEALTH_ORDER:
            family.add_sample(family.name, {**dict(server), "state": state}, 1.0 if state == worst else 0.0)
