"""Admin endpoints that only read: status, servers, routes, sessions, config, the API's description.

They read registry snapshots, the session table and the proxy's counters; nothing here changes state.
`traffic_routes` answer from this process's proxy; with several workers the supervisor answers
those paths by asking its workers (lbd/workers/admin.py), and `routes` from its own state.
"""

from __future__ import annotations

import dataclasses
import heapq
import os
import time
from collections import Counter
from importlib import resources
from typing import Any

from aiohttp import web

from lbd import __version__
from lbd.admin.common import AdminState, ApiError, dumps, state_of
from lbd.admin.views import route_json, server_json, servers_summary
from lbd.balancer import BadRoute, NoServer
from lbd.config import config_to_mapping
from lbd.proxy.context import STATUS_CLASSES
from lbd.sessions import last_use

routes = web.RouteTableDef()  # what the config and the control plane say
traffic_routes = web.RouteTableDef()  # what this process's proxy saw (a supervisor sums its workers')
OPENAPI = web.AppKey("openapi", bytes)


def load_openapi(app: web.Application) -> None:
    app[OPENAPI] = resources.files("lbd.admin").joinpath("openapi.json").read_bytes()


@traffic_routes.get("/v1/status")
async def get_status(request: web.Request) -> web.Response:
    return web.json_response(status_json(state_of(request)), dumps=dumps)


def status_json(state: AdminState) -> dict[str, Any]:
    """`GET /v1/status` of this process (a supervisor replaces the traffic parts with its workers')."""
    proxy = state.proxy
    uptime = round(time.monotonic() - state.started_at, 3)
    body: dict[str, Any] = {
        "mode": state.balancer.mode,
        "config_mode": state.config.mode,
        "mode_from_config": not state.reloader.mode_overridden,
        "version": __version__,
        "pid": os.getpid(),
        "uptime_s": uptime,
        "listeners": state.listeners,
        "state_dir": str(state.config.state_dir),
        "servers": servers_summary(state.registry.servers()),
        "clients": {"connections": len(proxy.connections), "rejected": dict(proxy.rejections)},
        "requests": {
            "total": proxy.requests_total,
            "responses": dict(zip(STATUS_CLASSES, proxy.responses.counts(), strict=True)),
            "retries": proxy.retries,
            "failovers": proxy.failovers,
        },
        "sessions": {"total": len(state.sessions)},
        "workers": [
            {
                "index": 0,
                "pid": os.getpid(),
                "state": "serving",
                "requests": proxy.requests_total,
                "connections": len(proxy.connections),
                "uptime_s": uptime,
                "restarts": 0,
            }
        ],
        "cluster": None if state.cluster is None else _cluster_status(state.cluster.status()),
        "reload": {"config_file": _optional_str(state.reloader.source.path), **state.reloader.stats.to_json()},
    }
    tls = state.reloader.tls
    if tls is not None:
        body["tls"] = {"listen": state.listeners.get("tls"), **tls.to_json()}
    return body


def _cluster_status(status: dict[str, Any]) -> dict[str, Any]:
    """What `/v1/status` shows of the cluster: the essentials (`/v1/cluster` has everything)."""
    return {key: status[key] for key in ("name", "instance", "store", "peers")}


@routes.get("/v1/cluster")
async def get_cluster(request: web.Request) -> web.Response:
    """`lbctl cluster`: the cluster's name, this instance, the store's health and URL (never its
    password), the version of the last change applied here, and the live instances."""
    cluster = state_of(request).cluster
    if cluster is None:
        raise ApiError(404, "not_found", "lbd is not part of a cluster (start it with --cluster URL)")
    return web.json_response(cluster.status(), dumps=dumps)


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)


@traffic_routes.get("/v1/servers")
async def list_servers(request: web.Request) -> web.Response:
    state = state_of(request)
    servers = [server_json(server, state.balancer) for server in state.registry.servers()]
    return web.json_response({"servers": servers}, dumps=dumps)


