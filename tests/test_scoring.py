"""Dynamic mode's score, as pure functions: its terms, its bounds, and where it sends new clients.

A simulated client here is what lbd does for a new client: `dynamic.pick`, then one more session
pinned to the chosen server (`Balancer.choose` pins it). End-to-end versions: tests/test_dynamic_spread.py.
"""

from __future__ import annotations

import math
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from lbd.models import LATENCY_DECAY_S, Outcome, RegionLatency, Server, ServerSpec, ServerState
from lbd.registry import Registry
from lbd.routing import dynamic
from lbd.routing.static import digest64

PROXIMITY = ("us-east", "ca-central")
CONFIGURED_MS = 10.0


def region(typical_ms: float = 1.0) -> RegionLatency:
    return RegionLatency(CONFIGURED_MS, typical_ms, measured=True)


def server(
    server_id: str,
    capacity: int = 10,
    latency_ms: float | None = None,
    at: float = 0.0,
    shared: RegionLatency | None = None,
    active: int = 0,
) -> Server:
    """A server of us-east; `latency_ms` None means never measured."""
    state = ServerState(active=active)
    if latency_ms is not None:
        state.latency_ewma_ms, state.latency_at = latency_ms, at
    spec = ServerSpec(server_id, "http", "127.0.0.1", 1000, "us-east", capacity)
    return Server(spec, state, shared or region())


def new_clients(
    servers: list[Server], count: int, pinned: Counter[str] | None = None, now: float = 0.0
) -> Counter[str]:
    """`count` new clients one after another; returns the sessions per server afterwards."""
    pinned = Counter() if pinned is None else pinned
    index = dynamic.RegionIndex.build(servers)
    for i in range(count):
        chosen = dynamic.pick(index, digest64(f"client-{len(pinned)}-{i}"), PROXIMITY, pinned, now)
        assert chosen is not None
        pinned[chosen.server.id] += 1
    return pinned


latencies = st.floats(min_value=0.01, max_value=5000.0)
capacities = st.integers(min_value=1, max_value=1000)


# --- the terms ------------------------------------------------------------------------------------


@given(st.integers(0, 500), st.integers(0, 50), capacities, st.one_of(st.none(), latencies), latencies)
def test_score_is_the_factor_times_load_over_capacity(
    sessions: int, active: int, capacity: int, latency: float | None, typical: float
) -> None:
    subject = server("s", capacity, latency, shared=region(typical), active=active)
    terms = dynamic.score_terms(subject, sessions, now=0.0)
    factor = dynamic.latency_factor(subject, 0.0)
    assert 1 / 4 <= factor <= 4
    assert math.isclose(dynamic.score(subject, sessions, 0.0), factor * (sessions + active + 1) / capacity)
    assert terms["sessions"] == sessions and terms["active"] == active and terms["capacity"] == capacity
    assert math.isclose(terms["score"], dynamic.score(subject, sessions, 0.0), rel_tol=1e-3, abs_tol=1e-4)


@given(st.integers(0, 500), st.integers(0, 50), capacities, latencies, latencies)
def test_more_load_or_a_slower_answer_never_scores_better(
    sessions: int, active: int, capacity: int, latency: float, typical: float
) -> None:
    shared = region(typical)
    base = server("s", capacity, latency, shared=shared, active=active)
    assert dynamic.score(base, sessions + 1, 0.0) > dynamic.score(base, sessions, 0.0)
    busier = server("s", capacity, latency, shared=shared, active=active + 1)
    assert dynamic.score(busier, sessions, 0.0) > dynamic.score(base, sessions, 0.0)
    bigger = server("s", capacity + 1, latency, shared=shared, active=active)
    assert dynamic.score(bigger, sessions, 0.0) < dynamic.score(base, sessions, 0.0)
    slower = server("s", capacity, latency * 2, shared=shared, active=active)
    assert dynamic.latency_factor(slower, 0.0) >= dynamic.latency_factor(base, 0.0)


