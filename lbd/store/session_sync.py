"""What the request path tells a cluster about sticky sessions, in compiled code.

Requests read and change sessions in the local table (lbd/sessions.py). In a cluster the store must
also learn of pins made here and of sessions still in use, and a client new to this instance is
claimed in the store before it is routed. Those calls come with every request, so they are compiled
methods appending to plain lists here; the cluster (lbd/store/cluster.py: interpreted, async) sets
`connected`, takes the lists to write them in batches, and makes the claims.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from lbd.models import Server
from lbd.sessions import Session, SessionTable

if TYPE_CHECKING:
    from lbd.balancer import Balancer

REFRESH_FRACTION: Final = 16  # a session is refreshed in the store once per idle_timeout / 16 of use
MAX_PENDING_PINS: Final = 200_000  # pins made while the store is unreachable, kept to write back

Claim = Callable[[str, Server, str], asyncio.Future[None]]


class SessionSync:
    def __init__(self, balancer: Balancer, sessions: SessionTable, claim: Claim) -> None:
        self.balancer = balancer
        self.sessions = sessions
        # `claim(client_id, proposal, region)`: pin the client in the store unless another instance
        # did first; done once whichever pin won is held here (the cluster's; one round trip at most)
        self.claim = claim
        self.connected = False  # the cluster's store answers
        self.pins: OrderedDict[str, tuple[str, str | None]] = OrderedDict()  # client -> (server, region)
        self.moves: list[tuple[str, str | None]] = []  # pins moved here, for other instances' copies
        self.refresh: list[str] = []  # clients whose sessions' expiry the store pushes back
        self.pins_dropped = 0

    def wants_claim(self, client_id: str, now: float) -> bool:
        """A request from a client with no session here: ask the store first (dynamic mode only)."""
        return self.connected and self.balancer.mode == "dynamic" and self.sessions.peek(client_id, now) is None

    def pinned(self, client_id: str, server_id: str, region: str | None) -> None:
        """A pin made or moved here (a failover, a server gone or draining): written in the next
        batch, and other instances told so their cached copies follow."""
        pins = self.pins
        pins[client_id] = (server_id, region)
        pins.move_to_end(client_id)
        if len(pins) > MAX_PENDING_PINS:
            pins.popitem(last=False)
            self.pins_dropped += 1
        self.moves.append((client_id, server_id))

    def touched(self, client_id: str, session: Session, now: float) -> None:
        """A request on a live session: its expiry in the store is pushed back, lazily."""
        if now - session.synced_at >= self.sessions.idle_timeout_s / REFRESH_FRACTION:
            session.synced_at = now
            self.refresh.append(client_id)
