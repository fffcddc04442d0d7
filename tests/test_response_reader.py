"""lbd's reader of server responses (lbd.proxy.response): heads and body framing, pure.

The property tests compare it with httptools (llhttp), the parser lbd used before and still uses
for requests: on any well-formed response, split into reads anywhere, both must agree on the status,
the fields, where the body ends and what it holds, and whether the connection can be kept.
"""

from __future__ import annotations

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbd.proxy.headers import without_named
from lbd.proxy.response import (
    CHUNKED,
    LENGTH,
    MAX_CHUNK_LINE,
    NO_BODY,
    UNTIL_CLOSE,
    BadResponse,
    ChunkedBody,
    ResponseHead,
    parse_head,
)

NGINX_HEAD = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 01 Dec 2026 19:07:51 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 65536\r\nConnection: keep-alive\r\n"
    b'ETag: "692de9ac-10000"\r\nAccept-Ranges: bytes\r\n\r\n'
)


def test_a_typical_head() -> None:
    head = parse_head(NGINX_HEAD + b"body bytes")
    assert head is not None
    assert (head.status, head.line, head.http10, head.size) == (200, b"HTTP/1.1 200 OK\r\n", False, len(NGINX_HEAD))
    assert head.content_length == 65536 and head.framing(answers_head=False) == LENGTH
    assert head.conn_tokens == {b"keep-alive"} and head.keep_alive(LENGTH)
    # forwarded as the server wrote them, minus the hop-by-hop Connection line
    assert b"".join(head.header_pieces) == NGINX_HEAD.split(b"\r\n", 1)[1].replace(
        b"Connection: keep-alive\r\n", b""
    ).removesuffix(b"\r\n")


@pytest.mark.parametrize(
    ("line", "forwarded"),
    [
        (b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK"),  # as it came
        (b"HTTP/1.1 404 Gone Fishing", b"HTTP/1.1 404 Gone Fishing"),
        (b"HTTP/1.0 200 OK", b"HTTP/1.1 200 OK"),  # lbd speaks HTTP/1.1 to its clients
        (b"HTTP/1.1 200", b"HTTP/1.1 200 OK"),  # no reason: the standard one
        (b"HTTP/1.1 503 ", b"HTTP/1.1 503 Service Unavailable"),
        (b"HTTP/1.1 599", b"HTTP/1.1 599 Unknown"),
        (b"HTTP/1.0 204 Empty", b"HTTP/1.1 204 Empty"),
    ],
)
def test_the_status_line_forwarded_is_http11_with_a_reason(line: bytes, forwarded: bytes) -> None:
    head = parse_head(line + b"\r\nContent-Length: 0\r\n\r\n")
    assert head is not None and head.line == forwarded + b"\r\n"


def test_every_prefix_of_a_head_is_incomplete_not_an_error() -> None:
    for end in range(len(NGINX_HEAD)):
        assert parse_head(NGINX_HEAD[:end]) is None, end


@pytest.mark.parametrize(
    ("head", "framing"),
    [
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", NO_BODY),
        (b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n", NO_BODY),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", CHUNKED),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", UNTIL_CLOSE),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n", CHUNKED),
        (b"HTTP/1.0 200 OK\r\n\r\n", UNTIL_CLOSE),
        (b"HTTP/1.1 200\r\ncontent-length: 0\r\n\r\n", LENGTH),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nContent-Length: 7\r\n\r\n", LENGTH),
    ],
)
def test_framing(head: bytes, framing: int) -> None:
    parsed = parse_head(head)
    assert parsed is not None and parsed.framing(answers_head=False) == framing
    assert parsed.framing(answers_head=True) == NO_BODY


def test_a_repeated_content_length_is_forwarded_once() -> None:
    parsed = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nX: y\r\ncontent-length: 7\r\n\r\n")
    assert parsed is not None and b"".join(parsed.header_pieces) == b"Content-Length: 7\r\nX: y\r\n"