@given(latencies, st.floats(min_value=0.0, max_value=1e6))
def test_an_unmeasured_server_is_scored_at_its_regions_typical_latency(typical: float, now: float) -> None:
    assert dynamic.latency_factor(server("new", shared=region(typical)), now) == 1.0


@given(latencies, latencies, st.floats(min_value=0.0, max_value=100.0))
def test_an_idle_estimate_decays_toward_the_typical_latency(latency: float, typical: float, idle: float) -> None:
    subject = server("s", latency_ms=latency, at=0.0, shared=region(typical))
    estimate = subject.state.latency_estimate_ms(typical, idle)
    low, high = sorted((latency, typical))
    assert low - 1e-9 <= estimate <= high + 1e-9  # on the way from its own estimate to the typical one
    later = subject.state.latency_estimate_ms(typical, idle + 1.0)
    assert abs(later - typical) <= abs(estimate - typical) + 1e-9
    forgotten = subject.state.latency_estimate_ms(typical, 20 * LATENCY_DECAY_S)
    assert abs(forgotten - typical) <= 1e-8 * abs(latency - typical) + 1e-12


def test_the_factor_compares_with_peers_damped_by_the_regions_configured_latency() -> None:
    shared = region(1.0)
    assert dynamic.latency_factor(server("slow", latency_ms=40.0, shared=shared), 0.0) == 4.0  # (40+10)/(1+10) > 4
    assert math.isclose(dynamic.latency_factor(server("jitter", latency_ms=1.5, shared=shared), 0.0), 11.5 / 11)
    assert dynamic.latency_factor(server("fast", latency_ms=0.1, shared=region(100.0)), 0.0) == 0.25


# --- where new clients go -----------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=dynamic.EXACT_SCAN_LIMIT), st.integers(50, 600))
def test_sequential_new_clients_follow_capacity(caps: list[int], count: int) -> None:
    """Sessions are the load: each server ends within one client per server of its capacity share."""
    servers = [server(f"s{i}", capacity) for i, capacity in enumerate(caps)]
    pinned = new_clients(servers, count)
    total = sum(caps)
    for subject in servers:
        assert abs(pinned[subject.id] - count * subject.spec.capacity / total) <= len(caps), pinned


def test_capacities_10_and_30_take_a_quarter_and_three_quarters_and_a_late_server_catches_up() -> None:
    e1, e2 = server("e1", 10), server("e2", 30)
    pinned = new_clients([e1, e2], 400)
    assert (pinned["e1"], pinned["e2"]) == (100, 300)
    e3 = server("e3", 20)
    before = Counter(pinned)
    new_clients([e1, e2, e3], 300, pinned)
    assert pinned["e3"] - before["e3"] >= 60  # at least 20% of the 300; in fact it catches up first
    assert pinned["e3"] / 20 >= max(pinned["e1"] / 10, pinned["e2"] / 30) - 1


def test_requests_in_flight_count_as_load_too() -> None:
    busy, idle = server("busy", active=6), server("idle")
    pinned = Counter({"busy": 10, "idle": 10})
    new_clients([busy, idle], 6, pinned)
    assert pinned["idle"] == 16  # the six slow requests in flight weigh like six sessions


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 6), st.integers(100, 400))
def test_a_clearly_slower_server_gets_fewer_new_clients_but_not_none(others: int, count: int) -> None:
    shared = region(1.0)
    slow = server("slow", latency_ms=40.0, shared=shared)
    fast = [server(f"fast{i}", latency_ms=1.0, shared=shared) for i in range(others)]
    pinned = new_clients([slow, *fast], count)
    fair = count / (others + 1)
    assert 0 < pinned["slow"] < fair / 2, pinned


def test_an_unmeasured_server_is_neither_favoured_nor_starved() -> None:
    shared = region(0.2)
    measured = server("measured", latency_ms=0.2, shared=shared)
    pinned = new_clients([measured, server("unmeasured", shared=shared)], 400)
    assert pinned["unmeasured"] == pinned["measured"] == 200


