"""How a real lbd reads servers' responses (lbd/proxy/upstream.py, lbd/proxy/response.py).

Response bodies are forwarded as views of one read buffer shared by every upstream connection; these
tests check that no client ever gets another's bytes (slow and fast clients at once, bodies that
differ everywhere), that heads and chunked framing split anywhere across reads are read right, that
chunked framing reaches HTTP/1.1 clients as the server wrote it (extensions and trailers included),
and that a malformed response is a 502 naming what was wrong, on a connection never used again.
"""

from __future__ import annotations

import hashlib
import os
import re
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import repeat
from pathlib import Path

import pytest
import trustme

from tests.harness.backends import Backend, BackendLoop, backends, random_body, server_entry
from tests.harness.clients import RawConnection, build_request
from tests.harness.daemon import Lbd, running_lbd
from tests.harness.raw_backend import Answer, RawBackend, raw_backend

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def proxied() -> Iterator[tuple[Lbd, Backend]]:
    with backends("rand") as (backend,), running_lbd(entries=[backend.entry()]) as daemon:
        yield daemon, backend


@pytest.fixture(scope="module")
def copying(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lbd, Backend]]:
    """An lbd with `splice_responses = false`: every body goes through the shared read buffer."""
    config = tmp_path_factory.mktemp("copying") / "lbd.toml"
    config.write_text("splice_responses = false\n")
    with backends("copied") as (backend,), running_lbd(["--config", str(config)], [backend.entry()]) as daemon:
        yield daemon, backend


@pytest.mark.parametrize(
    ("lbd_fixture", "query"), [("copying", ""), ("copying", "&chunked=1"), ("proxied", ""), ("proxied", "&chunked=1")]
)
def test_a_slow_client_and_fast_clients_each_get_their_own_bytes(
    request: pytest.FixtureRequest, lbd_fixture: str, query: str
) -> None:
    """A client that reads slowly leaves views of the shared read buffer queued in its transport;
    lbd must read everybody else's responses into another buffer meanwhile. (With splicing, a
    Content-Length body the slow client cannot take goes to its transport as a copy instead.)"""
    daemon, _ = request.getfixturevalue(lbd_fixture)
    big = 8 * MiB
    errors: list[str] = []

    def fast_client(seed: int) -> None:
        with RawConnection(daemon.port, timeout=30) as connection:
            for round_ in range(15):
                size = 100_000 + 7919 * round_
                connection.send(
                    build_request("GET", f"/random/{size}?seed={seed + round_}{query}", {"client-id": f"fast-{seed}"})
                )
                body = connection.read_response().body
                if body != random_body(size, seed + round_):
                    errors.append(f"client {seed} round {round_}: {len(body)} bytes, not the server's")

    with RawConnection(daemon.port, timeout=30, rcvbuf=16 * 1024) as slow:
        slow.send(build_request("GET", f"/random/{big}?seed=1{query}", {"client-id": "slow"}))
        head = slow.read_head()
        assert head.status == 200
        fast = [threading.Thread(target=fast_client, args=(seed,)) for seed in (100, 200, 300)]
        for thread in fast:
            thread.start()
        trickled = 0
        while any(thread.is_alive() for thread in fast):  # a trickle while the others run
            trickled += len(data := slow.sock.recv(4096))
            slow.buffer += data
            time.sleep(0.002)
        for thread in fast:
            thread.join()
        body = slow.read_body(head).body
        assert trickled < big // 2  # it was still reading when the others were done
    assert not errors, errors
    assert hashlib.sha256(body).digest() == hashlib.sha256(random_body(big, 1)).digest()


# --- scripted servers -----------------------------------------------------------------------------------

HEALTHY = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]


def answering(scripts: Iterator[list[bytes]]) -> Answer:
    """/health gets 200, each other request the next script's pieces."""
    return lambda head: HEALTHY if head.startswith(b"GET /health ") else next(scripts)


@contextmanager
def behind_lbd(answer: Answer, pause_s: float = 0.02) -> Iterator[tuple[RawBackend, Client]]:
    """A raw backend answering with `answer`, and a client of an lbd in front of it; `Client.get`
    sends one GET."""
    with (
        raw_backend(answer, pause_s) as backend,
        running_lbd(entries=[server_entry("scripted", backend.port)]) as daemon,
        RawConnection(daemon.port) as connection,
    ):
        yield backend, Client(connection)


class Client:
    def __init__(self, connection: RawConnection) -> None:
        self.connection = connection

    def get(self, path: str = "/x", version: str = "HTTP/1.1") -> RawConnection:
        self.connection.send(build_request("GET", path, {"Host": "h", "client-id": "scripted"}, version=version))
        return self.connection


