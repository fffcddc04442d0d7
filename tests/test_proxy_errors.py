"""End-to-end error handling of a real lbd: what a client gets when routing, the backend, the request
or the configuration is wrong, and that lbd keeps serving afterwards.

Servers that fail here are the only server of their lbd, so no failover can hide the error.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.backends import Backend, backends
from tests.harness.clients import RawConnection, build_request, closed_port, curl, raw_exchange
from tests.harness.daemon import Lbd, running_lbd, short_tempdir, wait_until


def get(daemon: Lbd, path: str, headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=timeout)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def serves(daemon: Lbd, client: str = "after") -> bool:
    status, body = get(daemon, "/echo?still=1", {"client-id": client})
    return status == 200 and json.loads(body)["path"] == "/echo?still=1"


def no_active_requests(daemon: Lbd) -> bool:
    return all(server["active"] == 0 for server in daemon.servers().values())


@pytest.fixture
def single() -> Iterator[tuple[Lbd, Backend]]:
    with backends("solo") as (backend,), running_lbd(entries=[backend.entry()]) as daemon:
        yield daemon, backend


# --- 1. missing client-id ---------------------------------------------------------------------------


def test_missing_client_id_is_400_naming_the_header(static_lbd: Lbd) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", static_lbd.port, timeout=10)
    try:
        connection.request("GET", "/echo")
        response = connection.getresponse()
        body = response.read().decode()
        assert response.status == 400
        assert "client-id" in body
        client_socket = connection.sock
        # a bodiless request was fully read: the same connection keeps working
        connection.request("GET", "/echo", headers={"client-id": "now-with-id"})
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read())["path"] == "/echo"
        assert connection.sock is client_socket
    finally:
        connection.close()
    done = curl("-w", "\n%{http_code}", "-d", "some=body", f"{static_lbd.url}/echo")
    assert done.returncode == 0, done.stderr
    text, _, code = done.stdout.decode().rpartition("\n")
    assert code == "400" and "client-id" in text
    assert serves(static_lbd)


# --- 2. backend down ----------------------------------------------------------------------------------


def test_unreachable_backend_is_a_fast_502_naming_the_server() -> None:
    entry = {"id": "dead-1", "hostname": "127.0.0.1", "port": closed_port(), "region": "us-east", "capacity": 5}
    with running_lbd(entries=[entry]) as daemon:
        for _ in range(3):
            started = time.monotonic()
            status, body = get(daemon, "/echo", {"client-id": "c"})
            elapsed = time.monotonic() - started
            assert status == 502, body
            assert b"dead-1" in body
            assert elapsed < 1.0, f"502 took {elapsed:.2f} s"
        wait_until(lambda: no_active_requests(daemon))
        assert daemon.servers()["dead-1"]["errors"] >= 3


def test_backend_stopped_after_use_is_a_502(single: tuple[Lbd, Backend]) -> None:
    daemon, backend = single
    assert serves(daemon)  # leaves a pooled keep-alive connection to the backend
    backend.stop()
    started = time.monotonic()
    status, body = get(daemon, "/echo", {"client-id": "c"})
    assert status == 502, body
    assert b"solo" in body
    assert time.monotonic() - started < 1.0
    backend.start()  # same port: lbd reaches it again
    assert serves(daemon)


# --- 3. upstream timeout -------------------------------------------------------------------------------


def test_slow_backend_is_a_504_after_the_timeout() -> None:
    with backends("sloth") as (backend,), running_lbd(["--timeout-base-ms", "300"], [backend.entry()]) as daemon:
        connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
        try:
            started = time.monotonic()
            connection.request("GET", "/slow/3000", headers={"client-id": "c"})
            response = connection.getresponse()
            body = response.read()
            elapsed = time.monotonic() - started
            assert response.status == 504, body
            assert b"sloth" in body
            assert 0.29 <= elapsed < 1.5, f"504 after {elapsed:.3f} s; the timeout is 0.3 + 0.01 s"
            # the same client connection serves the next request
            connection.request("GET", "/slow/50", headers={"client-id": "c"})
            response = connection.getresponse()
            assert response.status == 200 and response.read() == b"slow from sloth\n"
        finally:
            connection.close()
        assert serves(daemon)
        wait_until(lambda: no_active_requests(daemon))


# --- 4. no servers ----------------------------------------------------------------------------------------


def test_no_servers_is_503() -> None:
    with running_lbd(entries=[]) as daemon:
        for _ in range(2):
            status, body = get(daemon, "/echo", {"client-id": "c"})
            assert status == 503, body
            assert body.startswith(b"503 ")


# --- 5. malformed requests -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nclient-id: c\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"GET / HTTP/1.1\r\nHost: x\r\nclient-id: c\r\nContent-Length: -3\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nclient-id: c\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
    ],
    ids=["header-without-colon", "two-content-lengths", "negative-length", "length-and-chunked", "garbage"],
)
def test_malformed_request_is_400_and_closed(single: tuple[Lbd, Backend], request_bytes: bytes) -> None:
    daemon, backend = single
    with RawConnection(daemon.port) as connection:
        connection.send(request_bytes)
        response = connection.read_response()
        assert response.status == 400
        assert "close" in response.connection_tokens
        assert connection.closed_by_peer(2.0)
    assert backend.total_hits == 0  # nothing was forwarded
    assert serves(daemon)


def test_malformed_request_after_a_good_one_on_the_same_connection(single: tuple[Lbd, Backend]) -> None:
    daemon, _ = single
    with RawConnection(daemon.port) as connection:
        connection.send(build_request("GET", "/echo", {"Host": "h", "client-id": "c"}))
        assert connection.read_response().status == 200
        connection.send(b"GET /echo HTTP/1.1\r\nHost: h\r\nBad Header\r\n\r\n")
        assert connection.read_response().status == 400
        assert connection.closed_by_peer(2.0)
    assert serves(daemon)


def test_malformed_chunked_body_mid_request_does_not_hang(single: tuple[Lbd, Backend]) -> None:
    """The request was already forwarded when its chunked body turned out malformed: lbd ends the
    exchange (a 400 while nothing of the response was sent, else a cut connection) within the upstream
    timeout (2.01 s here) at most, and settles the server's `active` count."""
    daemon, _ = single
    with RawConnection(daemon.port, timeout=6) as connection:
        connection.send(
            build_request("POST", "/upload", {"Host": "h", "client-id": "c", "Transfer-Encoding": "chunked"})
        )
        connection.send(b"5\r\nhello\r\n")
        time.sleep(0.1)  # the exchange is now forwarding to the backend
        connection.send(b"zz-not-hex\r\nmore\r\n0\r\n\r\n")
        started = time.monotonic()
        connection.sock.settimeout(3.5)  # well past the 2.01 s upstream timeout
        try:
            reply = connection.read_to_eof()
            outcome = reply.split(b"\r\n", 1)[0].decode("latin-1") or "closed without a response"
        except TimeoutError:
            outcome = "no response and connection still open after 3.5 s"
        except ConnectionResetError:
            outcome = "connection reset"
        elapsed = time.monotonic() - started
    assert outcome.startswith(("HTTP/1.1 400", "closed", "connection reset")), (
        f"malformed chunked body: {outcome} (after {elapsed:.1f} s)"
    )
    wait_until(lambda: no_active_requests(daemon), timeout=3)
    assert serves(daemon)


