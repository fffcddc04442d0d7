"""A throwaway `redis-server` for the cluster tests: on a free loopback port, persistence off, in a
temporary directory removed afterwards. It can be killed (SIGKILL) and started again on the same
port, empty, as a Redis restarted without persistence would be."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 10.0


def redis_binary() -> str:
    """The redis-server on PATH; without one the calling test fails at once saying what to install
    (`make test` installs Debian's redis-server when it is missing)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: the cluster tests need it (apt-get install redis-server)")
    return binary


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    def __init__(self) -> None:
        self.port = _free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="lb-redis-", dir="/tmp"))
        self.process: subprocess.Popen[bytes] | None = None
        self.password: str | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, password: str | None = None) -> RedisServer:
        """Start (again, empty); with `password`, clients without it are refused until `open_up()`."""
        self.password = password
        command = [
            redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.workdir), "--protected-mode", "no", "--loglevel", "warning",
        ]  # fmt: skip
        if password is not None:
            command += ["--requirepass", password]
        log = (self.workdir / "redis.log").open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"redis-server exited: {(self.workdir / 'redis.log').read_text()}")
            if self.command("PING") == "PONG":
                return self
            time.sleep(0.05)
        raise AssertionError(f"redis-server did not answer within {STARTUP_TIMEOUT_S} s")

    def open_up(self) -> None:
        """Drop the password: clients refused so far get in at their next attempt."""
        assert self.command("CONFIG", "SET", "requirepass", "") == "OK"
        self.password = None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def command(self, *args: str) -> str | None:
        """One command over a plain socket (RESP), for checks from the test; None when unreachable."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as connection:
                if self.password is not None:
                    connection.sendall(_resp("AUTH", self.password))
                    assert connection.recv(1 << 10) == b"+OK\r\n"
                connection.sendall(_resp(*args))
                reply = connection.recv(1 << 20).decode()
        except OSError:
            return None
        kind, body = reply[:1], reply[1:].split("\r\n")
        if kind in "+-:":
            return body[0]
        if kind == "$":
            return None if body[0] == "-1" else body[1]
        if kind == "*":
            return "\n".join(body[i] for i in range(2, len(body), 2))
        return reply

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _resp(*args: str) -> bytes:
    return (f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)).encode()


@contextmanager
def redis_server(password: str | None = None) -> Iterator[RedisServer]:
    server = RedisServer().start(password)
    try:
        yield server
    finally:
        server.close()
