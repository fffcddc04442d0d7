"""One try of a request against one server.

From its start the attempt counts as one of the server's active requests; `settle` ends it exactly
once, with the outcome the server's passive health and latency estimate learn from. A request that
is retried makes a new attempt; the failed one is settled first. An upgraded connection keeps
counting as active after its attempt is settled, until the tunnel closes.
"""

from __future__ import annotations

from lbd.models import Outcome, Server
from lbd.registry import Registry


class Attempt:
    __slots__ = ("answered_at", "holds_tunnel", "server", "settled", "started_at", "timeout_s")

    def __init__(self, server: Server, timeout_s: float, now: float) -> None:
        self.server = server
        self.timeout_s = timeout_s  # the server's silence allowed: timeout_base + its region's latency
        state = server.state
        state.active += 1
        state.requests += 1
        # `now` is lbd.clock's (nanoseconds): uvloop's loop time is in whole milliseconds, so a loopback
        # answer would measure 0
        self.started_at = now
        self.answered_at = -1.0  # when the response head came; negative: not yet
        self.settled = False
        self.holds_tunnel = False

    def responded(self, now: float) -> None:
        self.answered_at = now

    @property
    def latency_s(self) -> float | None:
        """Time to the response head; None before it came."""
        return None if self.answered_at < 0.0 else self.answered_at - self.started_at

    def settle(self, registry: Registry, outcome: Outcome | None) -> None:
        """End the attempt (once; later calls do nothing). `outcome` None: not the server's doing
        (a pooled connection it had closed), so its health learns nothing."""
        if self.settled:
            return
        self.settled = True
        self.server.state.active -= 1
        if outcome is not None:
            registry.record_outcome(self.server, outcome, self.latency_s, self.answered_at)

    def settle_into_tunnel(self, registry: Registry) -> None:
        """The server switched protocols: the request succeeded, and the connection stays active."""
        if not self.settled:
            self.settled = self.holds_tunnel = True
            registry.record_outcome(self.server, Outcome.OK, self.latency_s, self.answered_at)

    def tunnel_closed(self) -> None:
        if self.holds_tunnel:
            self.holds_tunnel = False
            self.server.state.active -= 1
