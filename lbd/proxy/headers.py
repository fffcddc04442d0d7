"""Header rules of a forwarding proxy (RFC 9110 §7.6): hop-by-hop removal, X-Forwarded-*, Via.

Everything here works on raw bytes so the hot path never decodes a header it only passes along.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Final

from mypy_extensions import i64

from lbd.proxy.byte_runs import same_at

# What lbd does with a header, by its lower-cased name; a name not listed is forwarded as it came.
# Headers are gathered as they are parsed into flat lists of pieces (name, ": ", value, CRLF), so a
# message's head is built with one join and no header is looked at twice.
DROP: Final = 0  # hop-by-hop (RFC 9110 §7.6.1), or replaced by lbd's own
CONNECTION: Final = 1
TRANSFER_ENCODING: Final = 2
CONTENT_LENGTH: Final = 3  # forwarded; its presence decides the framing of a response
UPGRADE: Final = 4
VIA: Final = 5  # merged into lbd's own
X_FORWARDED_FOR: Final = 6  # merged into lbd's own
HOST: Final = 7  # forwarded; also named in X-Forwarded-Host
CLIENT_ID: Final = 8  # forwarded; routes the request
CLIENT_REGION: Final = 9  # forwarded; routes the request in dynamic mode
COOKIE: Final = 10  # forwarded; carries the client id when `client_id_fallback = "cookie"`

_HOP_BY_HOP: Final = {b"keep-alive": DROP, b"proxy-connection": DROP, b"te": DROP, b"trailer": DROP}
RESPONSE_HEADERS: Final = {
    **_HOP_BY_HOP,
    b"connection": CONNECTION,
    b"transfer-encoding": TRANSFER_ENCODING,
    b"content-length": CONTENT_LENGTH,
    b"upgrade": UPGRADE,
    b"via": VIA,
}
REQUEST_HEADERS: Final = {
    **RESPONSE_HEADERS,
    b"x-forwarded-for": X_FORWARDED_FOR,
    b"x-forwarded-proto": DROP,
    b"x-forwarded-host": DROP,
    b"forwarded": DROP,  # RFC 7239's form of what lbd states in X-Forwarded-*: a client's would contradict it
    b"host": HOST,
    b"client-id": CLIENT_ID,
    b"client-region": CLIENT_REGION,
    b"cookie": COOKIE,
    b"http2-settings": DROP,  # only means something with an h2c upgrade, which lbd never lets through
}
FORWARD: Final = -1  # not in the table: forwarded as it came


SPELLINGS_PER_LENGTH: Final = 8
REMEMBERED_LENGTHS: Final = 64


class FieldKinds:
    """What lbd does with a field, by its name as the peer spells it.

    Peers repeat their spellings, so each is lower-cased and looked up once, then remembered by its
    length: a name is compared in place, where it lies in the head, with the few spellings of its
    length seen before (no slice of it, and no hashing, which a dict lookup does on every new bytes
    object). Bounded per length, so a peer inventing names costs only the slower lookup, never
    memory nor a longer scan.
    """

    def __init__(self, kinds: dict[bytes, int]) -> None:
        self.kinds = kinds
        self.by_length: list[list[tuple[bytes, int]]] = [[] for _ in range(REMEMBERED_LENGTHS)]

    def of(self, data: bytes, start: i64, stop: i64) -> int:
        """The kind of the field named `data[start:stop]`."""
        length = stop - start
        if length >= REMEMBERED_LENGTHS:
            return self.kinds.get(data[start:stop].lower(), FORWARD)
        seen = self.by_length[length]
        for spelling, kind in seen:
            if same_at(spelling, data, start):
                return kind
        name = data[start:stop]
        kind = self.kinds.get(name.lower(), FORWARD)
        if len(seen) < SPELLINGS_PER_LENGTH:
            seen.append((name, kind))
        return kind


REQUEST_KINDS: Final = FieldKinds(REQUEST_HEADERS)
RESPONSE_KINDS: Final = FieldKinds(RESPONSE_HEADERS)
SEP: Final = b": "
CRLF: Final = b"\r\n"
VIA_VALUE: Final = b"1.1 lbd"
VIA_LINE: Final = b"Via: " + VIA_VALUE + CRLF
# Connection options that are not header names (RFC 9110 §7.6.1)
CONNECTION_OPTIONS: Final = frozenset({b"close", b"keep-alive", b"upgrade"})
# Never removed because a `Connection` header names them: the framing lbd forwards is lbd's own, and
# a peer that could strip Content-Length from a message whose body still follows would smuggle that
# body past lbd as a request (or response) of its own.
NEVER_HOP_BY_HOP: Final = frozenset({b"content-length", b"transfer-encoding", b"host"})
_NEVER_NAMED: Final = CONNECTION_OPTIONS | NEVER_HOP_BY_HOP
_NO_NAMES: Final[frozenset[bytes]] = frozenset()
_KEEP_ALIVE: Final = frozenset({b"keep-alive"})
_COMMON_CONNECTION_VALUES: Final = {
    value: frozenset({value.lower()})
    for value in (b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade")
}


def connection_tokens(value: bytes) -> frozenset[bytes]:
    """Lower-cased options of a `Connection` header: `close`, `keep-alive`, `upgrade`, or header names.
    The commonest value is compared before any lookup (a lookup hashes the value)."""
    if value == b"keep-alive":
        return _KEEP_ALIVE
    common = _COMMON_CONNECTION_VALUES.get(value)
    if common is not None:
        return common
    return frozenset(token.strip().lower() for token in value.split(b",") if token.strip())


def named_hop_by_hop(tokens: frozenset[bytes]) -> frozenset[bytes]:
    """The header names a `Connection` header's options declare hop-by-hop, less those lbd keeps."""
    if tokens <= CONNECTION_OPTIONS:  # close, keep-alive, upgrade: nearly every Connection header
        return _NO_NAMES
    return tokens - _NEVER_NAMED


