"""What lbd accepts in a request head beyond llhttp's own syntax rules (RFC 9112 §3, §6, §7).

llhttp (through httptools) checks the syntax: one Content-Length, no Content-Length beside
Transfer-Encoding, chunked last, no control characters. The rules here are the ones a proxy must add
so that what it forwards means exactly what the client sent: one valid Host, a target the server
reads the same way, no transfer coding lbd would silently drop, no h2c upgrade. Pure functions of
bytes; a breach is a `Refused` naming what was wrong.
"""

from __future__ import annotations

from typing import Final

from lbd.proxy.headers import is_chunked


class Refused(Exception):
    """A request lbd will not take: answered with `status` and `text`, the connection then closed."""

    def __init__(self, status: int, text: str, reason: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.reason = reason  # the lbd_client_rejections_total label


# Bytes of a Host value (RFC 3986 reg-name, IP literal, port): unreserved, sub-delims, "%", ":", "[", "]"
_HOST_BYTES: Final = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=%:[]"
# Bytes of a cookie value lbd takes as a client id (RFC 6265 cookie-octet, without quotes)
_COOKIE_VALUE_BYTES: Final = bytes(c for c in range(0x21, 0x7F) if c not in b'",;\\')
MAX_COOKIE_ID: Final = 128


def valid_host(value: bytes) -> bool:
    """An empty Host is allowed (RFC 9110 §7.2); otherwise only authority characters."""
    return not value.translate(None, _HOST_BYTES)


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
        path = b"/" + path
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
