"""The daemon: wires registry, sessions, balancer, proxy and admin API, and owns their lifetimes.

Three phases, as in uvicorn: startup (bind every listener, or fail with a clear message), serve
until SIGTERM/SIGINT, shutdown (stop accepting, let requests in flight finish within the grace
period, remove the socket file).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

from aiohttp import web

from lbd.admin.app import AdminState, create_admin_app
from lbd.admin.socket import bind_owner_only, remove_socket
from lbd.admin.tcp import create_tcp_admin_app
from lbd.balancer import Balancer
from lbd.config import Address, Config
from lbd.health.active import HealthChecker
from lbd.models import ServerSpec
from lbd.proxy.server import ProxyContext, ProxyServer
from lbd.registry import Registry
from lbd.sessions import SessionTable

log = logging.getLogger("lbd")
SESSION_SWEEP_PERIOD_S = 1.0


class Daemon:
    def __init__(self, config: Config, seed: list[ServerSpec]) -> None:
        self.config = config
        self.registry = Registry(config.regions.latency_ms, config.health, seed)
        self.sessions = SessionTable(config.session_idle_timeout, config.max_sessions)
        self.balancer = Balancer(
            self.registry, config.mode, config.regions, self.sessions, config.default_client_region
        )
        self.started = asyncio.Event()
        self._stop = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        proxy_ctx = ProxyContext(
            loop,
            self.registry,
            self.balancer,
            config.timeout_base_ms,
            config.regions.latency_ms,
            config.retry_body_limit_bytes,
            config.client_timeout_ms / 1000.0,
        )
        proxy = ProxyServer(proxy_ctx)
        admin_sock, admin_inode = bind_owner_only(config.admin_socket)
        runners: list[web.AppRunner] = []
        sweeper: asyncio.Task[None] | None = None
        checker = HealthChecker(self.registry, config.health)
        try:
            address = await _listen(proxy, config)
            listeners = {"proxy": str(address), "admin": str(config.admin_socket)}
            state = AdminState(
                config, self.registry, self.balancer, self.sessions, proxy_ctx, listeners, time.monotonic()
            )
            runners.append(await _serve(create_admin_app(state), web.SockSite, admin_sock))
            if config.admin_listen is not None:
                assert config.admin_token is not None
                tcp_app = create_tcp_admin_app(state, config.admin_token)
                host, port = config.admin_listen.host, config.admin_listen.port
                tcp_runner = await _serve(tcp_app, web.TCPSite, host, port)
                runners.append(tcp_runner)
                bound_host, bound_port = tcp_runner.addresses[0][:2]
                listeners["admin_tcp"] = str(Address(bound_host, bound_port))
            sweeper = loop.create_task(self._sweep_sessions())
            await checker.start()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self.request_stop)
            log.info(
                "proxy listening on http://%s (%s mode, %d servers); admin API on %s",
                address, self.balancer.mode, len(self.registry), config.admin_socket,
            )  # fmt: skip
            self.started.set()
            await self._stop.wait()
            log.info("stopping: finishing requests in flight (grace %d ms)", config.shutdown_grace_ms)
            await proxy.stop(config.shutdown_grace_ms / 1000.0)
        finally:
            await checker.stop()
            if sweeper is not None:
                sweeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeper
            for runner in runners:
                await runner.cleanup()
            admin_sock.close()
            remove_socket(config.admin_socket, admin_inode)
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
        log.info("stopped")

    async def _sweep_sessions(self) -> None:
        """Expire idle sessions in bounded batches so memory follows the live set."""
        while True:
            await asyncio.sleep(SESSION_SWEEP_PERIOD_S)
            self.sessions.sweep(time.monotonic())


async def _listen(proxy: ProxyServer, config: Config) -> object:
    try:
        return await proxy.start(config.listen)
    except OSError as exc:
        raise OSError(f"cannot listen on {config.listen}: {exc.strerror}") from None


async def _serve(app: web.Application, site_type: type[web.BaseSite], *where: object) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await site_type(runner, *where).start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(f"cannot serve the admin API on {':'.join(map(str, where))}: {exc.strerror}") from None
    return runner