def test_a_head_and_body_arriving_a_few_bytes_at_a_time() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-Long: " + b"v" * 300 + b"\r\n\r\n"
    pieces = [head[i : i + 7] for i in range(0, len(head), 7)] + [b"hello", b" world"]
    with behind_lbd(answering(repeat(pieces))) as (backend, client):
        for path in ("/a", "/b"):
            response = client.get(path).read_response()
            assert response.status == 200 and response.body == b"hello world"
            assert response.header("X-Long") == "v" * 300
        # the connection stayed in step: the second response came over the same one
        assert backend.connection_of(b"GET /a HTTP/1.1") == backend.connection_of(b"GET /b HTTP/1.1")


SMALL_WHOLE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello"


@pytest.mark.parametrize(
    ("version", "lbd_lines"), [("HTTP/1.1", b""), ("HTTP/1.0", b"Connection: close\r\n")]
)  # fmt: skip
def test_a_small_response_read_whole_reaches_the_client_byte_for_byte(version: str, lbd_lines: bytes) -> None:
    """Its body leaves with its head in one piece: the client gets exactly the server's status line
    and fields, lbd's Via and framing lines, then the body and nothing more, and both connections
    stay in step for the next request."""
    expected = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nVia: 1.1 lbd\r\n" + lbd_lines + b"\r\nhello"
    with behind_lbd(answering(repeat([SMALL_WHOLE]))) as (backend, client):
        if version == "HTTP/1.0":
            assert client.get("/a", version).read_to_eof() == expected
            return
        for path in ("/a", "/b"):
            assert client.get(path).read_exact(len(expected)) == expected
        assert client.connection.still_open() and client.connection.buffer == b""
        assert backend.connection_of(b"GET /a HTTP/1.1") == backend.connection_of(b"GET /b HTTP/1.1")


def test_an_interim_response_and_a_small_one_in_the_same_read_reach_the_client_in_order() -> None:
    """The final response's head is parsed from a second copy within the read: its body is the
    one after that head, sent once."""
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    with behind_lbd(answering(repeat([interim + SMALL_WHOLE]))) as (_, client):
        expected = b"HTTP/1.1 100 Continue\r\nVia: 1.1 lbd\r\n\r\n"
        expected += b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nVia: 1.1 lbd\r\n\r\nhello"
        assert client.get("/a").read_exact(len(expected)) == expected
        assert client.connection.still_open() and client.connection.buffer == b""


CHUNKED_WITH_TRAILERS = [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n",
    b"5;name=value\r\nhel",
    b"lo\r",
    b"\n6\r\n world\r\n0\r\nX-Checksum: c0ffee\r",
    b"\n\r\n",
]


def test_chunked_framing_reaches_an_http11_client_as_the_server_wrote_it() -> None:
    with behind_lbd(answering(repeat(CHUNKED_WITH_TRAILERS))) as (_, client):
        connection = client.get()
        head = connection.read_head()
        assert head.header("Transfer-Encoding") == "chunked"
        assert head.header("Trailer") is None  # hop-by-hop
        framing = b"".join(CHUNKED_WITH_TRAILERS[1:])
        assert connection.read_exact(len(framing)) == framing  # extensions and trailers included
        assert connection.still_open()


def test_an_http10_client_gets_the_chunked_body_decoded_and_the_close() -> None:
    with behind_lbd(answering(repeat(CHUNKED_WITH_TRAILERS))) as (_, client):
        response = client.get(version="HTTP/1.0").read_response()
        assert response.header("Transfer-Encoding") is None and response.body == b"hello world"


