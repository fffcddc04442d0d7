"""How a response reaches this client: its body framing toward the client and the connection's fate
(RFC 9112 §6, §9.3). Pure: the server's framing and the client's side in, flags out.

A chunked body goes to an HTTP/1.1 client as the server framed it; a body that ends with the
server's connection is chunked by lbd for an HTTP/1.1 client; an HTTP/1.0 client gets either body
raw (a chunked one decoded), and learns where it ends from the close.
"""

from __future__ import annotations

from typing import Final

from lbd.proxy.response import CHUNKED, UNTIL_CLOSE

FORWARD_CHUNKED: Final = 1  # the server's chunked framing goes through as it came
CHUNK_FOR_CLIENT: Final = 2  # lbd chunks a body that ends with the server's connection
DECHUNK: Final = 4  # only the data of a chunked body goes to the client (an HTTP/1.0 one)
CLOSE_AFTER: Final = 8  # the client connection closes after this response (`Connection: close`)
KEEP_ALIVE_10: Final = 16  # an HTTP/1.0 client is told the connection stays (`Connection: keep-alive`)


def for_client(framing: int, http11: bool, reusable: bool) -> int:
    """Flags for a response with body `framing` (response.py's NO_BODY, LENGTH, CHUNKED, UNTIL_CLOSE)
    to a client of HTTP/1.1 (`http11`) or 1.0; `reusable`: the request was read whole and the client
    connection may carry another one."""
    flags = 0
    if framing == CHUNKED:
        flags = FORWARD_CHUNKED if http11 else DECHUNK | CLOSE_AFTER
    elif framing == UNTIL_CLOSE:
        flags = CHUNK_FOR_CLIENT if http11 else CLOSE_AFTER
    if not reusable:
        flags |= CLOSE_AFTER
    elif not http11 and not flags & CLOSE_AFTER:
        flags |= KEEP_ALIVE_10
    return flags
