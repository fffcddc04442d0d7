"""How the admin API shows lbd's state: JSON shapes built from registry snapshots and counters.

The domain code (compiled, on the request path) holds numbers and states; the shapes and sentences
people and lbctl read are made here.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from lbd.balancer import (
    REASON_BACKUP_FULL,
    REASON_FAILBACK,
    REASON_FALLBACK,
    REASON_HASH_NEXT,
    REASON_MOVED,
    REASON_SPILL,
    REASON_STICKY,
    Balancer,
    FailbackView,
    RegionView,
    RouteDecision,
)
from lbd.models import Health, Server


def server_json(server: Server, balancer: Balancer) -> dict[str, Any]:
    """A server as the API shows it, with its monotonic times turned into Unix times, and its dynamic
    score with the score's terms."""
    now = time.monotonic()
    return {**server.to_json(now, time.time() - now), **balancer.score_terms(server, now)}


def servers_summary(servers: tuple[Server, ...]) -> dict[str, Any]:
    """`/v1/status`'s server counts: in rotation means what `lbctl servers` shows as in rotation."""
    by_health = Counter(server.state.health.value for server in servers)
    return {
        "total": len(servers),
        "in_rotation": sum(1 for server in servers if server.in_rotation),
        "by_health": {health.value: by_health.get(health.value, 0) for health in Health},
    }


def route_json(decision: RouteDecision, balancer: Balancer) -> dict[str, Any]:
    """`GET /v1/route/{client_id}`: the decision, a sentence on why, and the candidates in order."""
    server = decision.server
    if decision.mode == "static":
        return {
            "mode": "static",
            "client_id": decision.client_id,
            "server": server.id,
            "reason": decision.reason,
            "detail": _static_detail(decision),
            "bucket": decision.bucket,
            "candidates": [
                {
                    "server": c.server.id,
                    "region": c.region,
                    "capacity": c.server.spec.capacity,
                    "available": c.available,
                }
                for c in decision.candidates
            ],
        }
    session = decision.session
    return {
        "mode": "dynamic",
        "client_id": decision.client_id,
        "client_region": decision.client_region,
        "server": server.id,
        "server_region": server.spec.region,
        "reason": decision.reason,
        "detail": _dynamic_detail(decision),
        "session": None
        if session is None
        else {"server": session.server_id, "idle_s": round(decision.now - session.last_seen, 3)},
        "regions": [_region_json(view) for view in decision.regions],
        "failback": None if decision.failback is None else _failback_json(decision.failback),
        "candidates": [
            {
                "server": c.server.id,
                "region": c.region,
                **balancer.score_terms(c.server, decision.now),
                "available": c.available,
            }
            for c in decision.candidates
        ],
    }


def _region_json(view: RegionView) -> dict[str, Any]:
    return {
        "region": view.region,
        "home": view.home,
        "capacity": view.capacity,
        "load": round(view.load, 2),
        "utilization": None if view.capacity <= 0 else round(view.load / view.capacity, 4),
        "max_load": view.max_load,
        "room": view.room,
        "available_for_s": None if view.available_for_s < 0 else round(view.available_for_s, 1),
    }


def _failback_json(view: FailbackView) -> dict[str, Any]:
    return {
        "home": view.home,
        "enabled": view.enabled,
        "home_available_for_s": None if view.available_for_s < 0 else round(view.available_for_s, 1),
        "stable_s": view.stable_s,
        "ramp_s": view.ramp_s,
        "admitted": round(view.admitted, 4),
        "client_share": round(view.client_share, 4),
        "home_room": view.room,
    }


def _static_detail(decision: RouteDecision) -> str:
    if decision.reason == REASON_HASH_NEXT:
        first = decision.candidates[0].server.id if decision.candidates else "-"
        return f"first choice {first} is out of rotation or draining; next in the client's hash order"
    return f"hash of the client id picks {decision.server.id}"


def _percent(load: float, capacity: int) -> str:
    return "no capacity" if capacity <= 0 else f"{load / capacity:.0%}"


def _full_regions(decision: RouteDecision) -> str:
    """The regions nearer than the chosen one that a new choice passed over, and why."""
    parts = []
    for view in decision.regions:
        if view.region == decision.server.spec.region:
            break
        if view.capacity <= 0:
            parts.append(f"{view.region} has no server in rotation")
        elif not view.room:
            limit = "home limit" if view.home else "fallback limit"
            parts.append(
                f"{view.region} is full ({_percent(view.load, view.capacity)} of capacity, {limit} {view.max_load:.0%})"
            )
        else:
            parts.append(f"{view.region} has no available server")
    return "; ".join(parts)


def _away_detail(view: FailbackView) -> str:
    """Why a session away from its home region has not gone back yet."""
    if not view.enabled:
        return f"away from home region {view.home}; failback is off"
    if view.available_for_s < 0:
        return (
            f"away from home region {view.home}, which has no room; it goes back once {view.home} "
            f"has had room for {view.stable_s:g} s"
        )
    if view.admitted <= 0.0:
        wait = view.stable_s - view.available_for_s
        return (
            f"away from home region {view.home}; {view.home} has had room for {view.available_for_s:.0f} s, "
            f"failback starts in {wait:.0f} s"
        )
    if not view.room:
        return f"away from home region {view.home}, which is full now"
    return (
        f"away from home region {view.home}; {view.admitted:.0%} of away clients admitted back so far, "
        f"this client's turn comes at {view.client_share:.0%}"
    )


def _dynamic_detail(decision: RouteDecision) -> str:
    reason, server, pinned, session = decision.reason, decision.server, decision.session_server, decision.session
    if reason == REASON_STICKY:
        if decision.failback is not None:
            return f"live session with {server.id}, {_away_detail(decision.failback)}"
        return f"live session with {server.id}"
    if reason == REASON_FAILBACK and decision.failback is not None and session is not None:
        view = decision.failback
        return (
            f"session server {session.server_id} is away from home region {view.home}, which has had room for "
            f"{view.available_for_s:.0f} s (stable after {view.stable_s:g} s); {view.admitted:.0%} of away clients "
            f"admitted back, this client at {view.client_share:.0%}: moved back to {server.id} and re-pinned"
        )
    if reason == REASON_BACKUP_FULL and pinned is not None:
        load = f"{pinned.state.active}/{pinned.spec.capacity}"
        return f"session server {pinned.id} is nearly full ({load}); served by a backup, session kept"
    if reason == REASON_MOVED and session is not None:
        why = "left" if pinned is None else "is draining" if pinned.state.draining else "is out of rotation"
        passed = _full_regions(decision)
        return f"session server {session.server_id} {why}; moved to {server.id} and re-pinned" + (
            f" ({passed})" if passed else ""
        )
    if reason == REASON_SPILL:
        return f"{_full_regions(decision)}; {server.spec.region} is the nearest region with room"
    if reason == REASON_FALLBACK:
        return f"no available server in {decision.client_region}; nearest region with one is {server.spec.region}"
    return f"best score among available servers in {decision.server.spec.region}"
