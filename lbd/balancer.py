"""The routing policy: which server a request goes to, given the registry and the mode.

The proxy asks `choose()`; the answer is a server or a `NoServer` error naming why. Static mode
hashes the client id over the servers in rotation; a bounded cache of first choices keeps repeated
clients O(1) and is dropped whenever membership changes.
"""

from __future__ import annotations

from collections import OrderedDict

from lbd.config import Mode
from lbd.models import Server
from lbd.registry import Registry
from lbd.routing.static import RendezvousTable

DECISION_CACHE_SIZE = 65_536


class NoServer(Exception):
    """No server can take this request (answered with 503)."""


class Balancer:
    def __init__(self, registry: Registry, mode: Mode) -> None:
        self.registry = registry
        self.mode: Mode = mode
        self._table = RendezvousTable(())
        self._first_choice: OrderedDict[str, str] = OrderedDict()
        registry.subscribe(self._membership_changed)
        self._membership_changed()

    def _membership_changed(self) -> None:
        self._table = RendezvousTable((s.id, s.spec.capacity) for s in self.registry.servers())
        self._first_choice.clear()

    def choose(self, client_id: str) -> Server:
        """The server for this client: its hash choice, or the next in its order if that one is out."""
        server_id = self._first_choice.get(client_id)
        if server_id is None:
            server_id = self._table.pick(client_id)
            if server_id is None:
                raise NoServer("no servers are configured")
            if len(self._first_choice) >= DECISION_CACHE_SIZE:
                self._first_choice.popitem(last=False)
            self._first_choice[client_id] = server_id
        server = self.registry.get(server_id)
        if server is not None and _takes_new_requests(server):
            return server
        fallback = self._table.pick_available(client_id, self._available)
        if fallback is None:
            raise NoServer("no server is in rotation")
        chosen = self.registry.get(fallback)
        assert chosen is not None
        return chosen

    def _available(self, server_id: str) -> bool:
        server = self.registry.get(server_id)
        return server is not None and _takes_new_requests(server)


def _takes_new_requests(server: Server) -> bool:
    return server.state.health.in_rotation
