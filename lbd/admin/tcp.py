"""The optional admin TCP listener (`--admin-listen`): the /v1 API plus the seed's `POST /register`
and `POST /deregister`, every request authenticated with `Authorization: Bearer <admin_token>`.

It is never the proxy port, and it never runs without a token (config validation refuses that).
"""

from __future__ import annotations

import hmac

from aiohttp import web

from lbd.admin.app import AppFactory, create_admin_app
from lbd.admin.common import AdminState, ApiError, Handler, api_error, read_json, state_of
from lbd.admin.mutations import register, remove_server


def bearer_token_required(state: AdminState) -> object:
    """The token in effect (a reload may rotate it), compared in constant time: no timing oracle."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        token = state.config.admin_token
        presented = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if token is None or not hmac.compare_digest(presented, f"Bearer {token}".encode()):
            response = api_error(401, "unauthorized", "missing or wrong 'Authorization: Bearer <token>'")
            response.headers["WWW-Authenticate"] = 'Bearer realm="lbd"'
            return response
        return await handler(request)

    return check


async def seed_deregister(request: web.Request) -> web.Response:
    """The seed's `{id, url, region}` body; url and region, when given, must match the server."""
    payload = await read_json(request)
    if not isinstance(payload, dict) or not isinstance(payload.get("id"), str):
        raise ApiError(422, "invalid_server", "field 'id' (a string) is required", "id")
    server = state_of(request).registry.get(payload["id"])
    if server is None:
        raise ApiError(404, "server_not_found", f"no server with id {payload['id']!r}")
    for key, actual in (("url", server.spec.url), ("region", server.spec.region)):
        if key in payload and payload[key] != actual:
            raise ApiError(409, "conflict", f"server {server.id!r} has {key} {actual!r}, not {payload[key]!r}", key)
    return await remove_server(request, server.id, wait=True)


def create_tcp_admin_app(state: AdminState, make_app: AppFactory = create_admin_app) -> web.Application:
    """The admin API (`make_app`'s: a supervisor's differs) behind the token, plus the seed's routes."""
    app = make_app(state, (bearer_token_required(state),))
    app.router.add_post("/register", register)
    app.router.add_post("/deregister", seed_deregister)
    return app
