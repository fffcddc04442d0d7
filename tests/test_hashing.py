"""Properties of capacity-weighted rendezvous hashing through the bucket table (lbd.routing.static).

The table caches a pure function of (bucket, membership): every property is checked against that
function computed from scratch (`reference_rank`), whatever mix of cold buckets, filled buckets,
additions and removals led to the table.
"""

from __future__ import annotations

import importlib.util
import math
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from lbd.routing import static
from lbd.routing.static import BUCKETS, BucketTable, bucket_key, client_bucket, rank_hash, score, server_seed

server_ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
memberships = st.dictionaries(server_ids, st.integers(min_value=1, max_value=50), min_size=1, max_size=20)
client_keys = st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=60, unique=True)
SOURCE = Path(__file__).resolve().parent.parent / "lbd" / "routing" / "static.py"  # the source, never the .so


def reference_rank(servers: dict[str, int], bucket: int) -> list[str]:
    """The bucket's servers in rendezvous order, from the definition: lowest -ln(u)/capacity first."""
    key = bucket_key(bucket)
    return [
        server_id
        for _, server_id in sorted(
            (score(rank_hash(key, server_seed(server_id)), float(capacity)), server_id)
            for server_id, capacity in servers.items()
        )
    ]


def fill(table: BucketTable) -> BucketTable:
    while table.fill(1 << 30):
        pass
    return table


@settings(max_examples=40, deadline=None)
@given(memberships, st.lists(st.integers(0, BUCKETS - 1), min_size=1, max_size=30))
def test_owner_and_runner_up_are_the_rendezvous_ranking(servers: dict[str, int], buckets: list[int]) -> None:
    table = BucketTable(servers.items())
    for bucket in buckets:
        ranked = reference_rank(servers, bucket)
        assert table.owner(bucket) == ranked[0]
        assert table.next_choice(bucket, lambda server_id, first=ranked[0]: server_id != first) == (
            ranked[1] if len(ranked) > 1 else None
        )


@given(memberships, client_keys)
def test_same_choice_whatever_the_list_order(servers: dict[str, int], keys: list[str]) -> None:
    items = list(servers.items())
    shuffled = items[:]
    random.Random(0).shuffle(shuffled)
    forward, scrambled = BucketTable(items), BucketTable(shuffled)
    assert [forward.pick(k) for k in keys] == [scrambled.pick(k) for k in keys]


@given(memberships, client_keys)
def test_pick_is_the_head_of_rank(servers: dict[str, int], keys: list[str]) -> None:
    table = BucketTable(servers.items())
    for key in keys:
        ranked = table.rank(key)
        assert ranked == reference_rank(servers, client_bucket(key))
        assert table.pick(key) == ranked[0]


operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), server_ids, st.integers(1, 50)),
        st.tuples(st.just("remove"), st.integers(0, 30), st.just(0)),
        st.tuples(st.just("fill"), st.integers(1, 400), st.just(0)),
        st.tuples(st.just("use"), st.integers(0, BUCKETS - 1), st.just(0)),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(memberships, operations)
def test_incremental_changes_equal_a_table_built_from_scratch(
    servers: dict[str, int], ops: list[tuple[str, object, int]]
) -> None:
    """Additions, removals, partial fills and lookups in any order leave exactly the table a fresh
    build of the final membership gives: owners, and runner-ups wherever they are known."""
    table = BucketTable(servers.items())
    members = dict(servers)
    for op, argument, capacity in ops:
        if op == "add" and isinstance(argument, str) and argument not in members:
            table.add(argument, capacity)
            members[argument] = capacity
        elif op == "remove" and members and isinstance(argument, int):
            gone = sorted(members)[argument % len(members)]
            table.remove(gone)
            del members[gone]
        elif op == "fill" and isinstance(argument, int):
            table.fill(argument * max(1, len(members)))
        elif op == "use" and isinstance(argument, int):
            table.owner(argument)
    if not members:
        assert table.pick("anyone") is None
        return
    assert table.owners() == BucketTable(members.items()).owners()
    for bucket in random.Random(len(members)).sample(range(BUCKETS), 50):
        ranked = reference_rank(members, bucket)
        assert table.owner(bucket) == ranked[0]
        expected = ranked[1] if len(ranked) > 1 else None
        assert table.next_choice(bucket, lambda server_id, first=ranked[0]: server_id != first) == expected


@given(memberships, st.tuples(server_ids, st.integers(1, 50)), client_keys, st.booleans())
def test_adding_a_server_moves_only_clients_to_it(
    servers: dict[str, int], new: tuple[str, int], keys: list[str], warm: bool
) -> None:
    if new[0] in servers:
        return
    table = BucketTable(servers.items())
    if warm:
        fill(table)
    before = [table.pick(key) for key in keys]
    table.add(*new)
    for key, old_choice in zip(keys, before, strict=True):
        assert table.pick(key) in (old_choice, new[0])


@given(memberships, client_keys, st.booleans())
def test_removing_a_server_moves_only_its_clients_to_their_next_choice(
    servers: dict[str, int], keys: list[str], warm: bool
) -> None:
    if len(servers) < 2:
        return
    removed = sorted(servers)[0]
    table = BucketTable(servers.items())
    if warm:
        fill(table)
    before = {key: table.rank(key) for key in keys}
    table.remove(removed)
    for key, ranked in before.items():
        assert table.pick(key) == (ranked[0] if ranked[0] != removed else ranked[1])


