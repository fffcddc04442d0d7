"""What registering one server into N costs a running lbd, end to end, and how long it holds the proxy.

    .venv/bin/python -m bench.registration [--servers 10000] [--rounds 5] [--mode static]

lbd starts with N servers from a servers file, all pointing at one backend (bench/sink.py, on the
other CPU where there are two, with this script), and is left to fill its static table. Then one more server is
registered and deregistered over the admin socket, R times, while a client sends requests one after
another through the proxy. Printed per call: the admin call's time (lbd's work plus the socket and
JSON around it) and the longest proxy request overlapping it, against the longest one outside the
calls: how long the change held lbd's event loop.

Health checks run every 60 s here rather than every 2 s: at 10,000 servers the default schedule is
5,000 checks a second, which alone keeps lbd's CPU busy (see docs/routing.md).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from bench.health_round import start_backend
from bench.stack import VENV_BIN, admin, free_port

IDLE_CPU = 0.15  # settled (static table filled) below 15% of a CPU: its first health checks use some


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_settled(pid: int, timeout_s: float = 300.0) -> float:
    """Seconds until lbd's CPU use over half a second falls below IDLE_CPU."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        before = cpu_seconds(pid)
        time.sleep(0.5)
        if cpu_seconds(pid) - before < IDLE_CPU * 0.5:
            return time.monotonic() - started
    raise SystemExit(f"lbd still busy after {timeout_s:.0f} s")


class Prober(threading.Thread):
    """Requests through the proxy one after another: (start, end) of each, monotonic seconds."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.spans: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        count = 0
        while not self.stop.is_set():
            count += 1
            started = time.monotonic()
            connection.request("GET", "/tiny", headers={"client-id": f"probe-{count}", "client-region": "us-east"})
            response = connection.getresponse()
            response.read()
            self.spans.append((started, time.monotonic()))
        connection.close()

    def longest(self, windows: list[tuple[float, float]], inside: bool) -> float:
        """The longest request overlapping one of `windows` (or, `inside` False, overlapping none)."""
        found = 0.0
        for start, end in self.spans:
            overlaps = any(start < w_end and end > w_start for w_start, w_end in windows)
            if overlaps == inside:
                found = max(found, end - start)
        return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mode", choices=("static", "dynamic"), default="static")
    args = parser.parse_args()
    backend, backend_port = start_backend()
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {1})  # the client beside the backend, lbd alone on CPU 0
    workdir = Path(tempfile.mkdtemp(prefix="lbreg-", dir="/tmp"))
    lbd: subprocess.Popen[bytes] | None = None
    try:
        servers = [
            {"id": f"srv-{i:05}", "url": f"http://127.0.0.1:{backend_port}", "region": "us-east", "capacity": 100}
            for i in range(args.servers)
        ]
        (workdir / "servers.json").write_text(json.dumps(servers))
        (workdir / "lbd.toml").write_text("[health]\ninterval_ms = 60000\n")
        socket_path, port = workdir / "lbd.sock", free_port()
        pin = ["taskset", "-c", "0"] if (os.cpu_count() or 1) >= 2 else []
        lbd = subprocess.Popen(
            [*pin, str(VENV_BIN / "lbd"), "start", "--listen", f"127.0.0.1:{port}", "--mode", args.mode,
             "--admin-socket", str(socket_path), "--state-dir", str(workdir / "state"), "--log-level", "warning",
             "--servers", str(workdir / "servers.json"), "--config", str(workdir / "lbd.toml")],
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not socket_path.exists():
            if lbd.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("lbd did not start")
            time.sleep(0.1)
        settled = wait_settled(lbd.pid)
        print(f"lbd ({args.mode}) with {args.servers:,} servers settled {settled:.1f} s after its admin socket opened")
        prober = Prober(port)
        prober.start()
        time.sleep(1.0)
        windows: list[tuple[float, float]] = []
        calls: dict[str, list[float]] = {"register": [], "deregister": []}
        entry = {"url": f"http://127.0.0.1:{backend_port}", "region": "us-east", "capacity": 100}
        for attempt in range(args.rounds):
            server_id = f"new-{attempt}"
            for kind, call in (
                ("register", lambda: admin(socket_path, "POST", "/v1/servers", {"id": server_id, **entry})),
                ("deregister", lambda: admin(socket_path, "DELETE", f"/v1/servers/{server_id}?now=1")),
            ):
                started = time.monotonic()
                status, answer = call()
                ended = time.monotonic()
                if status not in (200, 201):
                    raise SystemExit(f"{kind} answered {status}: {answer}")
                windows.append((started, ended))
                calls[kind].append(ended - started)
                time.sleep(0.3)
        time.sleep(0.5)
        prober.stop.set()
        prober.join(10)
        for kind, times in calls.items():
            print(
                f"{kind} one server into {args.servers:,}: admin call median {statistics.median(times) * 1000:.1f} ms,"
                f" max {max(times) * 1000:.1f} ms"
            )
        during, outside = prober.longest(windows, True), prober.longest(windows, False)
        print(
            f"longest proxy request overlapping a call: {during * 1000:.1f} ms; outside them: {outside * 1000:.1f} ms"
            f" ({len(prober.spans):,} requests)"
        )
    finally:
        if lbd is not None:
            lbd.terminate()
            lbd.wait(15)
        backend.terminate()
        backend.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
