"""What a cluster costs, measured on loopback with a real redis-server (`make bench` runs it):

    .venv/bin/python -m bench.cluster            # about a minute
    .venv/bin/python -m bench.cluster --quick

1. **A new client's pick**: sequential requests, each from a client never seen, through lbd in
   dynamic mode with and without `--cluster` (interleaved in rounds); the difference of their p50
   and p99 latencies is what the store's one round trip adds (target: at most 1 ms at p99).
2. **Expiry refreshes**: sticky clients keep sending through a clustered lbd whose idle timeout is
   short; Redis's own command counts give the refreshes per second per active client, scaled to a
   million active clients at the default idle timeout (target: at most 2,000 per second).
3. **A burst of new clients**: wrk at 64 connections, a client never seen on every request, through
   lbd in dynamic mode with and without `--cluster` (interleaved in rounds): lbd's user CPU per
   request and req/s, whose ratio is what claiming each new client in Redis costs under load (the
   claims of one event-loop turn share one pipelined round trip).
4. **Redis memory per session** and the sessions one Redis holds in a given `maxmemory`, from
   `INFO memory` before and after writing sessions the way lbd does.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

from bench.loadgen import run_observed
from bench.stack import Child, Stack, StartError
from lbd.store.keys import Keys, session_value
from lbd.store.session_sync import REFRESH_FRACTION

DEFAULT_IDLE_S = 9000


def sequential(port: int, clients: list[str]) -> list[float]:
    """Latency in ms of one request per client, one after another over one keep-alive connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    latencies = []
    try:
        for client in clients:
            started = time.perf_counter()
            connection.request("GET", "/tiny", headers={"client-id": client, "client-region": "us-east"})
            response = connection.getresponse()
            response.read()
            latencies.append((time.perf_counter() - started) * 1000)
            if response.status != 200:
                raise RuntimeError(f"{client}: HTTP {response.status}")
    finally:
        connection.close()
    return latencies


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


Measure = Callable[[str, Child, int, int], dict[str, float]]  # (label, lbd, its port, round) -> figures
Derive = Callable[[dict[str, float]], dict[str, float]]  # a round's figures -> more figures of them


def plain_against_clustered(
    stack: Stack, url: str, name: str, rounds: int, measure: Measure, derive: Derive
) -> dict[str, float]:
    """Two dynamic lbds, without and with --cluster, measured back to back in every round, each first
    in turn: the medians over rounds of each round's figures (`measure`'s of each, named `plain_...`
    and `cluster_...`, then `derive`'s of those), so a busy minute moves one round, not the result."""
    plain = stack.start_lbd("dynamic", name=f"{name}-plain")
    clustered = stack.start_lbd("dynamic", name=f"{name}-clustered", cluster=url)
    per_round: list[dict[str, float]] = []
    try:
        for round_index in range(rounds):
            figures: dict[str, float] = {}
            order = [("plain", plain), ("cluster", clustered)]
            for label, (child, port, _) in order if round_index % 2 == 0 else order[::-1]:
                measured = measure(label, child, port, round_index)
                figures.update({f"{label}_{key}": figure for key, figure in measured.items()})
            figures.update(derive(figures))
            per_round.append(figures)
    finally:
        stack.stop(plain[0])
        stack.stop(clustered[0])
    return {key: statistics.median(f[key] for f in per_round) for key in per_round[0]}


def new_client_cost(stack: Stack, url: str, rounds: int, per_round: int) -> dict[str, float]:
    """Sequential new clients' latency percentiles, and what the cluster adds to them."""

    def measure(label: str, _: Child, port: int, round_index: int) -> dict[str, float]:
        latencies = sequential(port, [f"new-{label}-{round_index}-{n}" for n in range(per_round)])
        return {"p50_ms": statistics.median(latencies), "p99_ms": p99(latencies)}

    def added(f: dict[str, float]) -> dict[str, float]:
        return {
            "added_p50_ms": f["cluster_p50_ms"] - f["plain_p50_ms"],
            "added_p99_ms": f["cluster_p99_ms"] - f["plain_p99_ms"],
        }

    return plain_against_clustered(stack, url, "lbd-pick", rounds, measure, added)


def burst_cost(stack: Stack, url: str, rounds: int, seconds: float) -> dict[str, float]:
    """A new client on every request at 64 connections: each lbd's req/s and user CPU per request."""

    def measure(label: str, child: Child, port: int, _: int) -> dict[str, float]:
        load = run_observed(f"http://127.0.0.1:{port}", "/tiny", 64, seconds, None, child.pid, new_clients=True)
        if load.errors or load.user_us is None:
            raise StartError(f"lbd-burst-{label}: {load.errors} errors in {load.requests} requests")
        return {"rps": load.rps, "user_us": load.user_us}

    return plain_against_clustered(
        stack, url, "lbd-burst", rounds, measure, lambda f: {"rps_ratio": f["cluster_rps"] / f["plain_rps"]}
    )


