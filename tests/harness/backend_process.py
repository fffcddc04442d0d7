"""A test backend in its own process, so that faults are real: `kill()` is SIGKILL (no goodbye; the
kernel closes its sockets, resetting those with unread bytes), `pause()` is SIGSTOP (the kernel still
completes handshakes into the listen backlog and buffers requests, but nobody answers: a hung
server), and `start()` again binds the same port.

The process serves the same endpoints as `tests/harness/backends.py` (it runs that `Backend`), on
uvloop, and exits when its stdin closes, so a crashed test leaves no backend behind. With
`resets=True` it is instead a server that resets every connection the moment it accepts it
(SO_LINGER 0), before reading anything: the fastest way a connection can die after connecting.

    python -m tests.harness.backend_process ID [PORT [resets]]    # prints the bound port once listening
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import uvloop

from tests.harness.backends import Backend, BackendLoop, server_entry

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 10.0


class BackendProcess:
    def __init__(self, server_id: str, region: str = "us-east", resets: bool = False) -> None:
        self.id = server_id
        self.region = region
        self.resets = resets
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def entry(self, capacity: int = 10) -> dict[str, Any]:
        return server_entry(self.id, self.port, self.region, capacity)

    def start(self) -> BackendProcess:
        """Start (again, on the same port once one was chosen); returns when it is listening."""
        assert not self.running, f"backend {self.id} is already running"
        command = [sys.executable, "-m", "tests.harness.backend_process", self.id, str(self.port)]
        command += ["resets"] if self.resets else []
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)
        self.process = process
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], STARTUP_TIMEOUT_S)
        line = process.stdout.readline() if ready else b""
        if not line.strip().isdigit():
            self.kill()
            raise AssertionError(f"backend {self.id} did not start (said {line!r})")
        self.port = int(line)
        return self

    def hits(self) -> dict[str, int]:
        """Requests this process has received, by path (since it last started)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            connection.request("GET", "/hits")
            hits: dict[str, int] = json.loads(connection.getresponse().read())
            return hits
        finally:
            connection.close()

    def kill(self) -> None:
        """SIGKILL, as a crash; returns once the process is gone (its sockets closed)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the server hangs (connections are accepted by the kernel, never answered)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


@contextmanager
def backend_processes(*ids: str, resetting: tuple[str, ...] = ()) -> Iterator[list[BackendProcess]]:
    """One backend process per id (those in `resetting` reset every connection), all in us-east;
    killed afterwards whatever happened."""
    started: list[BackendProcess] = []
    try:
        started.extend(BackendProcess(server_id, resets=server_id in resetting).start() for server_id in ids)
        yield started
    finally:
        for backend in started:
            backend.kill()


class _Resetter(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        cast(asyncio.Transport, transport).abort()  # with SO_LINGER 0 the close is a RST (uvloop's
        # transports do not subclass asyncio.Transport, hence the cast)


async def _serve_resets(port: int) -> int:
    server = await asyncio.get_running_loop().create_server(_Resetter, "127.0.0.1", port, reuse_address=True)
    return int(server.sockets[0].getsockname()[1])


def main() -> None:
    server_id, port = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0
    uvloop.install()  # BackendLoop's loop comes from the policy: uvloop, as fast as the tests can drive
    loop = BackendLoop()
    if sys.argv[3:] == ["resets"]:
        port = loop.run(_serve_resets(port))
    else:
        backend = Backend(loop, server_id)
        backend.port = port
        backend.start()
        port = backend.port
    print(port, flush=True)
    sys.stdin.buffer.read()  # until the parent closes our stdin (or dies)
    os._exit(0)


if __name__ == "__main__":
    main()
