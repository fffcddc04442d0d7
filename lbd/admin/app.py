"""The admin API: versioned JSON under /v1, served on the Unix socket (and, with a token, on TCP).

This module only assembles it: the shared pieces are in common.py, the reading endpoints in
reads.py, the changing ones in mutations.py, the JSON shapes in views.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client.registry import CollectorRegistry

from lbd.admin import mutations, reads
from lbd.admin.common import ADMIN_STATE, AdminState, error_envelope
from lbd.metrics import add_metrics_route, metrics_registry


def collectors_of(state: AdminState) -> CollectorRegistry:
    """The metrics of what the admin API sees: the same on the admin socket and on `metrics_listen`."""
    return metrics_registry(
        state.registry,
        state.balancer,
        state.sessions,
        state.proxy,
        state.reloader.stats,
        state.audit,
        state.cluster,
        state.reloader.tls,
    )


AppFactory = Callable[[AdminState, tuple[Any, ...]], web.Application]


def create_admin_app(state: AdminState, middlewares: tuple[Any, ...] = ()) -> web.Application:
    """The /v1 API; the TCP listener adds its token check in front through `middlewares`."""
    app = web.Application(middlewares=[error_envelope, *middlewares], client_max_size=4 * 1024 * 1024)
    app[ADMIN_STATE] = state
    reads.load_openapi(app)
    add_metrics_route(app, collectors_of(state))
    app.add_routes(reads.routes)
    app.add_routes(reads.traffic_routes)
    app.add_routes(mutations.routes)
    app.add_routes(mutations.local_routes)
    return app
