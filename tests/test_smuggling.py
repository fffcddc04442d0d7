"""The request-smuggling regression suite: raw bytes from a client, through a real lbd, to a backend
that records exactly what reached it and parses it with h11 (tests/harness/recording_backend.py).

The one property every probe checks: **the backend never sees a request the client did not send as
its own**, and every response a client reads is the one for its own request. A probe lbd refuses is
answered with its status and the connection closed; a probe lbd accepts reaches the backend as
exactly the requests the client meant, in order, with their bodies whole. After each probe a victim
on another connection must still get its own response (no response-queue poisoning).
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.harness.backends import server_entry
from tests.harness.clients import RawConnection, RawResponse, build_request, curl, raw_exchange
from tests.harness.daemon import Lbd, running_lbd, wait_until
from tests.harness.raw_backend import raw_backend
from tests.harness.recording_backend import RecordingBackend, SeenRequest, recording_backend

H = b"Host: h\r\nclient-id: c\r\n"  # what every probe's requests carry besides the part under test
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: internal\r\n\r\n"  # what an attacker hides in a body


@dataclass(frozen=True)
class Probe:
    raw: bytes  # what the client sends, in one write
    status: int  # the status of the first response
    reaches: tuple[tuple[str, str], ...] = ()  # (method, target) the backend may see, in order
    bodies: tuple[bytes, ...] = ()  # the bodies those requests must arrive with

    @property
    def refused(self) -> bool:
        return self.status >= 400


def post(headers: bytes, body: bytes, target: bytes = b"/p", version: bytes = b"HTTP/1.1") -> bytes:
    return b"POST " + target + b" " + version + b"\r\n" + H + headers + b"\r\n" + body


def chunked(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


REFUSED_400 = {
    # CL.TE and TE.CL: both framings at once is ambiguous, whichever comes first
    "cl-te": post(b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\nG"),
    "te-cl": post(b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n", b"0\r\n\r\n"),
    "te-cl-smuggle": post(
        b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", b"5c\r\n" + SMUGGLED + b"\r\n0\r\n\r\n"
    ),
    # TE.TE: obfuscated Transfer-Encoding headers one parser might read as chunked and another not
    "te-twice": post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", chunked(SMUGGLED)),
    "te-x-chunked": post(b"Transfer-Encoding: xchunked\r\n", chunked(SMUGGLED)),
    "te-space-before-colon": post(b"Transfer-Encoding : chunked\r\n", chunked(SMUGGLED)),
    "te-vertical-tab": post(b"Transfer-Encoding:\x0bchunked\r\n", chunked(SMUGGLED)),
    "te-quoted": post(b'Transfer-Encoding: "chunked"\r\n', chunked(SMUGGLED)),
    "te-trailing-comma": post(b"Transfer-Encoding: chunked,\r\n", chunked(SMUGGLED)),
    "te-obs-fold": post(b"Transfer-Encoding:\r\n chunked\r\n", chunked(SMUGGLED)),
    "te-folded-onto-other": post(b"X-A: b\r\n Transfer-Encoding: chunked\r\n", chunked(SMUGGLED)),
    "te-not-last": post(b"Transfer-Encoding: chunked, identity\r\n", chunked(SMUGGLED)),
    "te-not-chunked": post(b"Transfer-Encoding: identity\r\n", SMUGGLED),
    "te-in-http10": post(b"Transfer-Encoding: chunked\r\n", chunked(SMUGGLED), version=b"HTTP/1.0"),
    # llhttp's keep-alive verdict reads Proxy-Connection: it must not make an HTTP/1.0 request 1.1
    "te-in-http10-proxy-keep-alive": post(
        b"Transfer-Encoding: chunked\r\nProxy-Connection: keep-alive\r\n", chunked(SMUGGLED), version=b"HTTP/1.0"
    ),
    # duplicate and malformed Content-Length
    "cl-twice-same": post(b"Content-Length: 3\r\nContent-Length: 3\r\n", b"abc"),
    "cl-twice-differing": post(b"Content-Length: 3\r\nContent-Length: 43\r\n", b"abc" + SMUGGLED),
    "cl-list": post(b"Content-Length: 3, 3\r\n", b"abc"),
    "cl-plus": post(b"Content-Length: +3\r\n", b"abc"),
    "cl-negative": post(b"Content-Length: -1\r\n", SMUGGLED),
    "cl-hex": post(b"Content-Length: 0x3\r\n", b"abc"),
    "cl-overflow": post(b"Content-Length: 99999999999999999999999\r\n", SMUGGLED),
    "cl-space-before-colon": post(b"Content-Length : 3\r\n", b"abc" + SMUGGLED),
    # junk in chunk sizes
    "chunk-size-junk": post(b"Transfer-Encoding: chunked\r\n", b"3x\r\nabc\r\n0\r\n\r\n" + SMUGGLED),
    "chunk-size-hex-prefix": post(b"Transfer-Encoding: chunked\r\n", b"0x3\r\nabc\r\n0\r\n\r\n"),
    "chunk-size-negative": post(b"Transfer-Encoding: chunked\r\n", b"-3\r\nabc\r\n0\r\n\r\n"),
    "chunk-size-leading-space": post(b"Transfer-Encoding: chunked\r\n", b" 3\r\nabc\r\n0\r\n\r\n"),
    "chunk-size-overflow": post(b"Transfer-Encoding: chunked\r\n", b"10000000000000003\r\nabc\r\n0\r\n\r\n"),
    "chunk-size-bare-lf": post(b"Transfer-Encoding: chunked\r\n", b"3\nabc\r\n0\r\n\r\n"),
    "chunk-data-longer": post(b"Transfer-Encoding: chunked\r\n", b"3\r\nabcdef\r\n0\r\n\r\n"),
    "chunk-data-bare-lf": post(b"Transfer-Encoding: chunked\r\n", b"3\r\nabc\n0\r\n\r\n"),
    # NUL, CR and bare LF in the head
    "nul-in-value": b"GET /x HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n",
    "nul-in-name": b"GET /x HTTP/1.1\r\n" + H + b"X-\x00A: a\r\n\r\n",
    "cr-in-value": b"GET /x HTTP/1.1\r\n" + H + b"X-A: a\rb\r\n\r\n",
    "bare-lf-line": b"GET /x HTTP/1.1\r\n" + b"Host: h\nclient-id: c\r\n\r\n",
    "bare-lf-everywhere": b"GET /x HTTP/1.1\nHost: h\nclient-id: c\n\n",
    "cr-in-request-line": b"GET /x\rHTTP/1.1\r\n" + H + b"\r\n",
    "space-in-target": b"GET /x y HTTP/1.1\r\n" + H + b"\r\n",
    # Host (RFC 9112 §3.2) and the request target
    "no-host": b"GET /x HTTP/1.1\r\nclient-id: c\r\n\r\n",
    "two-hosts": b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\nclient-id: c\r\n\r\n",
    "host-with-space": b"GET /x HTTP/1.1\r\nHost: a b\r\nclient-id: c\r\n\r\n",
    "host-with-slash": b"GET /x HTTP/1.1\r\nHost: a/b\r\nclient-id: c\r\n\r\n",
    "host-with-userinfo": b"GET http://user@other/x HTTP/1.1\r\n" + H + b"\r\n",
    "target-not-a-path": b"GET x HTTP/1.1\r\n" + H + b"\r\n",
    "target-other-scheme": b"GET ftp://other/x HTTP/1.1\r\n" + H + b"\r\n",
    "asterisk-not-options": b"GET * HTTP/1.1\r\n" + H + b"\r\n",
    "host-with-comma": b"GET /x HTTP/1.1\r\nHost: evil.example,good.example\r\nclient-id: c\r\n\r\n",
    "two-client-ids": b"GET /x HTTP/1.1\r\nHost: h\r\nclient-id: a\r\nclient-id: b\r\n\r\n",
    "two-client-ids-spelled-apart": b"GET /x HTTP/1.1\r\nHost: h\r\nclient-id: a\r\nClient-ID: b\r\n\r\n",
    "two-client-ids-in-a-post": post(b"CLIENT-ID: b\r\nContent-Length: 3\r\n", b"abc"),  # llhttp's path
    "two-client-regions": b"GET /x HTTP/1.1\r\n" + H + b"client-region: a\r\nClient-Region: b\r\n\r\n",
    # llhttp parses nothing after the head of an upgrade request: a body it declares would never be
    # forwarded, and the server would read lbd's next request on that connection as that body
    "upgrade-with-length": b"GET /ws HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Content-Length: 5\r\n\r\nhello",
    "h2c-with-length": b"GET /ws HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: h2c\r\n"
    b"Content-Length: 22\r\n\r\n",
    "upgrade-with-chunked": b"POST /ws HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n" + chunked(SMUGGLED),
}

PROBES: dict[str, Probe] = {name: Probe(raw, 400) for name, raw in REFUSED_400.items()}
PROBES |= {
    "te-coding-before-chunked": Probe(post(b"Transfer-Encoding: gzip, chunked\r\n", chunked(b"abc")), 501),
    # a CONNECT is refused, and whatever is pipelined behind it is never parsed as a request
    "connect-then-request": Probe(
        b"CONNECT internal:80 HTTP/1.1\r\nHost: internal:80\r\nclient-id: c\r\n\r\n" + SMUGGLED, 405
    ),
    # `Connection` naming the framing headers: lbd forwards its own framing, so the body stays a body
    "connection-names-content-length": Probe(
        post(b"Connection: Content-Length\r\nContent-Length: %d\r\n" % len(SMUGGLED), SMUGGLED),
        200,
        (("POST", "/p"),),
        (SMUGGLED,),
    ),
    "connection-list-names-content-length": Probe(
        post(b"Connection: close, content-length\r\nContent-Length: %d\r\n" % len(SMUGGLED), SMUGGLED),
        200,
        (("POST", "/p"),),
        (SMUGGLED,),
    ),
    "connection-names-content-length-http10": Probe(
        post(
            b"Connection: keep-alive, CONTENT-LENGTH\r\nContent-Length: %d\r\n" % len(SMUGGLED),
            SMUGGLED,
            version=b"HTTP/1.0",
        ),
        200,
        (("POST", "/p"),),
        (SMUGGLED,),
    ),
    "connection-names-transfer-encoding": Probe(
        post(b"Connection: Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n", chunked(SMUGGLED)),
        200,
        (("POST", "/p"),),
        (SMUGGLED,),
    ),
    "connection-names-host": Probe(
        b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: Host\r\nclient-id: c\r\n\r\n", 200, (("GET", "/x"),)
    ),
    # legitimate framing the suite must not break: pipelined requests after bodies arrive as sent
    "pipelined-after-length": Probe(
        post(b"Content-Length: 5\r\n", b"hello") + b"GET /second HTTP/1.1\r\n" + H + b"\r\n",
        200,
        (("POST", "/p"), ("GET", "/second")),
        (b"hello", b""),
    ),
    "pipelined-after-chunked": Probe(
        post(b"Transfer-Encoding: chunked\r\n", b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n")
        + b"GET /second HTTP/1.1\r\n"
        + H
        + b"\r\n",
        200,
        (("POST", "/p"), ("GET", "/second")),
        (b"hello", b""),
    ),
    "pipelined-after-get-with-body": Probe(
        b"GET /first HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n\r\nabc" + b"GET /second HTTP/1.1\r\n" + H + b"\r\n",
        200,
        (("GET", "/first"), ("GET", "/second")),
        (b"abc", b""),
    ),
    "length-with-trailing-space": Probe(
        post(b"Content-Length: 3 \r\n", b"abc") + b"GET /second HTTP/1.1\r\n" + H + b"\r\n",
        200,
        (("POST", "/p"), ("GET", "/second")),
        (b"abc", b""),
    ),
    "chunked-upper-case": Probe(post(b"Transfer-Encoding: CHUNKED\r\n", chunked(SMUGGLED)), 200, (("POST", "/p"),)),
    "chunked-tab": Probe(post(b"Transfer-Encoding:\tchunked\r\n", chunked(SMUGGLED)), 200, (("POST", "/p"),)),
    "options-asterisk": Probe(b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n", 200, (("OPTIONS", "*"),)),
    "absolute-form": Probe(b"GET http://other.example/x?q=1 HTTP/1.1\r\n" + H + b"\r\n", 200, (("GET", "/x?q=1"),)),
    "absolute-form-options": Probe(
        b"OPTIONS http://other.example HTTP/1.1\r\n" + H + b"\r\n", 200, (("OPTIONS", "*"),)
    ),
    "host-with-trailing-whitespace": Probe(
        b"GET /x HTTP/1.1\r\nHost: h \t\r\nclient-id: c\r\n\r\n", 200, (("GET", "/x"),)
    ),
    "upgrade-without-body": Probe(
        b"GET /ws HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 0\r\n\r\n",
        200,
        (("GET", "/ws"),),
    ),
    "http10-without-host": Probe(b"GET /old HTTP/1.0\r\nclient-id: c\r\n\r\n", 200, (("GET", "/old"),)),
    "http10-without-host-proxy-keep-alive": Probe(
        b"GET /old HTTP/1.0\r\nclient-id: c\r\nProxy-Connection: keep-alive\r\n\r\n", 200, (("GET", "/old"),)
    ),
    # the compiled scan reads plain heads, llhttp the rest (request_scan.py): the hand-over mid-read
    # keeps every boundary, and what llhttp refuses after a scanned request is never forwarded
    "scanned-then-llhttp-then-get": Probe(
        b"GET /first HTTP/1.1\r\n"
        + H
        + b"\r\n"
        + post(b"Content-Length: %d\r\n" % len(SMUGGLED), SMUGGLED)
        + b"GET /third HTTP/1.1\r\n"
        + H
        + b"\r\n",
        200,
        (("GET", "/first"), ("POST", "/p"), ("GET", "/third")),
        (b"", SMUGGLED, b""),
    ),
    "scanned-then-cl-te": Probe(
        b"GET /first HTTP/1.1\r\n" + H + b"\r\n" + REFUSED_400["cl-te"], 200, (("GET", "/first"),)
    ),
    "scanned-then-bare-lf": Probe(
        b"GET /first HTTP/1.1\r\n" + H + b"\r\n" + REFUSED_400["bare-lf-line"], 200, (("GET", "/first"),)
    ),
    "get-with-length-zero-then-get": Probe(
        b"GET /first HTTP/1.1\r\n" + H + b"Content-Length: 0\r\n\r\nGET /second HTTP/1.1\r\n" + H + b"\r\n",
        200,
        (("GET", "/first"), ("GET", "/second")),
    ),
    "value-with-trailing-space-then-get": Probe(
        b"GET /first HTTP/1.1\r\n" + H + b"X-A: a \r\n\r\nGET /second HTTP/1.1\r\n" + H + b"\r\n",
        200,
        (("GET", "/first"), ("GET", "/second")),
    ),
}


@pytest.fixture(scope="module")
def proxied() -> Iterator[tuple[Lbd, RecordingBackend]]:
    with recording_backend() as backend, running_lbd(entries=[server_entry("recorder", backend.port)]) as daemon:
        yield daemon, backend


def responses(connection: RawConnection, count: int) -> list[RawResponse]:
    """Up to `count` responses, fewer if the connection closes first."""
    read: list[RawResponse] = []
    while len(read) < count:
        try:
            read.append(connection.read_response())
        except AssertionError:  # closed
            break
    return read


@pytest.mark.parametrize("probe", PROBES.values(), ids=PROBES.keys())
def test_the_backend_sees_only_requests_the_client_sent(proxied: tuple[Lbd, RecordingBackend], probe: Probe) -> None:
    daemon, backend = proxied
    before, errors = len(backend.seen), len(backend.protocol_errors)
    with RawConnection(daemon.port) as attacker:
        attacker.send(probe.raw)
        answers = responses(attacker, max(1, len(probe.reaches)))
        assert answers, f"no response to {probe.raw!r}"
        assert answers[0].status == probe.status, answers[0]
        if probe.refused:
            assert "close" in answers[0].connection_tokens and attacker.closed_by_peer()
        else:
            assert [a.body.decode().split(" #")[0] for a in answers] == [f"seen {m} {t}" for m, t in probe.reaches]
    # the victim on its own connection gets its own response, never one meant for a smuggled request
    with RawConnection(daemon.port) as victim:
        victim.send(build_request("GET", "/victim", {"client-id": "v"}))
        assert victim.read_response().body.startswith(b"seen GET /victim #")
    seen = backend.seen[before:]
    assert [(s.method, s.target) for s in seen] == [*probe.reaches, ("GET", "/victim")]
    for request, body in zip(seen, probe.bodies, strict=False):
        assert request.body == body
    assert backend.protocol_errors[errors:] == []  # what lbd forwarded always parsed cleanly


@pytest.mark.parametrize(
    ("probe", "field"),
    [("two-client-ids-spelled-apart", "client-id"), ("two-client-ids-in-a-post", "client-id"),
     ("two-client-regions", "client-region")],
)  # fmt: skip
def test_a_routing_field_sent_twice_is_named_in_the_refusal(
    proxied: tuple[Lbd, RecordingBackend], probe: str, field: str
) -> None:
    """lbd and the server could each route by a different one: refused, naming the field as lbd
    spells it whatever the client's spelling (no client bytes echoed)."""
    daemon, _ = proxied
    answer = raw_exchange(daemon.port, PROBES[probe].raw)
    refusal = f"400 Bad Request: more than one {field} header; lbd routes by one\n"
    assert (answer.status, answer.body.decode()) == (400, refusal)


