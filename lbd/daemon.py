"""The daemon: wires registry, sessions, balancer, proxy and admin API, and owns their lifetimes.

Three phases, as in uvicorn: start (bind every listener, or fail with a clear message), serve
until SIGTERM/SIGINT, shut down (stop accepting, let requests in flight finish within the grace
period, snapshot the sticky sessions, remove the socket file). Everything the start opens is
registered in one exit stack, so it is closed however the daemon ends, a failed start included.
State saved in the state directory is restored before the listeners open (see lbd/state.py).
SIGHUP reloads the config file, like `lbctl reload` (see lbd/reload.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import time

from aiohttp import web

from lbd import systemd
from lbd.admin.app import create_admin_app
from lbd.admin.common import AdminState
from lbd.admin.socket import bind_owner_only, remove_socket
from lbd.admin.tcp import create_tcp_admin_app
from lbd.audit import AuditTrail
from lbd.balancer import Balancer
from lbd.config import Address, Config, ConfigSource
from lbd.health.active import HealthChecker
from lbd.metrics import create_metrics_app, metrics_registry
from lbd.models import ServerSpec
from lbd.proxy.context import ProxyContext
from lbd.proxy.server import DATA_PLANE, ProxyServer
from lbd.registry import Registry
from lbd.reload import Reloader, ReloadError
from lbd.sessions import SessionTable
from lbd.state import PersistedState, StateKeeper, StateStore

log = logging.getLogger("lbd")
SESSION_SWEEP_PERIOD_S = 1.0
WARM_IDLE_S = 0.5  # how often to look for static-table work when there is none (dynamic mode, or a full table)
FD_HEADROOM = 1024  # descriptors beyond the client connections: upstream pools, admin, health checks


class Daemon:
    def __init__(
        self,
        config: Config,
        seed: list[ServerSpec],
        store: StateStore | None = None,
        persisted: PersistedState | None = None,
        source: ConfigSource | None = None,
    ) -> None:
        self.config = config  # as started; a reload's config in effect is the reloader's
        self.seed = seed
        self.source = source or ConfigSource(None)
        self.registry = Registry(config.regions.latency_ms, config.health, seed)
        self.sessions = SessionTable(config.session_idle_timeout, config.max_sessions)
        self.balancer = Balancer(
            self.registry, config.mode, config.regions, self.sessions, config.default_client_region, config.failover
        )
        self.keeper = None if store is None else StateKeeper(store, self.registry, self.balancer, seed)
        if self.keeper is not None:
            self.keeper.restore(persisted)
            self.keeper.restore_sessions(self.sessions)
        self.audit = AuditTrail()
        self.started = asyncio.Event()
        self._stop = asyncio.Event()
        self._signal_reloads: set[asyncio.Task[None]] = set()

    def request_stop(self) -> None:
        self._stop.set()

    def _persist(self) -> None:
        """The admin API's hook: save the state file after a change, before the change is answered."""
        if self.keeper is not None:
            self.keeper.save()

    def _reload_on_sighup(self, reloader: Reloader) -> None:
        task = asyncio.get_running_loop().create_task(self._reload_logged(reloader))
        self._signal_reloads.add(task)
        task.add_done_callback(self._signal_reloads.discard)

    async def _reload_logged(self, reloader: Reloader) -> None:
        systemd.notify(systemd.reloading())
        with contextlib.suppress(ReloadError):  # the reloader logged why; the running config stays
            await reloader.reload("SIGHUP")
        systemd.notify("READY=1")

    async def run(self) -> None:
        """Start (every listener bound, or a clear error), serve until SIGTERM/SIGINT, shut down.
        Whatever the start opened is closed again however it ends, a failed start included."""
        async with contextlib.AsyncExitStack() as opened:
            proxy, reloader = await self._start(opened)
            await self._serve(proxy, reloader)
        log.info("stopped")

    async def _start(self, opened: contextlib.AsyncExitStack) -> tuple[ProxyServer, Reloader]:
        """Open the proxy and admin listeners, the health checker and the session sweeper; each is
        registered with `opened` as soon as it exists, so a later failure closes it again."""
        config = self.config
        loop = asyncio.get_running_loop()
        _raise_fd_limit(config.limits.max_connections)
        proxy_ctx = ProxyContext(loop, self.registry, self.balancer, config)
        proxy = ProxyServer(proxy_ctx)
        admin_sock, admin_inode = bind_owner_only(config.admin_socket)
        opened.callback(remove_socket, config.admin_socket, admin_inode)
        opened.callback(admin_sock.close)
        checker = HealthChecker(self.registry, config.health)
        reloader = Reloader(
            self.source, config, self.seed,
            registry=self.registry, balancer=self.balancer, sessions=self.sessions,
            proxy=proxy_ctx, checker=checker, state=self.keeper, audit=self.audit,
        )  # fmt: skip
        address = await _listen(proxy, config)
        opened.push_async_callback(proxy.close)
        listeners = {"proxy": str(address), "admin": str(config.admin_socket)}
        state = AdminState(
            reloader, self.registry, self.balancer, self.sessions, proxy_ctx, listeners, time.monotonic(),
            persist=self._persist,
        )  # fmt: skip
        opened.push_async_callback((await _serve(create_admin_app(state), web.SockSite, admin_sock)).cleanup)
        if config.admin_listen is not None:
            tcp_app = create_tcp_admin_app(state)
            listeners["admin_tcp"] = await _serve_tcp(tcp_app, config.admin_listen, opened, "the admin API")
        if config.metrics_listen is not None:
            collectors = metrics_registry(
                self.registry, self.balancer, self.sessions, proxy_ctx, reloader.stats, self.audit
            )
            metrics_app = create_metrics_app(collectors)
            listeners["metrics"] = await _serve_tcp(metrics_app, config.metrics_listen, opened, "metrics")
            log.info("Prometheus metrics on http://%s/metrics", listeners["metrics"])
        sweeper = loop.create_task(self._sweep_sessions())
        opened.push_async_callback(_cancelled, sweeper)
        warmer = loop.create_task(self._warm_routing())
        opened.push_async_callback(_cancelled, warmer)
        await checker.start()
        opened.push_async_callback(checker.stop)
        signals = {signal.SIGTERM: self.request_stop, signal.SIGINT: self.request_stop,
                   signal.SIGHUP: lambda: self._reload_on_sighup(reloader)}  # fmt: skip
        for signum, handler in signals.items():
            loop.add_signal_handler(signum, handler)
            opened.callback(loop.remove_signal_handler, signum)
        log.info(
            "proxy listening on http://%s (%s mode, %d servers, %s data plane); admin API on %s",
            address, self.balancer.mode, len(self.registry), DATA_PLANE, config.admin_socket,
        )  # fmt: skip
        return proxy, reloader

    async def _serve(self, proxy: ProxyServer, reloader: Reloader) -> None:
        """Serve until SIGTERM/SIGINT, then stop the proxy gracefully (requests in flight finish
        within the grace period in effect) and snapshot the sticky sessions."""
        if self.keeper is not None:
            self.keeper.sessions_consumed()  # serving: a later crash must not bring back that snapshot
        self.started.set()
        systemd.notify("READY=1", f"STATUS=serving on {proxy.address}")
        await self._stop.wait()
        systemd.notify("STOPPING=1")
        grace_ms = reloader.config.shutdown_grace_ms
        log.info("stopping: finishing requests in flight (grace %d ms)", grace_ms)
        await proxy.stop(grace_ms / 1000.0)
        if self.keeper is not None:
            self.keeper.save_sessions(self.sessions)

    async def _warm_routing(self) -> None:
        """Fill the static hash table in slices of about a millisecond, yielding to requests between
        them (a bucket not filled yet is computed when first used, with the same answer)."""
        while True:
            await asyncio.sleep(0 if self.balancer.warm() else WARM_IDLE_S)

    async def _sweep_sessions(self) -> None:
        """Expire idle sessions in bounded batches so memory follows the live set."""
        while True:
            await asyncio.sleep(SESSION_SWEEP_PERIOD_S)
            self.sessions.sweep(time.monotonic())