def test_hop_by_hop_fields_are_noted_not_forwarded() -> None:
    parsed = parse_head(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade, X-Secret\r\n"
        b"Keep-Alive: timeout=5\r\nVia: 1.1 a\r\nVIA: 1.0 b\r\nX-Secret: s\r\nX-Kept: k\r\n\r\n"
    )
    assert parsed is not None
    assert (parsed.upgrade, parsed.via) == (b"websocket", b"1.1 a, 1.0 b")
    assert parsed.conn_tokens == {b"upgrade", b"x-secret"}
    assert b"".join(parsed.header_pieces) == b"X-Secret: s\r\nX-Kept: k\r\n"
    assert without_named(parsed.header_pieces, frozenset({b"x-secret"})) == [b"X-Kept: k\r\n"]


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        (b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n", "CR or LF"),
        (b"HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n", "CR or LF"),
        (b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n", "control character \\(0x00\\)"),
        (b"HTTP/1.1 200 OK\r\nX : a\r\n\r\n", "invalid header line"),
        (b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n", "invalid header line"),
        (b"HTTP/1.1 200 OK\r\n: a\r\n\r\n", "invalid header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n", "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1,1\r\n\r\n", "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "conflicting"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", "both"),
        (b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "HTTP/1.0"),
        (b"HTTP/2.0 200 OK\r\n\r\n", "status line"),
        (b"HTTP/1.1 20 OK\r\n\r\n", "status line"),
        (b"HTTP/1.1 200OK\r\n\r\n", "status line"),
        (b"ICY 200 OK\r\n\r\n", "status line"),
        (b"HTTP/1.1 600 Odd\r\n\r\n", "outside 100-599"),
    ],
)
def test_malformed_heads_are_refused_with_the_reason(head: bytes, reason: str) -> None:
    with pytest.raises(BadResponse, match=reason):
        parse_head(head)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"g\r\n", "chunk size"),
        (b"\r\n", "chunk size"),
        (b"1 x\r\n", "chunk size"),
        (b"1 ;ext\r\n", "chunk size"),
        (b"1000000000000000\r\n", "chunk size"),
        (b"1\r\nab\r\n", "longer than its size"),
        (b"1\nab\r\n", "control character"),
        (b"0\r\nbad trailer\r\n\r\n", "trailer"),
        (b"1" * (MAX_CHUNK_LINE + 1), "longer than"),
    ],
)
def test_malformed_chunked_bodies_are_refused(body: bytes, reason: str) -> None:
    with pytest.raises(BadResponse, match=reason):
        read_chunked(ChunkedBody(), bytearray(body))


def read_chunked(chunks: ChunkedBody, buf: bytearray) -> tuple[bytes, int]:
    """Drive `chunks` over one buffer as the upstream connection does: (the data, bytes consumed)."""
    data, pos = b"", 0
    while pos < len(buf) and not chunks.done:
        if chunks.in_data:
            taken = chunks.take_data(len(buf) - pos)
            data += bytes(buf[pos : pos + taken])
            pos += taken
        else:
            pos = chunks.advance(buf, pos, len(buf))
    return data, pos


# --- differential: lbd's reader against httptools ---------------------------------------------------

TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
names = st.text(alphabet=TCHARS, min_size=1, max_size=20).filter(
    lambda n: (
        n.lower()
        not in {"content-length", "transfer-encoding", "connection", "upgrade", "keep-alive", "proxy-connection", "te"}
    )
) | st.sampled_from(["Via", "VIA"])  # taken out and joined, for lbd to append its own (never forwarded as it came)
values = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30)
chunk_sizes = st.lists(st.integers(min_value=1, max_value=3000), max_size=6)


