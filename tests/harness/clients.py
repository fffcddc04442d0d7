"""Clients for end-to-end proxy tests: a raw-socket HTTP/1.x client that sees framing byte for byte,
curl, and probes of the lbd process (memory) and of the kernel's socket table (upstream reuse).

Every read here has a deadline: a proxy that hangs fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

DEFAULT_TIMEOUT_S = 5.0


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None, url
    return port


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def build_request(
    method: str,
    target: str,
    headers: Iterable[tuple[str, str]] | Mapping[str, str] = (),
    body: bytes = b"",
    version: str = "HTTP/1.1",
    content_length: bool = True,
    host: str | None = "lbd.test",
) -> bytes:
    """One request's bytes, exactly as given, with a Host first when the headers have none (as every
    real client sends it; `host=None` leaves it out) and a Content-Length for a non-empty body."""
    pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    names = {name.lower() for name, _ in pairs}
    if host is not None and "host" not in names:
        pairs.insert(0, ("Host", host))
    if body and content_length and "content-length" not in names and "transfer-encoding" not in names:
        pairs.append(("Content-Length", str(len(body))))
    head = f"{method} {target} {version}\r\n" + "".join(f"{name}: {value}\r\n" for name, value in pairs)
    return head.encode("latin-1") + b"\r\n" + body


@dataclass
class RawResponse:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    chunked: bool = False
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return ", ".join(values) if values else None

    def header_all(self, name: str) -> list[str]:
        lower = name.lower()
        return [value for key, value in self.headers if key.lower() == lower]

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def connection_tokens(self) -> set[str]:
        value = self.header("Connection") or ""
        return {token.strip().lower() for token in value.split(",") if token.strip()}


class RawConnection:
    """A TCP connection speaking HTTP/1.x by hand: what is sent is exactly what the test wrote, and
    responses are parsed strictly, so a framing error in the proxy shows up as a parse failure here."""

    def __init__(self, port: int, timeout: float = DEFAULT_TIMEOUT_S, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.timeout = timeout
        self.buffer = bytearray()
        self.eof = False

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        """Read what the socket has; False at end of stream."""
        if self.eof:
            return False
        data = self.sock.recv(256 * 1024)
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    def read_line(self, limit: int = 64 * 1024) -> bytes:
        while True:
            end = self.buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 2]
                return line
            if len(self.buffer) > limit:
                raise AssertionError(f"line longer than {limit} bytes: {bytes(self.buffer[:200])!r}")
            if not self._fill():
                raise AssertionError(f"connection closed in the middle of a line: {bytes(self.buffer)!r}")

    def read_exact(self, n: int) -> bytes:
        while len(self.buffer) < n:
            if not self._fill():
                raise AssertionError(f"connection closed after {len(self.buffer)} of {n} bytes")
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    def read_to_eof(self) -> bytes:
        while self._fill():
            pass
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    def read_head(self) -> RawResponse:
        status_line = self.read_line().decode("latin-1")
        parts = status_line.split(" ", 2)
        assert len(parts) >= 2 and parts[0].startswith("HTTP/1."), f"bad status line {status_line!r}"
        headers: list[tuple[str, str]] = []
        while line := self.read_line():
            name, sep, value = line.decode("latin-1").partition(":")
            assert sep and name == name.strip(), f"bad header line {line!r}"
            headers.append((name, value.strip()))
        return RawResponse(parts[0], int(parts[1]), parts[2] if len(parts) > 2 else "", headers)

    def read_response(self, method: str = "GET", allow_interim: bool = False) -> RawResponse:
        """The next response, body framed by the rules of RFC 9112 §6.3.

        1xx interim responses are returned (when `allow_interim`) or skipped.
        """
        while True:
            response = self.read_head()
            if 100 <= response.status < 200 and response.status != 101:
                if allow_interim:
                    return response
                continue
            break
        if method == "HEAD" or response.status in (101, 204, 304):
            return response
        return self.read_body(response)

    def read_body(self, response: RawResponse) -> RawResponse:
        """The body of `response`, whose head was read (with `read_head`), by its framing."""
        transfer = response.header("Transfer-Encoding")
        length = response.header_all("Content-Length")
        if transfer is not None:
            assert not length, f"both Transfer-Encoding and Content-Length: {response.headers}"
            assert transfer.lower() == "chunked", f"unexpected Transfer-Encoding {transfer!r}"
            response.chunked = True
            response.body = self._read_chunked(response)
        elif length:
            assert len(length) == 1, f"several Content-Length headers: {length}"
            response.body = self.read_exact(int(length[0]))
        else:
            response.body = self.read_to_eof()
        return response

    def _read_chunked(self, response: RawResponse) -> bytes:
        body = bytearray()
        while True:
            size_line = self.read_line()
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                break
            body += self.read_exact(size)
            assert self.read_exact(2) == b"\r\n", "chunk not followed by CRLF"
        while line := self.read_line():
            name, _, value = line.decode("latin-1").partition(":")
            response.trailers.append((name, value.strip()))
        return bytes(body)

    def closed_by_peer(self, timeout: float = 2.0) -> bool:
        """True if the peer closes (EOF or reset) within `timeout` with no further bytes."""
        self.sock.settimeout(timeout)
        try:
            extra = self.read_to_eof()
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        finally:
            self.sock.settimeout(self.timeout)
        assert not extra, f"unexpected bytes before close: {extra[:200]!r}"
        return True

    def still_open(self, wait: float = 0.2) -> bool:
        """Nothing arrives and the connection is not closed within `wait`."""
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(1)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(self.timeout)
        if data:
            self.buffer += data
            return True
        self.eof = True
        return False


def raw_exchange(port: int, request: bytes, method: str = "GET", timeout: float = DEFAULT_TIMEOUT_S) -> RawResponse:
    with RawConnection(port, timeout) as connection:
        connection.send(request)
        return connection.read_response(method)


def curl(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[bytes]:
    """curl with no config file, no proxy from the environment and a hard time limit."""
    command = ["curl", "-q", "--silent", "--show-error", "--noproxy", "*", "--max-time", str(int(timeout)), *args]
    return subprocess.run(command, capture_output=True, timeout=timeout + 5, check=False)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS in /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class RssWatcher:
    """Samples a process's RSS in a thread; `peak` is the largest sample since start."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid = pid
        self.interval = interval
        self.baseline = rss_bytes(pid)
        self.peak = self.baseline
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            self.samples += 1
            self._stop.wait(self.interval)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def __enter__(self) -> RssWatcher:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, rss_bytes(self.pid))


TCP_TIME_WAIT = "06"  # the state column of /proc/net/tcp


def connections_to_port(port: int, state: str | None = None) -> set[int]:
    """Client-side ports of every TCP connection (any state, TIME_WAIT included; or only `state`) to
    127.0.0.1:`port`, seen from both ends in /proc/net/tcp: how many connections were ever opened to
    a fresh backend."""
    peers: set[int] = set()
    with open("/proc/net/tcp", encoding="ascii") as table:
        next(table)
        for line in table:
            fields = line.split()
            if state is not None and fields[3] != state:
                continue
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == port:
                peers.add(local_port)
            elif local_port == port and remote_port != 0:
                peers.add(remote_port)
    return peers
