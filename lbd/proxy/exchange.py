"""One request and its response on their way through the proxy: the only object that knows both
the client connection and the upstream one.

The client connection feeds the request in (head, body chunks, end); the exchange asks the balancer
for a server, makes an `Attempt` against it, streams the request to an upstream connection and the
response back, framed for this client (`framing.py`). A failure before any response byte reached
the client is retried or answered as `retry.py` decides (502/503/504); the upstream timeout is
`timeout_base + region latency`, counted only while lbd waits on the server. Outcomes go to the
registry through the attempt; the exchange never decides health. Its end is one access-log entry
(`log`): facts gathered on the way (clock readings, byte counts, the balancer's reason), not a line.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import TYPE_CHECKING, Final

from lbd import accesslog
from lbd.accesslog import Entry
from lbd.balancer import BadRoute, NoServer
from lbd.clock import monotonic
from lbd.models import Outcome, Server
from lbd.proxy import retry
from lbd.proxy.attempt import Attempt
from lbd.proxy.flow import BUFFER_FULL, PEER_WRITE_FULL
from lbd.proxy.framing import (
    CHUNK_FOR_CLIENT,
    CLOSE_AFTER,
    FORWARD_CHUNKED,
    KEEP_ALIVE_10,
    for_client,
)
from lbd.proxy.headers import (
    CRLF,
    VIA_LINE,
    VIA_VALUE,
    forwarded_fields,
    merged_line,
    simple_response,
)
from lbd.proxy.request import Replay, RequestHead, cookie_value
from lbd.proxy.response import UNTIL_CLOSE, ResponseHead
from lbd.proxy.upstream import open_connection

if TYPE_CHECKING:
    from lbd.proxy.client import ClientConnection
    from lbd.proxy.upstream import UpstreamConnection
    from lbd.store.session_sync import SessionSync

PENDING_LIMIT: Final = 256 * 1024  # request bytes buffered while no upstream connection is attached
CHUNK_END: Final = b"0\r\n\r\n"
# A request that is never sent twice takes a pooled connection only if it was in use within
# `non_idempotent_reuse_ms` (1 s): a server closes an idle connection (its keep-alive timeout, 2 s or
# more for common servers) only after longer, so a failure on it means the server had the request, and
# the client gets a 502. An older connection might be one the server is closing just now; a new one
# is opened instead.
ANY_IDLE: Final = float("inf")
MAX_REMEMBERED_REGIONS: Final = 256
MAX_REMEMBERED_REGION_BYTES: Final = 64  # a longer value is no region's name: decoded, never kept
_REGION_NAMES: Final[dict[bytes, str]] = {}  # client-region values as decoded (region_name)


class Exchange:
    __slots__ = (
        "attempt",
        "began",
        "bytes_in",
        "bytes_out",
        "client",
        "close_after",
        "connected_at",
        "connecting",
        "ctx",
        "deferred_reply",
        "early_tunnel",
        "finished",
        "flags",
        "framing",
        "last_activity",
        "pending",
        "pending_size",
        "replay",
        "request",
        "request_complete",
        "response_started",
        "retried_backup",
        "retried_same",
        "retries",
        "route",
        "set_cookie",
        "status",
        "tunnel",
        "upstream",
        "upstream_write_full",
    )

    def __init__(self, client: ClientConnection, request: RequestHead) -> None:
        self.client = client
        self.ctx = ctx = client.ctx
        self.request = request  # filled by the client connection's parser
        self.request_complete = False
        self.deferred_reply: tuple[int, str, str] | None = None  # status, text, termination
        self.set_cookie = b""  # the Set-Cookie line issuing a new client id (client_id_fallback = "cookie")
        self.pending: list[bytes] = []  # request bytes waiting for an upstream connection
        self.pending_size = 0
        self.replay: Replay | None = None  # an idempotent request's body, kept for a retry
        self.attempt: Attempt | None = None
        self.upstream: UpstreamConnection | None = None
        self.connecting: asyncio.Task[UpstreamConnection] | None = None
        self.retried_same = False
        self.retried_backup = False
        self.response_started = False
        self.framing = 0  # the response body's framing (response.py)
        self.flags = 0  # how it reaches the client (framing.py)
        self.close_after = False
        self.finished = False
        self.early_tunnel = b""
        self.last_activity = 0.0
        self.upstream_write_full = False
        self.status = 0
        # for the access log, read only while it is on: the request's first byte (lbd.clock; 0: not
        # logged), the final attempt's connection, bytes each way, why its server, attempts made again
        log = ctx.access_log
        self.began = monotonic() if log is not None and log.on else 0.0
        self.connected_at = 0.0
        self.bytes_in = 0
        self.bytes_out = 0
        self.route: str | None = None
        self.retries = 0
        self.tunnel: UpstreamConnection | None = None

    # --- request side, fed by the client connection's parser ----------------------------------

    def request_body(self, chunk: bytes) -> None:
        self.bytes_in += len(chunk)
        if self.attempt is not None:
            self.last_activity = monotonic()
        self._to_upstream(b"%x\r\n" % len(chunk) + chunk + CRLF if self.request.chunked else chunk)

    def request_done(self) -> None:
        self.request_complete = True
        if self.deferred_reply is not None:
            status, text, termination = self.deferred_reply
            self.reply(status, text, Outcome.OK, termination)
            return
        if self.request.chunked:
            self._to_upstream(CHUNK_END)
        if self.attempt is not None and not self.finished:
            if self.request.has_body:  # a bodiless request was whole when its attempt began
                self.last_activity = monotonic()
            self._arm_timer()  # a deadline armed earlier stays: it fires no later than needed and re-arms

    def _to_upstream(self, data: bytes) -> None:
        if self.finished:
            return
        if self.replay is not None:
            self.replay.add(data)
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
        ctx = self.ctx
        ctx.requests_total += 1
        request = self.request
        if request.client_id is None:
            request.client_id = self._fallback_client_id()
            if request.client_id is None:
                self._refuse(400, "missing the client-id header; lbd routes each client by it", accesslog.NO_ROUTE)
                return
        if request.has_body and request.idempotent:
            self.replay = Replay(ctx.retry_body_limit)
        client_id = self._client()
        now = monotonic()  # one reading for the claim's question, the route, the attempt's start, its deadline
        shared = ctx.shared
        if shared is not None and shared.wants_claim(client_id, now):
            self._claim(shared, client_id)
            return
        self._route(client_id, now)

    def _route(self, client_id: str, now: float) -> None:
        try:
            server, self.route = self.ctx.balancer.route(client_id, self._region(), now)
        except (BadRoute, NoServer) as unroutable:  # one name: mypyc types a handler's variable once
            self._unroutable(unroutable)
            return
        self._forward_to(server, fresh_connection=False, now=now)

    def _unroutable(self, unroutable: BadRoute | NoServer) -> None:
        if isinstance(unroutable, BadRoute):
            self._refuse(400, str(unroutable), accesslog.NO_ROUTE)
        else:
            self._refuse(503, str(unroutable), accesslog.NO_SERVER)

    def _claim(self, shared: SessionSync, client_id: str) -> None:
        """A client new to this instance, in a cluster: where the balancer would put it is claimed in
        the store first (another instance may have pinned it already), then the request is routed."""
        balancer = self.ctx.balancer
        try:
            region = balancer.resolve_region(self._region())
            proposal = balancer.proposal(client_id, region, monotonic())
        except (BadRoute, NoServer) as unroutable:
            self._unroutable(unroutable)
            return
        shared.claim(client_id, proposal, region).add_done_callback(self._claimed)

    def _claimed(self, _: asyncio.Future[None]) -> None:
        if not self.finished:  # the session is held here now: routed as sticky (or moved, if its server is out)
            self._route(self._client(), monotonic())

    def _fallback_client_id(self) -> bytes | None:
        """A client id for a request without the header (`client_id_fallback`): the client's IP
        address, or lbd's cookie (issued now when the request brings none); None: refuse."""
        fallback = self.ctx.client_id_fallback
        if fallback == "client-ip":
            return self.client.client_ip
        if fallback != "cookie":
            return None
        name = self.ctx.client_id_cookie
        if self.request.cookie is not None:
            known = cookie_value(self.request.cookie, name)
            if known is not None:
                return known
        issued = secrets.token_urlsafe(16).encode()
        secure = b"; Secure" if self.client.tls_lines is not None else b""  # a cookie issued over TLS stays there
        self.set_cookie = b"Set-Cookie: " + name + b"=" + issued + b"; Path=/; HttpOnly; SameSite=Lax" + secure + CRLF
        return issued

    def _client(self) -> str:
        client_id = self.request.client_id
        assert client_id is not None
        return client_id.decode("latin-1")

    def _region(self) -> str | None:
        region = self.request.client_region
        return None if region is None else region_name(region)

    def _refuse(self, status: int, text: str, termination: str) -> None:
        """Answer without a server. A bodiless request is answered once fully read, keeping the
        connection; one with a body is answered at once and the connection closed (its body is
        not worth reading)."""
        if self.request_complete or self.request.has_body:
            self.reply(status, text, Outcome.OK, termination)
        else:
            self.deferred_reply = (status, text, termination)

    def _forward_to(self, server: Server, fresh_connection: bool, now: float) -> None:
        ctx = self.ctx
        self.attempt = Attempt(server, ctx.timeout_s(server), now)
        self.connected_at = 0.0
        self.last_activity = now
        self._arm_timer()
        if fresh_connection:
            connection = None
        else:
            reuse_below_s = ANY_IDLE if self.request.idempotent else ctx.non_idempotent_reuse_s
            connection = ctx.pool.acquire(server, reuse_below_s, now)
        if connection is not None:
            self._attach(connection)
        else:
            self.connecting = ctx.loop.create_task(open_connection(ctx.pool, server))
            self.connecting.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[UpstreamConnection]) -> None:
        if task is not self.connecting:
            # abandoned (its deadline passed and the request went elsewhere, or the exchange ended)
            # after it had already connected: the connection is not this exchange's to use
            if not task.cancelled() and task.exception() is None:
                task.result().close()
            return
        self.connecting = None
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self._upstream_failed(Outcome.CONNECT_FAILED, _describe_connect_error(error))
            return
        connection = task.result()
        if connection.lost:  # reset between the connect and this callback: nothing was sent
            self._upstream_failed(Outcome.CONNECT_FAILED, "closed the connection as soon as it was opened")
            return
        self._attach(connection)

    def _attach(self, connection: UpstreamConnection) -> None:
        attempt = self.attempt
        assert attempt is not None
        self.upstream = connection
        connection.exchange = self
        if self.began:
            self.connected_at = monotonic()
        client = self.client
        if self.request.has_body:
            client.gather_for(connection)  # the head and the body parsed in the same read: one write
        if client.write_paused:
            connection.hold(PEER_WRITE_FULL)
        request = self.request
        head = request.upstream_head(attempt.server, client.client_ip, client.forwarded_for_line, client.proto_lines)
        connection.write(b"".join((head, *self.pending)) if self.pending else head)
        if self.pending:
            self.pending = []
            self.pending_size = 0
            client.release(BUFFER_FULL)

    # --- response side, fed by the upstream connection ---------------------------------------

    def response_head(self, head: ResponseHead, framing: int, now: float, body: bytes) -> int:
        """Send the response head, which came at `now`, on to the client, framed for it (framing.py),
        with `body` (a whole Content-Length body that came in the same read; empty otherwise) in the
        same piece; returns those flags."""
        attempt = self.attempt
        assert attempt is not None
        attempt.responded(now)
        self.response_started = True
        self.status = status = head.status
        framing_lines = b""  # how the client is told where the body ends, and whether the connection stays
        flags = 0
        if status == 101 and head.upgrade is not None:
            framing_lines = b"Connection: upgrade\r\nUpgrade: %s\r\n" % head.upgrade
        else:
            request = self.request
            reusable = self.request_complete and request.keep_alive and not self.client.closing
            flags = for_client(framing, request.version == "1.1", reusable)
            if flags & FORWARD_CHUNKED:
                assert head.transfer_encoding is not None
                framing_lines = b"Transfer-Encoding: %s\r\n" % head.transfer_encoding
            elif flags & CHUNK_FOR_CLIENT:
                framing_lines = b"Transfer-Encoding: chunked\r\n"
            if flags & CLOSE_AFTER:
                self.close_after = True
                framing_lines += b"Connection: close\r\n"
            elif flags & KEEP_ALIVE_10:
                framing_lines += b"Connection: keep-alive\r\n"
        self.framing = framing
        self.flags = flags
        self._to_client(_response_head_bytes(head, framing_lines + self.set_cookie, body))
        return flags

    def response_body(self, body: bytes | memoryview) -> None:
        if self.flags & CHUNK_FOR_CLIENT:
            self._to_client(b"%x\r\n" % len(body) + body + CRLF)
        else:
            self._to_client(body)

    def _to_client(self, data: bytes | memoryview) -> None:
        """Write to the client, counted (the access log's bytes_out)."""
        self.bytes_out += len(data)
        self.client.write(data)

    def spliced(self, moved: int) -> None:
        """Body bytes the kernel moved from the server's socket to the client's."""
        self.bytes_out += moved

    def interim_response(self, head: ResponseHead) -> None:
        """Relay 100 Continue / 103 Early Hints (HTTP/1.0 clients do not understand them)."""
        if self.request.version == "1.1":
            self._to_client(_response_head_bytes(head, b"", b""))

    def response_complete(self, upstream_keep_alive: bool, now: float) -> None:
        if self.finished:
            return
        if self.flags & CHUNK_FOR_CLIENT:
            self._to_client(CHUNK_END)
        connection = self.upstream
        self.upstream = None
        if connection is not None:
            if upstream_keep_alive and self.request_complete:
                self.ctx.pool.release(connection, now)
            else:
                connection.exchange = None
                connection.close()
        self._finish(Outcome.STATUS_5XX if self.status >= 500 else Outcome.OK, accesslog.COMPLETE, now)

    def server_sent(self, now: float) -> None:
        """The server is not silent (it sent something at `now`): its deadline restarts."""
        self.last_activity = now

    # --- what the upstream connection may ask of the client side ------------------------------

    def client_lagging(self) -> bool:
        """The client still has bytes queued (a view of the shared read buffer would pin it)."""
        return self.client.queued() > 0

    def gather_client_writes(self) -> bool:
        """What one upstream read makes lbd write to the client leaves in one write; False when an
        outer caller already gathers (and will send)."""
        return self.client.cork()

    def send_gathered(self) -> None:
        self.client.flush()

    def discard_gathered(self) -> None:
        """Nothing of what this read wrote may leave (the response turned out malformed)."""
        self.client.drop_corked()

    def splice_target(self) -> int:
        """The client socket's descriptor, for moving a body to it in the kernel; negative when it
        cannot take one now (closing, or an encrypting transport)."""
        if not self.client.writable():
            return -1
        return self.client.socket_fd()

    # --- failures --------------------------------------------------------------------------------

    def upstream_lost(self) -> None:
        """The upstream connection closed under this exchange."""
        if self.finished:
            return
        if self.response_started and self.framing == UNTIL_CLOSE:
            self.response_complete(False, monotonic())  # the body's end was the connection's end
        elif self.response_started:
            self._abort(Outcome.RESET, accesslog.SERVER_CLOSED)
        else:
            self._upstream_failed(Outcome.RESET, "closed the connection before responding")

    def upstream_failed_bad_response(self, what: str, unsent: bool) -> None:
        """The server's response broke its framing. `unsent`: nothing of it has left lbd yet (it was
        all in the read that broke, and that read's writes were discarded), so the client gets a 502."""
        if self.finished:
            return
        if self.response_started and not unsent:
            self._abort(Outcome.BAD_RESPONSE, accesslog.BAD_RESPONSE)
        else:
            self.response_started = False
            self.flags = self.framing = 0
            self._upstream_failed(Outcome.BAD_RESPONSE, f"sent a malformed response ({what})")

    def client_failed(self, status: int, text: str, termination: str) -> None:
        """The client broke its request mid-way (its framing, a limit) or went silent: free the
        server's slot, and answer if nothing of the response has gone yet."""
        if self.finished:
            return
        if self.response_started:
            self._abort(Outcome.CLIENT_ABORTED, termination)
        else:
            self._drop_upstream()
            self.reply(status, text, Outcome.CLIENT_ABORTED, termination)

    def client_lost(self) -> None:
        """The client went away (or lbd cut it at the end of a graceful stop): stop the upstream side
        too (its connection cannot be reused)."""
        if self.finished:
            return
        self._drop_upstream()
        self._account(Outcome.CLIENT_ABORTED, accesslog.SHUTDOWN if self.ctx.stopping else accesslog.CLIENT_CLOSED)

    def _drop_upstream(self) -> UpstreamConnection | None:
        """Abandon the upstream connection mid-exchange (it cannot be reused); returns it."""
        connection = self.upstream
        if connection is not None:
            self.upstream = None
            connection.exchange = None
            connection.abort()
        return connection

    def _upstream_failed(self, outcome: Outcome, what: str) -> None:
        """A failure before any response byte reached the client: retry as retry.decide says, else
        answer 502 or 504 naming the server."""
        failed = self._drop_upstream()
        attempt = self.attempt
        assert attempt is not None
        sent = failed is not None
        kept = self.replay is None or self.replay.kept
        decision = retry.decide(
            outcome,
            sent=sent,
            reused=failed is not None and failed.reused,
            idempotent=self.request.idempotent,
            replayable=not self.response_started and (kept or not sent),
            retried_same=self.retried_same,
            retried_backup=self.retried_backup,
        )
        server = attempt.server
        if decision == retry.RETRY_SAME_SERVER:
            self.retried_same = True
            self.route = (self.route or "") + accesslog.RETRY_SUFFIX
            self._retry_on(server, None, sent)  # not the server's fault: it had closed the idle connection
            return
        if decision == retry.RETRY_BACKUP:
            self.retried_backup = True
            backup = self.ctx.balancer.backup(self._client(), self._region(), server, monotonic())
            if backup is not None:
                self.ctx.failovers += 1
                self.route = (self.route or "") + accesslog.FAILOVER_SUFFIX
                self._retry_on(backup, outcome, sent)
                return
        text = f"upstream {server.id} ({server.spec.url}) {what}"
        self.reply(retry.failure_status(outcome), text, outcome, _upstream_termination(outcome))

    def _retry_on(self, server: Server, failure: Outcome | None, sent: bool) -> None:
        """Settle the failed attempt, then start again; what was sent goes again from the replay
        (what was never sent is still pending)."""
        attempt = self.attempt
        assert attempt is not None
        attempt.settle(self.ctx.registry, failure)
        self.ctx.retries += 1
        self.retries += 1
        if sent and self.replay is not None:
            self.pending = list(self.replay.pieces)
            self.pending_size = self.replay.size
        self._forward_to(server, fresh_connection=True, now=monotonic())

    def _abort(self, outcome: Outcome, termination: str) -> None:
        """Mid-response failure: the client can only learn of it from a cut connection."""
        self._drop_upstream()
        self.client.abort()
        self._account(outcome, termination)

    def reply(self, status: int, text: str, outcome: Outcome, termination: str) -> None:
        """Answer the client ourselves; close afterwards if the request body was not read."""
        close = not self.request_complete or not self.request.keep_alive or self.client.closing
        self.close_after = self.close_after or close
        self.status = status
        self._to_client(simple_response(status, text, close))
        self._finish(outcome, termination, monotonic())

    # --- timing -----------------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        attempt = self.attempt
        assert attempt is not None
        self.client.request_deadline.arm(self, self.last_activity + attempt.timeout_s)

    def upstream_write_paused(self, paused: bool) -> None:
        self.upstream_write_full = paused
        if paused:
            self.client.hold(PEER_WRITE_FULL)
            self.last_activity = monotonic()
            self._arm_timer()
        else:
            self.client.release(PEER_WRITE_FULL)

    def deadline_reached(self) -> None:
        """Act only while lbd is waiting on the server, and only after its timeout of silence.

        Time spent waiting on the client (a slow upload, a slow reader holding the upstream) does
        not count against the server. Called early too (the connection's deadline was armed for an
        earlier request): then it arms again.
        """
        attempt = self.attempt
        if self.finished or attempt is None:
            return
        now = monotonic()
        upstream = self.upstream
        waiting_on_server = (self.request_complete or self.upstream_write_full) and not (
            upstream is not None and upstream.held
        )
        timeout_s = attempt.timeout_s
        deadline = self.last_activity + timeout_s
        if not waiting_on_server:
            stalled_since = self.last_activity + self.ctx.client_timeout_s
            if now < stalled_since:
                self.client.request_deadline.arm(self, min(stalled_since, now + timeout_s))
            else:
                self.client_failed(408, "the client sent nothing for too long", accesslog.CLIENT_TIMEOUT)
        elif now < deadline:
            self.client.request_deadline.arm(self, deadline)
        elif self.response_started:
            self._abort(Outcome.TIMEOUT, accesslog.SERVER_TIMEOUT)
        else:
            if self.connecting is not None:
                self.connecting.cancel()
                self.connecting = None
            self._upstream_failed(Outcome.TIMEOUT, f"did not answer within {round(timeout_s * 1000)} ms")

    # --- websocket and other upgrades -------------------------------------------------------------

    def start_tunnel(self, upstream_bytes: bytes) -> None:
        """The server switched protocols: from now on bytes flow unparsed both ways."""
        connection = self.upstream
        attempt = self.attempt
        assert connection is not None and attempt is not None
        self.upstream = None
        self.tunnel = connection
        connection.exchange = None
        self.finished = True
        self.client.request_deadline.release(self)
        attempt.settle_into_tunnel(self.ctx.registry)  # the server counts it as active until it closes
        self.ctx.count_response(101, attempt.server)
        client = self.client
        connection.tunnel_to(client.transport)
        if self.early_tunnel:
            self.bytes_in += len(self.early_tunnel)
            connection.write(self.early_tunnel)
            self.early_tunnel = b""
        client.tunnel_to(connection.transport, self)
        if upstream_bytes:
            self._to_client(upstream_bytes)

    def tunnel_closed(self) -> None:
        """The client's side of the tunnel closed (after the server's, or first): one access-log
        entry for the whole tunnel, with the bytes it carried."""
        if self.attempt is not None:
            self.attempt.tunnel_closed()
        connection = self.tunnel
        if connection is None:
            return
        self.tunnel = None
        self.bytes_in += self.client.tunnel_bytes
        self.bytes_out += connection.tunnel_bytes
        if self.ctx.stopping:
            self.log(accesslog.SHUTDOWN)
        else:
            self.log(accesslog.TUNNEL_CLOSED_BY_SERVER if connection.lost else accesslog.TUNNEL_CLOSED_BY_CLIENT)

    # --- the end ----------------------------------------------------------------------------------

    def _account(self, outcome: Outcome, termination: str) -> None:
        """Settle this exchange's books exactly once: timer, connect attempt, the server's attempt,
        the response's count and its access-log entry."""
        if self.finished:
            return
        self.finished = True
        self.client.request_deadline.release(self)
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        attempt = self.attempt
        if attempt is not None:
            attempt.settle(self.ctx.registry, outcome)
        self.ctx.count_response(self.status, None if attempt is None else attempt.server)
        self.log(termination)

    def _finish(self, outcome: Outcome, termination: str, now: float) -> None:
        """Settle the books, then hand the client connection back (idle from `now`)."""
        self._account(outcome, termination)
        self.client.exchange_finished(self, self.request.keep_alive and not self.close_after, now)

    def log(self, termination: str) -> None:
        """Hand this request's access-log entry over, when the log is on and sampling keeps it: plain
        values only, formatted by the writer thread. Also used for lbd's refusals of a connection."""
        log = self.ctx.access_log
        began = self.began
        if log is None or not log.on or not began:
            return  # off, or the request began before the log was turned on
        request = self.request
        status = self.status
        if log.sampling and accesslog.successful(status, termination) and not log.sampled(request.client_id):
            return
        ended = monotonic()
        attempt = self.attempt
        server = region = None
        ttfb_s = -1.0
        if attempt is not None:
            server, region = attempt.server.id, attempt.server.spec.region
            if attempt.answered_at >= 0.0:
                ttfb_s = attempt.answered_at - began
        log.add(
            Entry(
                began, self.client.address, request.client_id, request.client_region, request.method, request.url,
                request.version if request.method else "", status, self.bytes_in, self.bytes_out, server, region,
                self.route, self.retries, self.connected_at - began if self.connected_at else -1.0, ttfb_s,
                ended - began, termination,
            )
        )  # fmt: skip


