"""The routing policy: which server a request goes to, given the registry, the sessions and the mode.

- static: the client id's bucket in the capacity-weighted rendezvous table (routing/static.py);
  a down or draining server's clients take their bucket's next choice, nobody else moves.
- dynamic: a live session wins while its server is usable; a session whose server is nearly full
  (>= 90% of capacity) is served by a backup without losing the session; a client without a usable
  session gets the best-scoring available server of its region or the nearest region with one
  (routing/dynamic.py: sessions and requests in flight per capacity, times a latency factor), and
  is pinned to it.

Membership changes reach the table and the region index one server at a time (`Change`), so
registering a server costs O(buckets + region), not a rebuild. The daemon calls `warm()` between
requests to fill the static table in slices; until a bucket is filled it is computed on first use.

`backup()` chooses where a failed request is retried. The mode switches live; requests in flight
keep the server they already have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Protocol

from lbd.config import Mode, Regions
from lbd.models import Server
from lbd.registry import Change, Registry
from lbd.routing import dynamic
from lbd.routing.static import BucketTable, client_bucket, digest64
from lbd.sessions import Session, SessionTable

WARM_SLICE: Final = 200_000  # hash evaluations per `warm()`: about a millisecond, compiled
# Client id -> bucket for clients that come back: a dict lookup instead of a SHA-256 (0.02 against
# 0.5 us). A bucket never depends on the servers, so nothing invalidates it; full, it starts over.
BUCKET_MEMO_SIZE: Final = 65_536
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


@dataclass(frozen=True, slots=True)
class Candidate:
    """A server the balancer considered, in its order, and whether it could take a new client."""

    server: Server
    region: str
    available: bool


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """`Balancer.explain`'s answer: the choice a request would get now and what it rests on. Data
    only; the admin API's views put it into words."""

    mode: Mode
    client_id: str
    server: Server
    reason: str  # one of the REASON_* names
    candidates: tuple[Candidate, ...]
    now: float
    bucket: int | None = None  # static: the client id's bucket
    client_region: str | None = None  # dynamic
    session: Session | None = None  # dynamic: the live session, if any
    session_server: Server | None = None  # the session's server as registered now (None: it left)


