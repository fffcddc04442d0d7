"""What every client connection of the proxy shares: routing, the upstream pool, deadlines, the
settings in force, and the counters the metrics read."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final

from lbd.accesslog_writer import AccessLog
from lbd.balancer import Balancer
from lbd.config import ClientLimits, Config
from lbd.models import Server, StatusCounts
from lbd.proxy.deadlines import DeadlineWheel
from lbd.proxy.headers import DROP, REQUEST_HEADERS, REQUEST_KINDS, FieldKinds
from lbd.proxy.pool import UpstreamPool
from lbd.registry import Registry

if TYPE_CHECKING:
    from lbd.proxy.client import ClientConnection
    from lbd.store.session_sync import SessionSync

STATUS_CLASSES: Final = ("1xx", "2xx", "3xx", "4xx", "5xx")
# Why lbd refused a client (the `reason` label of lbd_client_rejections_total)
REJECTIONS: Final = (
    "too_many_connections",
    "header_timeout",
    "request_line_too_long",
    "headers_too_large",
    "too_many_headers",
    "body_too_large",
    "malformed",
    "unsupported",
)


class ClientBounds:
    """The client limits a connection checks per request, as plain compiled attributes (the config's
    dataclass is interpreted: each of its attribute reads is a dictionary lookup)."""

    __slots__ = ("max_body_bytes", "max_connections", "max_header_bytes", "max_headers", "max_request_line_bytes")

    def __init__(self, limits: ClientLimits) -> None:
        self.max_connections = limits.max_connections
        self.max_request_line_bytes = limits.max_request_line_bytes
        self.max_header_bytes = limits.max_header_bytes
        self.max_headers = limits.max_headers
        self.max_body_bytes = limits.max_body_bytes


class ProxyContext:
    """What every connection shares: routing, the upstream pool, timeouts and counters."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        registry: Registry,
        balancer: Balancer,
        config: Config,
    ) -> None:
        self.loop = loop
        self.registry = registry
        self.balancer = balancer
        self.pool = UpstreamPool(loop)
        self.deadlines = DeadlineWheel(loop)
        self.connections: set[ClientConnection] = set()
        self.shared: SessionSync | None = None  # set when lbd is part of a cluster
        self.access_log: AccessLog | None = None  # set by the daemon; entries go to it while it is on
        self.stopping = False  # the proxy is cutting what a graceful stop left (the access log says so)
        self.requests_total = 0
        self.retries = 0
        self.failovers = 0
        self.responses = StatusCounts()  # by class, as STATUS_CLASSES: named at scrape time
        self.rejections: dict[str, int] = dict.fromkeys(REJECTIONS, 0)
        self.apply(config)

    def apply(self, config: Config) -> None:
        """Settings for what starts from now on (also on reload): a request in flight keeps the
        upstream timeout it started with, an open connection the limits it was accepted with."""
        self.limits = ClientBounds(config.limits)
        self.client_header_timeout_s = config.limits.header_timeout_ms / 1000.0
        self.client_idle_timeout_s = config.limits.keepalive_timeout_ms / 1000.0
        # a client silent this long mid-request, or not reading its response, is cut (nginx's
        # client_body_timeout / send_timeout)
        self.client_timeout_s = config.client_timeout_ms / 1000.0
        self.retry_body_limit = config.retry_body_limit_bytes  # request bytes kept to replay a failed attempt
        self.non_idempotent_reuse_s = config.non_idempotent_reuse_ms / 1000.0
        self.client_id_fallback = config.client_id_fallback  # for a request without client-id
        self.client_id_cookie = config.client_id_cookie.encode()
        self.pool.splice_responses(config.splice_responses)
        # with mutual TLS, the header carrying a client certificate's subject is lbd's to write: a
        # client's own copy is dropped, on every listener
        subject_header = config.tls.client_subject_header.lower().encode() if config.tls.client_ca else None
        self.request_kinds = (
            REQUEST_KINDS if subject_header is None else FieldKinds({**REQUEST_HEADERS, subject_header: DROP})
        )
        # the config's `timeout_base + region latency`, looked up once per region rather than per request
        self._timeouts = {region: config.upstream_timeout_s(region) for region in config.regions.latency_ms}
        self._timeout_base_s = config.timeout_base_ms / 1000.0

    def timeout_s(self, server: Server) -> float:
        """`timeout_base + latency of the server's region`, precomputed per region."""
        return self._timeouts.get(server.spec.region, self._timeout_base_s)

    def count_response(self, status: int, server: Server | None) -> None:
        """One response to a client, by status class; also the server's when one was chosen."""
        if 100 <= status < 600:
            self.responses.add(status)
            if server is not None:
                server.state.responses.add(status)