@given(memberships, client_keys, st.sets(server_ids, max_size=5))
def test_clients_of_servers_out_of_rotation_take_their_next_choice_and_nobody_else_moves(
    servers: dict[str, int], keys: list[str], out: set[str]
) -> None:
    table = BucketTable(servers.items())
    for key in keys:
        ranked = table.rank(key)
        usable = [server_id for server_id in ranked if server_id not in out]
        chosen = table.pick_available(key, lambda server_id: server_id not in out)
        assert chosen == (usable[0] if usable else None)
        if ranked[0] not in out:
            assert chosen == ranked[0]  # a client whose first choice is up does not move


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=20), min_size=2, max_size=6))
def test_shares_follow_capacity_within_3_points(capacities: list[int]) -> None:
    servers = [(f"server-{i}", capacity) for i, capacity in enumerate(capacities)]
    table = BucketTable(servers)
    rng = random.Random(1234)
    keys = [f"client-{rng.getrandbits(64):x}" for _ in range(6000)]
    counts = Counter(table.pick(key) for key in keys)
    total = sum(capacities)
    for server_id, capacity in servers:
        assert abs(counts[server_id] / len(keys) - capacity / total) <= 0.03, (server_id, counts)


def test_buckets_are_shared_in_proportion_to_capacity() -> None:
    """Each server's bucket count is what independent draws give (binomial around its capacity share,
    within 4 standard deviations), with 100 servers of mixed capacities; the spread at larger sizes is
    measured by bench/microbench.py."""
    rng = random.Random(7)
    servers = {f"srv-{i:03}": rng.choice((5, 10, 20, 40)) for i in range(100)}
    owned = Counter(fill(BucketTable(servers.items())).owners())
    total = sum(servers.values())
    for server_id, capacity in servers.items():
        expected = BUCKETS * capacity / total
        assert abs(owned[server_id] - expected) <= 4 * math.sqrt(expected), (server_id, owned[server_id], expected)


def test_adding_one_server_moves_about_its_share() -> None:
    servers = [(f"s{i}", 10) for i in range(9)]
    table = fill(BucketTable(servers))
    keys = [f"user-{i}" for i in range(6000)]
    before = [table.pick(k) for k in keys]
    table.add("s9", 10)
    moved = sum(old != table.pick(k) for k, old in zip(keys, before, strict=True))
    assert 0.07 <= moved / len(keys) <= 0.13  # the newcomer's share is 10%


def test_same_choices_in_a_separate_process_compiled_or_not() -> None:
    """Keyed on SHA-256 of ids and bucket numbers, not Python's randomized hash(); and the interpreted
    source (what LB_PURE_PYTHON=1 runs) agrees with whatever this process imported."""
    servers = [("a", 3), ("b", 5), ("c", 2)]
    keys = [f"k{i}" for i in range(200)]
    here = [BucketTable(servers).pick(k) for k in keys]
    code = (
        "import importlib.util, sys;"
        f"spec = importlib.util.spec_from_file_location('pure_static', {str(SOURCE)!r});"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module);"
        f"print(','.join(module.BucketTable({servers!r}).pick(f'k{{i}}') for i in range(200)))"
    )
    there = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "77"}
    ).stdout.strip()
    assert there.split(",") == here


def test_interpreted_and_compiled_hashes_agree() -> None:
    spec = importlib.util.spec_from_file_location("pure_static", SOURCE)
    assert spec is not None and spec.loader is not None
    pure = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pure)
    rng = random.Random(3)
    for _ in range(2000):
        bucket, seed = rng.randrange(BUCKETS), rng.getrandbits(32)
        assert pure.rank_hash(pure.bucket_key(bucket), seed) == rank_hash(bucket_key(bucket), seed)
    servers = {f"s{i}": rng.randint(1, 30) for i in range(40)}
    assert pure.BucketTable(servers.items()).owners() == BucketTable(servers.items()).owners()


def test_fmix32_is_murmur3s_finalizer() -> None:
    def murmur(value: int) -> int:
        value ^= value >> 16
        value = value * 0x85EBCA6B & 0xFFFFFFFF
        value ^= value >> 13
        value = value * 0xC2B2AE35 & 0xFFFFFFFF
        return value ^ (value >> 16)

    rng = random.Random(5)
    for value in [0, 1, 2, 3, 0xFFFFFFFF, *(rng.getrandbits(32) for _ in range(5000))]:
        assert static.fmix32(value) == murmur(value)


def test_fill_works_in_slices_and_an_empty_table_picks_nothing() -> None:
    assert BucketTable(()).pick("anyone") is None
    assert not BucketTable(()).fill(1000)
    table = BucketTable([("a", 1), ("b", 2)])
    assert table.cold == BUCKETS
    assert table.fill(1000)  # 1,000 evaluations: 500 buckets of two servers
    assert table.cold == BUCKETS - 500
    fill(table)
    assert table.cold == 0 and not table.fill(1000)