def test_an_early_answer_reaches_a_client_still_sending_its_body(single: tuple[Lbd, Backend]) -> None:
    """The server answers before reading a large body (here 413). lbd half-closes and keeps reading
    (and dropping) the rest of the body, so a client that writes everything before reading still
    gets the answer; closing at once would reset the connection and could destroy it."""
    daemon, _ = single
    with RawConnection(daemon.port, timeout=10) as connection:
        connection.send(
            build_request("POST", "/status/413", {"Host": "h", "client-id": "c", "Content-Length": str(64 << 20)})
        )
        chunk = b"z" * (1 << 20)
        for _ in range(64):  # a naive client: the whole body first
            connection.send(chunk)
        response = connection.read_response()
        assert response.status == 413
        assert connection.closed_by_peer(6.0)
    assert serves(daemon)


# --- 6. backend closing its connections ------------------------------------------------------------------


def test_backend_closing_connections_over_keep_alive(single: tuple[Lbd, Backend]) -> None:
    daemon, backend = single
    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    try:
        connection.request("GET", "/echo", headers={"client-id": "c"})
        assert connection.getresponse().read()
        client_socket = connection.sock
        for n in range(10):
            connection.request("GET", f"/close?n={n}", headers={"client-id": "c"})
            response = connection.getresponse()
            assert response.status == 200, n
            assert response.read() == b"closing from solo\n"
            # the backend's Connection: close concerns lbd's upstream connection, not the client's
            assert response.getheader("Connection") is None or "close" not in response.getheader("Connection", "")
            connection.request("GET", f"/echo?n={n}", headers={"client-id": "c"})  # right after a close
            response = connection.getresponse()
            assert response.status == 200 and json.loads(response.read())["path"] == f"/echo?n={n}"
        assert connection.sock is client_socket, "lbd closed the client connection"
    finally:
        connection.close()
    assert backend.hits["/close"] == 10
    assert daemon.servers()["solo"]["errors"] == 0


