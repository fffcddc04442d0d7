"""End-to-end HTTP/1.1 framing through a real lbd: methods, bodies both ways, hop-by-hop headers,
keep-alive and pipelining, HEAD/204/304, 100-continue, streaming with back-pressure, websockets.

Clients are real: curl, http.client, aiohttp, and raw sockets where the bytes on the wire matter.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest

from tests.harness.backends import Backend, backends, server_entry
from tests.harness.clients import (
    RawConnection,
    RssWatcher,
    build_request,
    curl,
    raw_exchange,
)
from tests.harness.daemon import Lbd, running_lbd

MiB = 1024 * 1024
BIG = 256 * MiB
RSS_LIMIT = 64 * MiB


@pytest.fixture(scope="module")
def proxy() -> Iterator[tuple[Lbd, list[Backend]]]:
    """One lbd in front of three backends, shared by the tests of this module (each uses its own
    client ids and connections; none changes lbd's state)."""
    with backends("f1", "f2", "f3") as started, running_lbd(entries=[b.entry() for b in started]) as daemon:
        yield daemon, started


@pytest.fixture
def lbd(proxy: tuple[Lbd, list[Backend]]) -> Lbd:
    return proxy[0]


def connect(daemon: Lbd, timeout: float = 10.0) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=timeout)


def echo(response: http.client.HTTPResponse) -> dict[str, object]:
    body = response.read()
    assert response.status == 200, body
    result: dict[str, object] = json.loads(body)
    return result


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- 1. methods --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_every_method_reaches_the_backend_intact(lbd: Lbd, method: str) -> None:
    body = os.urandom(1000) + method.encode()
    target = "/echo/deep/path;p=1?x=1&y=a%20b&z=%2F&empty="
    connection = connect(lbd)
    try:
        connection.request(method, target, body=body, headers={"client-id": f"method-{method}"})
        result = echo(connection.getresponse())
        assert result["method"] == method
        assert result["path"] == target
        assert result["length"] == len(body)
        assert result["sha256"] == sha(body)
        # the same connection, without a body
        connection.request(method, "/echo?second=1", headers={"client-id": f"method-{method}"})
        result = echo(connection.getresponse())
        assert (result["method"], result["path"], result["length"]) == (method, "/echo?second=1", 0)
    finally:
        connection.close()


# --- 2. request bodies -------------------------------------------------------------------------


def test_content_length_request_body(lbd: Lbd) -> None:
    body = os.urandom(3 * MiB + 17)
    connection = connect(lbd)
    try:
        connection.request("POST", "/upload", body=body, headers={"client-id": "cl-body"})
        result = echo(connection.getresponse())
    finally:
        connection.close()
    assert (result["length"], result["sha256"]) == (len(body), sha(body))


