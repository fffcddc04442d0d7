"""The supervisor's admin API: the same API as a single lbd's, answered from its workers.

What the control plane holds (config, mode, regions, the cluster) and every change (register,
deregister, drain, capacity, mode, reload) are the single lbd's handlers over the supervisor's own
state (lbd/admin/reads.py `routes`, lbd/admin/mutations.py `routes`); what the proxy saw (status
counts, servers' traffic and health, routes, sessions, metrics) and what acts on a proxy (a check
now, sessions cleared) ask every worker and merge the answers (merge.py).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from lbd.admin import mutations, reads
from lbd.admin.app import collectors_of
from lbd.admin.common import ADMIN_STATE, AdminState, ApiError, audit, dumps, error_envelope, state_of
from lbd.workers import merge
from lbd.workers.processes import WorkerProcess, Workers

WORKERS = web.AppKey("workers", Workers)
routes = web.RouteTableDef()


def create_supervisor_app(state: AdminState, workers: Workers, middlewares: tuple[Any, ...] = ()) -> web.Application:
    app = web.Application(middlewares=[error_envelope, *middlewares], client_max_size=4 * 1024 * 1024)
    app[ADMIN_STATE] = state
    app[WORKERS] = workers
    reads.load_openapi(app)
    app.add_routes(reads.routes)
    app.add_routes(mutations.routes)
    app.add_routes(routes)
    return app


def create_supervisor_metrics_app(state: AdminState, workers: Workers) -> web.Application:
    """`metrics_listen` on a supervisor: `GET /metrics`, merged, and nothing else."""
    app = web.Application()
    app[ADMIN_STATE] = state
    app[WORKERS] = workers
    app.router.add_get("/metrics", get_metrics)
    return app


async def _each(request: web.Request, path: str, method: str = "GET") -> list[tuple[WorkerProcess, int, Any]]:
    """Every serving worker's answer; 503 when none answers (all of them starting again)."""
    workers = request.app[WORKERS]
    answers = await workers.each(method, path)
    if not answers:
        raise ApiError(503, "no_worker", f"no worker answers right now ({len(workers.members)} starting); try again")
    return answers


def _ok(answers: list[tuple[WorkerProcess, int, Any]]) -> list[Any]:
    """The bodies, or the first worker's error as it is (every worker checks a request the same way)."""
    for _, status, body in answers:
        if status != 200:
            error = body.get("error", {}) if isinstance(body, dict) else {}
            message = error.get("message", str(body))
            raise ApiError(status, error.get("code", "worker_error"), message, error.get("field"))
    return [body for _, _, body in answers]


def _path(request: web.Request) -> str:
    return request.raw_path  # as sent, query string included: each worker parses it as a single lbd would


@routes.get("/v1/status")
async def get_status(request: web.Request) -> web.Response:
    """The supervisor's status with its workers' traffic; it answers while no worker does (all of
    them starting again): then nothing is in rotation and the workers say so."""
    state = state_of(request)
    workers = request.app[WORKERS]
    body = reads.status_json(state)
    answers = [(w, s) for w, code, s in await workers.each("GET", "/v1/status") if code == 200]
    servers_answers = [s["servers"] for _, code, s in await workers.each("GET", "/v1/servers") if code == 200]
    if servers_answers:
        body["servers"] = merge.servers_summary(merge.merge_servers(servers_answers))
    else:
        body["servers"] = {**body["servers"], "in_rotation": 0, "by_health": {}}
    for part in ("clients", "requests", "sessions"):
        body[part] = merge.sum_counts([_zeros(body[part]), *(status[part] for _, status in answers)])
    body["workers"] = workers_json(workers, {worker.index: status for worker, status in answers})
    return web.json_response(body, dumps=dumps)


def _zeros(part: dict[str, Any]) -> dict[str, Any]:
    """A part of the status with every count 0: its shape when no worker answers."""
    return {key: (_zeros(value) if isinstance(value, dict) else 0) for key, value in part.items()}


