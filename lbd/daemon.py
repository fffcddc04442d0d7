"""The daemon: wires registry, balancer, proxy and admin API, and owns their lifetimes.

Three phases, as in uvicorn: startup (bind both listeners, or fail with a clear message), serve
until SIGTERM/SIGINT, shutdown (stop accepting, let requests in flight finish within the grace
period, remove the socket file).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from aiohttp import web

from lbd.admin.app import AdminState, create_admin_app
from lbd.admin.socket import bind_owner_only, remove_socket
from lbd.balancer import Balancer
from lbd.config import Config
from lbd.models import ServerSpec
from lbd.proxy.server import ProxyContext, ProxyServer
from lbd.registry import Registry

log = logging.getLogger("lbd")


class Daemon:
    def __init__(self, config: Config, seed: list[ServerSpec]) -> None:
        self.config = config
        self.registry = Registry(config.regions.latency_ms, seed)
        self.balancer = Balancer(self.registry, config.mode)
        self.started = asyncio.Event()
        self._stop = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        proxy_ctx = ProxyContext(
            loop, self.registry, self.balancer, config.timeout_base_ms, config.regions.latency_ms
        )
        proxy = ProxyServer(proxy_ctx)
        admin_sock, admin_inode = bind_owner_only(config.admin_socket)
        runner: web.AppRunner | None = None
        try:
            try:
                address = await proxy.start(config.listen)
            except OSError as exc:
                raise OSError(f"cannot listen on {config.listen}: {exc.strerror}") from None
            listeners = {"proxy": str(address), "admin": str(config.admin_socket)}
            app = create_admin_app(AdminState(self.registry, self.balancer, proxy_ctx, listeners, time.monotonic()))
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            await web.SockSite(runner, admin_sock).start()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self.request_stop)
            log.info(
                "proxy listening on http://%s (%s mode, %d servers); admin API on %s",
                address, self.balancer.mode, len(self.registry), config.admin_socket,
            )
            self.started.set()
            await self._stop.wait()
            log.info("stopping: finishing requests in flight (grace %d ms)", config.shutdown_grace_ms)
            await proxy.stop(config.shutdown_grace_ms / 1000.0)
        finally:
            if runner is not None:
                await runner.cleanup()
            admin_sock.close()
            remove_socket(config.admin_socket, admin_inode)
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
        log.info("stopped")
