"""Active health checks: every server's `GET <path>` on its own jittered schedule.

One small task per server, started and stopped as servers come and go, so a round over 1,000
servers runs concurrently and takes one interval, and a slow server never delays another's check.
Probes use aiohttp (not the data plane) and report to the registry, which owns the state machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

import aiohttp

from lbd.config import HealthSettings
from lbd.health.machine import probe_due
from lbd.models import Server
from lbd.registry import Change, Registry

log = logging.getLogger("lbd.health")
JITTER = 0.1  # each wait is the interval +-10%, so checks of many servers do not align
MAX_CONCURRENT_PROBES = 512


class HealthChecker:
    def __init__(self, registry: Registry, settings: HealthSettings) -> None:
        self.registry = registry
        self.settings = settings
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._checked: dict[str, Server] = {}  # the server each checker in `_tasks` checks
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = self._new_session()
        self.registry.subscribe(self._changed)
        self._sync()

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        self._checked.clear()
        await _cancel(tasks)
        if self._session is not None:
            await self._session.close()

    async def apply(self, settings: HealthSettings) -> None:
        """Reloaded settings. The prober itself uses only the interval, timeout and path: when one of
        them changed, every server's checker starts again with them (the thresholds live in the registry)."""
        previous, self.settings = self.settings, settings
        if (settings.interval_ms, settings.timeout_ms, settings.path) == (
            previous.interval_ms, previous.timeout_ms, previous.path,
        ):  # fmt: skip
            return
        session, tasks = self._session, list(self._tasks.values())
        self._tasks.clear()
        self._checked.clear()
        self._session = self._new_session()  # before anything awaits: new checkers never see the old one
        self._sync()
        await _cancel(tasks)
        if session is not None:
            await session.close()

    def _new_session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=MAX_CONCURRENT_PROBES, force_close=True)
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_ms / 1000.0)
        return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)

    def _changed(self, change: Change) -> None:
        """One membership change: stop the checkers of servers that left, start those of newcomers
        (O(change), so registering one server among 10,000 does not walk the others)."""
        for server in change.removed:
            if self._checked.get(server.id) is server:
                self._tasks.pop(server.id).cancel()
                del self._checked[server.id]
        for server in change.added:
            if self._checked.get(server.id) is not server:
                task = self._tasks.pop(server.id, None)
                if task is not None:
                    task.cancel()
                self._start_checker(server)

    def _sync(self) -> None:
        """Start a checker for each new server (a re-registered id is a new server), stop those of
        servers that are gone."""
        current = {server.id: server for server in self.registry.servers()}
        for server_id in list(self._tasks):
            if current.get(server_id) is not self._checked.get(server_id):
                self._tasks.pop(server_id).cancel()
                del self._checked[server_id]
        for server_id, server in current.items():
            if server_id not in self._tasks:
                self._start_checker(server)

    def _start_checker(self, server: Server) -> None:
        task = asyncio.get_running_loop().create_task(self._check_forever(server))
        task.add_done_callback(lambda ended: self._checker_ended(ended, server))
        self._tasks[server.id] = task
        self._checked[server.id] = server

    def _checker_ended(self, task: asyncio.Task[None], server: Server) -> None:
        """A checker only ends by being cancelled; one that crashed (a bug) is logged with its
        traceback and started again, so its server keeps being checked."""
        if task.cancelled() or (error := task.exception()) is None:
            return
        log.error("health checker of server %s crashed; starting it again", server.id, exc_info=error)
        if self._tasks.get(server.id) is task and self.registry.get(server.id) is server:
            self._start_checker(server)  # its first check waits part of an interval: no busy loop

    async def _check_forever(self, server: Server) -> None:
        interval = self.settings.interval_ms / 1000.0
        await asyncio.sleep(random.uniform(0, interval))  # spread the first round over one interval
        while True:
            started = time.monotonic()
            if probe_due(server.state, started):
                ok, detail = await self.probe(server)
                if self.registry.get(server.id) is server:  # not removed meanwhile
                    self.registry.record_probe(server, ok, detail, started)
            await asyncio.sleep(interval * random.uniform(1 - JITTER, 1 + JITTER))

    async def check_now(self, server: Server) -> tuple[bool, str, bool]:
        """An operator's check (`lbctl check`): end a cooldown's wait, probe at once, and apply the
        result like any scheduled check's. Returns (passed, what happened, whether a cooldown ended)."""
        ended = self.registry.end_cooldown(server)
        started = time.monotonic()
        ok, detail = await self.probe(server)
        if self.registry.get(server.id) is server:
            self.registry.record_probe(server, ok, detail, started)
        return ok, detail, ended

    async def probe(self, server: Server) -> tuple[bool, str]:
        """One check: (passed, what happened). A 2xx passes; anything else fails with its reason."""
        assert self._session is not None
        url = server.spec.url + self.settings.path
        try:
            async with self._session.get(url, allow_redirects=False) as response:
                await response.read()
                return 200 <= response.status < 300, f"HTTP {response.status}"
        except TimeoutError:
            return False, f"no answer within {self.settings.timeout_ms} ms"
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, ConnectionRefusedError):
                return False, "connection refused"
            return False, f"cannot connect ({exc.os_error.strerror or exc.os_error})"
        except aiohttp.ClientError as exc:
            return False, f"{type(exc).__name__}: {exc}"


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