class _LastRegion:
    __slots__ = ("name", "value")

    def __init__(self) -> None:
        self.value = b""
        self.name = ""


_LAST_REGION: Final = _LastRegion()


def region_name(value: bytes) -> str:
    """A `client-region` value as the balancer names regions. Clients send few regions, again and
    again: each is decoded once and remembered (up to a bound in count and length), its hash then
    computed once too; the last one is compared before any lookup (which hashes the new bytes)."""
    last = _LAST_REGION
    if value == last.value:
        return last.name
    name = _REGION_NAMES.get(value)
    if name is None:
        name = value.decode("latin-1")
        if len(_REGION_NAMES) < MAX_REMEMBERED_REGIONS and len(value) <= MAX_REMEMBERED_REGION_BYTES:
            _REGION_NAMES[value] = name
    last.value, last.name = value, name
    return name


def _response_head_bytes(head: ResponseHead, lbd_lines: bytes, body: bytes) -> bytes:
    """The response head as the client gets it: the status line, the end-to-end fields as the server
    wrote them, our Via, then `lbd_lines` (framing, Connection, Set-Cookie), then `body` (the whole
    body of a small response, or nothing). Built in one step (compiled bytes formatting) from the runs
    of forwarded lines, usually one or two."""
    fields = forwarded_fields(head.header_pieces, head.conn_tokens)
    via = VIA_LINE if head.via is None else merged_line(b"Via", head.via, VIA_VALUE)
    return b"%s%s%s%s\r\n%s" % (head.line, fields, via, lbd_lines, body)


def _upstream_termination(outcome: Outcome) -> str:
    """How a request ends that failed on its server with `outcome` and is not tried again."""
    if outcome is Outcome.CONNECT_FAILED:
        return accesslog.CONNECT_FAILED
    if outcome is Outcome.TIMEOUT:
        return accesslog.SERVER_TIMEOUT
    if outcome is Outcome.BAD_RESPONSE:
        return accesslog.BAD_RESPONSE
    return accesslog.SERVER_CLOSED


def _describe_connect_error(error: BaseException) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "refused the connection"
    if isinstance(error, OSError) and error.strerror:
        return f"could not be reached ({error.strerror.lower()})"
    return f"could not be reached ({error})"
