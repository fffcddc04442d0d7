"""Running wrk (bounded, pinned) and reading its figures.

The Lua script's done() prints exact figures as one JSON line; wrk's own `--latency` text is parsed
as a fallback (units us/ms/s converted), so a run without the script still gives a row.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.stack import pin, tool

SCRIPT = Path(__file__).resolve().parent / "wrk" / "clients.lua"
CLIENT_IDS = 10_000
UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6}


@dataclass
class Load:
    """One measured wrk run; latencies in milliseconds."""

    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    bytes: int
    socket_errors: int
    non_2xx: int
    timeouts: int
    # over the run, in % of wall time: the proxy on a CPU, the proxy runnable but waiting for one,
    # and some task of the machine waiting for a CPU (Linux PSI): how busy the machine was
    proxy_cpu_pct: float | None = None
    proxy_wait_pct: float | None = None
    cpu_pressure_pct: float | None = None
    # the proxy's own CPU per request, in microseconds: user (its code) and kernel (its system calls)
    user_us: float | None = None
    sys_us: float | None = None

    @property
    def errors(self) -> int:
        return self.socket_errors + self.non_2xx + self.timeouts

    @property
    def rps_per_cpu(self) -> float:
        """Requests per second of the proxy's own CPU time: its capacity when the load generator, not
        the proxy, is what limits req/s (TLS handshakes on two cores); 0 when not measured."""
        return self.rps * 100 / self.proxy_cpu_pct if self.proxy_cpu_pct else 0.0

    def as_dict(self) -> dict[str, object]:
        return asdict(self) | {"errors": self.errors, "rps_per_cpu": round(self.rps_per_cpu, 1)}


def schedstat_ns(pid: int | None) -> tuple[int, int] | None:
    """Nanoseconds `pid` ran and waited runnable (/proc/<pid>/schedstat); None without a pid."""
    if pid is None:
        return None
    try:
        ran, waited = Path(f"/proc/{pid}/schedstat").read_text().split()[:2]
    except OSError:
        return None
    return int(ran), int(waited)


def cpu_times_s(pid: int | None) -> tuple[float, float] | None:
    """Seconds of user and kernel CPU `pid` used so far (/proc/<pid>/stat); None without a pid."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks  # utime, stime (fields 14 and 15)


def pressure_us() -> int | None:
    """Microseconds some task waited for a CPU since boot (PSI); None where the kernel lacks it."""
    try:
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return None
    return int(some.rsplit("total=", 1)[1])


def run_observed(
    url: str,
    path: str,
    connections: int,
    seconds: float,
    cpu: int | None,
    pid: int | None,
    new_clients: bool = False,
    close: bool = False,
) -> Load:
    """`run_wrk`, plus how much CPU the proxy (`pid`) used and waited for, and the machine's CPU pressure."""
    sched, times, pressure, started = schedstat_ns(pid), cpu_times_s(pid), pressure_us(), time.monotonic()
    load = run_wrk(url, path, connections, seconds, cpu, new_clients, close)
    wall = time.monotonic() - started
    sched_after, times_after, pressure_after = schedstat_ns(pid), cpu_times_s(pid), pressure_us()
    if times and times_after and load.requests:
        load.user_us = round((times_after[0] - times[0]) * 1e6 / load.requests, 2)
        load.sys_us = round((times_after[1] - times[1]) * 1e6 / load.requests, 2)
    if sched and sched_after:
        load.proxy_cpu_pct = round((sched_after[0] - sched[0]) / 1e7 / wall, 1)
        load.proxy_wait_pct = round((sched_after[1] - sched[1]) / 1e7 / wall, 1)
    if pressure is not None and pressure_after is not None:
        load.cpu_pressure_pct = round((pressure_after - pressure) / 1e4 / wall, 1)
    return load


def run_wrk(
    url: str,
    path: str,
    connections: int,
    seconds: float,
    cpu: int | None,
    new_clients: bool = False,
    close: bool = False,
    threads: int = 1,
) -> Load:
    """`wrk -tT -cN -dS --latency` with the many-clients script (or, with `new_clients`, a client id
    never seen before on every request; with `close`, a new connection for every request: over TLS,
    a handshake each); killed if it overstays by 30 s."""
    argv = [*pin(cpu), tool("wrk"), f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
    argv += ["-H", "Connection: close"] if close else []
    argv += ["-s", str(SCRIPT), url, "--", path, str(CLIENT_IDS), *(["new"] if new_clients else [])]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited with {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    return parse(done.stdout)


def parse(output: str) -> Load:
    line = next((line for line in output.splitlines() if line.startswith("BENCH_JSON ")), None)
    if line is None:
        return parse_text(output)
    data = json.loads(line.removeprefix("BENCH_JSON "))
    seconds = data["duration_us"] / 1e6
    return Load(
        requests=data["requests"],
        seconds=seconds,
        rps=data["requests"] / seconds if seconds else 0.0,
        p50_ms=data["p50_us"] / 1e3,
        p99_ms=data["p99_us"] / 1e3,
        bytes=data["bytes"],
        socket_errors=data["connect"] + data["read"] + data["write"],
        non_2xx=data["status"],
        timeouts=data["timeout"],
    )


def parse_text(output: str) -> Load:
    """wrk's `--latency` report: requests, duration, 50%/99% lines, socket errors, non-2xx/3xx."""
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m), ([\d.]+)([KMGT]?B) read", output)
    if total is None:
        raise RuntimeError(f"unreadable wrk output:\n{output}")
    seconds = float(total[2]) * UNITS_US[total[3]] / 1e6
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    size = float(total[4]) * 1024 ** "BKMGT".index(total[5][0])
    return Load(
        requests=int(total[1]),
        seconds=seconds,
        rps=int(total[1]) / seconds if seconds else 0.0,
        p50_ms=percentile_ms(output, "50"),
        p99_ms=percentile_ms(output, "99"),
        bytes=int(size),
        socket_errors=sum(int(errors[i]) for i in (1, 2, 3)) if errors else 0,
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        timeouts=int(errors[4]) if errors else 0,
    )


def percentile_ms(output: str, percent: str) -> float:
    match = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no {percent}% latency line in wrk output (was --latency given?)")
    return float(match[1]) * UNITS_US[match[2]] / 1e3
