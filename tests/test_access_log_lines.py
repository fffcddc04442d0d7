"""The access log's lines are pure functions of an entry (lbd/accesslog.py): whatever bytes a client
sends, a line is one line of ASCII, JSON parses back to the entry's values, text splits into its
fields and unescapes back to the bytes; timestamps are RFC 3339 UTC with milliseconds; sampling keeps
the same clients at any fraction above."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from lbd.accesslog import (
    ALL_KEPT,
    COMPLETE,
    JSON_KEYS,
    SERVER_CLOSED,
    TUNNEL_CLOSED_BY_CLIENT,
    Entry,
    LineCache,
    client_address,
    general_json_line,
    json_line,
    sample_threshold,
    sampled_in,
    successful,
    text_line,
)

DOCUMENTED_KEYS = [
    "time", "client", "client_id", "client_region", "method", "path", "protocol", "status", "bytes_in",
    "bytes_out", "server", "server_region", "route", "retries", "connect_ms", "ttfb_ms", "duration_ms",
    "termination",
]  # fmt: skip
RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

# what clients send: mostly plain text (a line's common case), sometimes any bytes (escaped)
plain_bytes = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(str.encode)
client_bytes = plain_bytes | st.binary(max_size=40)
optional_bytes = st.none() | client_bytes
seconds = st.just(-1.0) | st.floats(min_value=0, max_value=1e4, allow_nan=False)
names = st.none() | st.text(max_size=20)


@st.composite
def entries(draw: st.DrawFn) -> Entry:
    ip = draw(st.sampled_from([b"127.0.0.1", b"::1", b"10.1.2.3", b"fe80::1%eth0"]))
    return Entry(
        began=draw(st.floats(min_value=0, max_value=1e6, allow_nan=False)),
        client=client_address(ip, draw(st.integers(0, 65535))),
        client_id=draw(optional_bytes),
        client_region=draw(optional_bytes),
        method=draw(st.sampled_from([b"", b"GET", b"POST", b"M-SEARCH"])),
        path=draw(client_bytes),
        version=draw(st.sampled_from(["", "1.0", "1.1", "2.0"])),
        status=draw(st.sampled_from([0, 101, 200, 304, 400, 408, 502, 504])),
        bytes_in=draw(st.integers(0, 5000) | st.integers(0, 1 << 40)),
        bytes_out=draw(st.integers(0, 5000) | st.integers(0, 1 << 40)),
        server=draw(names),
        server_region=draw(names),
        route=draw(st.none() | st.sampled_from(["hash", "sticky", "hash+failover", "best_in_region+retry"])),
        retries=draw(st.integers(0, 2)),
        connect_s=draw(seconds),
        ttfb_s=draw(seconds),
        duration_s=draw(st.floats(min_value=0, max_value=1e4, allow_nan=False)),
        termination=draw(st.sampled_from([COMPLETE, SERVER_CLOSED, TUNNEL_CLOSED_BY_CLIENT, "body_too_large"])),
    )


@st.composite
def common_entries(draw: st.DrawFn) -> Entry:
    """What most lines are, which json_line writes in one formatting: an HTTP/1.1 request routed to a
    server, its client-sent strings plain text."""
    entry = draw(entries())
    entry.client_id, entry.client_region, entry.version = draw(plain_bytes), draw(plain_bytes), "1.1"
    entry.method, entry.path = draw(st.sampled_from([b"GET", b"POST"])), b"/" + draw(plain_bytes)
    entry.server, entry.server_region = draw(st.text(max_size=20)), draw(st.text(max_size=20))
    entry.route = draw(st.sampled_from(["hash", "sticky", "hash+failover"]))
    return entry


def ms(value: float) -> float | None:
    return None if value < 0 else round(value * 1000, 3)


def same_ms(written: float | None, value: float) -> bool:
    """Milliseconds as written (three decimals, rounded) for `value` seconds."""
    expected = ms(value)
    return written is None if expected is None else written is not None and abs(written - expected) <= 0.0011


def unescaped(token: str) -> bytes:
    return re.sub(rb"\\x([0-9a-f]{2})", lambda m: bytes([int(m.group(1), 16)]), token.encode("ascii"))


def test_a_client_is_its_address_and_port_with_ipv6_in_brackets() -> None:
    assert client_address(b"10.1.2.3", 51234) == b"10.1.2.3:51234"
    assert client_address(b"::1", 8080) == b"[::1]:8080"
    assert client_address(b"fe80::1%eth0", 0) == b"[fe80::1%eth0]:0"


@given(entries() | common_entries(), st.floats(min_value=1e9, max_value=4e9, allow_nan=False))
def test_json_line_is_one_object_with_the_entry_s_values(entry: Entry, offset: float) -> None:
    line = json_line(entry, offset, LineCache()).decode("ascii")  # bytes of ASCII, or this fails
    assert line.endswith("\n") and "\n" not in line[:-1] and line.isascii()
    parsed = json.loads(line)
    assert list(parsed) == DOCUMENTED_KEYS == [key.decode() for key in JSON_KEYS]

    def text(value: bytes | None) -> str | None:
        return None if value is None else value.decode("utf-8", "backslashreplace")

    assert parsed["client"] == entry.client.decode()
    assert parsed["client_id"] == text(entry.client_id)
    assert parsed["client_region"] == text(entry.client_region)
    assert parsed["method"] == (text(entry.method) or None)
    assert parsed["path"] == (text(entry.path) or None)
    assert parsed["protocol"] == (f"HTTP/{entry.version}" if entry.version else None)
    for key in ("status", "bytes_in", "bytes_out", "server", "server_region", "route", "retries", "termination"):
        assert parsed[key] == getattr(entry, key), key
    assert same_ms(parsed["connect_ms"], entry.connect_s)
    assert same_ms(parsed["ttfb_ms"], entry.ttfb_s)
    assert same_ms(parsed["duration_ms"], entry.duration_s)
    assert RFC3339_MS.match(parsed["time"])


@given(entries())
def test_text_line_splits_into_its_fields_and_unescapes_to_the_bytes(entry: Entry) -> None:
    line = text_line(entry, 1.7e9, LineCache()).decode("ascii")
    assert line.endswith("\n") and "\n" not in line[:-1] and line.isascii()
    before, request, after = line[:-1].split('"')  # the request line is the only quoted part
    time_field, client_field = before.split()
    method, path, protocol = request.split(" ")
    fields = after.split(" ")[1:]
    assert len(fields) == 13, fields
    status, bytes_in, bytes_out, client_id, region, server, server_region, route, retries = fields[:9]
    *timers, termination = fields[9:]
    assert RFC3339_MS.match(time_field) and client_field == entry.client.decode()
    assert unescaped(method) == (entry.method or b"-") and unescaped(path) == (entry.path or b"-")
    assert protocol == (f"HTTP/{entry.version}" if entry.version else "-")
    assert (int(status), int(bytes_in), int(bytes_out), int(retries)) == (
        entry.status, entry.bytes_in, entry.bytes_out, entry.retries,
    )  # fmt: skip
    assert unescaped(client_id) == (entry.client_id or b"-")
    assert unescaped(region) == (entry.client_region or b"-")
    assert unescaped(server) == (entry.server or "-").encode()
    assert unescaped(server_region) == (entry.server_region or "-").encode()
    assert route == (entry.route or "-")
    written = [None if t == "-" else float(t) for t in timers]
    assert all(map(same_ms, written, [entry.connect_s, entry.ttfb_s, entry.duration_s])), timers
    assert all(t == "-" or re.fullmatch(r"\d+\.\d{3}", t) for t in timers)
    assert termination == entry.termination


def test_a_text_line_as_the_docs_show_it() -> None:
    entry = Entry(
        100.0, b"127.0.0.1:51234", b"alice", b"us-east", b"GET", b"/echo?x=1", "1.1", 200, 0, 187, "s1",
        "us-east", "hash", 0, 0.000412, 0.000905, 0.001102, COMPLETE,
    )  # fmt: skip
    offset = datetime(2026, 5, 9, 7, 35, 25, 123500, tzinfo=UTC).timestamp() - 100.0
    assert text_line(entry, offset, LineCache()) == (
        b'2026-05-09T07:35:25.123Z 127.0.0.1:51234 "GET /echo?x=1 HTTP/1.1" 200 0 187 alice us-east s1 us-east '
        b"hash 0 0.412 0.905 1.102 complete\n"
    )


def test_hostile_bytes_are_escaped_in_both_formats() -> None:
    entry = Entry(
        0.0, client_address(b"::1", 8080), b'a b"c\\\n\xff', None, b"GET", b"/\x00\x7f\xc3\xa9", "1.1", 400, 0, 10,
        None, None, None, 0, -1.0, -1.0, 0.0, "malformed",
    )  # fmt: skip
    text = text_line(entry, 0.0, LineCache()).decode("ascii")
    assert "a\\x20b\\x22c\\x5c\\x0a\\xff" in text and '"GET /\\x00\\x7f\\xc3\\xa9 HTTP/1.1"' in text
    assert "[::1]:8080" in text
    parsed = json.loads(json_line(entry, 0.0, LineCache()))
    assert parsed["client_id"] == 'a b"c\\\n\\xff' and parsed["path"] == "/\x00\x7f\u00e9"
    assert parsed["server"] is None and parsed["connect_ms"] is None


@given(common_entries() | entries(), st.floats(min_value=1e9, max_value=4e9, allow_nan=False))
def test_the_common_json_line_is_the_general_one(entry: Entry, offset: float) -> None:
    """json_line writes its common case in one formatting: byte for byte what the general writer,
    key by key, writes for the same entry."""
    assert json_line(entry, offset, LineCache()) == general_json_line(entry, offset, LineCache())


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_timestamps_are_utc_with_milliseconds(wall: float) -> None:
    stamps = LineCache()
    expected = datetime.fromtimestamp(int(wall), UTC).strftime("%Y-%m-%dT%H:%M:%S")
    assert b"".join(stamps.stamp(wall)) == f"{expected}.{int((wall - int(wall)) * 1000):03d}Z".encode()
    assert stamps.stamp(wall) == stamps.stamp(wall)  # from the cache, the same


@given(st.lists(st.binary(min_size=1, max_size=16), min_size=1, max_size=50), st.floats(0, 1), st.floats(0, 1))
def test_sampling_keeps_the_same_clients_at_any_larger_fraction(ids: list[bytes], low: float, high: float) -> None:
    low, high = sorted((low, high))
    kept_low = {i for i in ids if sampled_in(i, sample_threshold(low))}
    kept_high = {i for i in ids if sampled_in(i, sample_threshold(high))}
    assert kept_low <= kept_high
    assert all(sampled_in(i, ALL_KEPT) for i in ids) and sample_threshold(1.0) == ALL_KEPT
    assert not any(sampled_in(i, sample_threshold(0.0)) for i in ids)
    assert sampled_in(None, 0)  # no client id: nothing to sample by, kept


def test_only_successful_requests_can_be_sampled_out() -> None:
    assert successful(200, COMPLETE) and successful(101, TUNNEL_CLOSED_BY_CLIENT) and successful(304, COMPLETE)
    assert not successful(200, SERVER_CLOSED)  # cut mid-body
    assert not successful(404, COMPLETE) and not successful(502, "connect_failed") and not successful(0, "x")


@given(st.lists(entries(), max_size=20))
def test_what_the_cache_remembers_changes_no_line(batch: list[Entry]) -> None:
    shared = LineCache()
    for entry in [*batch, *batch]:
        assert json_line(entry, 1.7e9, shared) == json_line(entry, 1.7e9, LineCache())
        assert text_line(entry, 1.7e9, shared) == text_line(entry, 1.7e9, LineCache())
