"""The routing policy: which server a request goes to, given the registry, the sessions and the mode.

- static: the client id's capacity-weighted rendezvous hash over servers in rotation and not
  draining; a down or draining server's clients take their next choice, nobody else moves. A
  bounded cache of first choices keeps repeated clients O(1); it is dropped on membership change.
- dynamic: a live session wins while its server is usable; a session whose server is nearly full
  (>= 90% of capacity) is served by a backup without losing the session; a client without a usable
  session gets the best-scoring available server of its region or the nearest region with one,
  and is pinned to it.

`backup()` chooses where a failed request is retried. The mode switches live; requests in flight
keep the server they already have.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Final

from lbd.config import Mode, Regions
from lbd.models import Server
from lbd.registry import Registry
from lbd.routing import dynamic
from lbd.routing.static import RendezvousTable, digest64
from lbd.sessions import Session, SessionTable

DECISION_CACHE_SIZE: Final = 65_536
# Why a server was chosen (the `reason` of `lbctl route`)
REASON_HASH: Final = "hash"  # static: the client's first choice
REASON_HASH_NEXT: Final = "hash_next"  # static: the first choice is out; next in the client's order
REASON_STICKY: Final = "sticky"  # dynamic: the client's live session
REASON_BACKUP_FULL: Final = "backup_nearly_full"  # dynamic: session server >= 90% full, a backup serves
REASON_MOVED: Final = "moved"  # dynamic: session server left / draining / out of rotation
REASON_BEST: Final = "best_in_region"  # dynamic: best score in the client's region
REASON_FALLBACK: Final = "fallback_region"  # dynamic: nearest region in proximity order with a server


class NoServer(Exception):
    """No server can take this request (answered with 503)."""


class BadRoute(Exception):
    """The request lacks what its routing needs, or names an unknown region (answered with 400)."""


def takes_new_requests(server: Server) -> bool:
    """In rotation and not draining: may receive requests that are not already in flight."""
    return server.state.health.in_rotation and not server.state.draining


class Balancer:
    def __init__(
        self,
        registry: Registry,
        mode: Mode,
        regions: Regions,
        sessions: SessionTable,
        default_client_region: str | None = None,
    ) -> None:
        self.registry = registry
        self.mode: Mode = mode
        self.regions = regions
        self.sessions = sessions
        self.default_client_region = default_client_region
        self._table = RendezvousTable(())
        self._index = dynamic.RegionIndex.build(())
        self._first_choice: OrderedDict[str, str] = OrderedDict()
        registry.subscribe(self._membership_changed)
        self._membership_changed()

    def _membership_changed(self) -> None:
        servers = self.registry.servers()
        self._table = RendezvousTable((s.id, s.spec.capacity) for s in servers)
        self._index = dynamic.RegionIndex.build(servers)
        self._first_choice.clear()

    def set_mode(self, mode: Mode) -> None:
        self.mode = mode

    def configure(self, regions: Regions, default_client_region: str | None) -> None:
        """Reloaded regions (proximity orders) and default client region, used from the next choice on."""
        self.regions = regions
        self.default_client_region = default_client_region

    # --- choosing ---------------------------------------------------------------------------------

    def choose(self, client_id: str, client_region: str | None, now: float) -> Server:
        if self.mode == "static":
            return self._static_choice(client_id)[0]
        region = self.resolve_region(client_region)
        server, _, repin = self._dynamic_decision(client_id, region, self.sessions.get(client_id, now))
        if repin:
            self.sessions.pin(client_id, server.id, region, now)
        return server

    def explain(self, client_id: str, client_region: str | None, now: float) -> dict[str, Any]:
        """What `choose` would do for this client now, and why, without changing anything."""
        if self.mode == "static":
            server, reason = self._static_choice(client_id)
            candidates = [
                {
                    "server": s.id,
                    "region": s.spec.region,
                    "capacity": s.spec.capacity,
                    "available": takes_new_requests(s),
                }
                for s in (self.registry.get(server_id) for server_id in self._table.rank(client_id))
                if s is not None
            ]
            first = candidates[0]["server"] if candidates else None
            detail = f"hash of the client id picks {server.id}"
            if reason == REASON_HASH_NEXT:
                detail = f"first choice {first} is out of rotation or draining; next in the client's hash order"
            return {"mode": "static", "client_id": client_id, "server": server.id, "reason": reason,
                    "detail": detail, "candidates": candidates}  # fmt: skip
        region = self.resolve_region(client_region)
        session = self.sessions.peek(client_id, now)
        server, reason, _ = self._dynamic_decision(client_id, region, session)
        key = digest64(client_id)
        candidates = [
            {
                "server": s.id,
                "region": r,
                "score": round(score, 4),
                "active": s.state.active,
                "capacity": s.spec.capacity,
                "available": dynamic.is_available(s),
            }
            for r, s, score in dynamic.ranked(self._index, key, self.regions.proximity[region])
        ]
        return {
            "mode": "dynamic",
            "client_id": client_id,
            "client_region": region,
            "server": server.id,
            "server_region": server.spec.region,
            "reason": reason,
            "detail": self._dynamic_detail(reason, server, region, session),
            "session": None
            if session is None
            else {"server": session.server_id, "idle_s": round(now - session.last_seen, 3)},
            "candidates": candidates,
        }

    def _dynamic_detail(self, reason: str, server: Server, region: str, session: Session | None) -> str:
        pinned = None if session is None else self.registry.get(session.server_id)
        if reason == REASON_STICKY:
            return f"live session with {server.id}"
        if reason == REASON_BACKUP_FULL and pinned is not None:
            load = f"{pinned.state.active}/{pinned.spec.capacity}"
            return f"session server {pinned.id} is nearly full ({load}); served by a backup, session kept"
        if reason == REASON_MOVED and session is not None:
            why = "left" if pinned is None else "is draining" if pinned.state.draining else "is out of rotation"
            return f"session server {session.server_id} {why}; moved to {server.id} and re-pinned"
        if reason == REASON_FALLBACK:
            return f"no available server in {region}; nearest region with one is {server.spec.region}"
        return f"best score among available servers in {region}"

    def resolve_region(self, client_region: str | None) -> str:
        """The client's region from its header or the configured default; 400 when neither fits."""
        region = client_region or self.default_client_region
        if region is None:
            raise BadRoute(
                "missing the client-region header; dynamic mode routes each client to a server near its "
                f"region (known regions: {', '.join(sorted(self.regions.proximity))})"
            )
        if region not in self.regions.proximity:
            raise BadRoute(
                f"unknown client region {region!r} in the client-region header; "
                f"known regions: {', '.join(sorted(self.regions.proximity))}"
            )
        return region

    def _static_choice(self, client_id: str) -> tuple[Server, str]:
        server_id = self._first_choice.get(client_id)
        if server_id is None:
            server_id = self._table.pick(client_id)
            if server_id is None:
                raise NoServer("no servers are registered")
            if len(self._first_choice) >= DECISION_CACHE_SIZE:
                self._first_choice.popitem(last=False)
            self._first_choice[client_id] = server_id
        server = self.registry.get(server_id)
        if server is not None and takes_new_requests(server):
            return server, REASON_HASH
        return self._static_next(client_id, exclude=None), REASON_HASH_NEXT

    def _static_next(self, client_id: str, exclude: Server | None) -> Server:
        def usable(server_id: str) -> bool:
            server = self.registry.get(server_id)
            return server is not None and server is not exclude and takes_new_requests(server)

        fallback = self._table.pick_available(client_id, usable)
        if fallback is None:
            raise NoServer("no server is in rotation")
        chosen = self.registry.get(fallback)
        assert chosen is not None
        return chosen

    def _dynamic_decision(self, client_id: str, region: str, session: Session | None) -> tuple[Server, str, bool]:
        """(server, reason, whether the client must be (re-)pinned to it): pure given the session."""
        if session is not None:
            pinned = self.registry.get(session.server_id)
            if pinned is not None and takes_new_requests(pinned):
                if not dynamic.is_nearly_full(pinned):
                    return pinned, REASON_STICKY, False
                relief = dynamic.pick(self._index, digest64(client_id), self.regions.proximity[region], pinned)
                if relief is not None:
                    return relief.server, REASON_BACKUP_FULL, False  # the session stays with its server
                if pinned.state.active < pinned.spec.capacity:
                    return pinned, REASON_STICKY, False
                raise NoServer(f"server {pinned.id} is at capacity and no other server is available")
        choice = dynamic.pick(self._index, digest64(client_id), self.regions.proximity[region])
        if choice is None:
            raise NoServer(
                f"no available server for client region {region} or its fallbacks "
                f"({', '.join(self.regions.proximity[region][1:]) or 'none'})"
            )
        if session is not None:
            return choice.server, REASON_MOVED, True
        return choice.server, REASON_FALLBACK if choice.fallback else REASON_BEST, True

    def backup(self, client_id: str, client_region: str | None, failed: Server, now: float) -> Server | None:
        """Where to retry a request whose server failed before answering; re-pins the session."""
        if self.mode == "static":
            try:
                return self._static_next(client_id, exclude=failed)
            except NoServer:
                return None
        region = self.resolve_region(client_region)
        choice = dynamic.pick(self._index, digest64(client_id), self.regions.proximity[region], failed)
        if choice is None:
            return None
        self.sessions.pin(client_id, choice.server.id, region, now)
        return choice.server
