"""A backend that records exactly what reaches it, for the request-smuggling regression suite.

Every byte each connection receives is kept, and parsed by h11 (a strict HTTP/1.1 parser nobody here
wrote): the requests the backend *saw* are what h11 found in those bytes, not what lbd meant to send.
A test then asserts that every request the backend saw is one the client sent as its own.

Each request is answered `200` with a body naming it (`seen METHOD TARGET #n`), so a client can tell
whose response it got. `reset_after` makes the backend read a request whole and then reset the
connection without answering (a server that processed the request and crashed). `idle_timeout_s`
makes it behave like a server whose keep-alive timer fires just as a request arrives on a connection
idle that long: the request is reset unprocessed (counted in `dropped`, never in `seen`).
lbd's health probes (`GET /health`) are answered and not recorded.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import h11

PROBE_PATH = "/health"


@dataclass(frozen=True)
class SeenRequest:
    connection: int  # the number of the connection it came on (1, 2, ...)
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header_all(self, name: str) -> list[str]:
        lower = name.lower()
        return [value for key, value in self.headers if key == lower]

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return ", ".join(values) if values else None


class _IdleReset(Exception):
    """A request arrived on a connection idle past the backend's keep-alive timeout."""


@dataclass
class RecordingBackend:
    reset_after: Callable[[SeenRequest], bool] = lambda request: False
    idle_timeout_s: float | None = None
    listener: socket.socket = field(default_factory=lambda: socket.create_server(("127.0.0.1", 0)))
    connections: int = 0
    seen: list[SeenRequest] = field(default_factory=list)
    dropped: int = 0  # requests reset unprocessed (idle_timeout_s)
    raw: dict[int, bytearray] = field(default_factory=dict)  # connection number -> every byte it received
    protocol_errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    def requests(self, since: int = 0) -> list[tuple[str, str]]:
        """(method, target) of each request seen (from the `since`-th on), in arrival order."""
        with self.lock:
            return [(request.method, request.target) for request in self.seen[since:]]

    def serve_forever(self) -> None:
        with contextlib.suppress(OSError):  # the listener closed: the test is over
            while True:
                connection = self.listener.accept()[0]
                with self.lock:
                    self.connections += 1
                    number = self.connections
                    self.raw[number] = bytearray()
                threading.Thread(target=self._serve, args=(connection, number), daemon=True).start()

    def _serve(self, connection: socket.socket, number: int) -> None:
        parser = h11.Connection(h11.SERVER)
        with connection, contextlib.suppress(OSError):
            idle_since = time.monotonic()
            while True:
                try:
                    request = self._next_request(parser, connection, number, idle_since)
                except h11.RemoteProtocolError as error:
                    with self.lock:
                        self.protocol_errors.append(str(error))
                    return
                except _IdleReset:
                    with self.lock:
                        self.dropped += 1
                    _reset(connection)
                    return
                if request is None:
                    return
                if request.target != PROBE_PATH:
                    with self.lock:
                        self.seen.append(request)
                    if self.reset_after(request):
                        _reset(connection)
                        return
                body = f"seen {request.method} {request.target} #{len(self.seen)}\n".encode()
                headers = [("Content-Length", str(len(body))), ("X-Backend-Id", "recorder")]
                for event in (h11.Response(status_code=200, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
                    connection.sendall(parser.send(event) or b"")
                if parser.our_state is h11.MUST_CLOSE:
                    return
                parser.start_next_cycle()
                idle_since = time.monotonic()

    def _next_request(
        self, parser: h11.Connection, connection: socket.socket, number: int, idle_since: float
    ) -> SeenRequest | None:
        """The next whole request on this connection, or None when it closed first."""
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = parser.next_event()
            if event is h11.NEED_DATA:
                data = connection.recv(65536)
                timeout = self.idle_timeout_s
                if head is None and data and timeout is not None and time.monotonic() - idle_since > timeout:
                    raise _IdleReset
                with self.lock:
                    self.raw[number] += data
                parser.receive_data(data)  # b"": the peer closed
            elif isinstance(event, h11.ConnectionClosed):
                return None
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in head.headers]
                return SeenRequest(number, head.method.decode(), head.target.decode("latin-1"), headers, bytes(body))


def _reset(connection: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0): the peer gets no response and no orderly end."""
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@contextmanager
def recording_backend(
    reset_after: Callable[[SeenRequest], bool] = lambda request: False, idle_timeout_s: float | None = None
) -> Iterator[RecordingBackend]:
    backend = RecordingBackend(reset_after, idle_timeout_s)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    try:
        yield backend
    finally:
        backend.listener.close()
