"""The supervisor of `lbd start --workers N` (N > 1): the control plane of one lbd, and N workers
that carry its traffic.

It is a single lbd without a proxy of its own: it owns the admin socket (and the TCP admin and
metrics listeners), the state directory, the config and its reloads, and with --cluster its
membership of the cluster (it is the instance the peers see). It binds one SO_REUSEPORT socket
per worker and listener (sockets.py), starts the workers (processes.py), brings each to its state
before it accepts (control.py), and answers the admin API from them (admin.py). SIGTERM or SIGINT
stops every worker gracefully, then itself; SIGHUP reloads, and the workers follow; SIGUSR1 has
every worker reopen the access log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import socket
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from lbd.admin.common import AdminState
from lbd.config import Config, ConfigSource, config_to_mapping
from lbd.control import Changes, Control
from lbd.daemon import Daemon
from lbd.errors import ConfigError
from lbd.health.active import HealthChecker
from lbd.models import ServerSpec
from lbd.proxy.server import DATA_PLANE, ProxyServer
from lbd.reload import Reloader
from lbd.state import PersistedState, StateStore
from lbd.store.cluster import Cluster
from lbd.tls import TlsTerminator
from lbd.workers.admin import create_supervisor_app, create_supervisor_metrics_app
from lbd.workers.control import SupervisedControl, push_state
from lbd.workers.processes import WorkerProcess, Workers
from lbd.workers.protocol import CONFIG_PATH, Boot, StateSnapshot
from lbd.workers.sockets import bound_address, reuseport_sockets

log = logging.getLogger("lbd")


class Supervisor(Daemon):
    checks_health = False  # each worker checks its servers

    def __init__(
        self,
        config: Config,
        seed: list[ServerSpec],
        store: StateStore,
        persisted: PersistedState | None,
        source: ConfigSource,
        log_settings: tuple[str, str],
    ) -> None:
        super().__init__(config, seed, store, persisted, source)
        if self.balancer.mode == "dynamic" and config.cluster.url is None:
            raise ConfigError(
                f"{store.directory}: the mode was switched to dynamic at run time, and dynamic mode across "
                f"{config.workers} workers needs their sessions shared: start with --cluster "
                "redis://HOST:PORT/0, or with --workers 1 and 'lbctl mode static'"
            )
        self._log_settings = log_settings
        self._private = Path()  # the workers' admin sockets: a private directory made at the start
        self._sockets: dict[str, list[socket.socket]] = {}
        self._version = 0
        self._reloader: Reloader | None = None
        self._control_plane: SupervisedControl | None = None
        self.workers = Workers([], self._boot, self._on_ready, self._stop.is_set)

    # --- the start (lbd/daemon.py's hooks) -------------------------------------------------------------

    async def _listen(
        self, proxy: ProxyServer, tls: TlsTerminator | None, opened: contextlib.AsyncExitStack
    ) -> dict[str, str]:
        """Every worker's sockets, bound here and held for the supervisor's life."""
        self._private = Path(tempfile.mkdtemp(prefix="lbd-workers-", dir=self.config.admin_socket.parent))
        opened.callback(shutil.rmtree, self._private, True)
        config = self.config
        wanted = {"proxy": config.listen, "tls": config.tls.listen if tls is not None else None}
        bound: dict[str, str] = {}
        for key, address in wanted.items():
            if address is None:
                continue
            sockets = reuseport_sockets(address, config.workers)
            for sock in sockets:
                opened.callback(sock.close)
            self._sockets[key] = sockets
            bound[key] = str(bound_address(sockets[0]))
        self.workers.members = [
            WorkerProcess(index, self._private / f"w{index}.sock", [s[index].fileno() for s in self._sockets.values()])
            for index in range(config.workers)
        ]
        return bound

    def _control(self, changes: Changes, reloader: Reloader, cluster: Cluster | None) -> Control:
        self._reloader = reloader
        reloader.followers.append(self._reloaded)
        self._control_plane = SupervisedControl(
            super()._control(changes, reloader, cluster),
            lambda: self.workers,
            None if cluster is not None else self._snapshot,
            shares_sessions=cluster is not None,
        )
        return self._control_plane

    def _admin_app(self, state: AdminState, middlewares: tuple[Any, ...] = ()) -> web.Application:
        return create_supervisor_app(state, self.workers, middlewares)

    def _metrics_app(self, state: AdminState) -> web.Application:
        return create_supervisor_metrics_app(state, self.workers)

    def _background(self, tls: TlsTerminator | None, checker: HealthChecker) -> list[Coroutine[Any, Any, None]]:
        """No traffic here, so no sessions to sweep nor tables to warm; certificates to watch."""
        return [] if tls is None else [tls.watch_expiry()]

    async def _before_admin(self, opened: contextlib.AsyncExitStack) -> None:
        """Start the workers, so the admin API answers from serving workers from its first call; a
        start that fails later still stops them."""
        opened.push_async_callback(self.workers.stop, 0.0)
        await self.workers.start()

    def _reopen_logs(self) -> None:
        """The workers write the access log: each reopens it (systemd may have told them already)."""
        super()._reopen_logs()
        for worker in self.workers.serving():
            worker.signal(signal.SIGUSR1)

    def _log_started(self, listeners: dict[str, str]) -> None:
        schemes = {"proxy": "http", "tls": "https"}
        urls = [f"{scheme}://{listeners[key]}" for key, scheme in schemes.items() if key in listeners]
        log.info(
            "proxy listening on %s with %d workers (%s mode, %d servers, %s data plane); admin API on %s",
            " and ".join(urls), len(self.workers.members), self.balancer.mode, len(self.registry), DATA_PLANE,
            self.config.admin_socket,
        )  # fmt: skip

    def _serving_status(self, proxy: ProxyServer) -> str:
        return f"serving with {len(self.workers.members)} workers"

    async def _wind_down(self, proxy: ProxyServer, grace_ms: int) -> None:
        """Every worker finishes its requests in flight within the grace period in effect."""
        log.info("stopping: the workers finish requests in flight (grace %d ms)", grace_ms)
        await self.workers.stop(grace_ms / 1000.0)

    # --- the workers' state and config -------------------------------------------------------------

    def _snapshot(self) -> StateSnapshot:
        """The state every worker holds: the supervisor's servers, drain flags and mode, versioned."""
        assert self._reloader is not None
        self._version += 1
        servers = self.registry.servers()
        return StateSnapshot(
            self._version,
            tuple(server.spec for server in servers),
            frozenset(server.id for server in servers if server.state.draining),
            self.balancer.mode,
            self._reloader.mode_overridden,
        )

    def _boot(self, index: int) -> Boot:
        """What a worker starts from: the config and servers file in effect (a replacement too)."""
        assert self._reloader is not None
        config = self._reloader.config
        fds = {key: sockets[index].fileno() for key, sockets in self._sockets.items()}
        return Boot(
            index,
            self._worker_mapping(config, index),
            [spec.to_json() for spec in self._reloader.seed],
            config.cluster.password,
            *self._log_settings,
            fds.get("proxy"),
            fds.get("tls"),
        )

    def _worker_mapping(self, config: Config, index: int) -> dict[str, Any]:
        """The supervisor's config as a worker runs it: its own admin socket, no TCP listeners."""
        mapping = config_to_mapping(config)
        mapping["admin_socket"] = str(self._private / f"w{index}.sock")
        mapping["workers"] = 1
        for key in ("admin_listen", "metrics_listen"):
            mapping.pop(key, None)
        return mapping

    async def _on_ready(self, worker: WorkerProcess) -> None:
        """A worker's admin socket answers: give it the state in effect; it then starts accepting."""
        worker.synced = True  # first: a change made from here on reaches it as well (versions order them)
        if self.config.cluster.url is None:
            await push_state(worker, self._snapshot())

    async def _reloaded(self, config: Config, seed: list[ServerSpec]) -> None:
        """A reload applied here: every worker applies the same config, then holds the same state."""

        async def send(worker: WorkerProcess) -> None:
            body = {"config": self._worker_mapping(config, worker.index), "seed": [s.to_json() for s in seed]}
            try:
                status, answer = await worker.call("PUT", CONFIG_PATH, body)
            except Exception as exc:
                status, answer = 0, f"{type(exc).__name__}: {exc}"
            if status != 200:
                log.error(
                    "worker %d did not take the reload (%s); restarting it with the new config", worker.index, answer
                )
                worker.signal(signal.SIGKILL)

        await asyncio.gather(*(send(worker) for worker in self.workers.serving()))
        if self._control_plane is not None:
            await self._control_plane.push()
