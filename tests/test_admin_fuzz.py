"""The admin API under hostile input: its OpenAPI description matches the routes lbd registers, and
garbage thrown at every endpoint of one real lbd (over the Unix socket, and over the TCP listener
with and without the token) never gets a 5xx or anything but the error envelope with a stable code;
lbd still answers and proxies afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from aiohttp import web
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lbd.admin.app import create_admin_app
from lbd.admin.common import AdminState
from lbd.admin.tcp import create_tcp_admin_app
from lbd.balancer import Balancer
from lbd.config import Config, ConfigSource
from lbd.control import Changes, LocalControl
from lbd.health.active import HealthChecker
from lbd.proxy.context import ProxyContext
from lbd.registry import Registry
from lbd.reload import Reloader
from lbd.sessions import SessionTable
from lbd.workers.admin import create_supervisor_app
from lbd.workers.processes import Workers
from tests.harness.backends import backends
from tests.harness.daemon import Lbd, short_tempdir

SPEC_PATH = Path(__file__).resolve().parent.parent / "lbd" / "admin" / "openapi.json"
SPEC: dict[str, Any] = json.loads(SPEC_PATH.read_text())
HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
OPERATIONS = sorted(
    (method.upper(), path) for path, item in SPEC["paths"].items() for method in item if method in HTTP_METHODS
)
ERROR_CODES = frozenset(SPEC["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"])
TOKEN = "fuzz-token-0123456789abcdef"
BACKEND_ID = "fuzz-backend-7f3a"  # no generated id names it, so the garbage never removes it
MAX_BODY = 4 * 1024 * 1024
FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- the description and the routes ----------------------------------------------------------


def admin_state(loop: asyncio.AbstractEventLoop) -> AdminState:
    """A single lbd's admin state with nothing running: enough to build its apps."""
    config = Config()
    registry = Registry(config.regions.latency_ms)
    sessions = SessionTable(1, 1)
    balancer = Balancer(registry, "static", config.regions, sessions)
    proxy = ProxyContext(loop, registry, balancer, config)
    checker = HealthChecker(registry, config.health)
    reloader = Reloader(
        ConfigSource(None), config, [], registry=registry, balancer=balancer, sessions=sessions, proxy=proxy,
        checker=checker,
    )  # fmt: skip
    control = LocalControl(Changes(registry, balancer, sessions, proxy.pool), lambda: None, reloader.use_config_mode)
    return AdminState(reloader, registry, balancer, sessions, proxy, {}, 0.0, control)


def registered_routes() -> set[tuple[str, str]]:
    """(method, path template) of every route the socket and TCP admin apps register (HEAD is implied by GET)."""
    loop = asyncio.new_event_loop()
    try:
        state = admin_state(loop)
        return routes_of(create_admin_app(state), create_tcp_admin_app(state))
    finally:
        loop.close()


def routes_of(*apps: web.Application) -> set[tuple[str, str]]:
    return {
        (route.method, route.resource.canonical)
        for app in apps
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }


def test_a_supervisor_answers_every_route_a_single_lbd_does() -> None:
    """`lbd start --workers N` serves the same API (lbd/workers/admin.py merges the workers' answers)."""
    loop = asyncio.new_event_loop()
    try:
        state = admin_state(loop)
        workers = Workers([], lambda index: None, lambda worker: None)  # type: ignore[arg-type,return-value]
        single = routes_of(create_admin_app(state), create_tcp_admin_app(state))
        supervised = create_tcp_admin_app(state, lambda s, m: create_supervisor_app(s, workers, m))
        assert routes_of(create_supervisor_app(state, workers), supervised) == single
    finally:
        loop.close()


def test_the_openapi_description_lists_exactly_the_registered_routes() -> None:
    assert set(OPERATIONS) == registered_routes()
    for path, item in SPEC["paths"].items():
        templated = {segment[1:-1] for segment in path.split("/") if segment.startswith("{")}
        for method, operation in ((m, o) for m, o in item.items() if m in HTTP_METHODS):
            parameters = [*item.get("parameters", []), *operation.get("parameters", [])]
            assert {p["name"] for p in parameters if p["in"] == "path"} == templated, (method, path)
            errors = [status for status in operation["responses"] if status >= "400"]
            assert errors, (method, path)
            for status in errors:  # every error is the envelope
                assert operation["responses"][status] == {"$ref": "#/components/responses/Error"}, (method, path)


