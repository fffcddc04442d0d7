"""Pure parts of dynamic mode: the session table and the server score / choice."""

from __future__ import annotations

import itertools
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from lbd.models import Health, Server, ServerSpec, ServerState
from lbd.routing import dynamic
from lbd.routing.static import digest64
from lbd.sessions import SessionTable

PROXIMITY = ("us-east", "ca-central", "eu-west")


def make_server(server_id: str, region: str = "us-east", capacity: int = 10, **state: object) -> Server:
    spec = ServerSpec(server_id, "http", "127.0.0.1", 1000 + len(server_id), region, capacity)
    live = ServerState(latency_ewma_ms=10.0)
    for key, value in state.items():
        setattr(live, key, value)
    return Server(spec, live)


# --- sessions -----------------------------------------------------------------------------------


def test_session_slides_with_activity_and_expires_when_idle() -> None:
    table = SessionTable(idle_timeout_s=10, max_sessions=100)
    table.pin("alice", "s1", "us-east", now=0)
    assert table.get("alice", now=9) is not None  # touched at 9: expiry moves to 19
    session = table.get("alice", now=18)
    assert session is not None and session.server_id == "s1"
    assert table.get("alice", now=28.5) is None
    assert len(table) == 0


def test_oldest_idle_is_evicted_first_at_the_bound() -> None:
    table = SessionTable(idle_timeout_s=100, max_sessions=3)
    for i, client in enumerate(("a", "b", "c")):
        table.pin(client, "s1", None, now=i)
    table.get("a", now=5)  # a is now the most recently active
    table.pin("d", "s1", None, now=6)
    assert table.peek("b", now=6) is None  # b was the oldest idle
    assert {c for c, _ in table.items(now=6)} == {"a", "c", "d"}
    assert table.evicted == 1


def test_sweep_expires_in_order_and_stops_at_the_first_live_session() -> None:
    table = SessionTable(idle_timeout_s=10, max_sessions=1000)
    for i in range(100):
        table.pin(f"c{i}", "s1", None, now=i)
    removed = table.sweep(now=60)  # sessions touched at 0..50 are idle >= 10 s
    assert removed == 51
    assert len(table) == 49
    assert table.peek("c51", now=60) is not None


def test_a_touch_moves_a_session_only_after_a_64th_of_the_idle_timeout() -> None:
    """Touches within 1/64 of the idle timeout of the session's last move leave the order alone (no
    list surgery per request); the sweep then reclaims a session behind it at most that much late,
    and `get` never returns an expired one."""
    table = SessionTable(idle_timeout_s=64, max_sessions=1000)  # reordered after 1 s
    table.pin("front", "s1", None, now=0)
    table.pin("behind", "s1", None, now=0.5)
    assert table.get("front", now=0.9) is not None  # within 1 s of its placing: stays in front
    assert [client for client, _ in table.items(now=0.9)] == ["front", "behind"]
    assert table.get("behind", now=64.6) is None  # expired on time, whatever its place
    table.pin("behind", "s1", None, now=0.5)  # back, as before
    table.sweep(now=64.6)  # "behind" is idle 64.1 s, "front" 63.7 s: the sweep stops at "front"
    assert len(table) == 2
    table.sweep(now=64.9)  # "front" expires too, and "behind" with it: 0.4 s late, under 1 s
    assert len(table) == 0
    table.pin("front", "s1", None, now=100)
    table.pin("behind", "s1", None, now=100.5)
    assert table.get("front", now=101) is not None  # 1 s after its placing: moved to the end
    assert [client for client, _ in table.items(now=101)] == ["behind", "front"]


@given(st.lists(st.tuples(st.sampled_from(("get", "pin")), st.sampled_from("abcdef"), st.floats(0, 0.6)), max_size=80))
def test_the_table_stays_in_order_to_within_its_reorder_slack(steps: list[tuple[str, str, float]]) -> None:
    """Touches often a fraction of the reorder slack apart (idle 64 s: 1 s of slack): whatever the steps,
    no session was last used more than the slack after it was placed, the table is in the order it
    was placed, `get` returns only live sessions, and at the bound the session evicted was idle
    within the slack of the longest idle one."""
    table = SessionTable(idle_timeout_s=64, max_sessions=4)
    now = 0.0
    for op, client, step in steps:
        now += step
        live = {c for c, _ in table.items(now)}
        if op == "get":
            session = table.get(client, now)
            assert session is None or client in live
        else:
            evicted_before = table.evicted
            before = {c: now - s.last_seen for c, s in table._table.items()}
            table.pin(client, "s1", None, now)
            if table.evicted > evicted_before:
                gone = (before.keys() - {c for c, _ in table._table.items()}).pop()
                assert before[gone] > max(before.values()) - 1.0 - 1e-9  # (float rounding of the ages)
        sessions = [session for _, session in table._table.items()]
        assert all(0.0 <= s.last_seen - s.placed < 1.0 for s in sessions)  # as the table measures it
        assert all(a.placed <= b.placed for a, b in itertools.pairwise(sessions))


