"""The single writer of server membership and server state.

Health checks and the admin API change servers only through these methods; the balancer and the
admin views read `servers()` / `get()`. Every membership change bumps `version` and tells each
subscriber what changed (`Change`), so the balancer and the health checker update in proportion to
the change, not to the membership.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Final

from lbd.clock import monotonic
from lbd.config import HealthSettings
from lbd.health import machine
from lbd.models import LATENCY_BUCKETS_S, Outcome, RegionLatency, Server, ServerSpec, ServerState

log = logging.getLogger("lbd.health")
_BUCKET_BOUNDS: Final[list[float]] = list(LATENCY_BUCKETS_S)

LATENCY_EWMA_WEIGHT: Final = 0.2  # a server's estimate: each answer moves it a fifth of the way
REGION_LATENCY_WEIGHT: Final = 0.05  # a region's typical latency: about its last 20 answers, from any of its servers


@dataclass(frozen=True, slots=True)
class Change:
    """One membership change: the servers that joined and those that left (a re-registration with a
    new address is a leave, then a join)."""

    added: tuple[Server, ...] = ()
    removed: tuple[Server, ...] = ()
    reweighted: tuple[Server, ...] = ()  # the same servers with a new capacity (`lbctl set capacity`)


Listener = Callable[[Change], None]


def latency_bucket(latency_s: float) -> int:
    """The histogram bucket `latency_s` counts in (Prometheus `le`: a value equal to a bound counts
    there). Scanned from the smallest: most answers land in the first buckets, reached sooner than
    a call to bisect returns. (A list: compiled code reads a tuple's every item before the first.)"""
    bounds = _BUCKET_BOUNDS
    for index in range(len(bounds)):
        if latency_s <= bounds[index]:
            return index
    return len(bounds)


class RegistryConflict(Exception):
    """Registering an id that exists with a different address."""


class Registry:
    def __init__(
        self,
        region_latency_ms: Mapping[str, int],
        health: HealthSettings | None = None,
        specs: Iterable[ServerSpec] = (),
    ) -> None:
        self._servers: dict[str, Server] = {}
        self._listeners: list[Listener] = []
        self._region_latency_ms = region_latency_ms
        self._regions: dict[str, RegionLatency] = {}
        self.health = health or HealthSettings()
        self.version = 0
        for spec in specs:
            self._servers[spec.id] = self._new_server(spec)

    def _new_server(self, spec: ServerSpec) -> Server:
        """A fresh server, sharing its region's typical latency; until its first answer its shown
        latency is the region's configured one (what it is scored by is the region's typical)."""
        region = self.region_latency(spec.region)
        return Server(spec, ServerState(latency_ewma_ms=region.configured_ms), region)

    def region_latency(self, region: str) -> RegionLatency:
        """The typical latency of `region`'s servers (created at its configured latency on first use)."""
        found = self._regions.get(region)
        if found is None:
            configured = float(self._region_latency_ms.get(region, 0))
            found = self._regions[region] = RegionLatency(configured, configured)
        return found

    def configure(self, region_latency_ms: Mapping[str, int], health: HealthSettings) -> None:
        """Reloaded settings: new configured region latencies (the typical latency of a region without
        answers yet follows them), and every server's next check or outcome follows the new health
        thresholds."""
        self._region_latency_ms = region_latency_ms
        for name, region in self._regions.items():
            region.configured_ms = float(region_latency_ms.get(name, 0))
            if not region.measured:
                region.typical_ms = region.configured_ms
        self.health = health

    def subscribe(self, listener: Listener) -> None:
        """Call `listener` with every membership change, after it happened."""
        self._listeners.append(listener)

    def servers(self) -> tuple[Server, ...]:
        """A snapshot, sorted by id so listings are stable."""
        return tuple(sorted(self._servers.values(), key=lambda server: server.id))

    def get(self, server_id: str) -> Server | None:
        return self._servers.get(server_id)

    def __len__(self) -> int:
        return len(self._servers)

    def check_conflict(self, spec: ServerSpec) -> None:
        """Raise RegistryConflict if `spec.id` is registered with a different address or settings."""
        existing = self._servers.get(spec.id)
        if existing is not None and existing.spec != spec:
            raise RegistryConflict(
                f"server {spec.id!r} is already registered as {existing.spec.url} "
                f"(region {existing.spec.region}, capacity {existing.spec.capacity}); "
                "deregister it first to change it"
            )

    def register(self, spec: ServerSpec) -> tuple[Server, bool]:
        """Add a server, live at once. Returns (server, created); same spec again is a no-op."""
        self.check_conflict(spec)
        existing = self._servers.get(spec.id)
        if existing is not None:
            return existing, False
        server = self._new_server(spec)
        self._servers[spec.id] = server
        self._changed(Change(added=(server,)))
        return server, True

    def deregister(self, server_id: str) -> Server | None:
        server = self._servers.pop(server_id, None)
        if server is not None:
            self._changed(Change(removed=(server,)))
        return server

    def set_capacity(self, server_id: str, capacity: int) -> tuple[Server, int] | None:
        """Change a server's capacity live (HAProxy's `set server ... weight`): its routing weight and
        the load it takes at once. Returns (server, previous capacity); None when there is no such id."""
        server = self._servers.get(server_id)
        if server is None:
            return None
        previous = server.spec.capacity
        if capacity != previous:
            server.spec = replace(server.spec, capacity=capacity)
            self._changed(Change(reweighted=(server,)))
        return server, previous

    def set_draining(self, server_id: str, draining: bool) -> Server | None:
        """Drain (no new requests; those in flight finish) or undrain; idempotent."""
        server = self._servers.get(server_id)
        if server is not None:
            server.state.draining = draining
        return server

    def record_outcome(self, server: Server, outcome: Outcome, latency_s: float | None, answered_at: float) -> None:
        """The proxy's report on one forwarded request; `latency_s` is time to response headers, which
        came at `answered_at` (monotonic; the proxy's own reading, so a request costs no clock read here)."""
        state = server.state
        if latency_s is not None:
            latency: float = latency_s  # unboxed once: a float | None is a Python object
            self._observe_latency(server, latency * 1000.0, answered_at)
            state.latency_buckets[latency_bucket(latency)] += 1
            state.latency_sum_s += latency
        if outcome is Outcome.OK:
            state.passive_failures = 0
            return
        self._record_failure(server, outcome)

    def _record_failure(self, server: Server, outcome: Outcome) -> None:
        """Apart from `record_outcome`: its closure costs an allocation, which a success never pays."""
        state = server.state
        if outcome.is_error:
            state.errors += 1
        transition = machine.after_outcome(state, outcome, monotonic(), self.health, lambda: self._may_eject(server))
        self._announce(server, transition)

    def end_cooldown(self, server: Server) -> bool:
        """Probe a server in cooldown from now on (`lbctl check`); whether it was waiting."""
        return machine.end_cooldown(server.state, monotonic())

    def _observe_latency(self, server: Server, sample_ms: float, now: float) -> None:
        """Fold one answer's time to headers into the server's estimate and its region's typical
        latency. The first answer sets each; later ones move the estimate from where it had decayed to
        while idle (the decay is folded in, so a server recovers from a few slow answers)."""
        state = server.state
        region = server.region_latency
        if state.latency_at < 0.0:
            state.latency_ewma_ms = sample_ms
        else:
            base = state.latency_estimate_ms(region.typical_ms, now)
            state.latency_ewma_ms = base + LATENCY_EWMA_WEIGHT * (sample_ms - base)
        # a long response is settled after answers that came since its head: the estimate's clock
        # never goes back (its decay would then count time the server was being measured)
        state.latency_at = max(state.latency_at, now)
        if region.measured:
            region.typical_ms += REGION_LATENCY_WEIGHT * (sample_ms - region.typical_ms)
        else:
            region.typical_ms = sample_ms
            region.measured = True

    def record_probe(self, server: Server, ok: bool, detail: str, started: float) -> None:
        """An active health check's result; `started` is when it was sent (monotonic)."""
        now = monotonic()
        server.state.last_check_at = now
        self._announce(server, machine.after_probe(server.state, ok, detail, started, now, self.health))

    def _may_eject(self, server: Server) -> bool:
        """Panic guard: passive signals alone never take a region below `panic_threshold` in rotation."""
        region = [s for s in self._servers.values() if s.spec.region == server.spec.region]
        in_rotation = sum(1 for s in region if s.state.health.serving)
        return (in_rotation - 1) >= self.health.panic_threshold * len(region)

    def _announce(self, server: Server, transition: machine.Transition | None) -> None:
        if transition is not None:
            level = logging.INFO if transition.new.serving else logging.WARNING
            log.log(
                level,
                "server %s: %s -> %s (%s)",
                server.id,
                transition.old.value,
                transition.new.value,
                transition.reason,
            )

    def _changed(self, change: Change) -> None:
        self.version += 1
        for listener in self._listeners:
            listener(change)