class SharedSessions(Protocol):
    """A cluster's sessions (lbd/store/cluster.py): told of pins made here and of sessions used."""

    def pinned(self, client_id: str, server_id: str, region: str | None) -> None: ...

    def touched(self, client_id: str, session: Session, now: float) -> None: ...


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
        self.shared: SharedSessions | None = None  # set when lbd is part of a cluster
        self.default_client_region = default_client_region
        servers = registry.servers()
        self._table = BucketTable((s.id, s.spec.capacity) for s in servers)
        self._index = dynamic.RegionIndex.build(servers)
        self._buckets: dict[str, int] = {}
        registry.subscribe(self._membership_changed)

    def _membership_changed(self, change: Change) -> None:
        for server in change.removed:
            if server.id in self._table:
                self._table.remove(server.id)
            self._index.remove(server)
        for server in change.added:
            if server.id in self._table:
                self._table.remove(server.id)
            self._table.add(server.id, server.spec.capacity)
            self._index.add(server)
        for server in change.reweighted:  # leaves and joins again: only the moves its weight implies
            self._table.remove(server.id)
            self._table.add(server.id, server.spec.capacity)
            self._index.remove(server)
            self._index.add(server)

    def warm(self) -> bool:
        """In static mode, compute a slice of the table's cold buckets; True while some remain."""
        return self.mode == "static" and self._table.fill(WARM_SLICE)

    def score_terms(self, server: Server, now: float) -> dict[str, int | float]:
        """Server `server`'s dynamic-mode score now, and its terms (numbers only)."""
        return dynamic.score_terms(server, self.sessions.by_server.get(server.id, 0), now)

    def set_mode(self, mode: Mode) -> None:
        self.mode = mode

    def configure(self, regions: Regions, default_client_region: str | None) -> None:
        """Reloaded regions (proximity orders) and default client region, used from the next choice on."""
        self.regions = regions
        self.default_client_region = default_client_region

    # --- choosing ---------------------------------------------------------------------------------

    def choose(self, client_id: str, client_region: str | None, now: float) -> Server:
        return self.route(client_id, client_region, now)[0]

    def route(self, client_id: str, client_region: str | None, now: float) -> tuple[Server, str]:
        """The server for this request and why (a REASON_*, the access log's `route`); pins as needed."""
        if self.mode == "static":
            return self._static_choice(client_id)
        region = self.resolve_region(client_region)
        session = self.sessions.get(client_id, now)
        server, reason, repin = self._dynamic_decision(client_id, region, session, now)
        shared = self.shared
        if repin:
            self.sessions.pin(client_id, server.id, region, now)
            if shared is not None:
                shared.pinned(client_id, server.id, region)
        elif shared is not None and session is not None:
            shared.touched(client_id, session, now)
        return server, reason

    def proposal(self, client_id: str, client_region: str | None, now: float) -> Server:
        """Where a client without a session would go now (a cluster asks the store whether another
        instance pinned it first); changes nothing."""
        region = self.resolve_region(client_region)
        return self._dynamic_decision(client_id, region, None, now)[0]

    def explain(self, client_id: str, client_region: str | None, now: float) -> RouteDecision:
        """What `choose` would do for this client now, and why, without changing anything."""
        if self.mode == "static":
            server, reason = self._static_choice(client_id)
            ranked = (self.registry.get(server_id) for server_id in self._table.rank(client_id))
            static_candidates = tuple(Candidate(s, s.spec.region, s.in_rotation) for s in ranked if s is not None)
            return RouteDecision("static", client_id, server, reason, static_candidates, now, client_bucket(client_id))
        region = self.resolve_region(client_region)
        session = self.sessions.peek(client_id, now)
        server, reason, _ = self._dynamic_decision(client_id, region, session, now)
        ordered = dynamic.ranked(
            self._index, digest64(client_id), self.regions.proximity[region], self.sessions.by_server, now
        )
        candidates = tuple(Candidate(s, r, dynamic.is_available(s)) for r, s, _ in ordered)
        pinned = None if session is None else self.registry.get(session.server_id)
        return RouteDecision("dynamic", client_id, server, reason, candidates, now, None, region, session, pinned)

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

    def _bucket(self, client_id: str) -> int:
        bucket = self._buckets.get(client_id)
        if bucket is None:
            bucket = client_bucket(client_id)
            if len(self._buckets) >= BUCKET_MEMO_SIZE:
                self._buckets.clear()
            self._buckets[client_id] = bucket
        return bucket

    def _static_choice(self, client_id: str) -> tuple[Server, str]:
        bucket = self._bucket(client_id)
        server_id = self._table.owner(bucket)
        if server_id is None:
            raise NoServer("no servers are registered")
        server = self.registry.get(server_id)
        if server is not None and server.in_rotation:
            return server, REASON_HASH
        return self._static_next(bucket, exclude=None), REASON_HASH_NEXT

    def _static_next(self, bucket: int, exclude: Server | None) -> Server:
        """The bucket's best server taking new requests, other than `exclude`."""

        def usable(server_id: str) -> bool:
            server = self.registry.get(server_id)
            return server is not None and server is not exclude and server.in_rotation

        first = self._table.owner(bucket)
        fallback = first if first is not None and usable(first) else self._table.next_choice(bucket, usable)
        if fallback is None:
            raise NoServer("no server is in rotation")
        chosen = self.registry.get(fallback)
        assert chosen is not None
        return chosen

    def _dynamic_decision(
        self, client_id: str, region: str, session: Session | None, now: float
    ) -> tuple[Server, str, bool]:
        """(server, reason, whether the client must be (re-)pinned to it): pure given the session."""
        counts = self.sessions.by_server
        if session is not None:
            pinned = self.registry.get(session.server_id)
            if pinned is not None and pinned.in_rotation:
                if not dynamic.is_nearly_full(pinned):
                    return pinned, REASON_STICKY, False
                relief = dynamic.pick(
                    self._index, digest64(client_id), self.regions.proximity[region], counts, now, pinned
                )
                if relief is not None:
                    return relief.server, REASON_BACKUP_FULL, False  # the session stays with its server
                if pinned.state.active < pinned.spec.capacity:
                    return pinned, REASON_STICKY, False
                raise NoServer(f"server {pinned.id} is at capacity and no other server is available")
        choice = dynamic.pick(self._index, digest64(client_id), self.regions.proximity[region], counts, now)
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
                return self._static_next(self._bucket(client_id), exclude=failed)
            except NoServer:
                return None
        region = self.resolve_region(client_region)
        proximity = self.regions.proximity[region]
        choice = dynamic.pick(self._index, digest64(client_id), proximity, self.sessions.by_server, now, failed)
        if choice is None:
            return None
        self.sessions.pin(client_id, choice.server.id, region, now)
        if self.shared is not None:
            self.shared.pinned(client_id, choice.server.id, region)
        return choice.server
