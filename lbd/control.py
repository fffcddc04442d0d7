"""The changes operators make to servers and the mode, in one place.

`Changes` applies a change here: to the registry and balancer (and what follows from it: the
sessions of a removed server, its idle connections). `LocalControl` is one instance's control
plane: apply, then save the state file before the admin API answers. A cluster's control plane
(lbd/store/cluster.py) sends the same changes through the shared store instead, and every instance,
this one included, applies them with `Changes` in the order the store gave them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from typing import Protocol

from lbd.balancer import Balancer
from lbd.config import Mode
from lbd.models import Server, ServerSpec
from lbd.proxy.pool import UpstreamPool
from lbd.registry import Registry
from lbd.sessions import SessionTable


class Changes:
    """Applies one change to this instance's state: only through the registry and balancer."""

    def __init__(self, registry: Registry, balancer: Balancer, sessions: SessionTable, pool: UpstreamPool) -> None:
        self.registry = registry
        self.balancer = balancer
        self.sessions = sessions
        self.pool = pool

    def register(self, specs: list[ServerSpec]) -> list[str]:
        """Register every spec (checked for conflicts first: all or nothing); the ids created."""
        for spec in specs:
            self.registry.check_conflict(spec)
        return [spec.id for spec in specs if self.registry.register(spec)[1]]

    def replace(self, spec: ServerSpec) -> None:
        """A server of this id with other settings (a cluster's registration over a file's entry)."""
        existing = self.registry.get(spec.id)
        if existing is not None and existing.spec == spec:
            return
        if existing is not None:
            draining = existing.state.draining
            self.remove(spec.id)
            self.registry.register(spec)
            self.registry.set_draining(spec.id, draining)
        else:
            self.registry.register(spec)

    def remove(self, server_id: str) -> int:
        """Deregister a server, forget its sessions and idle connections; the sessions dropped."""
        if self.registry.deregister(server_id) is None:
            return 0
        self.pool.close_idle(server_id=server_id)
        return self.sessions.remove_server(server_id)

    def set_draining(self, server_id: str, draining: bool) -> Server | None:
        return self.registry.set_draining(server_id, draining)

    def set_capacity(self, server_id: str, capacity: int) -> tuple[Server, int] | None:
        return self.registry.set_capacity(server_id, capacity)

    def set_mode(self, mode: Mode) -> None:
        self.balancer.set_mode(mode)

    def hold(self, wanted: Mapping[str, ServerSpec], draining: Collection[str], mode: Mode) -> None:
        """Make this instance hold exactly these servers, drain flags and mode (a resync from a
        cluster store's snapshot, or a supervisor's state for its workers): a server whose only
        change is its capacity is reweighted in place, keeping its sessions and counters."""
        for server in self.registry.servers():
            if server.id not in wanted:
                self.remove(server.id)
        for spec in wanted.values():
            existing = self.registry.get(spec.id)
            if (
                existing is not None
                and existing.spec != spec
                and replace(existing.spec, capacity=spec.capacity) == spec
            ):
                self.set_capacity(spec.id, spec.capacity)
            else:
                self.replace(spec)
            self.set_draining(spec.id, spec.id in draining)
        self.set_mode(mode)


class Control(Protocol):
    """What the admin API changes through: one instance's (LocalControl) or a cluster's."""

    @property
    def changes(self) -> Changes: ...

    async def register(self, specs: list[ServerSpec]) -> list[str]: ...

    async def remove(self, server_id: str) -> int: ...

    async def set_draining(self, server_id: str, draining: bool) -> Server | None: ...

    async def set_capacity(self, server_id: str, capacity: int) -> tuple[Server, int] | None: ...

    async def set_mode(self, mode: Mode | None) -> Mode: ...

    async def in_flight(self, server_id: str) -> int:
        """Requests in flight to the server wherever this control plane's proxy runs (a drain waits on it)."""
        ...


class LocalControl:
    """One instance: changes apply here and are saved to the state directory before the answer."""

    def __init__(self, changes: Changes, persist: Callable[[], None], use_config_mode: Callable[[], Mode]) -> None:
        self.changes = changes
        self._persist = persist
        self._use_config_mode = use_config_mode

    async def register(self, specs: list[ServerSpec]) -> list[str]:
        created = self.changes.register(specs)
        self._persist()  # also when nothing was created: a retry after a failed save gets it saved
        return created

    async def remove(self, server_id: str) -> int:
        dropped = self.changes.remove(server_id)
        self._persist()
        return dropped

    async def set_draining(self, server_id: str, draining: bool) -> Server | None:
        server = self.changes.set_draining(server_id, draining)
        if server is not None:
            self._persist()
        return server

    async def set_capacity(self, server_id: str, capacity: int) -> tuple[Server, int] | None:
        changed = self.changes.set_capacity(server_id, capacity)
        if changed is not None:
            self._persist()
        return changed

    async def set_mode(self, mode: Mode | None) -> Mode:
        """`mode`, or the config file's mode again (None)."""
        if mode is None:
            mode = self._use_config_mode()
        else:
            self.changes.set_mode(mode)
        self._persist()
        return mode

    async def in_flight(self, server_id: str) -> int:
        return in_flight_here(self.changes.registry, server_id)


def in_flight_here(registry: Registry, server_id: str) -> int:
    server = registry.get(server_id)
    return 0 if server is None else server.state.active
