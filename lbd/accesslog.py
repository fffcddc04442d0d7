"""What one access-log line says, and how it is written: `text` for people, `json` for pipelines.

The proxy fills an `Entry` per answered request with facts its exchange already holds (bytes as they
came, clock readings, the balancer's reason), and formats nothing: the writer thread
(lbd/accesslog_writer.py) turns entries into lines with `text_line` or `json_line`, pure functions of
the entry, the offset from the fine clock to the wall clock, and a `LineCache` of what they wrote
before. Both give one
line of ASCII per entry, whatever bytes a client sent. The fields and their order are documented in
docs/operations.md (a test checks the JSON keys against that table).
"""

from __future__ import annotations

import json
import re
import time
import zlib
from typing import Final, TypeVar

from mypy_extensions import i64

V = TypeVar("V")

# How a request ended (`termination`), HAProxy's termination states and Envoy's response flags in
# words; a refusal by lbd itself ends with its rejection reason (lbd_client_rejections_total's label:
# `malformed`, `body_too_large`, ...).
COMPLETE: Final = "complete"  # the response went out whole
CLIENT_CLOSED: Final = "client_closed"  # the client went away before the response was whole
CLIENT_TIMEOUT: Final = "client_timeout"  # the client stalled mid-body or stopped reading (client_timeout_ms)
SERVER_CLOSED: Final = "server_closed"  # the server closed or reset: 502 before its response, a cut after
SERVER_TIMEOUT: Final = "server_timeout"  # the server was silent past its timeout: 504, or a cut
CONNECT_FAILED: Final = "connect_failed"  # no connection to the server (and no backup took it): 502
BAD_RESPONSE: Final = "bad_response"  # the server's response was malformed: 502, or a cut
NO_SERVER: Final = "no_server"  # 503: no server available
NO_ROUTE: Final = "no_route"  # 400: the request lacks what routing needs (client-id, client-region)
TUNNEL_CLOSED_BY_CLIENT: Final = "tunnel_closed_by_client"  # an upgraded connection (101) the client ended
TUNNEL_CLOSED_BY_SERVER: Final = "tunnel_closed_by_server"
SHUTDOWN: Final = "shutdown"  # cut by lbd at the end of a graceful stop's grace period
# Suffixes of `route` when the request was sent again: on a new connection to the same server, on a backup
RETRY_SUFFIX: Final = "+retry"
FAILOVER_SUFFIX: Final = "+failover"
ALL_KEPT: Final = 1 << 32  # a sampling threshold that keeps every client (CRC-32 values are below it)

# Bytes kept as they are: printable ASCII except the quote and the backslash (and, in text, the space,
# which separates fields); anything else is written \xNN.
_TEXT_UNSAFE: Final = re.compile(rb'[^\x21-\x7e]|["\\]')
_JSON_UNSAFE_STR: Final = re.compile(r'[^\x20-\x7e]|["\\]')


class Entry:
    """One answered request, as the event loop hands it over: raw values, no formatting.

    Times are `lbd.clock.monotonic()` readings and durations in seconds (negative: did not happen).
    """

    __slots__ = (
        "began",
        "bytes_in",
        "bytes_out",
        "client",
        "client_id",
        "client_region",
        "connect_s",
        "duration_s",
        "method",
        "path",
        "retries",
        "route",
        "server",
        "server_region",
        "status",
        "termination",
        "ttfb_s",
        "version",
    )

    def __init__(
        self,
        began: float,
        client: bytes,
        client_id: bytes | None,
        client_region: bytes | None,
        method: bytes,
        path: bytes,
        version: str,
        status: int,
        bytes_in: int,
        bytes_out: int,
        server: str | None,
        server_region: str | None,
        route: str | None,
        retries: int,
        connect_s: float,
        ttfb_s: float,
        duration_s: float,
        termination: str,
    ) -> None:
        self.began = began
        self.client = client  # `ip:port` (`client_address`): the same for every request of a connection
        self.client_id = client_id
        self.client_region = client_region
        self.method = method  # b"": not known (the request line never arrived whole)
        self.path = path
        self.version = version  # "1.1", "1.0", ...; "": not known
        self.status = status  # 0: no response was sent
        self.bytes_in = bytes_in
        self.bytes_out = bytes_out
        self.server = server
        self.server_region = server_region
        self.route = route
        self.retries = retries
        self.connect_s = connect_s
        self.ttfb_s = ttfb_s
        self.duration_s = duration_s
        self.termination = termination


