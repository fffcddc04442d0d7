"""Dynamic mode at internet scale, simulated in process with lbd's real code: a region outage and its
recovery, a partial outage and a slow region, with 10,000 servers and 1,000,000 clients.

    make simulate                                  # the full run, about 5 minutes: bench/results/simulate/
    make simulate SIMULATE_ARGS='--out /tmp/sim'   # plots and summary.json elsewhere
    .venv/bin/python -m bench.simulate --servers 500 --clients 20000 --time-scale 0.5   # small and quick

What runs is lbd's: the registry, the health state machine (lbd/health/machine.py, probed on the
simulated clock as lbd's prober does: every interval +-10%, nothing while in cooldown), the session
table and the balancer (`Balancer.choose` and `Balancer.backup` for every simulated request, the spill
and failback rules with their defaults). No sockets, no event loop: the clock is simulated.

The model (what lbd cannot know, the simulation decides):
- Servers: five server regions, capacities mixed (8 to 48 concurrent requests), regions sized to
  their clients' demand.
- Clients: seven client regions; arrivals are a Poisson process whose rate ramps up over the warm-up
  (most clients arrive then) and continues lower afterwards; each stays a lognormal time (median 30
  min, so many stay to the end) and leaves; its session then idles in lbd's table as any would.
- Load: a client sends `rate` requests a second (1 by default; `--rate-spread` draws them lognormal
  per client), each taking the serving region's service time (100 ms; 3x in the slow region while it
  is slow): it keeps rate x service time requests in flight on its server (0.1), Little's law. A
  server's load is the sum over the clients it serves; lbd sees it as the server's requests in flight
  (`ServerState.active`, rounded), what the proxy would count. Load / capacity is what every figure
  and target reports.
- Routing: the simulation routes one request per client every `--interval` seconds on average
  (exponential gaps, 30 s), and that request stands for the client's traffic until its next one: a
  sticky client's server only changes at a request that finds it gone, nearly full or its home region
  back, so moves and failbacks happen up to an interval later than for a client routed every second
  (failback looks slower here than it is, not faster).
- Failures: a server that is down refuses connections: a request sent there fails (lbd's passive
  check ejects the server, within the panic threshold) and is retried on `Balancer.backup`; active
  checks take the rest out after `fall` failed probes and bring servers back after `rise` passes once
  their cooldown (120 s, doubling on a failed probe after it) has ended.

Scenario (minutes, scaled by --time-scale): warm-up 8, steady 4, us-east down 5, recovery 6, half of
us-east down 5, recovery 5, asia-south slow 5, tail 4.
"""

from __future__ import annotations

import argparse
import gc
import heapq
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lbd.balancer import Balancer, NoServer
from lbd.config import FailoverSettings, HealthSettings, Regions
from lbd.health import machine
from lbd.models import Health, Outcome, Server, ServerSpec
from lbd.registry import Registry
from lbd.sessions import SessionTable

REGIONS = Regions()
# Server regions and their share of the servers; client regions and their share of the clients.
SERVER_SHARES = {"us-east": 0.34, "eu-west": 0.27, "asia-south": 0.21, "ca-central": 0.09, "oceania": 0.09}
CLIENT_SHARES = {
    "us-east": 0.24, "us-west": 0.10, "ca-central": 0.08, "eu-west": 0.22, "me-central": 0.06,
    "asia-south": 0.22, "oceania": 0.08,
}  # fmt: skip
CAPACITIES = ((16, 0.2), (24, 0.3), (32, 0.25), (48, 0.15), (64, 0.1))  # concurrent requests, share of servers
SLOW_FACTOR = 3.0
OUTAGE_REGION = "us-east"
SLOW_REGION = "asia-south"
START = 1000.0  # the simulated monotonic clock at t = 0
SAMPLE_S = 10.0
ACTIVE_WINDOW_S = 60.0
EPOCH = 1.0  # a routed request's time within its second: spread evenly
GAPS = 1 << 20
GAPS_MASK = GAPS - 1

PHASES_MIN = (
    ("warm-up", 8.0),
    ("steady", 4.0),
    ("us-east down", 5.0),
    ("us-east recovered", 6.0),
    ("half of us-east down", 5.0),
    ("half recovered", 5.0),
    ("asia-south slow", 5.0),
    ("tail", 4.0),
)


