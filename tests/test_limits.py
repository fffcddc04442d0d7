"""Limits against hostile or broken clients, and strict HTTP framing (request-smuggling defence), on a
real lbd: each breach gets its status, the connection is closed, nothing reaches the backend that
should not, the breach is counted, and lbd keeps serving everybody else."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.backends import Backend, backends
from tests.harness.clients import RawConnection, build_request
from tests.harness.daemon import Lbd, running_lbd, wait_until

LIMITS = """
[limits]
max_request_line_bytes = 1024
max_header_bytes = 4096
max_headers = 20
max_body_bytes = 10000
header_timeout_ms = 400
keepalive_timeout_ms = 600
"""
HEAD = {"Host": "h", "client-id": "c"}


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lbd, Backend]]:
    config = tmp_path_factory.mktemp("limits") / "lbd.toml"
    config.write_text(LIMITS)
    with backends("solo") as (backend,), running_lbd(["--config", str(config)], [backend.entry()]) as daemon:
        yield daemon, backend


def refused(daemon: Lbd, request: bytes, status: int) -> str:
    """Send `request`; assert lbd answers `status` with Connection: close and closes; return the body."""
    with RawConnection(daemon.port) as connection:
        connection.send(request)
        response = connection.read_response()
        assert response.status == status, response
        assert "close" in response.connection_tokens
        assert connection.closed_by_peer(2.0)
        return response.body.decode()


def serves(daemon: Lbd) -> bool:
    with RawConnection(daemon.port) as connection:
        connection.send(build_request("GET", "/echo", HEAD))
        return connection.read_response().status == 200


def rejections(daemon: Lbd) -> dict[str, int]:
    text = daemon.request("GET", "/metrics")[1]
    found = re.findall(r'^lbd_client_rejections_total\{reason="(\w+)"\} (\S+)$', text, re.MULTILINE)
    return {reason: int(float(value)) for reason, value in found}


# --- strict framing ---------------------------------------------------------------------------------------

SMUGGLING = {
    "length-and-chunked": b"POST /echo HTTP/1.1\r\nHost: h\r\nclient-id: c\r\nContent-Length: 4\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "chunked-and-length": b"POST /echo HTTP/1.1\r\nHost: h\r\nclient-id: c\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 4\r\n\r\n0\r\n\r\n",
    "differing-lengths": b"POST /echo HTTP/1.1\r\nHost: h\r\nclient-id: c\r\nContent-Length: 3\r\n"
    b"Content-Length: 4\r\n\r\nabcd",
    "invalid-chunk-size": b"POST /echo HTTP/1.1\r\nHost: h\r\nclient-id: c\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\nabc\r\n0\r\n\r\n",
    "chunk-size-overflow": b"POST /echo HTTP/1.1\r\nHost: h\r\nclient-id: c\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"fffffffffffffffff\r\nabc\r\n0\r\n\r\n",
    "bare-lf": b"GET /echo HTTP/1.1\nHost: h\nclient-id: c\n\n",
    "bare-lf-in-headers": b"GET /echo HTTP/1.1\r\nHost: h\nclient-id: c\r\n\r\n",
    "obs-fold": b"GET /echo HTTP/1.1\r\nHost: h\r\nclient-id: c\r\nX-Folded: a\r\n b\r\n\r\n",
    "space-before-colon": b"GET /echo HTTP/1.1\r\nHost : h\r\nclient-id: c\r\n\r\n",
    "unknown-transfer-coding": b"POST /echo HTTP/1.1\r\nHost: h\r\nclient-id: c\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "chunked-in-http-1.0": b"POST /echo HTTP/1.0\r\nHost: h\r\nclient-id: c\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\n",
}


@pytest.mark.parametrize("request_bytes", SMUGGLING.values(), ids=SMUGGLING.keys())
def test_ambiguous_framing_is_400_and_closed(limited: tuple[Lbd, Backend], request_bytes: bytes) -> None:
    daemon, backend = limited
    before = backend.total_hits
    assert refused(daemon, request_bytes, 400).startswith("400 Bad Request: malformed request")
    assert backend.total_hits == before  # nothing was forwarded
    assert serves(daemon)


def test_a_head_begun_after_a_body_in_one_read_is_bounded_by_its_own_bytes(limited: tuple[Lbd, Backend]) -> None:
    """A read with a request's body (larger than max_header_bytes) and the start of the next request:
    only the start counts against the next head's limit, so it is served when the rest comes."""
    daemon, _ = limited
    body = b"x" * 9000
    with RawConnection(daemon.port) as connection:
        connection.send(build_request("POST", "/echo", HEAD, body) + b"GET /echo HTTP/1.1\r\nHo")
        assert connection.read_response().status == 200
        connection.send(b"st: h\r\nclient-id: c\r\n\r\n")
        assert connection.read_response().status == 200


