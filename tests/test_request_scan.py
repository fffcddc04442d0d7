"""The compiled request-head scan (lbd/proxy/request_scan.py) against llhttp, which reads every head
the scan declines.

The property: whenever the scan takes a head, llhttp reads the same bytes as one whole, body-less,
keep-alive HTTP/1.1 request ending where the scan says, and the `RequestHead` the client connection
builds from llhttp's callbacks equals the scan's, field for field. Heads are generated from a grammar
that mixes the plain with the hostile (bare CR or LF, folding, control and high bytes, framing and
hop-by-hop fields, odd spacing), so both sides of the property are exercised.
"""

from __future__ import annotations

import httptools
import pytest
from hypothesis import given, settings, target
from hypothesis import strategies as st

from lbd.proxy.headers import FORWARD, REQUEST_KINDS
from lbd.proxy.request import RequestHead
from lbd.proxy.request_scan import DECLINED, scan_head

MAX_TARGET = 8192
MAX_FIELDS = 100
MAX_BYTES = 16384


def scanned(
    data: bytes, start: int = 0, max_fields: int = MAX_FIELDS, max_bytes: int = MAX_BYTES
) -> tuple[int, RequestHead]:
    head = RequestHead()
    return scan_head(data, start, head, REQUEST_KINDS, MAX_TARGET, max_fields, max_bytes), head


