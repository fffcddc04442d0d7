"""The access log on a real lbd with real backends: one line per answered request in both formats
(routed requests with the balancer's reason, lbd's own refusals, upstream failures, retries and a
failover, WebSocket tunnels), the JSON keys against the table in docs/operations.md, rotation by
SIGUSR1 and by `lbctl reload`, live settings, sampling, two processes sharing one file, an unwritable
path or a full filesystem at start (one line, exit 2), and writes failing or stalling while lbd
serves (lines dropped and counted, the proxy unhindered)."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.harness.backends import Backend, backends
from tests.harness.clients import RawConnection, build_request, closed_port
from tests.harness.daemon import Lbd, running_lbd, short_tempdir, wait_until, write_servers
from tests.harness.metrics import scrape, value

ROOT = Path(__file__).resolve().parent.parent
TEXT_KEYS = [
    "status", "bytes_in", "bytes_out", "client_id", "client_region", "server", "server_region", "route",
    "retries", "connect_ms", "ttfb_ms", "duration_ms", "termination",
]  # fmt: skip
NUMBERS = {"status", "bytes_in", "bytes_out", "retries"}
TIMERS = {"connect_ms", "ttfb_ms", "duration_ms"}
LINE = re.compile(r'^(\S+) (\S+) "(\S+) (\S+) (\S+)" (.*)$')


# --- reading the log ------------------------------------------------------------------------------------


def unescape(token: str) -> str:
    return re.sub(r"\\x([0-9a-f]{2})", lambda m: chr(int(m.group(1), 16)), token)


def parse_text(line: str) -> dict[str, Any]:
    """A text line as the JSON object the same entry would be (`-` is null)."""
    match = LINE.match(line)
    assert match, line
    when, client, method, path, protocol, rest = match.groups()
    fields: dict[str, Any] = {"time": when, "client": client}
    for key, token in (("method", method), ("path", path), ("protocol", protocol)):
        fields[key] = None if token == "-" else unescape(token)
    tokens = rest.split(" ")
    assert len(tokens) == len(TEXT_KEYS), line
    for key, token in zip(TEXT_KEYS, tokens, strict=True):
        if token == "-":
            fields[key] = None
        elif key in NUMBERS:
            fields[key] = int(token)
        elif key in TIMERS:
            fields[key] = float(token)
        else:
            fields[key] = unescape(token)
    return fields


def entries(path: Path, log_format: str = "json") -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) if log_format == "json" else parse_text(line) for line in lines]


def logged(path: Path, count: int, log_format: str = "json", timeout: float = 10.0) -> list[dict[str, Any]]:
    """The log's entries once it has `count` of them (lines reach the file within a second)."""
    wait_until(lambda: len(entries(path, log_format)) >= count, timeout)
    found = entries(path, log_format)
    assert len(found) == count, found
    return found


def counters(daemon: Lbd) -> tuple[int, int, int]:
    """lbd_access_log_lines_total and the two lbd_access_log_dropped_total reasons."""
    samples = scrape(daemon)
    return (
        int(value(samples, "lbd_access_log_lines_total")),
        int(value(samples, "lbd_access_log_dropped_total", reason="buffer_full")),
        int(value(samples, "lbd_access_log_dropped_total", reason="write_failed")),
    )