@st.composite
def responses(draw: st.DrawFn) -> tuple[bytes, int]:
    """A well-formed response (head and body) and its framing."""
    http10 = draw(st.booleans())
    status = draw(st.sampled_from([200, 201, 204, 206, 301, 304, 404, 500, 503]))
    fields = [(draw(names), draw(values)) for _ in range(draw(st.integers(0, 8)))]
    connection = draw(st.sampled_from([None, "close", "keep-alive", "Keep-Alive"]))
    if connection is not None:
        fields.insert(draw(st.integers(0, len(fields))), ("Connection", connection))
    framing = draw(st.sampled_from([LENGTH, UNTIL_CLOSE] if http10 else [LENGTH, CHUNKED, UNTIL_CLOSE]))
    if status in (204, 304):
        framing = NO_BODY
    body = b""
    if framing == LENGTH:
        body = draw(st.binary(max_size=5000))
        fields.append(("Content-Length", str(len(body))))
    elif framing == CHUNKED:
        fields.append(("Transfer-Encoding", "chunked"))
        for size in draw(chunk_sizes):
            extension = draw(st.sampled_from(["", ";a=b", ";name"]))
            body += b"%x%s\r\n" % (size, extension.encode()) + draw(st.binary(min_size=size, max_size=size)) + b"\r\n"
        body += b"0\r\n" + b"".join(b"T-%d: v\r\n" % i for i in range(draw(st.integers(0, 2)))) + b"\r\n"
    elif framing == UNTIL_CLOSE:
        body = draw(st.binary(max_size=5000))
    lines = [f"HTTP/1.{0 if http10 else 1} {status} Whatever Reason"] + [f"{n}: {v}" for n, v in fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body, framing


class Recorder:
    """httptools' view of a response."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.fields: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.complete = False
        self.headers_done = False
        self.keep_alive = False  # as llhttp says at the message's end (it resets its state after)

    def on_header(self, name: bytes, value: bytes) -> None:
        (self.trailers if self.headers_done else self.fields).append((name, value))

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()


def lbd_reads(stream: bytes, cuts: list[int]) -> tuple[ResponseHead, bytes, bytes, bool]:
    """lbd's reader over `stream` arriving in reads split at `cuts`: the head, the body's data, the
    body bytes as forwarded (chunked framing kept), and whether the response ended."""
    reads = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True) if a < b]
    head: ResponseHead | None = None
    pending = b""
    data = forwarded = b""
    chunks = ChunkedBody()
    length_left = 0
    for read in reads:
        buf = bytearray(pending + read)
        pos = 0
        if head is None:
            head = parse_head(bytes(buf))
            if head is None:
                pending = bytes(buf)
                continue
            pending, pos = b"", head.size
            length_left = head.content_length
        framing = head.framing(answers_head=False)
        if framing == LENGTH:
            taken = min(length_left, len(buf) - pos)
            data += bytes(buf[pos : pos + taken])
            length_left -= taken
            pos += taken
        elif framing == CHUNKED:
            piece, consumed = read_chunked(chunks, buf[pos:])
            data += piece
            forwarded += bytes(buf[pos : pos + consumed])
            pos += consumed
        elif framing == UNTIL_CLOSE:
            data += bytes(buf[pos:])
            pos = len(buf)
        assert pos == len(buf), "bytes left after the response"
    assert head is not None
    framing = head.framing(answers_head=False)
    ended = framing == NO_BODY or (framing == LENGTH and length_left == 0) or (framing == CHUNKED and chunks.done)
    return head, data, forwarded, ended


@settings(max_examples=300, deadline=None)
@given(responses(), st.lists(st.integers(min_value=1, max_value=12000), max_size=6))
def test_lbd_reads_what_httptools_reads(response: tuple[bytes, int], cuts: list[int]) -> None:
    stream, framing = response
    cuts = sorted({cut for cut in cuts if cut < len(stream)})
    reference = Recorder()
    reference.parser.feed_data(stream)
    head, data, forwarded, ended = lbd_reads(stream, cuts)

    assert head.status == reference.parser.get_status_code()
    assert head.framing(answers_head=False) == framing
    assert data == reference.body
    assert ended == reference.complete  # an until-close body ends with the connection, for both
    if ended:
        assert head.keep_alive(framing) == reference.keep_alive
    if framing == CHUNKED:
        assert forwarded == stream[head.size :]  # forwarded verbatim: extensions and trailers too
    forwarded_lines = b"".join(head.header_pieces).split(b"\r\n")[:-1]
    expected = [
        (name, value)
        for name, value in reference.fields
        if name.lower() not in (b"connection", b"transfer-encoding", b"keep-alive", b"via")
    ]
    assert [tuple(line.split(b": ", 1)) for line in forwarded_lines] == [(n, v.strip()) for n, v in expected]
    vias = [value.strip() for name, value in reference.fields if name.lower() == b"via"]
    assert head.via == (b", ".join(vias) if vias else None)