def workers_json(workers: Workers, statuses: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for worker in workers.members:
        status = statuses.get(worker.index, {})
        rows.append(
            {
                "index": worker.index,
                "pid": worker.pid,
                "state": worker.state,
                "requests": status.get("requests", {}).get("total", 0),
                "connections": status.get("clients", {}).get("connections", 0),
                "uptime_s": worker.uptime_s(),
                "restarts": worker.restarts,
            }
        )
    return rows


@routes.get("/v1/servers")
async def list_servers(request: web.Request) -> web.Response:
    servers = merge.merge_servers([body["servers"] for body in _ok(await _each(request, "/v1/servers"))])
    return web.json_response({"servers": servers}, dumps=dumps)


@routes.get("/v1/servers/{server_id}")
async def get_server(request: web.Request) -> web.Response:
    views = _ok(await _each(request, _path(request)))
    return web.json_response(merge.merge_server(views), dumps=dumps)


@routes.get("/v1/route/{client_id}")
async def explain_route(request: web.Request) -> web.Response:
    """One worker's decision: each decides alike from the same servers (and, with --cluster, the
    same sessions); their loads differ, so a dynamic pick for a new client may differ by worker."""
    return web.json_response(_ok((await _each(request, _path(request)))[:1])[0], dumps=dumps)


@routes.get("/v1/sessions")
async def list_sessions(request: web.Request) -> web.Response:
    try:
        limit = int(request.query.get("limit", "1000"))
    except ValueError:
        raise ApiError(400, "bad_query", "query parameter 'limit' must be an integer") from None
    answers = _ok(await _each(request, _path(request)))
    return web.json_response(merge.merge_sessions(answers, limit), dumps=dumps)


@routes.get("/v1/sessions/summary")
async def sessions_summary(request: web.Request) -> web.Response:
    answers = _ok(await _each(request, "/v1/sessions/summary"))
    return web.json_response(merge.sum_counts(answers), dumps=dumps)


@routes.post("/v1/servers/{server_id}/check")
async def check(request: web.Request) -> web.Response:
    """Every worker probes the server now (each keeps its own health); passed when all passed."""
    server_id = request.match_info["server_id"]
    answers = _ok(await _each(request, f"/v1/servers/{quote(server_id, safe='')}/check", "POST"))
    failed = [answer for answer in answers if not answer["passed"]]
    first = failed[0] if failed else answers[0]
    before = merge.worst_health(answer["health"]["before"] for answer in answers)
    after = merge.worst_health(answer["health"]["after"] for answer in answers)
    ended = any(answer["cooldown_ended"] for answer in answers)
    detail = first["detail"] + (f" ({len(failed)} of {len(answers)} workers)" if failed else "")
    note = "; cooldown ended" if ended else ""
    audit(request, "check", server_id, f"{detail}, health {before} -> {after}{note}", passed=not failed, detail=detail)
    return web.json_response(
        {
            "server": server_id,
            "passed": not failed,
            "detail": detail,
            "cooldown_ended": ended,
            "health": {"before": before, "after": after},
            "state": merge.merge_server([answer["state"] for answer in answers]),
        },
        dumps=dumps,
    )


@routes.delete("/v1/sessions/{client_id}")
async def clear_session(request: web.Request) -> web.Response:
    client_id = request.match_info["client_id"]
    answers = await _each(request, _path(request), "DELETE")
    if not any(status == 200 for _, status, _ in answers):
        _ok(answers)  # every worker's 404: no session anywhere
    audit(request, "sessions_clear", f"client {client_id}", "session forgotten", client_id=client_id)
    return web.json_response({"cleared": client_id})


@routes.delete("/v1/sessions")
async def clear_server_sessions(request: web.Request) -> web.Response:
    answers = _ok(await _each(request, _path(request), "DELETE"))
    server_id = answers[0]["server"]
    cleared = sum(answer["cleared"] for answer in answers)
    change = f"{cleared} sessions forgotten"
    audit(request, "sessions_clear", f"server {server_id}", change, server=server_id, cleared=cleared)
    return web.json_response({"cleared": cleared, "server": server_id})


@routes.get("/metrics")
async def get_metrics(request: web.Request) -> web.Response:
    """The supervisor's control-plane figures, its workers' traffic summed, and per-worker series."""
    state = state_of(request)
    workers = request.app[WORKERS]
    answers = await workers.each("GET", "/metrics")
    texts = {worker.index: text for worker, status, text in answers if status == 200 and isinstance(text, str)}
    own = generate_latest(collectors_of(state)).decode()
    families = merge.merge_metrics(own, list(texts.values()), per_worker_families(workers, texts))
    registry = CollectorRegistry()
    registry.register(_Fixed(families))
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


def per_worker_families(workers: Workers, texts: dict[int, str]) -> list[Metric]:
    up = GaugeMetricFamily("lbd_worker_up", "1 while the worker serves.", labels=["worker"])
    restarts = CounterMetricFamily("lbd_worker_restarts", "Times the worker was started again.", labels=["worker"])
    uptime = GaugeMetricFamily("lbd_worker_uptime_seconds", "Since the worker last started.", labels=["worker"])
    requests = CounterMetricFamily("lbd_worker_requests", "Requests the worker received.", labels=["worker"])
    for worker in workers.members:
        label = [str(worker.index)]
        up.add_metric(label, 1.0 if worker.state == "serving" else 0.0)
        restarts.add_metric(label, worker.restarts)
        uptime.add_metric(label, worker.uptime_s())
        requests.add_metric(label, merge.requests_total(texts.get(worker.index, "")))
    configured = GaugeMetricFamily("lbd_workers", "Worker processes configured.", value=len(workers.members))
    return [configured, up, restarts, uptime, requests]


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families
