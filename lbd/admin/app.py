"""The admin API: versioned JSON under /v1, served only on the Unix socket.

Reads come from registry snapshots and proxy counters; every error is the envelope
`{"error": {"code": ..., "message": ...}}` with a stable code that lbctl maps to an exit code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web

from lbd import __version__
from lbd.balancer import BadRoute, Balancer, NoServer
from lbd.config import Config, config_to_mapping
from lbd.metrics import add_metrics_route, metrics_registry
from lbd.models import Health, Server
from lbd.proxy.context import ProxyContext
from lbd.registry import Registry
from lbd.reload import Reloader
from lbd.sessions import SessionTable


@dataclass(frozen=True, slots=True)
class AdminState:
    """Everything the admin handlers may read (and, through the registry and balancer, change)."""

    reloader: Reloader
    registry: Registry
    balancer: Balancer
    sessions: SessionTable
    proxy: ProxyContext
    listeners: dict[str, str]
    started_at: float
    persist: Callable[[], None] = lambda: None  # saves the state file; called before answering a change

    @property
    def config(self) -> Config:
        """The configuration in effect: a reload replaces it."""
        return self.reloader.config


log = logging.getLogger("lbd.admin")
ADMIN_STATE = web.AppKey("admin_state", AdminState)


class ApiError(Exception):
    """Raised by handlers; the middleware turns it into the error envelope."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.field = field


def api_error(status: int, code: str, message: str, field: str | None = None) -> web.Response:
    error: dict[str, str] = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    return web.json_response({"error": error}, status=status)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn aiohttp's HTML errors and any unexpected exception into the JSON envelope."""
    try:
        return await handler(request)
    except ApiError as exc:
        return api_error(exc.status, exc.code, str(exc), exc.field)
    except web.HTTPNotFound:  # the path as sent (percent-encoded): a decoded one may hold a line break
        return api_error(404, "not_found", f"no such endpoint: {request.method} {request.raw_path}")
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        message = f"{request.method} is not allowed on {request.raw_path}; use {allowed}"
        return api_error(405, "method_not_allowed", message)
    except web.HTTPRequestEntityTooLarge:
        return api_error(413, "too_large", "request body is too large for the admin API (4 MiB at most)")
    except web.HTTPException as exc:
        return api_error(exc.status, "http_error", exc.reason)
    except Exception:
        log.exception("admin API: unexpected error on %s %s", request.method, request.path)
        return api_error(500, "internal_error", "internal error; see the lbd log")


def server_json(server: Server, balancer: Balancer) -> dict[str, Any]:
    """A server as the API shows it, with its monotonic times turned into Unix times, and its dynamic
    score with the score's terms."""
    now = time.monotonic()
    return {**server.to_json(now, time.time() - now), **balancer.score_terms(server, now)}


def state_of(request: web.Request) -> AdminState:
    return request.app[ADMIN_STATE]


async def get_status(request: web.Request) -> web.Response:
    state = state_of(request)
    servers = state.registry.servers()
    by_health = Counter(server.state.health.value for server in servers)
    proxy = state.proxy
    body: dict[str, Any] = {
        "mode": state.balancer.mode,
        "version": __version__,
        "pid": os.getpid(),
        "uptime_s": round(time.monotonic() - state.started_at, 3),
        "listeners": state.listeners,
        "state_dir": str(state.config.state_dir),
        "servers": {
            "total": len(servers),
            "in_rotation": sum(1 for server in servers if server.state.health.in_rotation),
            "by_health": {health.value: by_health.get(health.value, 0) for health in Health},
        },
        "clients": {"connections": len(proxy.connections), "rejected": dict(proxy.rejections)},
        "requests": {
            "total": proxy.requests_total,
            "responses": dict(proxy.responses),
            "retries": proxy.retries,
            "failovers": proxy.failovers,
        },
        "sessions": {"total": len(state.sessions)},
        "reload": {"config_file": _optional_str(state.reloader.source.path), **state.reloader.stats.to_json()},
    }
    return web.json_response(body, dumps=_dumps)


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)


async def list_servers(request: web.Request) -> web.Response:
    state = state_of(request)
    servers = [server_json(server, state.balancer) for server in state.registry.servers()]
    return web.json_response({"servers": servers}, dumps=_dumps)


async def get_server(request: web.Request) -> web.Response:
    server_id = request.match_info["server_id"]
    server = state_of(request).registry.get(server_id)
    if server is None:
        raise ApiError(404, "server_not_found", f"no server with id {server_id!r}")
    return web.json_response(server_json(server, state_of(request).balancer), dumps=_dumps)


async def explain_route(request: web.Request) -> web.Response:
    """`lbctl route`: the balancer's decision for a client, with candidates; changes nothing."""
    state = state_of(request)
    try:
        body = state.balancer.explain(request.match_info["client_id"], request.query.get("region"), time.monotonic())
    except BadRoute as exc:
        raise ApiError(400, "bad_route", str(exc), "region") from None
    except NoServer as exc:
        raise ApiError(503, "no_server", str(exc)) from None
    return web.json_response(body, dumps=_dumps)


async def get_config(request: web.Request) -> web.Response:
    """The configuration in effect: the file and flags as loaded, with the mode as switched since."""
    state = state_of(request)
    effective = dataclasses.replace(state.config, mode=state.balancer.mode)
    return web.json_response(config_to_mapping(effective), dumps=_dumps)


OPENAPI = web.AppKey("openapi", bytes)


async def get_openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3 description of this API, as kept in lbd/admin/openapi.json."""
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def create_admin_app(state: AdminState, middlewares: tuple[Any, ...] = ()) -> web.Application:
    """The /v1 API; the TCP listener adds its token check in front through `middlewares`."""
    from lbd.admin import mutations  # noqa: PLC0415 - mutations import this module's helpers

    app = web.Application(middlewares=[error_envelope, *middlewares], client_max_size=4 * 1024 * 1024)
    app[ADMIN_STATE] = state
    app[OPENAPI] = resources.files("lbd.admin").joinpath("openapi.json").read_bytes()
    add_metrics_route(
        app, metrics_registry(state.registry, state.balancer, state.sessions, state.proxy, state.reloader.stats)
    )
    app.router.add_get("/v1/status", get_status)
    app.router.add_get("/v1/servers", list_servers)
    app.router.add_get("/v1/servers/{server_id}", get_server)
    app.router.add_get("/v1/route/{client_id}", explain_route)
    app.router.add_get("/v1/config", get_config)
    app.router.add_get("/v1/openapi.json", get_openapi)
    mutations.add_routes(app)
    return app