@dataclass(frozen=True)
class Options:
    servers: int = 10_000
    clients: int = 1_000_000
    interval_s: float = 30.0
    rate: float = 1.0
    rate_spread: float = 0.0
    time_scale: float = 1.0
    utilization: float = 0.45
    stay_median_min: float = 60.0
    session_idle_timeout: int = 9000
    seed: int = 1
    out: Path = Path("bench/results/simulate")
    plots: bool = True
    progress: bool = True


@dataclass
class Phase:
    name: str
    start: float
    end: float


@dataclass
class Sample:
    t: float
    region_util: dict[str, float]
    region_max: dict[str, float]
    server_max: float
    server_p99: float
    own_share: float
    outage_home_share: float  # us-east's home clients (us-east, us-west) on us-east servers, of those present
    present: int
    steady_spread: float  # largest |server / region mean - 1|
    steady_spread_p99: float
    decisions: dict[str, int]  # the balancer's new choices by reason so far


@dataclass
class Counters:
    requests: int = 0
    new_clients: int = 0
    failed_attempts: int = 0  # a request sent to a down server (then retried on a backup)
    failed_requests: int = 0  # ... and the retry failed too, or no backup
    refused: int = 0  # no server at all (503)
    moves: dict[str, int] = field(default_factory=dict)


