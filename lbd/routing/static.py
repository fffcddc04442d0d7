"""Capacity-weighted rendezvous hashing of a client id, through a table of buckets.

A client id hashes (SHA-256) to one of `BUCKETS` buckets. A bucket belongs to the server with the
lowest `-ln(u) / capacity`, where `u` in (0, 1) is a hash of (bucket, server id): weighted
rendezvous (highest-random-weight) hashing with the bucket as its key, so every server's expected
share is capacity / total. The table only caches that pure function of (bucket, membership); any
bucket not computed yet is computed exactly on first use, so a cold and a warm table answer alike.
Because a server's rank for a bucket depends only on the bucket and that server:
- adding a server moves only the buckets (clients) that now pick it, and costs one evaluation of
  the newcomer per bucket (compared with the bucket's stored owner and runner-up);
- removing a server moves only its own buckets, each to its runner-up;
- a server out of rotation sends its buckets' clients to each bucket's next choice; nobody else moves.

Cost of a pick: one SHA-256 and a list lookup, whatever the server count. Computing a bucket is one
32-bit mix per server (`rank_hash`, arithmetic that never leaves 63 bits, so compiled and interpreted
code agree), with the logarithm taken only for servers that can still beat the runner-up. Pure and
deterministic: keyed on server ids and bucket numbers, never on list order or Python's `hash()`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from typing import Final

from mypy_extensions import i64

MASK64: Final = (1 << 64) - 1
BUCKET_BITS: Final = 16
BUCKETS: Final = 1 << BUCKET_BITS
UNKNOWN: Final = ""  # a bucket's owner not computed yet, or its runner-up not known
INV_2_32: Final = 1.0 / 4294967296.0


def digest64(text: str) -> int:
    """First 64 bits of SHA-256: stable across processes and platforms."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def fmix32(value: i64) -> i64:
    """murmur3's 32-bit finalizer, its multipliers split into powers of two and constants below 2^27
    (0x85EBCA6B = 2^31 + 0x05EBCA6B, 0xC2B2AE35 = 2^31 + 2^30 + 0x02B2AE35), since modulo 2^32
    `x * 2^k` is `(x & (2^(32-k) - 1)) << k`: no intermediate reaches 2^60, so compiled code (native
    64-bit integers, `i64`) never overflows and gives what interpreted code does."""
    value ^= value >> 16
    value = (value * 0x05EBCA6B + ((value & 1) << 31)) & 0xFFFFFFFF
    value ^= value >> 13
    value = (value * 0x02B2AE35 + ((value & 1) << 31) + ((value & 3) << 30)) & 0xFFFFFFFF
    return value ^ (value >> 16)


def bucket_key(bucket: i64) -> i64:
    """The 32-bit value a bucket's servers are ranked by."""
    return fmix32(bucket ^ 0x5BD1E995)


def rank_hash(key: i64, seed: i64) -> i64:
    """The 32-bit hash of (bucket key, server seed) whose `u` ranks the server for that bucket."""
    return fmix32(key ^ seed)


def score(hashed: i64, capacity: float) -> float:
    """`-ln(u) / capacity` with `u` in (0, 1) strictly, so the logarithm is always finite."""
    return -math.log((float(hashed) + 0.5) * INV_2_32) / capacity


def server_seed(server_id: str) -> int:
    return digest64(server_id) >> 32


def client_bucket(client_id: str) -> int:
    """The bucket of a client id: the low bits of the first 64 of its SHA-256 (`digest64`), read from
    the digest's bytes 5 to 7 without building the whole integer (BUCKET_BITS is at most 24)."""
    digest = hashlib.sha256(client_id.encode("utf-8")).digest()
    return ((digest[5] << 16) | (digest[6] << 8) | digest[7]) & (BUCKETS - 1)


class _Group:
    """The servers of one capacity: within a group the largest rank hash wins, no logarithm needed."""

    __slots__ = ("capacity", "ids", "packed", "position", "seeds")

    def __init__(self, capacity: int) -> None:
        self.capacity = float(capacity)
        self.ids: list[str] = []
        self.seeds: list[int] = []
        self.packed = b""  # the seeds as 4 big-endian bytes each: read natively, never unboxed
        self.position: dict[str, int] = {}

    def append(self, server_id: str) -> None:
        self.position[server_id] = len(self.ids)
        self.ids.append(server_id)
        seed = server_seed(server_id)
        self.seeds.append(seed)
        self.packed += seed.to_bytes(4, "big")

    def discard(self, server_id: str) -> None:
        """Remove one member; the last one takes its place (order never matters)."""
        index = self.position.pop(server_id)
        last_id, last_seed = self.ids.pop(), self.seeds.pop()
        if last_id != server_id:
            self.ids[index], self.seeds[index] = last_id, last_seed
            self.position[last_id] = index
        self.packed = b"".join(seed.to_bytes(4, "big") for seed in self.seeds)