MALFORMED = {
    "bare-lf": ([b"HTTP/1.1 200 OK\nContent-Length: 2\r\n\r\nok"], "a bare CR or LF"),
    "length-and-chunked": (
        [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"],
        "both Content-Length and Transfer-Encoding",
    ),
    "differing-lengths": ([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok"], "conflicting"),
    "space-before-colon": ([b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok"], "invalid header line"),
    "not-http": ([b"SSH-2.0-OpenSSH_9.2\r\n\r\n"], "not an HTTP/1.x status line"),
    "unasked-upgrade": ([b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"], "101"),
    "head-too-large": (
        [b"HTTP/1.1 200 OK\r\n", *[b"X-Filler: " + b"f" * 1000 + b"\r\n"] * 70, b"\r\n"],
        "larger than 65536 bytes",
    ),
}


@pytest.mark.parametrize("script,reason", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_response_is_a_502_naming_what_was_wrong(script: list[bytes], reason: str) -> None:
    good = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
    with behind_lbd(answering(iter([script, good])), pause_s=0.001) as (backend, client):
        response = client.get("/x").read_response()
        assert response.status == 502, response
        assert "sent a malformed response" in response.body.decode() and reason in response.body.decode()
        assert client.get("/y").read_response().body == b"ok"
        # the broken connection was not reused
        assert backend.connection_of(b"GET /x HTTP/1.1") != backend.connection_of(b"GET /y HTTP/1.1")


def test_bytes_after_a_complete_response_end_that_connection() -> None:
    """A server out of step (more bytes than its Content-Length): the client gets the response the
    length says, and the next request goes over a new connection."""
    with behind_lbd(answering(repeat([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n"]))) as (
        backend,
        client,
    ):
        for path in ("/x", "/y"):
            assert client.get(path).read_response().body == b"ok"
        assert backend.connection_of(b"GET /x HTTP/1.1") != backend.connection_of(b"GET /y HTTP/1.1")


def test_a_broken_chunked_body_cuts_the_client_connection() -> None:
    """Once a response has started, the client can only learn of a broken body from a cut connection."""
    script = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nhello\r\n", b"zz\r\n"]
    with behind_lbd(answering(repeat(script))) as (_, client):
        connection = client.get()
        head = connection.read_head()
        assert head.status == 200
        assert connection.read_exact(len(b"5\r\nhello\r\n")) == b"5\r\nhello\r\n"
        assert connection.closed_by_peer(5.0)


# --- splicing large bodies in the kernel ---------------------------------------------------------------


def spliced_bytes(daemon: Lbd) -> int:
    text = daemon.request("GET", "/metrics")[1]
    return int(float(re.search(r"^lbd_spliced_bytes_total (\S+)$", text, re.MULTILINE).group(1)))  # type: ignore[union-attr]


@pytest.mark.skipif(not hasattr(os, "splice"), reason="splice(2) is Linux's")
def test_large_bodies_are_spliced_and_arrive_whole(proxied: tuple[Lbd, Backend]) -> None:
    """A Content-Length body with 16 KiB or more to come after the first read moves in the kernel."""
    daemon, _ = proxied
    before = spliced_bytes(daemon)
    with RawConnection(daemon.port) as connection:
        for seed, size in ((7, 2 * MiB + 3), (8, 200_000), (9, 1000)):  # the small one is not spliced
            connection.send(build_request("GET", f"/random/{size}?seed={seed}", {"client-id": "splice"}))
            assert connection.read_response().body == random_body(size, seed)
    assert spliced_bytes(daemon) - before > MiB  # most of it: what arrives after a read is read as usual


def test_splice_responses_false_copies_every_body(copying: tuple[Lbd, Backend]) -> None:
    daemon, _ = copying
    with RawConnection(daemon.port) as connection:
        connection.send(build_request("GET", f"/random/{MiB}?seed=3", {"client-id": "copied"}))
        assert connection.read_response().body == random_body(MiB, 3)
    assert spliced_bytes(daemon) == 0


def test_a_server_sending_more_than_a_large_body_loses_its_connection() -> None:
    """The body's end is checked when it is spliced too: the bytes beyond it are dropped, not read as
    the next request's response."""
    body = bytes(range(256)) * 400  # 102,400 bytes
    script = [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:1000], body[1000:] + b"HTTP/1.1 200"]
    with behind_lbd(answering(repeat(script))) as (backend, client):
        for path in ("/x", "/y"):
            assert client.get(path).read_response().body == body
        assert backend.connection_of(b"GET /x HTTP/1.1") != backend.connection_of(b"GET /y HTTP/1.1")


def test_https_servers_are_read_through_tls_and_never_spliced(tmp_path: Path) -> None:
    """An https:// server, its certificate checked against a CA lbd trusts (SSL_CERT_FILE): bodies
    of every framing arrive whole, and none is spliced (the kernel would move ciphertext)."""
    authority = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(ca_file))
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    authority.issue_cert("127.0.0.1").configure_cert(server_tls)
    loop = BackendLoop()
    backend = Backend(loop, "tls", tls=server_tls).start()
    try:
        with running_lbd(entries=[backend.entry()], env={"SSL_CERT_FILE": str(ca_file)}) as daemon:
            with RawConnection(daemon.port) as connection:
                for query in ("", "&chunked=1"):
                    connection.send(build_request("GET", f"/random/{MiB}?seed=4{query}", {"client-id": "tls"}))
                    assert connection.read_response().body == random_body(MiB, 4)
            assert daemon.servers()["tls"]["health"] == "healthy"  # its checks go over TLS too
            assert spliced_bytes(daemon) == 0
    finally:
        backend.stop()
        loop.close()
