"""Upstream connections kept for reuse, per server, and the read buffers they all share."""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING, Final

from lbd.clock import monotonic
from lbd.models import Server
from lbd.proxy.flow import PEER_WRITE_FULL
from lbd.proxy.splice import Splicer

if TYPE_CHECKING:
    from lbd.proxy.upstream import UpstreamConnection

MAX_IDLE_PER_SERVER: Final = 128
# One buffer every upstream connection reads into (a read is handled before the next begins). It
# holds a whole 64 KiB response with its head, so where bodies are not spliced such a response is
# one read, as with uvloop's own reads.
READ_BUFFER_BYTES: Final = 128 * 1024
# Where bodies can be spliced (splice.py), a response's first read takes at most this much (its head
# and the start of its body), and a body with at least this many bytes still to come is moved in
# the kernel; HAProxy reads a first 16 KiB buffer the same way before it splices.
HEAD_READ_BYTES: Final = 16 * 1024


class UpstreamPool:
    """Idle keep-alive connections per server, newest first (LIFO keeps few connections warm), the
    shared read buffers, and the splice pipe."""

    def __init__(self, loop: asyncio.AbstractEventLoop, idle_timeout_s: float = 30.0) -> None:
        self.loop = loop
        self.idle_timeout_s = idle_timeout_s
        self._idle: dict[str, list[UpstreamConnection]] = {}
        self.tls = ssl.create_default_context()  # for https:// servers, verified against the system's CAs
        self.pipe = Splicer.make()  # None where splice(2) is not available
        self.splicer: Splicer | None = self.pipe  # None while bodies are not spliced (`splice_responses`)
        self.renew_read_buffer()

    def splice_responses(self, enabled: bool) -> None:
        """Splice large response bodies where the platform can (config key `splice_responses`, or off
        for good once the kernel refused a splice)."""
        self.splicer = self.pipe if enabled and self.pipe is not None and not self.pipe.unsupported else None

    def renew_read_buffer(self) -> None:
        """A transport kept views of the read buffer (its client is slower than its server): the next
        reads go to a new one, and the old one is freed once that transport has sent them."""
        self.read_buffer = bytearray(READ_BUFFER_BYTES)
        self.read_view = memoryview(self.read_buffer)
        self.head_view = self.read_view[:HEAD_READ_BYTES]

    def acquire(self, server: Server, idle_below_s: float, now: float) -> UpstreamConnection | None:
        """The most recently used idle connection to `server`, if it has been idle less than
        `idle_below_s` at `now` (an older one stays for requests that accept it)."""
        idle = self._idle.get(server.id)
        while idle:
            connection = idle[-1]
            if connection.server is not server:  # the id was re-registered (or reloaded) elsewhere
                idle.pop().close()
            elif not connection.usable:
                idle.pop()
            elif now - connection.idle_since >= idle_below_s:
                return None
            else:
                idle.pop()
                connection.reused = True
                return connection
        return None

    def release(self, connection: UpstreamConnection, now: float) -> None:
        """Keep a connection whose exchange ended cleanly (at `now`); close it if the pool is full."""
        connection.exchange = None
        connection.release(PEER_WRITE_FULL)
        idle = self._idle.get(connection.server.id)
        if idle is None:
            idle = self._idle[connection.server.id] = []
        if len(idle) >= MAX_IDLE_PER_SERVER or connection.lost:
            connection.close()
            return
        connection.idle_since = now
        idle.append(connection)

    def forget(self, connection: UpstreamConnection) -> None:
        idle = self._idle.get(connection.server.id)
        if idle and connection in idle:
            idle.remove(connection)

    def close_idle(self, older_than_s: float | None = None, server_id: str | None = None) -> None:
        """Close idle connections: all, those of one server, or those idle too long."""
        now = monotonic()
        for sid, idle in list(self._idle.items()):
            if server_id is not None and sid != server_id:
                continue
            keep = [c for c in idle if older_than_s is not None and now - c.idle_since < older_than_s]
            for connection in idle:
                if connection not in keep:
                    connection.close()
            self._idle[sid] = keep