@given(st.lists(st.tuples(st.sampled_from("abcdefgh"), st.floats(0, 5)), max_size=60))
def test_table_never_exceeds_its_bound_and_never_returns_expired(events: list[tuple[str, float]]) -> None:
    table = SessionTable(idle_timeout_s=3, max_sessions=4)
    now = 0.0
    last_seen: dict[str, float] = {}
    for client, step in events:
        now += step
        session = table.get(client, now)
        if session is not None:
            assert now - last_seen[client] < 3
        else:
            table.pin(client, "s1", None, now)
        last_seen[client] = now
        assert len(table) <= 4


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["pin", "get", "remove", "clear_server", "sweep"]),
            st.sampled_from("abcdef"),
            st.sampled_from(["s1", "s2"]),
            st.floats(0, 2),
        ),
        max_size=80,
    )
)
def test_per_server_and_region_counts_always_match_the_table(ops: list[tuple[str, str, str, float]]) -> None:
    table = SessionTable(idle_timeout_s=3, max_sessions=4)
    now = 0.0
    for op, client, server, step in ops:
        now += step
        if op == "pin":
            table.pin(client, server, "eu-west" if server == "s1" else "us-east", now)
        elif op == "get":
            table.get(client, now)
        elif op == "remove":
            table.remove(client)
        elif op == "clear_server":
            table.remove_server(server)
        else:
            table.sweep(now)
        live = [session for _, session in table._table.items()]
        assert dict(table.by_server) == dict(Counter(session.server_id for session in live))
        assert sum(table.by_region.values()) == len(table)


def test_repin_moves_the_session() -> None:
    table = SessionTable(idle_timeout_s=10, max_sessions=10)
    table.pin("alice", "s1", "us-east", now=0)
    table.pin("alice", "s2", "us-east", now=1)
    session = table.get("alice", now=2)
    assert session is not None and session.server_id == "s2"
    assert len(table) == 1


# --- choosing (scores themselves: tests/test_scoring.py) -----------------------------------------

NOBODY: Counter[str] = Counter()  # no sessions pinned anywhere


def test_pick_chooses_lowest_score_never_the_highest() -> None:
    servers = [make_server("a", active=8), make_server("b", active=1), make_server("c", active=5)]
    index = dynamic.RegionIndex.build(servers)
    chosen = dynamic.pick(index, digest64("client"), PROXIMITY, NOBODY, 0.0)
    assert chosen is not None and chosen.server.id == "b" and not chosen.fallback


def test_pick_walks_proximity_when_region_has_nothing_available() -> None:
    servers = [
        make_server("full", active=10),
        make_server("drained", draining=True),
        make_server("down", health=Health.COOLDOWN),
        make_server("ca", region="ca-central"),
        make_server("eu", region="eu-west"),
    ]
    chosen = dynamic.pick(dynamic.RegionIndex.build(servers), digest64("c"), PROXIMITY, NOBODY, 0.0)
    assert chosen is not None and chosen.server.id == "ca" and chosen.fallback and chosen.region == "ca-central"


def test_ties_break_deterministically_and_spread_over_clients() -> None:
    servers = [make_server(f"s{i}") for i in range(4)]
    index = dynamic.RegionIndex.build(servers)
    first = [dynamic.pick(index, digest64(f"client-{i}"), PROXIMITY, NOBODY, 0.0) for i in range(200)]
    again = [dynamic.pick(index, digest64(f"client-{i}"), PROXIMITY, NOBODY, 0.0) for i in range(200)]
    assert [p.server.id for p in first if p] == [p.server.id for p in again if p]
    assert len({p.server.id for p in first if p}) == 4  # equal scores do not all land on one server


def test_large_regions_draw_choices_and_still_find_the_only_free_server() -> None:
    servers = [make_server(f"s{i:04}", active=10) for i in range(1000)]
    servers[537].state.active = 0
    index = dynamic.RegionIndex.build(servers)
    for i in range(20):
        chosen = dynamic.pick(index, digest64(f"c{i}"), PROXIMITY, NOBODY, 0.0)
        assert chosen is not None and chosen.server.id == "s0537"


def test_pick_can_exclude_the_failed_server() -> None:
    a, b = make_server("a"), make_server("b", active=3)
    index = dynamic.RegionIndex.build([a, b])
    chosen = dynamic.pick(index, digest64("c"), PROXIMITY, NOBODY, 0.0, exclude=a)
    assert chosen is not None and chosen.server is b


def test_region_index_follows_joins_and_leaves() -> None:
    servers = [make_server(f"s{i}", capacity=i + 1) for i in range(5)]
    index = dynamic.RegionIndex.build(servers[:3])
    index.add(servers[4])
    index.add(servers[3])
    index.remove(servers[0])
    members = index.by_region["us-east"]
    assert members.ids == ["s1", "s2", "s3", "s4"]
    assert members.cumulative == [2, 5, 9, 14]
    assert members.hashes == [digest64(server_id) for server_id in members.ids]
    for server in servers[1:]:
        index.remove(server)
    assert "us-east" not in index.by_region
