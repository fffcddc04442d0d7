"""Header rules of a forwarding proxy (RFC 9110 §7.6): hop-by-hop removal, X-Forwarded-*, Via.

Everything here works on raw bytes so the hot path never decodes a header it only passes along.
"""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus

Header = tuple[bytes, bytes]

# Headers that describe one connection, never forwarded (RFC 9110 §7.6.1), plus the ones this proxy
# sets itself on each side.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
REPLACED_ON_REQUEST = frozenset({b"x-forwarded-proto", b"x-forwarded-host"})
VIA = b"1.1 lbd"


def connection_tokens(value: bytes) -> frozenset[bytes]:
    """Lower-cased options of a `Connection` header: `close`, `keep-alive`, `upgrade`, or header names."""
    return frozenset(token.strip().lower() for token in value.split(b",") if token.strip())


def wants_keep_alive(version: str, tokens: frozenset[bytes]) -> bool:
    """HTTP/1.1 keeps the connection unless `close`; HTTP/1.0 only with `keep-alive`."""
    if b"close" in tokens:
        return False
    return version != "1.0" or b"keep-alive" in tokens


def forwarded_headers(
    headers: Iterable[Header],
    drop: frozenset[bytes],
    host: bytes | None,
    client_ip: bytes,
    prior_forwarded_for: bytes | None,
    prior_via: bytes | None,
) -> list[bytes]:
    """Header lines for the upstream request: end-to-end headers plus X-Forwarded-* and Via."""
    lines = [
        name + b": " + value + b"\r\n"
        for name, value in headers
        if (lower := name.lower()) not in HOP_BY_HOP and lower not in drop and lower not in _REQUEST_REWRITTEN
    ]
    forwarded_for = prior_forwarded_for + b", " + client_ip if prior_forwarded_for else client_ip
    lines.append(b"X-Forwarded-For: " + forwarded_for + b"\r\n")
    lines.append(b"X-Forwarded-Proto: http\r\n")
    if host is not None:
        lines.append(b"X-Forwarded-Host: " + host + b"\r\n")
    lines.append(b"Via: " + (prior_via + b", " + VIA if prior_via else VIA) + b"\r\n")
    return lines


_REQUEST_REWRITTEN = REPLACED_ON_REQUEST | {b"x-forwarded-for", b"via"}


def response_header_lines(headers: Iterable[Header], drop: frozenset[bytes]) -> list[bytes]:
    """End-to-end response headers, plus our Via."""
    lines = []
    prior_via = None
    for name, value in headers:
        lower = name.lower()
        if lower == b"via":
            prior_via = value
        elif lower not in HOP_BY_HOP and lower not in drop:
            lines.append(name + b": " + value + b"\r\n")
    lines.append(b"Via: " + (prior_via + b", " + VIA if prior_via else VIA) + b"\r\n")
    return lines


def scan_response(headers: Iterable[Header]) -> tuple[bool, bool, frozenset[bytes], bytes | None]:
    """(has Content-Length, is chunked, Connection options, Upgrade value) of an upstream response."""
    has_length = chunked = False
    tokens: frozenset[bytes] = frozenset()
    upgrade = None
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-length":
            has_length = True
        elif lower == b"transfer-encoding":
            chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
        elif lower == b"connection":
            tokens = tokens | connection_tokens(value)
        elif lower == b"upgrade":
            upgrade = value
    return has_length, chunked, tokens, upgrade


def status_line(status: int, reason: bytes) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, reason or _reason(status))


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
