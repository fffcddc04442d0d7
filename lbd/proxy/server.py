"""The proxy listener: start, idle sweeps and graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, cast

from lbd.config import Address
from lbd.proxy import client as client_module
from lbd.proxy.client import ClientConnection
from lbd.proxy.context import ProxyContext

# "compiled" when setup.py built the per-request modules with mypyc, else "interpreted" (same code, slower)
DATA_PLANE = "interpreted" if (client_module.__file__ or "").endswith(".py") else "compiled"
# A TLS connection being closed waits this long at most for the client's close_notify (uvloop's
# default is 30 s, which would keep a closed connection counted against max_connections).
TLS_SHUTDOWN_TIMEOUT_S = 5.0
LISTEN_BACKLOG = 4096


class ProxyServer:
    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None
        self.address: Address | None = None  # the plain listener's, once bound
        self.tls_address: Address | None = None  # the TLS listener's, once bound

    async def start(self, listen: Address | socket.socket) -> Address:
        """Serve plain HTTP on `listen` (bound here; or a socket bound already: a worker's, handed
        down by its supervisor); returns the bound address (port 0 becomes the kernel's choice)."""
        server = await self.ctx.loop.create_server(
            lambda: cast(asyncio.Protocol, ClientConnection(self.ctx)), **_where(listen)
        )
        self.address = self._serving(server)
        return self.address

    async def start_tls(
        self, listen: Address | socket.socket, context: ssl.SSLContext, lines: Callable[[asyncio.BaseTransport], bytes]
    ) -> Address:
        """Bind and serve HTTPS with `context` (its SNI callback picks each handshake's certificate).
        The handshake counts against the header timeout: each connection's deadline runs from its
        accept, and a handshake not done by then is cut (the limit as it is when the listener starts)."""
        server = await self.ctx.loop.create_server(
            lambda: cast(asyncio.Protocol, ClientConnection(self.ctx, lines)),
            **_where(listen),
            ssl=context,
            ssl_handshake_timeout=self.ctx.client_header_timeout_s,
            ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT_S,
        )
        self.tls_address = self._serving(server)
        return self.tls_address

    def _serving(self, server: asyncio.Server) -> Address:
        self._servers.append(server)
        if self._sweeper is None:
            self._sweeper = self.ctx.loop.create_task(self._sweep())
        host, port = server.sockets[0].getsockname()[:2]
        return Address(host, port)

    async def _sweep(self) -> None:
        """Close idle keep-alive clients and stale upstream connections, once a second at most."""
        pool = self.ctx.pool
        while True:
            await asyncio.sleep(min(1.0, self.ctx.client_idle_timeout_s / 4, pool.idle_timeout_s / 4))
            cutoff = time.monotonic() - self.ctx.client_idle_timeout_s
            for connection in [c for c in self.ctx.connections if c.idle and c.idle_since < cutoff]:
                connection.close()
            pool.close_idle(older_than_s=pool.idle_timeout_s)

    async def stop(self, grace_s: float) -> None:
        """Stop accepting, let requests in flight finish for up to `grace_s`, then cut the rest."""
        self._stop_accepting()
        for connection in list(self.ctx.connections):
            connection.shutdown()
        deadline = time.monotonic() + grace_s
        while self.ctx.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.close()

    async def close(self) -> None:
        """Stop at once: no more accepting, every connection cut, the sweeper ended (idempotent)."""
        self._stop_accepting()
        self.ctx.stopping = True
        for connection in list(self.ctx.connections):
            connection.abort()
        self.ctx.pool.close_idle()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    def _stop_accepting(self) -> None:
        for server in self._servers:
            server.close()
        self._servers.clear()


def _where(listen: Address | socket.socket) -> dict[str, Any]:
    """create_server's arguments for an address to bind, or for a socket bound already."""
    if isinstance(listen, socket.socket):
        return {"sock": listen, "backlog": LISTEN_BACKLOG}
    return {"host": listen.host, "port": listen.port, "backlog": LISTEN_BACKLOG, "reuse_address": True}
