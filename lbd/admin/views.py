"""How the admin API shows lbd's state: JSON shapes built from registry snapshots and counters.

The domain code (compiled, on the request path) holds numbers and states; the shapes and sentences
people and lbctl read are made here.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from lbd.balancer import Balancer
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
