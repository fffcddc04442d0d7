"""The routing policy: which server a request goes to, given the registry, the sessions and the mode.

- static: the client id's bucket in the capacity-weighted rendezvous table (routing/static.py);
  a down or draining server's clients take their bucket's next choice, nobody else moves.
- dynamic: a live session wins while its server is usable; a session whose server is nearly full
  (>= 90% of capacity) is served by a backup without losing the session; a client without a usable
  session gets the best-scoring available server of its region or the nearest region with one
  (routing/dynamic.py: sessions and requests in flight per capacity, times a latency factor), and
  is pinned to it. Which regions a new choice may use follows the spill rule, and a session away
  from its home region goes back by the failback rule (routing/regions.py); both read region totals
  the balancer refreshes from the servers every second (`_refresh_regions`), not per request.

Membership changes reach the table and the region index one server at a time (`Change`), so
registering a server costs O(buckets + region), not a rebuild. The daemon calls `warm()` between
requests to fill the static table in slices; until a bucket is filled it is computed on first use.

`backup()` chooses where a failed request is retried. The mode switches live; requests in flight
keep the server they already have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from lbd.config import FailoverSettings, Mode, Regions
from lbd.models import Server
from lbd.registry import Change, Registry
from lbd.routing import dynamic
from lbd.routing import regions as region_rules
from lbd.routing.static import BucketTable, client_bucket, digest64
from lbd.sessions import Session, SessionTable

if TYPE_CHECKING:
    from lbd.store.session_sync import SessionSync

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
REASON_SPILL: Final = "spill"  # dynamic: nearer regions were full (their load at their max_load); the next with room
REASON_FAILBACK: Final = "failback"  # dynamic: session away from its home region, sent home and re-pinned
# Region totals (routing/regions.py) are measured from the servers this often; sooner (but not more
# often than MIN_REFRESH_S) once a region has had EARLY_REFRESH_PINS clients pinned since, or that
# share of its sessions, so a burst of moves is weighed by what it really brings.
REFRESH_S: Final = 1.0
# A nearly full server's request looks this far past each draw for a server with headroom, then takes
# any available one: in a region whose servers are all nearly full, an unbounded look is a scan.
RELIEF_PROBES: Final = 16
MIN_REFRESH_S: Final = 0.05
EARLY_REFRESH_PINS: Final = 64
EARLY_REFRESH_SHARE: Final = 0.005


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
    regions: tuple[RegionView, ...] = ()  # dynamic: the client's proximity order as the spill rule sees it
    failback: FailbackView | None = None  # dynamic: a session away from its home region


@dataclass(frozen=True, slots=True)
class RegionView:
    """One region of a client's proximity order: its totals and whether a new choice may use it."""

    region: str
    home: bool  # the client's home region (first of its order)
    capacity: int  # of its servers in rotation
    load: float  # requests in flight, as the spill rule estimates them
    max_load: float  # the utilization up to which it takes this client
    room: bool
    available_for_s: float  # how long it has had room for its own clients (negative: it has none)


@dataclass(frozen=True, slots=True)
class FailbackView:
    """Where a session away from its home region stands in the failback rule."""

    home: str
    enabled: bool
    available_for_s: float  # how long home has had room (negative: it has none)
    stable_s: float
    ramp_s: float
    admitted: float  # the share of away clients allowed back now
    client_share: float  # this client's place in line: it goes back once `admitted` is above it
    room: bool  # home has room for one more client now