def client_address(ip: bytes, port: int) -> bytes:
    """`ip:port`, `[ip]:port` for IPv6: the client as both formats write it (made once per connection)."""
    return b"[%s]:%d" % (ip, port) if b":" in ip else b"%s:%d" % (ip, port)


def successful(status: int, termination: str) -> bool:
    """What sampling may leave out: a status below 400 that went out whole (or a tunnel that ended)."""
    if status >= 400:
        return False
    return termination in (COMPLETE, TUNNEL_CLOSED_BY_CLIENT, TUNNEL_CLOSED_BY_SERVER)


def sample_threshold(fraction: float) -> int:
    """The CRC-32 values below which a client's successful requests are kept (`sampled_in`)."""
    return ALL_KEPT if fraction >= 1.0 else int(fraction * ALL_KEPT)


def sampled_in(client_id: bytes | None, threshold: int) -> bool:
    """Whether this client's successful requests are logged: a CRC-32 of its id, so the same clients
    are kept in every worker, instance and restart, each with all its requests."""
    return client_id is None or zlib.crc32(client_id) < threshold


class LineCache:
    """What formatting remembers, for one writer thread: the timestamp up to the second, and the
    names lbd itself writes (servers, regions, routes, terminations) as they are written. Each memo
    starts over once it is full. Bytes a client sent (ids, paths) are checked afresh instead:
    compiled, a scan of their few bytes costs less than hashing a new bytes object for a look-up,
    and bytes that need no escaping go into the line as they are."""

    def __init__(self) -> None:
        self.second = -1  # the second `prefix` is stamped with
        self.prefix = b""
        self.text_names: dict[str, bytes] = {}
        self.json_names: dict[str, bytes] = {}
        # per server, where its requests went as JSON ("server" to "route") with the region and route
        # it was made for: a server's requests mostly share both, and one look-up costs less than three
        self.json_routes: dict[str, tuple[str, str, bytes]] = {}

    def stamp(self, wall: float) -> tuple[bytes, bytes]:
        """RFC 3339, UTC, milliseconds (truncated), in two parts: the line is built from parts, so
        the two need not be joined first (compiled, a tuple returned is not an object)."""
        second = int(wall)
        if second != self.second:  # lines are stamped with their start: seconds may interleave a little
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)).encode()
            self.second = second
        return self.prefix, _MILLIS[int((wall - second) * 1000)]

    def text_name(self, value: str) -> bytes:
        """A name lbd writes (server, region, route) as text: the same few come again and again."""
        token = self.text_names.get(value)
        return token if token is not None else _remembered(self.text_names, value, _text(value.encode()))

    def json_name(self, value: str) -> bytes:
        token = self.json_names.get(value)
        return token if token is not None else _remembered(self.json_names, value, _json_str(value))

    def json_route(self, server: str, region: str, route: str) -> bytes:
        """`"server":...,"server_region":...,"route":...`, as `general_json_line` writes them."""
        known = self.json_routes.get(server)
        if known is not None and known[0] == region and known[1] == route:
            return known[2]
        token = b'"server":%s,"server_region":%s,"route":%s' % (_json_str(server), _json_str(region), _json_str(route))
        _remembered(self.json_routes, server, (region, route, token))
        return token


MEMO_SIZE: Final = 65_536


def _remembered(memo: dict[str, V], key: str, value: V) -> V:
    if len(memo) >= MEMO_SIZE:
        memo.clear()
    memo[key] = value
    return value


