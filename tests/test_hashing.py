"""Properties of capacity-weighted rendezvous hashing (lbd.routing.static)."""

from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from lbd.routing.static import RendezvousTable

server_ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
memberships = st.dictionaries(server_ids, st.integers(min_value=1, max_value=50), min_size=1, max_size=20)
client_keys = st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=60, unique=True)


@given(memberships, client_keys)
def test_same_choice_whatever_the_list_order(servers: dict[str, int], keys: list[str]) -> None:
    items = list(servers.items())
    shuffled = items[:]
    random.Random(0).shuffle(shuffled)
    forward, scrambled = RendezvousTable(items), RendezvousTable(shuffled)
    assert [forward.pick(k) for k in keys] == [scrambled.pick(k) for k in keys]


@given(memberships, client_keys)
def test_pick_is_the_head_of_rank(servers: dict[str, int], keys: list[str]) -> None:
    table = RendezvousTable(servers.items())
    for key in keys:
        ranked = table.rank(key)
        assert sorted(ranked) == sorted(servers)
        assert table.pick(key) == ranked[0]


@given(memberships, st.tuples(server_ids, st.integers(1, 50)), client_keys)
def test_adding_a_server_moves_only_clients_to_it(
    servers: dict[str, int], new: tuple[str, int], keys: list[str]
) -> None:
    if new[0] in servers:
        return
    before = RendezvousTable(servers.items())
    after = RendezvousTable([*servers.items(), new])
    for key in keys:
        old_choice, new_choice = before.pick(key), after.pick(key)
        assert new_choice in (old_choice, new[0])


@given(memberships, client_keys)
def test_removing_a_server_moves_only_its_clients(servers: dict[str, int], keys: list[str]) -> None:
    if len(servers) < 2:
        return
    removed = sorted(servers)[0]
    before = RendezvousTable(servers.items())
    after = RendezvousTable((s, c) for s, c in servers.items() if s != removed)
    for key in keys:
        old_choice = before.pick(key)
        if old_choice != removed:
            assert after.pick(key) == old_choice
        else:
            # its clients go to their next choice, the same order a down server's clients use
            assert after.pick(key) == before.rank(key)[1]


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=20), min_size=2, max_size=6))
def test_shares_follow_capacity_within_3_points(capacities: list[int]) -> None:
    servers = [(f"server-{i}", capacity) for i, capacity in enumerate(capacities)]
    table = RendezvousTable(servers)
    rng = random.Random(1234)
    keys = [f"client-{rng.getrandbits(64):x}" for _ in range(6000)]
    counts = Counter(table.pick(key) for key in keys)
    total = sum(capacities)
    for server_id, capacity in servers:
        assert abs(counts[server_id] / len(keys) - capacity / total) <= 0.03, (server_id, counts)


def test_adding_one_server_moves_about_its_share() -> None:
    servers = [(f"s{i}", 10) for i in range(9)]
    before, after = RendezvousTable(servers), RendezvousTable([*servers, ("s9", 10)])
    keys = [f"user-{i}" for i in range(6000)]
    moved = sum(before.pick(k) != after.pick(k) for k in keys)
    assert 0.07 <= moved / len(keys) <= 0.13  # the newcomer's share is 10%


def test_same_choices_in_a_separate_process() -> None:
    """Keyed on SHA-256 of ids, not Python's randomized hash(): another interpreter agrees."""
    servers = [("a", 3), ("b", 5), ("c", 2)]
    keys = [f"k{i}" for i in range(50)]
    here = [RendezvousTable(servers).pick(k) for k in keys]
    code = (
        "from lbd.routing.static import RendezvousTable;"
        f"print(','.join(RendezvousTable({servers!r}).pick(f'k{{i}}') for i in range(50)))"
    )
    there = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "77"}
    ).stdout.strip()
    assert there.split(",") == here


def test_empty_table_picks_nothing() -> None:
    assert RendezvousTable(()).pick("anyone") is None
