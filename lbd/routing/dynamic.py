"""Region-aware, load-aware choice of a server for a client without a session (pure, no I/O).

Score (lower is better), for server `s` of a region:

    latency_factor(s) * (sessions(s) + active(s) + 1) / capacity(s)

- `sessions` are the live sticky sessions pinned to the server: each new client is a long-lived
  assignment, so the clients a server already holds are its load even between their requests;
  `active` (requests in flight) adds what it is busy with right now. Minimising the ratio to
  capacity spreads new clients in proportion to capacity (a server twice as big holds twice the
  sessions at the same score), as Envoy's LEAST_REQUEST weight / (active + 1) and Traefik's
  leasttime do for requests.
- `latency_factor` compares the server's latency estimate with its region's typical latency:
  `(estimate + L) / (typical + L)`, bounded to [1/4, 4], where `L` is the region's configured
  latency (at least 1 ms). Peak-EWMA (Envoy, Linkerd) multiplies load by latency; relative to the
  region's peers, the factor only says which server is slower, and `L` keeps jitter far below the
  region's expected latency from moving clients. A server never measured is scored at the region's
  typical latency (factor 1, neither favoured nor starved), and an idle server's estimate decays
  toward it (`ServerState.latency_estimate_ms`). The bound keeps a slow server in use (fewer new
  clients, never none) and a fast one from taking everything.

A server is *available* when it is in rotation, not draining and below its capacity (capacity is
the number of concurrent requests it takes). The client's region is tried first; when it has no
available server (empty, all full, all draining or out of rotation) the client region's proximity
order is walked.

Within a region of up to `EXACT_SCAN_LIMIT` servers the best score is found by a scan. Larger
regions compare `CHOICES` (4) servers drawn from the client id's hash with probability proportional
to capacity (power of d choices, as Envoy's LEAST_REQUEST with `choice_count` and HAProxy's
`random(<draws>)`), so a pick costs the same at 10 or 10,000 servers and shares still follow
capacity. Four rather than two: a server drawn less often than its share falls behind its peers
until it is drawn again, and with two draws at 10,000 servers the unluckiest small servers lag by a
quarter of their share (30 clients each); four halve that, for about 0.5 us more per new client.
Ties break by a hash of
(client id, server id): deterministic, so `lbctl route` predicts what the proxy will do and
separate lbd processes agree.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final

from lbd.models import Server
from lbd.routing.static import MASK64, digest64

EXACT_SCAN_LIMIT: Final = 8
CHOICES: Final = 4  # servers drawn per new client in a region larger than EXACT_SCAN_LIMIT
DRAW_SALTS: Final = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F)  # the third and fourth draws' hashes
NEARLY_FULL: Final = 0.9
LATENCY_FACTOR_BOUND: Final = 4.0
LATENCY_SCALE_FLOOR_MS: Final = 1.0


def latency_factor(server: Server, now: float) -> float:
    """How much slower (> 1) or faster (< 1) than its region's typical latency a server answers."""
    region = server.region_latency
    typical = region.typical_ms
    scale = max(region.configured_ms, LATENCY_SCALE_FLOOR_MS)
    factor = (server.state.latency_estimate_ms(typical, now) + scale) / (typical + scale)
    return min(LATENCY_FACTOR_BOUND, max(1.0 / LATENCY_FACTOR_BOUND, factor))


def score(server: Server, sessions: int, now: float) -> float:
    """The score of a server holding `sessions` sticky sessions (lower is better)."""
    return latency_factor(server, now) * (sessions + server.state.active + 1) / server.spec.capacity


def score_terms(server: Server, sessions: int, now: float) -> dict[str, int | float]:
    """The score and what it is made of, as numbers (for `lbctl route` and `lbctl servers`)."""
    region = server.region_latency
    factor = latency_factor(server, now)
    return {
        "score": round(factor * (sessions + server.state.active + 1) / server.spec.capacity, 4),
        "sessions": sessions,
        "active": server.state.active,
        "capacity": server.spec.capacity,
        "latency_ms": round(server.state.latency_estimate_ms(region.typical_ms, now), 3),
        "region_latency_ms": round(region.typical_ms, 3),
        "latency_factor": round(factor, 4),
    }


def is_available(server: Server) -> bool:
    state = server.state
    return server.in_rotation and state.active < server.spec.capacity


def is_nearly_full(server: Server) -> bool:
    return server.state.active >= NEARLY_FULL * server.spec.capacity


def has_headroom(server: Server) -> bool:
    """Available and not nearly full: where a nearly full server's request may go instead."""
    return server.in_rotation and server.state.active < NEARLY_FULL * server.spec.capacity


class RegionMembers:
    """One region's servers, sorted by id, with their id hashes and running capacity totals (for
    drawing servers in proportion to capacity); updated in place on membership change."""

    __slots__ = ("cumulative", "hashes", "ids", "servers")

    def __init__(self, servers: Iterable[Server] = ()) -> None:
        self.servers: list[Server] = sorted(servers, key=_server_id)
        self.ids: list[str] = [server.id for server in self.servers]
        self.hashes: list[int] = [digest64(server_id) for server_id in self.ids]
        self.cumulative: list[int] = []
        self._recount()

    def __len__(self) -> int:
        return len(self.servers)

    def add(self, server: Server) -> None:
        """One server joins: O(region), a list insertion and a recount."""
        position = bisect_right(self.ids, server.id)
        self.ids.insert(position, server.id)
        self.servers.insert(position, server)
        self.hashes.insert(position, digest64(server.id))
        self._recount()

    def remove(self, server: Server) -> None:
        position = bisect_right(self.ids, server.id) - 1
        if position >= 0 and self.servers[position] is server:
            del self.ids[position], self.servers[position], self.hashes[position]
            self._recount()

    def _recount(self) -> None:
        total = 0
        cumulative = []
        for server in self.servers:
            total += server.spec.capacity
            cumulative.append(total)
        self.cumulative = cumulative

    def draw(self, fraction32: int) -> int:
        """The position of the server owning `fraction32 / 2^32` of the region's capacity."""
        total = self.cumulative[-1]
        return bisect_right(self.cumulative, (fraction32 * total) >> 32)