def refresh_rate(stack: Stack, url: str, clients: int, seconds: float) -> dict[str, float]:
    """Refreshes per active client per second at a short idle timeout, scaled to the default one."""
    idle = 16  # a refresh at most once a second per client
    child, port, _ = stack.start_lbd(
        "dynamic", name="lbd-refresh", cluster=url, config=f"session_idle_timeout = {idle}\n"
    )
    store = redis.Redis.from_url(url)
    try:
        ids = [f"sticky-{n}" for n in range(clients)]
        sequential(port, ids)  # pinned
        before = _calls(store, "expire")
        deadline = time.monotonic() + seconds
        sent = 0
        while time.monotonic() < deadline:
            sequential(port, ids)
            sent += len(ids)
        elapsed = seconds + (time.monotonic() - deadline)
        per_client = (_calls(store, "expire") - before) / elapsed / clients
    finally:
        stack.stop(child)
        store.close()
    return {
        "idle_timeout_s": idle,
        "requests": sent,
        "refreshes_per_client_per_s": per_client,
        "bound_per_client_per_s": REFRESH_FRACTION / idle,
        "per_million_at_default_idle": per_client * idle / DEFAULT_IDLE_S * 1_000_000,
    }


def _calls(store: redis.Redis, command: str) -> int:
    stats = store.info("commandstats")
    entry = stats.get(f"cmdstat_{command}", {})
    return int(entry.get("calls", 0))


def memory_per_session(url: str, count: int) -> dict[str, float]:
    store = redis.Redis.from_url(url)
    keys = Keys("memcheck")
    try:
        before = int(store.info("memory")["used_memory"])
        pipe = store.pipeline(transaction=False)
        for n in range(count):
            pipe.set(keys.session(f"client-{n:08d}"), session_value(f"server-{n % 1000:04d}", "us-east"), ex=9000)
            if n % 1000 == 999:
                pipe.execute()
        pipe.execute()
        per_session = (int(store.info("memory")["used_memory"]) - before) / count
        store.delete(*(keys.session(f"client-{n:08d}") for n in range(min(count, 1000))))
    finally:
        store.close()
    return {
        "sessions": count,
        "bytes_per_session": per_session,
        "sessions_per_gib": (1 << 30) / per_session,
        "client_id_bytes": len("client-00000000"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds, per_round = (3, 300) if args.quick else (9, 500)
    with tempfile.TemporaryDirectory(prefix="lb-cluster-") as workdir:
        stack = Stack(Path(workdir), None, None)
        try:
            stack.start_nginx(big_bytes=1, count=3)
            _, url = stack.start_redis()
            pick = new_client_cost(stack, url, rounds, per_round)
            burst = burst_cost(stack, url, 3 if args.quick else 5, 2.0 if args.quick else 4.0)
            refresh = refresh_rate(stack, url, 500 if args.quick else 2000, 3.0 if args.quick else 8.0)
            memory = memory_per_session(url, 20_000 if args.quick else 200_000)
        except StartError as error:
            print(f"cluster benchmark could not run: {error}", file=sys.stderr)
            return 1
        finally:
            stack.close()
    print("a new client's pick, sequential requests (ms)")
    print(f"  without --cluster: p50 {pick['plain_p50_ms']:.3f}  p99 {pick['plain_p99_ms']:.3f}")
    print(f"  with --cluster:    p50 {pick['cluster_p50_ms']:.3f}  p99 {pick['cluster_p99_ms']:.3f}")
    verdict = "PASS" if pick["added_p99_ms"] <= 1.0 else "FAIL"
    print(f"  {verdict}  added at p99 <= 1 ms: {pick['added_p99_ms']:.3f} ms (p50 {pick['added_p50_ms']:.3f})")
    print("a burst of new clients, 64 connections (lbd user CPU per request)")
    print(f"  without --cluster: {burst['plain_rps']:,.0f} req/s  {burst['plain_user_us']:.1f} us")
    print(f"  with --cluster:    {burst['cluster_rps']:,.0f} req/s  {burst['cluster_user_us']:.1f} us")
    print(f"  req/s with --cluster / without: {burst['rps_ratio']:.2f}")
    print("expiry refreshes")
    rate, bound = refresh["refreshes_per_client_per_s"], refresh["bound_per_client_per_s"]
    print(
        f"  {rate:.3f} per active client per second at a {refresh['idle_timeout_s']} s idle timeout (bound {bound:.3f})"
    )
    verdict = "PASS" if refresh["per_million_at_default_idle"] <= 2000 else "FAIL"
    print(
        f"  {verdict}  per million active clients at 9000 s: {refresh['per_million_at_default_idle']:,.0f}/s <= 2,000"
    )
    print("Redis memory")
    print(
        f"  {memory['bytes_per_session']:.0f} bytes per session ({memory['client_id_bytes']}-byte client ids): "
        f"{memory['sessions_per_gib'] / 1e6:.1f} million sessions per GiB of maxmemory"
    )
    print(json.dumps({"pick": pick, "burst": burst, "refresh": refresh, "memory": memory}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
