"""Reading a server's response: its head, and where its body ends (RFC 9112 §2-7).

lbd reads responses itself instead of through httptools: a body is then forwarded straight from the
buffer the kernel read it into, never copied by lbd, and a response costs no Python callback per
header. What a server may send is as strict as httptools' own rules (llhttp's): a response this
module refuses is answered with 502 (or cut, once started) and its connection is never reused.

Everything here is pure: bytes in, a parsed head or a new position out.
"""

from __future__ import annotations

from typing import Final

from mypy_extensions import i64

from lbd.proxy.byte_runs import visible_run_end
from lbd.proxy.headers import (
    CONNECTION,
    CONTENT_LENGTH,
    CRLF,
    FORWARD,
    RESPONSE_HEADERS,
    RESPONSE_KINDS,
    TRANSFER_ENCODING,
    UPGRADE,
    VIA,
    connection_tokens,
    is_chunked,
    status_line,
    wants_keep_alive,
)

MAX_HEAD_BYTES: Final = 64 * 1024  # a server's response head, status line and fields (nginx allows 4-8 KiB)
MAX_CHUNK_LINE: Final = 4096  # a chunk-size line with its extensions
MAX_TRAILER_BYTES: Final = 64 * 1024

# How a response's body is delimited (RFC 9112 §6.3)
NO_BODY: Final = 0  # HEAD, 1xx, 204, 304
LENGTH: Final = 1  # Content-Length
CHUNKED: Final = 2  # Transfer-Encoding ending in chunked
UNTIL_CLOSE: Final = 3  # neither: the body ends when the server closes the connection

_TCHARS: Final = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# Tables indexed by a byte (the head is scanned one byte at a time: compiled, that is faster than
# any bytes method, whose every call goes through Python's method lookup)
_IS_TCHAR: Final = bytes(1 if c in _TCHARS else 0 for c in range(256))  # field-name characters
_IS_VALUE: Final = bytes(0 if (c < 0x20 and c != 0x09) or c == 0x7F else 1 for c in range(256))  # field-value
_IS_HEX: Final = bytes(1 if c in b"0123456789abcdefABCDEF" else 0 for c in range(256))
# lengths of the names in RESPONSE_HEADERS: only a name of such a length is looked up at all
_SPECIAL_LENGTH: Final = bytes(1 if any(len(name) == n for name in RESPONSE_HEADERS) else 0 for n in range(32))
_NO_TOKENS: Final[frozenset[bytes]] = frozenset()
_SIZE_LINE: Final = 0
_DATA: Final = 1
_DATA_END: Final = 2
_TRAILER: Final = 3
_DONE: Final = 4


class BadResponse(Exception):
    """A response lbd will not forward; the message says what was wrong with it."""


class ResponseHead:
    """A parsed status line and header section: what lbd forwards, and what decides the framing."""

    def __init__(self, status: int, line: bytes, http10: bool) -> None:
        self.status = status
        self.line = line  # the status line lbd forwards, with its CRLF (always HTTP/1.1, never without a reason)
        self.http10 = http10
        self.size = 0  # bytes of the head, with the empty line that ends it
        # the forwarded fields as runs of whole lines, as the server wrote them (hop-by-hop ones cut out)
        self.header_pieces: list[bytes] = []
        self.content_length = -1  # -1: none
        self.transfer_encoding: bytes | None = None
        self.conn_tokens = _NO_TOKENS
        self.upgrade: bytes | None = None
        self.via: bytes | None = None

    @property
    def interim(self) -> bool:
        """1xx other than 101: relayed, and the final response follows on the same connection."""
        return self.status < 200 and self.status != 101

    def framing(self, answers_head: bool) -> int:
        """NO_BODY, LENGTH, CHUNKED or UNTIL_CLOSE (RFC 9112 §6.3)."""
        if answers_head or self.status < 200 or self.status in (204, 304):
            return NO_BODY
        if self.transfer_encoding is not None:
            return CHUNKED if is_chunked(self.transfer_encoding) else UNTIL_CLOSE
        return LENGTH if self.content_length >= 0 else UNTIL_CLOSE

    def keep_alive(self, framing: int) -> bool:
        """Whether the connection can carry another request once this response has ended."""
        return framing != UNTIL_CLOSE and wants_keep_alive("1.0" if self.http10 else "1.1", self.conn_tokens)


def append_run(pieces: list[bytes], data: bytes, start: i64, stop: i64) -> None:
    """The header lines forwarded as they came, `data[start:stop]`, as one piece (if any): both head
    readers keep runs of lines, not a piece per line."""
    if start < stop:
        pieces.append(data[start:stop])