def test_after_proxy_connection_close_the_connection_ends(proxied: tuple[Lbd, RecordingBackend]) -> None:
    """llhttp takes no request after one with `Proxy-Connection: close` (it reads it as Connection):
    the response says Connection: close and lbd closes, so no later request is read, whether it came
    in the same read (pipelined) or after the response."""
    daemon, backend = proxied
    before = len(backend.seen)
    with RawConnection(daemon.port) as client:
        client.send(b"GET /a HTTP/1.1\r\n" + H + b"Proxy-Connection: close\r\n\r\n")
        response = client.read_response()
        assert response.status == 200 and response.connection_tokens == {"close"}
        assert client.read_to_eof() == b""
    with RawConnection(daemon.port) as client:
        client.send(b"GET /b HTTP/1.1\r\n" + H + b"Proxy-Connection: close\r\n\r\nGET /c HTTP/1.1\r\n" + H + b"\r\n")
        response = client.read_response()
        assert response.status == 200 and response.connection_tokens == {"close"}
        assert client.read_to_eof() == b""
    assert [(s.method, s.target) for s in backend.seen[before:]] == [("GET", "/a"), ("GET", "/b")]


@pytest.mark.parametrize("ending", [b"Proxy-Connection: close\r\n", b"Connection: close\r\n"])
def test_a_pipelined_request_that_ends_the_connection_is_served_and_what_follows_dropped(
    proxied: tuple[Lbd, RecordingBackend], ending: bytes
) -> None:
    """Behind the request being served, one that ends the connection is still answered (with
    Connection: close); the bytes after it are dropped unread, not refused, as HAProxy and nginx do."""
    daemon, backend = proxied
    before = len(backend.seen)
    with RawConnection(daemon.port) as client:
        client.send(
            b"POST /d HTTP/1.1\r\n" + H + b"Content-Length: 1\r\n\r\nx"
            b"GET /e HTTP/1.1\r\n" + H + ending + b"\r\n" + SMUGGLED
        )
        first, second = client.read_response(), client.read_response()
        assert (first.status, second.status) == (200, 200) and second.connection_tokens == {"close"}
        assert client.read_to_eof() == b""
    assert [(s.method, s.target) for s in backend.seen[before:]] == [("POST", "/d"), ("GET", "/e")]


