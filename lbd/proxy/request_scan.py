"""The commonest request heads read without llhttp: a compiled scan where httptools costs a Python
callback per field.

A head qualifies when it is whole in one read and plainly valid: `GET` or `HEAD`, an origin-form
target of URI characters, `HTTP/1.1`, and fields of token names and visible-ASCII values, none of
them framing (`Content-Length`, `Transfer-Encoding`), `Upgrade` or a `Connection` other than
`keep-alive`. Such a request has no body, and llhttp would read it exactly so. Anything else, and
every error, is left to llhttp: the scan declines rather than judges, so what is refused, and how,
stays llhttp's. A differential test holds the two to the same reading.

Pure: bytes in, a filled `RequestHead` and the position after the head out.
"""

from __future__ import annotations

from typing import Final

from mypy_extensions import i64

from lbd.proxy.byte_runs import visible_run_end
from lbd.proxy.headers import CONNECTION, CONTENT_LENGTH, DROP, FORWARD, TRANSFER_ENCODING, UPGRADE, FieldKinds
from lbd.proxy.request import RequestHead
from lbd.proxy.response import append_run, name_end

DECLINED: Final = -1
_GET: Final = b"GET"
_HEAD: Final = b"HEAD"
# origin-form target bytes (RFC 3986 pchar, "/" and "?"); anything else, "#" included, is llhttp's to read
_TARGET_BYTES: Final = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@/?%"
_IS_TARGET: Final = bytes(1 if c in _TARGET_BYTES else 0 for c in range(256))
_VERSION: Final = b" HTTP/1.1\r\n"
_KEEP_ALIVE_VALUES: Final = (b"keep-alive", b"Keep-Alive")
# llhttp reads it as it reads Connection (a `close` in it ends llhttp's parsing of the connection)
_PROXY_CONNECTION: Final = b"proxy-connection"


def scan_head(
    data: bytes, start: i64, head: RequestHead, kinds: FieldKinds, max_target: i64, max_fields: i64, max_bytes: i64
) -> i64:
    """Fill `head` from the request head at `data[start:]` and return the position after it, or
    DECLINED (`head` then half filled, to be dropped) when the head is incomplete, uncommon, beyond
    a limit, or wrong in any way: llhttp reads it then."""
    size: i64 = len(data)
    if max_bytes < size - start:
        size = start + max_bytes  # a head longer than the limit is never found whole: llhttp judges it
    if size - start >= 4 and data[start] == 0x47 and data[start + 1] == 0x45 and data[start + 2] == 0x54:  # GET
        method = _GET
        pos: i64 = start + 3
    elif (
        size - start >= 5
        and data[start] == 0x48
        and data[start + 1] == 0x45
        and data[start + 2] == 0x41
        and data[start + 3] == 0x44
    ):  # HEAD
        method = _HEAD
        pos = start + 4
    else:
        return DECLINED
    if data[pos] != 0x20:
        return DECLINED
    pos += 1
    target_start = pos
    while pos < size:
        byte = data[pos]  # indexed once; lower-case letters and "/" compared, the rest looked up
        if 0x61 <= byte <= 0x7A or byte == 0x2F or _IS_TARGET[byte]:
            pos += 1
        else:
            break
    if pos == target_start or data[target_start] != 0x2F or pos - target_start > max_target:
        return DECLINED
    if data[pos : pos + 11] != _VERSION:
        return DECLINED
    head.method = method
    head.url = data[target_start:pos]
    pos += 11
    fields: i64 = 0
    run_from: i64 = pos  # the start of the run of lines forwarded as they came: one slice for them all
    while True:
        if pos + 1 >= size:
            return DECLINED
        if data[pos] == 0x0D:
            if data[pos + 1] != 0x0A:
                return DECLINED
            # llhttp's path counts a head as its target plus name + value + 4 per field (client.py),
            # which is at most one byte more per field than the line takes (no space after the
            # colon) and 17 less for the request line and the empty one: a head within the limit by
            # its bytes plus its fields, less 17, is within it by that measure too; one nearer the
            # limit is llhttp's to judge
            if pos + 2 - start + fields - 17 > max_bytes:
                return DECLINED
            append_run(head.header_pieces, data, run_from, pos)
            return pos + 2
        end, run_from = _field(data, pos, size, head, kinds, run_from)
        if end < 0:
            return DECLINED
        fields += 1
        if fields > max_fields:
            return DECLINED
        pos = end


def _field(data: bytes, start: i64, size: i64, head: RequestHead, kinds: FieldKinds, run_from: i64) -> tuple[i64, i64]:
    """One `name: value` CRLF line at `start` into `head`: the position after it (or DECLINED) and
    where the run of lines forwarded as they came now starts (`run_from` while the line extends it;
    a line not forwarded, or rebuilt, ends the run in `head.header_pieces`). A tuple of native
    integers, returned unboxed."""
    colon = name_end(data, start, size)
    if colon == start or colon >= size or data[colon] != 0x3A:
        return DECLINED, run_from
    pos: i64 = colon + 1
    while pos < size and (data[pos] == 0x20 or data[pos] == 0x09):
        pos += 1
    value_start = pos
    pos = visible_run_end(data, pos, size)
    while pos < size:
        byte = data[pos]  # indexed once: each index is a bounds check
        if 0x20 <= byte <= 0x7E or byte == 0x09:
            pos += 1
        else:
            break
    value_end = pos
    if value_end > value_start and (data[value_end - 1] == 0x20 or data[value_end - 1] == 0x09):
        return DECLINED, run_from  # whitespace after a value: llhttp keeps it, so its reading is the one to take
    if pos + 1 >= size or data[pos] != 0x0D or data[pos + 1] != 0x0A:
        return DECLINED, run_from
    end = pos + 2
    kind = kinds.of(data, start, colon)
    if kind != FORWARD:
        if kind == DROP and colon - start == len(_PROXY_CONNECTION) and data[start:colon].lower() == _PROXY_CONNECTION:
            return DECLINED, run_from
        value = data[value_start:value_end]
        if kind in (CONTENT_LENGTH, TRANSFER_ENCODING, UPGRADE):
            return DECLINED, run_from
        if kind == CONNECTION and value not in _KEEP_ALIVE_VALUES:
            return DECLINED, run_from
        if not head.read(kind, value):
            append_run(head.header_pieces, data, run_from, start)
            return end, end
    if value_start == colon + 2 and data[colon + 1] == 0x20:
        return end, run_from  # as llhttp reads it: the run goes on
    append_run(head.header_pieces, data, run_from, start)  # llhttp's reading has one space after the colon: rebuilt
    head.header_pieces.append(b"%s: %s\r\n" % (data[start:colon], data[value_start:value_end]))
    return end, end
