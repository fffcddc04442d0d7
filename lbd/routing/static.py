"""Capacity-weighted rendezvous (highest-random-weight) hashing of a client key.

Each server gets the score `-ln(u) / capacity`, where `u` in (0, 1) is a hash of (client, server);
the lowest score wins. Because a server's score depends only on the client and that server:
- adding a server moves only the clients that now pick it (about its share of capacity);
- removing a server moves only its own clients, each to its next choice;
- the share of clients is exactly capacity / total in expectation.

Cost: one SHA-256 of the client key, then per server one 64-bit mix of precomputed server hashes.
Servers of equal capacity are compared by the raw mix (no logarithm), so the logarithm runs once
per distinct capacity, not once per server. Pure and deterministic: keyed on server ids, never on
list order or Python's randomized `hash()`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

MASK64: Final = (1 << 64) - 1
TWO64: Final = float(1 << 64)


def digest64(text: str) -> int:
    """First 64 bits of SHA-256: stable across processes and platforms."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def mix64(value: int) -> int:
    """SplitMix64 finalizer: spreads a combined key/server hash uniformly over 64 bits."""
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & MASK64
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB & MASK64
    return value ^ (value >> 31)


@dataclass(frozen=True, slots=True)
class _Group:
    """Servers sharing one capacity: within a group the largest mix wins, no logarithm needed."""

    capacity: int
    ids: tuple[str, ...]
    seeds: tuple[int, ...]


class RendezvousTable:
    """Precomputed server hashes for one membership; rebuild it when membership changes."""

    __slots__ = ("_groups", "size")

    def __init__(self, servers: Iterable[tuple[str, int]]) -> None:
        by_capacity: dict[int, list[tuple[str, int]]] = {}
        for server_id, capacity in sorted(servers):
            if capacity <= 0:
                raise ValueError(f"capacity of {server_id!r} must be positive")
            by_capacity.setdefault(capacity, []).append((server_id, digest64(server_id)))
        self._groups = tuple(
            _Group(capacity, tuple(i for i, _ in members), tuple(s for _, s in members))
            for capacity, members in sorted(by_capacity.items())
        )
        self.size = sum(len(group.ids) for group in self._groups)

    def pick(self, key: str) -> str | None:
        """The first choice for `key`, or None when there are no servers."""
        key_hash = digest64(key)
        best_id: str | None = None
        best_score = math.inf
        for group in self._groups:
            top_mix = -1
            top_id = ""
            for server_id, seed in zip(group.ids, group.seeds, strict=True):
                # mix64 inlined: this loop is the whole cost of a pick at 1,000 servers
                mixed = key_hash ^ seed
                mixed = (mixed ^ (mixed >> 30)) * 0xBF58476D1CE4E5B9 & MASK64
                mixed = (mixed ^ (mixed >> 27)) * 0x94D049BB133111EB & MASK64
                mixed ^= mixed >> 31
                if mixed > top_mix:
                    top_mix, top_id = mixed, server_id
            score = _score(top_mix, group.capacity)
            if score < best_score or (score == best_score and top_id < (best_id or "")):
                best_score, best_id = score, top_id
        return best_id

    def rank(self, key: str) -> list[str]:
        """Every server, best choice first: the order a client falls back through."""
        key_hash = digest64(key)
        scored = [
            (_score(mix64(key_hash ^ seed), group.capacity), server_id)
            for group in self._groups
            for server_id, seed in zip(group.ids, group.seeds, strict=True)
        ]
        scored.sort()
        return [server_id for _, server_id in scored]

    def pick_available(self, key: str, available: Callable[[str], bool]) -> str | None:
        """The best server for `key` that `available` accepts: first choice, else the next in rank."""
        first = self.pick(key)
        if first is None or available(first):
            return first
        return next((server_id for server_id in self.rank(key) if available(server_id)), None)


def _score(mixed: int, capacity: int) -> float:
    """`-ln(u) / capacity` with `u` in (0, 1) strictly, so the logarithm is always finite."""
    return -math.log((mixed + 0.5) / TWO64) / capacity
