"""The admin API: versioned JSON under /v1, served only on the Unix socket.

Reads come from registry snapshots and proxy counters; every error is the envelope
`{"error": {"code": ..., "message": ...}}` with a stable code that lbctl maps to an exit code.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from lbd import __version__
from lbd.balancer import Balancer
from lbd.models import Health
from lbd.proxy.server import ProxyContext
from lbd.registry import Registry


@dataclass(frozen=True, slots=True)
class AdminState:
    """Everything the admin handlers may read (and, through the registry, change)."""

    registry: Registry
    balancer: Balancer
    proxy: ProxyContext
    listeners: dict[str, str]
    started_at: float


ADMIN_STATE = web.AppKey("admin_state", AdminState)


def api_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn aiohttp's HTML errors and any unexpected exception into the JSON envelope."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return api_error(404, "not_found", f"no such endpoint: {request.method} {request.path}")
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return api_error(405, "method_not_allowed", f"{request.method} is not allowed on {request.path}; use {allowed}")
    except web.HTTPException as exc:
        return api_error(exc.status, "http_error", exc.reason)


def _state(request: web.Request) -> AdminState:
    return request.app[ADMIN_STATE]


async def get_status(request: web.Request) -> web.Response:
    state = _state(request)
    servers = state.registry.servers()
    by_health = Counter(server.state.health.value for server in servers)
    proxy = state.proxy
    body: dict[str, Any] = {
        "mode": state.balancer.mode,
        "version": __version__,
        "pid": os.getpid(),
        "uptime_s": round(time.monotonic() - state.started_at, 3),
        "listeners": state.listeners,
        "servers": {
            "total": len(servers),
            "in_rotation": sum(1 for server in servers if server.state.health.in_rotation),
            "by_health": {health.value: by_health.get(health.value, 0) for health in Health},
        },
        "clients": {"connections": len(proxy.connections)},
        "requests": {"total": proxy.requests_total, "responses": dict(proxy.responses)},
    }
    return web.json_response(body, dumps=_dumps)


async def list_servers(request: web.Request) -> web.Response:
    servers = [server.to_json() for server in _state(request).registry.servers()]
    return web.json_response({"servers": servers}, dumps=_dumps)


async def get_server(request: web.Request) -> web.Response:
    server_id = request.match_info["server_id"]
    server = _state(request).registry.get(server_id)
    if server is None:
        return api_error(404, "server_not_found", f"no server with id {server_id!r}")
    return web.json_response(server.to_json(), dumps=_dumps)


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def create_admin_app(state: AdminState) -> web.Application:
    app = web.Application(middlewares=[error_envelope])
    app[ADMIN_STATE] = state
    app.router.add_get("/v1/status", get_status)
    app.router.add_get("/v1/servers", list_servers)
    app.router.add_get("/v1/servers/{server_id}", get_server)
    return app
