"""A real `lbd` process for tests: started on an ephemeral port with its admin socket in a short
temporary directory, queried over that socket, stopped with SIGTERM."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lbctl.client import UnixHTTPConnection

STARTUP_TIMEOUT_S = 15.0


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll `condition` until it returns something truthy; fail with the last value otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s (last value: {last!r})")


class Lbd:
    def __init__(
        self, workdir: Path, args: Sequence[str], env: dict[str, str] | None = None, prefix: Sequence[str] = ()
    ) -> None:
        """`prefix`: a command lbd runs under, which execs it (so signals still reach lbd)."""
        self.workdir = workdir
        self.prefix = list(prefix)
        self.socket = workdir / "lbd.sock"
        self.log_path = workdir / "lbd.log"
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.env.pop("LBD_SOCKET", None)
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.tls_port = 0  # the TLS listener's, when the args configure one

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def state_dir(self) -> Path:
        """Each test daemon keeps its state in its own workdir (unless its args name another)."""
        return self.workdir / "state"

    def start(self, extra: Sequence[str] = ()) -> Lbd:
        """Start (or, after `stop` or `kill`, restart on the same workdir and state directory)."""
        state = [] if "--state-dir" in [*self.args, *extra] else ["--state-dir", str(self.state_dir)]
        command = [
            *self.prefix, sys.executable, "-m", "lbd", "start",
            "--listen", "127.0.0.1:0",
            "--admin-socket", str(self.socket),
            *state, *self.args, *extra,
        ]  # fmt: skip
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=log, env=self.env, cwd=self.workdir)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"lbd exited with {self.process.returncode}:\n{self.log()}")
            try:
                status = self.get("/v1/status")
            except OSError:
                time.sleep(0.05)
                continue
            listeners = status["listeners"]
            self.port = int(listeners["proxy"].rsplit(":", 1)[1]) if "proxy" in listeners else 0
            self.tls_port = int(listeners["tls"].rsplit(":", 1)[1]) if "tls" in listeners else 0
            return self
        raise AssertionError(f"lbd did not start within {STARTUP_TIMEOUT_S} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One admin API call; returns (status, parsed JSON or text)."""
        connection = UnixHTTPConnection(self.socket, timeout=10.0)
        try:
            payload = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
            connection.request(method, path, body=payload, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        try:
            return response.status, json.loads(data)
        except ValueError:
            return response.status, data.decode(errors="replace")

    def get(self, path: str) -> Any:
        status, body = self.request("GET", path)
        assert status == 200, f"GET {path} -> {status}: {body}"
        return body

    def proxy_get(
        self, path: str = "/echo", client: str | None = "alice", region: str | None = None
    ) -> tuple[int, str, bytes]:
        """One GET through the proxy port: (status, the answering backend's id, body)."""
        headers = {} if client is None else {"client-id": client}
        if region is not None:
            headers["client-region"] = region
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            body = response.read()
            return response.status, response.getheader("X-Backend-Id") or "", body
        finally:
            connection.close()

    def servers(self) -> dict[str, dict[str, Any]]:
        return {server["id"]: server for server in self.get("/v1/servers")["servers"]}

    def lbctl(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 20
    ) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "lbctl.main", "--socket", str(self.socket), *args]
        full_env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1", **(env or {})}
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=full_env, check=False)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing of lbd's shutdown runs."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"lbd did not stop on SIGTERM within {timeout} s:\n{self.log()}") from None


CREATED_DIRECTORIES: list[Path] = []  # removed when the test session ends (tests/conftest.py)


def short_tempdir() -> Path:
    """Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer. Every directory
    made here is removed at the end of the test session, whatever the test did with it."""
    directory = Path(tempfile.mkdtemp(prefix="lb-", dir="/tmp"))
    CREATED_DIRECTORIES.append(directory)
    return directory


def write_servers(workdir: Path, entries: list[dict[str, Any]]) -> Path:
    path = workdir / "servers.json"
    path.write_text(json.dumps(entries))
    return path


@contextmanager
def running_lbd(
    args: Sequence[str] = (), entries: list[dict[str, Any]] | None = None, env: dict[str, str] | None = None
) -> Iterator[Lbd]:
    """An lbd process (with `--servers` from `entries` when given, and `env` added to the
    environment), stopped and cleaned afterwards."""
    workdir = short_tempdir()
    full_args = list(args)
    if entries is not None:
        full_args += ["--servers", str(write_servers(workdir, entries))]
    daemon = Lbd(workdir, full_args, env)
    try:
        yield daemon.start()
    finally:
        daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)
