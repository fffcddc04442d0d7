"""Admin endpoints that change things: registration, draining, removal, mode, sessions, reload.

They act only through the registry, the balancer and the session table, and answer every bad
input with the error envelope naming the field and what is allowed. A change to servers, drain
flags or the mode is saved to the state file before it is answered (`persist`), so an
acknowledged change survives a crash.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, cast

from aiohttp import web

from lbd.admin.app import ApiError, server_json, state_of
from lbd.config import MODES, Mode, parse_server_list
from lbd.errors import LbError, ValidationError
from lbd.models import Server, ServerSpec, parse_server
from lbd.registry import RegistryConflict
from lbd.reload import ReloadError

DRAIN_POLL_S = 0.05


def persist(request: web.Request) -> None:
    """Save the state file (write, fsync, rename) before the change is acknowledged."""
    try:
        state_of(request).persist()
    except LbError as exc:
        raise ApiError(
            500, "state_not_saved", f"the change is applied but was not saved, so a restart would lose it: {exc}"
        ) from None


async def read_json(request: web.Request) -> Any:
    """The request's JSON body, or an HTTP 400 error envelope naming the parse problem."""
    raw = await request.read()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "bad_json", f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "bad_json", "request body is not usable JSON: nested too deeply") from None


def parse_registration(payload: object, known_regions: frozenset[str]) -> list[ServerSpec]:
    """One seed-format object or a list of them; all validated before anything changes."""
    try:
        if isinstance(payload, list):
            return parse_server_list(payload, known_regions)
        return [parse_server(payload, known_regions)]
    except ValidationError as exc:
        raise ApiError(422, "invalid_server", str(exc), exc.field) from None


def register_all(request: web.Request, specs: list[ServerSpec]) -> web.Response:
    """Register atomically: a conflict on any entry changes nothing."""
    registry = state_of(request).registry
    try:
        for spec in specs:
            registry.check_conflict(spec)
    except RegistryConflict as exc:
        raise ApiError(409, "conflict", str(exc), "id") from None
    created = [spec.id for spec in specs if registry.register(spec)[1]]
    persist(request)  # also when nothing was created: a retry after a failed save gets it saved
    servers = [server_json(cast(Server, registry.get(spec.id)), state_of(request).balancer) for spec in specs]
    return web.json_response({"servers": servers, "created": created}, status=201 if created else 200)


async def register(request: web.Request) -> web.Response:
    specs = parse_registration(await read_json(request), state_of(request).config.regions.server_regions)
    return register_all(request, specs)


async def remove_server(request: web.Request, server_id: str, wait: bool) -> web.Response:
    """Drain, wait for requests in flight to finish (bounded by drain_grace_ms), then remove."""
    state = state_of(request)
    server = state.registry.set_draining(server_id, True)
    if server is None:
        raise ApiError(404, "server_not_found", f"no server with id {server_id!r}")
    started = time.monotonic()
    deadline = started + state.config.drain_grace_ms / 1000.0
    while wait and server.state.active > 0 and time.monotonic() < deadline:
        await asyncio.sleep(DRAIN_POLL_S)
    in_flight = server.state.active
    state.registry.deregister(server_id)
    persist(request)
    state.proxy.pool.close_idle(server_id=server_id)
    return web.json_response(
        {
            "removed": server_id,
            "drained": in_flight == 0,
            "in_flight_at_removal": in_flight,
            "waited_ms": round((time.monotonic() - started) * 1000),
        }
    )


async def deregister(request: web.Request) -> web.Response:
    now = request.query.get("now", "false").lower() in ("1", "true", "yes")
    return await remove_server(request, request.match_info["server_id"], wait=not now)


async def drain(request: web.Request) -> web.Response:
    return _set_draining(request, True)


async def undrain(request: web.Request) -> web.Response:
    return _set_draining(request, False)


