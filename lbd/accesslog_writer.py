"""The access log's bounded buffer and writer thread: the event loop only appends entries; a thread
formats and writes them, so a slow or full disk never holds up a request.

- The loop appends each entry to a batch; a full batch (BATCH entries), or whatever is pending every
  HAND_OVER_S, goes to the writer thread through a queue. At most `access_log_buffer` entries wait
  for the writer: a batch beyond that is dropped and counted (`dropped_full`), never queued.
- The writer formats a batch and writes it with one write() per chunk of at most CHUNK_BYTES
  (PIPE_BUF for a pipe or anything else that is not a regular file), cut at line ends, to a
  descriptor opened O_APPEND: several lbd processes can share one file and their lines never
  interleave (a regular file's append is one locked write on Linux; a pipe's up to PIPE_BUF).
- A failed write (a full disk, a FIFO whose reader left) drops that chunk's lines and counts them
  (`dropped_failed`), with one warning until writing works again; the proxy carries on.
- `reopen()` (SIGUSR1) makes the writer open the path again, for log rotation; if that fails the
  file in use stays. A reload hands it a file the reload opened and checked (`open_target`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import queue
import select
import stat
import threading
import time
from typing import Final

from lbd.accesslog import ALL_KEPT, Entry, LineCache, json_line, sample_threshold, sampled_in, text_line
from lbd.config import Config
from lbd.errors import ConfigError

log = logging.getLogger("lbd.access_log")

STDOUT: Final = "-"
BATCH: Final = 256  # entries handed to the writer at once
HAND_OVER_S: Final = 0.5  # a partial batch waits at most this long: lines reach the file within a second
CHUNK_BYTES: Final = 64 * 1024  # one write() to a regular file
CLOSE_WAIT_S: Final = 5.0  # at shutdown, how long the writer may take to write what is left
FILE_MODE: Final = 0o640


def open_target(path: str, create: bool = True) -> int:
    """A descriptor to append lines to (1 for "-", stdout), checked as writable now: ConfigError
    with one line saying why not. Opened without blocking (a FIFO with no reader is an error, not a
    hang), then made blocking: the writer thread may wait on it, the event loop never does."""
    if path == STDOUT:
        fd = 1
    else:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NONBLOCK | (os.O_CREAT if create else 0)
        try:
            fd = os.open(path, flags, FILE_MODE)
        except OSError as exc:
            why = "a FIFO with no reader" if exc.errno == errno.ENXIO else exc.strerror
            raise ConfigError(f"access_log {path}: cannot open it to append lines: {why}") from None
    try:
        if fd != 1:
            os.set_blocking(fd, True)
        os.write(fd, b"")  # a device that refuses every write (/dev/full) says so now
        if stat.S_ISREG(os.fstat(fd).st_mode) and os.fstatvfs(fd).f_bavail == 0:
            raise ConfigError(f"access_log {path}: cannot write to it: its filesystem has no space left")
    except OSError as exc:
        _close(fd)
        raise ConfigError(f"access_log {path}: cannot write to it: {exc.strerror}") from None
    except ConfigError:
        _close(fd)
        raise
    return fd


def check_target(path: str, create: bool) -> None:
    """Whether lines can be appended to `path` now, else ConfigError. `create`: as `lbd start` does
    (a missing file is made); without, as `lbd check-config` does, which creates nothing (a new
    file's directory must let this user create it)."""
    if create or path == STDOUT or os.path.exists(path):
        _close(open_target(path, create))
        return
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise ConfigError(f"access_log {path}: cannot open it to append lines: no such directory: {directory}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"access_log {path}: cannot open it to append lines: {directory} is not writable")


def _close(fd: int) -> None:
    if fd > 2:
        with contextlib.suppress(OSError):
            os.close(fd)


class _Use:
    """Write to `fd` (opened for `path`) from now on, in `json` or text."""

    def __init__(self, fd: int, path: str, json: bool) -> None:
        self.fd = fd
        self.path = path
        self.json = json


class _Reopen:
    """Open the path in use again (it may have been renamed by a log rotation)."""


class _Close:
    """Close the file: the log is off. `last`: the writer thread ends too."""

    def __init__(self, last: bool) -> None:
        self.last = last


class _Writer:
    """The writer thread's side: the descriptor, the formatting, the writes, and their counters.

    Only this thread touches the descriptor; the loop reads the counters (plain ints, each written
    by one thread only).
    """

    def __init__(self) -> None:
        self.commands: queue.SimpleQueue[list[Entry] | _Use | _Reopen | _Close] = queue.SimpleQueue()
        self.fd = -1
        self.path = ""
        self.json = False
        self.chunk = CHUNK_BYTES
        self.processed = 0  # entries written or dropped here (the loop's bound counts what is in between)
        self.lines = 0
        self.dropped_failed = 0
        self.failing: str | None = None  # the error while writes fail (warned about once)
        self.partial = False  # the last write ended inside a line: the next write ends it first
        self.cache = LineCache()
        self.thread = threading.Thread(target=self.run, name="lbd-access-log", daemon=True)

    def run(self) -> None:
        while True:
            command = self.commands.get()
            if isinstance(command, list):
                self.write(command)
            elif isinstance(command, _Use):
                self.use(command.fd, command.path)
                self.json = command.json
            elif isinstance(command, _Reopen):
                self.reopen()
            else:
                self.use(-1, "")
                if command.last:
                    return

    def use(self, fd: int, path: str) -> None:
        if self.fd != fd:
            _close(self.fd)
        self.fd, self.path, self.partial = fd, path, False
        self.chunk = CHUNK_BYTES
        if fd >= 0 and not stat.S_ISREG(os.fstat(fd).st_mode):
            self.chunk = select.PIPE_BUF  # a pipe keeps writes up to PIPE_BUF whole among several writers

    def reopen(self) -> None:
        if self.fd < 0 or self.path == STDOUT:
            return
        try:
            fd = open_target(self.path)
        except ConfigError as exc:
            log.warning("access log not reopened, lines still go to the file opened before: %s", exc)
            return
        self.use(fd, self.path)
        log.info("access log reopened: %s", self.path)

    def write(self, batch: list[Entry]) -> None:
        if self.fd < 0:
            self.processed += len(batch)
            return
        wall_offset = time.time() - time.monotonic()
        cache = self.cache
        lines: list[bytes] = []
        size = 0
        for entry in batch:
            line = json_line(entry, wall_offset, cache) if self.json else text_line(entry, wall_offset, cache)
            if size + len(line) > self.chunk and lines:
                self.flush(lines)
                lines = []
                size = 0
            lines.append(line)
            size += len(line)
        if lines:
            self.flush(lines)
        self.processed += len(batch)

    def flush(self, lines: list[bytes]) -> None:
        """One write() of whole lines."""
        lead = b"\n" if self.partial else b""
        data = b"".join([lead, *lines]) if lead else b"".join(lines)  # the batch copied once, not twice
        view = memoryview(data)
        written = 0
        try:
            while written < len(data):
                written += os.write(self.fd, view[written:])
        except OSError as exc:
            whole = data.count(b"\n", len(lead), max(written, len(lead)))
            self.lines += whole
            self.dropped_failed += len(lines) - whole
            self.partial = self.partial if written == 0 else data[written - 1] != 0x0A
            if self.failing is None:
                self.failing = exc.strerror or type(exc).__name__
                log.warning(
                    "access log %s: cannot write (%s); dropping lines until writing works again, counted in "
                    "lbd_access_log_dropped_total",
                    self.path, self.failing,
                )  # fmt: skip
            return
        self.lines += len(lines)
        self.partial = False
        if self.failing is not None:
            log.info("access log %s: writing again (it failed with: %s)", self.path, self.failing)
            self.failing = None


class AccessLog:
    """The event loop's side: entries in, batches out to the writer, within the bound.

    The proxy calls `add` only while `on`; everything else here runs on the loop too (start, reload,
    SIGUSR1, shutdown).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.on = False
        self.path: str | None = None
        self.sampling = False
        self.threshold = ALL_KEPT
        self.buffer = 0  # access_log_buffer, from `apply`
        self.pending: list[Entry] = []
        self.handed = 0  # entries handed to the writer
        self.dropped_full = 0
        self.writer: _Writer | None = None
        self._tick: asyncio.TimerHandle | None = None

    # --- the request path ------------------------------------------------------------------------

    def add(self, entry: Entry) -> None:
        pending = self.pending
        pending.append(entry)
        if len(pending) >= BATCH:
            self._hand_over()

    def sampled(self, client_id: bytes | None) -> bool:
        return sampled_in(client_id, self.threshold)

    def _hand_over(self) -> None:
        batch = self.pending
        writer = self.writer
        if not batch or writer is None:
            return
        self.pending = []
        if self.handed - writer.processed + len(batch) > self.buffer:
            self.dropped_full += len(batch)  # the writer is that far behind: never queue without bound
            return
        self.handed += len(batch)
        writer.commands.put(batch)

    def _every_half_second(self) -> None:
        self._hand_over()
        self._tick = self.loop.call_later(HAND_OVER_S, self._every_half_second) if self.on else None

    # --- settings, rotation, shutdown --------------------------------------------------------------

    def apply(self, config: Config, fd: int) -> None:
        """Follow `config` from now on; `fd` is `open_target(config.access_log)` (-1 when it is unset).
        Lines already in hand go to the file in use before; later ones to `fd`, in the new format."""
        self.sampling = config.access_log_sample < 1.0
        self.threshold = sample_threshold(config.access_log_sample)
        self.buffer = config.access_log_buffer
        self._hand_over()
        writer = self.writer
        if config.access_log is None:
            if writer is not None and self.on:
                writer.commands.put(_Close(last=False))
            self.on, self.path = False, None
            return
        if writer is None:
            writer = self.writer = _Writer()
            writer.thread.start()
        writer.commands.put(_Use(fd, config.access_log, config.access_log_format == "json"))
        self.on, self.path = True, config.access_log
        if self._tick is None:
            self._tick = self.loop.call_later(HAND_OVER_S, self._every_half_second)

    def reopen(self) -> None:
        """Open the file again by its path (after logrotate renamed it): SIGUSR1, and what a supervisor
        asks of its workers. What was logged before goes to the old file."""
        if self.on and self.writer is not None:
            self._hand_over()
            self.writer.commands.put(_Reopen())

    async def close(self) -> None:
        """At shutdown, after the proxy stopped: write what is left (waiting CLOSE_WAIT_S at most)."""
        await asyncio.sleep(0)  # connections the proxy just cut report their ends in callbacks due now
        writer = self.writer
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        if writer is None:
            return
        self._hand_over()
        self.on = False
        writer.commands.put(_Close(last=True))
        await self.loop.run_in_executor(None, writer.thread.join, CLOSE_WAIT_S)
        if writer.thread.is_alive():
            left = self.handed - writer.processed
            log.warning("access log %s: %d lines not written at shutdown (the writer is stuck)", self.path, left)

    # --- what the metrics read -----------------------------------------------------------------------

    @property
    def lines(self) -> int:
        return 0 if self.writer is None else self.writer.lines

    @property
    def dropped_failed(self) -> int:
        return 0 if self.writer is None else self.writer.dropped_failed
