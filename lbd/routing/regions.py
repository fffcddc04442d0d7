"""Dynamic mode's region policy, pure: which regions a new choice may use (spill by capacity), and
when a session away from its home region goes back (failback). No I/O; time is passed in as `now`.

A client's **home region** is the first region of its proximity order. A region's **load** is what
its servers in rotation are busy with, in requests in flight: the sum of their requests in flight
measured at the balancer's last refresh of the region totals (every second, or sooner while clients
are being pinned there fast), plus, for each client pinned there since, the region's requests in
flight per live session (what a session has brought on average; the next refresh measures what the
newcomers really bring). Its **capacity** is the capacity of its servers in rotation (concurrent
requests, as everywhere in dynamic mode); load / capacity is its **utilization**.

**Spill.** A new choice (a new client, a session whose server is gone, a retry) tries the regions of
the client's proximity order that have room, nearest first: the home region while its utilization is
below `home_max_load` (0.9), every other region while below `fallback_max_load` (0.8). A region that
lost servers keeps the clients its remaining capacity can take and the rest go to the next region,
which takes what its free capacity allows, and so on down the order: the spill is gradual, as with
Envoy's priority levels, not all-or-nothing as with HAProxy's backup servers. A fallback region
keeps its last fifth for its own clients. When no region of the order has room the load is spread
where it is lowest: the full regions follow, least utilized first. Regions with no server in
rotation are left out.

**Failback.** A session on a server outside the client's home region goes back home at a request
once the home region has had room (servers in rotation, utilization below `home_max_load`) for
`failback_stable_ms` without a break. Then the share of away clients allowed back grows from 0 to 1
over `failback_ramp_ms`; each client's place in line is a fixed function of its id (`client_share`),
so whether a client is admitted is deterministic (`lbctl route` shows it), and the returns spread
over the ramp instead of flooding the region at once. The home region must still have room at that
request; a session never goes back to a full region.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

from lbd.routing.static import MASK64

# How fast a region's in flight per session follows what each refresh measures (about 5 refreshes)
PER_SESSION_WEIGHT: Final = 0.2
FAILBACK_SALT: Final = 0x5F3759DF9E3779B9  # keeps a client's failback share independent of its other draws
UNIT: Final = 2.0**-53


class RegionLoad:
    """One server region's totals, as the spill rule and failback read them: refreshed from the servers
    periodically (`observe`) and moved by each client pinned there in between (`pinned`)."""

    __slots__ = ("active", "available_since", "capacity", "per_session", "pinned", "sessions")

    def __init__(self) -> None:
        self.capacity = 0  # of its servers in rotation
        self.active = 0  # requests in flight on them, at the last refresh
        self.sessions = 0  # live sessions pinned to them, at the last refresh
        self.per_session = -1.0  # requests in flight per live session; negative: never measured
        self.pinned = 0  # clients pinned here since the last refresh
        self.available_since = -1.0  # since when it has had room for its own clients; negative: it has none

    @property
    def load(self) -> float:
        """Requests in flight: as measured, plus an estimate for each client pinned since."""
        return self.active + self.pinned * max(self.per_session, 0.0)

    @property
    def utilization(self) -> float:
        """Load per unit of capacity in rotation (infinite with nothing in rotation)."""
        return self.load / self.capacity if self.capacity > 0 else float("inf")

    def has_room(self, max_load: float) -> bool:
        return self.capacity > 0 and self.load < max_load * self.capacity

    def available_for(self, now: float) -> float:
        """How long it has had room for its own clients without a break (negative: it has none)."""
        return -1.0 if self.available_since < 0.0 else now - self.available_since


def observe(
    region: RegionLoad,
    capacity: int,
    active: int,
    sessions: int,
    now: float,
    home_max_load: float,
    fallback_per_session: float,
) -> None:
    """A refresh: the region's measured totals replace its estimate. `fallback_per_session` (all regions'
    in flight per session) stands in for a region that has never held a session."""
    region.capacity, region.active, region.sessions, region.pinned = capacity, active, sessions, 0
    if sessions > 0:
        sample = active / sessions
        if region.per_session < 0.0:
            region.per_session = sample
        else:
            region.per_session += PER_SESSION_WEIGHT * (sample - region.per_session)
    elif region.per_session < 0.0:
        region.per_session = fallback_per_session
    if region.has_room(home_max_load):
        if region.available_since < 0.0:
            region.available_since = now
    else:
        region.available_since = -1.0


def spill_order(
    proximity: Sequence[str], loads: Mapping[str, RegionLoad], home_max_load: float, fallback_max_load: float
) -> list[str]:
    """The regions a new choice tries, in order: those of `proximity` with room, nearest first (the
    first, the home region, below `home_max_load` of its capacity; the others below
    `fallback_max_load`), then those without, least utilized first. Regions with no server in rotation
    are left out."""
    order: list[str] = []
    full: list[tuple[float, int, str]] = []
    for position, region in enumerate(proximity):
        load = loads.get(region)
        if load is None or load.capacity <= 0:
            continue
        if load.has_room(home_max_load if position == 0 else fallback_max_load):
            order.append(region)
        else:
            full.append((load.utilization, position, region))
    if full:
        full.sort()
        order.extend(region for _, _, region in full)
    return order


def admitted(available_for_s: float, stable_s: float, ramp_s: float) -> float:
    """The share of a region's away clients allowed back when it has had room for `available_for_s`
    (negative: it has none): 0 until `stable_s`, then growing linearly to 1 over `ramp_s`."""
    if available_for_s < 0.0 or available_for_s < stable_s:
        return 0.0
    if ramp_s <= 0.0:
        return 1.0
    return min(1.0, (available_for_s - stable_s) / ramp_s)


def client_share(client_key: int) -> float:
    """A client's place in line for failback, in [0, 1): uniform over clients, fixed by the hash of its
    id (`client_key`) and independent of the draws that choose its server. It goes back once the
    admitted share is above it."""
    mixed = (client_key ^ FAILBACK_SALT) & MASK64
    mixed = (mixed ^ (mixed >> 30)) * 0xBF58476D1CE4E5B9 & MASK64
    mixed = (mixed ^ (mixed >> 27)) * 0x94D049BB133111EB & MASK64
    mixed ^= mixed >> 31
    return (mixed >> 11) * UNIT