def documented_keys() -> list[str]:
    """The JSON keys in docs/operations.md's access-log field table, in order."""
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("## Access log", 1)[1].split("\n## ", 1)[0]
    table = section.split("**Fields**", 1)[1].split("| key |", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^\| `(\w+)` \|", table, re.MULTILINE)


def raw_exchange(port: int, request: bytes) -> bytes:
    """Every byte lbd answers to `request` (sent with Connection: close) until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


def get(daemon: Lbd, path: str, client: str | None = "alice", region: str | None = None) -> tuple[int, str]:
    status, server, _ = daemon.proxy_get(path, client, region)
    return status, server


def config_file(text: str) -> Path:
    path = short_tempdir() / "lbd.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def trio() -> Iterator[list[Backend]]:
    with backends("s1", "s2", "s3") as started:
        yield started


@contextmanager
def logging_lbd(
    entries_: list[dict[str, Any]] | None, log_format: str = "json", config: str = "", args: tuple[str, ...] = ()
) -> Iterator[tuple[Lbd, Path]]:
    """An lbd whose access log is `access.log` in a directory of its own."""
    directory = short_tempdir()
    log = directory / "access.log"
    command = ["--access-log", str(log), "--access-log-format", log_format, *args]
    if config:
        command += ["--config", str(config_file(config))]
    with running_lbd(command, entries_) as daemon:
        yield daemon, log


# --- routed requests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_routed_requests_in_both_formats(trio: list[Backend], log_format: str) -> None:
    with logging_lbd([b.entry() for b in trio], log_format) as (daemon, log):
        expected = daemon.get("/v1/route/alice")["server"]
        started = time.time()
        answer = raw_exchange(
            daemon.port, build_request("GET", "/echo?x=1", {"client-id": "alice", "Connection": "close"})
        )
        body = os.urandom(1000)
        upload = build_request("POST", "/upload", {"client-id": "bob", "client-region": "eu-west"}, body)
        with RawConnection(daemon.port) as connection:
            connection.send(upload)
            assert connection.read_response().status == 200
            local_port = connection.sock.getsockname()[1]
        first, second = logged(log, 2, log_format)
    assert first["client"].startswith("127.0.0.1:")
    assert (first["method"], first["path"], first["protocol"], first["status"]) == ("GET", "/echo?x=1", "HTTP/1.1", 200)
    assert (first["bytes_in"], first["bytes_out"]) == (0, len(answer))
    assert (first["client_id"], first["client_region"]) == ("alice", None)
    assert (first["server"], first["server_region"], first["route"]) == (expected, "us-east", "hash")
    assert (first["retries"], first["termination"]) == (0, "complete")
    assert 0 <= first["connect_ms"] <= first["ttfb_ms"] <= first["duration_ms"] < 5000
    assert abs(time_of(first["time"]) - started) < 5
    assert second["client"] == f"127.0.0.1:{local_port}"
    assert (second["method"], second["path"], second["bytes_in"]) == ("POST", "/upload", 1000)
    assert (second["client_id"], second["client_region"], second["route"]) == ("bob", "eu-west", "hash")


def time_of(stamp: str) -> float:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp), stamp
    return time.mktime(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone


def test_the_json_keys_are_the_documented_ones(trio: list[Backend]) -> None:
    documented = documented_keys()
    assert len(documented) >= 18, documented
    with logging_lbd([b.entry() for b in trio]) as (daemon, log):
        assert get(daemon, "/echo")[0] == 200
        (entry,) = logged(log, 1)
    assert list(entry) == documented


def test_dynamic_routes_carry_the_balancer_s_reasons(trio: list[Backend]) -> None:
    """`route` says what `lbctl route` says: the client's first pick, its session, a fallback region,
    and a move once its server is drained."""
    with logging_lbd(None, args=("--mode", "dynamic")) as (daemon, log):
        for backend in trio:
            assert daemon.request("POST", "/v1/servers", backend.entry())[0] == 201
        predicted = []
        for client, region in [("ann", "us-east"), ("ann", "us-east"), ("eve", "eu-west")]:
            predicted.append(daemon.get(f"/v1/route/{client}?region={region}")["reason"])
            assert get(daemon, "/echo", client, region)[0] == 200
        pinned = daemon.get("/v1/route/ann?region=us-east")["server"]
        assert daemon.lbctl("drain", pinned).returncode == 0
        assert get(daemon, "/echo", "ann", "us-east")[0] == 200
        routes = [entry["route"] for entry in logged(log, 4)]
    assert predicted == ["best_in_region", "sticky", "fallback_region"]
    assert routes == [*predicted, "moved"]


# --- lbd's own answers ------------------------------------------------------------------------------------

LIMITS = """
[limits]
max_request_line_bytes = 1024
max_header_bytes = 4096
max_headers = 20
max_body_bytes = 10000
header_timeout_ms = 400
max_connections = 8
"""
HEAD = {"client-id": "c"}


def refusal(daemon: Lbd, request: bytes) -> int:
    """Send `request`, read lbd's answer until it closes; its status."""
    answer = raw_exchange(daemon.port, request)
    return int(answer.split(b" ", 2)[1])


def test_every_refusal_of_lbd_is_logged(trio: list[Backend]) -> None:
    """400, 405, 408, 413, 414, 431 and 505, and 503 beyond max_connections: each a line with no
    server, the rejection's reason as termination, and the size of lbd's answer."""
    long_target = "/" + "a" * 2000
    requests = {
        "no_route": (400, build_request("GET", "/echo", {"Connection": "close"})),
        "malformed": (400, b"GET /echo HTTP/1.1\nHost: h\nclient-id: c\n\n"),
        "request_line_too_long": (414, build_request("GET", long_target, HEAD)),
        "too_many_headers": (431, build_request("GET", "/echo", {**HEAD, **{f"x-{i}": "v" for i in range(30)}})),
        "headers_too_large": (431, build_request("GET", "/echo", {**HEAD, "x-big": "v" * 5000})),
        "body_too_large": (413, build_request("POST", "/upload", HEAD, b"x" * 20000)),
        "unsupported": (501, build_request("POST", "/upload", {**HEAD, "Transfer-Encoding": "gzip, chunked"})),
        "http_2": (505, build_request("GET", "/echo", HEAD, version="HTTP/2.0")),
        "connect": (405, build_request("CONNECT", "example.com:443", {**HEAD, "Host": "example.com:443"})),
    }
    with logging_lbd([b.entry() for b in trio], config=LIMITS) as (daemon, log):
        for name, (status, request) in requests.items():
            assert refusal(daemon, request) == status, name
        with RawConnection(daemon.port) as slow:
            slow.send(b"GET /slowloris HTTP/1.1\r\nHost: h\r\n")
            assert slow.read_response().status == 408
        held = [RawConnection(daemon.port) for _ in range(8)]
        try:
            wait_until(lambda: daemon.get("/v1/status")["clients"]["connections"] == 8)
            with RawConnection(daemon.port) as extra:
                assert extra.read_response().status == 503
        finally:
            for connection in held:
                connection.close()
        found = logged(log, len(requests) + 2)
    by_status = [(e["status"], e["termination"]) for e in found]
    assert by_status == [
        (400, "no_route"), (400, "malformed"), (414, "request_line_too_long"), (431, "too_many_headers"),
        (431, "headers_too_large"), (413, "body_too_large"), (501, "unsupported"), (505, "malformed"),
        (405, "malformed"), (408, "header_timeout"), (503, "too_many_connections"),
    ]  # fmt: skip
    for entry in found:
        assert entry["server"] is None and entry["route"] is None and entry["connect_ms"] is None, entry
        assert entry["bytes_out"] > 0 and entry["duration_ms"] >= 0, entry
    by_name = dict(zip(requests, found, strict=False))
    assert by_name["request_line_too_long"]["method"] == "GET"
    assert by_name["request_line_too_long"]["path"].startswith("/aaaa")
    assert by_name["http_2"]["protocol"] == "HTTP/2.0"
    assert (by_name["body_too_large"]["method"], by_name["body_too_large"]["path"]) == ("POST", "/upload")
    assert found[9]["path"] == "/slowloris" and found[9]["duration_ms"] >= 350
    assert found[10]["method"] is None and found[10]["path"] is None and found[10]["client_id"] is None


def test_no_server_and_upstream_failures(trio: list[Backend]) -> None:
    """503 with every server drained; 502 for a refused connection with no backup (the server is
    named); 504 for a silent server; 502 for a malformed response and for a server that closes."""
    listener = socket.create_server(("127.0.0.1", 0))
    junk_port = listener.getsockname()[1]

    def misbehave() -> None:
        with listener:
            for answer in (b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n", b""):
                connection, _ = listener.accept()
                with connection:
                    connection.recv(65536)
                    if answer:
                        connection.sendall(answer)

    threading.Thread(target=misbehave, daemon=True).start()
    slow = trio[1]
    cases = [
        ("refused", {"id": "gone", "url": f"http://127.0.0.1:{closed_port()}", "region": "us-east", "capacity": 5}),
        ("silent", slow.entry()),
        ("junk", {"id": "junk", "url": f"http://127.0.0.1:{junk_port}", "region": "us-east", "capacity": 5}),
    ]
    config = "timeout_base_ms = 300\n"  # plus us-east's 10 ms
    for name, server in cases:
        with logging_lbd([server], config=config) as (daemon, log):
            if name == "refused":
                assert get(daemon, "/echo")[0] == 502
                assert daemon.lbctl("drain", "gone").returncode == 0
                assert get(daemon, "/echo")[0] == 503
                refused, none = logged(log, 2)
                assert (refused["status"], refused["termination"], refused["server"]) == (502, "connect_failed", "gone")
                assert refused["route"] == "hash" and refused["connect_ms"] is None and refused["ttfb_ms"] is None
                assert (none["status"], none["termination"], none["server"]) == (503, "no_server", None)
            elif name == "silent":
                assert get(daemon, "/slow/3000")[0] == 504
                (timed_out,) = logged(log, 1)
                assert (timed_out["status"], timed_out["termination"]) == (504, "server_timeout")
                assert timed_out["server"] == slow.id and timed_out["connect_ms"] is not None
                assert 300 <= timed_out["duration_ms"] < 3000
            else:
                assert get(daemon, "/a")[0] == 502
                status, _, _ = post(daemon, "/b")  # read by the server, then closed: never sent twice
                assert status == 502
                malformed, closed = logged(log, 2)
                assert (malformed["status"], malformed["termination"]) == (502, "bad_response")
                assert (closed["status"], closed["termination"], closed["retries"]) == (502, "server_closed", 0)


def post(daemon: Lbd, path: str, body: bytes = b"data", client: str = "alice") -> tuple[int, str, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    try:
        connection.request("POST", path, body=body, headers={"client-id": client})
        response = connection.getresponse()
        return response.status, response.getheader("X-Backend-Id") or "", response.read()
    finally:
        connection.close()


# --- retries and failover ---------------------------------------------------------------------------------


def test_a_failover_and_a_retry_on_a_fresh_connection(trio: list[Backend]) -> None:
    """A refused connection sends the request to the client's next server (`hash+failover`); a
    pooled connection the server drops on the next request is retried on a new one (`hash+retry`)."""
    dead = {"id": "dead", "url": f"http://127.0.0.1:{closed_port()}", "region": "us-east", "capacity": 10}
    with logging_lbd([dead, trio[0].entry()]) as (daemon, log):
        client = next(c for c in (f"c{i}" for i in range(500)) if daemon.get(f"/v1/route/{c}")["server"] == "dead")
        assert get(daemon, "/echo", client) == (200, "s1")
        (failover,) = logged(log, 1)
    assert (failover["server"], failover["route"], failover["retries"]) == ("s1", "hash+failover", 1)
    assert failover["termination"] == "complete"

    with (
        one_answer_per_connection() as port,
        logging_lbd([{"id": "flaky", "url": f"http://127.0.0.1:{port}", "region": "us-east", "capacity": 10}]) as (
            daemon,
            log,
        ),
    ):
        with RawConnection(daemon.port) as connection:
            for path in ("/first", "/second"):
                connection.send(build_request("GET", path, HEAD))
                assert connection.read_response().status == 200, path
        first, retried = logged(log, 2)
    assert (first["route"], first["retries"]) == ("hash", 0)
    assert (retried["route"], retried["retries"], retried["server"]) == ("hash+retry", 1, "flaky")


@contextmanager
def one_answer_per_connection() -> Iterator[int]:
    """A keep-alive server that answers the first request of each connection, and closes the
    connection without a word when a second arrives on it (as one closing an idle connection)."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve(connection: socket.socket) -> None:
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            connection.recv(65536)  # the next request: dropped

    def accept() -> None:
        with listener:
            while True:
                try:
                    connection, _ = listener.accept()
                except OSError:
                    return
                threading.Thread(target=serve, args=(connection,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


# --- websocket tunnels -----------------------------------------------------------------------------------


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """A client's (masked) WebSocket frame, payload under 126 bytes."""
    mask = os.urandom(4)
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def open_tunnel(port: int) -> socket.socket:
    """A raw WebSocket through lbd, upgraded and one echo done."""
    key = base64.b64encode(os.urandom(16)).decode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    upgrade = {"client-id": "ws", "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Key": key}
    sock.sendall(build_request("GET", "/ws", {**upgrade, "Sec-WebSocket-Version": "13"}))
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101 "), head
    sock.sendall(ws_frame(0x1, b"hello"))
    echoed = b""
    while b"hello" not in echoed:
        echoed += sock.recv(4096)
    return sock


def test_websocket_tunnels_are_logged_when_they_close(trio: list[Backend]) -> None:
    with logging_lbd([trio[2].entry()]) as (daemon, log):
        by_client = open_tunnel(daemon.port)
        by_client.close()
        (first,) = logged(log, 1)
        by_server = open_tunnel(daemon.port)
        by_server.sendall(ws_frame(0x8, (1000).to_bytes(2, "big")))  # close: the server answers and hangs up
        while by_server.recv(4096):
            pass
        (_, second) = logged(log, 2)
        by_server.close()
    for entry in (first, second):
        assert (entry["status"], entry["method"], entry["path"], entry["server"]) == (101, "GET", "/ws", "s3")
        assert entry["bytes_in"] >= len(ws_frame(0x1, b"hello")), entry
        assert entry["bytes_out"] > len("HTTP/1.1 101 Switching Protocols\r\n") + len(b"hello"), entry
    assert first["termination"] == "tunnel_closed_by_client"
    assert second["termination"] == "tunnel_closed_by_server"


# --- rotation and reload -------------------------------------------------------------------------------


def test_sigusr1_after_a_rename_reopens_the_path(trio: list[Backend]) -> None:
    with logging_lbd([trio[0].entry()], "text") as (daemon, log):
        rotated = log.with_name("access.log.1")
        for _ in range(3):
            assert get(daemon, "/echo")[0] == 200
        logged(log, 3, "text")
        log.rename(rotated)
        for _ in range(2):
            assert get(daemon, "/echo")[0] == 200
        logged(rotated, 5, "text")  # until the reopen, lines go on into the renamed file
        daemon.signal(signal.SIGUSR1)
        wait_until(log.exists)
        assert stat.S_IMODE(log.stat().st_mode) & 0o007 == 0  # not world-readable
        for _ in range(4):
            assert get(daemon, "/echo")[0] == 200
        logged(log, 4, "text")
        assert len(entries(rotated, "text")) == 5
        assert counters(daemon) == (9, 0, 0)
        assert "access log reopened" in daemon.log()


def test_lbctl_reload_reopens_and_applies_the_settings_live(trio: list[Backend]) -> None:
    """A reload reopens the file (logrotate's postrotate), and applies a new format, path or sample
    to what is logged from then on; removing access_log turns it off."""
    directory = short_tempdir()
    first, second = directory / "a.log", directory / "b.log"
    config = config_file(f'access_log = "{first}"\n')
    with running_lbd(["--config", str(config)], [trio[0].entry()]) as daemon:
        assert get(daemon, "/echo")[0] == 200
        logged(first, 1, "text")
        first.rename(directory / "a.log.1")
        assert daemon.lbctl("reload").returncode == 0
        assert get(daemon, "/echo")[0] == 200
        assert logged(first, 1, "text")[0]["status"] == 200
        config.write_text(f'access_log = "{second}"\naccess_log_format = "json"\n')
        reload = daemon.lbctl("reload")
        assert reload.returncode == 0 and 'access_log_format: "text" -> "json"' in reload.stdout, reload.stdout
        assert get(daemon, "/echo")[0] == 200
        assert logged(second, 1)[0]["status"] == 200
        config.write_text(f'access_log = "{directory}/missing/c.log"\n')
        refused = daemon.lbctl("reload")
        assert refused.returncode == 1 and "access_log" in refused.stdout + refused.stderr
        config.write_text("")
        assert daemon.lbctl("reload").returncode == 0
        assert get(daemon, "/echo?while-off")[0] == 200
        third = directory / "c.log"
        config.write_text(f'access_log = "{third}"\n')
        assert daemon.lbctl("reload").returncode == 0
        assert get(daemon, "/echo?on-again")[0] == 200
        assert logged(third, 1, "text")[0]["path"] == "/echo?on-again"  # lines keep their order: none came before
        assert len(entries(second)) == 1 and len(entries(first, "text")) == 1
        assert counters(daemon)[0] == 4


# --- sampling --------------------------------------------------------------------------------------------


def test_sampling_keeps_errors_and_the_same_clients(trio: list[Backend]) -> None:
    clients = [f"client-{i}" for i in range(60)]
    with logging_lbd([trio[0].entry()], config="access_log_sample = 0.5\n") as (daemon, log):
        for client in clients:
            assert get(daemon, "/echo", client)[0] == 200
        for client in clients[:5]:
            assert get(daemon, "/status/404", client)[0] == 404
        kept = {c for c in clients if zlib.crc32(c.encode()) < 0.5 * (1 << 32)}
        found = logged(log, len(kept) + 5)
    assert {e["client_id"] for e in found if e["status"] == 200} == kept
    assert [e["client_id"] for e in found if e["status"] == 404] == clients[:5]
    assert 10 < len(kept) < 50  # the hash spreads


# --- sharing a file, stdout, shutdown ----------------------------------------------------------------------


def test_two_processes_share_one_file_without_mixing_lines(trio: list[Backend]) -> None:
    """Each lbd appends whole lines with one write per batch (O_APPEND), as several workers will."""
    directory = short_tempdir()
    log = directory / "shared.log"
    args = ["--access-log", str(log), "--access-log-format", "json"]
    entries_ = [b.entry() for b in trio]
    with running_lbd(args, entries_) as one, running_lbd(args, entries_) as two:

        def hammer(daemon: Lbd, n: int) -> None:
            connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
            for i in range(300):
                connection.request("GET", f"/echo?n={n}-{i}&pad={'p' * 200}", headers={"client-id": f"k{n}-{i}"})
                assert connection.getresponse().read()
            connection.close()

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(hammer, [one, two] * 4, range(8)))
        found = logged(log, 2400)
    sent = sorted(f"/echo?n={n}-{i}" for n in range(8) for i in range(300))
    assert sorted(e["path"].split("&")[0] for e in found) == sent


def test_workers_share_the_file_and_all_reopen_it_on_sigusr1(trio: list[Backend]) -> None:
    """With --workers 2 every worker appends to the one file; SIGUSR1 to lbd (the supervisor) has each
    reopen the path after a rotation, so no worker's lines stay in the rotated file."""
    with logging_lbd([trio[0].entry()], args=("--workers", "2")) as (daemon, log):

        def requests(count: int, tag: str) -> list[int]:
            for n in range(count):  # a connection each: the kernel spreads them over the workers
                assert get(daemon, f"/echo?{tag}={n}", client=f"{tag}{n}")[0] == 200
            return [int(worker["requests"]) for worker in daemon.get("/v1/status")["workers"]]

        assert all(count > 0 for count in requests(40, "before")), "both workers must have served"
        logged(log, 40)
        rotated = log.with_name("access.log.1")
        log.rename(rotated)
        daemon.signal(signal.SIGUSR1)
        wait_until(lambda: daemon.log().count("access log reopened") >= 3)  # the supervisor and both workers
        before = [int(worker["requests"]) for worker in daemon.get("/v1/status")["workers"]]
        after = requests(40, "after")
        assert all(b > a for a, b in zip(before, after, strict=True)), (before, after)
        found = logged(log, 40)
        assert sorted(e["path"] for e in found) == sorted(f"/echo?after={n}" for n in range(40))
        assert len(entries(rotated)) == 40
        assert counters(daemon) == (80, 0, 0)  # summed over the workers


def test_workers_write_an_access_log_on_stdout(trio: list[Backend]) -> None:
    """`-` in a worker is lbd's stdout (the workers' words to the supervisor go on a pipe of their own)."""
    with running_lbd(
        ["--workers", "2", "--access-log", "-", "--access-log-format", "json"], [trio[0].entry()]
    ) as daemon:
        for n in range(10):
            assert get(daemon, f"/echo?n={n}", client=f"c{n}")[0] == 200
        wait_until(lambda: daemon.log().count('"termination":"complete"') == 10)


def test_stdout_and_the_lines_of_requests_cut_at_shutdown(trio: list[Backend]) -> None:
    """`-` writes to stdout; a request still running when the grace period ends is logged as cut."""
    with running_lbd(
        ["--access-log", "-", "--access-log-format", "json", "--shutdown-grace-ms", "300"], [trio[1].entry()]
    ) as daemon:
        assert get(daemon, "/echo")[0] == 200
        wait_until(lambda: '"termination":"complete"' in daemon.log())
        slow = threading.Thread(target=get_cut, args=(daemon, "/slow/5000"), daemon=True)
        slow.start()
        wait_until(lambda: daemon.get("/v1/status")["requests"]["total"] == 2)
        assert daemon.stop() == 0
        written = daemon.log()
    cut = [json.loads(line) for line in written.splitlines() if '"termination":"shutdown"' in line]
    assert len(cut) == 1 and cut[0]["path"] == "/slow/5000" and cut[0]["status"] == 0, written


def get_cut(daemon: Lbd, path: str) -> None:
    with contextlib.suppress(OSError):  # lbd cuts it at the end of its grace period
        get(daemon, path)


# --- an unwritable or full log at start --------------------------------------------------------------------


def start_fails(*args: str) -> str:
    """`lbd start` with `args`: it must exit 2 with exactly one line on stderr, returned."""
    workdir = short_tempdir()
    done = subprocess.run(
        [sys.executable, "-m", "lbd", "start", "--listen", "127.0.0.1:0", "--admin-socket", str(workdir / "s"),
         "--state-dir", str(workdir / "state"), *args],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_an_unwritable_or_full_log_stops_the_start_with_one_line() -> None:
    directory = short_tempdir()
    (directory / "file").write_text("")
    cases = {
        str(directory / "missing" / "access.log"): "No such file or directory",
        str(directory): "Is a directory",
        str(directory / "file" / "access.log"): "Not a directory",
        "/dev/full": "No space left on device",
    }
    for path, why in cases.items():
        line = start_fails("--access-log", path)
        assert line == f"lbd: error: access_log {path}: " + (
            f"cannot write to it: {why}" if path == "/dev/full" else f"cannot open it to append lines: {why}"
        ), line
    fifo = directory / "fifo"
    os.mkfifo(fifo)
    assert start_fails("--access-log", str(fifo)).endswith("cannot open it to append lines: a FIFO with no reader")
    config = config_file(f'access_log = "{directory}/missing/access.log"\n')
    done = check_config(config)
    assert done.returncode == 2 and done.stderr.strip().endswith(f"no such directory: {directory}/missing"), done
    config.write_text(f'access_log = "{directory}/new.log"\n')
    done = check_config(config)
    assert done.returncode == 0 and not (directory / "new.log").exists(), done  # checked, not created


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "lbd", "check-config", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


def user_namespaces() -> bool:
    """Whether this machine lets a process mount a tmpfs in a namespace of its own (no root needed
    where unprivileged user namespaces are allowed)."""
    if shutil.which("unshare") is None:
        return False
    done = subprocess.run(
        ["unshare", "-Urm", "mount", "-t", "tmpfs", "tmpfs", "/mnt"], capture_output=True, check=False
    )
    return done.returncode == 0


TINY_TMPFS = pytest.mark.skipif(not user_namespaces(), reason="needs unshare -Urm and mount (user namespaces)")


def in_tiny_tmpfs(directory: Path, size_kib: int, then: str) -> list[str]:
    """A command that mounts a tmpfs of `size_kib` on `directory` in a mount namespace of its own,
    runs the shell command `then`, and execs what follows (lbd, keeping its pid)."""
    script = f'mount -t tmpfs -o size={size_kib}k tmpfs "{directory}" && {then} && exec "$@"'
    return ["unshare", "-Urm", "sh", "-c", script, "sh"]


@TINY_TMPFS
def test_a_full_filesystem_at_start_is_one_line() -> None:
    directory = short_tempdir()
    filled = f'(head -c 1M /dev/zero > "{directory}/filler" 2>/dev/null; true)'
    workdir = short_tempdir()
    done = subprocess.run(
        [*in_tiny_tmpfs(directory, 64, filled), sys.executable, "-m", "lbd", "start", "--listen", "127.0.0.1:0",
         "--admin-socket", str(workdir / "s"), "--state-dir", str(workdir / "state"),
         "--access-log", str(directory / "access.log")],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done
    assert done.stderr == (
        f"lbd: error: access_log {directory}/access.log: cannot write to it: its filesystem has no space left\n"
    )


# --- failing and stalling writes while lbd serves ----------------------------------------------------------


@TINY_TMPFS
def test_a_filesystem_filling_up_drops_lines_and_lbd_keeps_serving(trio: list[Backend]) -> None:
    directory = short_tempdir()
    log = directory / "access.log"
    wrapper = in_tiny_tmpfs(directory, 32, "true")
    workdir = short_tempdir()
    servers = write_servers(workdir, [trio[0].entry()])
    args = ["--access-log", str(log), "--access-log-format", "json", "--servers", str(servers)]
    daemon = Lbd(workdir, args, prefix=wrapper)
    daemon.start()
    try:
        for i in range(400):  # about 130 KiB of lines into 32 KiB
            assert get(daemon, f"/echo?{i}", f"k{i}")[0] == 200
        wait_until(lambda: sum(counters(daemon)) == 400)
        lines, full, failed = counters(daemon)
        assert 50 < lines < 200 and full == 0 and failed == 400 - lines
        assert daemon.log().count("cannot write (No space left on device)") == 1
        assert get(daemon, "/echo")[0] == 200
    finally:
        daemon.stop()


class FifoReader:
    """The read end of a FIFO, read by a thread into `data` while `reading` is set."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = b""
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.reading = threading.Event()
        self.reading.set()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while self.fd >= 0:
            if not self.reading.wait(0.05):
                continue
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                time.sleep(0.01)
                continue
            except OSError:
                return
            if chunk:
                self.data += chunk
            else:
                time.sleep(0.01)

    @property
    def lines(self) -> int:
        return self.data.count(b"\n")

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        self.thread.join(2)
        os.close(fd)


def test_a_fifo_whose_reader_leaves_drops_lines_until_one_is_back(trio: list[Backend]) -> None:
    """EPIPE: the chunk's lines are dropped and counted, one warning, the proxy serves on; with a
    reader again, lines flow again."""
    fifo = short_tempdir() / "access.fifo"
    os.mkfifo(fifo)
    reader = FifoReader(fifo)
    with running_lbd(["--access-log", str(fifo)], [trio[0].entry()]) as daemon:
        assert get(daemon, "/echo")[0] == 200
        wait_until(lambda: reader.lines == 1)
        reader.close()
        for _ in range(5):
            assert get(daemon, "/echo")[0] == 200
        wait_until(lambda: counters(daemon)[2] == 5)
        assert daemon.log().count("cannot write (Broken pipe)") == 1
        again = FifoReader(fifo)
        try:
            assert get(daemon, "/echo")[0] == 200
            wait_until(lambda: again.lines == 1)
            assert counters(daemon) == (2, 0, 5)
            wait_until(lambda: "writing again" in daemon.log())
        finally:
            again.close()


def test_a_stalled_writer_never_holds_up_the_proxy(trio: list[Backend]) -> None:
    """A reader that stops reading: the writer thread blocks once the pipe is full, the buffer
    (access_log_buffer = 256) fills, and later lines are dropped and counted; requests are answered
    as fast as ever. Once the reader reads again, every line is either written or counted dropped."""
    fifo = short_tempdir() / "access.fifo"
    os.mkfifo(fifo)
    reader = FifoReader(fifo)
    reader.reading.clear()
    config = config_file("access_log_buffer = 256\n")
    try:
        with running_lbd(["--access-log", str(fifo), "--config", str(config)], [trio[0].entry()]) as daemon:
            connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
            slowest = 0.0
            for i in range(2000):
                started = time.monotonic()
                connection.request("GET", f"/echo?{i}&pad={'p' * 300}", headers={"client-id": "k"})
                assert connection.getresponse().read()
                slowest = max(slowest, time.monotonic() - started)
            connection.close()
            wait_until(lambda: counters(daemon)[1] > 0)
            assert slowest < 0.5, slowest
            reader.reading.set()
            wait_until(lambda: sum(counters(daemon)) == 2000)
            lines, full, failed = counters(daemon)
            assert full >= 1000 and failed == 0
            wait_until(lambda: reader.lines == lines)
    finally:
        reader.close()
