"""The word-at-a-time scans (lbd.proxy.byte_runs), pure: the run scanner stops exactly at the first
word of four that holds a byte outside 0x20-0x7E, never past such a byte and never short of a whole
word of plain text; the in-place comparison agrees with comparing a slice; and the compiled module
agrees with its interpreted source (what LB_PURE_PYTHON=1 runs)."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from types import ModuleType

from hypothesis import given, settings
from hypothesis import strategies as st

import lbd.proxy.byte_runs as compiled
from lbd.proxy.byte_runs import same_at, visible_run_end

SOURCE = Path(__file__).parent.parent / "lbd" / "proxy" / "byte_runs.py"


def visible(byte: int) -> bool:
    return 0x20 <= byte <= 0x7E


def assert_stops_right(data: bytes, pos: int, size: int) -> None:
    end = visible_run_end(data, pos, size)
    assert pos <= end <= max(pos, size) and (end - pos) % 4 == 0
    assert all(visible(byte) for byte in data[pos:end])  # never past a byte outside the set
    if end + 4 <= size:
        assert not all(visible(byte) for byte in data[end : end + 4])  # never short of a whole word of it


# bytes drawn mostly from the edges of the set: each side of 0x20, 0x7E and 0x80, and the controls a head holds
EDGY = st.sampled_from([0x00, 0x09, 0x0A, 0x0D, 0x1F, 0x20, 0x2C, 0x2D, 0x2E, 0x40, 0x41, 0x5A, 0x5B, 0x60, 0x61])
EDGY |= st.sampled_from([0x7A, 0x7B, 0x7E, 0x7F, 0x80, 0x81, 0xA0, 0xAD, 0xC1, 0xDA, 0xE1, 0xFA, 0xFE, 0xFF])
HEADISH = st.lists(st.integers(0, 255) | EDGY | st.sampled_from(b"Content-Length: 42"), max_size=48).map(bytes)


@settings(max_examples=3000)
@given(HEADISH, st.integers(0, 48), st.integers(0, 48))
def test_a_scan_stops_at_the_first_word_holding_another_byte(data: bytes, pos: int, size: int) -> None:
    size = min(size, len(data))
    pos = min(pos, size)
    assert_stops_right(data, pos, size)


def test_every_byte_in_every_place_of_a_word() -> None:
    """Exhaustive over one odd byte: the carry-free tests leak nothing from one byte into the next."""
    for byte in range(256):
        for place in range(4):
            for filler in (b"abcd", b"ZZ--", b" ~ ~", b"\x7e\x7e\x20\x20"):
                word = bytearray(filler + filler)
                word[place] = byte
                assert visible_run_end(bytes(word), 0, 8) == (8 if visible(byte) else 0), (byte, place, filler)


def test_a_run_is_bounded_by_size_not_by_the_data() -> None:
    assert visible_run_end(b"abcdefgh", 0, 7) == 4 and visible_run_end(b"abcdefgh", 2, 6) == 6


@settings(max_examples=3000)
@given(st.binary(max_size=20), st.binary(max_size=24), st.integers(0, 24))
def test_comparing_in_place_is_comparing_the_slice(expected: bytes, data: bytes, start: int) -> None:
    if start + len(expected) <= len(data):  # the caller's promise: that many bytes lie there
        assert same_at(expected, data, start) == (data[start : start + len(expected)] == expected)
        assert same_at(data[start : start + len(expected)], data, start)  # every length, every offset


def test_compiled_and_interpreted_agree() -> None:
    spec = importlib.util.spec_from_file_location("pure_byte_runs", SOURCE)
    assert spec is not None and spec.loader is not None
    pure: ModuleType = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pure)
    rng = random.Random(7)
    edges = [0x00, 0x09, 0x1F, 0x20, 0x2D, 0x40, 0x41, 0x5A, 0x61, 0x7A, 0x7E, 0x7F, 0x80, 0xFF]
    for _ in range(5000):
        data = bytes(rng.choice(edges) if rng.random() < 0.3 else rng.randrange(0x41, 0x5B) for _ in range(12))
        pos = rng.randrange(4)
        assert pure.visible_run_end(data, pos, 12) == compiled.visible_run_end(data, pos, 12), (data, pos)
        expected = data[pos : pos + rng.randrange(9)]
        if rng.random() < 0.5:
            expected = bytes(rng.choice(edges) for _ in expected)
        assert pure.same_at(expected, data, pos) == compiled.same_at(expected, data, pos), (expected, data, pos)
