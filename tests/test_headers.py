"""The pure header helpers the proxy forwards and checks with (lbd.proxy.headers, valid_host, region_name)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lbd.proxy import exchange
from lbd.proxy.exchange import MAX_REMEMBERED_REGION_BYTES, MAX_REMEMBERED_REGIONS, region_name
from lbd.proxy.headers import (
    CONNECTION_OPTIONS,
    FORWARD,
    NEVER_HOP_BY_HOP,
    REQUEST_HEADERS,
    FieldKinds,
    connection_tokens,
    named_hop_by_hop,
    without_named,
)
from lbd.proxy.request import valid_host

NAMES = st.sampled_from([b"close", b"keep-alive", b"upgrade", b"x-secret", b"te", b"content-length", b"host"])


@given(st.frozensets(NAMES))
def test_connection_names_hop_by_hop_fields_but_never_framing_or_host(tokens: frozenset[bytes]) -> None:
    named = named_hop_by_hop(tokens)
    assert named == tokens - CONNECTION_OPTIONS - NEVER_HOP_BY_HOP
    assert not named & NEVER_HOP_BY_HOP  # Content-Length, Transfer-Encoding and Host are lbd's to write


def test_named_lines_are_dropped_whatever_their_case() -> None:
    lines = [b"X-Secret: 1\r\n", b"x-kept: 2\r\n", b"X-SECRET: 3\r\n", b"Te: trailers\r\n"]
    assert without_named(lines, frozenset({b"x-secret", b"te"})) == [b"x-kept: 2\r\n"]
    runs = [b"X-Secret: 1\r\nx-kept: 2\r\n", b"X-SECRET: 3\r\nTe: trailers\r\nx-also: 4\r\n"]
    assert without_named(runs, frozenset({b"x-secret", b"te"})) == [b"x-kept: 2\r\n", b"x-also: 4\r\n"]


@given(
    st.lists(st.sampled_from([b"example.com", b"a b", b"[::1]:8080", b"", b"x\x00", b"example.com:80"]), max_size=12)
)
def test_remembered_hosts_never_change_the_verdict(hosts: list[bytes]) -> None:
    allowed = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~%:[]"
    for host in hosts:  # in any order: the memo of the last valid host and the set of them
        assert valid_host(host) == (not host.translate(None, allowed)), host


@given(st.lists(st.sampled_from([b"us-east", b"eu-west", b"US-EAST"]) | st.binary(max_size=12), max_size=40))
def test_a_region_is_its_value_decoded_whatever_was_remembered(values: list[bytes]) -> None:
    long = b"r" * (MAX_REMEMBERED_REGION_BYTES + 1)
    for value in [*values, long, *(b"r%d" % n for n in range(MAX_REMEMBERED_REGIONS + 2)), *values]:  # past the bounds
        assert region_name(value) == value.decode("latin-1"), value
    assert len(exchange._REGION_NAMES) <= MAX_REMEMBERED_REGIONS and long not in exchange._REGION_NAMES


def test_connection_values_are_read_whatever_their_case() -> None:
    assert connection_tokens(b"keep-alive") == connection_tokens(b"Keep-Alive") == {b"keep-alive"}
    assert connection_tokens(b"close, X-Secret") == {b"close", b"x-secret"}


SPELLINGS = st.sampled_from([b"Host", b"host", b"HOST", b"Hist", b"Content-Length", b"content-length", b"X-A", b"X-B"])


@given(st.lists(st.tuples(SPELLINGS | st.binary(min_size=1, max_size=80), st.binary(max_size=6)), max_size=60))
def test_a_field_s_kind_is_its_lower_case_name_s_whatever_was_seen_before(names: list[tuple[bytes, bytes]]) -> None:
    kinds = FieldKinds(REQUEST_HEADERS)  # a fresh memo: what it remembers must never change a verdict
    for name, around in names:
        data = around + name + around  # compared where it lies, never past its end
        assert kinds.of(data, len(around), len(around) + len(name)) == REQUEST_HEADERS.get(name.lower(), FORWARD), name