class LlhttpReading:
    """llhttp's reading of a request, gathered into a `RequestHead` as lbd's client connection does."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.head = RequestHead()
        self.url = b""
        self.complete = 0
        self.body = b""
        self.keep_alive = False
        self.fields = 0
        self.head_bytes = 0  # as the client connection counts a head llhttp reads against max_header_bytes

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields += 1
        self.head_bytes += len(name) + len(value) + 4
        kind = REQUEST_KINDS.of(name, 0, len(name))
        if kind == FORWARD or self.head.read(kind, value):
            self.head.header_pieces.append(b"%s: %s\r\n" % (name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete += 1
        self.keep_alive = self.parser.should_keep_alive()


def slots(head: RequestHead) -> dict[str, object]:
    """Every attribute of a head (compiled, the class keeps no `__slots__` to list them). The
    forwarded lines are compared as the bytes they make: llhttp's path keeps one piece per line,
    the scan one per run of lines."""
    names = [name for name in dir(head) if not name.startswith("_") and not callable(getattr(head, name))]
    assert len(names) >= 20
    values = {name: getattr(head, name) for name in names}
    values["header_pieces"] = b"".join(head.header_pieces)
    return values


def assert_llhttp_reads_it_so(data: bytes, end: int, head: RequestHead) -> None:
    reading = LlhttpReading()
    reading.parser.feed_data(data[:end])  # raises on anything llhttp refuses
    assert reading.complete == 1 and reading.body == b""
    assert reading.keep_alive and reading.parser.get_http_version() == "1.1"
    assert not reading.parser.should_upgrade()
    reading.head.method = reading.parser.get_method()
    reading.head.url = reading.url
    assert slots(head) == slots(reading.head)


# --- heads from a grammar ---------------------------------------------------------------------------

NAMES = [
    "Host", "host", "client-id", "Client-Region", "Cookie", "Accept", "User-Agent", "X-Forwarded-For", "Via",
    "Connection", "Proxy-Connection", "Content-Length", "Transfer-Encoding", "Upgrade", "TE", "Keep-Alive",
    "Trailer", "Forwarded", "X-Forwarded-Proto", "X-A", "x-a", "A!#$%&'*+-.^_`|~9",
]  # fmt: skip
BAD_NAMES = ["", "X A", "X\x00A", "X\x7fA", "X\xe9", "(X)", "X/A", " X", "\tX"]
SEPARATORS = [":", ": ", ":  ", ":\t", ": \t", " :", "\t:", ":\x0b", ""]
VALUES = [
    "", "h", "example.com:8080", "keep-alive", "Keep-Alive", "close", "upgrade", "websocket", "0", "5",
    "chunked", "a b", "a\tb", "a ", "a\t", " a", "a\x00b", "a\rb", "a\nb", "a\x7fb", "\xe9t\xe9", "id-1; x=y",
]  # fmt: skip
ENDINGS = ["\r\n", "\r\n", "\r\n", "\n", "\r", "\r\n ", "\r\n\t"]
METHODS = ["GET", "GET", "HEAD", "POST", "OPTIONS", "CONNECT", "get", "GETS", "GET\t", "G"]
TARGETS = ["/", "/x", "/a/b?c=d&e=%20f", "/~user/!$&'()*+,;=:@", "*", "http://h/x", "/x#frag", "/x y", "/\xe9", ""]
VERSIONS = ["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.2", "http/1.1", "HTTP/1.1 "]


def _byte_text(max_size: int) -> st.SearchStrategy[str]:
    return st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0xFF), max_size=max_size)


@st.composite
def hostile_heads(draw: st.DrawFn) -> bytes:
    """Every part drawn from the plain and the wrong alike: mostly declined."""
    method = draw(st.sampled_from(METHODS))
    request_target = draw(st.one_of(st.sampled_from(TARGETS), _byte_text(12).map(lambda t: "/" + t)))
    space = draw(st.sampled_from([" ", " ", "  ", "\t"]))
    lines = [f"{method}{space}{request_target} {draw(st.sampled_from(VERSIONS))}" + draw(st.sampled_from(ENDINGS))]
    for _ in range(draw(st.integers(0, 8))):
        name = draw(st.one_of(st.sampled_from(NAMES), st.sampled_from(BAD_NAMES)))
        value = draw(st.one_of(st.sampled_from(VALUES), _byte_text(8)))
        lines.append(name + draw(st.sampled_from(SEPARATORS)) + value + draw(st.sampled_from(ENDINGS)))
    lines.append(draw(st.sampled_from(["\r\n", "\r\n", "\n", "", "\r"])))
    return "".join(lines).encode("latin-1")


@st.composite
def plain_heads(draw: st.DrawFn) -> bytes:
    """A head of the kind the scan takes, give or take a field it declines."""
    method = draw(st.sampled_from(["GET", "HEAD"]))
    request_target = draw(st.sampled_from(TARGETS[:4]))
    lines = [f"{method} {request_target} HTTP/1.1\r\n"]
    for _ in range(draw(st.integers(0, 8))):
        name = draw(st.sampled_from(NAMES))
        value = draw(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=10))
        lines.append(name + draw(st.sampled_from(SEPARATORS[:5])) + value.strip(" ") + "\r\n")
    return ("".join(lines) + "\r\n").encode()


@st.composite
def mutated(draw: st.DrawFn, heads: st.SearchStrategy[bytes]) -> bytes:
    """A plain head with a byte or two replaced, inserted or deleted (a CR, LF, space, tab, colon,
    NUL, DEL, a high byte...): the near misses where a scan and a parser part ways."""
    head = bytearray(draw(heads))
    for _ in range(draw(st.integers(1, 2))):
        at = draw(st.integers(0, len(head) - 1))
        byte = draw(st.sampled_from(b'\r\n \t:\x00\x7f\xe9\x0b#/,;"a'))
        action = draw(st.sampled_from(["replace", "insert", "delete"]))
        if action == "replace":
            head[at] = byte
        elif action == "insert":
            head.insert(at, byte)
        else:
            del head[at]
    return bytes(head)


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    head = draw(st.one_of(plain_heads(), mutated(plain_heads()), hostile_heads()))
    return head + draw(st.sampled_from([b"", b"", b"GET /next HTTP/1.1\r\n\r\n", b"abc", b"\r\n"]))


@settings(max_examples=1500, deadline=None)
@given(request_heads())
def test_a_head_the_scan_takes_is_read_the_same_by_llhttp(data: bytes) -> None:
    end, head = scanned(data)
    target(1.0 if end != DECLINED else 0.0, label="taken")  # steer towards heads the scan takes, too
    if end != DECLINED:
        assert 0 < end <= len(data)
        assert_llhttp_reads_it_so(data, end, head)


@settings(max_examples=500, deadline=None)
@given(request_heads(), st.integers(0, 300), st.integers(0, 8))
def test_a_head_the_scan_takes_is_within_the_limits_as_llhttp_s_path_counts_them(
    data: bytes, max_bytes: int, max_fields: int
) -> None:
    end, _ = scanned(data, max_fields=max_fields, max_bytes=max_bytes)
    if end != DECLINED:
        reading = LlhttpReading()
        reading.parser.feed_data(data[:end])
        assert reading.head_bytes <= max_bytes and reading.fields <= max_fields


def test_fields_without_a_space_are_counted_as_llhttp_s_path_counts_them() -> None:
    # each counts a byte more than it takes (name + value + 4), so the head is over a limit of its
    # own length by that measure: the scan leaves it to llhttp's path, which refuses it (431)
    data = b"GET /big HTTP/1.1\r\nHost:h\r\n" + b"".join(b"a%d:v\r\n" % n for n in range(40)) + b"\r\n"
    reading = LlhttpReading()
    reading.parser.feed_data(data)
    assert reading.head_bytes > len(data)
    assert scanned(data, max_bytes=len(data))[0] == DECLINED
    assert scanned(data, max_bytes=reading.head_bytes - 1)[0] == DECLINED
    assert scanned(data, max_bytes=reading.head_bytes)[0] == len(data)


@settings(max_examples=500, deadline=None)
@given(request_heads(), st.integers(0, 200))
def test_a_head_cut_short_is_declined_never_misread(data: bytes, cut: int) -> None:
    end, _ = scanned(data)
    if end != DECLINED and cut < end:
        assert scanned(data[:cut])[0] == DECLINED  # incomplete: left to llhttp, which waits for the rest


# --- what real clients send is taken; the uncommon is declined -------------------------------------

TAKEN = {
    "curl": b"GET /tiny HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n"
    b"client-id: c1\r\n\r\n",
    "http.client": b"GET /tiny HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAccept-Encoding: identity\r\nclient-id: c1\r\n"
    b"client-region: us-east\r\n\r\n",
    "wrk": b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nclient-id: 42\r\n\r\n",
    "browser": b"HEAD /a/b?q=%20x&y=1 HTTP/1.1\r\nHost: example.com\r\nConnection: keep-alive\r\n"
    b"Cookie: lb_client=abc; theme=dark\r\nAccept-Language: en-GB,en;q=0.9\r\nclient-id: c\r\n\r\n",
    "tabs and spaces": b"GET / HTTP/1.1\r\nHost:h\r\nX-A:\t a\tb  c\r\nX-Empty:\r\nclient-id: c\r\n\r\n",
    "hop-by-hop dropped": b"GET / HTTP/1.1\r\nHost: h\r\nTE: trailers\r\nKeep-Alive: 5\r\nclient-id: c\r\n\r\n",
}
DECLINED_HEADS = {
    "post": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n",
    "content-length": b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n",
    "chunked": b"GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "upgrade": b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    "connection close": b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    "proxy-connection": b"GET / HTTP/1.1\r\nHost: h\r\nProxy-Connection: close\r\n\r\n",
    "http/1.0": b"GET / HTTP/1.0\r\nHost: h\r\n\r\n",
    "absolute form": b"GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n",
    "fragment": b"GET /#x HTTP/1.1\r\nHost: h\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\r\n b\r\n\r\n",
    "bare lf": b"GET / HTTP/1.1\nHost: h\n\n",
    "trailing space": b"GET / HTTP/1.1\r\nHost: h \r\n\r\n",
    "space before colon": b"GET / HTTP/1.1\r\nHost : h\r\n\r\n",
    "high byte": b"GET / HTTP/1.1\r\nHost: h\r\nX-A: \xe9\r\n\r\n",
    "nul": b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\x00\r\n\r\n",
    "incomplete": b"GET / HTTP/1.1\r\nHost: h\r\n",
    "lower-case method": b"get / HTTP/1.1\r\nHost: h\r\n\r\n",
}


@pytest.mark.parametrize("data", TAKEN.values(), ids=TAKEN.keys())
def test_what_real_clients_send_is_scanned(data: bytes) -> None:
    end, head = scanned(data + b"GET /next HTTP/1.1\r\n")
    assert end == len(data)
    assert_llhttp_reads_it_so(data, end, head)


@pytest.mark.parametrize("data", DECLINED_HEADS.values(), ids=DECLINED_HEADS.keys())
def test_the_uncommon_and_the_wrong_are_left_to_llhttp(data: bytes) -> None:
    assert scanned(data)[0] == DECLINED


def test_lines_forwarded_as_they_came_are_one_piece_until_a_line_lbd_takes_or_rebuilds() -> None:
    data = (
        b"GET / HTTP/1.1\r\nHost: h\r\nAccept: */*\r\nclient-id: a\r\nX-Odd:value\r\n"
        b"User-Agent: u\r\nVia: 1.1 p\r\nX-Last: z\r\n\r\n"
    )
    end, head = scanned(data)
    assert end == len(data)
    assert head.header_pieces == [
        b"Accept: */*\r\nclient-id: a\r\n",  # Host is lbd's to write: the run starts after it
        b"X-Odd: value\r\n",  # llhttp's reading, with the space
        b"User-Agent: u\r\n",  # Via is merged with lbd's own
        b"X-Last: z\r\n",
    ]
    assert_llhttp_reads_it_so(data, end, head)


def test_pipelined_heads_are_scanned_one_after_another() -> None:
    first, second = TAKEN["wrk"], TAKEN["curl"]
    end, _ = scanned(first + second)
    assert end == len(first)
    end, head = scanned(first + second, start=end)
    assert end == len(first + second) and head.url == b"/tiny"


def test_a_head_beyond_a_limit_is_declined_so_llhttp_s_path_refuses_it() -> None:
    data = TAKEN["curl"]
    assert scanned(data, max_fields=3)[0] == DECLINED  # it has 4 fields
    assert scanned(data, max_fields=4)[0] == len(data)
    assert scanned(data, max_bytes=len(data) - 1)[0] == DECLINED
    long_target = b"GET /" + b"a" * MAX_TARGET + b" HTTP/1.1\r\nHost: h\r\n\r\n"
    assert scanned(long_target)[0] == DECLINED
