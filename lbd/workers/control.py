"""The supervisor's control plane: each change is made as a single lbd makes it (checked, applied
to the supervisor's own state, saved to the state directory), then every worker is brought to the
new state before the admin API answers. With --cluster the change goes through the store instead,
and the workers, members of the cluster, apply it from there as every instance does.

A worker gets the whole state each time (servers, drain flags, mode, a version), not the change:
pushes are then idempotent and a worker that missed one, or was just replaced, is right after the
next. A worker that does not take a push is restarted, and starts from the state in effect.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from lbd.config import Mode
from lbd.control import Changes, Control
from lbd.errors import NotPossibleHere
from lbd.models import Server, ServerSpec
from lbd.workers.processes import WorkerProcess, Workers
from lbd.workers.protocol import STATE_PATH, StateSnapshot

log = logging.getLogger("lbd.workers")


class SupervisedControl:
    def __init__(
        self,
        inner: Control,
        workers: Callable[[], Workers],
        snapshot: Callable[[], StateSnapshot] | None,
        shares_sessions: bool,
    ) -> None:
        self.inner = inner
        self._workers = workers  # made after the control plane (the workers' boot needs the config in effect)
        self._snapshot = snapshot  # None with --cluster: the workers follow the store
        self._shares_sessions = shares_sessions
        self._lock = asyncio.Lock()  # pushes leave in version order

    @property
    def changes(self) -> Changes:
        return self.inner.changes

    async def register(self, specs: list[ServerSpec]) -> list[str]:
        created = await self.inner.register(specs)
        await self.push()
        return created

    async def remove(self, server_id: str) -> int:
        """The sessions dropped are the workers' (the supervisor holds none), counted before they go."""
        await self.inner.remove(server_id)
        answers = await self._workers().each("GET", "/v1/sessions/summary")
        dropped = sum(int(body["by_server"].get(server_id, 0)) for _, status, body in answers if status == 200)
        await self.push()
        return dropped

    async def set_draining(self, server_id: str, draining: bool) -> Server | None:
        server = await self.inner.set_draining(server_id, draining)
        await self.push()
        return server

    async def set_capacity(self, server_id: str, capacity: int) -> tuple[Server, int] | None:
        changed = await self.inner.set_capacity(server_id, capacity)
        await self.push()
        return changed

    async def set_mode(self, mode: Mode | None) -> Mode:
        if mode == "dynamic" and not self._shares_sessions:
            raise NotPossibleHere(
                f"dynamic mode across {len(self._workers().members)} workers needs their sessions shared: "
                "start lbd with --cluster redis://HOST:PORT/0, or with --workers 1; nothing was changed",
                "needs_cluster",
            )
        switched = await self.inner.set_mode(mode)
        await self.push()
        return switched

    async def in_flight(self, server_id: str) -> int:
        answers = await self._workers().each("GET", f"/v1/servers/{server_id}")
        return sum(int(body["active"]) for _, status, body in answers if status == 200)

    async def push(self) -> None:
        """Bring every worker that takes state to the supervisor's, or restart it."""
        if self._snapshot is None:
            return
        async with self._lock:
            snapshot = self._snapshot()
            targets = [worker for worker in self._workers().members if worker.synced and worker.alive]
            await asyncio.gather(*(push_state(worker, snapshot) for worker in targets))


async def push_state(worker: WorkerProcess, snapshot: StateSnapshot) -> None:
    try:
        status, body = await worker.call("PUT", STATE_PATH, snapshot.to_json())
        if status == 200:
            return
        why = f"answered {status}: {body}"
    except Exception as exc:
        why = f"did not answer ({type(exc).__name__}: {exc})"
    log.error("worker %d %s to a state change; restarting it so it starts from the state in effect", worker.index, why)
    worker.signal(signal.SIGKILL)
