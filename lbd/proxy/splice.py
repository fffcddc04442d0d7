"""Moving a response body from the server's socket to the client's inside the kernel (splice(2)).

What HAProxy calls `option splice-response`: bytes go socket -> pipe -> socket as page references,
never copied into lbd's memory and out again. For a 64 KiB response that is two 64 KiB copies less
per request. Linux only; elsewhere (or where the pipe cannot be made) `Splicer.make` returns None
and bodies take the usual path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from typing import Final

# At most this much per move: what the client's socket refuses is queued in its transport, so a move
# may put no more there than one read could (pool.READ_BUFFER_BYTES).
MOVE_BYTES: Final = 128 * 1024
PIPE_BYTES: Final = 256 * 1024  # room for a move's worth of socket buffers, whatever their sizes
_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
# errors that say splice cannot work here at all, rather than that this one socket failed
_UNSUPPORTED: Final = frozenset({errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP})


class Splicer:
    """One pipe per event loop, open as long as the process: every move empties it before returning,
    so all connections share it."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.moved = 0  # body bytes moved so far (lbd_spliced_bytes_total)
        self.unsupported = False  # the kernel (or a seccomp filter) refused splice: bodies take the usual path

    @staticmethod
    def make() -> Splicer | None:
        if not hasattr(os, "splice"):
            return None
        try:
            read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        with contextlib.suppress(OSError):  # a smaller pipe (64 KiB) only means more splices
            fcntl.fcntl(write_fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
        return Splicer(read_fd, write_fd)

    def move(self, source: int, target: int, count: int) -> tuple[int, bytes, bool]:
        """Up to `count` bytes from socket `source` to socket `target`. Returns how many left
        `source`; those of them `target` would not take now (the caller writes them the usual way);
        and whether `source` had more than `count` bytes (a server out of step: the extra bytes are
        dropped, and the caller must not reuse its connection).

        Nothing available, the server's end of stream or an error on its socket move nothing: its
        transport finds out on its next read, as it would have anyway.
        """
        try:
            taken = os.splice(source, self.write_fd, min(count + 1, MOVE_BYTES), flags=_FLAGS)
        except BlockingIOError:
            return 0, b"", False
        except OSError as error:
            self.unsupported = error.errno in _UNSUPPORTED
            return 0, b"", False
        if taken <= 0:
            return 0, b"", False
        moved = min(taken, count)
        sent = 0
        with contextlib.suppress(OSError):  # the client's socket is full, or gone: its transport will tell
            sent = os.splice(self.read_fd, target, moved, flags=_FLAGS)
        refused = self._drain(moved - sent) if sent < moved else b""
        if taken > moved:
            self._drain(taken - moved)
        self.moved += moved
        return moved, refused, taken > moved

    def _drain(self, count: int) -> bytes:
        """The next `count` bytes the pipe holds (it must be empty for the next move)."""
        pieces = []
        while count > 0 and (piece := os.read(self.read_fd, count)):
            pieces.append(piece)
            count -= len(piece)
        return b"".join(pieces)
