"""Demo backends for `make run`: one small aiohttp server per entry of a servers.json.

Each answers every path with a line naming itself, and `/health` with 200, so the balancer has
something real to route to on a fresh machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path

from aiohttp import web


def backend_app(server_id: str, region: str) -> web.Application:
    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "server": server_id})

    async def hello(request: web.Request) -> web.Response:
        client = request.headers.get("client-id", "-")
        line = f"hello from {server_id} ({region}) to client {client}: {request.method} {request.path_qs}\n"
        return web.Response(text=line)

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_route("*", "/{tail:.*}", hello)
    return app


async def serve(entries: list[dict[str, object]]) -> None:
    runners = []
    for entry in entries:
        runner = web.AppRunner(backend_app(str(entry["id"]), str(entry["region"])), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", entry["port"]).start()
        runners.append(runner)
        print(f"demo backend {entry['id']} on http://127.0.0.1:{entry['port']}", file=sys.stderr)
    try:
        await asyncio.Event().wait()
    finally:
        for runner in runners:
            await runner.cleanup()


if __name__ == "__main__":
    seed = Path(sys.argv[1] if len(sys.argv) > 1 else "examples/servers.json")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(json.loads(seed.read_text())))