def _raise_fd_limit(max_connections: int) -> None:
    """Each client connection is a descriptor, plus the upstream ones of requests in flight: take the
    hard limit, as HAProxy does, and say so when even that cannot hold `max_connections`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    needed = max_connections + FD_HEADROOM
    if hard != resource.RLIM_INFINITY and hard < needed:
        log.warning(
            "open files limit %d is below limits.max_connections + %d upstream and admin descriptors (%d); "
            "connections beyond it will fail to be accepted",
            hard, FD_HEADROOM, needed,
        )  # fmt: skip


async def _listen(proxy: ProxyServer, config: Config) -> object:
    try:
        return await proxy.start(config.listen)
    except OSError as exc:
        raise OSError(f"cannot listen on {config.listen}: {exc.strerror}") from None


async def _serve(
    app: web.Application, site_type: type[web.BaseSite], *where: object, what: str = "the admin API"
) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await site_type(runner, *where).start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(f"cannot serve {what} on {':'.join(map(str, where))}: {exc.strerror}") from None
    return runner


async def _serve_tcp(app: web.Application, address: Address, opened: contextlib.AsyncExitStack, what: str) -> str:
    """Serve `app` on TCP (cleaned up with `opened`); returns the bound address (port 0 resolved)."""
    runner = await _serve(app, web.TCPSite, address.host, address.port, what=what)
    opened.push_async_callback(runner.cleanup)
    host, port = runner.addresses[0][:2]
    return str(Address(host, port))


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
