"""Reading pauses with reasons: a side resumes only when every reason to hold it has cleared.

Both sides of the proxy can be held for several reasons at once (the peer's write buffer is full,
pipelined requests are queued, a body waits for its upstream connection); a plain
pause/resume pair would let one reason's resume undo another's pause.
"""

from __future__ import annotations

import asyncio

PEER_WRITE_FULL = 1  # the other side's socket buffer is above its high-water mark
BUFFER_FULL = 2  # request bytes are queued in memory, waiting for an upstream connection
PIPELINE_FULL = 4  # too many pipelined requests are waiting their turn


class FlowControlled(asyncio.Protocol):
    """Base of both proxy protocols: transport bookkeeping and reasoned read pauses."""

    transport: asyncio.Transport | None = None
    _held_by = 0

    def hold(self, reason: int) -> None:
        if not self._held_by and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self._held_by |= reason

    def release(self, reason: int) -> None:
        if not self._held_by & reason:
            return
        self._held_by &= ~reason
        if not self._held_by and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    @property
    def held(self) -> bool:
        return bool(self._held_by)