# --- a real lbd, and requests sent byte for byte ---------------------------------------------


@dataclass
class Answer:
    status: int
    content_type: str
    body: bytes


@pytest.fixture(scope="module")
def lbd() -> Iterator[Lbd]:
    """One lbd for every fuzz group: a backend, a config file (so reload really reloads), a TCP admin listener."""
    workdir = short_tempdir()
    with backends(BACKEND_ID) as (backend,):
        (workdir / "servers.json").write_text(json.dumps([backend.entry(capacity=100)]))
        (workdir / "lbd.toml").write_text(
            f'servers = "servers.json"\nadmin_token = "{TOKEN}"\ndefault_client_region = "us-east"\n'
            "drain_grace_ms = 200\n"
        )
        daemon = Lbd(workdir, ["--config", str(workdir / "lbd.toml"), "--admin-listen", "127.0.0.1:0"])
        try:
            yield daemon.start()
            assert "unexpected error" not in daemon.log()  # no 500 from lbd's own code (aiohttp logs parse errors)
            assert daemon.process is not None and daemon.process.poll() is None
        finally:
            daemon.stop()


def exchange(address: str | tuple[str, int], raw: bytes, method: str, *, half_close: bool = False) -> Answer:
    """Send `raw` as is and read one response. lbd may answer and close before reading a large body
    (413): the answer is still read, as a client would after its write failed. `half_close` says
    "nothing more is coming", so a parser waiting for the rest of a broken request gives up at once."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(15)
        sock.connect(address)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(raw)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        response = http.client.HTTPResponse(sock, method=method)
        response.begin()
        return Answer(response.status, response.getheader("Content-Type") or "", response.read())


def request_bytes(method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: lbd", "Connection: close", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def assert_envelope(answer: Answer, method: str, where: str) -> None:
    """Never a 5xx; every error is `{"error": {"code", "message"}}` with a documented code and a one-line message."""
    assert answer.status < 500, (where, answer.status, answer.body[:300])
    if answer.status < 400 or method == "HEAD":
        return
    assert answer.content_type.startswith("application/json"), (where, answer.status, answer.body[:300])
    error = json.loads(answer.body)["error"]
    assert error["code"] in ERROR_CODES, (where, error)
    assert isinstance(error["message"], str) and error["message"] and "\n" not in error["message"], (where, error)


def assert_still_serving(lbd: Lbd) -> None:
    assert lbd.get("/v1/status")["servers"]["total"] >= 1
    status, backend, _ = lbd.proxy_get("/echo", "after-the-fuzz", "us-east")
    assert (status, backend) == (200, BACKEND_ID)


# --- what garbage looks like ------------------------------------------------------------------

NASTY_SEGMENTS = ["..", "../..", "%00", "\x00", "%2e%2e", "/", "a/b", "%", "%zz", "?x=1", "#f", " ", "\u00e9",
                  "\U0001f600", "\ud800", "x" * 3000, BACKEND_ID + "x"]  # fmt: skip
short_segments = st.text(max_size=40) | st.sampled_from(NASTY_SEGMENTS)
segments = short_segments | st.text(min_size=200, max_size=600)
MAX_TARGET = 8000  # aiohttp's parser refuses request lines over 8190 bytes itself (see the last group)
# percent-encoded (one segment), or with '/', '.' and '%' left raw so traversal and bad escapes reach lbd
encodings = st.sampled_from(
    [lambda s: quote(s, safe="", errors="surrogatepass"), lambda s: quote(s, safe="/.%", errors="surrogatepass")]
)
# every method llhttp parses (an unknown one, like CONNECT to a path, is a parse error: see the last group)
methods = st.sampled_from(
    ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "PROPFIND", "MKCOL", "COPY", "MOVE",
     "LOCK", "PURGE", "REPORT", "SEARCH", "LINK", "UNLINK", "QUERY"]
)  # fmt: skip
query_values = st.one_of(st.text(max_size=30), st.integers().map(str), st.just("9" * 5000), st.just("-1"))
queries = st.one_of(
    st.dictionaries(
        st.sampled_from(["now", "server", "region", "limit"]) | st.text(max_size=8), query_values, max_size=4
    ).map(urlencode),
    st.text(max_size=60).map(lambda q: quote(q, safe="=&%")),
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=10**30, max_value=10**60),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
)  # fmt: skip
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
near_valid = {  # close to a real registration or mode switch, so validation is reached field by field
    "id": st.sampled_from(["x", "", "-bad", "a" * 65, "ok.id:1"]) | json_values,
    "url": st.sampled_from(["http://127.0.0.1:1", "ftp://h", "http://h/p", "http://[::1", "http://h:0"]) | json_values,
    "hostname": st.sampled_from(["127.0.0.1", ""]) | json_values,
    "port": st.sampled_from([1, 0, 65536, -1, True]) | json_values,
    "region": st.sampled_from(["us-east", "mars", ""]) | json_values,
    "capacity": st.sampled_from([1, 0, -1, 10**7, 1.5, "2"]) | json_values,
    "mode": st.sampled_from(["static", "dynamic", "STATIC", ""]) | json_values,
    "extra": json_values,
}
objects = st.fixed_dictionaries({}, optional=near_valid)
json_bodies = st.one_of(json_values, objects, st.lists(objects, max_size=3)).map(
    lambda value: json.dumps(value).encode()
)
raw_bodies = st.one_of(
    st.binary(max_size=2000),
    st.sampled_from([b"", b"{", b"[" * 100_000, b'{"a":' * 50_000, b"\xff\xfe{}", b"1" * 10_000, b"NaN", b"nul"]),
)
content_types = st.sampled_from(
    ["application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
     "application/json; charset=latin-1", "", "\u00e9/\u00e9".encode().decode("latin-1")]
)  # fmt: skip


@st.composite
def operation_requests(draw: st.DrawFn) -> tuple[str, str, bytes, dict[str, str]]:
    """A documented operation (sometimes under another method), its path parameters replaced by garbage."""
    method, template = draw(st.sampled_from(OPERATIONS))
    method = draw(st.just(method) | methods)
    encode = draw(encodings)
    path = "/".join(encode(draw(segments)) if part.startswith("{") else part for part in template.split("/"))
    query = draw(queries)
    target = path + (f"?{query}" if query else "")
    assume(len(target) < MAX_TARGET)
    return method, target, draw(json_bodies | raw_bodies), {"Content-Type": draw(content_types)}


@st.composite
def stray_requests(draw: st.DrawFn) -> tuple[str, str, bytes, dict[str, str]]:
    """Paths that are not routes: under /v1 and outside, with any method."""
    prefix = draw(st.sampled_from(["/v1/", "/", "/v2/", "/v1/servers/x/", "//v1/", "/v1/../v1/"]))
    path = prefix + "/".join(
        quote(s, safe="", errors="surrogatepass") for s in draw(st.lists(short_segments, max_size=2))
    )
    return draw(methods), path, draw(json_bodies | raw_bodies), {"Content-Type": draw(content_types)}


# --- the fuzz ---------------------------------------------------------------------------------


def test_garbage_at_every_endpoint_gets_the_envelope_and_never_a_5xx(lbd: Lbd) -> None:
    address = str(lbd.socket)

    @FUZZ
    @given(operation_requests() | stray_requests())
    def check(request: tuple[str, str, bytes, dict[str, str]]) -> None:
        method, target, body, headers = request
        assert_envelope(exchange(address, request_bytes(method, target, body, headers), method), method, target)

    check()
    assert_still_serving(lbd)


def test_known_nasty_bodies_at_every_endpoint(lbd: Lbd) -> None:
    """Bodies that once broke or could break a JSON API, sent to every operation (TCP-only ones too)."""
    oversized = b"[" + b"1," * (MAX_BODY // 2) + b"1]"
    nasty = {  # body: (status, code) where the body is read as JSON
        b"[" * 100_000: (400, "bad_json"),  # deeper than Python's recursion limit
        b'{"mode": ' * 50_000: (400, "bad_json"),
        b"9" * 5000: (400, "bad_json"),  # more digits than Python converts
        b'{"id": "\xff\xfe"}': (400, "bad_json"),  # not UTF-8
        oversized: (413, "too_large"),
    }
    tcp = lbd.get("/v1/status")["listeners"]["admin_tcp"].rsplit(":", 1)
    authorized = {"Authorization": f"Bearer {TOKEN}"}
    for method, template in OPERATIONS:
        target = template.replace("{", "x").replace("}", "")
        reads_json = method in ("POST", "PUT") and target in ("/v1/servers", "/v1/mode", "/register", "/deregister")
        address: str | tuple[str, int] = (
            (tcp[0], int(tcp[1])) if target in ("/register", "/deregister") else str(lbd.socket)
        )
        for body, expected in nasty.items():
            answer = exchange(address, request_bytes(method, target, body, authorized), method)
            assert_envelope(answer, method, target)
            if reads_json:
                assert (answer.status, json.loads(answer.body)["error"]["code"]) == expected, (target, body[:20])
    assert_still_serving(lbd)


def test_the_tcp_listener_refuses_every_request_without_the_right_token(lbd: Lbd) -> None:
    host, port = lbd.get("/v1/status")["listeners"]["admin_tcp"].rsplit(":", 1)
    address = (host, int(port))
    wrong = st.sampled_from(["", "Bearer", f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x", f"bearer {TOKEN}",
                             f"Basic {TOKEN}", "Bearer \u00e9\u00e9", f"Bearer  {TOKEN}", TOKEN])  # fmt: skip

    @FUZZ
    @given(operation_requests() | stray_requests(), wrong)
    def check(request: tuple[str, str, bytes, dict[str, str]], authorization: str) -> None:
        method, target, body, headers = request
        if authorization:
            headers = {**headers, "Authorization": authorization}
        answer = exchange(address, request_bytes(method, target, body, headers), method)
        assert answer.status == 401, (target, authorization, answer.status)
        if method != "HEAD":
            assert json.loads(answer.body)["error"]["code"] == "unauthorized"

    check()
    authorized = {"Authorization": f"Bearer {TOKEN}"}
    answer = exchange(address, request_bytes("GET", "/v1/status", headers=authorized), "GET")
    assert answer.status == 200 and json.loads(answer.body)["listeners"]["admin_tcp"] == f"{host}:{port}"
    answer = exchange(address, request_bytes("POST", "/register", b"[" * 100_000, authorized), "POST")
    assert_envelope(answer, "POST", "/register")
    assert answer.status == 400


def test_bytes_that_are_not_http_are_refused_without_a_5xx(lbd: Lbd) -> None:
    """aiohttp's parser answers these itself (400, plain text, connection closed), before lbd's
    envelope can: what counts is no 5xx and an lbd that lives on."""
    garbage = [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)),  # a TLS hello
        b"GET /v1/status HTTP/9.9\r\n\r\n",
        b"CONNECT /v1/status HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET " + b"/v1/" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20_000 + b"\r\n\r\n",
        b"GET /v1/status HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"POST /v1/servers HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"\x00" * 1000 + b"\r\n\r\n",
    ]
    tokens = st.text(alphabet=string.ascii_letters + "-_!*", min_size=1, max_size=12)
    lines = st.one_of(
        st.binary(max_size=400),
        st.builds(
            lambda method, target: f"{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
            tokens,
            segments.map(lambda s: quote(s, errors="surrogatepass")),
        ),
    )

    def refused_without_5xx(raw: bytes) -> None:
        try:
            answer = exchange(str(lbd.socket), raw, "GET", half_close=True)
        except (http.client.HTTPException, ConnectionResetError):
            return  # closed without an answer: fine, as long as lbd lives on
        assert answer.status < 500, (raw[:60], answer.status, answer.body[:200])

    for raw in garbage:
        refused_without_5xx(raw)
    settings(FUZZ, max_examples=150)(given(lines)(refused_without_5xx))()
    assert_still_serving(lbd)


def test_the_description_is_served(lbd: Lbd) -> None:
    assert lbd.get("/v1/openapi.json") == SPEC
