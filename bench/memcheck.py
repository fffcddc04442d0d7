"""lbd's memory under load: many idle keep-alive clients, and a large body streamed each way.

Plain blocking sockets, every one with a timeout and every loop with a deadline; lbd's resident
memory is read from /proc/<pid>/status (VmRSS), sampled every 10 ms while a body streams.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from bench.stack import admin
from tests.harness.clients import RssWatcher, rss_bytes

MIB = 1 << 20
CHUNK = MIB


def rss_kib(pid: int) -> int:
    return rss_bytes(pid) // 1024


def request(method: str, path: str, client_id: str, length: int | None = None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nclient-id: {client_id}\r\nclient-region: us-east\r\n"
    if length is not None:
        head += f"Content-Length: {length}\r\n"
    return (head + "\r\n").encode()


def read_head(sock: socket.socket, deadline: float) -> tuple[int, int, bytes]:
    """Status, Content-Length and the body bytes already read; a response without a length is an error."""
    data = b""
    while b"\r\n\r\n" not in data:
        if time.monotonic() > deadline or len(data) > 65536:
            raise TimeoutError("no complete response head")
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed after {len(data)} bytes of response head")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            return status, int(value), rest
    raise ConnectionError(f"response without Content-Length: {lines[0]}")


def read_body(sock: socket.socket, length: int, already: int, deadline: float) -> int:
    """Read and discard until `length` bytes of body were received; returns how many."""
    buffer = bytearray(CHUNK)
    received = already
    while received < length:
        if time.monotonic() > deadline:
            raise TimeoutError(f"body incomplete at the deadline: {received:,} of {length:,} bytes")
        count = sock.recv_into(buffer)
        if count == 0:
            raise ConnectionError(f"connection closed after {received:,} of {length:,} bytes")
        received += count
    return received


def idle_connections(
    port: int, pid: int, socket_path: Path, client_id: str, count: int, timeout_s: float
) -> dict[str, object]:
    """Open `count` keep-alive connections (one GET each, then idle); lbd's RSS before and with them open."""
    before = rss_kib(pid)
    deadline = time.monotonic() + timeout_s
    sockets: list[socket.socket] = []
    problem = None
    opened = 0
    started = time.monotonic()
    try:
        for _ in range(count):
            if time.monotonic() > deadline:
                problem = f"deadline of {timeout_s:.0f} s reached"
                break
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sockets.append(sock)
                sock.sendall(request("GET", "/tiny", client_id))
                status, length, rest = read_head(sock, deadline)
                read_body(sock, length, len(rest), deadline)
                if status != 200:
                    problem = f"HTTP {status}"
                    break
                opened += 1
            except OSError as error:
                problem = f"{type(error).__name__}: {error}"
                break
        open_s = time.monotonic() - started
        time.sleep(1.0)  # let lbd settle before reading its RSS
        after = rss_kib(pid)
        _, answer = admin(socket_path, "GET", "/v1/status")
        reported = answer["clients"]["connections"] if isinstance(answer, dict) else None
    finally:
        for sock in sockets:
            sock.close()
    return {
        "connections": count,
        "opened": opened,
        "lbd_reported_connections": reported,
        "open_seconds": round(open_s, 2),
        "rss_before_mib": round(before / 1024, 1),
        "rss_after_mib": round(after / 1024, 1),
        "growth_mib": round((after - before) / 1024, 1),
        "kib_per_connection": round((after - before) / max(opened, 1), 2),
        "problem": problem,
    }


def stream_download(port: int, pid: int, client_id: str, size: int, timeout_s: float) -> dict[str, object]:
    """GET a `size`-byte body through lbd, discarding it; lbd's highest RSS growth meanwhile."""
    deadline = time.monotonic() + timeout_s
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request("GET", "/big", client_id))
        started = time.monotonic()
        with RssWatcher(pid) as sampler:
            status, length, rest = read_head(sock, deadline)
            if status != 200 or length != size:
                raise ConnectionError(f"expected 200 with {size:,} bytes, got {status} with {length:,}")
            received = read_body(sock, length, len(rest), deadline)
        return transfer_report(received, time.monotonic() - started, sampler)


def stream_upload(port: int, pid: int, client_id: str, size: int, timeout_s: float) -> dict[str, object]:
    """PUT a `size`-byte body through lbd to a backend that discards it; lbd's highest RSS growth."""
    deadline = time.monotonic() + timeout_s
    chunk = memoryview(bytes(CHUNK))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request("PUT", "/sink", client_id, length=size))
        started = time.monotonic()
        sent = 0
        with RssWatcher(pid) as sampler:
            while sent < size:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"upload incomplete at the deadline: {sent:,} of {size:,} bytes")
                sent += sock.send(chunk[: min(CHUNK, size - sent)])
            status, length, rest = read_head(sock, deadline)
            read_body(sock, length, len(rest), deadline)
        if status != 200:
            raise ConnectionError(f"upload answered HTTP {status}")
        return transfer_report(sent, time.monotonic() - started, sampler)


def transfer_report(size: int, seconds: float, sampler: RssWatcher) -> dict[str, object]:
    return {
        "bytes": size,
        "seconds": round(seconds, 2),
        "mib_per_s": round(size / MIB / seconds, 1) if seconds else None,
        "rss_before_mib": round(sampler.baseline / MIB, 1),
        "rss_max_mib": round(sampler.peak / MIB, 1),
        "growth_mib": round(sampler.growth / MIB, 1),
    }
