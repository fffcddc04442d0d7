"""One proxy process of several (`lbd start --workers N`), run by a supervisor (supervisor.py).

A worker is a whole lbd data plane: the proxy, the balancer, the session table, its own health
checks and passive ejection, exactly as a single lbd. What differs is around it: it inherits its
listening sockets instead of binding them, keeps no state directory, takes its servers, drain flags
and mode from the supervisor (`PUT /v1/internal/state`, or the cluster store with `--cluster`) and
its config from the supervisor's reloads (`PUT /v1/internal/config`), answers the supervisor on a
private admin socket, and accepts connections only once it holds the supervisor's state, so a
replacement never serves a moment without the servers registered at run time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from aiohttp import web

from lbd.admin.app import create_admin_app
from lbd.admin.common import AdminState, ApiError, read_json, state_of
from lbd.audit import AuditTrail
from lbd.config import Config, ConfigSource, Mode, config_from_mapping
from lbd.control import Changes, Control, LocalControl
from lbd.daemon import Daemon
from lbd.errors import LbError
from lbd.health.active import HealthChecker
from lbd.models import ServerSpec, parse_server
from lbd.proxy.server import ProxyServer
from lbd.reload import Reloader, StateFollower
from lbd.store.cluster import Cluster
from lbd.tls import TlsTerminator
from lbd.workers.protocol import CONFIG_PATH, READY, SERVING, STATE_PATH, Boot, StateSnapshot
from lbd.workers.sockets import bound_address

log = logging.getLogger("lbd.worker")
JOIN_WAIT_S = 2.0  # with --cluster, how long a starting worker waits for the store before serving


def worker_config(boot_config: dict[str, Any], cluster_password: str | None) -> Config:
    """The config the supervisor sent, with the secret its shape leaves out."""
    config = config_from_mapping(boot_config, "supervisor's config")
    return dataclasses.replace(config, cluster=dataclasses.replace(config.cluster, password=cluster_password))


def worker_seed(entries: Iterable[object], config: Config) -> list[ServerSpec]:
    return [parse_server(entry, config.regions.server_regions, where="supervisor") for entry in entries]


class SupervisorLink:
    """What this worker holds of the supervisor's state: which snapshot it applied, and whether the
    mode was switched at run time (the reloader asks, as it asks the state directory)."""

    def __init__(self) -> None:
        self.version = -1
        self.switched = False
        self.synced = asyncio.Event()

    def apply(self, snapshot: StateSnapshot, changes: Changes) -> None:
        if snapshot.version <= self.version:
            return  # an older push overtaken by a newer one
        wanted = {spec.id: spec for spec in snapshot.servers}
        changes.hold(wanted, snapshot.draining, snapshot.mode)
        self.switched = snapshot.mode_switched
        self.version = snapshot.version
        self.synced.set()

    # StateFollower (lbd/reload.py)
    def follow_config(self, seed: Iterable[ServerSpec], mode: Mode) -> bool:
        return not self.switched

    def mode_switched(self) -> bool:
        return self.switched

    def follow_config_mode(self, mode: Mode) -> None:
        self.switched = False

    def save(self) -> None:
        """The supervisor keeps the state directory."""


class Worker(Daemon):
    def __init__(self, boot: Boot) -> None:
        config = worker_config(boot.config, boot.cluster_password)
        super().__init__(config, worker_seed(boot.seed, config), source=ConfigSource(None))
        self.boot = boot
        self.audit = AuditTrail(quiet=True)
        self.link = SupervisorLink()
        self._sockets = {
            key: socket.socket(fileno=fd)
            for key, fd in (("proxy", boot.listen_fd), ("tls", boot.tls_listen_fd))
            if fd is not None
        }
        self._cluster_member: Cluster | None = None

    async def _listen(
        self, proxy: ProxyServer, tls: TlsTerminator | None, opened: contextlib.AsyncExitStack
    ) -> dict[str, str]:
        """The supervisor's sockets: bound already; accepting starts in `_ready`."""
        for sock in self._sockets.values():
            opened.callback(sock.close)
        return {key: str(bound_address(sock)) for key, sock in self._sockets.items()}

    def _cluster(self, changes: Changes, reloader: Callable[[], Reloader], listen: str) -> Cluster:
        """A member of the cluster that does not announce itself: its supervisor is the instance."""
        member = super()._cluster(changes, reloader, listen)
        member.instance = f"{member.instance}/w{self.boot.index}"
        member.announces = False
        self._cluster_member = member
        return member

    def _follower(self, cluster: Cluster | None) -> StateFollower | None:
        return self.link if cluster is None else cluster

    def _control(self, changes: Changes, reloader: Reloader, cluster: Cluster | None) -> Control:
        """Changes reach a worker as state, not through its admin API; this one only answers reads."""
        return LocalControl(changes, lambda: None, reloader.use_config_mode)

    def _admin_app(self, state: AdminState, middlewares: tuple[Any, ...] = ()) -> web.Application:
        app = create_admin_app(state, middlewares)
        app[WORKER] = self
        app.router.add_put(STATE_PATH, _put_state)
        app.router.add_put(CONFIG_PATH, _put_config)
        return app

    def _background(self, tls: TlsTerminator | None, checker: HealthChecker) -> list[Coroutine[Any, Any, None]]:
        """The supervisor warns about expiring certificates, once for all its workers."""
        return [self._sweep_sessions(), self._warm_routing(), self._watch_supervisor()]

    def _signals(self, reloader: Reloader) -> dict[signal.Signals, Callable[[], None]]:
        """SIGTERM from the supervisor stops it gracefully, SIGUSR1 (from the supervisor, or systemd's
        to the whole unit) reopens the access log; Ctrl-C and SIGHUP are the supervisor's."""
        return {signal.SIGTERM: self.request_stop, signal.SIGUSR1: self._reopen_logs}

    async def _ready(
        self, state: AdminState, proxy: ProxyServer, tls: TlsTerminator | None, opened: contextlib.AsyncExitStack
    ) -> None:
        """Tell the supervisor the admin socket answers, wait for its state (or the store's), then
        accept on the inherited sockets."""
        _say(self.boot.words_fd, READY)
        if self._cluster_member is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._cluster_member.joined_once.wait(), JOIN_WAIT_S)
        else:
            await self.link.synced.wait()
        if "proxy" in self._sockets:
            await proxy.start(self._sockets["proxy"])
        if "tls" in self._sockets and tls is not None:
            await proxy.start_tls(self._sockets["tls"], tls.context, tls.connection_lines)
        _say(self.boot.words_fd, SERVING)

    def _log_started(self, listeners: dict[str, str]) -> None:
        log.info("worker %d serving (pid %d, %d servers)", self.boot.index, os.getpid(), len(self.registry))

    async def _watch_supervisor(self) -> None:
        """stdin is the supervisor's pipe: its end (the supervisor gone) stops this worker."""
        loop = asyncio.get_running_loop()
        ended = loop.create_future()

        class UntilEof(asyncio.Protocol):
            def eof_received(self) -> bool | None:
                if not ended.done():
                    ended.set_result(None)
                return None

            def connection_lost(self, exc: Exception | None) -> None:
                self.eof_received()

        transport, _ = await loop.connect_read_pipe(UntilEof, sys.stdin)
        try:
            await ended
            log.warning("the supervisor is gone; stopping")
            self.request_stop()
        finally:
            transport.close()


