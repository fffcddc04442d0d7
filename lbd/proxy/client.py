"""The client side of the proxy: one protocol per downstream TCP connection.

Requests are parsed with httptools as bytes arrive, except the commonest heads, which a compiled
scan reads when they arrive whole (`request_scan`; it leaves anything else to llhttp). Pipelined
requests queue behind the one being served, so responses leave in request order; their bodies wait
in bounded buffers (reading pauses beyond the bound). After a `101 Switching Protocols` the
connection becomes a raw tunnel.

What a client may send is bounded (`[limits]`): the request line (414), the head's size and field
count (431), the body (413), and the time to send a head (408, the slowloris defence); a breach is
answered, the connection closed and the breach counted. The head is measured as bytes arrive, so
httptools never buffers more than the limit plus one read.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import httptools

from lbd.accesslog import client_address
from lbd.clock import monotonic  # not loop.time(): a method call through Python
from lbd.proxy.deadlines import KeptDeadline
from lbd.proxy.exchange import PENDING_LIMIT, Exchange
from lbd.proxy.flow import BUFFER_FULL, PEER_WRITE_FULL, PIPELINE_FULL, FlowControlled, hold_peer
from lbd.proxy.headers import CRLF, FORWARD, simple_response
from lbd.proxy.request import X_FORWARDED_PROTO_LINE, Refused, RequestHead, body_too_large
from lbd.proxy.request_scan import scan_head

if TYPE_CHECKING:
    from lbd.proxy.context import ProxyContext

MAX_PIPELINED: Final = 16
# After answering a client that is still sending its request, keep reading (and dropping) its bytes
# this long before closing: closing a socket with unread input sends a reset, which can destroy the
# answer before the client reads it (nginx's lingering_close).
LINGER_S: Final = 5.0
# On a graceful stop, a connection accepted just before that has sent nothing yet gets this long to
# send its first request, which is then served (its bytes may already be on the way; Go's
# http.Server waits the same way).
FIRST_REQUEST_GRACE_S: Final = 1.0


class ClientConnection(FlowControlled):
    def __init__(self, ctx: ProxyContext, tls_lines: Callable[[asyncio.BaseTransport], bytes] | None = None) -> None:
        super().__init__()
        self.ctx = ctx
        # on the TLS listener: what its requests carry to servers (X-Forwarded-Proto: https, the
        # client certificate's subject), computed once the handshake is done
        self.tls_lines = tls_lines
        self.proto_lines = X_FORWARDED_PROTO_LINE
        self.kinds = ctx.request_kinds
        self.parser = httptools.HttpRequestParser(self)
        self.parsing: Exchange | None = None  # the request whose bytes are arriving now
        self.head = RequestHead()  # the parsing request's head (the last one's once its head is complete)
        self.active: Exchange | None = None  # the request being answered now
        self.queue: deque[Exchange] = deque()  # pipelined requests waiting their turn
        self.upgrading: Exchange | None = None
        self.tunnel: asyncio.Transport | None = None
        self.tunnel_exchange: Exchange | None = None
        self.client_ip = b"unknown"
        self.client_port = 0
        self.forwarded_for_line = b"X-Forwarded-For: unknown\r\n"  # for requests that bring no X-Forwarded-For
        self.logged_address = b""  # `address`, once the access log has asked for it
        self.closing = False
        self.half_closed = False  # the client sent its FIN after whole requests: close once they are answered
        self.write_paused = False
        self.feeding = False  # parsing our bytes: upstream writes they cause are gathered until the end
        self.gathering: list[FlowControlled] = []  # upstream connections whose writes are gathered
        self.idle_since = monotonic()
        self.limits = ctx.limits
        self.in_head = False  # between a request's first byte and the end of its headers
        self.head_bytes = 0  # of the request line and header fields parsed so far
        self.head_received = 0  # bytes read while a head was incomplete (bounds what the parser buffers)
        self.header_count = 0
        self.body_bytes = 0
        self.read_body_bytes = 0  # body bytes, of any request, in the read being parsed
        self.framing_bytes = 0  # bytes of chunk framing and trailer read since the last body data
        self.deadline = 0  # the header timeout's (or linger's) handle on the deadline wheel; 0 when unarmed
        self.request_deadline = KeptDeadline(ctx.deadlines)  # its requests' server timeouts, one after another
        self.lingering = False  # answered and half-closed; dropping what the client still sends
        self.linger_on_close = False  # the request being answered was refused before it was all read
        self.requests = 0  # request heads received on this connection
        # llhttp read a message after which it takes no other (`Connection: close`, `Proxy-Connection:
        # close`, HTTP/1.0): every later byte is llhttp's to refuse, never the scan's to serve
        self.llhttp_ended = False
        self.stopping = False  # a graceful stop came before the first request: serve that one, then close
        self.fd = -1  # the socket's descriptor, looked up the first time a body is spliced to it
        self.tunnel_bytes = 0  # sent by the client through its tunnel (the access log's bytes_in)

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.attach(transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.client_ip = str(peer[0]).encode()
            self.client_port = int(peer[1])
            self.forwarded_for_line = b"X-Forwarded-For: " + self.client_ip + CRLF
        if self.tls_lines is not None:
            self.proto_lines = self.tls_lines(transport)
        connections = self.ctx.connections
        connections.add(self)
        if len(connections) > self.limits.max_connections:
            refused = Refused(503, "too many client connections; try again later", "too_many_connections")
            self._refuse(refused, linger=False)  # nothing was read; lingering would hold the excess open
            return
        self.deadline = self.ctx.deadlines.arm(self, self.idle_since + self.ctx.client_header_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return
        if self.tunnel is not None:
            self.tunnel_bytes += len(data)
            self.tunnel.write(data)
            return
        upgrading = self.upgrading  # a local: the feed below may set the attribute
        if upgrading is not None:
            self._keep_early_tunnel_bytes(upgrading, data)
            return
        self.feeding = True
        body_before = self.body_bytes
        head_before = self.in_head
        self.read_body_bytes = 0
        try:
            if self.parsing is None and not self.closing and not self.llhttp_ended:  # llhttp has nothing buffered
                taken = self._scanned_requests(data)
                if taken:
                    if taken == len(data) or self.lingering:
                        return
                    data = data[taken:]
            self.parser.feed_data(data)
            if self.in_head:
                # a head begun in this read has at most what the requests before it did not take
                self._head_incomplete(len(data) if head_before else len(data) - self.read_body_bytes)
            elif self.parsing is not None and self.head.chunked:
                self._chunk_framing(len(data), self.body_bytes > body_before)
        except httptools.HttpParserUpgrade as upgrade:
            upgrading = self.upgrading  # set by on_message_complete during the feed
            if upgrading is not None:
                self._keep_early_tunnel_bytes(upgrading, data[upgrade.args[0] :])
        except httptools.HttpParserError as error:
            refused = error.__context__
            if self.llhttp_ended and not isinstance(refused, Refused):
                # bytes after a request that ends the connection (`Connection: close`, HTTP/1.0):
                # dropped, as HAProxy and nginx drop them; the requests before them are still answered
                return
            if isinstance(refused, Refused):
                self._refuse(refused)
            else:
                reason = str(error) or type(error).__name__
                self._refuse(Refused(400, f"malformed request: {reason}", "malformed"))
        finally:
            self.feeding = False
            if self.gathering:
                for upstream in self.gathering:
                    upstream.flush()
                self.gathering.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self.ctx.connections.discard(self)
        self.deadline = self.ctx.deadlines.move(self, self.deadline, None)
        self.request_deadline.clear()
        if self.tunnel is not None:
            self.tunnel.close()
        if self.tunnel_exchange is not None:
            self.tunnel_exchange.tunnel_closed()
        if self.active is not None:
            self.active.client_lost()
        for waiting in self.queue:
            waiting.client_lost()
        self.queue.clear()

    def eof_received(self) -> bool | None:
        """The client half-closed (it will send nothing more): the requests it sent whole are still
        answered, then the connection closes, as HAProxy keeps half-closed clients; a request cut off
        mid-way, an idle connection or a tunnel close with it."""
        if self.parsing is not None or self.tunnel is not None or self.active is None:
            return None
        self.half_closed = True
        return True  # keep the transport open for writing

    def pause_writing(self) -> None:
        self.write_paused = True
        self._hold_source(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        self._hold_source(False)

    def _hold_source(self, hold: bool) -> None:
        """Our socket buffer is full (or drained): pause (resume) whatever feeds it."""
        if self.tunnel is not None:
            hold_peer(self.tunnel, hold)
            return
        source = self.active.upstream if self.active is not None else None
        if source is not None:
            if hold:
                source.hold(PEER_WRITE_FULL)
            else:
                source.release(PEER_WRITE_FULL)

    # --- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.head = RequestHead()
        self.parsing = Exchange(self, self.head)
        self.in_head = True
        self.head_bytes = self.head_received = self.header_count = self.body_bytes = self.framing_bytes = 0

    def on_url(self, url: bytes) -> None:
        head = self.head
        head.url += url
        self.head_bytes += len(url)
        if len(head.url) > self.limits.max_request_line_bytes:
            limit = self.limits.max_request_line_bytes
            raise Refused(414, f"the request target is longer than {limit} bytes", "request_line_too_long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            self._trailer_field(name, value)
            return
        # counted here, checked once the head is complete or a read leaves it incomplete: what a
        # single read can hold bounds what is parsed before the check
        self.header_count += 1
        self.head_bytes += len(name) + len(value) + 4
        kind = self.kinds.of(name, 0, len(name))
        head = self.head
        if kind == FORWARD or head.read(kind, value):
            head.header_pieces.append(b"%s: %s\r\n" % (name, value))  # forwarded as it came

    def on_headers_complete(self) -> None:
        exchange = self.parsing
        assert exchange is not None
        self.in_head = False
        breach = self._head_limit_breach(self.head_bytes)
        if breach is not None:
            raise breach
        head = exchange.request
        upgrading = head.upgrade is not None and self.parser.should_upgrade()  # llhttp's view, not a guess
        # llhttp's verdict, which also ends the connection on a `Proxy-Connection: close` (a field
        # lbd drops unread): the client is told so, not invited to send a request llhttp would refuse
        keeps = self.parser.should_keep_alive()
        self._head_complete(exchange, self.parser.get_method(), self._http_version(), upgrading, not keeps)

    def _scanned_requests(self, data: bytes) -> int:
        """Serve the plain requests at the start of `data` without llhttp (`request_scan`); how many
        bytes they took. The first head the scan declines, and all after it, are llhttp's."""
        taken = 0
        limits = self.limits
        while taken < len(data) and self.parsing is None and not self.closing:
            head = RequestHead()
            end = scan_head(
                data,
                taken,
                head,
                self.kinds,
                limits.max_request_line_bytes,
                limits.max_headers,
                limits.max_header_bytes,
            )
            if end < 0:
                break
            taken = end
            self.head = head
            exchange = self.parsing = Exchange(self, head)
            try:
                self._head_complete(exchange, head.method, "1.1", False, False)
            except Refused as refused:
                self._refuse(refused)
                return len(data)  # the connection closes: what follows is not read
            self._request_read()  # a scanned request has no body
        return taken

    def _head_complete(self, exchange: Exchange, method: bytes, version: str, upgrading: bool, last: bool) -> None:
        """A request head is whole and its syntax valid: apply a proxy's rules to it (a breach
        raises `Refused`), then serve it, or queue it behind the one being served. `last`: the
        parser takes nothing after this request."""
        if self.deadline:
            self.deadline = self.ctx.deadlines.move(self, self.deadline, None)
        head = exchange.request
        refused = head.complete(method, version, upgrading)
        if refused is not None:
            raise refused
        if last:
            head.keep_alive = False
        max_body = self.limits.max_body_bytes
        if max_body and head.content_length > max_body:
            raise body_too_large(max_body)
        if self.closing:
            return
        self.requests += 1
        if self.stopping:
            self.closing = True  # this one is served (with Connection: close), nothing after it
        if self.active is None:
            self.active = exchange
            exchange.start()
        else:
            self.queue.append(exchange)
            if len(self.queue) >= MAX_PIPELINED:
                self.hold(PIPELINE_FULL)

    def _http_version(self) -> str:
        """The request's HTTP version, 1.1 or 1.0; the others llhttp parses (0.9, 2.0) get 505.

        Asked of llhttp for every head it reads, never inferred from its keep-alive verdict: that
        verdict also reads `Proxy-Connection`, which would pass an HTTP/1.0 request as 1.1 (and its
        Transfer-Encoding with it)."""
        version: str = self.parser.get_http_version()
        if version not in ("1.0", "1.1"):
            self.head.version = version  # for the access log
            raise Refused(505, f"HTTP/{version} is not supported; lbd speaks HTTP/1.0 and 1.1", "malformed")
        return version

    def on_body(self, body: bytes) -> None:
        exchange = self.parsing
        if exchange is None:
            return  # the request was answered before its body arrived (refused): the rest is dropped
        self.body_bytes += len(body)
        self.read_body_bytes += len(body)
        max_body = self.limits.max_body_bytes
        if max_body and self.body_bytes > max_body:
            raise body_too_large(max_body)
        exchange.request_body(body)

    def on_message_complete(self) -> None:
        if not self.parser.should_keep_alive():
            self.llhttp_ended = True
        self._request_read()

    def _request_read(self) -> None:
        """The request being parsed is whole, body included."""
        exchange = self.parsing
        if exchange is None:
            return  # answered before it was all read
        self.parsing = None
        if exchange.request.upgrade is not None:
            self.upgrading = exchange
        exchange.request_done()

    # --- used by exchanges --------------------------------------------------------------------

    def socket_fd(self) -> int:
        """The socket's descriptor, for moving bytes to it in the kernel; -2 where there is none (or
        the transport encrypts what goes through it)."""
        if self.fd == -1 and self.transport is not None:
            sock = self.transport.get_extra_info("socket")
            plain = sock is not None and self.transport.get_extra_info("sslcontext") is None
            self.fd = sock.fileno() if plain else -2
        return self.fd

    def gather_for(self, upstream: FlowControlled) -> None:
        """While a read of ours is parsed, what it makes lbd write to `upstream` (a request head and
        the body bytes in the same read) is gathered and leaves in one write when the read is done."""
        if self.feeding and upstream.cork():
            self.gathering.append(upstream)

    def exchange_finished(self, exchange: Exchange, keep_alive: bool, now: float) -> None:
        """The response is complete (at `now`): serve the next pipelined request, or close."""
        if exchange is not self.active:
            return
        self.active = None
        if self.held_by:
            self.release(PEER_WRITE_FULL | BUFFER_FULL)
        if self.parsing is exchange or self.linger_on_close:
            self._linger()  # the client may still be sending the request's body
            return
        if not keep_alive or self.closing or self.upgrading is exchange or (self.half_closed and not self.queue):
            self.close()
            return
        self.idle_since = now
        if self.queue:
            following = self.queue.popleft()
            if len(self.queue) < MAX_PIPELINED:
                self.release(PIPELINE_FULL)
            self.active = following
            following.start()

    def tunnel_to(self, peer: asyncio.Transport | None, exchange: Exchange) -> None:
        """The server switched protocols: what the client sends from now on goes to `peer` unparsed."""
        self.active = None
        self.upgrading = None
        self.tunnel = peer
        self.tunnel_exchange = exchange
        self.release(BUFFER_FULL | PEER_WRITE_FULL)

    # --- closing --------------------------------------------------------------------------------

    def close(self) -> None:
        self.closing = True
        super().close()

    def _linger(self) -> None:
        """Send the answer and our FIN, then drop what the client still sends until it closes too,
        or for LINGER_S at most."""
        self.closing = self.lingering = True
        self.parsing = None
        self.flush()
        transport = self.transport
        if transport is None or transport.is_closing() or not transport.can_write_eof():
            self.close()
            return
        transport.write_eof()
        if self.held_by:
            self.release(PEER_WRITE_FULL | BUFFER_FULL | PIPELINE_FULL)
        self.deadline = self.ctx.deadlines.move(self, self.deadline, monotonic() + LINGER_S)

    def shutdown(self) -> None:
        """Graceful stop: close now if idle, else after the response in progress. A request whose
        head is arriving is served; a connection that has not sent its first request yet gets
        FIRST_REQUEST_GRACE_S to send it."""
        if self.closing or self.active is not None or self.tunnel is not None:
            pass
        elif self.parsing is not None:
            self.stopping = True  # its header timeout still applies
            return
        elif self.requests == 0:
            self.stopping = True
            when = monotonic() + FIRST_REQUEST_GRACE_S
            self.deadline = self.ctx.deadlines.move(self, self.deadline, when)
            return
        self.closing = True
        if self.active is None and self.parsing is None and self.tunnel is None:
            self.close()

    @property
    def address(self) -> bytes:
        """The client as the access log writes it, `ip:port`: made once, when the log first asks."""
        if not self.logged_address:
            self.logged_address = client_address(self.client_ip, self.client_port)
        return self.logged_address

    @property
    def idle(self) -> bool:
        return self.active is None and self.parsing is None and self.tunnel is None and not self.queue

    def _keep_early_tunnel_bytes(self, exchange: Exchange, data: bytes) -> None:
        """Bytes sent after an upgrade request, before the server agreed: held until it does."""
        exchange.early_tunnel += data
        if len(exchange.early_tunnel) > PENDING_LIMIT:
            self.hold(BUFFER_FULL)

    def _chunk_framing(self, received: int, body_progressed: bool) -> None:
        """A read of a chunked body: one that carried no body data was all framing (size lines,
        extensions, a trailer that llhttp gathers until its line ends). Bounded like a head, so a
        trailer line that never ends costs neither memory nor llhttp's re-copying of it."""
        if body_progressed:
            self.framing_bytes = 0
            return
        self.framing_bytes += received
        limit = self.limits.max_header_bytes
        if self.framing_bytes > limit:
            refused = Refused(
                431, f"the request's chunk framing and trailer are larger than {limit} bytes", "headers_too_large"
            )
            self._refuse(refused)

    def _trailer_field(self, name: bytes, value: bytes) -> None:
        """A field of a chunked body's trailer section (llhttp reports it like a header): bounded
        like a head, then dropped (lbd ends a chunked body it forwards without trailers)."""
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > self.limits.max_header_bytes:
            limit = self.limits.max_header_bytes
            raise Refused(431, f"the request head and trailer are larger than {limit} bytes", "headers_too_large")

    def _head_limit_breach(self, head_bytes: int) -> Refused | None:
        """431 when the head has too many fields or too many bytes."""
        limits = self.limits
        if self.header_count > limits.max_headers:
            return Refused(431, f"more than {limits.max_headers} header fields", "too_many_headers")
        if head_bytes > limits.max_header_bytes:
            limit = limits.max_header_bytes
            return Refused(431, f"the request head is larger than {limit} bytes", "headers_too_large")
        return None

    def _head_incomplete(self, received: int) -> None:
        """Part of a request head arrived: bound its size, and start the header timeout."""
        self.head_received += received
        breach = self._head_limit_breach(self.head_received)
        if breach is not None:
            self._refuse(breach)
        elif not self.deadline:
            self.deadline = self.ctx.deadlines.arm(self, monotonic() + self.ctx.client_header_timeout_s)

    def deadline_reached(self) -> None:
        """The header timeout: a head still incomplete gets 408; a connection that never sent a byte
        is closed without a word (like HAProxy, so probes and pre-connects are not logged as errors)."""
        self.deadline = 0
        if self.lingering:
            self.close()
        elif self.in_head:
            self._refuse(Refused(408, "the request head took too long to arrive", "header_timeout"))
        elif self.idle and not self.closing:
            if not self.stopping:
                self.ctx.rejections["header_timeout"] += 1
            self.close()

    def _refuse(self, refused: Refused, linger: bool = True) -> None:
        """Bad framing is never guessed at and limits are not negotiable: answer if we can still
        speak, and close."""
        if self.lingering:
            return  # answered and half-closed already: what follows is dropped unparsed
        self.ctx.rejections[refused.reason] += 1
        broken = self.parsing
        self.parsing = None
        self.in_head = False
        self.closing = True
        if self.active is None:
            answer = simple_response(refused.status, refused.text, close=True)
            self.write(answer)
            self.ctx.count_response(refused.status, None)
            self._log_refusal(broken, refused, len(answer))
            if linger:
                self._linger()
            else:
                self.close()
        elif self.active is broken:
            self.linger_on_close = True
            broken.client_failed(refused.status, refused.text, refused.reason)  # its body broke mid-way: stop it now
        # else: a pipelined request behind the active one broke; close after the active response

    def _log_refusal(self, broken: Exchange | None, refused: Refused, answered: int) -> None:
        """The access-log entry of a request (or, with none begun, a connection) lbd refused itself."""
        log = self.ctx.access_log
        if log is None or not log.on:
            return
        exchange = broken if broken is not None else Exchange(self, RequestHead())
        request = exchange.request
        if request.url and not request.method:  # the request line was parsed, the head not completed
            request.method = self.parser.get_method()
        exchange.status = refused.status
        exchange.bytes_out = answered
        exchange.log(refused.reason)