def _set_draining(request: web.Request, draining: bool) -> web.Response:
    server_id = request.match_info["server_id"]
    server = state_of(request).registry.set_draining(server_id, draining)
    if server is None:
        raise ApiError(404, "server_not_found", f"no server with id {server_id!r}")
    persist(request)
    return web.json_response(server_json(server, state_of(request).balancer))


async def get_mode(request: web.Request) -> web.Response:
    return web.json_response({"mode": state_of(request).balancer.mode})


async def put_mode(request: web.Request) -> web.Response:
    payload = await read_json(request)
    mode = payload.get("mode") if isinstance(payload, dict) else None
    if mode not in MODES:
        raise ApiError(422, "invalid_mode", f"field 'mode' must be one of {', '.join(MODES)}; got {mode!r}", "mode")
    balancer = state_of(request).balancer
    previous = balancer.mode
    balancer.set_mode(cast(Mode, mode))
    persist(request)
    return web.json_response({"mode": mode, "previous": previous})


async def list_sessions(request: web.Request) -> web.Response:
    state = state_of(request)
    server_filter = request.query.get("server")
    region_filter = request.query.get("region")
    try:
        limit = int(request.query.get("limit", "1000"))
    except ValueError:
        raise ApiError(400, "bad_query", "query parameter 'limit' must be an integer") from None
    now = time.monotonic()
    idle_timeout = state.sessions.idle_timeout_s
    rows: list[dict[str, object]] = []
    matched = 0
    for client_id, session in reversed(list(state.sessions.items(now))):
        if server_filter and session.server_id != server_filter:
            continue
        if region_filter and session.region != region_filter:
            continue
        matched += 1
        if len(rows) < limit:
            idle = now - session.last_seen
            rows.append(
                {
                    "client_id": client_id,
                    "server": session.server_id,
                    "region": session.region,
                    "idle_s": round(idle, 3),
                    "expires_in_s": round(idle_timeout - idle, 3),
                }
            )
    return web.json_response({"sessions": rows, "matched": matched, "total": len(state.sessions)})


async def sessions_summary(request: web.Request) -> web.Response:
    """Counts per server and per client region, kept incrementally (no scan of the table)."""
    sessions = state_of(request).sessions
    return web.json_response(
        {
            "total": len(sessions),
            "by_server": dict(sessions.by_server),
            "by_region": dict(sessions.by_region),
            "evicted": sessions.evicted,
            "expired": sessions.expired,
        }
    )


async def clear_session(request: web.Request) -> web.Response:
    client_id = request.match_info["client_id"]
    if not state_of(request).sessions.remove(client_id):
        raise ApiError(404, "session_not_found", f"no session for client {client_id!r}")
    return web.json_response({"cleared": client_id})


async def clear_server_sessions(request: web.Request) -> web.Response:
    server_id = request.query.get("server")
    if not server_id:
        raise ApiError(400, "bad_query", "query parameter 'server' is required (or DELETE /v1/sessions/{client_id})")
    return web.json_response({"cleared": state_of(request).sessions.remove_server(server_id), "server": server_id})


async def reload_config(request: web.Request) -> web.Response:
    """Re-read the config file and apply it live; an invalid one changes nothing (422, its message)."""
    try:
        return web.json_response(await state_of(request).reloader.reload())
    except ReloadError as exc:
        raise ApiError(exc.status, exc.code, str(exc)) from None


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/servers", register)
    app.router.add_delete("/v1/servers/{server_id}", deregister)
    app.router.add_post("/v1/servers/{server_id}/drain", drain)
    app.router.add_post("/v1/servers/{server_id}/undrain", undrain)
    app.router.add_get("/v1/mode", get_mode)
    app.router.add_put("/v1/mode", put_mode)
    app.router.add_get("/v1/sessions", list_sessions)
    app.router.add_get("/v1/sessions/summary", sessions_summary)
    app.router.add_delete("/v1/sessions", clear_server_sessions)
    app.router.add_delete("/v1/sessions/{client_id}", clear_session)
    app.router.add_post("/v1/reload", reload_config)
