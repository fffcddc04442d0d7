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

T = TypeVar("T", bytes, str)

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

    Times are `time.perf_counter()` readings and durations in seconds (negative: did not happen).
    """

    __slots__ = (
        "began",
        "bytes_in",
        "bytes_out",
        "client_id",
        "client_ip",
        "client_port",
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
        client_ip: bytes,
        client_port: int,
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
        self.client_ip = client_ip
        self.client_port = client_port
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
    """What formatting remembers, for one writer thread: the timestamp up to the second, client
    addresses, and the names lbd itself writes (servers, regions, routes) as they are written. Each
    memo starts over once it is full. Bytes a client sent (ids, paths) are checked afresh instead:
    compiled, a scan of their few bytes costs less than hashing a new bytes object for a look-up."""

    def __init__(self) -> None:
        self.second = -1  # the second `prefix` is stamped with
        self.prefix = ""
        self.addresses: dict[bytes, str] = {}  # a client's IP address as written before its port
        self.text_names: dict[str, str] = {}
        self.json_names: dict[str, str] = {}

    def stamp(self, wall: float) -> str:
        """RFC 3339, UTC, milliseconds (truncated)."""
        second = int(wall)
        if second != self.second:  # lines are stamped with their start: seconds may interleave a little
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self.second = second
        return self.prefix + _MILLIS[int((wall - second) * 1000)]

    def client(self, ip: bytes, port: int) -> str:
        """`ip:port`, `[ip]:port` for IPv6."""
        address = self.addresses.get(ip)
        if address is None:
            text = ip.decode("latin-1")
            address = _remembered(self.addresses, ip, f"[{text}]:" if ":" in text else f"{text}:")
        return address + str(port)

    def text_name(self, value: str) -> str:
        """A name lbd writes (server, region, route) as text: the same few come again and again."""
        token = self.text_names.get(value)
        return token if token is not None else _remembered(self.text_names, value, _text_str(value))

    def json_name(self, value: str) -> str:
        token = self.json_names.get(value)
        return token if token is not None else _remembered(self.json_names, value, _json_str(value))


MEMO_SIZE: Final = 65_536


def _remembered(memo: dict[T, str], value: T, token: str) -> str:
    if len(memo) >= MEMO_SIZE:
        memo.clear()
    memo[value] = token
    return token


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


def _text_str(value: str) -> str:
    return _text(value.encode())


def text_line(entry: Entry, wall_offset: float, cache: LineCache) -> str:
    """`TIME CLIENT "METHOD PATH PROTOCOL" STATUS BYTES_IN BYTES_OUT CLIENT_ID CLIENT_REGION SERVER
    SERVER_REGION ROUTE RETRIES CONNECT_MS TTFB_MS DURATION_MS TERMINATION`, `-` for what is absent."""
    protocol = "HTTP/" + entry.version if entry.version else "-"
    client_id, region, server, server_region, route = (
        entry.client_id, entry.client_region, entry.server, entry.server_region, entry.route,
    )  # fmt: skip
    return (
        f"{cache.stamp(entry.began + wall_offset)} {cache.client(entry.client_ip, entry.client_port)}"
        f' "{_text(entry.method) if entry.method else "-"}'
        f' {_text(entry.path) if entry.path else "-"} {protocol}"'
        f" {entry.status} {entry.bytes_in} {entry.bytes_out}"
        f" {_text(client_id) if client_id else '-'} {_text(region) if region else '-'}"
        f" {cache.text_name(server) if server else '-'} {cache.text_name(server_region) if server_region else '-'}"
        f" {cache.text_name(route) if route else '-'} {entry.retries}"
        f" {_ms(entry.connect_s, '-')} {_ms(entry.ttfb_s, '-')} {_ms(entry.duration_s, '-')} {entry.termination}\n"
    )


def json_line(entry: Entry, wall_offset: float, cache: LineCache) -> str:
    """One JSON object, keys in the documented order, `null` for what is absent."""
    protocol = f'"HTTP/{entry.version}"' if entry.version else "null"  # one string built, where + makes two
    client_id, region, server, server_region, route = (
        entry.client_id, entry.client_region, entry.server, entry.server_region, entry.route,
    )  # fmt: skip
    return (
        f'{{"time":"{cache.stamp(entry.began + wall_offset)}"'
        f',"client":"{cache.client(entry.client_ip, entry.client_port)}"'
        f',"client_id":{"null" if client_id is None else _json(client_id)}'
        f',"client_region":{"null" if region is None else _json(region)}'
        f',"method":{_json(entry.method) if entry.method else "null"}'
        f',"path":{_json(entry.path) if entry.path else "null"},"protocol":{protocol}'
        f',"status":{entry.status},"bytes_in":{entry.bytes_in},"bytes_out":{entry.bytes_out}'
        f',"server":{"null" if server is None else cache.json_name(server)}'
        f',"server_region":{"null" if server_region is None else cache.json_name(server_region)}'
        f',"route":{"null" if route is None else cache.json_name(route)},"retries":{entry.retries}'
        f',"connect_ms":{_ms(entry.connect_s, "null")},"ttfb_ms":{_ms(entry.ttfb_s, "null")}'
        f',"duration_ms":{_ms(entry.duration_s, "null")},"termination":"{entry.termination}"}}\n'
    )


# ".000Z" .. ".999Z" and ".000" .. ".999": joining a made string is cheaper than a format spec
_MILLIS: Final = tuple(f".{n:03d}Z" for n in range(1000))
_THOUSANDTHS: Final = tuple(f".{n:03d}" for n in range(1000))
_SUB_MS: Final = tuple(f"0.{n:03d}" for n in range(1000))


def _ms(seconds: float, absent: str) -> str:
    """Milliseconds with three decimals (microseconds, rounded)."""
    if seconds < 0:
        return absent
    micros = int(seconds * 1_000_000.0 + 0.5)
    if micros < 1000:
        return _SUB_MS[micros]  # most times through a proxy: made once, not per line
    return str(micros // 1000) + _THOUSANDTHS[micros % 1000]


def _escaped(match: re.Match[bytes]) -> bytes:
    return b"\\x%02x" % match.group()[0]


def _text(value: bytes) -> str:
    if _kept_as_is(value, 0x21):
        return value.decode("ascii")
    return _TEXT_UNSAFE.sub(_escaped, value).decode("ascii")


def _json(value: bytes) -> str:
    if _kept_as_is(value, 0x20):
        return f'"{value.decode("ascii")}"'  # one string built (compiled), where + makes two
    # bytes that are not UTF-8 stay visible as \xNN; json.dumps writes the rest as ASCII escapes
    return json.dumps(value.decode("utf-8", "backslashreplace"))


def _json_str(value: str) -> str:
    if _JSON_UNSAFE_STR.search(value) is None:
        return '"' + value + '"'
    return json.dumps(value)
