"""A connection to a server: writing a request to it, and reading the server's response.

It talks only to the exchange it carries (and, once upgraded, to the peer transport of its tunnel);
reuse across exchanges is the pool's (pool.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import TYPE_CHECKING, Any, Final, cast

from lbd.clock import monotonic
from lbd.models import Server
from lbd.proxy.flow import FlowControlled, hold_peer
from lbd.proxy.framing import DECHUNK
from lbd.proxy.pool import HEAD_READ_BYTES, UpstreamPool
from lbd.proxy.request import upgrade_offered
from lbd.proxy.response import (
    CHUNKED,
    LENGTH,
    MAX_HEAD_BYTES,
    NO_BODY,
    BadResponse,
    ChunkedBody,
    parse_head,
)

if TYPE_CHECKING:
    from lbd.proxy.exchange import Exchange

# Linux treats a request/response connection as interactive and delays its ACKs (up to 40 ms) to
# piggyback them on the next request. A server sending a response larger than its socket's send
# buffer then waits for that ACK, and the response stalls for the full delay: about 1% of 64 KiB
# responses did (`make bench`). A read that leaves a response incomplete therefore acknowledges at
# once (TCP_QUICKACK); a response read whole costs nothing extra.
TCP_QUICKACK: Final = getattr(socket, "TCP_QUICKACK", 0)  # 0 where the platform has none
SPLICE_FROM: Final = 16 * 1024  # a Content-Length body with this much still to come is spliced
HEAD: Final = -1  # UpstreamConnection.framing while a response head is expected
SMALL_READ_BYTES: Final = 4096
# UpstreamConnection.views: whether this read's body bytes may go on as views of its buffer
VIEWS_UNASKED: Final = -1  # not decided yet: the client's transport is asked at the first body piece
VIEWS_OF_SHARED: Final = 0  # views of the pool's shared buffer (the client has nothing queued)
COPIES: Final = 1  # copies: the client still has bytes queued, a view it kept would pin the buffer
VIEWS_OF_OWNED: Final = 2  # views of a buffer made for this read alone, which the client may keep


async def open_connection(pool: UpstreamPool, server: Server) -> UpstreamConnection:
    """A new connection to `server` (TLS for an https:// one)."""
    spec = server.spec
    connection = UpstreamConnection(pool, server)
    await pool.loop.create_connection(
        lambda: cast(asyncio.Protocol, connection),  # it speaks the protocol interface (flow.py)
        spec.host,
        spec.port,
        ssl=pool.tls if spec.scheme == "https" else None,
    )
    return connection


class UpstreamConnection(FlowControlled):
    """One TCP connection to a server, carrying one exchange at a time.

    A buffered protocol: the kernel reads into the pool's shared buffer (`get_buffer`), and
    `buffer_updated` parses the response's head and forwards its body from there as views, never
    copied. The end of a response is only acted on once the whole read is handled, so bytes a
    misbehaving server sends after a complete response are caught (the connection is then
    discarded) instead of being read as the next exchange's response.
    """

    def __init__(self, pool: UpstreamPool, server: Server) -> None:
        super().__init__()
        self.pool = pool
        self.server = server
        self.exchange: Exchange | None = None
        self.reused = False
        self.idle_since = 0.0
        self.framing = HEAD  # what the next bytes are: a head, or a body framed so
        self.head_start = b""  # the beginning of a head that an earlier read left incomplete
        # a small read's copy, made to parse its head (`_head`), and where in the read it starts: a
        # body in it is sliced from the copy (bytes, compiled) instead of from a view of the buffer
        self.read_copy = b""
        self.read_copy_at = 0
        self.length_left = 0  # of a Content-Length body
        self.chunks: ChunkedBody | None = None  # of a chunked body
        self.dechunk = False  # forward a chunked body's data only (to an HTTP/1.0 client), not its framing
        self.done = False
        self.keep_alive = False
        self.broken = False
        self.tunnel: asyncio.Transport | None = None
        self.tunnel_bytes = 0  # sent by the server through its tunnel (the access log's bytes_out)
        self.lost = False
        self.tcp_socket: Any = None  # set where TCP_QUICKACK applies (uvloop's socket-like object)
        self.fd = -1  # the socket's descriptor, where bodies could be spliced from it (not TLS)
        self.views = VIEWS_UNASKED  # how this read forwards body bytes (the constants above)
        self.shared_views_sent = False  # this read forwarded views of the shared buffer

    # --- asyncio.BufferedProtocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.attach(transport)
        sock = transport.get_extra_info("socket")
        if TCP_QUICKACK and sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            self.tcp_socket = sock
        if sock is not None and transport.get_extra_info("sslcontext") is None:
            self.fd = sock.fileno()

    def get_buffer(self, sizehint: int) -> memoryview:
        splicing = self.fd >= 0 and self.pool.splicer is not None
        if splicing and (self.framing == HEAD or (self.framing == LENGTH and self.length_left >= SPLICE_FROM)):
            return self.pool.head_view  # the rest of a large body may then be spliced
        return self.pool.read_view

    def buffer_updated(self, nbytes: int) -> None:
        pool = self.pool
        buf = pool.read_buffer
        if self.tunnel is not None:
            self.tunnel_bytes += nbytes
            self.tunnel.write(bytes(pool.read_view[:nbytes]))
            return
        exchange = self.exchange
        if exchange is None:
            # A server may not speak unasked; whatever this is, the connection cannot be trusted.
            self.close()
            return
        now = monotonic()  # one reading serves the read: the answer's time, the server's silence, the idle clocks
        started = exchange.response_started
        gathered = exchange.gather_client_writes()  # the head and body this read carries leave in one write
        self.shared_views_sent = False
        try:
            if self.head_start:
                buf = bytearray(self.head_start) + buf[:nbytes]  # owned: views of it can be kept
                self.head_start = b""
                self.views = VIEWS_OF_OWNED
                self._consume(exchange, buf, memoryview(buf), len(buf), now)
            else:
                self.views = VIEWS_UNASKED  # most reads (a small response, copied to parse) forward none
                self._consume(exchange, buf, pool.read_view, nbytes, now)
        except BadResponse as bad:
            self.broken = True
            if not self.done:
                unsent = gathered and not started  # all of the response so far is in this read's writes
                if unsent:
                    exchange.discard_gathered()
                exchange.upstream_failed_bad_response(str(bad), unsent)
                return
        finally:
            self.read_copy = b""  # not kept past its read (an idle connection would hold it)
            if gathered:
                exchange.send_gathered()
            if self.shared_views_sent and exchange.client_lagging():
                pool.renew_read_buffer()  # the client transport holds views of this one until it drains
        if (
            nbytes == HEAD_READ_BYTES and self.framing == LENGTH and self.length_left >= SPLICE_FROM
            and not exchange.client_lagging()
        ):  # fmt: skip
            self._splice(exchange)  # the read filled the head buffer: more of the body is waiting
        if self.done:
            self.done = False
            exchange.response_complete(self.keep_alive and not self.broken, now)
            return
        exchange.server_sent(now)
        if self.tcp_socket is not None:
            self._acknowledge_now()

    def _consume(self, exchange: Exchange, buf: bytearray, view: memoryview, end: int, now: float) -> None:
        """Handle `buf[:end]`, read at `now`: heads are parsed, body bytes forwarded (views of `buf`, or copies)."""
        pos = 0
        while pos < end:
            framing = self.framing
            if self.done:
                self.broken = True  # bytes after the response: the server is out of step
                return
            if framing == HEAD:
                pos = self._head(exchange, buf, view, pos, end, now)
                if pos < 0:
                    return
            elif framing == LENGTH:
                taken = min(self.length_left, end - pos)
                start = pos - self.read_copy_at  # where the body starts in the read's copy, if it has one
                if self.read_copy and start >= 0 and start + taken <= len(self.read_copy):
                    exchange.response_body(self.read_copy[start : start + taken])
                else:
                    self._forward(exchange, view, pos, pos + taken)
                pos += taken
                self.length_left -= taken
                if self.length_left == 0:
                    self.done = True
                    self.framing = HEAD
            elif framing == CHUNKED:
                pos = self._chunked(exchange, buf, view, pos, end)
            else:  # UNTIL_CLOSE
                self._forward(exchange, view, pos, end)
                pos = end

    def _head(self, exchange: Exchange, buf: bytearray, view: memoryview, pos: int, end: int, now: float) -> int:
        """Parse a head at `pos`; the position after it, or -1 when the read is used up (or tunnelled)."""
        copy = b""  # the head parsed from a copy of the read: the body bytes in it are at hand
        if end - pos <= SMALL_READ_BYTES and buf is self.pool.read_buffer:
            # a small read, likely a whole response: parsed from one copy, with no search first (a head
            # that arrives in pieces is searched for: each piece would parse it again from its start)
            data = b"".join((buf[pos:end],))  # compiled calls (bytes() of a bytearray is a call through Python)
            head = parse_head(data)
            if head is None:
                self.head_start = data  # the copy just parsed: the rest of the head comes in the next read
                return -1
            copy = self.read_copy = data
            self.read_copy_at = pos
        else:
            found = buf.find(b"\r\n\r\n", pos, end)  # where the head ends: only the head is copied out
            if found < 0 and end - pos <= MAX_HEAD_BYTES:
                self.head_start = bytes(view[pos:end])
                return -1
            if found < 0 or found + 4 - pos > MAX_HEAD_BYTES:
                raise BadResponse(f"a response head larger than {MAX_HEAD_BYTES} bytes")
            head = parse_head(bytes(view[pos : found + 4]))
            assert head is not None  # it ends with its empty line
        pos += head.size
        if head.interim:
            exchange.interim_response(head)
            return pos
        if head.status == 101:
            offered = exchange.request.upgrade
            if offered is None:
                raise BadResponse("101 Switching Protocols to a request that did not ask to upgrade")
            if not upgrade_offered(offered, head.upgrade):
                raise BadResponse("101 Switching Protocols to a protocol the request did not offer")
            exchange.response_head(head, NO_BODY, now, b"")
            exchange.start_tunnel(bytes(view[pos:end]))
            return -1
        framing = head.framing(exchange.request.is_head)
        self.keep_alive = head.keep_alive(framing)
        body = b""
        if framing == LENGTH and copy and 0 < head.content_length <= end - pos:
            # a small response read whole: its body leaves in one piece with its head, not joined to it
            body = copy[head.size : head.size + head.content_length]
        flags = exchange.response_head(head, framing, now, body)
        if framing == NO_BODY:
            self.done = True
        elif framing == LENGTH:
            pos += len(body)
            self.length_left = head.content_length - len(body)
            self.done = self.length_left == 0
        elif framing == CHUNKED:
            self.chunks = ChunkedBody()
            self.dechunk = bool(flags & DECHUNK)
        self.framing = HEAD if self.done else framing
        return pos

    def _chunked(self, exchange: Exchange, buf: bytearray, view: memoryview, pos: int, end: int) -> int:
        """Forward chunked framing as it came (or only its data, to dechunk); the position after."""
        chunks = self.chunks
        assert chunks is not None
        start = pos
        while pos < end and not chunks.done:
            if chunks.in_data:
                taken = chunks.take_data(end - pos)
                if self.dechunk:
                    self._forward(exchange, view, pos, pos + taken)
                pos += taken
            else:
                pos = chunks.advance(buf, pos, end)
        if not self.dechunk and pos > start:
            self._forward(exchange, view, start, pos)
        if chunks.done:
            self.chunks = None
            self.framing = HEAD
            self.done = True
        return pos

    def _forward(self, exchange: Exchange, view: memoryview, start: int, stop: int) -> None:
        """Body bytes on to the client: a view of the read's buffer, or a copy while the client still
        has bytes queued (a view it kept would pin the shared buffer). The client's transport is asked
        once per read, at its first body piece: until this read's writes are sent (they are gathered)
        the answer cannot change, and a read whose body comes from its parse copy never asks."""
        piece = view[start:stop]
        if self.views == VIEWS_UNASKED:
            self.views = COPIES if exchange.client_lagging() else VIEWS_OF_SHARED
        if self.views == COPIES:
            exchange.response_body(bytes(piece))
            return
        self.shared_views_sent = self.shared_views_sent or self.views == VIEWS_OF_SHARED
        exchange.response_body(piece)

    def _splice(self, exchange: Exchange) -> None:
        """Move what the server has sent of a large body on to the client in the kernel. Only with
        nothing queued in the client's transport (bytes leave in order), once per read (a fast
        download does not hold the loop), and what the client's socket will not take now goes
        through its transport, which then has bytes queued: no more splicing until it drains."""
        pool = self.pool
        splicer = pool.splicer
        if splicer is None or self.fd < 0:
            return
        target = exchange.splice_target()
        if target < 0:
            return
        moved, refused, overran = splicer.move(self.fd, target, self.length_left)
        if splicer.unsupported:
            pool.splice_responses(False)
        self.broken = self.broken or overran
        self.length_left -= moved
        exchange.spliced(moved)
        if refused:
            exchange.response_body(refused)
        if moved and self.length_left == 0:
            self.done = True
            self.framing = HEAD

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pool.forget(self)
        if self.tunnel is not None:
            self.tunnel.close()
        elif self.exchange is not None:
            self.exchange.upstream_lost()

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_write_paused(True)
        else:
            hold_peer(self.tunnel, True)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_write_paused(False)
        else:
            hold_peer(self.tunnel, False)

    def _acknowledge_now(self) -> None:
        """More of the response is due: ACK what arrived instead of waiting for a next request."""
        with contextlib.suppress(OSError):  # closed meanwhile: nothing left to acknowledge
            self.tcp_socket.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)

    # --- used by the exchange and the pool ------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Open, as far as lbd knows: no close seen from either side."""
        return self.writable() and not self.lost

    def tunnel_to(self, peer: asyncio.Transport | None) -> None:
        """The server switched protocols: what it sends from now on goes to `peer` unparsed."""
        self.tunnel = peer
