"""A client's request head: what lbd reads from it, what it accepts, and the head a server gets.

llhttp (through httptools) checks the syntax as bytes arrive: one Content-Length, no Content-Length
beside Transfer-Encoding, chunked last, no control characters. `RequestHead.complete` adds the rules
a proxy needs so that what it forwards means exactly what the client sent (one valid Host, a target
the server reads the same way, no transfer coding lbd would drop, no h2c upgrade); a breach is a
`Refused` naming what was wrong. Once complete, the head does not change: `upstream_head` builds
what each attempt sends from it, and `Replay` keeps the body bytes a retry would send again.
"""

from __future__ import annotations

from typing import Final

from mypy_extensions import i64

from lbd.models import Server
from lbd.proxy.headers import (
    CLIENT_ID,
    CLIENT_REGION,
    CONNECTION,
    CONTENT_LENGTH,
    COOKIE,
    HOST,
    TRANSFER_ENCODING,
    UPGRADE,
    VIA,
    VIA_LINE,
    VIA_VALUE,
    X_FORWARDED_FOR,
    connection_tokens,
    forwarded_fields,
    is_chunked,
    merged_line,
    wants_keep_alive,
)

# RFC 9110 §9.2.2; any other method (POST, PATCH, LOCK, an unknown one) may change something each
# time it is processed, so it is never sent twice (retry.py)
IDEMPOTENT_METHODS: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
X_FORWARDED_PROTO_LINE: Final = b"X-Forwarded-Proto: http\r\n"  # the plain listener's; TLS: lbd/tls.py
CLIENT_ID_NAME: Final = b"client-id"  # as a refusal of a routing field sent twice names it
CLIENT_REGION_NAME: Final = b"client-region"
_NO_TOKENS: Final[frozenset[bytes]] = frozenset()


