"""The proxy listener: start, idle sweeps and graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import cast

from lbd.config import Address
from lbd.proxy import client as client_module
from lbd.proxy.client import ClientConnection
from lbd.proxy.context import ProxyContext

# "compiled" when setup.py built the per-request modules with mypyc, else "interpreted" (same code, slower)
DATA_PLANE = "interpreted" if (client_module.__file__ or "").endswith(".py") else "compiled"


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
            lambda: cast(asyncio.Protocol, ClientConnection(self.ctx)),
            listen.host,
            listen.port,
            backlog=4096,
            reuse_address=True,
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
            self._server = None
        for connection in list(self.ctx.connections):
            connection.shutdown()
        deadline = time.monotonic() + grace_s
        while self.ctx.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.close()

    async def close(self) -> None:
        """Stop at once: no more accepting, every connection cut, the sweeper ended (idempotent)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for connection in list(self.ctx.connections):
            connection.abort()
        self.ctx.pool.close_idle()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
