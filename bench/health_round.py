"""How long one round of active health checks over N servers takes, against the interval.

    .venv/bin/python bench/health_round.py [--servers 1000]

All N servers point at one backend (bench/sink.py) in its own process, pinned to the other CPU
where there are two, as real servers would be elsewhere: the round measured is lbd's prober alone.
Every probe of the round is started at once (a worst case: lbd spreads them over the interval).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from lbd.config import HealthSettings, Regions
from lbd.health.active import HealthChecker
from lbd.models import ServerSpec
from lbd.registry import Registry

SINK = Path(__file__).resolve().parent / "sink.py"


def start_backend() -> tuple[subprocess.Popen[bytes], int]:
    """bench/sink.py on a free port, on CPU 1 (this process moves to CPU 0) where there are 2 CPUs."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    pin: list[str] = []
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {0})
        pin = ["taskset", "-c", "1"]
    backend = subprocess.Popen([*pin, sys.executable, str(SINK), str(port)], stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return backend, port
        except OSError:
            time.sleep(0.05)
    backend.kill()
    raise SystemExit(f"bench/sink.py did not listen on port {port} within 10 s")


async def measure(count: int, port: int) -> None:
    settings = HealthSettings()
    servers = Registry(Regions().latency_ms, settings)
    for i in range(count):
        servers.register(ServerSpec(f"srv-{i:05}", "http", "127.0.0.1", port, "us-east", 10))
    # the checker watches an empty registry: no scheduled probe runs beside the measured round
    checker = HealthChecker(Registry(Regions().latency_ms, settings), settings)
    await checker.start()
    try:
        started = time.perf_counter()
        results = await asyncio.gather(*(checker.probe(server) for server in servers.servers()))
        elapsed = time.perf_counter() - started
    finally:
        await checker.stop()
    passed = sum(1 for ok, _ in results if ok)
    interval = settings.interval_ms / 1000
    verdict = "PASS" if elapsed < interval and passed == count else "FAIL"
    print(f"health round over {count} servers: {elapsed:.3f} s ({passed} passed); interval {interval:.1f} s: {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=1000)
    count = parser.parse_args().servers
    backend, port = start_backend()
    try:
        asyncio.run(measure(count, port))
    finally:
        backend.terminate()
        backend.wait(5)


if __name__ == "__main__":
    main()
