"""A hand-written HTTP/1.1 server for tests that need exact bytes on the wire from the server side:
each request's head is passed to `answer`, whose pieces are sent one by one with a pause between,
so lbd reads them separately. Keep-alive; requests carry no body."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Answer = Callable[[bytes], list[bytes]]  # request head -> the response, in the pieces it is sent in


class RawBackend:
    def __init__(self, answer: Answer, pause_s: float) -> None:
        self.answer = answer
        self.pause_s = pause_s
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.connections = 0  # accepted so far
        self.requests: list[tuple[int, bytes]] = []  # (connection number, request line) of each request

    def serve_forever(self) -> None:
        with contextlib.suppress(OSError):  # the listener closed: the test is over
            while True:
                connection = self.listener.accept()[0]
                self.connections += 1
                threading.Thread(target=self._serve, args=(connection, self.connections), daemon=True).start()

    def connection_of(self, request_line: bytes) -> int:
        """The number of the connection the last request with this line came on."""
        return next(number for number, line in reversed(self.requests) if line == request_line)

    def _serve(self, connection: socket.socket, number: int) -> None:
        with connection, contextlib.suppress(OSError):
            pending = b""
            while data := connection.recv(65536):
                pending += data
                while b"\r\n\r\n" in pending:
                    head, pending = pending.split(b"\r\n\r\n", 1)
                    self.requests.append((number, head.split(b"\r\n", 1)[0]))
                    for i, piece in enumerate(self.answer(head)):
                        if i:
                            time.sleep(self.pause_s)
                        connection.sendall(piece)


@contextmanager
def raw_backend(answer: Answer, pause_s: float = 0.02) -> Iterator[RawBackend]:
    backend = RawBackend(answer, pause_s)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    try:
        yield backend
    finally:
        backend.listener.close()