def test_forwarded_framing_and_host_are_lbd_s_own(proxied: tuple[Lbd, RecordingBackend]) -> None:
    """Each forwarded request carries exactly one Host and one framing header, whatever the client's
    Connection header named."""
    daemon, backend = proxied
    before = len(backend.seen)
    with RawConnection(daemon.port) as connection:
        connection.send(post(b"Connection: Content-Length, Host\r\nContent-Length: 2\r\n", b"ok"))
        assert connection.read_response().status == 200
    (seen,) = backend.seen[before:]
    assert seen.header_all("host") == ["h"] and seen.header_all("content-length") == ["2"]
    assert seen.header("transfer-encoding") is None and seen.header("connection") is None


def test_an_absolute_form_target_sets_host_and_x_forwarded_host(proxied: tuple[Lbd, RecordingBackend]) -> None:
    """RFC 9112 §3.2.2: the target's authority replaces the Host header, and X-Forwarded-Host agrees."""
    daemon, backend = proxied
    before = len(backend.seen)
    with RawConnection(daemon.port) as connection:
        connection.send(b"GET http://other.example:8080/x HTTP/1.1\r\nHost: spoofed\r\nclient-id: c\r\n\r\n")
        assert connection.read_response().status == 200
    (seen,) = backend.seen[before:]
    assert seen.target == "/x"
    assert seen.header_all("host") == ["other.example:8080"]
    assert seen.header_all("x-forwarded-host") == ["other.example:8080"]


