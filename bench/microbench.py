"""Microbenchmarks of the pure routing parts: cost of choosing a server, of the static hash table
(filling it, membership changes, how evenly it shares), and of the session table.

    .venv/bin/python bench/microbench.py            # full run (1M sessions), a few minutes
    .venv/bin/python bench/microbench.py --quick    # 100k sessions and smaller tables, for a smoke run

Prints one line per measurement; every loop is bounded in count.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable

from lbd.balancer import Balancer
from lbd.config import Regions
from lbd.models import ServerSpec
from lbd.registry import Registry
from lbd.routing import dynamic
from lbd.routing.static import BUCKETS, BucketTable, digest64
from lbd.sessions import SessionTable

REGIONS = Regions()
SERVER_REGIONS = sorted(REGIONS.latency_ms)


def per_call_us(function: Callable[[int], object], calls: int) -> float:
    """Median of 5 timed batches of `calls` calls, in microseconds per call."""
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for i in range(calls):
            function(i)
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return sorted(samples)[2]


def registry_of(count: int, one_region: bool) -> Registry:
    rng = random.Random(count)
    registry = Registry(REGIONS.latency_ms)
    for i in range(count):
        region = "us-east" if one_region else SERVER_REGIONS[i % len(SERVER_REGIONS)]
        registry.register(spec(i, rng.randint(1, 100), region))
    for server in registry.servers():
        server.state.active = rng.randint(0, server.spec.capacity - 1)
        server.state.latency_ewma_ms = rng.uniform(1, 50)
        server.state.latency_at = 0.0
    return registry


def spec(i: int, capacity: int, region: str = "us-east") -> ServerSpec:
    return ServerSpec(f"srv-{i:05}", "http", "127.0.0.1", 10000 + i % 50000, region, capacity)


def filled(table: BucketTable) -> float:
    """Fill every cold bucket; returns the seconds it took."""
    start = time.perf_counter()
    while table.fill(1 << 30):
        pass
    return time.perf_counter() - start


def bench_choice(sizes: list[int]) -> None:
    print("choosing a server (us per choice; new = a client id never seen, sticky = live session, again = seen before)")
    header = f"{'servers':>8} {'dyn new':>9} {'dyn sticky':>11} {'static new':>11} {'static again':>13}"
    print(f"{header} {'static cold':>12}")
    for size in sizes:
        registry = registry_of(size, one_region=True)
        sessions = SessionTable(9000, 2_000_000)
        balancer = Balancer(registry, "dynamic", REGIONS, sessions)
        calls = 20_000
        new_client = per_call_us(lambda i: balancer.choose(f"new-{i}-{time.perf_counter_ns()}", "us-east", 0.0), calls)
        sticky = per_call_us(lambda i: balancer.choose(f"new-{i % 1000}", "us-east", 0.0), calls)
        balancer.set_mode("static")
        while balancer.warm():
            pass
        static_new = per_call_us(lambda i: balancer.choose(f"u{i}-{time.perf_counter_ns()}", None, 0.0), calls)
        static_again = per_call_us(lambda i: balancer.choose(f"k{i % 1000}", None, 0.0), calls)
        cold = cold_bucket_us(BucketTable((s.id, s.spec.capacity) for s in registry.servers()))
        print(f"{size:>8} {new_client:>9.2f} {sticky:>11.2f} {static_new:>11.2f} {static_again:>13.2f} {cold:>12.1f}")


def cold_bucket_us(table: BucketTable) -> float:
    """A bucket's first use: the exact weighted rendezvous over every server (median of 5 batches,
    each of buckets not computed before)."""
    batch = max(20, min(BUCKETS // 5, 2_000_000 // max(table.size, 1)))
    samples = []
    for first in range(0, 5 * batch, batch):
        start = time.perf_counter()
        for bucket in range(first, first + batch):
            table.owner(bucket)
        samples.append((time.perf_counter() - start) / batch * 1e6)
    return statistics.median(samples)


def bench_pick_only(sizes: list[int]) -> None:
    print("dynamic.pick alone, region of N servers (us per pick)")
    pinned: Counter[str] = Counter()
    for size in sizes:
        registry = registry_of(size, one_region=True)
        index = dynamic.RegionIndex.build(registry.servers())
        keys = [digest64(f"c{i}") for i in range(1000)]
        proximity = REGIONS.proximity["us-east"]
        cost = per_call_us(lambda i: dynamic.pick(index, keys[i % 1000], proximity, pinned, 0.0), 20_000)
        print(f"{size:>8} {cost:>9.2f}")


def bench_table(sizes: list[int]) -> None:
    """The static table: filling it from nothing, one server joining or leaving a full table, and
    how evenly its buckets share clients (a server's share over capacity / total)."""
    print(f"static table ({BUCKETS:,} buckets; capacities 1-100 at random, or all equal)")
    print(
        f"{'servers':>8} {'fill s':>7} {'add ms':>7} {'remove ms':>10}"
        f" {'share/due max':>14} {'min':>5} {'stdev':>6}  {'equal: max':>10} {'min':>5} {'stdev':>6}"
    )
    for size in sizes:
        rng = random.Random(size)
        servers = [(f"srv-{i:05}", rng.randint(1, 100)) for i in range(size)]
        table = BucketTable(servers)
        fill_s = filled(table)
        spread = share_spread(table, dict(servers))
        start = time.perf_counter()
        table.add("newcomer", 50)
        add_ms = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        table.remove("srv-00000")
        remove_ms = (time.perf_counter() - start) * 1000
        equal = {server_id: 10 for server_id, _ in servers}
        even = BucketTable(equal.items())
        filled(even)
        flat = share_spread(even, equal)
        print(
            f"{size:>8} {fill_s:>7.2f} {add_ms:>7.1f} {remove_ms:>10.1f}"
            f" {spread[0]:>14.2f} {spread[1]:>5.2f} {spread[2]:>6.3f}  {flat[0]:>10.2f} {flat[1]:>5.2f} {flat[2]:>6.3f}"
        )


def share_spread(table: BucketTable, capacities: dict[str, int]) -> tuple[float, float, float]:
    """(max, min, stdev) over servers of bucket share / capacity share (1.0 is exact)."""
    owned = Counter(table.owners())
    total = sum(capacities.values())
    ratios = [owned[server_id] / BUCKETS / (capacity / total) for server_id, capacity in capacities.items()]
    return max(ratios), min(ratios), statistics.pstdev(ratios)


def bench_registration(size: int) -> None:
    """Registering and deregistering one server into `size` (one region), with the balancer (static
    table filled) and its region index listening, as lbd's admin API does it."""
    registry = Registry(REGIONS.latency_ms)
    rng = random.Random(size)
    for i in range(size):
        registry.register(spec(i, rng.randint(1, 100)))
    balancer = Balancer(registry, "static", REGIONS, SessionTable(9000, 1000))
    while balancer.warm():
        pass
    samples = []
    for attempt in range(5):
        start = time.perf_counter()
        registry.register(spec(size + attempt, 50))
        registered = time.perf_counter() - start
        start = time.perf_counter()
        registry.deregister(f"srv-{size + attempt:05}")
        samples.append((registered, time.perf_counter() - start))
    register_ms = statistics.median(r for r, _ in samples) * 1000
    deregister_ms = statistics.median(d for _, d in samples) * 1000
    print(f"registering one server into {size:,}: {register_ms:.1f} ms; deregistering it: {deregister_ms:.1f} ms")


def bench_sessions(count: int) -> None:
    print(f"session table with {count:,} sessions")
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    table = SessionTable(9000, count)
    ids = [f"client-{i:08}" for i in range(count)]
    ids_bytes = tracemalloc.get_traced_memory()[0] - before
    for i, client in enumerate(ids):
        table.pin(client, "srv-00001", "us-east", float(i) * 1e-6)
    total = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    per_session = (total - ids_bytes) / count
    print(
        f"  memory per session: {per_session:.0f} bytes (table + entry; the client id string itself: "
        f"{ids_bytes / count:.0f} bytes more)"
    )
    rng = random.Random(7)
    probes = [ids[rng.randrange(count)] for _ in range(100_000)]
    cost = per_call_us(lambda i: table.get(probes[i % 100_000], 1.0), 100_000)
    print(f"  lookup + touch: {cost:.3f} us")
    start = time.perf_counter()
    expired = table.sweep(1e9, budget=count)
    each_us = (time.perf_counter() - start) / max(expired, 1) * 1e6
    print(f"  sweeping all {expired:,} expired sessions: {each_us:.3f} us each")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="100k sessions instead of 1M")
    args = parser.parse_args()
    sizes = [10, 100, 1000, 10_000]
    bench_choice(sizes)
    bench_pick_only(sizes)
    bench_table([100, 1000] if args.quick else [100, 1000, 10_000])
    bench_registration(1000 if args.quick else 10_000)
    bench_sessions(100_000 if args.quick else 1_000_000)


if __name__ == "__main__":
    main()
