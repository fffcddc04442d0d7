"""The daemon: wires registry, sessions, balancer, proxy and admin API, and owns their lifetimes.

Three phases, as in uvicorn: start (bind every listener, or fail with a clear message), serve
until SIGTERM/SIGINT, shut down (stop accepting, let requests in flight finish within the grace
period, snapshot the sticky sessions, remove the socket file). Everything the start opens is
registered in one exit stack, so it is closed however the daemon ends, a failed start included.
State saved in the state directory is restored before the listeners open (see lbd/state.py).
SIGHUP reloads the config file, like `lbctl reload` (see lbd/reload.py); SIGUSR1 reopens the access
log (lbd/accesslog_writer.py), for log rotation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from lbd import systemd
from lbd.accesslog_writer import AccessLog, open_target
from lbd.admin.app import collectors_of, create_admin_app
from lbd.admin.common import AdminState
from lbd.admin.socket import bind_owner_only, remove_socket
from lbd.admin.tcp import create_tcp_admin_app
from lbd.audit import AuditTrail
from lbd.balancer import Balancer
from lbd.config import Address, Config, ConfigSource
from lbd.control import Changes, Control, LocalControl
from lbd.health.active import HealthChecker
from lbd.metrics import create_metrics_app
from lbd.models import ServerSpec
from lbd.proxy.context import ProxyContext
from lbd.proxy.server import DATA_PLANE, ProxyServer
from lbd.registry import Registry
from lbd.reload import Reloader, ReloadError, StateFollower
from lbd.sessions import SessionTable
from lbd.state import PersistedState, StateKeeper, StateStore
from lbd.store.cluster import Cluster, ClusterControl
from lbd.tls import TlsTerminator, load_certificates

log = logging.getLogger("lbd")
SESSION_SWEEP_PERIOD_S = 1.0
WARM_IDLE_S = 0.5  # how often to look for static-table work when there is none (dynamic mode, or a full table)
FD_HEADROOM = 1024  # descriptors beyond the client connections: upstream pools, admin, health checks


class Daemon:
    access_log: AccessLog  # opened by the start

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
        # in a cluster the store holds what changes at run time; the state directory only its lock
        clustered = config.cluster.url is not None
        self.keeper = None if store is None or clustered else StateKeeper(store, self.registry, self.balancer, seed)
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
        access_log = self.access_log = proxy_ctx.access_log = _start_access_log(loop, config, opened)
        proxy = ProxyServer(proxy_ctx)
        admin_sock, admin_inode = bind_owner_only(config.admin_socket)
        opened.callback(remove_socket, config.admin_socket, admin_inode)
        opened.callback(admin_sock.close)
        checker = HealthChecker(self.registry, config.health)
        certificates = load_certificates(config.tls)
        tls = None if certificates is None else TlsTerminator(certificates)
        opened.push_async_callback(proxy.close)
        listeners = await self._listen(proxy, tls, opened)
        listeners["admin"] = str(config.admin_socket)
        changes = Changes(self.registry, self.balancer, self.sessions, proxy_ctx.pool)
        address = listeners.get("proxy") or listeners["tls"]
        cluster = None if config.cluster.url is None else self._cluster(changes, lambda: reloader, address)
        reloader = Reloader(
            self.source, config, self.seed,
            registry=self.registry, balancer=self.balancer, sessions=self.sessions,
            proxy=proxy_ctx, checker=checker, state=self._follower(cluster), audit=self.audit, tls=tls,
            access_log=access_log,
        )  # fmt: skip
        control = self._control(changes, reloader, cluster)
        if cluster is not None:
            self.balancer.shared = proxy_ctx.shared = cluster.sync
            await cluster.start()
            opened.push_async_callback(cluster.stop)
        state = AdminState(
            reloader, self.registry, self.balancer, self.sessions, proxy_ctx, listeners, time.monotonic(),
            control=control, cluster=cluster,
        )  # fmt: skip
        await self._before_admin(opened)
        opened.push_async_callback((await _serve(self._admin_app(state), web.SockSite, admin_sock)).cleanup)
        if config.admin_listen is not None:
            tcp_app = create_tcp_admin_app(state, self._admin_app)
            listeners["admin_tcp"] = await _serve_tcp(tcp_app, config.admin_listen, opened, "the admin API")
        if config.metrics_listen is not None:
            listeners["metrics"] = await _serve_tcp(self._metrics_app(state), config.metrics_listen, opened, "metrics")
            log.info("Prometheus metrics on http://%s/metrics", listeners["metrics"])
        for task in self._background(tls, checker):
            opened.push_async_callback(_cancelled, loop.create_task(task))
        if self.checks_health:
            await checker.start()
            opened.push_async_callback(checker.stop)
        for signum, handler in self._signals(reloader).items():
            loop.add_signal_handler(signum, handler)
            opened.callback(loop.remove_signal_handler, signum)
        await self._ready(state, proxy, tls, opened)
        self._log_started(listeners)
        return proxy, reloader

    # --- what a supervisor or a worker does differently (lbd/workers/) ---------------------------------

    checks_health = True  # a supervisor leaves the checks to its workers

    async def _listen(
        self, proxy: ProxyServer, tls: TlsTerminator | None, opened: contextlib.AsyncExitStack
    ) -> dict[str, str]:
        return await _listen(proxy, self.config, tls)

    def _follower(self, cluster: Cluster | None) -> StateFollower | None:
        """What keeps the run-time state across reloads: the state directory, or the cluster."""
        return self.keeper if cluster is None else cluster

    def _control(self, changes: Changes, reloader: Reloader, cluster: Cluster | None) -> Control:
        if cluster is not None:
            return ClusterControl(cluster)
        return LocalControl(changes, self._persist, reloader.use_config_mode)

    def _admin_app(self, state: AdminState, middlewares: tuple[Any, ...] = ()) -> web.Application:
        return create_admin_app(state, middlewares)

    def _metrics_app(self, state: AdminState) -> web.Application:
        return create_metrics_app(collectors_of(state))

    def _background(self, tls: TlsTerminator | None, checker: HealthChecker) -> list[Coroutine[Any, Any, None]]:
        tasks = [self._sweep_sessions(), self._warm_routing()]
        if tls is not None:
            tasks.append(tls.watch_expiry())
        return tasks

    def _signals(self, reloader: Reloader) -> dict[signal.Signals, Callable[[], None]]:
        return {
            signal.SIGTERM: self.request_stop,
            signal.SIGINT: self.request_stop,
            signal.SIGHUP: lambda: self._reload_on_sighup(reloader),
            signal.SIGUSR1: self._reopen_logs,
        }

    def _reopen_logs(self) -> None:
        """SIGUSR1 (logrotate's postrotate): the access log's path is opened again."""
        self.access_log.reopen()

    async def _before_admin(self, opened: contextlib.AsyncExitStack) -> None:
        """The admin API is about to answer: a supervisor's workers serve by then."""

    async def _ready(
        self, state: AdminState, proxy: ProxyServer, tls: TlsTerminator | None, opened: contextlib.AsyncExitStack
    ) -> None:
        """Everything is open: a single process serves already."""

    def _log_started(self, listeners: dict[str, str]) -> None:
        schemes = {"proxy": "http", "tls": "https"}
        urls = [f"{scheme}://{listeners[key]}" for key, scheme in schemes.items() if key in listeners]
        log.info(
            "proxy listening on %s (%s mode, %d servers, %s data plane); admin API on %s",
            " and ".join(urls), self.balancer.mode, len(self.registry), DATA_PLANE, self.config.admin_socket,
        )  # fmt: skip

    def _cluster(self, changes: Changes, reloader: Callable[[], Reloader], listen: str) -> Cluster:
        """This instance's cluster membership; `reloader` gives the config in effect (made after)."""
        settings = self.config.cluster
        port = listen.rsplit(":", 1)[1]
        instance = settings.instance or f"{socket.gethostname()}:{port}"
        return Cluster(
            settings, instance, listen, changes, self.sessions,
            seed=lambda: reloader().seed, config_mode=lambda: reloader().config.mode,
            server_regions=lambda: reloader().config.regions.server_regions, audit=self.audit,
        )  # fmt: skip

    async def _serve(self, proxy: ProxyServer, reloader: Reloader) -> None:
        """Serve until SIGTERM/SIGINT, then stop gracefully (requests in flight finish within the
        grace period in effect) and snapshot the sticky sessions."""
        if self.keeper is not None:
            self.keeper.sessions_consumed()  # serving: a later crash must not bring back that snapshot
        self.started.set()
        systemd.notify("READY=1", f"STATUS={self._serving_status(proxy)}")
        await self._stop.wait()
        systemd.notify("STOPPING=1")
        await self._wind_down(proxy, reloader.config.shutdown_grace_ms)
        if self.keeper is not None:
            self.keeper.save_sessions(self.sessions)

    def _serving_status(self, proxy: ProxyServer) -> str:
        return f"serving on {proxy.address or proxy.tls_address}"

    async def _wind_down(self, proxy: ProxyServer, grace_ms: int) -> None:
        log.info("stopping: finishing requests in flight (grace %d ms)", grace_ms)
        await proxy.stop(grace_ms / 1000.0)

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


def _start_access_log(loop: asyncio.AbstractEventLoop, config: Config, opened: contextlib.AsyncExitStack) -> AccessLog:
    """The access log (off unless configured); closed after the proxy, whose close is pushed later, so
    the lines of requests cut at the end go out too."""
    access_log = AccessLog(loop)
    access_log.apply(config, -1 if config.access_log is None else open_target(config.access_log))
    opened.push_async_callback(access_log.close)
    return access_log


async def _listen(proxy: ProxyServer, config: Config, tls: TlsTerminator | None) -> dict[str, str]:
    """Bind the plain listener (unless it is off) and the TLS one (when configured); their addresses."""
    bound: dict[str, str] = {}
    where = config.listen
    try:
        if config.listen is not None:
            bound["proxy"] = str(await proxy.start(config.listen))
        if tls is not None and config.tls.listen is not None:
            where = config.tls.listen
            bound["tls"] = str(await proxy.start_tls(config.tls.listen, tls.context, tls.connection_lines))
    except OSError as exc:
        raise OSError(f"cannot listen on {where}: {exc.strerror}") from None
    return bound


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