def test_a_client_s_forwarded_header_never_contradicts_lbd_s_own(proxied: tuple[Lbd, RecordingBackend]) -> None:
    """lbd states the client's address, protocol and host in X-Forwarded-*; RFC 7239's Forwarded from
    a client could say otherwise, so it is removed, and Host is trimmed of trailing whitespace."""
    daemon, backend = proxied
    before = len(backend.seen)
    with RawConnection(daemon.port) as connection:
        connection.send(
            b"GET /x HTTP/1.1\r\nHost: front.example \r\nclient-id: c\r\n"
            b"Forwarded: for=1.2.3.4;host=evil.example;proto=https\r\nX-Forwarded-Proto: https\r\n\r\n"
        )
        assert connection.read_response().status == 200
    (seen,) = backend.seen[before:]
    assert seen.header("forwarded") is None
    assert seen.header_all("host") == seen.header_all("x-forwarded-host") == ["front.example"]
    assert seen.header_all("x-forwarded-proto") == ["http"]


def test_a_trailer_that_never_ends_is_refused_and_costs_nothing(proxied: tuple[Lbd, RecordingBackend]) -> None:
    """llhttp gathers a trailer field until its line ends: a client that never ends it is cut once
    its framing passes max_header_bytes, while everybody else is served."""
    daemon, _ = proxied
    with RawConnection(daemon.port) as attacker:
        attacker.send(post(b"Transfer-Encoding: chunked\r\n", b"3\r\nabc\r\n0\r\nX-T: "))
        sent = 0
        while sent < 8 << 20 and not select.select([attacker.sock], [], [], 0.01)[0]:  # bounded, far past the limit
            attacker.send(b"a" * 65536)
            sent += 65536
        response = attacker.read_response()
        assert response.status == 431 and b"chunk framing and trailer" in response.body, response
        assert sent <= 1 << 20, f"lbd read {sent} bytes of an endless trailer before refusing it"
    with RawConnection(daemon.port) as victim:
        victim.send(build_request("GET", "/victim", {"client-id": "v"}))
        assert victim.read_response().status == 200