def parse_head(data: bytes) -> ResponseHead | None:
    """The response head at the start of `data` (the body may follow it), or None while the empty
    line ending it has not arrived. `ResponseHead.size` is its length with that line."""
    pos: i64 = _line_end(data, 0)  # positions are native integers when compiled
    if pos < 0:
        return None
    parsed = _status_line(data, pos - 2)
    pieces = parsed.header_pieces
    kept_from: i64 = pos  # the start of the run of lines forwarded as they came
    size: i64 = len(data)
    while pos + 1 < size and not (data[pos] == 0x0D and data[pos + 1] == 0x0A):
        colon = name_end(data, pos, size)
        if colon == size:
            return None
        if colon == pos or data[colon] != 0x3A:
            raise BadResponse(f"an invalid header line: {_show(data[pos : pos + 60].split(CRLF)[0])}")
        end = _line_end(data, colon + 1)
        if end < 0:
            return None
        length = colon - pos
        kind = RESPONSE_KINDS.of(data, pos, colon) if length < 32 and _SPECIAL_LENGTH[length] else FORWARD
        if kind != FORWARD:
            start: i64 = colon + 1  # the value, without the whitespace around it
            stop: i64 = end - 2
            while start < stop and data[start] in (0x20, 0x09):
                start += 1
            while stop > start and data[stop - 1] in (0x20, 0x09):
                stop -= 1
            if not _take_special(parsed, kind, data, start, stop):  # the line is not forwarded
                append_run(pieces, data, kept_from, pos)
                kept_from = end
        pos = end
    if pos + 1 >= size:
        return None
    append_run(pieces, data, kept_from, pos)
    parsed.size = pos + 2
    if parsed.transfer_encoding is not None:
        if parsed.http10:
            raise BadResponse("Transfer-Encoding in an HTTP/1.0 response")
        if parsed.content_length >= 0:
            raise BadResponse("both Content-Length and Transfer-Encoding")
    return parsed


def name_end(data: bytes, start: i64, size: i64) -> i64:
    """The position after the field name (token characters) that starts at `start`, at most `size`."""
    pos: i64 = start  # a native integer when compiled: no tagged-int checks per byte
    while pos < size:
        byte = data[pos]  # indexed once: each index is a bounds check
        # the commonest name bytes compared; only the rest looked up (another bounds-checked index)
        if 0x61 <= byte <= 0x7A or byte == 0x2D or 0x41 <= byte <= 0x5A or _IS_TCHAR[byte]:
            pos += 1
        else:
            break
    return pos


def _line_end(data: bytes, start: i64) -> i64:
    """The position after the CRLF ending the line that goes on at `start` (only value bytes before
    it), or -1 when `data` ends first."""
    size: i64 = len(data)
    pos: i64 = visible_run_end(data, start, size)
    while pos < size:
        byte = data[pos]  # a field-value byte: not a control character other than tab (compared, not looked up)
        if (byte < 0x20 and byte != 0x09) or byte == 0x7F:
            break
        pos += 1
    if pos + 1 < size and data[pos] == 0x0D and data[pos + 1] == 0x0A:
        return pos + 2
    if pos == size or (pos + 1 == size and data[pos] == 0x0D):
        return -1
    byte = data[pos]
    if byte in (0x0D, 0x0A):
        raise BadResponse("a bare CR or LF in the response head (lines end with CRLF)")
    raise BadResponse(f"a control character (0x{byte:02x}) in the response head")


def _status_line(data: bytes, end: i64) -> ResponseHead:
    """`HTTP/1.x SSS reason` in `data[:end]`; the reason may be empty, and so may the space before
    it. Read in place, byte by byte. The commonest line, HTTP/1.1 with a reason, is forwarded as it
    came (one slice); any other is rebuilt as lbd's HTTP/1.1 line for that status and reason."""
    if (
        end < 12
        or data[0] != 0x48  # H
        or data[1] != 0x54  # T
        or data[2] != 0x54  # T
        or data[3] != 0x50  # P
        or data[4] != 0x2F  # /
        or data[5] != 0x31  # 1
        or data[6] != 0x2E  # .
        or not 0x30 <= data[7] <= 0x39
        or data[8] != 0x20
        or not (0x30 <= data[9] <= 0x39 and 0x30 <= data[10] <= 0x39 and 0x30 <= data[11] <= 0x39)
        or (end > 12 and data[12] != 0x20)
    ):
        raise BadResponse(f"not an HTTP/1.x status line: {_show(data[:end])}")
    status = (data[9] - 0x30) * 100 + (data[10] - 0x30) * 10 + data[11] - 0x30
    if status < 100 or status > 599:
        raise BadResponse(f"status {status} is outside 100-599")
    if end > 13 and data[7] == 0x31:
        return ResponseHead(status, data[: end + 2], False)
    reason = data[13:end] if end > 13 else b""  # (compiled, a slice that ends before it starts is an error)
    return ResponseHead(status, status_line(status, reason), data[7] == 0x30)


