"""Admin endpoints that change things: registration, draining, removal, capacity, mode, sessions,
checks, reload.

Changes to servers and the mode go through the control plane (lbd/control.py): one instance saves
them to its state file before answering, a cluster applies them on every instance through the
store before answering, so an acknowledged change survives a crash either way. Every bad input is
answered with the error envelope naming the field and what is allowed; every change is audited.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

from aiohttp import web

from lbd.admin.common import ApiError, audit, read_json, state_of, who
from lbd.admin.views import server_json
from lbd.config import MODES, Mode, parse_server_list
from lbd.errors import LbError, NotPossibleHere, StoreConflict, StoreUnavailable, ValidationError
from lbd.models import MAX_CAPACITY, Server, ServerSpec, parse_server
from lbd.registry import RegistryConflict
from lbd.reload import ReloadError

routes = web.RouteTableDef()  # changes through the control plane
local_routes = web.RouteTableDef()  # acts on this process's checker and session table (a supervisor: its workers')
DRAIN_POLL_S = 0.05


def parse_registration(payload: object, known_regions: frozenset[str]) -> list[ServerSpec]:
    """One seed-format object or a list of them; all validated before anything changes."""
    try:
        if isinstance(payload, list):
            return parse_server_list(payload, known_regions)
        return [parse_server(payload, known_regions)]
    except ValidationError as exc:
        raise ApiError(422, "invalid_server", str(exc), exc.field) from None


@contextmanager
def changing() -> Iterator[None]:
    """A change through the control plane: its failures as the envelope's stable codes."""
    try:
        yield
    except (RegistryConflict, StoreConflict) as exc:
        raise ApiError(409, "conflict", str(exc), "id") from None
    except StoreUnavailable as exc:
        raise ApiError(503, "store_unavailable", str(exc)) from None
    except NotPossibleHere as exc:
        raise ApiError(409, exc.code, str(exc)) from None
    except LbError as exc:
        raise ApiError(
            500, "state_not_saved", f"the change is applied but was not saved, so a restart would lose it: {exc}"
        ) from None


async def register_all(request: web.Request, specs: list[ServerSpec]) -> web.Response:
    """Register atomically: a conflict on any entry changes nothing."""
    state = state_of(request)
    registry = state.registry
    with changing():
        for spec in specs:
            registry.check_conflict(spec)
        created = await state.control.register(specs)
    for spec in specs:
        if spec.id in created:
            where = f"{spec.url} region {spec.region} capacity {spec.capacity}"
            audit(request, "register", spec.id, f"registered at {where}", server=spec.to_json())
    servers = [server_json(cast(Server, registry.get(spec.id)), state_of(request).balancer) for spec in specs]
    return web.json_response({"servers": servers, "created": created}, status=201 if created else 200)


@routes.post("/v1/servers")
async def register(request: web.Request) -> web.Response:
    specs = parse_registration(await read_json(request), state_of(request).config.regions.server_regions)
    return await register_all(request, specs)


async def remove_server(request: web.Request, server_id: str, wait: bool) -> web.Response:
    """Drain, wait for requests in flight to finish (bounded by drain_grace_ms), then remove."""
    state = state_of(request)
    with changing():
        server = await state.control.set_draining(server_id, True)
    if server is None:
        raise ApiError(404, "server_not_found", f"no server with id {server_id!r}")
    started = time.monotonic()
    deadline = started + state.config.drain_grace_ms / 1000.0
    in_flight = await state.control.in_flight(server_id)
    while wait and in_flight > 0 and time.monotonic() < deadline:
        await asyncio.sleep(DRAIN_POLL_S)
        in_flight = await state.control.in_flight(server_id)
    if state.registry.get(server_id) is not server:
        raise ApiError(
            409, "conflict", f"server {server_id!r} was removed and registered again while it drained; "
            "the new registration was left in place", "id",
        )  # fmt: skip
    with changing():
        dropped = await state.control.remove(server_id)
    answer = {
        "removed": server_id,
        "drained": in_flight == 0,
        "in_flight_at_removal": in_flight,
        "waited_ms": round((time.monotonic() - started) * 1000),
        "sessions_dropped": dropped,
    }
    how = "drained" if in_flight == 0 else f"{in_flight} requests still in flight"
    audit(request, "deregister", server_id, f"removed ({how}, {dropped} sessions dropped)", **answer)
    return web.json_response(answer)


@routes.delete("/v1/servers/{server_id}")
async def deregister(request: web.Request) -> web.Response:
    now = request.query.get("now", "false").lower() in ("1", "true", "yes")
    return await remove_server(request, request.match_info["server_id"], wait=not now)


@routes.post("/v1/servers/{server_id}/drain")
async def drain(request: web.Request) -> web.Response:
    return await _set_draining(request, True)


@routes.post("/v1/servers/{server_id}/undrain")
async def undrain(request: web.Request) -> web.Response:
    return await _set_draining(request, False)


async def _set_draining(request: web.Request, draining: bool) -> web.Response:
    server_id = request.match_info["server_id"]
    state = state_of(request)
    before = state.registry.get(server_id)
    if before is None:
        raise ApiError(404, "server_not_found", f"no server with id {server_id!r}")
    was = before.state.draining
    with changing():
        server = await state.control.set_draining(server_id, draining)
    if server is None:
        raise ApiError(404, "server_not_found", f"no server with id {server_id!r}")
    if was != draining:
        action = "drain" if draining else "undrain"
        audit(request, action, server_id, f"draining {_yes(was)} -> {_yes(draining)}", old=was, new=draining)
    return web.json_response(server_json(server, state_of(request).balancer))


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


