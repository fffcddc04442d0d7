"""Sticky sessions: client id -> server id, expiring after a sliding period of inactivity.

The table is kept in least-recently-used order (an OrderedDict, moved to the end on every touch),
so the oldest-idle entries are always at the front. That gives, with no timer per client:
- O(1) lookup and touch per request;
- expiry by popping from the front, a few entries per call plus a periodic sweep;
- a hard bound (`max_sessions`): the oldest idle session is evicted first.
Time is passed in (`now`, seconds on a monotonic clock), so tests need no fake clock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

SWEEP_PER_CALL = 2


@dataclass(slots=True)
class Session:
    server_id: str
    region: str | None
    last_seen: float


class SessionTable:
    def __init__(self, idle_timeout_s: float, max_sessions: int) -> None:
        self.idle_timeout_s = idle_timeout_s
        self.max_sessions = max_sessions
        self._table: OrderedDict[str, Session] = OrderedDict()
        self.evicted = 0
        self.expired = 0
        self._next_expiry = 0.0  # nothing can expire before this: lets `get` skip the sweep probe

    def __len__(self) -> int:
        return len(self._table)

    def get(self, client_id: str, now: float) -> Session | None:
        """The live session of `client_id`, touched (its idle clock restarts); None if none or expired."""
        if now >= self._next_expiry:
            self._sweep(now, SWEEP_PER_CALL)
        session = self._table.get(client_id)
        if session is None:
            return None
        if now - session.last_seen >= self.idle_timeout_s:
            del self._table[client_id]
            self.expired += 1
            return None
        session.last_seen = now
        self._table.move_to_end(client_id)
        return session

    def peek(self, client_id: str, now: float) -> Session | None:
        """Like `get` but without touching: for explaining a route without changing anything."""
        session = self._table.get(client_id)
        if session is None or now - session.last_seen >= self.idle_timeout_s:
            return None
        return session

    def pin(self, client_id: str, server_id: str, region: str | None, now: float) -> None:
        """Bind `client_id` to `server_id` (new session, or re-pinned after a move)."""
        session = self._table.get(client_id)
        if session is not None:
            session.server_id = server_id
            session.region = region
            session.last_seen = now
            self._table.move_to_end(client_id)
            return
        if len(self._table) >= self.max_sessions:
            self._table.popitem(last=False)
            self.evicted += 1
        self._table[client_id] = Session(server_id, region, now)

    def remove(self, client_id: str) -> bool:
        return self._table.pop(client_id, None) is not None

    def remove_server(self, server_id: str) -> int:
        """Drop every session on one server (O(n): an operator command, not a request path)."""
        doomed = [client for client, session in self._table.items() if session.server_id == server_id]
        for client in doomed:
            del self._table[client]
        return len(doomed)

    def sweep(self, now: float, budget: int = 10_000) -> int:
        """Expire up to `budget` idle sessions; called periodically so memory follows the live set."""
        return self._sweep(now, budget)

    def _sweep(self, now: float, budget: int) -> int:
        table = self._table
        cutoff = now - self.idle_timeout_s
        removed = 0
        self._next_expiry = now
        while removed < budget and table:
            oldest = next(iter(table.values()))
            if oldest.last_seen > cutoff:
                self._next_expiry = oldest.last_seen + self.idle_timeout_s
                break
            table.popitem(last=False)
            removed += 1
        else:
            if not table:
                self._next_expiry = now + self.idle_timeout_s
        self.expired += removed
        return removed

    def items(self, now: float) -> Iterator[tuple[str, Session]]:
        """Live sessions, most recently active last."""
        cutoff = now - self.idle_timeout_s
        return ((client, session) for client, session in self._table.items() if session.last_seen > cutoff)