# --- 7. bad servers.json ------------------------------------------------------------------------------------


GOOD = {"id": "a", "hostname": "127.0.0.1", "port": 9001, "region": "us-east", "capacity": 3}


def with_field(**changes: Any) -> dict[str, Any]:
    entry = {**GOOD, **changes}
    return {key: value for key, value in entry.items() if value is not ...}


BAD_SERVERS: list[tuple[str, str, tuple[str, ...]]] = [
    ("unparsable", '[{"id": "a", ', ("not valid JSON", "line 1")),
    ("duplicate-id", json.dumps([GOOD, {**GOOD, "port": 9002}]), ("entry 1", "duplicate id", "'a'")),
    ("missing-region", json.dumps([with_field(region=...)]), ("entry 0", "'a'", "region")),
    ("missing-capacity", json.dumps([GOOD, with_field(id="b", capacity=...)]), ("entry 1", "'b'", "capacity")),
    ("capacity-zero", json.dumps([with_field(capacity=0)]), ("entry 0", "'a'", "capacity", "0")),
    ("capacity-string", json.dumps([with_field(capacity="ten")]), ("entry 0", "'a'", "capacity", "ten")),
    ("capacity-float", json.dumps([with_field(capacity=1.5)]), ("entry 0", "'a'", "capacity", "1.5")),
    ("unknown-region", json.dumps([with_field(region="mars-north")]), ("entry 0", "'a'", "region", "mars-north")),
]


@pytest.mark.parametrize(("text", "expected"), [(text, expected) for _, text, expected in BAD_SERVERS],
                         ids=[name for name, _, _ in BAD_SERVERS])  # fmt: skip
def test_bad_servers_file_fails_fast_with_one_clear_line(text: str, expected: tuple[str, ...]) -> None:
    workdir = short_tempdir()
    try:
        servers = workdir / "servers.json"
        servers.write_text(text)
        command = [
            sys.executable, "-m", "lbd", "start",
            "--servers", str(servers),
            "--admin-socket", str(workdir / "s.sock"),
            "--listen", "127.0.0.1:0",
        ]  # fmt: skip
        started = time.monotonic()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=15, check=False, cwd=workdir)
        except subprocess.TimeoutExpired:
            pytest.fail("lbd kept running with a bad servers.json")
        elapsed = time.monotonic() - started
        output = done.stdout + done.stderr
        assert done.returncode != 0
        assert "Traceback" not in output, output
        lines = [line for line in output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("lbd: error: "), output
        for fragment in expected:
            assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
        assert str(servers) in lines[0]
        assert elapsed < 10
        assert not (workdir / "s.sock").exists()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_lbd_still_healthy_after_error_storm(single: tuple[Lbd, Backend]) -> None:
    """Many failing requests of different kinds in a row leave no stuck connection or counter."""
    daemon, _ = single
    for _ in range(5):
        assert get(daemon, "/echo")[0] == 400
        assert raw_exchange(daemon.port, b"GET / HTTP/1.1\r\nBad\r\n\r\n").status == 400
        with RawConnection(daemon.port) as connection:  # client gives up mid-download
            connection.send(build_request("GET", "/bytes/20000000", {"Host": "h", "client-id": "c"}))
            connection.read_head()
    wait_until(lambda: no_active_requests(daemon))
    wait_until(lambda: daemon.get("/v1/status")["clients"]["connections"] == 0)
    assert serves(daemon)


def test_client_stalling_mid_body_gets_408_and_frees_the_server(tmp_path: Path) -> None:
    config = tmp_path / "lbd.toml"
    config.write_text("client_timeout_ms = 400\n")
    with backends("stall-1") as (backend,), running_lbd(["--config", str(config)], entries=[backend.entry()]) as lbd:
        with socket.create_connection(("127.0.0.1", lbd.port), timeout=5) as sock:
            sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nclient-id: c\r\nContent-Length: 1000\r\n\r\nhalf")
            started = time.monotonic()
            answer = sock.recv(4096)
            assert answer.startswith(b"HTTP/1.1 408"), answer
            assert 0.3 < time.monotonic() - started < 3
        wait_until(lambda: lbd.servers()["stall-1"]["active"] == 0)
        assert lbd.servers()["stall-1"]["errors"] == 0  # the client's fault, not the server's