class RegionIndex:
    """Servers by region; updated in place as servers join and leave."""

    __slots__ = ("by_region",)

    def __init__(self) -> None:
        self.by_region: dict[str, RegionMembers] = {}

    @staticmethod
    def build(servers: Iterable[Server]) -> RegionIndex:
        grouped: dict[str, list[Server]] = {}
        for server in servers:
            grouped.setdefault(server.spec.region, []).append(server)
        index = RegionIndex()
        index.by_region = {region: RegionMembers(members) for region, members in grouped.items()}
        return index

    def add(self, server: Server) -> None:
        members = self.by_region.get(server.spec.region)
        if members is None:
            members = self.by_region[server.spec.region] = RegionMembers()
        members.add(server)

    def remove(self, server: Server) -> None:
        members = self.by_region.get(server.spec.region)
        if members is not None:
            members.remove(server)
            if not members.servers:
                del self.by_region[server.spec.region]


class Pick:
    """A choice: the server, its region, and whether that was not the client's first region. A plain
    class, not a dataclass: compiled, it is built without a call to an interpreted __init__."""

    __slots__ = ("fallback", "region", "server")

    def __init__(self, server: Server, region: str, fallback: bool) -> None:
        self.server = server
        self.region = region  # the server region it came from
        self.fallback = fallback  # True when the client's own first region had nothing available


def pick(
    index: RegionIndex,
    client_key: int,
    proximity: Sequence[str],
    pinned: Mapping[str, int],
    now: float,
    exclude: Server | None = None,
    accept: Callable[[Server], bool] = is_available,
    probes: int = 0,
) -> Pick | None:
    """The best `accept`-able server for a client, walking `proximity` (nearest region first).
    `pinned` is the live session count per server id. `probes` bounds how far each draw of a large
    region looks past servers it does not accept (0: as far as it takes, so the only free server of
    a region is found), for a preference that may give up and fall back to another pick."""
    for position, region in enumerate(proximity):
        members = index.by_region.get(region)
        if members is None:
            continue
        chosen = _best_in_region(members, client_key, pinned, now, exclude, accept, probes)
        if chosen is not None:
            return Pick(chosen, region, position > 0)
    return None


def _best_in_region(
    members: RegionMembers,
    client_key: int,
    pinned: Mapping[str, int],
    now: float,
    exclude: Server | None,
    accept: Callable[[Server], bool],
    probes: int,
) -> Server | None:
    if len(members) <= EXACT_SCAN_LIMIT:
        candidates: Iterable[int] = range(len(members))
    else:
        candidates = draw_choices(members, client_key, exclude, accept, probes)
    best: Server | None = None
    best_score = 0.0
    best_hash = 0
    for position in candidates:
        server = members.servers[position]
        if server is exclude or not accept(server):
            continue
        current = score(server, pinned.get(server.id, 0), now)
        server_hash = members.hashes[position]
        if (
            best is None
            or current < best_score
            or (current == best_score and tie_break(client_key, server_hash) < tie_break(client_key, best_hash))
        ):
            best, best_score, best_hash = server, current, server_hash
    return best


def _server_id(server: Server) -> str:
    return server.id


def draw_choices(
    members: RegionMembers,
    client_key: int,
    exclude: Server | None,
    accept: Callable[[Server], bool],
    probes: int = 0,
) -> list[int]:
    """The positions of `CHOICES` acceptable members, each drawn in proportion to capacity from the
    client's hash (its low and high 32 bits, then 32 bits of two mixes of it) and probing onward past
    unacceptable ones (so a region with few free servers still finds them). The draws are independent,
    so the same server may come more than once: then, as when they tie, each server is chosen with
    probability capacity / total."""
    count = len(members)
    steps = count if probes <= 0 else min(count, probes)
    found: list[int] = []
    fractions = [client_key & 0xFFFFFFFF, (client_key >> 32) & 0xFFFFFFFF]
    fractions.extend(tie_break(client_key, salt) & 0xFFFFFFFF for salt in DRAW_SALTS[: CHOICES - 2])
    for fraction in fractions:
        start = members.draw(fraction)
        for step in range(steps):
            position = (start + step) % count
            server = members.servers[position]
            if server is not exclude and accept(server):
                found.append(position)
                break
    return found


def tie_break(client_key: int, server_hash: int) -> int:
    """A per-client, per-server pseudo-random order: equal scores do not all land on one server."""
    mixed = client_key ^ server_hash
    mixed = (mixed ^ (mixed >> 30)) * 0xBF58476D1CE4E5B9 & MASK64
    return mixed ^ (mixed >> 27)


def ranked(
    index: RegionIndex, client_key: int, proximity: Sequence[str], pinned: Mapping[str, int], now: float
) -> list[tuple[str, Server, float]]:
    """Every server of the regions in `proximity`, best first within each region (for `lbctl route`)."""
    rows: list[tuple[str, Server, float]] = []
    for region in proximity:
        members = index.by_region.get(region)
        if members is None:
            continue
        scored = [
            (score(server, pinned.get(server.id, 0), now), tie_break(client_key, server_hash), server)
            for server, server_hash in zip(members.servers, members.hashes, strict=True)
        ]
        scored.sort(key=lambda row: (row[0], row[1]))
        rows.extend((region, server, current) for current, _, server in scored)
    return rows