def _kept_as_is(value: bytes, lowest: int) -> bool:
    """Whether every byte of `value` is written as it is: printable ASCII from `lowest` up (0x21 in
    text, where a space separates fields; 0x20 in JSON), neither the quote nor the backslash."""
    pos: i64 = 0
    size: i64 = len(value)
    while pos < size:
        byte = value[pos]
        if byte < lowest or byte > 0x7E or byte in (0x22, 0x5C):
            return False
        pos += 1
    return True


def text_line(entry: Entry, wall_offset: float, cache: LineCache) -> bytes:
    """`TIME CLIENT "METHOD PATH PROTOCOL" STATUS BYTES_IN BYTES_OUT CLIENT_ID CLIENT_REGION SERVER
    SERVER_REGION ROUTE RETRIES CONNECT_MS TTFB_MS DURATION_MS TERMINATION`, `-` for what is absent."""
    client_id, region, server, server_region, route = (
        entry.client_id, entry.client_region, entry.server, entry.server_region, entry.route,
    )  # fmt: skip
    day_and_time, millis = cache.stamp(entry.began + wall_offset)
    return b'%s%s %s "%s %s %s" %s %s %s %s %s %s %s %s %s %s %s %s %s\n' % (
        day_and_time, millis, entry.client,
        _text(entry.method) if entry.method else b"-", _text(entry.path) if entry.path else b"-",
        _protocol(entry.version) if entry.version else b"-", _decimal(entry.status), _decimal(entry.bytes_in),
        _decimal(entry.bytes_out), _text(client_id) if client_id else b"-", _text(region) if region else b"-",
        cache.text_name(server) if server else b"-", cache.text_name(server_region) if server_region else b"-",
        cache.text_name(route) if route else b"-", _decimal(entry.retries),
        _ms(entry.connect_s, b"-"), _ms(entry.ttfb_s, b"-"), _ms(entry.duration_s, b"-"),
        cache.text_name(entry.termination),
    )  # fmt: skip


JSON_KEYS: Final = (
    b"time", b"client", b"client_id", b"client_region", b"method", b"path", b"protocol", b"status", b"bytes_in",
    b"bytes_out", b"server", b"server_region", b"route", b"retries", b"connect_ms", b"ttfb_ms", b"duration_ms",
    b"termination",
)  # fmt: skip


def json_line(entry: Entry, wall_offset: float, cache: LineCache) -> bytes:
    """One JSON object, keys in the documented order (JSON_KEYS), `null` for what is absent. The
    common line, an HTTP/1.1 request routed to a server whose client-sent strings need no escaping,
    is one formatting with its quotes in place; any other is `general_json_line`'s, which this line
    equals (a test holds the two to it)."""
    client_id, region, method, path = entry.client_id, entry.client_region, entry.method, entry.path
    server, server_region, route = entry.server, entry.server_region, entry.route
    if (
        client_id is None or region is None or server is None or server_region is None or route is None
        or entry.version != "1.1" or not method or not path or not _kept_as_is(client_id, 0x20)
        or not _kept_as_is(region, 0x20) or not _kept_as_is(method, 0x20) or not _kept_as_is(path, 0x20)
    ):  # fmt: skip
        return general_json_line(entry, wall_offset, cache)
    day_and_time, millis = cache.stamp(entry.began + wall_offset)
    return (
        b'{"time":"%s%s","client":"%s","client_id":"%s","client_region":"%s","method":"%s","path":"%s"'
        b',"protocol":"HTTP/1.1","status":%s,"bytes_in":%s,"bytes_out":%s,%s,"retries":%s,"connect_ms":%s'
        b',"ttfb_ms":%s,"duration_ms":%s,"termination":%s}\n'
    ) % (
        day_and_time, millis, entry.client, client_id, region, method, path, _decimal(entry.status),
        _decimal(entry.bytes_in), _decimal(entry.bytes_out), cache.json_route(server, server_region, route),
        _decimal(entry.retries), _ms(entry.connect_s, b"null"), _ms(entry.ttfb_s, b"null"),
        _ms(entry.duration_s, b"null"), cache.json_name(entry.termination),
    )  # fmt: skip