def _take_special(parsed: ResponseHead, kind: int, head: bytes, start: i64, stop: i64) -> bool:
    """Note what a framing or hop-by-hop field (value `head[start:stop]`) says; whether its line is
    forwarded (only Content-Length's)."""
    if kind == CONTENT_LENGTH:
        if 0 < stop - start <= 18:  # 1-18 digits: within 64 bits
            length: i64 = 0
            for i in range(start, stop):
                digit = head[i] - 0x30
                if not 0 <= digit <= 9:
                    break
                length = length * 10 + digit
            else:
                if parsed.content_length < 0:
                    parsed.content_length = length
                    return True
                if parsed.content_length == length:
                    return False  # a repeat of the same value: forwarded once
                raise BadResponse("conflicting Content-Length values")
        raise BadResponse(f"an invalid Content-Length: {_show(head[start:stop])}")
    value = head[start:stop]
    if kind == CONNECTION:
        tokens = connection_tokens(value)
        parsed.conn_tokens = tokens if not parsed.conn_tokens else parsed.conn_tokens | tokens
    elif kind == TRANSFER_ENCODING:
        prior = parsed.transfer_encoding
        parsed.transfer_encoding = value if prior is None else prior + b", " + value
    elif kind == UPGRADE:
        parsed.upgrade = value
    elif kind == VIA:
        parsed.via = value if parsed.via is None else parsed.via + b", " + value
    return False


def _show(value: bytes) -> str:
    text = value[:60].decode("latin-1")
    return repr(text + "..." if len(value) > 60 else text)


class ChunkedBody:
    """Where a chunked body ends (RFC 9112 §7.1), read across any number of buffers.

    `advance` consumes framing (size lines, the CRLF after data, trailer fields) up to the next chunk
    data; the caller takes the data itself (`data_left` bytes, `take_data`), so data is never copied
    here. The framing is validated as strictly as httptools does; a trailer section is bounded.
    """

    def __init__(self) -> None:
        self.state = _SIZE_LINE
        self.data_left = 0  # bytes of the current chunk's data still to come
        self.partial = b""  # a line begun at the end of an earlier buffer
        self.trailer_bytes = 0

    @property
    def done(self) -> bool:
        return self.state == _DONE

    @property
    def in_data(self) -> bool:
        return self.state == _DATA

    def take_data(self, available: int) -> int:
        """How much of `available` bytes is chunk data; they count as consumed."""
        taken = min(self.data_left, available)
        self.data_left -= taken
        if self.data_left == 0:
            self.state = _DATA_END
        return taken

    def advance(self, buf: bytearray, pos: int, end: int) -> int:
        """Consume framing from `buf[pos:end]`; stops at chunk data, the body's end, or `end`."""
        while pos < end and self.state not in (_DATA, _DONE):
            line, pos = self._line(buf, pos, end)
            if line is None:
                break
            if self.state == _SIZE_LINE:
                self._size_line(line)
            elif self.state == _DATA_END:
                if line:
                    raise BadResponse("chunk data longer than its size")
                self.state = _SIZE_LINE
            else:
                self._trailer_line(line)
        return pos

    def _line(self, buf: bytearray, pos: int, end: int) -> tuple[bytes | None, int]:
        """The next whole line (without its CRLF) and the position after it; None when it goes on past `end`."""
        partial = self.partial
        if partial and partial[-1] == 0x0D and buf[pos] == 0x0A:  # the CRLF was split between reads
            self.partial = b""
            return _checked_line(partial[:-1]), pos + 1
        found = buf.find(CRLF, pos, end)
        if found < 0:
            self.partial = partial + bytes(buf[pos:end])
            limit = MAX_TRAILER_BYTES if self.state == _TRAILER else MAX_CHUNK_LINE
            if len(self.partial) > limit:
                raise BadResponse(f"a chunk line or trailer longer than {limit} bytes")
            return None, end
        line = bytes(buf[pos:found])
        if partial:
            self.partial = b""
            line = partial + line
        return _checked_line(line), found + 2

    def _size_line(self, line: bytes) -> None:
        digits = 0
        while digits < len(line) and _IS_HEX[line[digits]]:
            digits += 1
        # chunk extensions (after ";", with no space before it, as llhttp wants) are forwarded, not interpreted
        if digits == 0 or digits > 15 or (digits < len(line) and line[digits] != 0x3B):
            raise BadResponse(f"an invalid chunk size line: {_show(line)}")
        self.data_left = int(line[:digits], 16)
        self.state = _DATA if self.data_left else _TRAILER

    def _trailer_line(self, line: bytes) -> None:
        if not line:
            self.state = _DONE
            return
        self.trailer_bytes += len(line) + 2
        if self.trailer_bytes > MAX_TRAILER_BYTES:
            raise BadResponse(f"a trailer section larger than {MAX_TRAILER_BYTES} bytes")
        colon = name_end(line, 0, len(line))
        if colon in (0, len(line)) or line[colon] != 0x3A:
            raise BadResponse(f"an invalid trailer field: {_show(line)}")


def _checked_line(line: bytes) -> bytes:
    """Framing lines hold no bare CR or LF and no control character but tab."""
    for byte in line:
        if not _IS_VALUE[byte]:
            raise BadResponse(f"a control character in a chunk line: {_show(line)}")
    return line