def is_chunked(transfer_encoding: bytes) -> bool:
    """Chunked framing applies when `chunked` is the final coding (RFC 9112 §6.1)."""
    return transfer_encoding.rsplit(b",", 1)[-1].strip().lower() == b"chunked"


def wants_keep_alive(version: str, tokens: frozenset[bytes]) -> bool:
    """HTTP/1.1 keeps the connection unless `close`; HTTP/1.0 only with `keep-alive`."""
    if b"close" in tokens:
        return False
    return version != "1.0" or b"keep-alive" in tokens


def without_named(pieces: list[bytes], names: frozenset[bytes]) -> list[bytes]:
    """The header lines minus those `Connection` names as hop-by-hop (rare: a slow path). The
    pieces are runs of whole lines: cut into lines first."""
    lines = b"".join(pieces).split(CRLF)[:-1]
    return [line + CRLF for line in lines if line.partition(b":")[0].lower() not in names]


def forwarded_fields(pieces: list[bytes], conn_tokens: frozenset[bytes]) -> bytes:
    """A message's end-to-end lines as they came, in one bytes: its runs of lines (usually one, taken
    as it is), less those its `Connection` options name hop-by-hop."""
    if conn_tokens and (named := named_hop_by_hop(conn_tokens)):
        pieces = without_named(pieces, named)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def merged_line(name: bytes, prior: bytes | None, ours: bytes) -> bytes:
    """`Via` / `X-Forwarded-For`: what earlier hops said, then this hop."""
    return name + SEP + (ours if prior is None else prior + b", " + ours) + CRLF


_STATUS_LINES: Final[dict[tuple[int, bytes], bytes]] = {}  # servers use few (status, reason) pairs: built once each
_LAST_STATUS_LINE: Final[dict[int, tuple[bytes, bytes]]] = {}  # status -> (reason, line) last made


def status_line(status: int, reason: bytes) -> bytes:
    """`HTTP/1.1 status reason` CRLF. The last line made for each status is at hand by the status
    alone (its reason compared, not hashed); the others are remembered by status and reason."""
    last = _LAST_STATUS_LINE.get(status)
    if last is not None and last[0] == reason:
        return last[1]
    key = (status, reason)
    line = _STATUS_LINES.get(key)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason or _reason(status))
        if len(_STATUS_LINES) < 1024:
            _STATUS_LINES[key] = line
    _LAST_STATUS_LINE[status] = (reason, line)
    return line


def simple_response(status: int, text: str, close: bool) -> bytes:
    """A complete plain-text response lbd answers itself (400, 502, 503, 504...)."""
    body = f"{status} {_reason(status).decode()}: {text}\n".encode()
    return b"".join(
        (
            status_line(status, b""),
            b"Content-Type: text/plain; charset=utf-8\r\n",
            b"Content-Length: %d\r\n" % len(body),
            b"Connection: close\r\n" if close else b"",
            b"\r\n",
            body,
        )
    )


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"