@pytest.mark.parametrize("version", ["HTTP/0.9", "HTTP/2.0"])
def test_http_versions_other_than_1_0_and_1_1_are_505(limited: tuple[Lbd, Backend], version: str) -> None:
    """llhttp parses these request lines; lbd speaks neither, so it says so instead of guessing."""
    daemon, backend = limited
    before = backend.total_hits
    body = refused(daemon, build_request("GET", "/echo", HEAD, version=version), 505)
    assert body.startswith(f"505 HTTP Version Not Supported: {version} is not supported")
    assert backend.total_hits == before


def test_malformed_upstream_response_is_502_and_its_connection_is_not_reused() -> None:
    """A server answering with broken framing: the client gets 502, and the next request reaches the
    server over a new connection (a connection whose response could not be parsed is never trusted)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted: list[socket.socket] = []
    entry = {"id": "junk", "url": f"http://127.0.0.1:{port}", "region": "us-east", "capacity": 10}
    with running_lbd([], [entry]) as daemon, RawConnection(daemon.port) as client:
        listener.settimeout(5)
        client.send(build_request("GET", "/a", HEAD))
        upstream, _ = listener.accept()
        accepted.append(upstream)
        upstream.recv(65536)
        upstream.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n")
        response = client.read_response()
        assert response.status == 502 and b"malformed response" in response.body, response
        client.send(build_request("GET", "/b", HEAD))
        second, _ = listener.accept()  # a fresh connection, not the broken one
        accepted.append(second)
        assert b"GET /b " in second.recv(65536)
        second.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        assert client.read_response().body == b"ok"
        accepted[0].settimeout(2)
        assert accepted[0].recv(1) == b""  # lbd closed the broken one
    for each in (*accepted, listener):
        each.close()


# --- size limits --------------------------------------------------------------------------------------------


def test_request_line_too_long_is_414(limited: tuple[Lbd, Backend]) -> None:
    daemon, backend = limited
    before = backend.total_hits
    body = refused(daemon, build_request("GET", "/" + "a" * 2000, HEAD), 414)
    assert "1024 bytes" in body
    assert backend.total_hits == before
    assert serves(daemon)


def test_headers_too_large_or_too_many_are_431(limited: tuple[Lbd, Backend]) -> None:
    daemon, backend = limited
    before = backend.total_hits
    big = refused(daemon, build_request("GET", "/echo", {**HEAD, "X-Big": "b" * 5000}), 431)
    assert "4096 bytes" in big
    many = refused(daemon, build_request("GET", "/echo", [*HEAD.items(), *((f"X-{i}", "v") for i in range(30))]), 431)
    assert "more than 20 header fields" in many
    assert backend.total_hits == before
    counted = rejections(daemon)
    assert counted["headers_too_large"] >= 1 and counted["too_many_headers"] >= 1
    assert serves(daemon)


def test_head_size_is_bounded_while_it_streams_in(limited: tuple[Lbd, Backend]) -> None:
    """A head that never ends (one endless header value, sent in pieces) is cut at the limit rather
    than buffered: lbd answers 431 as soon as the limit is passed."""
    daemon, _ = limited
    with RawConnection(daemon.port) as connection:
        connection.send(b"GET /echo HTTP/1.1\r\nHost: h\r\nX-Endless: ")
        for _ in range(10):
            try:
                connection.send(b"x" * 1000)
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.01)
        response = connection.read_response()
        assert response.status == 431


def test_body_too_large_is_413_before_anything_is_forwarded(limited: tuple[Lbd, Backend]) -> None:
    daemon, backend = limited
    before = backend.hits["/upload"]
    with RawConnection(daemon.port) as connection:
        connection.send(build_request("POST", "/upload", {**HEAD, "Content-Length": "20000"}))  # body not sent
        response = connection.read_response()
        assert response.status == 413 and "10000 bytes" in response.body.decode()
        assert connection.closed_by_peer(2.0)
    assert backend.hits["/upload"] == before
    # a body just at the limit passes
    with RawConnection(daemon.port) as connection:
        connection.send(build_request("POST", "/upload", HEAD, body=b"x" * 10000))
        assert connection.read_response().json()["length"] == 10000


def test_chunked_body_growing_past_the_limit_is_413(limited: tuple[Lbd, Backend]) -> None:
    daemon, _ = limited
    with RawConnection(daemon.port) as connection:
        connection.send(build_request("POST", "/upload", {**HEAD, "Transfer-Encoding": "chunked"}))
        for _ in range(3):
            connection.send(b"1000\r\n" + b"y" * 4096 + b"\r\n")  # 12 KiB in all
        response = connection.read_response()
        assert response.status == 413
        assert connection.closed_by_peer(2.0)
    wait_until(lambda: all(s["active"] == 0 for s in daemon.servers().values()), timeout=3)
    assert serves(daemon)


# --- time limits --------------------------------------------------------------------------------------------


def test_slow_head_gets_408_and_silent_connection_is_closed(limited: tuple[Lbd, Backend]) -> None:
    daemon, _ = limited
    with RawConnection(daemon.port) as slow, RawConnection(daemon.port) as silent:
        started = time.monotonic()
        slow.send(b"GET /echo HTTP/1.1\r\nHost: h\r\n")
        response = slow.read_response()
        assert response.status == 408, response
        assert 0.35 <= time.monotonic() - started < 2.0
        assert slow.closed_by_peer(2.0)
        assert silent.closed_by_peer(2.0)  # closed without a response (closed_by_peer checks no bytes)
    assert rejections(daemon)["header_timeout"] >= 2


def test_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout(limited: tuple[Lbd, Backend]) -> None:
    daemon, _ = limited
    with RawConnection(daemon.port) as connection:
        connection.send(build_request("GET", "/echo", HEAD))
        assert connection.read_response().status == 200
        assert connection.still_open(0.3)
        started = time.monotonic()
        assert connection.closed_by_peer(3.0)
        assert time.monotonic() - started < 2.5


def test_slowloris_500_connections_do_not_starve_a_normal_client(tmp_path: Path) -> None:
    """500 connections each trickling a request head: a normal client is still answered promptly,
    every slow one gets 408 and is closed at the header timeout, and lbd counts them."""
    config = tmp_path / "lbd.toml"
    config.write_text("[limits]\nheader_timeout_ms = 1500\n")
    with backends("solo") as (backend,), running_lbd(["--config", str(config)], [backend.entry()]) as daemon:
        slow = [socket.create_connection(("127.0.0.1", daemon.port)) for _ in range(500)]
        try:
            for sock in slow:
                sock.sendall(b"GET /echo HTTP/1.1\r\nHost: h\r\n")
            for sock in slow:
                sock.sendall(b"X-A: b\r\n")
            for _ in range(5):
                started = time.monotonic()
                assert serves(daemon)
                assert time.monotonic() - started < 0.5
            answered = 0
            for sock in slow:
                sock.settimeout(5)
                data = b""
                while chunk := sock.recv(4096):
                    data += chunk
                answered += data.startswith(b"HTTP/1.1 408 ")
            assert answered == 500
        finally:
            for sock in slow:
                sock.close()
        assert rejections(daemon)["header_timeout"] == 500
        assert serves(daemon)


# --- connection limit ---------------------------------------------------------------------------------------


def test_connections_beyond_max_connections_get_503_and_are_closed(tmp_path: Path) -> None:
    config = tmp_path / "lbd.toml"
    config.write_text("[limits]\nmax_connections = 40\n")
    with backends("solo") as (backend,), running_lbd(["--config", str(config)], [backend.entry()]) as daemon:
        held = [RawConnection(daemon.port) for _ in range(40)]
        try:
            wait_until(lambda: daemon.get("/v1/status")["clients"]["connections"] == 40)
            with RawConnection(daemon.port) as extra:
                response = extra.read_response()
                assert response.status == 503 and "too many client connections" in response.body.decode()
                assert extra.closed_by_peer(2.0)
            held.pop().close()
            wait_until(lambda: daemon.get("/v1/status")["clients"]["connections"] == 39)
            assert serves(daemon)  # room again
        finally:
            for connection in held:
                connection.close()
        assert rejections(daemon)["too_many_connections"] == 1