class BucketTable:
    """Bucket -> owner (and runner-up) for one membership, kept current by `add` and `remove`."""

    __slots__ = ("_cold", "_cursor", "_group_of", "_groups", "_owner", "_owner_score", "_runner",
                 "_runner_score", "_size")  # fmt: skip

    def __init__(self, servers: Iterable[tuple[str, int]] = ()) -> None:
        self._groups: list[_Group] = []
        self._group_of: dict[str, _Group] = {}
        self._size = 0
        self._owner: list[str] = [UNKNOWN] * BUCKETS
        self._owner_score: list[float] = [math.inf] * BUCKETS
        self._runner: list[str] = [UNKNOWN] * BUCKETS
        self._runner_score: list[float] = [math.inf] * BUCKETS
        self._cold = BUCKETS  # buckets whose owner is not computed
        self._cursor = 0  # where `fill` looks for the next cold bucket
        for server_id, capacity in servers:
            self._append(server_id, capacity)

    @property
    def size(self) -> int:
        return self._size

    @property
    def cold(self) -> int:
        """Buckets not computed yet (each is computed on first use, or by `fill`)."""
        return self._cold

    def __contains__(self, server_id: str) -> bool:
        return server_id in self._group_of

    # --- membership ---------------------------------------------------------------------------

    def _append(self, server_id: str, capacity: int) -> float:
        if capacity <= 0:
            raise ValueError(f"capacity of {server_id!r} must be positive")
        if server_id in self._group_of:
            raise ValueError(f"server {server_id!r} is already in the table")
        group = next((g for g in self._groups if g.capacity == capacity), None)
        if group is None:
            group = _Group(capacity)
            self._groups.append(group)
        group.append(server_id)
        self._group_of[server_id] = group
        self._size += 1
        return group.capacity

    def add(self, server_id: str, capacity: int) -> None:
        """A new server: each computed bucket compares it with its owner and runner-up, O(buckets)."""
        cap = self._append(server_id, capacity)
        seed: i64 = server_seed(server_id)
        owners, owner_scores = self._owner, self._owner_score
        runners, runner_scores = self._runner, self._runner_score
        for bucket in range(BUCKETS):
            owner = owners[bucket]
            if owner == UNKNOWN:
                continue  # computed with the whole membership when first used
            hashed = rank_hash(bucket_key(bucket), seed)
            runner_score = runner_scores[bucket]
            if _lower_bound(hashed, cap) > runner_score:
                continue  # even a lower bound of its score loses to the runner-up
            new = score(hashed, cap)
            if _before(new, server_id, owner_scores[bucket], owner):
                runners[bucket], runner_scores[bucket] = owner, owner_scores[bucket]
                owners[bucket], owner_scores[bucket] = server_id, new
            elif runners[bucket] != UNKNOWN and _before(new, server_id, runner_score, runners[bucket]):
                runners[bucket], runner_scores[bucket] = server_id, new

    def remove(self, server_id: str) -> None:
        """A server leaves: its buckets go to their runner-up (whose own runner-up is then recomputed
        when needed), and buckets where it was runner-up forget theirs. O(buckets)."""
        group = self._group_of.pop(server_id)
        group.discard(server_id)
        if not group.ids:
            self._groups.remove(group)
        self._size -= 1
        owners, owner_scores = self._owner, self._owner_score
        runners, runner_scores = self._runner, self._runner_score
        for bucket in range(BUCKETS):
            if owners[bucket] == server_id:
                runner = runners[bucket]
                owners[bucket], owner_scores[bucket] = runner, runner_scores[bucket]
                if runner == UNKNOWN:
                    self._cold += 1
                runners[bucket], runner_scores[bucket] = UNKNOWN, math.inf
            elif runners[bucket] == server_id:
                runners[bucket], runner_scores[bucket] = UNKNOWN, math.inf

    # --- computing buckets ----------------------------------------------------------------------

    def _compute(self, bucket: int) -> None:
        """Owner and runner-up of `bucket` over every server: the exact rendezvous ranking.

        Within a capacity group only the two largest rank hashes can matter, found by integer
        comparisons alone; their scores then compete across groups."""
        if self._size == 0:
            return
        key: i64 = bucket_key(bucket)
        best = second = UNKNOWN
        best_score = second_score = math.inf
        for group in self._groups:
            top: i64 = -1
            top_at: i64 = -1
            near: i64 = -1  # the group's second largest
            near_at: i64 = -1
            packed = group.packed
            end: i64 = len(packed)
            at: i64 = 0
            offset: i64 = 0
            while offset < end:
                high: i64 = packed[offset]
                second_byte: i64 = packed[offset + 1]
                third: i64 = packed[offset + 2]
                low: i64 = packed[offset + 3]
                # rank_hash(key, seed), inlined: this loop is the cost of a bucket
                hashed = key ^ ((high << 24) | (second_byte << 16) | (third << 8) | low)
                hashed ^= hashed >> 16
                hashed = (hashed * 0x05EBCA6B + ((hashed & 1) << 31)) & 0xFFFFFFFF
                hashed ^= hashed >> 13
                hashed = (hashed * 0x02B2AE35 + ((hashed & 1) << 31) + ((hashed & 3) << 30)) & 0xFFFFFFFF
                hashed ^= hashed >> 16
                if hashed >= near:
                    ids = group.ids
                    if hashed > top or (hashed == top and ids[at] < ids[top_at]):
                        near, near_at, top, top_at = top, top_at, hashed, at
                    elif hashed > near or ids[at] < ids[near_at]:
                        near, near_at = hashed, at
                at += 1
                offset += 4
            if top_at < 0:
                continue
            capacity = group.capacity
            if _lower_bound(top, capacity) > second_score:
                continue  # its best loses to the runner-up so far, and its second scores no better
            current = score(top, capacity)
            if not _before(current, group.ids[top_at], second_score, second):
                continue
            best, best_score, second, second_score = _insert(
                current, group.ids[top_at], best, best_score, second, second_score
            )
            if near_at < 0 or _lower_bound(near, capacity) > second_score:
                continue
            current = score(near, capacity)
            if _before(current, group.ids[near_at], second_score, second):
                best, best_score, second, second_score = _insert(
                    current, group.ids[near_at], best, best_score, second, second_score
                )
        if self._owner[bucket] == UNKNOWN:
            self._cold -= 1
        self._owner[bucket], self._owner_score[bucket] = best, best_score
        self._runner[bucket], self._runner_score[bucket] = second, second_score

    def fill(self, budget: int) -> bool:
        """Compute cold buckets, about `budget` hash evaluations' worth; True while some remain.
        The daemon calls it in slices, so a full table never blocks the event loop at once."""
        if self._size == 0:
            return False
        owners = self._owner
        steps = 0
        while self._cold > 0 and budget > 0 and steps < BUCKETS:
            steps += 1
            bucket = self._cursor
            self._cursor = (bucket + 1) & (BUCKETS - 1)
            if owners[bucket] == UNKNOWN:
                self._compute(bucket)
                budget -= self._size
        return self._cold > 0

    # --- choosing -------------------------------------------------------------------------------

    def owner(self, bucket: int) -> str | None:
        """The first choice for `bucket`, or None when there are no servers."""
        owner = self._owner[bucket]
        if owner == UNKNOWN:
            self._compute(bucket)
            owner = self._owner[bucket]
        return owner or None

    def pick(self, client_id: str) -> str | None:
        return self.owner(client_bucket(client_id))

    def next_choice(self, bucket: int, usable: Callable[[str], bool]) -> str | None:
        """The bucket's best server that `usable` accepts, for when its owner is not usable: the
        runner-up if it is, else an exact scan of the bucket's order (`usable` is asked only of
        servers that would beat the best usable one found so far)."""
        if self._runner[bucket] == UNKNOWN and self._size > 1:
            self._compute(bucket)
        runner = self._runner[bucket]
        if runner != UNKNOWN and usable(runner):
            return runner
        key: i64 = bucket_key(bucket)
        best: str | None = None
        best_score = math.inf
        for group in self._groups:
            capacity = group.capacity
            for server_id, seed in zip(group.ids, group.seeds, strict=True):
                hashed = rank_hash(key, seed)
                if _lower_bound(hashed, capacity) > best_score:
                    continue
                current = score(hashed, capacity)
                if (best is None or _before(current, server_id, best_score, best)) and usable(server_id):
                    best, best_score = server_id, current
        return best

    def pick_available(self, client_id: str, usable: Callable[[str], bool]) -> str | None:
        """The best server for `client_id` that `usable` accepts: first choice, else the next in rank."""
        bucket = client_bucket(client_id)
        first = self.owner(bucket)
        if first is None or usable(first):
            return first
        return self.next_choice(bucket, usable)

    def rank(self, client_id: str) -> list[str]:
        """Every server, best choice first: the order the client's bucket falls back through."""
        key: i64 = bucket_key(client_bucket(client_id))
        scored = sorted(
            (score(rank_hash(key, seed), group.capacity), server_id)
            for group in self._groups
            for server_id, seed in zip(group.ids, group.seeds, strict=True)
        )
        return [server_id for _, server_id in scored]

    def owners(self) -> list[str]:
        """Every bucket's owner (computing the cold ones): for measuring shares."""
        return [self.owner(bucket) or UNKNOWN for bucket in range(BUCKETS)]


def _lower_bound(hashed: i64, capacity: float) -> float:
    """`(1 - u) / capacity`, never above `score(hashed, capacity)` since -ln(u) >= 1 - u: a server
    whose bound already loses needs no logarithm."""
    return (1.0 - (float(hashed) + 0.5) * INV_2_32) / capacity


def _insert(
    current: float, server_id: str, best: str, best_score: float, second: str, second_score: float
) -> tuple[str, float, str, float]:
    """(best, its score, second, its score) after `server_id`, which beats `second`, joins them."""
    if _before(current, server_id, best_score, best):
        return server_id, current, best, best_score
    return best, best_score, server_id, current


def _before(score_a: float, id_a: str, score_b: float, id_b: str) -> bool:
    """The ranking's strict total order: lower score first, equal scores by id."""
    return score_a < score_b or (score_a == score_b and id_a < id_b)
