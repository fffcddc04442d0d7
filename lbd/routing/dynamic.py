"""Region-aware, load-aware choice of a server for a client without a session (pure, no I/O).

Score (lower is better): `latency_ewma_ms * (active + 1) / capacity`, the peak-EWMA cost of Envoy
and Linkerd scaled by capacity like Traefik's leasttime: a server twice as big takes twice the
connections at the same score, and a slow server needs proportionally fewer.

A server is *available* when it is in rotation, not draining and below its capacity. The client's
region is tried first; when it has no available server (empty, all full, all draining or out of
rotation) the client region's proximity order is walked.

Within a region of up to `EXACT_SCAN_LIMIT` servers the best score is found by a scan. Larger
regions use two choices drawn from the client id's hash (power of two choices, as Envoy's
LEAST_REQUEST and HAProxy's `random(2)`), so a pick costs the same at 10 or 10,000 servers. Ties
break by a hash of (client id, server id): deterministic, so `lbctl route` predicts what the
proxy will do and separate lbd processes agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from lbd.models import Server
from lbd.routing.static import MASK64, digest64

EXACT_SCAN_LIMIT: Final = 8
NEARLY_FULL: Final = 0.9


def score(server: Server) -> float:
    state = server.state
    return state.latency_ewma_ms * (state.active + 1) / server.spec.capacity


def is_available(server: Server) -> bool:
    state = server.state
    return state.health.in_rotation and not state.draining and state.active < server.spec.capacity


def is_nearly_full(server: Server) -> bool:
    return server.state.active >= NEARLY_FULL * server.spec.capacity


@dataclass(frozen=True, slots=True)
class RegionIndex:
    """Servers by region, with each server's id hash precomputed; rebuilt on membership change."""

    by_region: Mapping[str, tuple[tuple[Server, int], ...]]

    @staticmethod
    def build(servers: Iterable[Server]) -> RegionIndex:
        grouped: dict[str, list[tuple[Server, int]]] = {}
        for server in sorted(servers, key=lambda s: s.id):
            grouped.setdefault(server.spec.region, []).append((server, digest64(server.id)))
        return RegionIndex({region: tuple(members) for region, members in grouped.items()})


@dataclass(frozen=True, slots=True)
class Pick:
    server: Server
    region: str  # the server region it came from
    fallback: bool  # True when the client's own first region had nothing available


def pick(
    index: RegionIndex,
    client_key: int,
    proximity: Sequence[str],
    exclude: Server | None = None,
    accept: Callable[[Server], bool] = is_available,
) -> Pick | None:
    """The best `accept`-able server for a client, walking `proximity` (nearest region first)."""
    for position, region in enumerate(proximity):
        members = index.by_region.get(region)
        if not members:
            continue
        chosen = _best_in_region(members, client_key, exclude, accept)
        if chosen is not None:
            return Pick(chosen, region, position > 0)
    return None


def _best_in_region(
    members: Sequence[tuple[Server, int]],
    client_key: int,
    exclude: Server | None,
    accept: Callable[[Server], bool],
) -> Server | None:
    if len(members) <= EXACT_SCAN_LIMIT:
        candidates: Iterable[tuple[Server, int]] = members
    else:
        candidates = _two_choices(members, client_key, exclude, accept)
    best: Server | None = None
    best_score = 0.0
    best_hash = 0
    for server, server_hash in candidates:
        if server is exclude or not accept(server):
            continue
        state = server.state
        current = state.latency_ewma_ms * (state.active + 1) / server.spec.capacity  # score(), inlined
        if (
            best is None
            or current < best_score
            or (current == best_score and tie_break(client_key, server_hash) < tie_break(client_key, best_hash))
        ):
            best, best_score, best_hash = server, current, server_hash
    return best


def _two_choices(
    members: Sequence[tuple[Server, int]],
    client_key: int,
    exclude: Server | None,
    accept: Callable[[Server], bool],
) -> list[tuple[Server, int]]:
    """Two acceptable members at positions drawn from the client's hash, probing onward past the
    unacceptable ones (so a region with few free servers still finds them)."""
    count = len(members)
    found: list[tuple[Server, int]] = []
    for start in (client_key % count, (client_key >> 32) % count):
        for step in range(count):
            member = members[(start + step) % count]
            if member[0] is not exclude and accept(member[0]) and member not in found:
                found.append(member)
                break
    return found


def tie_break(client_key: int, server_hash: int) -> int:
    """A per-client, per-server pseudo-random order: equal scores do not all land on one server."""
    mixed = client_key ^ server_hash
    mixed = (mixed ^ (mixed >> 30)) * 0xBF58476D1CE4E5B9 & MASK64
    return mixed ^ (mixed >> 27)


def ranked(index: RegionIndex, client_key: int, proximity: Sequence[str]) -> list[tuple[str, Server, float]]:
    """Every server of the regions in `proximity`, best first within each region (for `lbctl route`)."""
    rows: list[tuple[str, Server, float]] = []
    for region in proximity:
        members = index.by_region.get(region, ())
        ordered = sorted(members, key=lambda member: (score(member[0]), tie_break(client_key, member[1])))
        rows.extend((region, server, score(server)) for server, _ in ordered)
    return rows
