"""Every core (`make bench` runs it): lbd with --workers N against HAProxy with nbthread N, lbd's
scaling from 1 worker to N, and how evenly the kernel spreads connections over the workers.

    .venv/bin/python -m bench.cores             # 5 interleaved rounds of 3 s (about 2 minutes)
    .venv/bin/python -m bench.cores --quick     # 1 round

N is the usable CPU count. Nothing is pinned: the proxy under test, wrk (N threads) and the nginx
backends share every core, as they would on a host with no core to spare. On a machine with N
cores only the load generator takes its share from the proxies, so the scaling target (N workers
at least 1.8 times one, at N = 2) needs cores beyond the proxy's: it reads n/a when the machine has
fewer than 2N + 1 (the ratio is still shown). Every row sends bench/wrk/clients.lua's mix (10,000
client ids), tiny responses, 64 keep-alive connections; ratios are medians of per-round ratios.
Balance: each lbd round's requests per worker (from `GET /v1/status`), the busiest over the least.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bench.loadgen import run_wrk
from bench.report import Row, compared
from bench.stack import Stack, StartError, admin
from lbd.config import usable_cpus

CONNECTIONS = 64


def worker_requests(socket_path: Path) -> list[int]:
    status, body = admin(socket_path, "GET", "/v1/status")
    if status != 200 or not isinstance(body, dict):
        raise RuntimeError(f"GET /v1/status answered {status}")
    return [int(worker["requests"]) for worker in body["workers"]]


@contextlib.contextmanager
def started(stack: Stack, name: str, cores: int) -> Iterator[tuple[int, Path]]:
    if name.startswith("haproxy"):
        child, port, socket_path = stack.start_haproxy(threads=int(name.rsplit("-n", 1)[1]), name=name)
    else:
        child, port, socket_path = stack.start_lbd("static", name=name, workers=int(name.rsplit("-w", 1)[1]))
    try:
        yield port, socket_path
    finally:
        stack.stop(child)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, default=usable_cpus(), help="N [the usable CPUs]")
    args = parser.parse_args()
    cores, rounds, seconds = args.workers, 1 if args.quick else 5, 3.0
    names = [f"haproxy-n{cores}", f"lbd-w{cores}", "lbd-w1"]
    rows = {name: Row(name, "tiny", CONNECTIONS) for name in names}
    spread: list[float] = []
    with tempfile.TemporaryDirectory(prefix="lb-cores-") as workdir:
        stack = Stack(Path(workdir), None, None)
        try:
            stack.start_nginx(big_bytes=1)
            with contextlib.ExitStack() as running:
                proxies = {name: running.enter_context(started(stack, name, cores)) for name in names}
                for round_index in range(rounds):
                    order = names[round_index % len(names) :] + names[: round_index % len(names)]
                    print(f"  round {round_index + 1}/{rounds}:", end="", flush=True)
                    for name in order:
                        port, socket_path = proxies[name]
                        url = f"http://127.0.0.1:{port}"
                        run_wrk(url, "/tiny", CONNECTIONS, 1.0, None, threads=cores)  # warm-up
                        before = None if name.startswith("haproxy") else worker_requests(socket_path)
                        load = run_wrk(url, "/tiny", CONNECTIONS, seconds, None, threads=cores)
                        rows[name].rounds.append(load)
                        if before is not None and len(before) > 1:
                            served = [a - b for a, b in zip(worker_requests(socket_path), before, strict=True)]
                            spread.append(max(served) / max(1, min(served)))
                        print(f"  {name} {load.rps:,.0f}", end="", flush=True)
                    print(flush=True)
        except (StartError, RuntimeError, OSError) as error:
            print(f"cores benchmark could not run: {error}", file=sys.stderr)
            return 1
        finally:
            stack.close()
    workers, one, haproxy = rows[f"lbd-w{cores}"], rows["lbd-w1"], rows[f"haproxy-n{cores}"]
    vs_haproxy = compared(workers, haproxy, "rps") or 0.0
    scaling = compared(workers, one, "rps") or 0.0
    balance = statistics.median(spread) if spread else 0.0
    free = (usable_cpus() >= 2 * cores + 1) and cores == 2
    print(f"\n{cores} cores (wrk -t{cores}, nginx and the proxy share them), tiny responses, {CONNECTIONS} connections")
    for row in rows.values():
        assert row.load is not None
        print(f"  {row.proxy:<12} {row.load.rps:>9,.0f} req/s  p99 {row.load.p99_ms:.2f} ms  errors {row.load.errors}")
    print(f"  {'PASS' if vs_haproxy >= 0.75 else 'FAIL'}  lbd {cores} workers >= 0.75 x HAProxy nbthread {cores}: "
          f"{vs_haproxy:.2f}")  # fmt: skip
    verdict = ("PASS" if scaling >= 1.8 else "FAIL") if free else "n/a "
    why = (
        ""
        if free
        else f" (needs {2 * cores + 1} cores to leave the proxy its {cores}; this machine has {usable_cpus()})"
    )
    print(f"  {verdict}  lbd {cores} workers >= 1.8 x 1 worker: {scaling:.2f}{why}")
    print(
        f"  {'PASS' if balance and balance <= 1.3 else 'FAIL'}  busiest worker <= 1.3 x the least busy: {balance:.2f}"
    )
    figures = {"cores": cores, "x_haproxy": vs_haproxy, "x_one_worker": scaling, "balance": balance}
    print(json.dumps(figures | {"rps": {name: row.load.rps if row.load else None for name, row in rows.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