def test_a_half_closed_client_gets_the_answers_to_what_it_sent(proxied: tuple[Lbd, RecordingBackend]) -> None:
    """A client that sends its requests and then its FIN (`nc -N`, some scripts) is answered, every
    pipelined request in order, before lbd closes."""
    daemon, _ = proxied
    with RawConnection(daemon.port) as client:
        client.send(build_request("GET", "/one", {"client-id": "h"}) + build_request("GET", "/two", {"client-id": "h"}))
        client.sock.shutdown(socket.SHUT_WR)
        bodies = [client.read_response().body for _ in range(2)]
        assert [body.split(b" #")[0] for body in bodies] == [b"seen GET /one", b"seen GET /two"]
        assert client.closed_by_peer()


def test_an_http10_request_without_host_gets_the_server_s_address(proxied: tuple[Lbd, RecordingBackend]) -> None:
    daemon, backend = proxied
    before = len(backend.seen)
    with RawConnection(daemon.port) as connection:
        connection.send(b"GET /old HTTP/1.0\r\nclient-id: c\r\n\r\n")
        assert connection.read_response().status == 200
    (seen,) = backend.seen[before:]
    assert seen.header_all("host") == [f"127.0.0.1:{backend.port}"] and seen.header("x-forwarded-host") is None


def test_h2c_is_never_switched_through(proxied: tuple[Lbd, RecordingBackend]) -> None:
    """h2c smuggling: a request offering only h2c is served as a plain request (and its connection
    closed after it); h2c is struck from a list of offered protocols."""
    daemon, backend = proxied
    before = len(backend.seen)
    with RawConnection(daemon.port) as connection:
        connection.send(
            b"GET /h2c HTTP/1.1\r\n" + H + b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n" + SMUGGLED
        )
        response = connection.read_response()
        assert response.status == 200 and "close" in response.connection_tokens
        assert connection.closed_by_peer()
    (seen,) = backend.seen[before:]
    for name in ("upgrade", "connection", "http2-settings"):
        assert seen.header(name) is None, seen.headers


