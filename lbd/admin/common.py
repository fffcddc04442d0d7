"""What every admin handler shares: the state it reads (and changes through), the error envelope
with its stable codes, and reading a request's JSON body.

Every error is `{"error": {"code": ..., "message": ..., "field"?: ...}}`; lbctl maps the codes to exit
codes, so they never change meaning.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from lbd.audit import AuditTrail, peer
from lbd.balancer import Balancer
from lbd.config import Config
from lbd.control import Control
from lbd.metrics import ClusterFigures
from lbd.proxy.context import ProxyContext
from lbd.registry import Registry
from lbd.reload import Reloader
from lbd.sessions import SessionTable

log = logging.getLogger("lbd.admin")


class ClusterView(ClusterFigures, Protocol):
    """What the admin API shows of a cluster (lbd/store/cluster.py)."""

    def status(self) -> dict[str, Any]: ...

    async def forget(self, client_ids: list[str]) -> None: ...


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
    control: Control  # changes to servers and the mode go through it (one instance's, or a cluster's)
    cluster: ClusterView | None = None  # with --cluster: the store's health and the peers

    @property
    def config(self) -> Config:
        """The configuration in effect: a reload replaces it."""
        return self.reloader.config

    @property
    def audit(self) -> AuditTrail:
        return self.reloader.audit


ADMIN_STATE = web.AppKey("admin_state", AdminState)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def state_of(request: web.Request) -> AdminState:
    return request.app[ADMIN_STATE]


def who(request: web.Request) -> str:
    """The operator behind this request, for the audit trail."""
    transport = request.transport
    return peer(None if transport is None else transport.get_extra_info("socket"), request.remote)


def audit(request: web.Request, action: str, subject: str, change: str, **fields: Any) -> None:
    state_of(request).audit.record(who(request), action, subject, change, **fields)


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


async def read_json(request: web.Request) -> Any:
    """The request's JSON body, or an HTTP 400 error envelope naming the parse problem."""
    raw = await request.read()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "bad_json", f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "bad_json", "request body is not usable JSON: nested too deeply") from None


def dumps(value: object) -> str:
    """Compact JSON: lbctl and scripts read it, people read lbctl's rendering."""
    return json.dumps(value, separators=(",", ":"))