def test_chunked_request_body_from_curl(lbd: Lbd, tmp_path: Path) -> None:
    body = os.urandom(700_001)
    upload = tmp_path / "body.bin"
    upload.write_bytes(body)
    done = curl(
        "-H", "client-id: curl-chunked",
        "-H", "Transfer-Encoding: chunked",
        "--data-binary", f"@{upload}",
        "-v",
        f"{lbd.url}/upload",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert b"> Transfer-Encoding: chunked" in done.stderr  # curl really sent it chunked
    result = json.loads(done.stdout)
    assert (result["length"], result["sha256"]) == (len(body), sha(body))


def test_chunked_request_body_from_raw_socket_in_pieces(lbd: Lbd) -> None:
    pieces = [b"a", os.urandom(15), os.urandom(4096), os.urandom(70_000), b"\r\n0\r\n", os.urandom(300_000)]
    body = b"".join(pieces)
    head = build_request(
        "PUT", "/upload?raw=1", {"Host": "raw.test", "client-id": "raw-chunked", "Transfer-Encoding": "chunked"}
    )
    with RawConnection(lbd.port) as connection:
        connection.send(head)
        # chunks leave in several writes, split mid-chunk, with the size line on its own
        for piece in pieces:
            framed = b"%x;ext=1\r\n%s\r\n" % (len(piece), piece)
            connection.send(framed[:3])
            time.sleep(0.005)
            connection.send(framed[3:])
        connection.send(b"0\r\nX-Trailer: t\r\n\r\n")
        response = connection.read_response()
        assert response.status == 200, response.body
        result = response.json()
        assert (result["length"], result["sha256"]) == (len(body), sha(body))
        assert result["method"] == "PUT"
        # the connection is usable afterwards: the chunked body's end was found exactly
        connection.send(build_request("GET", "/echo?after=1", {"Host": "raw.test", "client-id": "raw-chunked"}))
        after = connection.read_response()
        assert after.status == 200 and after.json()["path"] == "/echo?after=1"


# --- 3. response bodies ------------------------------------------------------------------------


@pytest.mark.parametrize("query", ["", "?chunked=1"])
@pytest.mark.parametrize("size", [0, 1, 65_536, 3 * MiB + 5])
def test_response_body_complete_via_http_client(lbd: Lbd, size: int, query: str) -> None:
    connection = connect(lbd)
    try:
        for _ in range(2):  # twice on one connection: the first body's end was exact
            connection.request("GET", f"/bytes/{size}{query}", headers={"client-id": "resp-body"})
            response = connection.getresponse()
            body = response.read()
            assert response.status == 200
            assert len(body) == size and body.count(b"x") == size
            if query:
                assert response.getheader("Transfer-Encoding") == "chunked"
            else:
                assert response.getheader("Content-Length") == str(size)
    finally:
        connection.close()


@pytest.mark.parametrize("query", ["", "?chunked=1"])
def test_response_body_complete_via_curl(lbd: Lbd, tmp_path: Path, query: str) -> None:
    size = 2 * MiB + 3
    out = tmp_path / "out.bin"
    done = curl(
        "-H", "client-id: curl-resp",
        "-o", str(out),
        "-w", "%{http_code} %{size_download}",
        f"{lbd.url}/bytes/{size}{query}",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == f"200 {size}"
    data = out.read_bytes()
    assert len(data) == size and data.count(b"x") == size


def test_chunked_response_framing_on_the_wire(lbd: Lbd) -> None:
    """A chunked upstream response reaches an HTTP/1.1 client chunked; an HTTP/1.0 client gets the
    body unframed and the end of the connection as its end."""
    with RawConnection(lbd.port) as connection:
        connection.send(build_request("GET", "/bytes/200000?chunked=1", {"Host": "h", "client-id": "wire"}))
        response = connection.read_response()
        assert response.chunked and len(response.body) == 200_000
        assert response.header("Content-Length") is None
        assert connection.still_open()
    with RawConnection(lbd.port) as connection:
        connection.send(build_request("GET", "/bytes/200000?chunked=1", {"client-id": "wire"}, version="HTTP/1.0"))
        response = connection.read_response()
        assert response.header("Transfer-Encoding") is None
        assert response.body == b"x" * 200_000  # read to EOF: nothing but the body, then close


@contextmanager
def small_send_buffer_backend(body_size: int) -> Iterator[int]:
    """A raw keep-alive HTTP server whose sockets have a tiny send buffer: every large response it
    sends waits for the proxy's ACKs. Answers /big with `body_size` bytes, anything else with 2."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve(connection: socket.socket) -> None:
        with connection:
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            pending = b""
            while data := connection.recv(65536):
                pending += data
                while b"\r\n\r\n" in pending:
                    head, pending = pending.split(b"\r\n\r\n", 1)
                    size = body_size if head.startswith(b"GET /big ") else 2
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size)

    def accept() -> None:
        with contextlib.suppress(OSError):  # the listener closed: the test is over
            while True:
                threading.Thread(target=serve, args=(listener.accept()[0],), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


@pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="delayed ACKs are tuned per read on Linux only")
def test_a_large_response_is_not_stalled_by_delayed_acks() -> None:
    """On a kept-alive (request/response) connection Linux delays ACKs by 40 ms or more; a server
    whose send buffer is full waits for them. lbd acknowledges each read that leaves a response
    incomplete, so a 256 KiB response from such a server takes a millisecond or so, not several
    40 ms stalls (measured before the fix: 42 to 175 ms each)."""
    with (
        small_send_buffer_backend(256 * 1024) as port,
        running_lbd(entries=[server_entry("tiny-sndbuf", port)]) as daemon,
    ):
        connection = connect(daemon)
        try:
            took_ms = []
            for _ in range(6):  # small and large alternate, as on a busy keep-alive connection
                for path in ("/small", "/big"):
                    started = time.perf_counter()
                    connection.request("GET", path, headers={"client-id": "delack"})
                    body = connection.getresponse().read()
                    if path == "/big":
                        assert len(body) == 256 * 1024
                        took_ms.append((time.perf_counter() - started) * 1000)
        finally:
            connection.close()
    assert statistics.median(took_ms) < 20, took_ms  # one delayed ACK alone is 40 ms


# --- 4. large streaming with bounded memory ------------------------------------------------------


@pytest.fixture
def streaming() -> Iterator[tuple[Lbd, Backend]]:
    with backends("big") as (backend,), running_lbd(entries=[backend.entry()]) as daemon:
        yield daemon, backend


def test_large_upload_is_streamed_not_buffered(streaming: tuple[Lbd, Backend]) -> None:
    daemon, backend = streaming
    assert daemon.process is not None
    base = os.urandom(MiB)
    digest = hashlib.sha256()

    def body() -> Iterator[bytes]:
        for index in range(BIG // MiB):
            block = index.to_bytes(8, "big") + base[8:]  # distinct blocks: reordering would show
            digest.update(block)
            yield block

    # The backend sits on the request for a while before reading the body: lbd must stop reading
    # the client meanwhile instead of queueing the upload in memory.
    backend.delay_s = 0.7
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
    try:
        with RssWatcher(daemon.process.pid) as rss:
            connection.request("POST", "/upload", body=body(), headers={"client-id": "big-up"}, encode_chunked=True)
            result = echo(connection.getresponse())
    finally:
        connection.close()
        backend.delay_s = 0.0
    elapsed = time.monotonic() - started
    assert result["length"] == BIG
    assert result["sha256"] == digest.hexdigest()
    assert rss.growth < RSS_LIMIT, f"lbd RSS grew by {rss.growth / MiB:.1f} MiB during a 256 MiB upload"
    assert rss.samples > 10
    assert elapsed < 20


def test_large_download_is_streamed_with_back_pressure(streaming: tuple[Lbd, Backend]) -> None:
    daemon, _ = streaming
    assert daemon.process is not None
    started = time.monotonic()
    with RssWatcher(daemon.process.pid) as rss, RawConnection(daemon.port, timeout=30, rcvbuf=16 * 1024) as conn:
        conn.send(build_request("GET", f"/bytes/{BIG}", {"Host": "big", "client-id": "big-down"}))
        head = conn.read_head()
        assert head.status == 200 and head.header("Content-Length") == str(BIG)
        received = len(conn.buffer)
        matching = bytes(conn.buffer).count(b"x")
        conn.buffer.clear()
        # A slow reader first: small reads with pauses for ~1.2 s. Unbounded buffering in lbd would
        # pull hundreds of MiB from the (fast, local) backend meanwhile.
        slow_until = time.monotonic() + 1.2
        while time.monotonic() < slow_until:
            data = conn.sock.recv(8192)
            assert data, "connection closed early"
            received += len(data)
            matching += data.count(b"x")
            time.sleep(0.004)
        slow_growth = rss.peak - rss.baseline
        assert received < 32 * MiB  # it really was slow
        buffer = bytearray(4 * MiB)
        view = memoryview(buffer)
        while received < BIG:
            n = conn.sock.recv_into(view, min(len(buffer), BIG - received))
            assert n, f"connection closed after {received} of {BIG} bytes"
            received += n
            matching += buffer.count(b"x", 0, n)
        assert received == BIG and matching == BIG
        assert conn.still_open(0.1)  # no stray bytes after the body
    elapsed = time.monotonic() - started
    assert slow_growth < RSS_LIMIT, f"lbd RSS grew by {slow_growth / MiB:.1f} MiB while the client read slowly"
    assert rss.growth < RSS_LIMIT, f"lbd RSS grew by {rss.growth / MiB:.1f} MiB during a 256 MiB download"
    assert elapsed < 20


# --- 5. hop-by-hop and forwarding headers ---------------------------------------------------------


def test_hop_by_hop_headers_removed_and_forwarding_headers_added(lbd: Lbd) -> None:
    request = build_request(
        "GET",
        "/echo/hop",
        [
            ("Host", "front.example:8443"),
            ("client-id", "hop"),
            ("Connection", "keep-alive, X-Secret-Hop"),
            ("X-Secret-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Proxy-Connection", "x"),
            ("X-Forwarded-For", "203.0.113.7"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "spoofed.example"),
            ("Via", "1.0 upstream-cache"),
            ("X-End-To-End", "kept"),
        ],
    )
    with RawConnection(lbd.port) as connection:
        connection.send(request)
        response = connection.read_response()
        assert response.status == 200
        seen = response.json()["headers"]
        for hop in ("x-secret-hop", "keep-alive", "te", "proxy-connection"):
            assert hop not in seen, f"{hop} was forwarded: {seen}"
        assert "x-secret-hop" not in seen.get("connection", "").lower()
        assert seen["x-end-to-end"] == "kept"
        assert seen["client-id"] == "hop"
        assert seen["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
        assert seen["x-forwarded-proto"] == "http"
        assert seen["x-forwarded-host"] == "front.example:8443"
        assert seen["via"].startswith("1.0 upstream-cache, ") and "lbd" in seen["via"]
        assert "lbd" in (response.header("Via") or "")  # the response says it came through lbd
        assert response.header("Keep-Alive") is None

        # no prior X-Forwarded-For: just the client's address; several headers: joined in order
        connection.send(build_request("GET", "/echo", {"Host": "h2.example", "client-id": "hop"}))
        seen = connection.read_response().json()["headers"]
        assert seen["x-forwarded-for"] == "127.0.0.1"
        assert seen["x-forwarded-host"] == "h2.example"
        assert "lbd" in seen["via"]
        connection.send(
            build_request(
                "GET",
                "/echo",
                [("Host", "h"), ("client-id", "hop"), ("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-For", "10.0.0.2")],
            )
        )
        seen = connection.read_response().json()["headers"]
        assert seen["x-forwarded-for"] == "10.0.0.1, 10.0.0.2, 127.0.0.1"


# --- 6. keep-alive and pipelining -------------------------------------------------------------------


def test_keep_alive_reuses_client_and_upstream_connections() -> None:
    with backends("ka") as (backend,), running_lbd(entries=[backend.entry()]) as daemon:
        connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
        try:
            connection.request("GET", "/echo?n=0", headers={"client-id": "ka"})
            echo(connection.getresponse())
            first_socket = connection.sock
            assert first_socket is not None
            for n in range(1, 10):
                body = b"b" * n
                connection.request("POST", f"/echo?n={n}", body=body, headers={"client-id": "ka"})
                result = echo(connection.getresponse())
                assert (result["path"], result["length"]) == (f"/echo?n={n}", n)
                assert connection.sock is first_socket, "the client connection was not kept alive"
        finally:
            connection.close()
        assert backend.hits["/echo"] == 10
        # the connections the requests came on, as the backend saw them (lbd's health checks open their
        # own, at a random moment in their first interval: counting every connection to the port
        # counted those too, whenever a check fell within the test)
        upstream = backend.peer_ports
        assert len(upstream) == 1, f"lbd opened {len(upstream)} upstream connections for 10 sequential requests"


def test_http10_without_keep_alive_is_closed_after_the_response(lbd: Lbd) -> None:
    with RawConnection(lbd.port) as connection:
        connection.send(build_request("GET", "/echo?v=10", {"client-id": "v10"}, version="HTTP/1.0"))
        response = connection.read_response()
        assert response.status == 200 and response.json()["path"] == "/echo?v=10"
        assert response.header("Content-Length") is not None
        assert connection.closed_by_peer(2.0), "HTTP/1.0 connection without keep-alive left open"
    with RawConnection(lbd.port) as connection:  # HTTP/1.0 asking for keep-alive keeps it
        for n in range(2):
            connection.send(
                build_request(
                    "GET", f"/echo?n={n}", {"client-id": "v10", "Connection": "keep-alive"}, version="HTTP/1.0"
                )
            )
            response = connection.read_response()
            assert response.status == 200 and response.json()["path"] == f"/echo?n={n}"
            assert "keep-alive" in response.connection_tokens
        assert connection.still_open()


def test_http11_connection_close_is_honoured(lbd: Lbd) -> None:
    with RawConnection(lbd.port) as connection:
        connection.send(build_request("GET", "/echo", {"Host": "h", "client-id": "c", "Connection": "close"}))
        response = connection.read_response()
        assert response.status == 200 and "close" in response.connection_tokens
        assert connection.closed_by_peer(2.0)


def test_pipelined_requests_answered_in_order(lbd: Lbd) -> None:
    body = os.urandom(5000)
    requests = b"".join(
        (
            build_request("GET", "/slow/200", {"Host": "p", "client-id": "pipe"}),
            build_request("POST", "/echo?n=2", {"Host": "p", "client-id": "pipe"}, body),
            build_request("HEAD", "/bytes/777", {"Host": "p", "client-id": "pipe"}),
            build_request("GET", "/bytes/3000?chunked=1", {"Host": "p", "client-id": "pipe"}),
            build_request("GET", "/echo?n=5", {"Host": "p"}),  # no client-id: lbd answers it itself
            build_request("GET", "/echo?n=6", {"Host": "p", "client-id": "pipe"}),
        )
    )
    with RawConnection(lbd.port) as connection:
        connection.send(requests)  # all in one write
        first = connection.read_response()
        assert first.status == 200 and first.body.startswith(b"slow from ")
        second = connection.read_response()
        assert second.json()["path"] == "/echo?n=2" and second.json()["sha256"] == sha(body)
        third = connection.read_response("HEAD")
        assert third.status == 200 and third.header("Content-Length") == "777" and third.body == b""
        fourth = connection.read_response()
        assert fourth.body == b"x" * 3000
        fifth = connection.read_response()
        assert fifth.status == 400 and b"client-id" in fifth.body
        sixth = connection.read_response()
        assert sixth.json()["path"] == "/echo?n=6"
        assert connection.still_open()


# --- 7. HEAD, 204, 304 -------------------------------------------------------------------------------


def test_head_has_headers_but_no_body(lbd: Lbd) -> None:
    with RawConnection(lbd.port) as connection:
        connection.send(build_request("GET", "/bytes/4321", {"Host": "h", "client-id": "head"}))
        get = connection.read_response()
        assert len(get.body) == 4321
        # (not /bytes/N?chunked=1: the aiohttp backend writes that body even after a HEAD head)
        for target in ("/bytes/4321", "/echo", "/status/200"):
            connection.send(build_request("HEAD", target, {"Host": "h", "client-id": "head"}))
            head = connection.read_response("HEAD")
            assert head.status == 200 and head.body == b""
            if target == "/bytes/4321":
                assert head.header("Content-Length") == "4321"
            # a body byte after the head would be read as the next status line and fail here
            connection.send(build_request("GET", "/echo?after-head=1", {"Host": "h", "client-id": "head"}))
            after = connection.read_response()
            assert after.status == 200 and after.json()["path"] == "/echo?after-head=1", target
    connection_ = connect(lbd)
    try:
        connection_.request("HEAD", "/bytes/1000", headers={"client-id": "head"})
        response = connection_.getresponse()
        assert response.status == 200 and response.read() == b""
        assert response.getheader("Content-Length") == "1000"
        connection_.request("GET", "/bytes/10", headers={"client-id": "head"})
        assert connection_.getresponse().read() == b"x" * 10
    finally:
        connection_.close()


@pytest.mark.parametrize("status", [204, 304])
def test_bodiless_statuses_keep_the_connection_usable(lbd: Lbd, status: int) -> None:
    with RawConnection(lbd.port) as connection:
        for _ in range(2):
            connection.send(build_request("GET", f"/status/{status}", {"Host": "h", "client-id": "nobody"}))
            response = connection.read_response()
            assert response.status == status
            assert response.header("Transfer-Encoding") is None
            assert response.header("Content-Length") in (None, "0")
            connection.send(build_request("GET", "/echo?after=1", {"Host": "h", "client-id": "nobody"}))
            after = connection.read_response()
            assert after.status == 200 and after.json()["path"] == "/echo?after=1"


# --- 8. Expect: 100-continue -------------------------------------------------------------------------


def test_expect_100_continue_from_raw_socket(lbd: Lbd) -> None:
    body = os.urandom(50_000)
    with RawConnection(lbd.port) as connection:
        connection.send(
            build_request(
                "POST",
                "/upload",
                {"Host": "h", "client-id": "expect", "Expect": "100-continue", "Content-Length": str(len(body))},
            )
        )
        interim = connection.read_response(allow_interim=True)  # nothing of the body sent yet
        assert interim.status == 100
        connection.send(body)
        final = connection.read_response()
        assert final.status == 200
        result = final.json()
        assert (result["length"], result["sha256"]) == (len(body), sha(body))


def test_expect_100_continue_from_curl(lbd: Lbd, tmp_path: Path) -> None:
    body = os.urandom(20_000)
    upload = tmp_path / "body.bin"
    upload.write_bytes(body)
    started = time.monotonic()
    done = curl(
        "-v",
        "--expect100-timeout", "8",
        "-H", "client-id: curl-expect",
        "-H", "Expect: 100-continue",
        "--data-binary", f"@{upload}",
        f"{lbd.url}/upload",
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert b"< HTTP/1.1 100 Continue" in done.stderr
    result = json.loads(done.stdout)
    assert (result["length"], result["sha256"]) == (len(body), sha(body))
    assert elapsed < 4, "curl waited for its expect timeout: 100 Continue was not relayed"


# --- 9. websockets --------------------------------------------------------------------------------------


def test_websocket_upgrade_is_tunnelled(lbd: Lbd) -> None:
    async def talk() -> tuple[str, list[str], bool, bool]:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(
                f"{lbd.url}/ws", headers={"client-id": "ws-1"}, timeout=aiohttp.ClientWSTimeout(ws_close=5)
            ) as ws,
        ):
            texts = []
            for word in ("hello", "wörld", "3"):
                await ws.send_str(word)
                texts.append(await asyncio.wait_for(ws.receive_str(), 5))
            blob = os.urandom(MiB + 3)
            await ws.send_bytes(blob)
            echoed = await asyncio.wait_for(ws.receive_bytes(), 5)
            server = texts[0].split(":", 1)[0]
            return server, texts, echoed == blob, await ws.close()

    server, texts, binary_intact, closed = asyncio.run(asyncio.wait_for(talk(), 20))
    assert server in {"f1", "f2", "f3"}
    assert texts == [f"{server}:hello", f"{server}:wörld", f"{server}:3"]
    assert binary_intact, "the binary echo differs from what was sent"
    assert closed
    # lbd keeps serving plain HTTP afterwards
    assert raw_exchange(lbd.port, build_request("GET", "/echo", {"Host": "h", "client-id": "ws-1"})).status == 200