@routes.put("/v1/servers/{server_id}/capacity")
async def set_capacity(request: web.Request) -> web.Response:
    """`{"capacity": N}`: the server's weight and the load it takes at once, changed live. In static
    mode only the clients the new weight implies move (to it when it grows, away when it shrinks)."""
    state = state_of(request)
    server_id = request.match_info["server_id"]
    payload = await read_json(request)
    capacity = payload.get("capacity") if isinstance(payload, dict) else None
    if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= MAX_CAPACITY:
        message = f"field 'capacity' must be a positive integer (1..{MAX_CAPACITY}); got {capacity!r}"
        raise ApiError(422, "invalid_server", message, "capacity")
    if state.registry.get(server_id) is None:
        raise ApiError(404, "server_not_found", f"no server with id {server_id!r}")
    with changing():
        changed = await state.control.set_capacity(server_id, capacity)
    if changed is None:
        raise ApiError(404, "server_not_found", f"no server with id {server_id!r}")
    server, previous = changed
    if previous != capacity:
        audit(request, "capacity", server_id, f"capacity {previous} -> {capacity}", old=previous, new=capacity)
    return web.json_response({**server_json(server, state.balancer), "previous_capacity": previous})


@local_routes.post("/v1/servers/{server_id}/check")
async def check(request: web.Request) -> web.Response:
    """Probe a server now (ending its cooldown's wait); the result counts like a scheduled check's."""
    state = state_of(request)
    server_id = request.match_info["server_id"]
    server = state.registry.get(server_id)
    if server is None:
        raise ApiError(404, "server_not_found", f"no server with id {server_id!r}")
    before = server.state.health.value
    passed, detail, cooldown_ended = await state.reloader.checker.check_now(server)
    after = server.state.health.value
    ended = "; cooldown ended" if cooldown_ended else ""
    audit(request, "check", server_id, f"{detail}, health {before} -> {after}{ended}", passed=passed, detail=detail)
    body = {"server": server_id, "passed": passed, "detail": detail, "cooldown_ended": cooldown_ended}
    return web.json_response(
        {**body, "health": {"before": before, "after": after}, "state": server_json(server, state.balancer)}
    )


@routes.put("/v1/mode")
async def put_mode(request: web.Request) -> web.Response:
    """`{"mode": "static"|"dynamic"}` switches at run time (the choice then outlives the config's mode);
    `{"from_config": true}` gives the choice back to the config file."""
    payload = await read_json(request)
    state = state_of(request)
    balancer = state.balancer
    previous = balancer.mode
    asked: Mode | None = None
    if not (isinstance(payload, dict) and payload.get("from_config") is True and "mode" not in payload):
        value = payload.get("mode") if isinstance(payload, dict) else None
        if value not in MODES:
            allowed = f'one of {", ".join(MODES)}, or {{"from_config": true}} alone'
            raise ApiError(422, "invalid_mode", f"field 'mode' must be {allowed}; got {value!r}", "mode")
        asked = cast(Mode, value)
    with changing():
        mode = await state.control.set_mode(asked)
    change = f"{previous} -> {mode}" + (" (the config's mode again)" if asked is None else "")
    audit(request, "mode", "", change, old=previous, new=mode)
    from_config = not state.reloader.mode_overridden
    return web.json_response(
        {"mode": mode, "previous": previous, "config_mode": state.config.mode, "from_config": from_config}
    )


@local_routes.delete("/v1/sessions/{client_id}")
async def clear_session(request: web.Request) -> web.Response:
    client_id = request.match_info["client_id"]
    state = state_of(request)
    if not state.sessions.remove(client_id):
        raise ApiError(404, "session_not_found", f"no session for client {client_id!r}")
    if state.cluster is not None:
        with changing():
            await state.cluster.forget([client_id])
    audit(request, "sessions_clear", f"client {client_id}", "session forgotten", client_id=client_id)
    return web.json_response({"cleared": client_id})


@local_routes.delete("/v1/sessions")
async def clear_server_sessions(request: web.Request) -> web.Response:
    server_id = request.query.get("server")
    if not server_id:
        raise ApiError(400, "bad_query", "query parameter 'server' is required (or DELETE /v1/sessions/{client_id})")
    state = state_of(request)
    clients = [client for client, session in state.sessions.items(time.monotonic()) if session.server_id == server_id]
    cleared = state.sessions.remove_server(server_id)
    if state.cluster is not None:
        with changing():
            await state.cluster.forget(clients)
    audit(
        request,
        "sessions_clear",
        f"server {server_id}",
        f"{cleared} sessions forgotten",
        server=server_id,
        cleared=cleared,
    )
    return web.json_response({"cleared": cleared, "server": server_id})


@routes.post("/v1/reload")
async def reload_config(request: web.Request) -> web.Response:
    """Re-read the config file and apply it live; an invalid one changes nothing (422, its message)."""
    try:
        return web.json_response(await state_of(request).reloader.reload(who(request)))
    except ReloadError as exc:
        raise ApiError(exc.status, exc.code, str(exc)) from None