class Refused(Exception):
    """A request lbd will not take: answered with `status` and `text`, the connection then closed."""

    def __init__(self, status: int, text: str, reason: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.reason = reason  # the lbd_client_rejections_total label


# Bytes of a Host value: a DNS name or IP address (RFC 3986 unreserved, "%" of an IPv6 zone, ":" of a
# port, "[" "]" of an IPv6 literal). reg-name's sub-delims (",;=!$&'()*+") name no real host and make
# a Host (and X-Forwarded-Host) that reads as a list.
_HOST_BYTES: Final = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~%:[]"
MAX_REMEMBERED_HOSTS: Final = 1024
_VALID_HOSTS: Final[set[bytes]] = set()


class _LastHost:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = b"\x00"  # no Host is this: it is never valid


_LAST_VALID_HOST: Final = _LastHost()
# Bytes of a cookie value lbd takes as a client id (RFC 6265 cookie-octet, without quotes)
_COOKIE_VALUE_BYTES: Final = bytes(c for c in range(0x21, 0x7F) if c not in b'",;\\')
MAX_COOKIE_ID: Final = 128


class RequestHead:
    """The request line and the fields lbd acts on, gathered as llhttp reports them; every other
    field is kept as it came in `header_pieces` (runs of whole `name: value` CRLF lines: one line
    each from llhttp, consecutive lines as one slice from the scan), to be forwarded."""

    __slots__ = (
        "chunked",
        "client_id",
        "client_region",
        "conn_tokens",
        "content_length",
        "cookie",
        "duplicated",
        "forwarded_for",
        "has_body",
        "header_pieces",
        "host",
        "hosts",
        "idempotent",
        "is_head",
        "keep_alive",
        "method",
        "transfer_encoding",
        "upgrade",
        "url",
        "version",
        "via",
    )

    def __init__(self) -> None:
        self.method = b""
        self.url = b""
        self.version = "1.1"
        self.header_pieces: list[bytes] = []
        self.client_id: bytes | None = None
        self.client_region: bytes | None = None
        self.duplicated: bytes | None = None  # a routing field sent twice (lbd and the server could differ)
        self.host: bytes | None = None
        self.hosts = 0  # Host fields received (exactly one is valid in HTTP/1.1)
        self.cookie: bytes | None = None
        self.forwarded_for: bytes | None = None
        self.via: bytes | None = None
        self.conn_tokens = _NO_TOKENS
        self.transfer_encoding: bytes | None = None
        self.chunked = False
        self.has_body = False
        self.content_length = -1  # -1: no Content-Length
        self.upgrade: bytes | None = None
        self.is_head = False
        self.idempotent = True
        self.keep_alive = True

    def read(self, kind: int, value: bytes) -> bool:
        """Take what lbd needs of a field it reads, rewrites or drops (`headers.REQUEST_HEADERS`);
        True when the field is also forwarded, as `name: value`, which the caller appends as it
        appends a FORWARD field. Host and the framing fields are written by lbd itself
        (`upstream_head`), never forwarded as they came. (The name is not needed: its kind says it.)"""
        # llhttp strips the whitespace before a value but keeps the whitespace after it, which is not
        # part of the value either (RFC 9110 §5.5)
        if kind == CLIENT_ID:
            if self.client_id is not None:
                self.duplicated = CLIENT_ID_NAME
            self.client_id = _trimmed(value)
        elif kind == CLIENT_REGION:
            if self.client_region is not None:
                self.duplicated = CLIENT_REGION_NAME
            self.client_region = _trimmed(value)
        elif kind == COOKIE:
            self.cookie = value if self.cookie is None else self.cookie + b"; " + value
        elif kind == HOST:
            self.hosts += 1
            self.host = _trimmed(value)
            return False
        elif kind == CONNECTION:
            tokens = connection_tokens(value)
            self.conn_tokens = tokens if not self.conn_tokens else self.conn_tokens | tokens
            return False
        elif kind == TRANSFER_ENCODING:
            prior = self.transfer_encoding
            self.transfer_encoding = value if prior is None else prior + b", " + value
            self.chunked = is_chunked(self.transfer_encoding)
            self.has_body = True
            return False
        elif kind == CONTENT_LENGTH:
            digits = value.strip()  # llhttp allows digits only, but keeps trailing whitespace
            self.content_length = int(digits) if digits.isdigit() else 0
            self.has_body = self.content_length > 0
            return False
        elif kind == UPGRADE:
            self.upgrade = value
            return False
        elif kind == X_FORWARDED_FOR:
            self.forwarded_for = value if self.forwarded_for is None else self.forwarded_for + b", " + value
            return False
        elif kind == VIA:
            self.via = value if self.via is None else self.via + b", " + value
            return False
        else:
            return False  # dropped
        return True

    def complete(self, method: bytes, version: str, upgrading: bool) -> Refused | None:
        """The head is whole: check what llhttp does not, and settle what is forwarded. `upgrading`:
        llhttp reads this request as asking to switch protocols (it then parses nothing after the
        head: no body, no next request)."""
        self.method = method
        self.version = version
        self.is_head = method == b"HEAD"
        self.idempotent = method == b"GET" or method in IDEMPOTENT_METHODS  # compared first: a set hashes the new bytes
        self.keep_alive = wants_keep_alive(version, self.conn_tokens)
        if method == b"CONNECT":
            return Refused(405, "lbd is a reverse proxy; CONNECT is not supported", "malformed")
        refused = host_problem(self.hosts, self.host, version)
        if refused is not None:
            return refused
        if self.duplicated is not None:
            name = self.duplicated.decode("latin-1")
            return Refused(400, f"more than one {name} header; lbd routes by one", "malformed")
        if self.url[:1] != b"/":
            try:
                self.url, authority = origin_form(method, self.url)
            except Refused as bad_target:
                return bad_target
            if authority is not None:
                self.host = authority  # RFC 9112 §3.2.2: the target's authority replaces Host
        if self.transfer_encoding is not None:
            if version == "1.0":
                return Refused(400, "malformed request: Transfer-Encoding in HTTP/1.0 (RFC 9112 §6.1)", "malformed")
            refused = unsupported_coding(self.transfer_encoding)
            if refused is not None:
                return refused
        if not upgrading:
            self.upgrade = None
        elif self.has_body:
            # llhttp delivers no body for it: the server would wait for (or read as a request) bytes
            # lbd never forwards
            return Refused(
                400, "a request that asks to upgrade carries no body (Content-Length or chunked)", "malformed"
            )
        else:
            self.upgrade = without_h2c(self.upgrade or b"")
            if self.upgrade is None:
                self.keep_alive = False  # served as a plain request; nothing after it can be parsed
        return None

    def upstream_head(self, server: Server, client_ip: bytes, forwarded_for_line: bytes, proto_lines: bytes) -> bytes:
        """The head `server` is sent: the Host asked for, end-to-end fields as they came, then
        X-Forwarded-*, Via and the framing lbd chose (never a peer's framing fields as they came).
        `proto_lines` is the connection's X-Forwarded-Proto (and, over mutual TLS, the client's subject)."""
        host = self.host
        if self.chunked:
            framing = b"Transfer-Encoding: chunked\r\n"
        elif self.content_length >= 0:
            framing = b"Content-Length: %d\r\n" % self.content_length
        else:
            framing = b""
        # the head is built in one step (compiled, bytes formatting sums the sizes, then copies)
        fields = forwarded_fields(self.header_pieces, self.conn_tokens)
        forwarded_for = (
            forwarded_for_line
            if self.forwarded_for is None
            else merged_line(b"X-Forwarded-For", self.forwarded_for, client_ip)
        )
        via = VIA_LINE if self.via is None else merged_line(b"Via", self.via, VIA_VALUE)
        upgrade = b"" if self.upgrade is None else b"Connection: upgrade\r\nUpgrade: %s\r\n" % self.upgrade
        if host is None:  # Host: the server's address
            return b"%s %s HTTP/1.1\r\nHost: %s:%d\r\n%s%s%s%s%s%s\r\n" % (
                self.method, self.url, server.spec.host.encode(), server.spec.port,
                fields, forwarded_for, proto_lines, via, framing, upgrade,
            )  # fmt: skip
        return b"%s %s HTTP/1.1\r\nHost: %s\r\n%s%s%sX-Forwarded-Host: %s\r\n%s%s%s\r\n" % (
            self.method, self.url, host, fields, forwarded_for, proto_lines, host, via, framing, upgrade
        )  # fmt: skip


class Replay:
    """The request body bytes sent so far, kept (up to `limit`) so a retry can send them again."""

    __slots__ = ("kept", "limit", "pieces", "size")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pieces: list[bytes] = []
        self.size = 0
        self.kept = True  # every byte so far is in `pieces`

    def add(self, data: bytes) -> None:
        if self.kept:
            self.size += len(data)
            if self.size <= self.limit:
                self.pieces.append(data)
            else:
                self.kept = False
                self.pieces = []


def body_too_large(limit: int) -> Refused:
    return Refused(413, f"the request body is larger than {limit} bytes", "body_too_large")


def valid_host(value: bytes) -> bool:
    """An empty Host is allowed (RFC 9110 §7.2); otherwise only authority characters. Clients send
    the same few hosts again and again: those found valid are remembered (up to a bound)."""
    last = _LAST_VALID_HOST
    if value == last.value:  # compared before any lookup (which hashes): most requests name one host
        return True
    if value in _VALID_HOSTS:
        last.value = value
        return True
    if value.translate(None, _HOST_BYTES):
        return False
    if len(_VALID_HOSTS) < MAX_REMEMBERED_HOSTS:
        _VALID_HOSTS.add(value)
    last.value = value
    return True


def host_problem(hosts: int, host: bytes | None, version: str) -> Refused | None:
    """RFC 9112 §3.2: an HTTP/1.1 request has exactly one Host, and its value is an authority."""
    if hosts > 1:
        return Refused(400, "more than one Host header (RFC 9112 §3.2)", "malformed")
    if host is None:
        if version == "1.1":
            return Refused(400, "missing the Host header, which HTTP/1.1 requires (RFC 9112 §3.2)", "malformed")
        return None
    if not valid_host(host):
        return Refused(400, f"the Host header {_show(host)} is not a valid host[:port]", "malformed")
    return None


def origin_form(method: bytes, target: bytes) -> tuple[bytes, bytes | None]:
    """The target to forward, and the authority an absolute-form target names (None for others).

    A server is sent origin-form (`/path?query`): an absolute-form target's authority replaces the
    Host header (RFC 9112 §3.2.2), so lbd and the server agree on which host was asked for.
    """
    if target[:1] == b"/":
        return target, None
    if target == b"*":
        if method == b"OPTIONS":
            return target, None
        raise Refused(400, "the request target * is only allowed with OPTIONS", "malformed")
    scheme_end = target.find(b"://")
    if scheme_end < 0 or target[:scheme_end].lower() not in (b"http", b"https"):
        raise Refused(
            400,
            f"the request target {_show(target)} is neither a path (/...), an absolute http(s) URL nor *",
            "malformed",
        )
    rest = target[scheme_end + 3 :]
    end = len(rest)
    for delimiter in (b"/", b"?", b"#"):
        found = rest.find(delimiter)
        if 0 <= found < end:
            end = found
    authority, path = rest[:end], rest[end:]
    if not authority or b"@" in authority or not valid_host(authority):
        raise Refused(400, f"the request target {_show(target)} has no valid host (userinfo is refused)", "malformed")
    if path[:1] != b"/":
        path = b"*" if method == b"OPTIONS" and not path else b"/" + path  # RFC 9112 §3.2.4
    return path, authority


def unsupported_coding(transfer_encoding: bytes) -> Refused | None:
    """RFC 9112 §6.3: a request whose final coding is not chunked has no knowable length (400);
    lbd implements no other coding beside chunked (§6.1: 501)."""
    if transfer_encoding.strip().lower() == b"chunked":
        return None
    if not is_chunked(transfer_encoding):
        return Refused(400, f"malformed request: Transfer-Encoding {_show(transfer_encoding)} does not end "
                       "with chunked, so the body has no knowable length (RFC 9112 §6.3)", "malformed")  # fmt: skip
    return Refused(
        501, f"Transfer-Encoding {_show(transfer_encoding)} is not implemented; lbd accepts only chunked", "unsupported"
    )


def without_h2c(upgrade: bytes) -> bytes | None:
    """The protocols a request offers to upgrade to, less h2c (HTTP/2 over cleartext, which would let a
    client talk past lbd to the server: HAProxy and Envoy refuse it too); None when none is left."""
    kept = [token.strip() for token in upgrade.split(b",") if token.strip()]
    kept = [token for token in kept if token.split(b"/", 1)[0].lower() != b"h2c"]
    return b", ".join(kept) if kept else None


def upgrade_offered(offered: bytes, chosen: bytes | None) -> bool:
    """A 101's Upgrade names protocols the request offered (RFC 9110 §7.8)."""
    if chosen is None:
        return False
    names = {token.strip().lower() for token in offered.split(b",")}
    return all(token.strip().lower() in names for token in chosen.split(b",") if token.strip())


def cookie_value(cookies: bytes, name: bytes) -> bytes | None:
    """The value of cookie `name` in a Cookie header, when it is usable as a client id."""
    for pair in cookies.split(b";"):
        key, sep, value = pair.strip().partition(b"=")
        if sep and key == name:
            if 0 < len(value) <= MAX_COOKIE_ID and not value.translate(None, _COOKIE_VALUE_BYTES):
                return value
            return None
    return None


def _show(value: bytes) -> str:
    text = value[:80].decode("latin-1")
    return repr(text + "..." if len(value) > 80 else text)


def _trimmed(value: bytes) -> bytes:
    """`value` without the spaces and tabs that end it; most values have none, and are returned as
    they are (compiled, a byte compare: `bytes.rstrip` is a method call through Python)."""
    end: i64 = len(value)
    while end > 0 and value[end - 1] in (0x20, 0x09):
        end -= 1
    return value if end == len(value) else value[:end]