@traffic_routes.get("/v1/servers/{server_id}")
async def get_server(request: web.Request) -> web.Response:
    server_id = request.match_info["server_id"]
    server = state_of(request).registry.get(server_id)
    if server is None:
        raise ApiError(404, "server_not_found", f"no server with id {server_id!r}")
    return web.json_response(server_json(server, state_of(request).balancer), dumps=dumps)


@traffic_routes.get("/v1/route/{client_id}")
async def explain_route(request: web.Request) -> web.Response:
    """`lbctl route`: the balancer's decision for a client, with candidates; changes nothing."""
    state = state_of(request)
    try:
        decision = state.balancer.explain(
            request.match_info["client_id"], request.query.get("region"), time.monotonic()
        )
    except BadRoute as exc:
        raise ApiError(400, "bad_route", str(exc), "region") from None
    except NoServer as exc:
        raise ApiError(503, "no_server", str(exc)) from None
    return web.json_response(route_json(decision, state.balancer), dumps=dumps)


@routes.get("/v1/config")
async def get_config(request: web.Request) -> web.Response:
    """The configuration in effect: the file and flags as loaded, with the mode as switched since."""
    state = state_of(request)
    effective = dataclasses.replace(state.config, mode=state.balancer.mode)
    return web.json_response(config_to_mapping(effective), dumps=dumps)


@routes.get("/v1/openapi.json")
async def get_openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3 description of this API, as kept in lbd/admin/openapi.json."""
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


@routes.get("/v1/regions")
async def list_regions(request: web.Request) -> web.Response:
    """Every region lbd knows, once: where servers may be placed (those with a latency) and which
    client regions fall back through which (those with a proximity order); client-only ones marked."""
    state = state_of(request)
    regions = state.config.regions
    servers = Counter(server.spec.region for server in state.registry.servers())
    rows = [
        {
            "region": name,
            "latency_ms": regions.latency_ms.get(name),
            "proximity": list(regions.proximity[name]) if name in regions.proximity else None,
            "servers": servers.get(name, 0),
            "client_only": name not in regions.latency_ms,
        }
        for name in sorted({*regions.latency_ms, *regions.proximity})
    ]
    return web.json_response({"regions": rows})


@routes.get("/v1/mode")
async def get_mode(request: web.Request) -> web.Response:
    state = state_of(request)
    return web.json_response(
        {
            "mode": state.balancer.mode,
            "config_mode": state.config.mode,
            "from_config": not state.reloader.mode_overridden,
        }
    )


@traffic_routes.get("/v1/sessions")
async def list_sessions(request: web.Request) -> web.Response:
    state = state_of(request)
    server_filter = request.query.get("server")
    region_filter = request.query.get("region")
    try:
        limit = int(request.query.get("limit", "1000"))
    except ValueError:
        raise ApiError(400, "bad_query", "query parameter 'limit' must be an integer") from None
    if server_filter and state.registry.get(server_filter) is None:
        raise ApiError(404, "server_not_found", f"no server with id {server_filter!r} (query parameter 'server')")
    client_regions = state.config.regions.proximity
    if region_filter and region_filter not in client_regions:
        known = ", ".join(sorted(client_regions))
        raise ApiError(
            400, "bad_query", f"query parameter 'region': {region_filter!r} is not a client region; known: {known}"
        )
    now = time.monotonic()
    idle_timeout = state.sessions.idle_timeout_s
    matching = [
        (client_id, session)
        for client_id, session in state.sessions.items(now)
        if (not server_filter or session.server_id == server_filter)
        and (not region_filter or session.region == region_filter)
    ]
    matched = len(matching)
    rows: list[dict[str, object]] = []
    # most recently active first: by last use, since the table keeps that order only to within 1/64
    # of the idle timeout (lbd/sessions.py)
    for client_id, session in heapq.nlargest(limit, reversed(matching), key=last_use):  # ties: later first
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


@traffic_routes.get("/v1/sessions/summary")
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
