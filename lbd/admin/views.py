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
    REASON_FALLBACK,
    REASON_HASH_NEXT,
    REASON_MOVED,
    REASON_STICKY,
    Balancer,
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


def _static_detail(decision: RouteDecision) -> str:
    if decision.reason == REASON_HASH_NEXT:
        first = decision.candidates[0].server.id if decision.candidates else "-"
        return f"first choice {first} is out of rotation or draining; next in the client's hash order"
    return f"hash of the client id picks {decision.server.id}"


def _dynamic_detail(decision: RouteDecision) -> str:
    reason, server, pinned, session = decision.reason, decision.server, decision.session_server, decision.session
    if reason == REASON_STICKY:
        return f"live session with {server.id}"
    if reason == REASON_BACKUP_FULL and pinned is not None:
        load = f"{pinned.state.active}/{pinned.spec.capacity}"
        return f"session server {pinned.id} is nearly full ({load}); served by a backup, session kept"
    if reason == REASON_MOVED and session is not None:
        why = "left" if pinned is None else "is draining" if pinned.state.draining else "is out of rotation"
        return f"session server {session.server_id} {why}; moved to {server.id} and re-pinned"
    if reason == REASON_FALLBACK:
        return f"no available server in {decision.client_region}; nearest region with one is {server.spec.region}"
    return f"best score among available servers in {decision.client_region}"