class Simulation:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.rng = random.Random(options.seed)
        scale = options.time_scale
        self.phases: list[Phase] = []
        moment = 0.0
        for name, minutes in PHASES_MIN:
            self.phases.append(Phase(name, moment, moment + minutes * 60.0 * scale))
            moment += minutes * 60.0 * scale
        self.duration = moment
        recovered = next(phase for phase in self.phases if phase.name == "us-east recovered")
        self.check_at = int(recovered.start + 300.0 * scale)  # the failback target's moment
        self.active_share = 1.0
        self.health = HealthSettings()
        self.failover = FailoverSettings()
        self._build_servers()
        self._build_clients()
        steady = next(phase for phase in self.phases if phase.name == "steady")
        middle = (steady.start + steady.end) / 2
        present = sum(1 for a, d in zip(self.arrival, self.departure, strict=True) if a <= middle < d)
        # the service time that puts the steady state at `utilization` of all capacity (Little's law)
        self.service_s = options.utilization * sum(self.capacity) / max(1, present) / options.rate
        self.service = dict.fromkeys(self.region_names, self.service_s)

    # --- setup ----------------------------------------------------------------------------------------

    def _build_servers(self) -> None:
        rng = self.rng
        names = list(SERVER_SHARES)
        counts = {name: max(1, round(self.options.servers * share)) for name, share in SERVER_SHARES.items()}
        specs: list[ServerSpec] = []
        for name in names:
            for i in range(counts[name]):
                capacity = rng.choices([c for c, _ in CAPACITIES], [w for _, w in CAPACITIES])[0]
                server_id = f"{name}-{i:05}"
                specs.append(ServerSpec(server_id, "http", "10.0.0.1", 1 + len(specs) % 65535, name, capacity))
        self.registry = Registry(REGIONS.latency_ms, self.health, specs)
        self.sessions = SessionTable(self.options.session_idle_timeout, max(1_000_000, self.options.clients))
        self.balancer = Balancer(self.registry, "dynamic", REGIONS, self.sessions, failover=self.failover)
        self.servers: list[Server] = list(self.registry.servers())
        self.index = {server.id: k for k, server in enumerate(self.servers)}
        self.server_region = [server.spec.region for server in self.servers]
        self.capacity = [server.spec.capacity for server in self.servers]
        self.region_names = names
        self.region_servers = {name: [k for k, r in enumerate(self.server_region) if r == name] for name in names}
        self.region_capacity = {name: sum(self.capacity[k] for k in ks) for name, ks in self.region_servers.items()}
        self.rates = [0.0] * len(self.servers)  # requests per second of the clients each server serves
        self.down = [False] * len(self.servers)
        self.serving = {name: len(ks) for name, ks in self.region_servers.items()}  # health admits traffic

    def _build_clients(self) -> None:
        rng, options = self.rng, self.options
        count = options.clients
        regions = list(CLIENT_SHARES)
        self.client_region = rng.choices(regions, [CLIENT_SHARES[r] for r in regions], k=count)
        self.home = [REGIONS.proximity[region][0] for region in self.client_region]
        self.client_ids = [f"client-{i:07}" for i in range(count)]
        if options.rate_spread > 0:
            sigma = options.rate_spread
            mu = math.log(options.rate) - sigma * sigma / 2
            self.client_rate = [rng.lognormvariate(mu, sigma) for _ in range(count)]
        else:
            self.client_rate = [options.rate] * count
        # arrivals: 75% over the warm-up at a rate growing linearly (a morning ramp), the rest evenly after
        warmup = self.phases[0].end
        arrivals = []
        for _ in range(count):
            if rng.random() < 0.75:
                arrivals.append(warmup * math.sqrt(rng.random()))
            else:
                arrivals.append(warmup + (self.duration - warmup) * rng.random())
        self.arrival = arrivals
        median_s = options.stay_median_min * 60.0 * options.time_scale
        self.departure = [a + rng.lognormvariate(math.log(median_s), 1.0) for a in arrivals]
        self.present = self.own = self.outage_home = self.outage_home_there = 0
        self.current = [-1] * count  # the server serving each client's traffic; -1: none (not here, or failed)
        self.last_routed = [-1.0] * count
        # calendar queue: one list of client indices per simulated second
        self.slots: list[list[int]] = [[] for _ in range(int(self.duration) + 2)]
        for i, moment in enumerate(arrivals):
            self.slots[int(moment)].append(i)

    # --- running --------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        options = self.options
        counters = self.counters = Counters()
        samples: list[Sample] = []
        self.probes: list[tuple[float, int]] = []
        self.watched: set[int] = set()
        events = self._events()
        choose = self.balancer.choose
        move = self._move
        index, down, current = self.index, self.down, self.current
        ids, client_region, departure = self.client_ids, self.client_region, self.departure
        last_routed, slots = self.last_routed, self.slots
        # the gaps between a client's routed requests, drawn ahead (exponential, whole seconds, at least 1)
        gaps = [1 + int(self.rng.expovariate(1.0 / options.interval_s)) for _ in range(GAPS)]
        requests = 0
        decisions = self.balancer.decisions
        timed = [0, 0]
        timed_ns = [0, 0]
        dirty: set[int] = set()
        next_sample = 0.0
        # lbd's request path makes no reference cycles: with a million sessions, the collector's passes
        # over them would be most of the time measured, not routing (lbd's own figures: docs/routing.md)
        gc.collect()
        gc.freeze()
        gc.disable()
        wall_start = time.perf_counter()
        horizon = len(slots) - 1
        for second in range(int(self.duration) + 1):
            while events and events[0][0] <= second:
                _, action = events.pop(0)
                action(float(second), dirty)
            self._probe(START + second)
            slot = slots[second]
            slots[second] = []
            if slot:
                step = EPOCH / len(slot)
                now = START + second
                for i in slot:
                    now += step
                    old = current[i]
                    if second >= departure[i]:  # the client has left: its load goes, its session idles
                        if old >= 0:
                            move(i, old, -1, dirty)
                        continue
                    requests += 1
                    if old < 0 and last_routed[i] < 0:
                        counters.new_clients += 1
                    client, region = ids[i], client_region[i]
                    try:
                        if requests & 15 == 0:  # every 16th request timed, by kind
                            before = sum(decisions.values())
                            started = time.perf_counter_ns()
                            server = choose(client, region, now)
                            spent = time.perf_counter_ns() - started
                            kind = 0 if sum(decisions.values()) == before else 1  # sticky, or a new choice
                            timed_ns[kind] += spent
                            timed[kind] += 1
                        else:
                            server = choose(client, region, now)
                    except NoServer:
                        counters.refused += 1
                        server = None
                    k = -1 if server is None else index[server.id]
                    if k >= 0 and down[k]:
                        k = self._failed(i, server, now)  # type: ignore[arg-type]
                    if k != old:
                        move(i, old, k, dirty)
                    last_routed[i] = second
                    following = second + gaps[requests & GAPS_MASK]
                    if following <= horizon:
                        slots[following].append(i)
            self._publish(dirty)
            if second == self.check_at:
                self.active_share = self._active_home_share(second)
            if second % 60 == 0 and options.progress:
                print(
                    f"  {second / 60:4.0f} min simulated, {requests:,} requests, "
                    f"{time.perf_counter() - wall_start:.0f} s", file=sys.stderr, flush=True,
                )  # fmt: skip
            if second >= next_sample:
                samples.append(self._sample(float(second)))
                next_sample += SAMPLE_S * max(options.time_scale, 0.1)
        wall = time.perf_counter() - wall_start
        counters.requests = requests
        gc.enable()
        counters.moves = dict(self.balancer.decisions)
        costs = {
            "all": sum(timed_ns) / max(sum(timed), 1) / 1000.0,
            "sticky": timed_ns[0] / max(timed[0], 1) / 1000.0,
            "new_choice": timed_ns[1] / max(timed[1], 1) / 1000.0,
        }
        return self._summary(samples, wall, costs)

    def _move(self, i: int, old: int, new: int, dirty: set[int]) -> None:
        """Client `i`'s traffic goes from server `old` to `new` (-1: none), with the counts of who is where."""
        rate, home, region = self.client_rate[i], self.home[i], self.server_region
        rates, servers = self.rates, self.servers
        if old >= 0:
            rates[old] -= rate
            servers[old].state.active = max(0, round(rates[old] * self.service[region[old]]))
            self.present -= 1
            self.own -= region[old] == home
            if home == OUTAGE_REGION:
                self.outage_home -= 1
                self.outage_home_there -= region[old] == home
        if new >= 0:  # the proxy counts a request in flight from its start: the next choice sees it
            rates[new] += rate
            servers[new].state.active = max(0, round(rates[new] * self.service[region[new]]))
            self.present += 1
            self.own += region[new] == home
            if home == OUTAGE_REGION:
                self.outage_home += 1
                self.outage_home_there += region[new] == home
        self.current[i] = new

    def _active_home_share(self, second: int) -> float:
        """Of us-east's home clients routed within the last minute, the share on us-east servers."""
        active = there = 0
        for i, k in enumerate(self.current):
            if k >= 0 and self.home[i] == OUTAGE_REGION and second - self.last_routed[i] <= ACTIVE_WINDOW_S:
                active += 1
                there += self.server_region[k] == OUTAGE_REGION
        return there / active if active else 1.0

    def _failed(self, i: int, server: Server, now: float) -> int:
        """A request sent to a server that is down: the connection is refused; lbd's passive check may
        eject the server, and the proxy retries once on the balancer's backup."""
        counters = self.counters
        counters.failed_attempts += 1
        k = self.index[server.id]
        region = self.server_region[k]
        transition = machine.after_outcome(
            server.state, Outcome.CONNECT_FAILED, now, self.health, lambda: self._may_eject(region)
        )
        self._transitioned(k, transition)
        retry = self.balancer.backup(self.client_ids[i], self.client_region[i], server, now)
        if retry is None:
            counters.failed_requests += 1
            return -1
        j = self.index[retry.id]
        if self.down[j]:
            counters.failed_requests += 1
            retry_region = self.server_region[j]
            transition = machine.after_outcome(
                retry.state, Outcome.CONNECT_FAILED, now, self.health, lambda: self._may_eject(retry_region)
            )
            self._transitioned(j, transition)
            return -1
        return j

    def _may_eject(self, region: str) -> bool:
        """The registry's panic guard (`Registry._may_eject`), kept as a count per region instead of a scan."""
        members = len(self.region_servers[region])
        return (self.serving[region] - 1) >= self.health.panic_threshold * members

    def _transitioned(self, k: int, transition: machine.Transition | None) -> None:
        if transition is None or transition.old.serving == transition.new.serving:
            return
        self.serving[self.server_region[k]] += 1 if transition.new.serving else -1

    def _probe(self, now: float) -> None:
        """lbd's prober for the servers an event touched: each checked every interval +-10%, skipped
        while in cooldown (`machine.probe_due`). The others pass every check, which changes nothing."""
        probes = self.probes
        interval = self.health.interval_ms / 1000.0
        while probes and probes[0][0] <= now:
            moment, k = heapq.heappop(probes)
            state = self.servers[k].state
            if machine.probe_due(state, moment):
                ok = not self.down[k]
                self._transitioned(
                    k, machine.after_probe(state, ok, "ok" if ok else "connection refused", moment, moment, self.health)
                )
            if self.down[k] or state.health is not Health.HEALTHY:
                heapq.heappush(probes, (moment + interval * self.rng.uniform(0.9, 1.1), k))
            else:
                self.watched.discard(k)

    def _watch(self, servers: Sequence[int], now: float) -> None:
        interval = self.health.interval_ms / 1000.0
        for k in servers:
            if k not in self.watched:
                self.watched.add(k)
                heapq.heappush(self.probes, (START + now + self.rng.uniform(0, interval), k))

    def _events(self) -> list[tuple[float, Any]]:
        """The scenario: (second, action) in time order."""
        phases = {phase.name: phase for phase in self.phases}
        outage = self.region_servers[OUTAGE_REGION]
        half = outage[::2]

        def set_down(servers: Sequence[int], value: bool) -> Any:
            def action(now: float, dirty: set[int]) -> None:
                for k in servers:
                    self.down[k] = value
                self._watch(servers, now)

            return action

        def set_slow(factor: float) -> Any:
            def action(now: float, dirty: set[int]) -> None:
                self.service[SLOW_REGION] = self.service_s * factor
                dirty.update(self.region_servers[SLOW_REGION])

            return action

        return sorted(
            [
                (phases["us-east down"].start, set_down(outage, True)),
                (phases["us-east recovered"].start, set_down(outage, False)),
                (phases["half of us-east down"].start, set_down(half, True)),
                (phases["half recovered"].start, set_down(half, False)),
                (phases["asia-south slow"].start, set_slow(SLOW_FACTOR)),
                (phases["tail"].start, set_slow(1.0)),
            ],
            key=lambda event: event[0],
        )

    def _publish(self, dirty: set[int]) -> None:
        """What the proxy would count: each changed server's requests in flight, its clients' rate x service time."""
        servers, rates, service, region = self.servers, self.rates, self.service, self.server_region
        for k in dirty:
            servers[k].state.active = max(0, round(rates[k] * service[region[k]]))
        dirty.clear()

    def load(self, k: int) -> float:
        return self.rates[k] * self.service[self.server_region[k]] / self.capacity[k]

    def _sample(self, t: float) -> Sample:
        utilization: list[float] = []
        region_util: dict[str, float] = {}
        region_max: dict[str, float] = {}
        spread: list[float] = []
        for name, members in self.region_servers.items():
            live = [k for k in members if not self.down[k] and self.servers[k].in_rotation]
            if not live:
                region_util[name] = 0.0
                region_max[name] = 0.0
                continue
            loads = [self.load(k) for k in live]
            in_flight = sum(self.rates[k] * self.service[name] for k in live)
            mean = in_flight / sum(self.capacity[k] for k in live)
            region_util[name] = mean
            region_max[name] = max(loads)
            utilization.extend(loads)
            if mean > 0:
                spread.extend(abs(load / mean - 1.0) for load in loads)
        utilization.sort()
        spread.sort()
        return Sample(
            t=t,
            region_util=region_util,
            region_max=region_max,
            server_max=utilization[-1] if utilization else 0.0,
            server_p99=utilization[int(0.99 * (len(utilization) - 1))] if utilization else 0.0,
            own_share=self.own / self.present if self.present else 1.0,
            outage_home_share=self.outage_home_there / self.outage_home if self.outage_home else 1.0,
            present=self.present,
            steady_spread=spread[-1] if spread else 0.0,
            steady_spread_p99=spread[int(0.99 * (len(spread) - 1))] if spread else 0.0,
            decisions=dict(self.balancer.decisions),
        )

    # --- results --------------------------------------------------------------------------------------

    def _summary(self, samples: list[Sample], wall_s: float, routing_us: dict[str, float]) -> dict[str, Any]:
        phases = {phase.name: phase for phase in self.phases}
        outage, recovered = phases["us-east down"], phases["us-east recovered"]
        steady = phases["steady"]
        window_s = 300.0 * self.options.time_scale

        def within(start: float, end: float) -> list[Sample]:
            return [s for s in samples if start <= s.t < end]

        during_outage = within(outage.start, outage.end)
        after = within(recovered.start, recovered.start + window_s + 1)
        at_five = min((s for s in samples if s.t >= recovered.start + window_s), key=lambda s: s.t, default=samples[-1])
        us_east_after = max((s.region_max[OUTAGE_REGION] for s in after), default=0.0)
        back_at = next(
            (s.t - recovered.start for s in samples if s.t >= recovered.start and s.outage_home_share >= 0.95), None
        )
        steady_samples = within(steady.start, steady.end)
        steady_worst = max((s.steady_spread for s in steady_samples), default=0.0)
        steady_p99 = max((s.steady_spread_p99 for s in steady_samples), default=0.0)
        outage_max = max((s.server_max for s in during_outage), default=0.0)
        targets = [
            {
                "target": "us-east down, capacity left elsewhere: no server above 100% of its capacity",
                "value": round(outage_max, 4),
                "limit": 1.0,
                "pass": outage_max <= 1.0,
            },
            {
                "target": "5 min after us-east recovered: >= 95% of its clients back on us-east servers",
                "value": round(at_five.outage_home_share, 4),
                "routed_last_minute_value": round(self.active_share, 4),
                "limit": 0.95,
                "pass": at_five.outage_home_share >= 0.95,
            },
            {
                "target": "... and no us-east server above 100% on the way",
                "value": round(us_east_after, 4),
                "limit": 1.0,
                "pass": us_east_after <= 1.0,
            },
            {
                "target": f"routing cost at {len(self.servers):,} servers: at most 10 us per request",
                "value": round(routing_us["all"], 3),
                "new_choice": round(routing_us["new_choice"], 3),
                "limit": 10.0,
                "unit": "us",
                "pass": routing_us["all"] <= 10.0,
            },
            {
                "target": "steady state: every server within +-15% of its region's mean load/capacity",
                "value": round(steady_worst, 4),
                "p99": round(steady_p99, 4),
                "limit": 0.15,
                "pass": steady_worst <= 0.15,
            },
        ]
        rotation_back = self._first_back_in_rotation(samples)
        counters = self.counters
        return {
            "options": {**asdict(self.options), "out": str(self.options.out)},
            "model": {
                "servers": len(self.servers),
                "servers_by_region": {name: len(ks) for name, ks in self.region_servers.items()},
                "capacity_by_region": self.region_capacity,
                "clients": len(self.client_ids),
                "service_s": round(self.service_s, 4),
                "utilization_target": self.options.utilization,
                "slow_factor": SLOW_FACTOR,
                "concurrency_per_client": round(self.options.rate * self.service_s, 4),
                "failover": asdict(self.failover),
                "health": asdict(self.health),
                "session_idle_timeout_s": self.sessions.idle_timeout_s,
            },
            "phases": [asdict(phase) for phase in self.phases],
            "targets": targets,
            "figures": {
                "routing_us_per_request": round(routing_us["all"], 3),
                "routing_us_sticky": round(routing_us["sticky"], 3),
                "routing_us_new_choice": round(routing_us["new_choice"], 3),
                "requests": counters.requests,
                "new_clients": counters.new_clients,
                "decisions": counters.moves,
                "session_moves": sum(counters.moves.get(r, 0) for r in ("moved", "failback", "retry")),
                "failovers": counters.failed_attempts,
                "failed_requests": counters.failed_requests,
                "refused": counters.refused,
                "steady_spread_max": round(steady_worst, 4),
                "steady_spread_p99": round(steady_p99, 4),
                "outage_server_max": round(outage_max, 4),
                "us_east_back_95_after_s": back_at,
                "us_east_back_in_rotation_after_s": rotation_back,
                "wall_s": round(wall_s, 1),
            },
            "phase_figures": {phase.name: self._phase_figures(within(phase.start, phase.end)) for phase in self.phases},
            "samples": [asdict(sample) for sample in samples],
        }

    def _first_back_in_rotation(self, samples: list[Sample]) -> float | None:
        recovered = next(p for p in self.phases if p.name == "us-east recovered")
        for sample in samples:
            if sample.t >= recovered.start and sample.region_util.get(OUTAGE_REGION, 0.0) > 0.0:
                return sample.t - recovered.start
        return None

    @staticmethod
    def _phase_figures(samples: list[Sample]) -> dict[str, Any]:
        if not samples:
            return {}
        return {
            "server_max": round(max(s.server_max for s in samples), 4),
            "server_p99": round(max(s.server_p99 for s in samples), 4),
            "region_max": {r: round(max(s.region_util[r] for s in samples), 4) for r in samples[0].region_util},
            "own_region_share_min": round(min(s.own_share for s in samples), 4),
            "present_clients": int(statistics.mean(s.present for s in samples)),
        }


