"""Sticky sessions: client id -> server id, expiring after a sliding period of inactivity.

The table is kept in least-recently-used order to within 1/64 of the idle timeout (an OrderedDict:
a touch moves a session to the end only once that long has passed since it was last moved, which
spares nearly every request the list surgery and the memory it touches), so the oldest-idle
entries are at the front. That gives, with no timer per client:
- O(1) lookup and touch per request;
- expiry by popping from the front, a few entries per call plus a periodic sweep (a session behind
  a more recently active one is reclaimed at most 1/64 of the idle timeout late; `get` never
  returns an expired one);
- a hard bound (`max_sessions`): the oldest idle session, to within that 1/64, is evicted first.
Time is passed in (`now`, seconds on a monotonic clock), so tests need no fake clock.
`snapshot` / `restore` carry the table across a restart as idle ages, in LRU order (lbd/state.py
writes them on graceful shutdown).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Container, Iterable, Iterator
from typing import Final, NamedTuple

SWEEP_PER_CALL: Final = 2
REORDER_FRACTION: Final = 64  # a touch moves a session to the table's end once per idle_timeout / 64


class Session:
    """A client's pin. A plain class, not a dataclass: compiled, it is built without a call to an
    interpreted __init__."""

    __slots__ = ("last_seen", "placed", "region", "server_id", "synced_at")

    def __init__(self, server_id: str, region: str | None, last_seen: float, synced_at: float = 0.0) -> None:
        self.server_id = server_id
        self.region = region
        self.last_seen = last_seen
        self.placed = last_seen  # when it was last moved to the table's end (never after last_seen)
        self.synced_at = synced_at  # a cluster's store last learned of this session's use (lbd/store/cluster.py)

    def __repr__(self) -> str:
        return f"Session({self.server_id!r}, {self.region!r}, last_seen={self.last_seen})"


class SessionRecord(NamedTuple):
    """A session as saved across a restart: its idle age, since monotonic clocks do not survive one."""

    client_id: str
    server_id: str
    region: str | None
    idle_s: float


class SessionTable:
    def __init__(self, idle_timeout_s: float, max_sessions: int) -> None:
        self.idle_timeout_s = idle_timeout_s
        self.max_sessions = max_sessions
        self._reorder_after_s = idle_timeout_s / REORDER_FRACTION
        self._table: OrderedDict[str, Session] = OrderedDict()
        self.evicted = 0
        self.expired = 0
        self._next_expiry = 0.0  # nothing can expire before this: lets `get` skip the sweep probe
        self.by_server: Counter[str] = Counter()  # live counts, kept as sessions come and go
        self.by_region: Counter[str] = Counter()

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
            self._uncount(session)
            self.expired += 1
            return None
        session.last_seen = now
        if now - session.placed >= self._reorder_after_s:
            session.placed = now
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
            self._uncount(session)
            session.server_id = server_id
            session.region = region
            session.last_seen = session.synced_at = session.placed = now
            self._table.move_to_end(client_id)
            self._count(session)
            return
        if len(self._table) >= self.max_sessions:
            self._uncount(self._table.popitem(last=False)[1])
            self.evicted += 1
        session = self._table[client_id] = Session(server_id, region, now, now)
        self._count(session)

    def move(self, client_id: str, server_id: str) -> bool:
        """Another instance moved this client's session (a failover there): follow it, keeping the
        session's region and idle clock. Whether this instance held the session."""
        session = self._table.get(client_id)
        if session is None or session.server_id == server_id:
            return session is not None
        self._uncount(session)
        session.server_id = server_id
        self._count(session)
        return True

    def configure(self, idle_timeout_s: float, max_sessions: int) -> None:
        """Reloaded limits: a shorter idle timeout expires sessions from the next sweep on; a smaller
        bound evicts the oldest idle sessions at once. (Sessions placed under a longer timeout keep
        its 1/64 of order slack until next moved or expired: at most the old 1/64, once.)"""
        self.idle_timeout_s = idle_timeout_s
        self.max_sessions = max_sessions
        self._reorder_after_s = idle_timeout_s / REORDER_FRACTION
        while len(self._table) > max_sessions:
            self._uncount(self._table.popitem(last=False)[1])
            self.evicted += 1
        self._next_expiry = 0.0  # computed with the old timeout: probe again

    def remove(self, client_id: str) -> bool:
        session = self._table.pop(client_id, None)
        if session is None:
            return False
        self._uncount(session)
        return True

    def remove_server(self, server_id: str) -> int:
        """Drop every session on one server (O(n): an operator command, not a request path)."""
        doomed = [client for client, session in self._table.items() if session.server_id == server_id]
        for client in doomed:
            self._uncount(self._table.pop(client))
        return len(doomed)

    def _count(self, session: Session) -> None:
        self.by_server[session.server_id] += 1
        self.by_region[session.region or "-"] += 1

    def _uncount(self, session: Session) -> None:
        for counter, key in ((self.by_server, session.server_id), (self.by_region, session.region or "-")):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]

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
            self._uncount(table.popitem(last=False)[1])
            removed += 1
        else:
            if not table:
                self._next_expiry = now + self.idle_timeout_s
        self.expired += removed
        return removed

    def items(self, now: float) -> Iterator[tuple[str, Session]]:
        """Live sessions, most recently active last (to within 1/64 of the idle timeout)."""
        cutoff = now - self.idle_timeout_s
        return ((client, session) for client, session in self._table.items() if session.last_seen > cutoff)

    def snapshot(self, now: float) -> list[SessionRecord]:
        """Live sessions with their idle age, least recently active first: sorted by last use, since the
        table keeps that order only to within 1/64 of the idle timeout, and the ages saved are rounded
        (sessions of equal saved age come back in the file's order)."""
        live = sorted(self.items(now), key=last_use)  # nearly in this order already: Timsort's runs
        return [SessionRecord(client, s.server_id, s.region, now - s.last_seen) for client, s in live]

    def restore(
        self,
        records: Iterable[SessionRecord],
        now: float,
        *,
        downtime_s: float = 0.0,
        servers: Container[str] | None = None,
    ) -> int:
        """Bring back a snapshot: each record's idle age grows by `downtime_s`; records now past the
        idle timeout, on a server not in `servers` (when given), or for a client already in the table are
        dropped. LRU order follows the idle ages, and `max_sessions` still holds (oldest evicted
        first). Returns how many records were restored."""
        table = self._table
        timeout = self.idle_timeout_s
        downtime_s = max(0.0, downtime_s)
        restored: dict[str, Session] = {}
        for client_id, server_id, region, idle_s in records:
            idle = max(0.0, idle_s) + downtime_s
            if idle >= timeout or client_id in table:
                continue
            if servers is not None and server_id not in servers:
                continue
            previous = restored.get(client_id)
            if previous is not None:
                if previous.last_seen > now - idle:
                    continue
                del restored[client_id]  # a duplicate: the most recent one wins
            restored[client_id] = Session(server_id, region, now - idle)
        merged = [*table.items(), *restored.items()]
        merged.sort(key=last_use)  # a snapshot is already in this order: linear
        overflow = max(0, len(merged) - self.max_sessions)
        self.evicted += overflow
        self._table = OrderedDict(merged[overflow:])
        self.by_server.clear()
        self.by_region.clear()
        for session in self._table.values():
            session.placed = session.last_seen  # the order is by last_seen now
            self._count(session)
        self._next_expiry = 0.0
        return len(restored.keys() & self._table.keys())


def last_use(item: tuple[str, Session]) -> float:
    """A (client, session) pair's sort key: when the session was last used."""
    return item[1].last_seen
