"""Microbenchmarks of the pure routing parts: cost of choosing a server, and of the session table.

    .venv/bin/python bench/microbench.py            # full run (1M sessions), about a minute
    .venv/bin/python bench/microbench.py --quick    # 100k sessions, for a smoke run

Prints one line per measurement; every loop is bounded in count.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
import tracemalloc
from collections.abc import Callable

from lbd.balancer import Balancer
from lbd.config import Regions
from lbd.models import ServerSpec
from lbd.registry import Registry
from lbd.routing import dynamic
from lbd.routing.static import RendezvousTable, digest64
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
        registry.register(
            ServerSpec(f"srv-{i:05}", "http", "127.0.0.1", 10000 + i % 50000, region, rng.randint(1, 100))
        )
    for server in registry.servers():
        server.state.active = rng.randint(0, server.spec.capacity - 1)
        server.state.latency_ewma_ms = rng.uniform(1, 50)
    return registry


def bench_choice(sizes: list[int]) -> None:
    print("choosing a server (us per choice; new client = no session, sticky = live session)")
    print(f"{'servers':>8} {'dyn new':>9} {'dyn sticky':>11} {'static cached':>14} {'static uncached':>16}")
    for size in sizes:
        registry = registry_of(size, one_region=True)
        sessions = SessionTable(9000, 2_000_000)
        balancer = Balancer(registry, "dynamic", REGIONS, sessions)
        calls = 20_000
        new_client = per_call_us(lambda i: balancer.choose(f"new-{i}-{time.perf_counter_ns()}", "us-east", 0.0), calls)
        sticky = per_call_us(lambda i: balancer.choose(f"new-{i % 1000}", "us-east", 0.0), calls)
        balancer.set_mode("static")
        cached = per_call_us(lambda i: balancer.choose(f"k{i % 1000}", None, 0.0), calls)
        table = RendezvousTable((s.id, s.spec.capacity) for s in registry.servers())
        uncached_calls = max(50, 200_000 // size)
        uncached = per_call_us(lambda i: table.pick(f"u{i}"), uncached_calls)
        print(f"{size:>8} {new_client:>9.2f} {sticky:>11.2f} {cached:>14.2f} {uncached:>16.1f}")


def bench_pick_only(sizes: list[int]) -> None:
    print("dynamic.pick alone, region of N servers (us per pick)")
    for size in sizes:
        registry = registry_of(size, one_region=True)
        index = dynamic.RegionIndex.build(registry.servers())
        keys = [digest64(f"c{i}") for i in range(1000)]
        proximity = REGIONS.proximity["us-east"]
        cost = per_call_us(lambda i: dynamic.pick(index, keys[i % 1000], proximity), 20_000)
        print(f"{size:>8} {cost:>9.2f}")


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
    bench_sessions(100_000 if args.quick else 1_000_000)


if __name__ == "__main__":
    main()