WORKER: web.AppKey[Worker] = web.AppKey("worker")


async def _put_state(request: web.Request) -> web.Response:
    """The supervisor's servers, drain flags and mode: hold exactly those (newest version wins)."""
    state = state_of(request)
    try:
        snapshot = StateSnapshot.from_json(await read_json(request), state.config.regions.server_regions)
    except (LbError, ValueError, KeyError, TypeError) as exc:
        raise ApiError(422, "invalid_state", f"not a state snapshot: {exc}") from None
    worker = request.app[WORKER]
    worker.link.apply(snapshot, state.control.changes)
    return web.json_response({"version": worker.link.version})


async def _put_config(request: web.Request) -> web.Response:
    """A reload the supervisor made: its config and servers file, applied as a reload here."""
    state = state_of(request)
    body = await read_json(request)
    worker = request.app[WORKER]
    try:
        config = worker_config(body["config"], worker.boot.cluster_password)
        report = await state.reloader.apply(config, worker_seed(body["seed"], config))
    except (LbError, KeyError, TypeError) as exc:
        raise ApiError(422, "invalid_config", str(exc)) from None
    return web.json_response(report)


def _say(fd: int, word: str) -> None:
    os.write(fd, word.encode() + b"\n")


def run_worker_process(boot: Boot, run: Callable[[Daemon], None]) -> None:
    """`lbd worker`: run until stopped. Ctrl-C reaches the whole process group, and SIGHUP may: the
    supervisor decides what they mean, and tells its workers. SIGUSR1 is ignored until the loop
    handles it, so a log rotation does not kill a worker that is starting."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # until the loop handles it: a log rotation must not kill
    run(Worker(boot))
