"""Prometheus exposition: a collector that reads lbd's own counters when scraped.

The proxy never touches prometheus_client: it keeps plain integers (in `ServerState`, `ProxyContext`
and `SessionTable`) that cost a list index increment per request, and this collector turns them into
metric families only when `/metrics` is fetched. prometheus_client's own Counter and Histogram take a
lock per update, which the hot path cannot afford.

Served on the admin socket (`GET /metrics`, next to the /v1 API) and, with `metrics_listen`, by a
separate TCP app that serves nothing else. Names follow HAProxy's and Envoy's exporters with an
`lbd_` prefix; every per-server series carries `server` and `region` labels.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from lbd.audit import ACTIONS, AuditTrail
from lbd.balancer import Balancer
from lbd.config import MODES
from lbd.models import LATENCY_BUCKETS_S, Health
from lbd.proxy.context import STATUS_CLASSES, ProxyContext
from lbd.registry import Registry
from lbd.reload import ReloadStats
from lbd.sessions import SessionTable
from lbd.tls import TlsTerminator


class ClusterFigures(Protocol):
    """What the metrics read of a cluster membership (lbd/store/cluster.py's Cluster)."""

    peers: list[dict[str, object]]
    applied: int
    joined: int
    claims: dict[str, int]
    claim_round_trips: int

    @property
    def connected(self) -> bool: ...

    @property
    def pins_dropped(self) -> int: ...

    @property
    def pending_pins(self) -> int: ...


SERVER_LABELS = ("server", "region")
BUCKET_BOUNDS = (*(repr(bound) for bound in LATENCY_BUCKETS_S), "+Inf")


def counts_by(name: str, documentation: str, label: str, counts: Mapping[str, int]) -> CounterMetricFamily:
    """A counter with one label: a sample per value, in the mapping's order."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in counts.items():
        family.add_metric([value], count)
    return family


class LbdCollector(Collector):
    """Reads the registry, the proxy's counters, the session table and the reloads at scrape time."""

    def __init__(
        self,
        registry: Registry,
        balancer: Balancer,
        sessions: SessionTable,
        proxy: ProxyContext,
        reloads: ReloadStats | None = None,
        audit: AuditTrail | None = None,
        cluster: ClusterFigures | None = None,
    ) -> None:
        self.registry = registry
        self.balancer = balancer
        self.sessions = sessions
        self.proxy = proxy
        self.reloads = reloads or ReloadStats()
        self.audit = audit or AuditTrail()
        self.cluster = cluster

    def collect(self) -> Iterator[Metric]:
        yield from self._global()
        yield from self._servers()
        if self.cluster is not None:
            yield from self._cluster(self.cluster)

    def _cluster(self, cluster: ClusterFigures) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "lbd_cluster_store_up", "1 while the cluster store answers, else 0.", value=float(cluster.connected)
        )
        yield GaugeMetricFamily(
            "lbd_cluster_peers", "Live instances of the cluster, this one included.", value=len(cluster.peers)
        )
        yield GaugeMetricFamily(
            "lbd_cluster_version", "The version of the last shared change applied here.", value=cluster.applied
        )
        yield CounterMetricFamily(
            "lbd_cluster_joins", "Times this instance (re)joined the store.", value=cluster.joined
        )
        yield GaugeMetricFamily(
            "lbd_cluster_pending_pins",
            "Sessions pinned here, waiting to be written to the store.",
            value=cluster.pending_pins,
        )
        yield CounterMetricFamily(
            "lbd_cluster_pins_dropped",
            "Pending pins dropped because the store was away too long.",
            value=cluster.pins_dropped,
        )
        yield counts_by(
            "lbd_cluster_claims",
            "New clients' pins: won (ours stored), adopted (another instance's), local (store away or slow).",
            "result",
            cluster.claims,
        )
        yield CounterMetricFamily(
            "lbd_cluster_claim_round_trips",
            "Round trips that carried new clients' claims (those of one event-loop turn share one).",
            value=cluster.claim_round_trips,
        )

    def _global(self) -> Iterator[Metric]:
        proxy, sessions = self.proxy, self.sessions
        mode = GaugeMetricFamily("lbd_mode", "Routing mode: 1 for the current one.", labels=["mode"])
        for each in MODES:
            mode.add_metric([each], 1.0 if self.balancer.mode == each else 0.0)
        yield mode
        yield CounterMetricFamily("lbd_requests", "Requests received from clients.", value=proxy.requests_total)
        yield counts_by(
            "lbd_responses",
            "Responses sent to clients by status class (lbd's own errors included).",
            "class",
            dict(zip(STATUS_CLASSES, proxy.responses.counts(), strict=True)),
        )
        yield CounterMetricFamily(
            "lbd_retries", "Upstream attempts made again (on a backup, or on a fresh connection).", value=proxy.retries
        )
        yield CounterMetricFamily("lbd_failovers", "Failed attempts retried on a backup server.", value=proxy.failovers)
        pipe = proxy.pool.pipe
        yield CounterMetricFamily(
            "lbd_spliced_bytes",
            "Response body bytes moved from servers to clients inside the kernel (splice_responses).",
            value=0 if pipe is None else pipe.moved,
        )
        yield GaugeMetricFamily(
            "lbd_client_connections", "Open client connections to the proxy.", value=len(proxy.connections)
        )
        yield counts_by(
            "lbd_client_rejections",
            "Client connections or requests refused by a limit or for bad framing, by reason.",
            "reason",
            proxy.rejections,
        )
        access_log = proxy.access_log
        if access_log is not None:
            yield CounterMetricFamily("lbd_access_log_lines", "Access-log lines written.", value=access_log.lines)
            yield counts_by(
                "lbd_access_log_dropped",
                "Access-log lines dropped: buffer_full (the writer was too far behind), write_failed (the file "
                "refused them).",
                "reason",
                {"buffer_full": access_log.dropped_full, "write_failed": access_log.dropped_failed},
            )
        yield GaugeMetricFamily("lbd_sessions", "Live sticky sessions.", value=len(sessions))
        yield CounterMetricFamily(
            "lbd_sessions_evicted", "Sessions evicted because the table was full.", value=sessions.evicted
        )
        yield CounterMetricFamily("lbd_sessions_expired", "Sessions ended by inactivity.", value=sessions.expired)
        yield GaugeMetricFamily("lbd_servers", "Registered servers.", value=len(self.registry))
        yield counts_by(
            "lbd_admin_changes",
            "Changes made by operators (admin API, reloads, signals), by action.",
            "action",
            {action: self.audit.counts[action] for action in ACTIONS},
        )
        yield counts_by(
            "lbd_config_reloads",
            "Config reloads (lbctl reload, SIGHUP) by result.",
            "result",
            {"ok": self.reloads.succeeded, "failed": self.reloads.failed},
        )
        yield GaugeMetricFamily(
            "lbd_config_last_reload_successful",
            "0 when the last reload was refused (the running config is not the file's), else 1.",
            value=0.0 if self.reloads.last_ok is False else 1.0,
        )

    def _servers(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "lbd_server_requests", "Attempts forwarded to the server (retries included).", labels=SERVER_LABELS
        )
        responses = CounterMetricFamily(
            "lbd_server_responses",
            "Responses to clients by status class for requests sent to the server (lbd's 502/504 included).",
            labels=[*SERVER_LABELS, "class"],
        )
        errors = CounterMetricFamily(
            "lbd_server_errors",
            "Failed attempts: refused or reset connections, timeouts, malformed responses, 5xx answers.",
            labels=SERVER_LABELS,
        )
        latency = HistogramMetricFamily(
            "lbd_server_upstream_latency_seconds",
            "Time from sending the request to the server's response headers.",
            labels=SERVER_LABELS,
        )
        latency_ewma = GaugeMetricFamily(
            "lbd_server_latency_ewma_seconds", "The latency estimate dynamic mode scores by.", labels=SERVER_LABELS
        )
        active = GaugeMetricFamily("lbd_server_active_requests", "Requests in flight.", labels=SERVER_LABELS)
        capacity = GaugeMetricFamily(
            "lbd_server_capacity", "Declared capacity (concurrent requests).", labels=SERVER_LABELS
        )
        health = GaugeMetricFamily(
            "lbd_server_health", "Health state: 1 for the current one.", labels=[*SERVER_LABELS, "state"]
        )
        up = GaugeMetricFamily(
            "lbd_server_up", "1 when the server takes new requests (in rotation, not draining).", labels=SERVER_LABELS
        )
        draining = GaugeMetricFamily("lbd_server_draining", "1 while the server drains.", labels=SERVER_LABELS)
        checks = CounterMetricFamily(
            "lbd_server_checks", "Active health checks by result.", labels=[*SERVER_LABELS, "result"]
        )
        ejections = CounterMetricFamily(
            "lbd_server_ejections", "Times the server was taken out of rotation.", labels=SERVER_LABELS
        )
        for server in self.registry.servers():
            state = server.state
            labels = [server.id, server.spec.region]
            requests.add_metric(labels, state.requests)
            for name, count in zip(STATUS_CLASSES, state.responses.counts(), strict=True):
                responses.add_metric([*labels, name], count)
            errors.add_metric(labels, state.errors)
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip(BUCKET_BOUNDS, state.latency_buckets, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            latency.add_metric(labels, buckets, state.latency_sum_s)
            latency_ewma.add_metric(labels, state.latency_ewma_ms / 1000.0)
            active.add_metric(labels, state.active)
            capacity.add_metric(labels, server.spec.capacity)
            for value in Health:
                health.add_metric([*labels, value.value], 1.0 if state.health is value else 0.0)
            up.add_metric(labels, 1.0 if server.in_rotation else 0.0)
            draining.add_metric(labels, 1.0 if state.draining else 0.0)
            checks.add_metric([*labels, "passed"], state.checks_passed)
            checks.add_metric([*labels, "failed"], state.checks_failed)
            ejections.add_metric(labels, state.ejections)
        yield from (requests, responses, errors, latency, latency_ewma, active, capacity, health, up, draining)
        yield from (checks, ejections)


class TlsCollector(Collector):
    """The TLS listener's certificates (their expiry) and handshakes, read at scrape time."""

    def __init__(self, tls: TlsTerminator) -> None:
        self.tls = tls

    def collect(self) -> Iterator[Metric]:
        expiry = GaugeMetricFamily(
            "lbd_tls_certificate_expiry_seconds",
            "When the certificate expires (Unix time); `name` is its first subjectAltName.",
            labels=["file", "name"],
        )
        for certificate in self.tls.certificates.certificates:
            expiry.add_metric([str(certificate.file), certificate.names[0] if certificate.names else ""],
                              certificate.not_after)  # fmt: skip
        yield expiry
        handshakes = CounterMetricFamily(
            "lbd_tls_handshakes", "TLS handshakes completed, full or resumed (a session ticket).", labels=["resumed"]
        )
        handshakes.add_metric(["false"], self.tls.handshakes - self.tls.resumed)
        handshakes.add_metric(["true"], self.tls.resumed)
        yield handshakes


def metrics_registry(
    registry: Registry,
    balancer: Balancer,
    sessions: SessionTable,
    proxy: ProxyContext,
    reloads: ReloadStats | None = None,
    audit: AuditTrail | None = None,
    cluster: ClusterFigures | None = None,
    tls: TlsTerminator | None = None,
) -> CollectorRegistry:
    """A private registry (never prometheus_client's global one): lbd's collector plus process_* metrics."""
    collectors = CollectorRegistry()
    collectors.register(LbdCollector(registry, balancer, sessions, proxy, reloads, audit, cluster))
    if tls is not None:
        collectors.register(TlsCollector(tls))
    ProcessCollector(registry=collectors)
    return collectors


METRICS_REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)


async def get_metrics(request: web.Request) -> web.Response:
    """`GET /metrics`: the Prometheus text format."""
    body = generate_latest(request.app[METRICS_REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_metrics_route(app: web.Application, collectors: CollectorRegistry) -> None:
    app[METRICS_REGISTRY] = collectors
    app.router.add_get("/metrics", get_metrics)


def create_metrics_app(collectors: CollectorRegistry) -> web.Application:
    """The `metrics_listen` TCP app: `GET /metrics` and nothing else (read-only, so no token)."""
    app = web.Application()
    add_metrics_route(app, collectors)
    return app
