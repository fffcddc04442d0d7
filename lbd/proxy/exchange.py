"""One request and its response on their way through the proxy.

The client connection feeds the request in (head, body chunks, end); the exchange picks a server,
streams everything to an upstream connection and the response back, enforces the upstream timeout
(`timeout_base + region latency`) and turns failures into 502/503/504 while nothing of the response
has reached the client yet. It reports each outcome to the registry and never decides health.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import TYPE_CHECKING, Final

from lbd.balancer import BadRoute, NoServer
from lbd.models import Outcome, Server
from lbd.proxy.flow import BUFFER_FULL, PEER_WRITE_FULL
from lbd.proxy.headers import (
    CLIENT_ID,
    CLIENT_REGION,
    CONNECTION,
    CONTENT_LENGTH,
    COOKIE,
    CRLF,
    HOST,
    SEP,
    TRANSFER_ENCODING,
    UPGRADE,
    VIA,
    VIA_LINE,
    VIA_VALUE,
    X_FORWARDED_FOR,
    connection_tokens,
    is_chunked,
    merged_line,
    named_hop_by_hop,
    simple_response,
    status_line,
    wants_keep_alive,
    without_named,
)
from lbd.proxy.request import Refused, cookie_value, host_problem, origin_form, unsupported_coding, without_h2c
from lbd.proxy.response import CHUNKED, LENGTH, NO_BODY, UNTIL_CLOSE, ResponseHead

if TYPE_CHECKING:
    from lbd.proxy.client import ClientConnection
    from lbd.proxy.upstream import UpstreamConnection

# RFC 9110 §9.2.2; any other method (POST, PATCH, LOCK, an unknown one) may change something each
# time it is processed, so it is never sent twice (nginx's proxy_next_upstream without non_idempotent)
IDEMPOTENT_METHODS: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
# A request that is never sent twice takes a pooled connection only if it was in use this recently: a
# server closes an idle connection (its keep-alive timeout, 2 s or more for common servers) only after
# longer, so a failure on it means the server had the request, and the client gets a 502. An older
# connection might be one the server is closing just now; a new one is opened instead.
NON_IDEMPOTENT_REUSE_S: Final = 1.0
ANY_IDLE: Final = float("inf")
PENDING_LIMIT: Final = 256 * 1024  # request bytes buffered while no upstream connection is attached
CHUNK_END: Final = b"0\r\n\r\n"
X_FORWARDED_PROTO_LINE: Final = b"X-Forwarded-Proto: http\r\n"


class Exchange:
    __slots__ = (
        "buffered",
        "chunked_to_client",
        "client",
        "client_id",
        "client_region",
        "close_after",
        "conn_tokens",
        "connecting",
        "content_length",
        "cookie",
        "ctx",
        "deadline",
        "deferred_reply",
        "early_tunnel",
        "failed_over",
        "finished",
        "forwarded_for",
        "has_body",
        "head",
        "header_pieces",
        "host",
        "hosts",
        "is_head",
        "keep_alive",
        "last_activity",
        "latency_s",
        "method",
        "pending",
        "pending_size",
        "replay",
        "replay_size",
        "request_chunked",
        "request_complete",
        "response_started",
        "retried_stale",
        "server",
        "set_cookie",
        "started_at",
        "status",
        "timeout_s",
        "transfer_encoding",
        "tunnel_open",
        "until_close",
        "upgrade",
        "upstream",
        "upstream_write_full",
        "url",
        "version",
        "via",
    )

    def __init__(self, client: ClientConnection) -> None:
        self.client = client
        self.ctx = client.ctx
        self.method = b""
        self.url = b""
        self.version = "1.1"
        self.header_pieces: list[bytes] = []  # forwarded headers: name, ": ", value, CRLF, ...
        self.client_id: bytes | None = None
        self.client_region: bytes | None = None
        self.host: bytes | None = None
        self.hosts = 0  # Host fields received (exactly one is valid in HTTP/1.1)
        self.cookie: bytes | None = None
        self.set_cookie = b""  # the Set-Cookie line issuing a new client id (client_id_fallback = "cookie")
        self.forwarded_for: bytes | None = None
        self.via: bytes | None = None
        self.conn_tokens: frozenset[bytes] = frozenset()
        self.transfer_encoding: bytes | None = None
        self.request_chunked = False
        self.has_body = False
        self.content_length = -1  # -1: no Content-Length
        self.deferred_reply: tuple[int, str] | None = None
        self.upgrade: bytes | None = None
        self.is_head = False
        self.keep_alive = True
        self.request_complete = False
        self.head = b""
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.buffered = True  # every request byte so far is still in `replay`
        self.replay: list[bytes] = []
        self.replay_size = 0
        self.server: Server | None = None
        self.upstream: UpstreamConnection | None = None
        self.connecting: asyncio.Task[UpstreamConnection] | None = None
        self.response_started = False
        self.until_close = False
        self.chunked_to_client = False
        self.close_after = False
        self.finished = False
        self.tunnel_open = False
        self.early_tunnel = b""
        self.started_at = 0.0
        self.last_activity = 0.0
        self.latency_s: float | None = None
        self.timeout_s = 0.0
        self.deadline = 0  # the deadline wheel's handle, 0 when none is armed
        self.upstream_write_full = False
        self.retried_stale = False
        self.failed_over = False
        self.status = 0

    # --- request side, fed by the client connection's parser ----------------------------------

    def special_header(self, kind: int, name: bytes, value: bytes) -> None:
        """A request header lbd reads, rewrites or drops (`headers.REQUEST_HEADERS`); the client
        connection appends every other header to `header_pieces` itself. Host and the framing
        headers are written by lbd itself (`_build_head`), never forwarded as they came."""
        if kind == CLIENT_ID:
            self.client_id = value
        elif kind == CLIENT_REGION:
            self.client_region = value
        elif kind == COOKIE:
            self.cookie = value if self.cookie is None else self.cookie + b"; " + value
        elif kind == HOST:
            self.hosts += 1
            self.host = value
            return
        elif kind == CONNECTION:
            self.conn_tokens = self.conn_tokens | connection_tokens(value)
            return
        elif kind == TRANSFER_ENCODING:
            prior = self.transfer_encoding
            self.transfer_encoding = value if prior is None else prior + b", " + value
            self.request_chunked = is_chunked(self.transfer_encoding)
            self.has_body = True
            return
        elif kind == CONTENT_LENGTH:
            digits = value.strip()  # llhttp allows digits only, but keeps trailing whitespace
            self.content_length = int(digits) if digits.isdigit() else 0
            self.has_body = self.content_length > 0
            return
        elif kind == UPGRADE:
            self.upgrade = value
            return
        elif kind == X_FORWARDED_FOR:
            self.forwarded_for = value if self.forwarded_for is None else self.forwarded_for + b", " + value
            return
        elif kind == VIA:
            self.via = value if self.via is None else self.via + b", " + value
            return
        else:
            return  # dropped
        self.header_pieces += (name, SEP, value, CRLF)

    def headers_complete(self, method: bytes, version: str) -> Refused | None:
        """The head is complete: check what llhttp does not (request.py), settle what is forwarded."""
        self.method = method
        self.version = version
        self.is_head = method == b"HEAD"
        self.keep_alive = wants_keep_alive(version, self.conn_tokens)
        if method == b"CONNECT":
            return Refused(405, "lbd is a reverse proxy; CONNECT is not supported", "malformed")
        refused = host_problem(self.hosts, self.host, version)
        if refused is not None:
            return refused
        if self.url[:1] != b"/":
            try:
                self.url, authority = origin_form(method, self.url)
            except Refused as bad_target:
                return bad_target
            if authority is not None:
                self.host = authority  # RFC 9112 §3.2.2: the target's authority replaces Host
        if self.transfer_encoding is not None:
            if version == "1.0":
                return Refused(400, "malformed request: Transfer-Encoding in HTTP/1.0 (RFC 9112 §6.1)", "malformed")
            refused = unsupported_coding(self.transfer_encoding)
            if refused is not None:
                return refused
        if self.upgrade is not None:
            if b"upgrade" not in self.conn_tokens:
                self.upgrade = None
            else:
                self.upgrade = without_h2c(self.upgrade)
                if self.upgrade is None:
                    # served as a plain request; llhttp reads the rest of the connection as upgraded
                    # bytes, so nothing more can be parsed on it
                    self.keep_alive = False
        return None

    def request_body(self, chunk: bytes) -> None:
        if self.server is not None:
            self.last_activity = self.ctx.loop.time()
        if self.request_chunked:
            self._to_upstream(b"%x\r\n" % len(chunk) + chunk + CRLF)
        else:
            self._to_upstream(chunk)

    def request_done(self) -> None:
        self.request_complete = True
        if self.deferred_reply is not None:
            self.reply(*self.deferred_reply, Outcome.OK)
            return
        if self.request_chunked:
            self._to_upstream(CHUNK_END)
        if self.server is not None and not self.finished:
            self.last_activity = self.ctx.loop.time()
            if not self.deadline:
                self._arm_timer()  # an armed deadline fires no later than needed and re-arms itself

    def _to_upstream(self, data: bytes) -> None:
        if self.finished:
            return
        if self.buffered:
            self.replay_size += len(data)
            if self.replay_size <= self.ctx.retry_body_limit:
                self.replay.append(data)
            else:
                self.buffered = False
                self.replay = []
        if self.upstream is not None:
            self.upstream.write(data)
            return
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size > PENDING_LIMIT:
            self.client.hold(BUFFER_FULL)

    # --- choosing and connecting ---------------------------------------------------------------

    def start(self) -> None:
        """Called when this exchange's turn on the client connection comes."""
        self.ctx.requests_total += 1
        if self.client_id is None:
            self.client_id = self._fallback_client_id()
            if self.client_id is None:
                self._refuse(400, "missing the client-id header; lbd routes each client by it")
                return
        try:
            server = self.ctx.balancer.choose(self._client(), self._region(), time.monotonic())
        except (BadRoute, NoServer) as unroutable:  # one name: mypyc types a handler's variable once
            self._refuse(400 if isinstance(unroutable, BadRoute) else 503, str(unroutable))
            return
        self._forward_to(server)

    def _fallback_client_id(self) -> bytes | None:
        """A client id for a request without the header (`client_id_fallback`): the client's IP
        address, or lbd's cookie (issued now when the request brings none); None: refuse."""
        fallback = self.ctx.client_id_fallback
        if fallback == "client-ip":
            return self.client.client_ip
        if fallback != "cookie":
            return None
        name = self.ctx.client_id_cookie
        if self.cookie is not None:
            known = cookie_value(self.cookie, name)
            if known is not None:
                return known
        issued = secrets.token_urlsafe(16).encode()
        self.set_cookie = b"Set-Cookie: " + name + b"=" + issued + b"; Path=/; HttpOnly; SameSite=Lax\r\n"
        return issued

    def _client(self) -> str:
        assert self.client_id is not None
        return self.client_id.decode("latin-1")

    def _region(self) -> str | None:
        return None if self.client_region is None else self.client_region.decode("latin-1")

    def _refuse(self, status: int, text: str) -> None:
        """Answer without a server. A bodiless request is answered once fully read, keeping the
        connection; one with a body is answered at once and the connection closed (its body is
        not worth reading)."""
        if self.request_complete or self.has_body:
            self.reply(status, text, Outcome.OK)
        else:
            self.deferred_reply = (status, text)

    def _forward_to(self, server: Server, fresh_connection: bool = False) -> None:
        self.server = server
        server.state.active += 1
        server.state.requests += 1
        self.timeout_s = self.ctx.timeout_s(server)
        self.last_activity = self.ctx.loop.time()
        # latency needs a fine clock: uvloop's loop time is in whole milliseconds, taken once per
        # loop iteration, so a loopback answer would often measure 0
        self.started_at = time.perf_counter()
        self.head = self._build_head(server)
        self._arm_timer()
        if fresh_connection:
            connection = None
        else:
            recent = ANY_IDLE if self.method in IDEMPOTENT_METHODS else NON_IDEMPOTENT_REUSE_S
            connection = self.ctx.pool.acquire(server, recent)
        if connection is not None:
            self._attach(connection)
        else:
            self.connecting = self.ctx.loop.create_task(self.ctx.pool.connect(server))
            self.connecting.add_done_callback(self._connected)

    def _build_head(self, server: Server) -> bytes:
        """The request head for `server`: the Host asked for, end-to-end headers as they came, then
        X-Forwarded-*, Via and the framing lbd chose (never a peer's framing headers as they came)."""
        pieces = self.header_pieces
        if self.conn_tokens and (named := named_hop_by_hop(self.conn_tokens)):
            pieces = without_named(pieces, named)
        client = self.client
        host = self.host
        if self.request_chunked:
            framing = b"Transfer-Encoding: chunked\r\n"
        elif self.content_length >= 0:
            framing = b"Content-Length: %d\r\n" % self.content_length
        else:
            framing = b""
        return b"".join(
            (
                self.method,
                b" ",
                self.url,
                b" HTTP/1.1\r\nHost: ",
                b"%s:%d" % (server.spec.host.encode(), server.spec.port) if host is None else host,
                CRLF,
                *pieces,
                client.forwarded_for_line
                if self.forwarded_for is None
                else merged_line(b"X-Forwarded-For", self.forwarded_for, client.client_ip),
                X_FORWARDED_PROTO_LINE,
                b"" if host is None else b"X-Forwarded-Host: " + host + CRLF,
                VIA_LINE if self.via is None else merged_line(b"Via", self.via, VIA_VALUE),
                framing,
                b"" if self.upgrade is None else b"Connection: upgrade\r\nUpgrade: " + self.upgrade + CRLF,
                CRLF,
            )
        )

    def _connected(self, task: asyncio.Task[UpstreamConnection]) -> None:
        self.connecting = None
        if task.cancelled():
            return
        error = task.exception()
        if self.finished:
            if error is None:
                task.result().close()
            return
        if error is not None:
            self._upstream_error(Outcome.CONNECT_FAILED, _describe_connect_error(error))
            return
        connection = task.result()
        if connection.lost:  # reset between the connect and this callback: nothing was sent
            self._upstream_error(Outcome.CONNECT_FAILED, "closed the connection as soon as it was opened")
            return
        self._attach(connection)

    def _attach(self, connection: UpstreamConnection) -> None:
        self.upstream = connection
        connection.exchange = self
        client = self.client
        if self.has_body and client.feeding and connection.cork():
            client.corked_upstreams.append(connection)  # the head and a body in the same packet: one write
        if client.write_paused:
            connection.hold(PEER_WRITE_FULL)
        connection.write(b"".join((self.head, *self.pending)) if self.pending else self.head)
        if self.pending:
            self.pending = []
            self.pending_size = 0
        if client.held_by:
            client.release(BUFFER_FULL)

    # --- response side, fed by the upstream connection's parser ------------------------------

    def response_head(self, head: ResponseHead, framing: int) -> None:
        """Send the response head on to the client, framed for it: a chunked body goes as it came to
        an HTTP/1.1 client, a body that ends with the connection is chunked for one, and an
        HTTP/1.0 client gets either body raw, then the connection closed."""
        self.response_started = True
        self.status = status = head.status
        self.latency_s = time.perf_counter() - self.started_at
        lines = _response_header_pieces(head)
        if status == 101 and head.upgrade is not None:
            lines.append(b"Connection: upgrade\r\nUpgrade: " + head.upgrade + CRLF)
        else:
            self.until_close = framing == UNTIL_CLOSE
            if framing == CHUNKED and self.version == "1.1":
                assert head.transfer_encoding is not None
                lines.append(b"Transfer-Encoding: " + head.transfer_encoding + CRLF)
            elif framing == UNTIL_CLOSE and self.version == "1.1":
                self.chunked_to_client = True
                lines.append(b"Transfer-Encoding: chunked\r\n")
            elif framing not in (NO_BODY, LENGTH):
                self.close_after = True  # an HTTP/1.0 client learns where the body ends from the close
            if not self.request_complete or not self.keep_alive or self.client.closing:
                self.close_after = True
            if self.close_after:
                lines.append(b"Connection: close\r\n")
            elif self.version == "1.0":
                lines.append(b"Connection: keep-alive\r\n")
        if self.set_cookie:
            lines.append(self.set_cookie)
        self.client.write(b"".join((status_line(status, head.reason), *lines, CRLF)))

    def response_body(self, body: bytes | memoryview) -> None:
        if self.chunked_to_client:
            self.client.write(b"%x\r\n" % len(body) + body + CRLF)
        else:
            self.client.write(body)

    def interim_response(self, head: ResponseHead) -> None:
        """Relay 100 Continue / 103 Early Hints (HTTP/1.0 clients do not understand them)."""
        if self.version == "1.1":
            lines = _response_header_pieces(head)
            self.client.write(b"".join((status_line(head.status, head.reason), *lines, CRLF)))

    def response_complete(self, upstream_keep_alive: bool) -> None:
        if self.finished:
            return
        if self.chunked_to_client:
            self.client.write(CHUNK_END)
        connection = self.upstream
        self.upstream = None
        if connection is not None:
            if upstream_keep_alive and self.request_complete:
                self.ctx.pool.release(connection)
            else:
                connection.exchange = None
                connection.close()
        self._finish(Outcome.STATUS_5XX if self.status >= 500 else Outcome.OK)

    # --- failures --------------------------------------------------------------------------------

    def upstream_lost(self) -> None:
        """The upstream connection closed under this exchange."""
        if self.finished:
            return
        if self.response_started and self.until_close:
            self.response_complete(False)  # the body's end was the connection's end
        elif self.response_started:
            self._abort(Outcome.RESET)
        else:
            self._upstream_error(Outcome.RESET, "closed the connection before responding")

    def upstream_failed_bad_response(self, what: str, unsent: bool) -> None:
        """The server's response broke its framing. `unsent`: nothing of it has left lbd yet (it was
        all in the read that broke, and that read's writes were dropped), so the client gets a 502."""
        if self.finished:
            return
        if self.response_started and not unsent:
            self._abort(Outcome.BAD_RESPONSE)
        else:
            self.response_started = self.chunked_to_client = self.until_close = False
            self.failed_over = self.retried_stale = True  # the server saw the request: no replay
            self._upstream_error(Outcome.BAD_RESPONSE, f"sent a malformed response ({what})")

    def client_stalled(self) -> None:
        """The client stopped sending its body, or stopped reading: free the server's slot."""
        if self.response_started:
            self._abort(Outcome.CLIENT_ABORTED)
        else:
            self._drop_upstream()
            self.reply(408, "the client sent nothing for too long", Outcome.CLIENT_ABORTED)

    def request_refused(self, status: int, text: str) -> None:
        """The request's body broke its framing or a limit mid-exchange: stop both sides."""
        if self.finished:
            return
        if self.response_started:
            self._abort(Outcome.CLIENT_ABORTED)
        else:
            self._drop_upstream()
            self.reply(status, text, Outcome.CLIENT_ABORTED)

    def _drop_upstream(self) -> None:
        """Abandon the upstream connection mid-exchange (it cannot be reused)."""
        if self.upstream is not None:
            self.upstream.exchange = None
            self.upstream.abort()
            self.upstream = None

    def client_lost(self) -> None:
        """The client went away: stop the upstream side too (its connection cannot be reused)."""
        if self.finished:
            return
        self._drop_upstream()
        self._account(Outcome.CLIENT_ABORTED)

    def _upstream_error(self, outcome: Outcome, what: str) -> None:
        """A failure before any response byte reached the client: retry when safe, else 502/504.

        A request is sent again only when that is safe (`_replayable`): nothing was sent (the
        connection was refused or never opened), or the method is idempotent. An idempotent request
        reset on a pooled connection (which the server may have closed as idle: the keep-alive race)
        is retried once on a new connection to the same server; any other failure once on a backup
        server, and the client's session moves there. A server that timed out after receiving the
        request is not retried: its deadline was the request's budget (HAProxy's default
        `retry-on conn-failure`), so the client gets its 504 at the deadline.
        """
        failed = self.upstream
        self.upstream = None
        if failed is not None:
            failed.exchange = None
            failed.abort()
        server = self.server
        assert server is not None
        if self._replayable(outcome, reached_server=failed is not None):
            if outcome is Outcome.RESET and failed is not None and failed.reused and not self.retried_stale:
                self.retried_stale = True
                self._retry_on(server, None)
                return
            if not self.failed_over:
                self.failed_over = True
                backup = self.ctx.balancer.backup(self._client(), self._region(), server, time.monotonic())
                if backup is not None:
                    self.ctx.failovers += 1
                    self._retry_on(backup, outcome)
                    return
        status = 504 if outcome is Outcome.TIMEOUT else 502
        self.reply(status, f"upstream {server.id} ({server.spec.url}) {what}", outcome)

    def _replayable(self, outcome: Outcome, reached_server: bool) -> bool:
        """Safe and worth sending again: nothing reached the client and every request byte so far is
        kept. Without a connection (refused, or the connect timed out) no server saw anything; once
        a byte may have reached a server's application, only an idempotent method is sent again."""
        if self.response_started or not self.buffered:
            return False
        if not reached_server:
            return outcome is Outcome.CONNECT_FAILED or outcome is Outcome.TIMEOUT
        return outcome is not Outcome.TIMEOUT and self.method in IDEMPOTENT_METHODS

    def _retry_on(self, server: Server, failure: Outcome | None) -> None:
        """Settle the failed attempt (`failure` None: not the server's fault), then start again."""
        previous = self.server
        assert previous is not None
        previous.state.active -= 1
        if failure is not None:
            self.ctx.registry.record_outcome(previous, failure, None)
        self.ctx.retries += 1
        self.pending = list(self.replay)
        self.pending_size = self.replay_size
        self._forward_to(server, fresh_connection=True)

    def _abort(self, outcome: Outcome) -> None:
        """Mid-response failure: the client can only learn of it from a cut connection."""
        self._drop_upstream()
        self.client.abort()
        self._account(outcome)

    def reply(self, status: int, text: str, outcome: Outcome) -> None:
        """Answer the client ourselves; close afterwards if the request body was not read."""
        close = not self.request_complete or not self.keep_alive or self.client.closing
        self.close_after = self.close_after or close
        self.status = status
        self.client.write(simple_response(status, text, close))
        self._finish(outcome)

    # --- timing -----------------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        self.deadline = self.ctx.deadlines.move(self, self.deadline, self.last_activity + self.timeout_s)

    def upstream_write_paused(self, paused: bool) -> None:
        self.upstream_write_full = paused
        if paused:
            self.client.hold(PEER_WRITE_FULL)
            self.last_activity = self.ctx.loop.time()
            self._arm_timer()
        else:
            self.client.release(PEER_WRITE_FULL)

    def deadline_reached(self) -> None:
        """Act only while lbd is waiting on the server, and only after `timeout_s` of its silence.

        Time spent waiting on the client (a slow upload, a slow reader holding the upstream) does
        not count against the server.
        """
        self.deadline = 0
        if self.finished:
            return
        now = self.ctx.loop.time()
        upstream = self.upstream
        waiting_on_server = (self.request_complete or self.upstream_write_full) and not (
            upstream is not None and upstream.held
        )
        deadline = self.last_activity + self.timeout_s
        if not waiting_on_server:
            stalled_since = self.last_activity + self.ctx.client_timeout_s
            if now < stalled_since:
                self.deadline = self.ctx.deadlines.arm(self, min(stalled_since, now + self.timeout_s))
            else:
                self.client_stalled()
        elif now < deadline:
            self.deadline = self.ctx.deadlines.arm(self, deadline)
        elif self.response_started:
            self._abort(Outcome.TIMEOUT)
        else:
            if self.connecting is not None:
                self.connecting.cancel()
                self.connecting = None
            ms = round(self.timeout_s * 1000)
            self._upstream_error(Outcome.TIMEOUT, f"did not answer within {ms} ms")

    # --- websocket and other upgrades -------------------------------------------------------------

    def start_tunnel(self, upstream_bytes: bytes) -> None:
        """The server switched protocols: from now on bytes flow unparsed both ways."""
        connection = self.upstream
        assert connection is not None
        self.upstream = None
        connection.exchange = None
        self.finished = True
        self.tunnel_open = True  # the server keeps counting this connection as active until it closes
        self.deadline = self.ctx.deadlines.move(self, self.deadline, None)
        if self.server is not None:
            self.ctx.registry.record_outcome(self.server, Outcome.OK, self.latency_s)
        self.ctx.count_response(101, self.server)
        self.client.start_tunnel(self, connection, upstream_bytes)

    def tunnel_closed(self) -> None:
        if self.tunnel_open and self.server is not None:
            self.tunnel_open = False
            self.server.state.active -= 1

    # --- the end ----------------------------------------------------------------------------------

    def _account(self, outcome: Outcome) -> None:
        """Settle this exchange's books exactly once: timer, connect attempt, server counters."""
        if self.finished:
            return
        self.finished = True
        if self.deadline:
            self.deadline = self.ctx.deadlines.move(self, self.deadline, None)
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        server = self.server
        if server is not None:
            server.state.active -= 1
            self.ctx.registry.record_outcome(server, outcome, self.latency_s)
        self.ctx.count_response(self.status, server)

    def _finish(self, outcome: Outcome) -> None:
        self._account(outcome)
        self.client.exchange_finished(self, self.keep_alive and not self.close_after)


def _response_header_pieces(head: ResponseHead) -> list[bytes]:
    """The response's end-to-end headers as the client gets them, ending with our Via."""
    pieces = head.header_pieces
    if head.conn_tokens and (named := named_hop_by_hop(head.conn_tokens)):
        pieces = head.forwarded_without(named)
    return [*pieces, VIA_LINE if head.via is None else merged_line(b"Via", head.via, VIA_VALUE)]


def _describe_connect_error(error: BaseException) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "refused the connection"
    if isinstance(error, OSError) and error.strerror:
        return f"could not be reached ({error.strerror.lower()})"
    return f"could not be reached ({error})"
