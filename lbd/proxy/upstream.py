"""Connections to backend servers: response parsing (httptools) and a keep-alive pool per server."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from typing import TYPE_CHECKING, Any, Final, cast

import httptools

from lbd.models import Server
from lbd.proxy.flow import PEER_WRITE_FULL, FlowControlled
from lbd.proxy.headers import (
    CONNECTION,
    CONTENT_LENGTH,
    CRLF,
    RESPONSE_HEADERS,
    SEP,
    TRANSFER_ENCODING,
    UPGRADE,
    VIA,
    connection_tokens,
    is_chunked,
    wants_keep_alive,
)

if TYPE_CHECKING:
    from lbd.proxy.exchange import Exchange

MAX_IDLE_PER_SERVER: Final = 128
# Linux treats a request/response connection as interactive and delays its ACKs (up to 40 ms) to
# piggyback them on the next request. A server sending a response larger than its socket's send
# buffer then waits for that ACK, and the response stalls for the full delay: about 1% of 64 KiB
# responses did (`make bench`). A read that leaves a response incomplete therefore acknowledges at
# once (TCP_QUICKACK); a response read whole costs nothing extra.
TCP_QUICKACK: Final = getattr(socket, "TCP_QUICKACK", 0)  # 0 where the platform has none


class UpstreamConnection(FlowControlled):
    """One TCP connection to a server, carrying one exchange at a time.

    Parser callbacks forward the response to the attached exchange. The end of a response is only
    acted on after `feed_data` returns, so bytes a misbehaving server sends after a complete
    response are caught (the connection is then discarded) instead of being read as the next
    exchange's response.
    """

    def __init__(self, pool: UpstreamPool, server: Server) -> None:
        self.pool = pool
        self.server = server
        self.exchange: Exchange | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.reused = False
        self.idle_since = 0.0
        # the response being parsed: its status line and what its headers say
        self.status = 0
        self.reason = b""
        self.header_pieces: list[bytes] = []  # forwarded headers: name, ": ", value, CRLF, ...
        self.has_length = False
        self.chunked = False
        self.conn_tokens: frozenset[bytes] = frozenset()
        self.upgrade: bytes | None = None
        self.via: bytes | None = None
        self.done = False
        self.keep_alive = False
        self.broken = False
        self.tunnel: asyncio.Transport | None = None
        self.lost = False
        self.tcp_socket: Any = None  # set where TCP_QUICKACK applies (uvloop's socket-like object)

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        sock = transport.get_extra_info("socket")
        if TCP_QUICKACK and sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            self.tcp_socket = sock

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        exchange = self.exchange
        if exchange is None:
            # A server may not speak unasked; whatever this is, the connection cannot be trusted.
            self.close()
            return
        exchange.last_activity = self.pool.loop.time()  # the server is not silent
        client = exchange.client
        corked = client.cork()  # the head and body this read carries leave in one write
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            if self.status == 101:
                exchange.start_tunnel(data[upgrade.args[0] :])
                return
            self.broken = True
        except httptools.HttpParserError:
            self.broken = True
            if not self.done:
                exchange.upstream_failed_bad_response()
                return
        finally:
            if corked:
                client.flush()
        if self.done:
            self.done = False
            exchange.response_complete(self.keep_alive and not self.broken)
        elif self.tcp_socket is not None:
            self._acknowledge_now()

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

    # --- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done:
            self.broken = True
        self.status = 0
        self.reason = b""
        self.header_pieces = []
        self.has_length = self.chunked = False
        self.conn_tokens = frozenset()
        self.upgrade = self.via = None

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        kind = RESPONSE_HEADERS.get(name.lower())
        if kind is None:
            self.header_pieces += (name, SEP, value, CRLF)
        elif kind == CONTENT_LENGTH:
            self.has_length = True
            self.header_pieces += (name, SEP, value, CRLF)
        elif kind == CONNECTION:
            self.conn_tokens |= connection_tokens(value)
        elif kind == TRANSFER_ENCODING:
            self.chunked = is_chunked(value)
        elif kind == UPGRADE:
            self.upgrade = value
        elif kind == VIA:
            self.via = value if self.via is None else self.via + b", " + value

    def on_headers_complete(self) -> None:
        if self.done or self.exchange is None:
            self.broken = True
            return
        self.status = self.parser.get_status_code()
        if 100 <= self.status < 200 and self.status != 101:
            return  # interim response: relayed whole at its message end
        exchange = self.exchange
        exchange.response_head(self)
        if exchange.is_head:
            # httptools cannot be told a HEAD response has no body; end it here, and give the
            # connection a fresh parser for its next response.
            self.keep_alive = wants_keep_alive(self.parser.get_http_version(), self.conn_tokens)
            self.done = True
            self.parser = httptools.HttpResponseParser(self)

    def on_body(self, body: bytes) -> None:
        if self.done or self.exchange is None:
            self.broken = True
            return
        self.exchange.response_body(body)

    def on_message_complete(self) -> None:
        if self.done or self.exchange is None:
            return
        if 100 <= self.status < 200 and self.status != 101:
            self.exchange.interim_response(self)
            return
        if self.status == 101:
            return  # the upgrade exception from feed_data takes it from here
        self.keep_alive = self.parser.should_keep_alive()
        self.done = True

    # --- used by the exchange and the pool ------------------------------------------------------

    def close(self) -> None:
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self._corked = None
        if self.transport is not None:
            self.transport.abort()


class UpstreamPool:
    """Idle keep-alive connections per server, newest first (LIFO keeps few connections warm)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, idle_timeout_s: float = 30.0) -> None:
        self.loop = loop
        self.idle_timeout_s = idle_timeout_s
        self._idle: dict[str, list[UpstreamConnection]] = {}
        self._tls = ssl.create_default_context()

    def acquire(self, server: Server) -> UpstreamConnection | None:
        idle = self._idle.get(server.id)
        while idle:
            connection = idle.pop()
            if connection.server is not server:  # the id was re-registered (or reloaded) elsewhere
                connection.close()
                continue
            transport = connection.transport
            if transport is not None and not transport.is_closing() and not connection.lost:
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
