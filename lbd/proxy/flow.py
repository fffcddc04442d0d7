"""Flow control shared by both sides of the proxy.

- Reading pauses with reasons: a side resumes only when every reason to hold it has cleared. Both
  sides can be held for several reasons at once (the peer's write buffer is full, pipelined
  requests are queued, a body waits for its upstream connection); a plain pause/resume pair would
  let one reason's resume undo another's pause.
- Corked writes: while the peer's bytes are being parsed, what they cause us to write is gathered
  and sent as one `write` (one syscall) at the end, so a response head and a small body leave
  together. Response bodies arrive as views of the shared read buffer (upstream.py); small ones are
  copied by the join, so a transport only ever keeps views that carry at least JOIN_BELOW bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final, cast

PEER_WRITE_FULL: Final = 1  # the other side's socket buffer is above its high-water mark
BUFFER_FULL: Final = 2  # request bytes are queued in memory, waiting for an upstream connection
PIPELINE_FULL: Final = 4  # too many pipelined requests are waiting their turn
JOIN_BELOW: Final = 16 * 1024  # corked writes smaller than this are joined into one; larger go as a writev


class FlowControlled:
    """Base of both proxy protocols: transport bookkeeping and reasoned read pauses.

    It implements asyncio's protocol interface without subclassing `asyncio.Protocol`: a class with a
    plain base compiles (setup.py) to a native class, whose attributes are C struct fields.
    """

    transport: asyncio.Transport | None = None
    held_by = 0  # the reasons reading is paused for (hot paths test it before calling `release`)
    _corked = False  # writes are being gathered
    # the transport's methods every request calls, bound once (set with `transport`): a method called
    # by name is looked up on the transport's type at every call
    _send: Callable[[bytes | memoryview], None]
    _closing: Callable[[], bool]
    _queued: Callable[[], int]

    def __init__(self) -> None:
        # the writes gathered while corked: one list per connection, emptied by each flush (a list made
        # per cork was two allocations per small request)
        self._gathered: list[bytes | memoryview] = []

    def attach(self, transport: asyncio.BaseTransport) -> None:
        """Take the connection's transport (at `connection_made`; it is never replaced)."""
        attached = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        self._send = attached.write
        self._closing = attached.is_closing
        self._queued = attached.get_write_buffer_size
        self.transport = attached

    def writable(self) -> bool:
        """Open and not closing: what is written will be sent."""
        return self.transport is not None and not self._closing()

    def queued(self) -> int:
        """The bytes written and not yet sent (held by the transport)."""
        return 0 if self.transport is None else self._queued()

    def eof_received(self) -> bool | None:
        """The peer's FIN: let the transport close (a half-closed proxy connection is not kept)."""
        return None

    def write(self, data: bytes | memoryview) -> None:
        if self._corked:
            self._gathered.append(data)
        elif self.transport is not None:
            self._send(data)

    def cork(self) -> bool:
        """Start gathering writes; False if already corked (the outer caller will flush)."""
        if self._corked:
            return False
        self._corked = True
        return True

    def flush(self) -> None:
        """Send what was gathered since `cork` and stop gathering. The list is emptied before the
        transport is called, so a write made from a callback of that call is neither lost nor sent
        twice."""
        self._corked = False
        gathered = self._gathered
        if not gathered:
            return
        if not self.writable():
            gathered.clear()
            return
        size = 0
        for piece in gathered:
            size += len(piece)
        if size >= JOIN_BELOW:
            pieces = gathered.copy()
            gathered.clear()
            cast(asyncio.Transport, self.transport).writelines(pieces)  # one writev: a large body is not joined
            return
        data = gathered[0] if len(gathered) == 1 and type(gathered[0]) is bytes else b"".join(gathered)
        gathered.clear()
        self._send(data)  # written at once (uvloop queues writelines)

    def drop_corked(self) -> None:
        """Forget the writes gathered since `cork` (they must not leave); the outer flush sends nothing."""
        self._gathered.clear()

    def close(self) -> None:
        """Send what is gathered, then close once the transport has written everything."""
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close at once, dropping whatever is gathered or queued."""
        self._corked = False
        self._gathered.clear()
        if self.transport is not None:
            self.transport.abort()

    def hold(self, reason: int) -> None:
        if not self.held_by and self.writable():
            cast(asyncio.Transport, self.transport).pause_reading()
        self.held_by |= reason

    def release(self, reason: int) -> None:
        if not self.held_by & reason:
            return
        self.held_by &= ~reason
        if not self.held_by and self.writable():
            cast(asyncio.Transport, self.transport).resume_reading()

    @property
    def held(self) -> bool:
        return bool(self.held_by)


def hold_peer(transport: asyncio.Transport | None, hold: bool) -> None:
    """In a tunnel each side knows the other only by its transport: pause (resume) reading the peer
    whose bytes fill (no longer fill) this side's socket buffer."""
    peer: object = transport.get_protocol() if transport is not None else None
    if isinstance(peer, FlowControlled):
        if hold:
            peer.hold(PEER_WRITE_FULL)
        else:
            peer.release(PEER_WRITE_FULL)