class Balancer:
    def __init__(
        self,
        registry: Registry,
        mode: Mode,
        regions: Regions,
        sessions: SessionTable,
        default_client_region: str | None = None,
        failover: FailoverSettings | None = None,
    ) -> None:
        self.registry = registry
        self.mode: Mode = mode
        self._proximity = dict(regions.proximity)  # read per request: a dict held here, not the config's Mapping
        self.sessions = sessions
        self.shared: SessionSync | None = None  # set when lbd is part of a cluster
        self.default_client_region = default_client_region
        self.failover = failover or FailoverSettings()
        servers = registry.servers()
        self._table = BucketTable((s.id, s.spec.capacity) for s in servers)
        self._index = dynamic.RegionIndex.build(servers)
        self._buckets: dict[str, int] = {}
        self._loads: dict[str, region_rules.RegionLoad] = {}  # server region -> totals (routing/regions.py)
        self._refreshed_at = 0.0
        self._refresh_at = 0.0  # the next choice at or after this refreshes the region totals
        # new choices by reason (sticky requests are not counted: they are the rest)
        self.decisions: dict[str, int] = {}
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
        self._proximity = dict(regions.proximity)  # read per request: a dict held here, not the config's Mapping
        self.default_client_region = default_client_region

    def configure_failover(self, failover: FailoverSettings) -> None:
        """Reloaded spill limits and failback settings, used from the next choice on."""
        self.failover = failover
        self._refresh_at = 0.0  # a region's room depends on the limits: measure again

    # --- region totals (spill and failback) ---------------------------------------------------------

    def region_loads(self, now: float) -> dict[str, region_rules.RegionLoad]:
        """Each server region's totals as the next choice sees them (refreshed when due)."""
        if now >= self._refresh_at:
            self._refresh_regions(now)
        return self._loads

    def _refresh_regions(self, now: float) -> None:
        """Measure every region's capacity, requests in flight and sessions on its servers in rotation:
        O(servers), at most every MIN_REFRESH_S and normally every REFRESH_S."""
        counts = self.sessions.by_server
        measured: list[tuple[str, int, int, int]] = []
        total_active = 0
        total_sessions = 0
        for name, members in self._index.by_region.items():
            capacity = active = pinned = 0
            for server in members.servers:
                if server.in_rotation:
                    capacity += server.spec.capacity
                    active += server.state.active
                    pinned += counts.get(server.id, 0)
            measured.append((name, capacity, active, pinned))
            total_active += active
            total_sessions += pinned
        overall = total_active / total_sessions if total_sessions > 0 else 0.0
        loads: dict[str, region_rules.RegionLoad] = {}
        for name, capacity, active, pinned in measured:
            load = self._loads.get(name)
            if load is None:
                load = region_rules.RegionLoad()
            region_rules.observe(load, capacity, active, pinned, now, self.failover.home_max_load, overall)
            loads[name] = load
        self._loads = loads
        self._refreshed_at = now
        self._refresh_at = now + REFRESH_S

    def note_pin(self, server: Server) -> None:
        """One more client pinned to `server`: its region's load grows by the estimate per session until
        the next refresh measures it, which comes sooner when many are pinned at once."""
        load = self._loads.get(server.spec.region)
        if load is None:
            return
        load.pinned += 1
        if load.pinned >= max(EARLY_REFRESH_PINS, EARLY_REFRESH_SHARE * load.sessions):
            self._refresh_at = min(self._refresh_at, self._refreshed_at + MIN_REFRESH_S)

    def _spill_order(self, region: str) -> list[str]:
        settings = self.failover
        return region_rules.spill_order(
            self._proximity[region], self._loads, settings.home_max_load, settings.fallback_max_load
        )

    def _failback_choice(self, client_id: str, home: str, now: float) -> Server | None:
        """A server of the home region for a session away from it, if the failback rule lets it go back now."""
        load = self._loads.get(home)
        if load is None or not load.has_room(self.failover.home_max_load):
            return None
        settings = self.failover
        share = region_rules.admitted(
            load.available_for(now), settings.failback_stable_ms / 1000.0, settings.failback_ramp_ms / 1000.0
        )
        if share <= 0.0:
            return None
        key = digest64(client_id)
        if share < 1.0 and region_rules.client_share(key) >= share:
            return None
        choice = dynamic.pick(self._index, key, (home,), self.sessions.by_server, now)
        return None if choice is None else choice.server

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
        if reason != REASON_STICKY:
            self.decisions[reason] = self.decisions.get(reason, 0) + 1
        shared = self.shared
        if repin:
            self.sessions.pin(client_id, server.id, region, now)
            self.note_pin(server)
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
            self._index, digest64(client_id), self._proximity[region], self.sessions.by_server, now
        )
        candidates = tuple(Candidate(s, r, dynamic.is_available(s)) for r, s, _ in ordered)
        pinned = None if session is None else self.registry.get(session.server_id)
        return RouteDecision(
            "dynamic", client_id, server, reason, candidates, now, None, region, session, pinned,
            self._region_views(region, now), self._failback_view(client_id, region, pinned, now),
        )  # fmt: skip

    def _region_views(self, region: str, now: float) -> tuple[RegionView, ...]:
        settings = self.failover
        views: list[RegionView] = []
        for position, name in enumerate(self._proximity[region]):
            load = self._loads.get(name)
            if load is None:
                continue
            limit = settings.home_max_load if position == 0 else settings.fallback_max_load
            views.append(
                RegionView(
                    name, position == 0, load.capacity, load.load, limit, load.has_room(limit), load.available_for(now)
                )
            )
        return tuple(views)

    def _failback_view(self, client_id: str, region: str, pinned: Server | None, now: float) -> FailbackView | None:
        home = self._proximity[region][0]
        if pinned is None or pinned.spec.region == home:
            return None
        settings = self.failover
        load = self._loads.get(home)
        available_for = -1.0 if load is None else load.available_for(now)
        stable_s, ramp_s = settings.failback_stable_ms / 1000.0, settings.failback_ramp_ms / 1000.0
        return FailbackView(
            home, settings.failback, available_for, stable_s, ramp_s,
            region_rules.admitted(available_for, stable_s, ramp_s), region_rules.client_share(digest64(client_id)),
            load is not None and load.has_room(settings.home_max_load),
        )  # fmt: skip

    def resolve_region(self, client_region: str | None) -> str:
        """The client's region from its header or the configured default; 400 when neither fits."""
        region = client_region or self.default_client_region
        if region is None:
            raise BadRoute(
                "missing the client-region header; dynamic mode routes each client to a server near its "
                f"region (known regions: {', '.join(sorted(self._proximity))})"
            )
        if region not in self._proximity:
            raise BadRoute(
                f"unknown client region {region!r} in the client-region header; "
                f"known regions: {', '.join(sorted(self._proximity))}"
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
        """(server, reason, whether the client must be (re-)pinned to it): pure given the session and the
        region totals (refreshed here when due)."""
        if now >= self._refresh_at:
            self._refresh_regions(now)
        counts = self.sessions.by_server
        if session is not None:
            pinned = self.registry.get(session.server_id)
            if pinned is not None and pinned.in_rotation:
                home = self._proximity[region][0]
                if pinned.spec.region != home and self.failover.failback:
                    back = self._failback_choice(client_id, home, now)
                    if back is not None:
                        return back, REASON_FAILBACK, True
                if not dynamic.is_nearly_full(pinned):
                    return pinned, REASON_STICKY, False
                order = self._spill_order(region)
                key = digest64(client_id)
                relief = dynamic.pick(self._index, key, order, counts, now, pinned, dynamic.has_headroom, RELIEF_PROBES)
                if relief is None:  # nothing with headroom: any available server but this one
                    relief = dynamic.pick(self._index, key, order, counts, now, pinned)
                if relief is not None:
                    return relief.server, REASON_BACKUP_FULL, False  # the session stays with its server
                if pinned.state.active < pinned.spec.capacity:
                    return pinned, REASON_STICKY, False
                raise NoServer(f"server {pinned.id} is at capacity and no other server is available")
        choice = dynamic.pick(self._index, digest64(client_id), self._spill_order(region), counts, now)
        if choice is None:
            raise NoServer(
                f"no available server for client region {region} or its fallbacks "
                f"({', '.join(self._proximity[region][1:]) or 'none'})"
            )
        if session is not None:
            return choice.server, REASON_MOVED, True
        return choice.server, self._new_client_reason(region, choice.region), True

    def _new_client_reason(self, region: str, chosen: str) -> str:
        """best_in_region at home; spill when a region nearer than the chosen one was full; else
        fallback_region (the nearer ones had no available server)."""
        proximity = self._proximity[region]
        if chosen == proximity[0]:
            return REASON_BEST
        settings = self.failover
        for position, name in enumerate(proximity):
            if name == chosen:
                break
            load = self._loads.get(name)
            limit = settings.home_max_load if position == 0 else settings.fallback_max_load
            if load is not None and load.capacity > 0 and not load.has_room(limit):
                return REASON_SPILL
        return REASON_FALLBACK

    def backup(self, client_id: str, client_region: str | None, failed: Server, now: float) -> Server | None:
        """Where to retry a request whose server failed before answering; re-pins the session."""
        if self.mode == "static":
            try:
                return self._static_next(self._bucket(client_id), exclude=failed)
            except NoServer:
                return None
        region = self.resolve_region(client_region)
        if now >= self._refresh_at:
            self._refresh_regions(now)
        order = self._spill_order(region)
        choice = dynamic.pick(self._index, digest64(client_id), order, self.sessions.by_server, now, failed)
        if choice is None:
            return None
        self.sessions.pin(client_id, choice.server.id, region, now)
        if self.shared is not None:
            self.shared.pinned(client_id, choice.server.id, region)
        self.note_pin(choice.server)
        self.decisions["retry"] = self.decisions.get("retry", 0) + 1
        return choice.server
