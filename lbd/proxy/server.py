"""The proxy listener: shared context of all client connections, start and graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import time

from lbd.balancer import Balancer
from lbd.config import Address, Config
from lbd.models import Server
from lbd.proxy.client import ClientConnection
from lbd.proxy.deadlines import DeadlineWheel
from lbd.proxy.upstream import UpstreamPool
from lbd.registry import Registry

STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
# Why lbd refused a client (the `reason` label of lbd_client_rejections_total)
REJECTIONS = (
    "too_many_connections",
    "header_timeout",
    "request_line_too_long",
    "headers_too_large",
    "too_many_headers",
    "body_too_large",
    "malformed",
)


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
        self.requests_total = 0
        self.retries = 0
        self.failovers = 0
        self.responses: dict[str, int] = dict.fromkeys(STATUS_CLASSES, 0)
        self.rejections: dict[str, int] = dict.fromkeys(REJECTIONS, 0)
        self.apply(config)

    def apply(self, config: Config) -> None:
        """Settings for what starts from now on (also on reload): a request in flight keeps the
        upstream timeout it started with, an open connection the limits it was accepted with."""
        self.limits = config.limits
        self.client_header_timeout_s = config.limits.header_timeout_ms / 1000.0
        self.client_idle_timeout_s = config.limits.keepalive_timeout_ms / 1000.0
        # a client silent this long mid-request, or not reading its response, is cut (nginx's
        # client_body_timeout / send_timeout)
        self.client_timeout_s = config.client_timeout_ms / 1000.0
        self.retry_body_limit = config.retry_body_limit_bytes  # request bytes kept to replay a failed attempt
        # the config's `timeout_base + region latency`, looked up once per region rather than per request
        self._timeouts = {region: config.upstream_timeout_s(region) for region in config.regions.latency_ms}
        self._timeout_base_s = config.timeout_base_ms / 1000.0

    def timeout_s(self, server: Server) -> float:
        """`timeout_base + latency of the server's region`, precomputed per region."""
        return self._timeouts.get(server.spec.region, self._timeout_base_s)

    def count_response(self, status: int, server: Server | None) -> None:
        """One response to a client, by status class; also the server's when one was chosen."""
        if 100 <= status < 600:
            index = status // 100 - 1
            self.responses[STATUS_CLASSES[index]] += 1
            if server is not None:
                server.state.responses[index] += 1


class ProxyServer:
    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.address: Address | None = None

    async def start(self, listen: Address) -> Address:
        """Bind and serve; returns the bound address (port 0 becomes the kernel's choice)."""
        loop = self.ctx.loop
        self._server = await loop.create_server(
            lambda: ClientConnection(self.ctx), listen.host, listen.port, backlog=4096, reuse_address=True
        )
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = Address(host, port)
        self._sweeper = loop.create_task(self._sweep())
        return self.address

    async def _sweep(self) -> None:
        """Close idle keep-alive clients and stale upstream connections, once a second at most."""
        pool = self.ctx.pool
        while True:
            await asyncio.sleep(min(1.0, self.ctx.client_idle_timeout_s / 4, pool.idle_timeout_s / 4))
            cutoff = self.ctx.loop.time() - self.ctx.client_idle_timeout_s
            for connection in [c for c in self.ctx.connections if c.idle and c.idle_since < cutoff]:
                connection.close()
            pool.close_idle(older_than_s=pool.idle_timeout_s)

    async def stop(self, grace_s: float) -> None:
        """Stop accepting, let requests in flight finish for up to `grace_s`, then cut the rest."""
        if self._server is not None:
            self._server.close()
        for connection in list(self.ctx.connections):
            connection.shutdown()
        deadline = time.monotonic() + grace_s
        while self.ctx.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for connection in list(self.ctx.connections):
            connection.abort()
        self.ctx.pool.close_idle()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