def test_h2c_is_struck_from_a_list_of_offered_protocols() -> None:
    """The server is offered only what is left (`websocket`); a 101 to h2c would be refused with 502."""
    offered: list[bytes] = []

    def answer(head: bytes) -> list[bytes]:
        offered.append(head)
        return [b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n"]

    with raw_backend(answer) as backend, running_lbd(entries=[server_entry("up", backend.port)]) as daemon:
        with RawConnection(daemon.port) as connection:
            connection.send(
                build_request("GET", "/ws", {"client-id": "c", "Connection": "upgrade", "Upgrade": "h2c, websocket"})
            )
            response = connection.read_response()
        assert response.status == 502 and b"did not offer" in response.body
        assert offered[0].endswith(b"\r\nUpgrade: websocket")  # the head, without its empty line


def test_a_server_naming_content_length_in_connection_keeps_its_body_framed() -> None:
    """The response side of the same hole: the client still learns where the body ends, and the next
    response on its kept-alive connection is its own."""
    with (
        raw_backend(
            lambda head: [b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 5\r\n\r\nhello"]
        ) as b,
        running_lbd(entries=[server_entry("named", b.port)]) as daemon,
        RawConnection(daemon.port) as client,
    ):
        for path in ("/a", "/b"):
            client.send(build_request("GET", path, {"client-id": "c"}))
            response = client.read_response()
            assert response.header_all("Content-Length") == ["5"] and response.body == b"hello"
            assert "close" not in response.connection_tokens


def test_a_malformed_chunk_in_the_first_read_is_a_502() -> None:
    """The head and a broken chunk in one read: nothing has left lbd yet, so the client gets the 502
    naming the problem instead of an empty reply."""
    broken = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"
    with (
        raw_backend(lambda head: [broken]) as backend,
        running_lbd(entries=[server_entry("b", backend.port)]) as daemon,
    ):
        with RawConnection(daemon.port) as client:
            client.send(build_request("GET", "/x", {"client-id": "c"}))
            response = client.read_response()
        assert response.status == 502 and b"invalid chunk size line" in response.body, response


# --- never replay a request a server may have processed ---------------------------------------------


def crashes_on_post(request: SeenRequest) -> bool:
    return request.method == "POST"


@pytest.fixture
def two_crashing_servers() -> Iterator[tuple[Lbd, RecordingBackend, RecordingBackend]]:
    with recording_backend(crashes_on_post) as one, recording_backend(crashes_on_post) as two:
        entries = [server_entry("one", one.port), server_entry("two", two.port)]
        with running_lbd(entries=entries) as daemon:
            yield daemon, one, two


@pytest.mark.parametrize("warm", [False, True], ids=["new-connection", "pooled-connection"])
def test_a_post_the_server_read_is_never_sent_again(
    two_crashing_servers: tuple[Lbd, RecordingBackend, RecordingBackend], warm: bool
) -> None:
    """A POST read whole and then reset on reaches one server once; the client gets one 502. The same
    whether it went over a new connection or a pooled one, and although a backup server is there."""
    daemon, one, two = two_crashing_servers
    with RawConnection(daemon.port) as client:
        if warm:  # the client's server has a pooled connection that just served it
            client.send(build_request("GET", "/warm", {"client-id": "poster"}))
            assert client.read_response().status == 200
        client.send(build_request("POST", "/pay", {"client-id": "poster"}, body=b"amount=10"))
        response = client.read_response()
    assert response.status == 502 and b"closed the connection before responding" in response.body
    posts = [request for backend in (one, two) for request in backend.seen if request.method == "POST"]
    assert len(posts) == 1 and posts[0].body == b"amount=10"


def test_an_idempotent_request_reset_after_reading_is_retried() -> None:
    """A GET is safe to send again: reset once on a pooled connection, it is answered by the retry on
    a new one."""
    resets: list[SeenRequest] = []

    def first_get_resets(request: SeenRequest) -> bool:
        if request.target == "/flaky" and not resets:
            resets.append(request)
            return True
        return False

    with (
        recording_backend(first_get_resets) as backend,
        running_lbd(entries=[server_entry("r", backend.port)]) as daemon,
    ):
        with RawConnection(daemon.port) as client:
            client.send(build_request("GET", "/warm", {"client-id": "c"}))
            assert client.read_response().status == 200
            client.send(build_request("GET", "/flaky", {"client-id": "c"}))
            assert client.read_response().status == 200
        assert backend.requests().count(("GET", "/flaky")) == 2


def test_a_post_after_a_long_idle_never_meets_a_closing_pooled_connection() -> None:
    """The keep-alive race: a server resets, unprocessed, a request that arrives on a connection idle
    past its keep-alive timeout. A GET on such a pooled connection is retried on a new one; a POST is
    never sent over a connection idle that long (non_idempotent_reuse_ms), so it needs no retry."""
    with (
        recording_backend(idle_timeout_s=1.2) as backend,
        running_lbd(entries=[server_entry("r", backend.port)]) as daemon,
        RawConnection(daemon.port) as client,
    ):
        for method in ("GET", "POST"):
            client.send(build_request("GET", "/warm", {"client-id": "c"}))
            assert client.read_response().status == 200
            time.sleep(1.5)  # the subject of the test: the pooled connection ages past both timeouts
            client.send(
                build_request(method, "/after-idle", {"client-id": "c"}, body=b"x" if method == "POST" else b"")
            )
            assert client.read_response().status == 200
        assert backend.requests().count(("POST", "/after-idle")) == 1
        assert backend.dropped == 1  # only the GET met the closing connection, and was retried


def test_a_post_reuses_a_connection_that_just_served() -> None:
    """Within non_idempotent_reuse_ms a pooled connection is trusted for a POST too: sequential POSTs
    keep one upstream connection."""
    with recording_backend() as backend, running_lbd(entries=[server_entry("r", backend.port)]) as daemon:
        with RawConnection(daemon.port) as client:
            for n in range(5):
                client.send(build_request("POST", f"/p{n}", {"client-id": "c"}, body=b"b" * n))
                assert client.read_response().status == 200
        assert {request.connection for request in backend.seen} == {backend.seen[0].connection}


# --- refusals are quiet, and sessions follow deregistration ------------------------------------------


def test_a_refused_request_with_a_body_logs_no_traceback(proxied: tuple[Lbd, RecordingBackend]) -> None:
    daemon, _ = proxied
    before = len(daemon.log())
    for _ in range(20):
        result = curl("-sS", "-o", "/dev/null", "-w", "%{http_code}", "-d", "a=b", f"{daemon.url}/form")
        assert result.stdout == b"400"
    logged = daemon.log()[before:]
    assert "Traceback" not in logged and "ERROR" not in logged, logged[:2000]


def test_a_request_with_a_body_from_an_unknown_region_is_refused_quietly() -> None:
    """Dynamic mode: an unknown client-region is the client's mistake, answered 400 at once (the body
    unread), with at most one line of lbd's log per request and never a traceback."""
    with recording_backend() as one, running_lbd(["--mode", "dynamic"], [server_entry("one", one.port)]) as daemon:
        before = len(daemon.log())
        for _ in range(20):
            result = curl(
                "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H", "client-id: c", "-H", "client-region: mars",
                "-d", "a=b", f"{daemon.url}/form",
            )  # fmt: skip
            assert result.stdout == b"400"
        logged = daemon.log()[before:]
        assert "Traceback" not in logged and "ERROR" not in logged, logged[:2000]
        assert len(logged.splitlines()) <= 20, logged[:2000]
        assert [target for _, target in one.requests() if target == "/form"] == [], "nothing reached the server"


def test_sessions_of_a_deregistered_server_are_dropped() -> None:
    with recording_backend() as one, recording_backend() as two:
        entries = [server_entry("one", one.port), server_entry("two", two.port)]
        with running_lbd(["--mode", "dynamic"], entries) as daemon:
            for n in range(20):
                assert daemon.proxy_get(client=f"c{n}", region="us-east")[0] == 200
            pinned = daemon.get("/v1/sessions/summary")["by_server"]
            assert sum(pinned.values()) == 20
            victim = max(pinned, key=pinned.get)
            assert daemon.request("DELETE", f"/v1/servers/{victim}?now=true")[0] == 200
            summary = daemon.get("/v1/sessions/summary")
            assert victim not in summary["by_server"] and summary["total"] == 20 - pinned[victim]
            assert all(session["server"] != victim for session in daemon.get("/v1/sessions")["sessions"])
            wait_until(lambda: daemon.proxy_get(client="c0", region="us-east")[0] == 200)
