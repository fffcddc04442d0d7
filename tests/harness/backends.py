"""Real HTTP backends for tests: aiohttp servers on 127.0.0.1 ephemeral ports, in a background thread.

Each backend names itself in `X-Backend-Id` and in its body, counts hits, and can be told to fail:
`/health` answers `health_status`, `delay_s` slows every answer, `stop()` / `start()` kill and
revive it on the same port.

Endpoints:
  /echo            JSON: server, method, path, headers, body length and sha256
  /health          {"status": ...} with `health_status`
  /bytes/N         N bytes with Content-Length (?chunked=1: streamed chunked, 64 KiB pieces)
  /random/N        N pseudo-random bytes, the same for the same ?seed= (?chunked=1 as above)
  /status/CODE     an empty response with that status
  /slow/MS         answers after MS milliseconds
  /upload          reads the body as a stream; JSON: length and sha256
  /ws              websocket echo
  /close           answers with Connection: close
  /hits            JSON: hits by path so far (not counted itself; for backends in another process)
  /*               like /echo
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import ssl
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

from aiohttp import WSMsgType, web

CHUNK = 64 * 1024


def server_entry(
    server_id: str, port: int, region: str = "us-east", capacity: int = 10, scheme: str = "http"
) -> dict[str, Any]:
    """A loopback backend as a servers.json / registration entry (seed format)."""
    return {
        "id": server_id,
        "hostname": "127.0.0.1",
        "port": port,
        "region": region,
        "capacity": capacity,
        "url": f"{scheme}://127.0.0.1:{port}",
    }


def random_body(size: int, seed: int) -> bytes:
    """What /random/SIZE?seed=SEED answers: bytes that differ everywhere, so a misplaced piece shows."""
    return random.Random(seed).randbytes(size)


class BackendLoop:
    """One event loop in a daemon thread hosting any number of backends."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Backend:
    def __init__(
        self, loop: BackendLoop, server_id: str, region: str = "us-east", tls: ssl.SSLContext | None = None
    ) -> None:
        self.loop = loop
        self.id = server_id
        self.region = region
        self.tls = tls  # serve HTTPS with this context
        self.scheme = "http" if tls is None else "https"
        self.port = 0
        self.hits: Counter[str] = Counter()
        self.peer_ports: set[int] = set()  # client ports of the connections requests other than /health came on
        self.health_status = 200
        self.delay_s = 0.0
        self.last_headers: dict[str, str] = {}
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def entry(self, capacity: int = 10, region: str | None = None) -> dict[str, Any]:
        """This backend as a servers.json / registration entry."""
        return server_entry(self.id, self.port, region or self.region, capacity, self.scheme)

    @property
    def total_hits(self) -> int:
        return sum(count for path, count in self.hits.items() if path != "/health")

    def start(self) -> Backend:
        self.loop.run(self._start())
        return self

    def stop(self) -> None:
        self.loop.run(self._stop())

    async def _start(self) -> None:
        app = web.Application(client_max_size=1 << 40)
        app.router.add_get("/health", self._health)
        app.router.add_route("*", "/bytes/{n}", self._bytes)
        app.router.add_route("*", "/random/{n}", self._random)
        app.router.add_route("*", "/status/{code}", self._status)
        app.router.add_route("*", "/slow/{ms}", self._slow)
        app.router.add_route("*", "/upload", self._upload)
        app.router.add_get("/ws", self._ws)
        app.router.add_route("*", "/close", self._close)
        app.router.add_get("/hits", self._hits)
        app.router.add_route("*", "/{tail:.*}", self._echo)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True, ssl_context=self.tls)
        await site.start()
        if self.port == 0:
            self.port = int(self._runner.addresses[0][1])

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _headers(self) -> dict[str, str]:
        return {"X-Backend-Id": self.id}

    async def _count(self, request: web.Request) -> None:
        self.hits[request.path] += 1
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        if peer:
            self.peer_ports.add(int(peer[1]))
        self.last_headers = dict(request.headers)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)

    async def _health(self, request: web.Request) -> web.Response:
        self.hits["/health"] += 1
        return web.json_response({"status": self.health_status}, status=self.health_status, headers=self._headers())

    async def _echo(self, request: web.Request) -> web.Response:
        await self._count(request)
        digest = hashlib.sha256()
        length = 0
        async for chunk in request.content.iter_chunked(CHUNK):
            digest.update(chunk)
            length += len(chunk)
        body = {
            "server": self.id,
            "method": request.method,
            "path": request.path_qs,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "length": length,
            "sha256": digest.hexdigest(),
        }
        return web.json_response(body, headers=self._headers())

    async def _upload(self, request: web.Request) -> web.Response:
        return await self._echo(request)

    async def _bytes(self, request: web.Request) -> web.StreamResponse:
        await self._count(request)
        return await self._send(request, int(request.match_info["n"]), lambda start, end: b"x" * (end - start))

    async def _random(self, request: web.Request) -> web.StreamResponse:
        await self._count(request)
        body = random_body(int(request.match_info["n"]), int(request.query["seed"]))
        return await self._send(request, len(body), lambda start, end: body[start:end])

    async def _send(self, request: web.Request, size: int, part: Callable[[int, int], bytes]) -> web.StreamResponse:
        """A body of `size` bytes, `part(start, end)` of it at a time, made as it is sent: the head
        leaves at once however large the body (a backend that first built 256 MiB would answer later
        than lbd's upstream timeout on a busy machine). With Content-Length, or chunked in 64 KiB
        pieces for ?chunked=1."""
        response = web.StreamResponse(headers=self._headers())
        piece = CHUNK
        if request.query.get("chunked"):
            response.enable_chunked_encoding()
        else:
            response.content_length = size
            piece = 16 * CHUNK
        await response.prepare(request)
        if request.method != "HEAD":  # aiohttp would send what is written, even to a HEAD
            for start in range(0, size, piece):
                await response.write(part(start, min(size, start + piece)))
        await response.write_eof()
        return response

    async def _status(self, request: web.Request) -> web.Response:
        await self._count(request)
        return web.Response(status=int(request.match_info["code"]), headers=self._headers())

    async def _slow(self, request: web.Request) -> web.Response:
        await self._count(request)
        await asyncio.sleep(int(request.match_info["ms"]) / 1000)
        return web.Response(text=f"slow from {self.id}\n", headers=self._headers())

    async def _close(self, request: web.Request) -> web.Response:
        await self._count(request)
        response = web.Response(text=f"closing from {self.id}\n", headers=self._headers())
        response.force_close()
        return response

    async def _hits(self, request: web.Request) -> web.Response:
        return web.json_response(dict(self.hits), headers=self._headers())

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        await self._count(request)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await ws.send_str(f"{self.id}:{message.data}")
            elif message.type == WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws


@contextmanager
def backends(*ids: str, regions: tuple[str, ...] = ()) -> Iterator[list[Backend]]:
    """Start one backend per id (regions default to us-east); stop them all afterwards."""
    loop = BackendLoop()
    started = [
        Backend(loop, server_id, regions[i] if i < len(regions) else "us-east").start()
        for i, server_id in enumerate(ids)
    ]
    try:
        yield started
    finally:
        for backend in started:
            backend.stop()
        loop.close()
