"""Dynamic mode's region policy (lbd/routing/regions.py) as pure functions, and the balancer applying it:
the spill order, the failback admission, and `explain` predicting both."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from lbd.balancer import REASON_FAILBACK, REASON_SPILL, REASON_STICKY, Balancer
from lbd.config import FailoverSettings, Regions
from lbd.models import Health, ServerSpec
from lbd.registry import Registry
from lbd.routing import regions
from lbd.routing.static import digest64
from lbd.sessions import SessionTable

NAMES = ("home", "near", "mid", "far", "last")
HOME_MAX, FALLBACK_MAX = 0.9, 0.8


def region_load(capacity: int, load: float) -> regions.RegionLoad:
    subject = regions.RegionLoad()
    subject.capacity = capacity
    subject.active = round(load)
    return subject


loads_strategy = st.lists(
    st.tuples(st.integers(0, 1000), st.floats(0, 1.5)), min_size=len(NAMES), max_size=len(NAMES)
).map(
    lambda rows: {
        name: region_load(capacity, share * capacity) for name, (capacity, share) in zip(NAMES, rows, strict=True)
    }
)
limits = st.floats(0.05, 1.0)


def limit_of(name: str, home_max: float, fallback_max: float) -> float:
    return home_max if name == NAMES[0] else fallback_max


# --- spill ------------------------------------------------------------------------------------------


@given(loads_strategy, limits, limits)
def test_the_order_is_the_regions_with_room_nearest_first_then_the_full_ones_least_utilized_first(
    loads: dict[str, regions.RegionLoad], home_max: float, fallback_max: float
) -> None:
    order = regions.spill_order(NAMES, loads, home_max, fallback_max)
    in_rotation = [name for name in NAMES if loads[name].capacity > 0]
    assert sorted(order) == sorted(in_rotation)  # every region with capacity, once; no other
    room = [name for name in order if loads[name].has_room(limit_of(name, home_max, fallback_max))]
    assert order[: len(room)] == room == [name for name in in_rotation if name in room]  # proximity order kept
    full = order[len(room) :]
    utilizations = [loads[name].utilization for name in full]
    assert utilizations == sorted(utilizations)
    for name in full:
        assert loads[name].load >= limit_of(name, home_max, fallback_max) * loads[name].capacity


@given(loads_strategy)
def test_without_load_the_order_is_the_proximity_order(loads: dict[str, regions.RegionLoad]) -> None:
    for load in loads.values():
        load.active = 0
    assert regions.spill_order(NAMES, loads, HOME_MAX, FALLBACK_MAX) == [n for n in NAMES if loads[n].capacity > 0]


@given(loads_strategy, st.sampled_from(NAMES), st.integers(1, 2000))
def test_more_load_never_moves_a_region_nearer(loads: dict[str, regions.RegionLoad], name: str, extra: int) -> None:
    before = regions.spill_order(NAMES, loads, HOME_MAX, FALLBACK_MAX)
    loads[name].active += extra
    after = regions.spill_order(NAMES, loads, HOME_MAX, FALLBACK_MAX)
    if name in before:
        assert after.index(name) >= before.index(name)


def test_a_fallback_region_takes_what_its_free_capacity_allows_and_the_rest_go_further() -> None:
    loads = {"home": region_load(0, 0), "near": region_load(100, 0), "mid": region_load(400, 0)}
    order = ("home", "near", "mid")
    placed = []
    for _ in range(400):  # each new client is one request in flight here
        first = regions.spill_order(order, loads, HOME_MAX, FALLBACK_MAX)[0]
        loads[first].active += 1
        placed.append(first)
    assert placed.count("near") == 80  # up to 80% of its capacity, its last fifth kept for its own clients
    assert placed.count("mid") == 320
    # every region full: the next goes where utilization is lowest
    assert regions.spill_order(order, loads, HOME_MAX, FALLBACK_MAX) == ["near", "mid"]
    loads["mid"].active += 10
    assert regions.spill_order(order, loads, HOME_MAX, FALLBACK_MAX) == ["near", "mid"]
    loads["near"].active += 10
    assert regions.spill_order(order, loads, HOME_MAX, FALLBACK_MAX) == ["mid", "near"]


def test_the_load_counts_clients_pinned_since_the_refresh_at_the_measured_rate_per_session() -> None:
    load = regions.RegionLoad()
    regions.observe(load, 100, 40, 200, now=0.0, home_max_load=HOME_MAX, fallback_per_session=0.0)
    assert load.per_session == 0.2 and load.load == 40
    load.pinned = 100
    assert math.isclose(load.load, 60.0)
    regions.observe(load, 100, 80, 200, now=1.0, home_max_load=HOME_MAX, fallback_per_session=0.0)
    assert load.pinned == 0 and load.load == 80
    assert math.isclose(load.per_session, 0.2 + regions.PER_SESSION_WEIGHT * (0.4 - 0.2))
    fresh = regions.RegionLoad()  # never held a session: the others' rate stands in
    regions.observe(fresh, 100, 0, 0, now=0.0, home_max_load=HOME_MAX, fallback_per_session=0.3)
    fresh.pinned = 10
    assert math.isclose(fresh.load, 3.0)


# --- failback ---------------------------------------------------------------------------------------


@given(st.floats(-1, 1000), st.floats(-1, 1000), st.floats(0, 300), st.floats(0, 300))
def test_the_admitted_share_is_zero_until_stable_then_grows_to_all_over_the_ramp(
    first: float, second: float, stable: float, ramp: float
) -> None:
    earlier, later = sorted((first, second))
    share_earlier, share_later = (regions.admitted(t, stable, ramp) for t in (earlier, later))
    assert 0.0 <= share_earlier <= share_later <= 1.0
    if earlier < stable or earlier < 0:
        assert share_earlier == 0.0
    if later - stable >= ramp and later >= stable and later >= 0:
        assert share_later == 1.0


def test_clients_are_admitted_back_in_a_fixed_order_at_the_ramps_rate() -> None:
    keys = [digest64(f"client-{i}") for i in range(20_000)]
    shares = [regions.client_share(key) for key in keys]
    assert all(0.0 <= share < 1.0 for share in shares)
    for admitted in (0.1, 0.25, 0.5, 0.9):
        fraction = sum(share < admitted for share in shares) / len(shares)
        assert abs(fraction - admitted) < 0.015, (admitted, fraction)
    # independent of the draws that choose a server (the low and high 32 bits of the same hash)
    low_half = [share for share, key in zip(shares, keys, strict=True) if key & 0xFFFFFFFF < 1 << 31]
    assert abs(sum(share < 0.5 for share in low_half) / len(low_half) - 0.5) < 0.02


def test_a_region_is_available_from_the_refresh_that_finds_room_until_one_that_finds_none() -> None:
    load = regions.RegionLoad()
    for now, capacity, active, expected in [
        (0.0, 0, 0, -1.0),  # nothing in rotation
        (1.0, 100, 10, 0.0),  # room: available since now
        (5.0, 100, 85, 4.0),  # still room (below 90%)
        (6.0, 100, 95, -1.0),  # full: the clock stops
        (7.0, 100, 50, 0.0),  # and starts again
    ]:
        regions.observe(load, capacity, active, 100, now, HOME_MAX, 0.0)
        assert load.available_for(now) == expected


# --- the balancer applying them ---------------------------------------------------------------------

REGIONS = Regions()


def deployment(failover: FailoverSettings | None = None) -> tuple[Registry, Balancer]:
    registry = Registry(REGIONS.latency_ms)
    layout = [("us-east", 4, 10), ("ca-central", 2, 5), ("eu-west", 3, 20)]
    for region, count, capacity in layout:
        for i in range(count):
            spec = ServerSpec(f"{region}-{i}", "http", "127.0.0.1", 9000 + i, region, capacity)
            registry.register(spec)
    return registry, Balancer(registry, "dynamic", REGIONS, SessionTable(9000, 100_000), failover=failover)


def servers_of(registry: Registry, region: str) -> list[str]:
    return [server.id for server in registry.servers() if server.spec.region == region]


def test_clients_of_a_region_that_went_down_spill_by_capacity_and_explain_says_why() -> None:
    registry, balancer = deployment()
    for server in registry.servers():
        if server.spec.region == "us-east":
            server.state.health = Health.COOLDOWN
    ca = servers_of(registry, "ca-central")
    placed: dict[str, int] = {}
    now = 0.0
    for i in range(50):
        now += 2.0  # a refresh before each: every new client is measured as one request in flight
        client = f"c{i}"
        explained = balancer.explain(client, "us-east", now)
        server = balancer.choose(client, "us-east", now)
        assert server is explained.server
        registry.get(server.id).state.active += 1  # type: ignore[union-attr]  # its request goes on
        placed[server.spec.region] = placed.get(server.spec.region, 0) + 1
        if server.spec.region == "eu-west":
            assert explained.reason == REASON_SPILL
            views = {view.region: view for view in explained.regions}
            assert not views["ca-central"].room and views["us-east"].capacity == 0
    assert placed["ca-central"] == 8  # 80% of its capacity of 10
    assert placed["eu-west"] == 42
    assert sum(registry.get(s).state.active for s in ca) == 8  # type: ignore[union-attr]


def test_a_session_away_from_home_goes_back_once_home_is_stable_at_the_ramps_rate() -> None:
    registry, balancer = deployment(FailoverSettings(failback_stable_ms=30_000, failback_ramp_ms=60_000))
    us = [registry.get(server_id) for server_id in servers_of(registry, "us-east")]
    for server in us:
        server.state.health = Health.COOLDOWN  # type: ignore[union-attr]
    clients = [f"c{i}" for i in range(200)]
    for client in clients:
        assert balancer.choose(client, "us-east", 1.0).spec.region != "us-east"
    for server in us:
        server.state.health = Health.HEALTHY  # type: ignore[union-attr]
    back_at: dict[str, float] = {}
    for step in range(0, 121):
        now = 10.0 + step
        for client in clients:
            if client in back_at:
                continue
            explained = balancer.explain(client, "us-east", now)
            server = balancer.choose(client, "us-east", now)
            assert server is explained.server
            if explained.reason == REASON_FAILBACK:
                assert server.spec.region == "us-east"
                back_at[client] = now
            else:
                assert explained.reason == REASON_STICKY and explained.failback is not None
    # home had room from the refresh at t=10: nobody back before t=40, everyone by t=100, evenly
    assert min(back_at.values()) >= 40.0 and max(back_at.values()) <= 101.0
    assert len(back_at) == len(clients)
    by_half = sum(1 for moment in back_at.values() if moment <= 70.0)
    assert 70 <= by_half <= 130
    for client in clients:
        session = balancer.sessions.peek(client, 200.0)
        assert session is not None and session.server_id.startswith("us-east")


def test_failback_off_keeps_sessions_where_they_are() -> None:
    registry, balancer = deployment(FailoverSettings(failback=False))
    us = [registry.get(server_id) for server_id in servers_of(registry, "us-east")]
    for server in us:
        server.state.health = Health.COOLDOWN  # type: ignore[union-attr]
    assert balancer.choose("away", "us-east", 1.0).spec.region == "ca-central"
    for server in us:
        server.state.health = Health.HEALTHY  # type: ignore[union-attr]
    for now in (100.0, 1000.0):
        assert balancer.choose("away", "us-east", now).spec.region == "ca-central"
    assert balancer.choose("new", "us-east", 1000.0).spec.region == "us-east"
