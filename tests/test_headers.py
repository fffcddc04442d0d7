"""The pure header helpers the proxy forwards with (lbd.proxy.headers)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lbd.proxy.headers import CONNECTION_OPTIONS, NEVER_HOP_BY_HOP, named_hop_by_hop, without_named

NAMES = st.sampled_from([b"close", b"keep-alive", b"upgrade", b"x-secret", b"te", b"content-length", b"host"])


@given(st.frozensets(NAMES))
def test_connection_names_hop_by_hop_fields_but_never_framing_or_host(tokens: frozenset[bytes]) -> None:
    named = named_hop_by_hop(tokens)
    assert named == tokens - CONNECTION_OPTIONS - NEVER_HOP_BY_HOP
    assert not named & NEVER_HOP_BY_HOP  # Content-Length, Transfer-Encoding and Host are lbd's to write


def test_named_lines_are_dropped_whatever_their_case() -> None:
    lines = [b"X-Secret: 1\r\n", b"x-kept: 2\r\n", b"X-SECRET: 3\r\n", b"Te: trailers\r\n"]
    assert without_named(lines, frozenset({b"x-secret", b"te"})) == [b"x-kept: 2\r\n"]
