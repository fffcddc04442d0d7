"""The client side of the proxy: one protocol per downstream TCP connection.

Requests are parsed with httptools as bytes arrive. Pipelined requests queue behind the one being
served, so responses leave in request order; their bodies wait in bounded buffers (reading pauses
beyond the bound). After a `101 Switching Protocols` the connection becomes a raw tunnel.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from lbd.proxy.exchange import PENDING_LIMIT, Exchange
from lbd.proxy.flow import BUFFER_FULL, PEER_WRITE_FULL, PIPELINE_FULL, FlowControlled
from lbd.proxy.headers import CRLF, REQUEST_HEADERS, SEP, simple_response

if TYPE_CHECKING:
    from lbd.proxy.server import ProxyContext
    from lbd.proxy.upstream import UpstreamConnection

MAX_PIPELINED = 16


class ClientConnection(FlowControlled):
    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self.parser = httptools.HttpRequestParser(self)
        self.parsing: Exchange | None = None  # the request whose bytes are arriving now
        self.active: Exchange | None = None  # the request being answered now
        self.queue: deque[Exchange] = deque()  # pipelined requests waiting their turn
        self.upgrading: Exchange | None = None
        self.tunnel: asyncio.Transport | None = None
        self.tunnel_exchange: Exchange | None = None
        self.client_ip = b"unknown"
        self.closing = False
        self.write_paused = False
        self.feeding = False  # parsing our bytes: upstream writes they cause are corked until the end
        self.corked_upstreams: list[FlowControlled] = []
        self.idle_since = ctx.loop.time()

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        peer = transport.get_extra_info("peername")
        if peer:
            self.client_ip = str(peer[0]).encode()
        self.ctx.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        if self.upgrading is not None:
            self._keep_early_tunnel_bytes(self.upgrading, data)
            return
        self.feeding = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            upgrading: Exchange | None = self.upgrading  # set by on_message_complete during the feed
            if upgrading is not None:
                self._keep_early_tunnel_bytes(upgrading, data[upgrade.args[0] :])
        except httptools.HttpParserError as error:
            self._malformed(error)
        finally:
            self.feeding = False
            if self.corked_upstreams:
                for upstream in self.corked_upstreams:
                    upstream.flush()
                self.corked_upstreams.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self.ctx.connections.discard(self)
        if self.tunnel is not None:
            self.tunnel.close()
        if self.tunnel_exchange is not None:
            self.tunnel_exchange.tunnel_closed()
        if self.active is not None:
            self.active.client_lost()
        for waiting in self.queue:
            waiting.client_lost()
        self.queue.clear()

    def pause_writing(self) -> None:
        self.write_paused = True
        self._hold_source(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        self._hold_source(False)

    def _hold_source(self, hold: bool) -> None:
        """Our socket buffer is full (or drained): pause (resume) whatever feeds it."""
        source: FlowControlled | None = None
        if self.active is not None:
            source = self.active.upstream
        elif self.tunnel is not None:
            protocol = self.tunnel.get_protocol()
            source = protocol if isinstance(protocol, FlowControlled) else None
        if source is not None:
            if hold:
                source.hold(PEER_WRITE_FULL)
            else:
                source.release(PEER_WRITE_FULL)

    # --- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.parsing = Exchange(self)

    def on_url(self, url: bytes) -> None:
        assert self.parsing is not None
        self.parsing.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        exchange = self.parsing
        assert exchange is not None
        kind = REQUEST_HEADERS.get(name.lower())
        if kind is None:
            exchange.header_pieces += (name, SEP, value, CRLF)  # end-to-end: forwarded as it came
        else:
            exchange.special_header(kind, name, value)

    def on_headers_complete(self) -> None:
        exchange = self.parsing
        assert exchange is not None
        exchange.headers_complete(self.parser.get_method(), self.parser.get_http_version())
        if self.closing:
            return
        if self.active is None:
            self.active = exchange
            exchange.start()
        else:
            self.queue.append(exchange)
            if len(self.queue) >= MAX_PIPELINED:
                self.hold(PIPELINE_FULL)

    def on_body(self, body: bytes) -> None:
        assert self.parsing is not None
        self.parsing.request_body(body)

    def on_message_complete(self) -> None:
        exchange = self.parsing
        assert exchange is not None
        self.parsing = None
        if exchange.upgrade is not None:
            self.upgrading = exchange
        exchange.request_done()

    # --- used by exchanges --------------------------------------------------------------------

    def abort(self) -> None:
        self._corked = None
        if self.transport is not None:
            self.transport.abort()

    def exchange_finished(self, exchange: Exchange, keep_alive: bool) -> None:
        """The response is complete: serve the next pipelined request, or close."""
        if exchange is not self.active:
            return
        self.active = None
        if self.held_by:
            self.release(PEER_WRITE_FULL | BUFFER_FULL)
        if not keep_alive or self.closing or self.upgrading is exchange or self.parsing is exchange:
            self.close()
            return
        self.idle_since = self.ctx.loop.time()
        if self.queue:
            following = self.queue.popleft()
            if len(self.queue) < MAX_PIPELINED:
                self.release(PIPELINE_FULL)
            self.active = following
            following.start()

    def start_tunnel(self, exchange: Exchange, upstream: UpstreamConnection, upstream_bytes: bytes) -> None:
        assert self.transport is not None and upstream.transport is not None
        self.active = None
        self.upgrading = None
        self.tunnel = upstream.transport
        self.tunnel_exchange = exchange
        upstream.tunnel = self.transport
        self.release(BUFFER_FULL | PEER_WRITE_FULL)
        if exchange.early_tunnel:
            upstream.write(exchange.early_tunnel)
            exchange.early_tunnel = b""
        if upstream_bytes:
            self.write(upstream_bytes)

    # --- closing --------------------------------------------------------------------------------

    def close(self) -> None:
        self.closing = True
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def shutdown(self) -> None:
        """Graceful stop: close now if idle, else after the response in progress."""
        self.closing = True
        if self.active is None and self.parsing is None and self.tunnel is None:
            self.close()

    @property
    def idle(self) -> bool:
        return self.active is None and self.parsing is None and self.tunnel is None and not self.queue

    def _keep_early_tunnel_bytes(self, exchange: Exchange, data: bytes) -> None:
        """Bytes sent after an upgrade request, before the server agreed: held until it does."""
        exchange.early_tunnel += data
        if len(exchange.early_tunnel) > PENDING_LIMIT:
            self.hold(BUFFER_FULL)

    def _malformed(self, error: httptools.HttpParserError) -> None:
        """Bad framing is never guessed at: answer 400 if we can still speak, and close."""
        broken = self.parsing
        self.parsing = None
        self.closing = True
        reason = str(error) or type(error).__name__
        if self.active is None:
            self.write(simple_response(400, f"malformed request: {reason}", close=True))
            self.close()
        elif self.active is broken:
            broken.request_malformed(reason)  # its body broke mid-way: stop it now
        # else: a pipelined request behind the active one broke; close after the active response
