"""Connections to backend servers: reading their responses, and a keep-alive pool per server."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from typing import TYPE_CHECKING, Any, Final, cast

from lbd.models import Server
from lbd.proxy.flow import PEER_WRITE_FULL, FlowControlled
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
from lbd.proxy.splice import Splicer

if TYPE_CHECKING:
    from lbd.proxy.client import ClientConnection
    from lbd.proxy.exchange import Exchange

MAX_IDLE_PER_SERVER: Final = 128
# Linux treats a request/response connection as interactive and delays its ACKs (up to 40 ms) to
# piggyback them on the next request. A server sending a response larger than its socket's send
# buffer then waits for that ACK, and the response stalls for the full delay: about 1% of 64 KiB
# responses did (`make bench`). A read that leaves a response incomplete therefore acknowledges at
# once (TCP_QUICKACK); a response read whole costs nothing extra.
TCP_QUICKACK: Final = getattr(socket, "TCP_QUICKACK", 0)  # 0 where the platform has none
# One buffer every upstream connection reads into (a read is handled before the next begins). It
# holds a whole 64 KiB response with its head, so where bodies are not spliced such a response is
# one read, as with uvloop's own reads.
READ_BUFFER_BYTES: Final = 128 * 1024
# Where bodies can be spliced (splice.py), a response's first read takes at most this much (its head
# and the start of its body), and a body with at least SPLICE_FROM bytes still to come is moved in
# the kernel; HAProxy reads a first 16 KiB buffer the same way before it splices.
HEAD_READ_BYTES: Final = 16 * 1024
SPLICE_FROM: Final = 16 * 1024
HEAD: Final = -1  # UpstreamConnection.framing while a response head is expected


class UpstreamConnection(FlowControlled):
    """One TCP connection to a server, carrying one exchange at a time.

    A buffered protocol: the kernel reads into the pool's shared buffer (`get_buffer`), and
    `buffer_updated` parses the response's head and forwards its body from there as views, never
    copied. The end of a response is only acted on once the whole read is handled, so bytes a
    misbehaving server sends after a complete response are caught (the connection is then
    discarded) instead of being read as the next exchange's response.
    """

    def __init__(self, pool: UpstreamPool, server: Server) -> None:
        self.pool = pool
        self.server = server
        self.exchange: Exchange | None = None
        self.reused = False
        self.idle_since = 0.0
        self.framing = HEAD  # what the next bytes are: a head, or a body framed so
        self.head_start = b""  # the beginning of a head that an earlier read left incomplete
        self.length_left = 0  # of a Content-Length body
        self.chunks: ChunkedBody | None = None  # of a chunked body
        self.dechunk = False  # forward a chunked body's data only (to an HTTP/1.0 client), not its framing
        self.done = False
        self.keep_alive = False
        self.broken = False
        self.tunnel: asyncio.Transport | None = None
        self.lost = False
        self.tcp_socket: Any = None  # set where TCP_QUICKACK applies (uvloop's socket-like object)
        self.fd = -1  # the socket's descriptor, where bodies could be spliced from it (not TLS)

    # --- asyncio.BufferedProtocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
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
            self.tunnel.write(bytes(pool.read_view[:nbytes]))
            return
        exchange = self.exchange
        if exchange is None:
            # A server may not speak unasked; whatever this is, the connection cannot be trusted.
            self.close()
            return
        client = exchange.client
        client_transport = client.transport
        # a client still sending earlier bytes gets copies: a view it kept would pin the buffer
        lagging = client_transport is not None and client_transport.get_write_buffer_size() > 0
        started = exchange.response_started
        corked = client.cork()  # the head and body this read carries leave in one write
        try:
            if self.head_start:
                buf = bytearray(self.head_start) + buf[:nbytes]  # owned: views of it can be kept
                self.head_start = b""
                self._consume(exchange, buf, memoryview(buf), len(buf), False)
            else:
                self._consume(exchange, buf, pool.read_view, nbytes, lagging)
        except BadResponse as bad:
            self.broken = True
            if not self.done:
                unsent = corked and not started  # all of the response so far is in this read's writes
                if unsent:
                    client.drop_corked()
                exchange.upstream_failed_bad_response(str(bad), unsent)
                return
        finally:
            if corked:
                client.flush()
            pending = client_transport is not None and client_transport.get_write_buffer_size() > 0
            if pending and not lagging:
                pool.renew_read_buffer()  # the client transport holds views of this one until it drains
        if nbytes == HEAD_READ_BYTES and not pending and self.framing == LENGTH and self.length_left >= SPLICE_FROM:
            self._splice(client)  # the read filled the head buffer: more of the body is waiting
        if self.done:
            self.done = False
            exchange.response_complete(self.keep_alive and not self.broken)
            return
        exchange.last_activity = pool.loop.time()  # the server is not silent: its deadline restarts
        if self.tcp_socket is not None:
            self._acknowledge_now()

    def _consume(self, exchange: Exchange, buf: bytearray, view: memoryview, end: int, copy: bool) -> None:
        """Handle `buf[:end]`: heads are parsed, body bytes forwarded (views of `buf`, or copies)."""
        pos = 0
        while pos < end:
            framing = self.framing
            if self.done:
                self.broken = True  # bytes after the response: the server is out of step
                return
            if framing == HEAD:
                pos = self._head(exchange, buf, view, pos, end)
                if pos < 0:
                    return
            elif framing == LENGTH:
                taken = min(self.length_left, end - pos)
                _forward(exchange, view, pos, pos + taken, copy)
                pos += taken
                self.length_left -= taken
                if self.length_left == 0:
                    self.done = True
                    self.framing = HEAD
            elif framing == CHUNKED:
                pos = self._chunked(exchange, buf, view, pos, end, copy)
            else:  # UNTIL_CLOSE
                _forward(exchange, view, pos, end, copy)
                pos = end

    def _head(self, exchange: Exchange, buf: bytearray, view: memoryview, pos: int, end: int) -> int:
        """Parse a head at `pos`; the position after it, or -1 when the read is used up (or tunnelled)."""
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
            if exchange.upgrade is None:
                raise BadResponse("101 Switching Protocols to a request that did not ask to upgrade")
            if not upgrade_offered(exchange.upgrade, head.upgrade):
                raise BadResponse("101 Switching Protocols to a protocol the request did not offer")
            exchange.response_head(head, NO_BODY)
            exchange.start_tunnel(bytes(view[pos:end]))
            return -1
        framing = head.framing(exchange.is_head)
        self.keep_alive = head.keep_alive(framing)
        exchange.response_head(head, framing)
        if framing == NO_BODY:
            self.done = True
        elif framing == LENGTH:
            self.length_left = head.content_length
            self.done = self.length_left == 0
        elif framing == CHUNKED:
            self.chunks = ChunkedBody()
            self.dechunk = exchange.version == "1.0"
        self.framing = HEAD if self.done else framing
        return pos

    def _chunked(self, exchange: Exchange, buf: bytearray, view: memoryview, pos: int, end: int, copy: bool) -> int:
        """Forward chunked framing as it came (or only its data, to dechunk); the position after."""
        chunks = self.chunks
        assert chunks is not None
        start = pos
        while pos < end and not chunks.done:
            if chunks.in_data:
                taken = chunks.take_data(end - pos)
                if self.dechunk:
                    _forward(exchange, view, pos, pos + taken, copy)
                pos += taken
            else:
                pos = chunks.advance(buf, pos, end)
        if not self.dechunk and pos > start:
            _forward(exchange, view, start, pos, copy)
        if chunks.done:
            self.chunks = None
            self.framing = HEAD
            self.done = True
        return pos

    def _splice(self, client: ClientConnection) -> None:
        """Move what the server has sent of a large body on to the client in the kernel. Only with
        nothing queued in the client's transport (bytes leave in order), once per read (a fast
        download does not hold the loop), and what the client's socket will not take now goes
        through its transport, which then has bytes queued: no more splicing until it drains."""
        splicer = self.pool.splicer
        transport = client.transport
        target = client.socket_fd()
        if splicer is None or self.fd < 0 or transport is None or transport.is_closing() or target < 0:
            return
        moved, refused, overran = splicer.move(self.fd, target, self.length_left)
        if splicer.unsupported:
            self.pool.splicer = None
        self.broken = self.broken or overran
        self.length_left -= moved
        if refused:
            client.write(refused)
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
        elif self.tunnel is not None:
            self.tunnel_peer_hold(True)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_write_paused(False)
        elif self.tunnel is not None:
            self.tunnel_peer_hold(False)

    def tunnel_peer_hold(self, hold: bool) -> None:
        """In a tunnel the client protocol is reachable only through its transport."""
        peer: object = self.tunnel.get_protocol() if self.tunnel is not None else None
        if isinstance(peer, FlowControlled):
            if hold:
                peer.hold(PEER_WRITE_FULL)
            else:
                peer.release(PEER_WRITE_FULL)

    def _acknowledge_now(self) -> None:
        """More of the response is due: ACK what arrived instead of waiting for a next request."""
        with contextlib.suppress(OSError):  # closed meanwhile: nothing left to acknowledge
            self.tcp_socket.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)

    # --- used by the exchange and the pool ------------------------------------------------------

    def close(self) -> None:
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self._corked = None
        if self.transport is not None:
            self.transport.abort()


def _forward(exchange: Exchange, view: memoryview, start: int, stop: int, copy: bool) -> None:
    """Body bytes on to the client: a view of the read buffer, or a copy (`copy`, see buffer_updated)."""
    piece = view[start:stop]
    exchange.response_body(bytes(piece) if copy else piece)


class UpstreamPool:
    """Idle keep-alive connections per server, newest first (LIFO keeps few connections warm)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, idle_timeout_s: float = 30.0) -> None:
        self.loop = loop
        self.idle_timeout_s = idle_timeout_s
        self._idle: dict[str, list[UpstreamConnection]] = {}
        self._tls = ssl.create_default_context()
        self.pipe = Splicer.make()  # None where splice(2) is not available
        self.splicer: Splicer | None = self.pipe  # None while bodies are not spliced (`splice_responses`)
        self.renew_read_buffer()

    def splice_responses(self, enabled: bool) -> None:
        """Splice large response bodies where the platform can (config key `splice_responses`)."""
        self.splicer = self.pipe if enabled and self.pipe is not None and not self.pipe.unsupported else None

    def renew_read_buffer(self) -> None:
        """A transport kept views of the read buffer (its client is slower than its server): the next
        reads go to a new one, and the old one is freed once that transport has sent them."""
        self.read_buffer = bytearray(READ_BUFFER_BYTES)
        self.read_view = memoryview(self.read_buffer)
        self.head_view = self.read_view[:HEAD_READ_BYTES]

    def acquire(self, server: Server, idle_below_s: float) -> UpstreamConnection | None:
        """The most recently used idle connection to `server`, if it has been idle less than
        `idle_below_s` (an older one stays for requests that accept it)."""
        idle = self._idle.get(server.id)
        while idle:
            connection = idle[-1]
            transport = connection.transport
            if connection.server is not server:  # the id was re-registered (or reloaded) elsewhere
                idle.pop().close()
            elif transport is None or transport.is_closing() or connection.lost:
                idle.pop()
            elif self.loop.time() - connection.idle_since >= idle_below_s:
                return None
            else:
                idle.pop()
                connection.reused = True
                return connection
        return None

    async def connect(self, server: Server) -> UpstreamConnection:
        spec = server.spec
        connection = UpstreamConnection(self, server)
        await self.loop.create_connection(
            lambda: cast(asyncio.Protocol, connection),  # it speaks the protocol interface (flow.py)
            spec.host,
            spec.port,
            ssl=self._tls if spec.scheme == "https" else None,
        )
        return connection

    def release(self, connection: UpstreamConnection) -> None:
        """Keep a connection whose exchange ended cleanly; close it if the pool is full."""
        connection.exchange = None
        if connection.held_by:
            connection.release(PEER_WRITE_FULL)
        idle = self._idle.get(connection.server.id)
        if idle is None:
            idle = self._idle[connection.server.id] = []
        if len(idle) >= MAX_IDLE_PER_SERVER or connection.lost:
            connection.close()
            return
        connection.idle_since = self.loop.time()
        idle.append(connection)

    def forget(self, connection: UpstreamConnection) -> None:
        idle = self._idle.get(connection.server.id)
        if idle and connection in idle:
            idle.remove(connection)

    def close_idle(self, older_than_s: float | None = None, server_id: str | None = None) -> None:
        """Close idle connections: all, those of one server, or those idle too long."""
        now = self.loop.time()
        for sid, idle in list(self._idle.items()):
            if server_id is not None and sid != server_id:
                continue
            keep = [c for c in idle if older_than_s is not None and now - c.idle_since < older_than_s]
            for connection in idle:
                if connection not in keep:
                    connection.close()
            self._idle[sid] = keep
