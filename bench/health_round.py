"""How long one round of active health checks over N servers takes, against the interval.

    .venv/bin/python bench/health_round.py [--servers 1000]

All N registered servers point at one real aiohttp backend on 127.0.0.1 (one probe each, bounded).
"""

from __future__ import annotations

import argparse
import asyncio
import time

from aiohttp import web

from lbd.config import HealthSettings, Regions
from lbd.health.active import HealthChecker
from lbd.models import ServerSpec
from lbd.registry import Registry


async def measure(count: int) -> None:
    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
    await site.start()
    port = runner.addresses[0][1]
    settings = HealthSettings()
    registry = Registry(Regions().latency_ms, settings)
    for i in range(count):
        registry.register(ServerSpec(f"srv-{i:05}", "http", "127.0.0.1", port, "us-east", 10))
    checker = HealthChecker(registry, settings)
    await checker.start()  # its own schedule starts too; the measured round below is separate
    try:
        started = time.perf_counter()
        results = await asyncio.gather(*(checker.probe(server) for server in registry.servers()))
        elapsed = time.perf_counter() - started
    finally:
        await checker.stop()
        await runner.cleanup()
    passed = sum(1 for ok, _ in results if ok)
    interval = settings.interval_ms / 1000
    verdict = "PASS" if elapsed < interval and passed == count else "FAIL"
    print(f"health round over {count} servers: {elapsed:.3f} s ({passed} passed); interval {interval:.1f} s: {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--servers", type=int, default=1000)
    asyncio.run(measure(parser.parse_args().servers))


if __name__ == "__main__":
    main()
