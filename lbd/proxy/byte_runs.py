"""Runs of plain text in a head's field values found, and field names compared, four bytes at a time.

Compiled, every byte read from a `bytes` is a bounds-checked index, which makes a byte-at-a-time scan
cost 10-15 instructions a byte. Field values are the longest part of a head and mostly plain text,
so the head scanners skip their plain runs a 32-bit word at a time with carry-free bit tests (one
bounds check and a dozen operations per four bytes) and look at bytes one by one only where a word
holds something else. (Field names are too short for this to pay: most end within two words.) The
words are widened to 64 bits before any arithmetic, so nothing overflows and the tests mean the
same compiled and interpreted.

Pure: bytes and positions in, a position or a verdict out.
"""

from __future__ import annotations

from typing import Final

from librt.strings import read_i32_le
from mypy_extensions import i64

_LOW32: Final = 0xFFFFFFFF
_ONES: Final = 0x01010101
_HIGHS: Final = 0x80808080
_SPACES: Final = 0x20202020


def visible_run_end(data: bytes, pos: i64, size: i64) -> i64:
    """Where the run of visible ASCII and spaces (0x20-0x7E) at `pos` ends, or a little before:
    the first word of four from `pos` that holds any other byte (a tab, CR, LF, another control,
    DEL or a byte above 0x7E), or that `size` cuts. The caller reads on from there byte by byte."""
    while pos + 4 <= size:
        word = i64(read_i32_le(data, pos)) & _LOW32
        # a byte >= 0x80 sets its high bit in `word`; with none, adding 1 to each byte carries into
        # a high bit only from DEL (0x7F), and (word - 0x20 each) & ~word has a high bit set iff a
        # byte is below 0x20 (the classic has-less-than test, exact for whether there is one)
        if (word | (word + _ONES) | ((word - _SPACES) & ~word)) & _HIGHS:
            break
        pos += 4
    return pos


def same_at(expected: bytes, data: bytes, start: i64) -> bool:
    """Whether `data` holds `expected` at `start` (the caller knows it has that many bytes there):
    compared in place, where a slice to compare would be a new bytes object."""
    size: i64 = len(expected)
    pos: i64 = 0
    while pos + 4 <= size:
        if read_i32_le(expected, pos) != read_i32_le(data, start + pos):
            return False
        pos += 4
    while pos < size:
        if expected[pos] != data[start + pos]:
            return False
        pos += 1
    return True