@settings(max_examples=10, deadline=None)
@given(st.lists(st.integers(1, 100), min_size=dynamic.EXACT_SCAN_LIMIT + 1, max_size=40))
def test_drawn_choices_in_large_regions_still_follow_capacity(caps: list[int]) -> None:
    """Regions above the exact-scan limit draw servers in proportion to capacity; sessions
    then keep every server near its capacity share of the clients."""
    servers = [server(f"s{i:02}", capacity) for i, capacity in enumerate(caps)]
    count = 50 * len(caps)
    pinned = new_clients(servers, count)
    total = sum(caps)
    for subject in servers:
        due = count * subject.spec.capacity / total
        assert abs(pinned[subject.id] - due) <= max(4.0, 0.25 * due), (subject.id, pinned[subject.id], due)


def test_choices_draw_in_proportion_to_capacity() -> None:
    """Without sessions to even things out, each draw is capacity-weighted: over evenly spread
    fractions of 2^32, every server is drawn its capacity share of the time (to one draw), and the
    draws of a client are independent (the same server twice is allowed)."""
    caps = [1, 2, 4, 8, 16, 32, 64, 1, 2, 4]
    members = dynamic.RegionIndex.build([server(f"s{i}", c) for i, c in enumerate(caps)]).by_region["us-east"]
    draws = 13_400
    drawn = Counter(members.ids[members.draw((i << 32) // draws)] for i in range(draws))
    for server_id, capacity in zip(members.ids, caps, strict=True):
        assert abs(drawn[server_id] - draws * capacity / sum(caps)) <= 1
    chosen = [dynamic.draw_choices(members, digest64(f"c{i}"), None, dynamic.is_available) for i in range(4000)]
    assert all(len(draws) == dynamic.CHOICES for draws in chosen)
    expected = sum((c / sum(caps)) ** 2 for c in caps)
    for first, second in [(0, 1), (0, 2), (1, 3), (2, 3)]:  # any two draws coincide as independent ones do
        same = sum(draws[first] == draws[second] for draws in chosen)
        assert abs(same / 4000 - expected) < 0.03


# --- the registry's latency estimates -----------------------------------------------------------


def test_first_answer_sets_the_estimate_and_later_ones_blend_in_from_where_it_decayed() -> None:
    registry = Registry({"us-east": 10})
    registry.register(ServerSpec("a", "http", "127.0.0.1", 1, "us-east", 10))
    registry.register(ServerSpec("b", "http", "127.0.0.1", 2, "us-east", 10))
    a, b = registry.get("a"), registry.get("b")
    assert a is not None and b is not None and a.region_latency is b.region_latency
    assert a.region_latency.typical_ms == 10.0 and not a.region_latency.measured
    registry._observe_latency(a, 200.0, now=100.0)
    assert a.state.latency_ewma_ms == 200.0 and a.region_latency.typical_ms == 200.0
    for _ in range(50):
        registry._observe_latency(b, 1.0, now=100.0)
    typical = a.region_latency.typical_ms
    assert typical < 20.0  # the region's typical latency follows its answers
    # a few slow early answers do not stick: a minute idle, a's estimate is back near typical, and
    # its next answer blends in from there
    registry._observe_latency(a, 1.0, now=160.0)
    assert a.state.latency_ewma_ms < typical + 1.0


def test_an_answer_settled_late_never_winds_the_estimate_s_clock_back() -> None:
    """A long response is settled after answers that came since its head: its sample blends in, and
    the estimate's clock stays at the latest answer, so the server's slow history does not decay
    as though it had been idle since that head."""
    registry = Registry({"us-east": 10})
    registry.register(ServerSpec("a", "http", "127.0.0.1", 1, "us-east", 10))
    a = registry.get("a")
    assert a is not None
    registry.record_outcome(a, Outcome.OK, 0.2, 130.0)  # answers up to t=130
    registry.record_outcome(a, Outcome.OK, 0.2, 100.0)  # a download whose head came at t=100, settled now
    assert a.state.latency_at == 130.0
    assert a.state.latency_estimate_ms(a.region_latency.typical_ms, 130.0) == a.state.latency_ewma_ms