def report(summary: dict[str, Any]) -> str:
    figures = summary["figures"]
    lines = [
        f"{summary['model']['servers']:,} servers, {summary['model']['clients']:,} clients, "
        f"{figures['requests']:,} routed requests in {figures['wall_s']} s",
        f"routing cost: {figures['routing_us_per_request']} us per request (Balancer.choose; sticky "
        f"{figures['routing_us_sticky']} us, a new choice {figures['routing_us_new_choice']} us)",
        f"session moves {figures['session_moves']:,} (decisions: {figures['decisions']}), "
        f"requests sent to a down server {figures['failovers']:,}, failed {figures['failed_requests']:,}, "
        f"refused {figures['refused']:,}",
        f"us-east back in rotation {figures['us_east_back_in_rotation_after_s']} s after it recovered; "
        f"95% of its clients home after {figures['us_east_back_95_after_s']} s",
        "",
        f"{'phase':<22} {'server max':>10} {'p99':>6} {'own region':>10}  region utilization (max)",
    ]
    for name, phase in summary["phase_figures"].items():
        if not phase:
            continue
        regions = " ".join(f"{r} {u:.0%}" for r, u in phase["region_max"].items())
        lines.append(
            f"{name:<22} {phase['server_max']:>10.0%} {phase['server_p99']:>6.0%} "
            f"{phase['own_region_share_min']:>10.1%}  {regions}"
        )
    lines.append("")
    for target in summary["targets"]:
        verdict = "PASS" if target["pass"] else "FAIL"
        if target.get("unit") == "us":
            value = f"{target['value']:.2f} us (a new choice {target['new_choice']:.2f} us)"
            lines.append(f"{verdict}  {target['target']}: {value}")
        else:
            lines.append(f"{verdict}  {target['target']}: {target['value']:.1%} (limit {target['limit']:.0%})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, default=Options.servers)
    parser.add_argument("--clients", type=int, default=Options.clients)
    parser.add_argument(
        "--interval", type=float, default=Options.interval_s, help="mean seconds between a client's routed requests"
    )
    parser.add_argument("--rate", type=float, default=Options.rate, help="a client's requests per second")
    parser.add_argument(
        "--rate-spread", type=float, default=Options.rate_spread, help="lognormal sigma of client rates (0: alike)"
    )
    parser.add_argument("--time-scale", type=float, default=Options.time_scale, help="scenario length factor")
    parser.add_argument(
        "--utilization", type=float, default=Options.utilization, help="steady-state load / capacity of all servers"
    )
    parser.add_argument(
        "--stay-median-min", type=float, default=Options.stay_median_min, help="median minutes a client stays"
    )
    parser.add_argument(
        "--session-idle-timeout", type=int, default=Options.session_idle_timeout, help="lbd's session_idle_timeout (s)"
    )
    parser.add_argument("--seed", type=int, default=Options.seed)
    parser.add_argument("--out", type=Path, default=Options.out, help="directory for the plots and summary.json")
    parser.add_argument("--no-plots", action="store_true", help="JSON only (no matplotlib needed)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    options = Options(
        args.servers, args.clients, args.interval, args.rate, args.rate_spread, args.time_scale, args.utilization,
        args.stay_median_min, args.session_idle_timeout, args.seed, args.out, not args.no_plots, not args.quiet,
    )  # fmt: skip
    started = time.perf_counter()
    simulation = Simulation(options)
    setup_s = time.perf_counter() - started
    summary = simulation.run()
    summary["figures"]["setup_s"] = round(setup_s, 1)
    options.out.mkdir(parents=True, exist_ok=True)
    if options.plots:
        from bench.simulate_plots import plot  # noqa: PLC0415  (matplotlib is needed only for the plots)

        summary["plots"] = [str(path) for path in plot(summary, options.out)]
    summary["figures"]["total_s"] = round(time.perf_counter() - started, 1)
    (options.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(report(summary))
    plots = f" and {len(summary.get('plots', []))} plots" if options.plots else ""
    print(f"\nwrote {options.out / 'summary.json'}{plots}")
    print(f"total {summary['figures']['total_s']} s")
    return 0 if all(target["pass"] for target in summary["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