def general_json_line(entry: Entry, wall_offset: float, cache: LineCache) -> bytes:
    """Any entry's JSON line: each of JSON_KEYS with its value, in that order."""
    day_and_time, millis = cache.stamp(entry.began + wall_offset)
    server, server_region, route = entry.server, entry.server_region, entry.route
    values = (
        b'"%s%s"' % (day_and_time, millis),
        b'"%s"' % entry.client,
        _json_bytes(entry.client_id),
        _json_bytes(entry.client_region),
        _json_bytes(entry.method or None),
        _json_bytes(entry.path or None),
        b'"%s"' % _protocol(entry.version) if entry.version else b"null",
        _decimal(entry.status),
        _decimal(entry.bytes_in),
        _decimal(entry.bytes_out),
        b"null" if server is None else cache.json_name(server),
        b"null" if server_region is None else cache.json_name(server_region),
        b"null" if route is None else cache.json_name(route),
        _decimal(entry.retries),
        _ms(entry.connect_s, b"null"),
        _ms(entry.ttfb_s, b"null"),
        _ms(entry.duration_s, b"null"),
        cache.json_name(entry.termination),
    )
    return b"{%s}\n" % b",".join([b'"%s":%s' % (key, value) for key, value in zip(JSON_KEYS, values, strict=True)])


# ".000Z" .. ".999Z" and ".000" .. ".999": joining a made string is cheaper than a format spec
_MILLIS: Final = tuple(b".%03dZ" % n for n in range(1000))
_THOUSANDTHS: Final = tuple(b".%03d" % n for n in range(1000))
_SUB_MS: Final = tuple(b"0.%03d" % n for n in range(1000))
_DECIMALS: Final = tuple(b"%d" % n for n in range(4096))


def _decimal(number: int) -> bytes:
    """`number` in decimal: the counts in most lines are small, written once here (formatting an int
    makes a str first, then bytes from it)."""
    return _DECIMALS[number] if 0 <= number < 4096 else b"%d" % number


def _ms(seconds: float, absent: bytes) -> bytes:
    """Milliseconds with three decimals (microseconds, rounded)."""
    if seconds < 0:
        return absent
    micros = int(seconds * 1_000_000.0 + 0.5)
    if micros < 1000:
        return _SUB_MS[micros]  # most times through a proxy: made once, not per line
    return b"%d%s" % (micros // 1000, _THOUSANDTHS[micros % 1000])


def _protocol(version: str) -> bytes:
    """`HTTP/1.1` and the like, for a version that is known (not empty)."""
    return b"HTTP/1.1" if version == "1.1" else b"HTTP/%s" % version.encode()


def _escaped(match: re.Match[bytes]) -> bytes:
    return b"\\x%02x" % match.group()[0]


def _text(value: bytes) -> bytes:
    """`value` as a text field: as it is when nothing in it needs escaping (most values)."""
    if _kept_as_is(value, 0x21):
        return value
    return _TEXT_UNSAFE.sub(_escaped, value)


def _json_bytes(value: bytes | None) -> bytes:
    """A client's bytes as a JSON value: quoted as they are when nothing in them needs escaping."""
    if value is None:
        return b"null"
    if _kept_as_is(value, 0x20):
        return b'"%s"' % value
    # bytes that are not UTF-8 stay visible as \xNN; json.dumps writes the rest as ASCII escapes
    return json.dumps(value.decode("utf-8", "backslashreplace")).encode()


def _json_str(value: str) -> bytes:
    if _JSON_UNSAFE_STR.search(value) is None:
        return b'"%s"' % value.encode()
    return json.dumps(value).encode()
