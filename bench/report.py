"""What `bench/compare.py` prints and saves: the table, the targets' verdicts, memory, the machine.

Pure functions of the measured rows, so the table and the JSON always agree.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.loadgen import Load
from bench.stack import ROOT, tool
from lbd.proxy.server import DATA_PLANE

TARGET_CONNS = 64
STREAM_LIMIT_MIB = 32.0


@dataclass
class Row:
    """One (proxy, response, connections) measurement: a run per round, or why it could not be made."""

    proxy: str
    response: str
    conns: int
    rounds: list[Load] = field(default_factory=list)
    failure: str | None = None

    @property
    def load(self) -> Load | None:
        """The median round by req/s (None when the row failed)."""
        if self.failure is not None or not self.rounds:
            return None
        return sorted(self.rounds, key=lambda load: load.rps)[len(self.rounds) // 2]


@dataclass(frozen=True)
class Target:
    """`proxy`'s `metric` against `reference`'s (HAProxy's) in the same run at `conns` connections: at
    least (rps, and rps per CPU-second of the proxy) or at most (p99) `factor` times; with no
    reference, `metric` itself at most `factor` (user_us: the proxy's user CPU per request, in µs)."""

    label: str
    proxy: str
    response: str
    metric: str  # "rps", "rps_per_cpu", "p99" or "user_us"
    factor: float
    reference: str = "haproxy"
    conns: int = TARGET_CONNS


TARGETS = (
    # per-core parity with HAProxy (issue 23): one process against one HAProxy thread, each on a core
    Target("lbd static tiny req/s >= 0.95 x HAProxy", "lbd-static", "tiny", "rps", 0.95),
    Target("lbd dynamic tiny req/s >= 0.95 x HAProxy", "lbd-dynamic", "tiny", "rps", 0.95),
    Target("lbd static tiny, 8 connections, req/s >= 0.8 x HAProxy", "lbd-static", "tiny", "rps", 0.8, conns=8),
    Target("lbd dynamic tiny, 8 connections, req/s >= 0.8 x HAProxy", "lbd-dynamic", "tiny", "rps", 0.8, conns=8),
    Target("lbd static 64k req/s >= 1.2 x HAProxy", "lbd-static", "64k", "rps", 1.2),
    Target("lbd static tiny p99 <= 1.5 x HAProxy", "lbd-static", "tiny", "p99", 1.5),
    Target("lbd dynamic tiny p99 <= 1.5 x HAProxy", "lbd-dynamic", "tiny", "p99", 1.5),
    Target("lbd static user CPU per tiny request <= 5 us", "lbd-static", "tiny", "user_us", 5.0, reference=""),
    Target("lbd static new clients, 1,000 servers req/s >= 0.8 x 3", "lbd-new-1000", "tiny", "rps", 0.8, "lbd-new-3"),
    Target("lbd dynamic with --cluster tiny req/s >= 0.9 x without", "lbd-cluster", "tiny", "rps", 0.9, "lbd-dynamic"),
    # every request in a JSON access log (issue 21) costs at most a tenth of the throughput
    Target(
        "lbd static with JSON access log tiny req/s >= 0.9 x without",
        "lbd-static-log",
        "tiny",
        "rps",
        0.9,
        "lbd-static",
    ),
    Target(
        "lbd static with JSON access log 64k req/s >= 0.9 x without", "lbd-static-log", "64k", "rps", 0.9, "lbd-static"
    ),
    Target("lbd TLS keep-alive tiny req/s >= 0.60 x HAProxy TLS", "lbd-tls", "tiny", "rps", 0.60, "haproxy-tls"),
    # wrk, on the other core, cannot open connections fast enough to fill HAProxy's: handshakes per
    # second of the proxy's own CPU say what each could do with a core to itself
    Target(
        "lbd TLS full handshakes per CPU-second >= 0.60 x HAProxy TLS",
        "lbd-tls",
        "handshake",
        "rps_per_cpu",
        0.60,
        "haproxy-tls",
    ),
)


def find(rows: list[Row], proxy: str, response: str, conns: int) -> Row | None:
    for row in rows:
        if (row.proxy, row.response, row.conns) == (proxy, response, conns):
            return row
    return None


def compared(row: Row | None, reference: Row | None, metric: str) -> float | None:
    """`row`'s req/s ("rps") or p99 ("p99_ms") over `reference`'s: the median of the ratios of runs
    made in the same round (back to back), or of the kept runs when the rounds do not pair up."""
    if row is None or reference is None or row.load is None or reference.load is None:
        return None
    if len(row.rounds) == len(reference.rounds):
        pairs = zip(row.rounds, reference.rounds, strict=True)
        ratios = [getattr(mine, metric) / getattr(theirs, metric) for mine, theirs in pairs if getattr(theirs, metric)]
        if ratios:
            return statistics.median(ratios)
    base = getattr(reference.load, metric)
    return getattr(row.load, metric) / base if base else None


def row_dict(row: Row, rows: list[Row]) -> dict[str, object]:
    """The row's figures and its ratios to HAProxy (over TLS for a TLS row) and to nginx straight (same
    response and connections)."""
    haproxy = find(rows, "haproxy-tls" if row.proxy.endswith("-tls") else "haproxy", row.response, row.conns)
    direct = find(rows, "direct", row.response, row.conns)
    return {
        "proxy": row.proxy,
        "response": row.response,
        "conns": row.conns,
        **(row.load.as_dict() if row.load else {}),
        "rounds_rps": [round(load.rps, 1) for load in row.rounds],
        "x_haproxy_rps": compared(row, haproxy, "rps"),
        "x_direct_rps": compared(row, direct, "rps"),
        "x_haproxy_p99": compared(row, haproxy, "p99_ms"),
        "failure": row.failure,
    }


def median_of(row: Row | None, metric: str) -> float | None:
    """`metric` over the row's rounds, their median (None when not measured)."""
    if row is None or row.load is None:
        return None
    values = [value for load in row.rounds if (value := getattr(load, metric)) is not None]
    return statistics.median(values) if values else None


def verdicts(rows: list[Row]) -> list[dict[str, object]]:
    """Each target: PASS, FAIL (also when lbd's row had errors) or n/a (not measured)."""
    results: list[dict[str, object]] = []
    for target in TARGETS:
        mine = find(rows, target.proxy, target.response, target.conns)
        if not target.reference:
            value = median_of(mine, target.metric)
        else:
            reference = find(rows, target.reference, target.response, target.conns)
            value = compared(mine, reference, "p99_ms" if target.metric == "p99" else target.metric)
        if value is None or mine is None:
            verdict, note = "n/a", "not measured"
        else:
            errors = sum(load.errors for load in mine.rounds)  # in any round, not only the kept one
            at_most = target.metric == "p99" or not target.reference
            ok = value <= target.factor if at_most else value >= target.factor
            verdict = "PASS" if ok and not errors else "FAIL"
            note = f"{value:.2f}" + (f" ({errors} errors)" if errors else "")
        results.append({"target": target.label, "ratio": value, "verdict": verdict, "note": note})
    return results


def memory_verdicts(memory: dict[str, object]) -> list[dict[str, object]]:
    results = []
    for key in ("download", "upload"):
        figures = memory.get(key)
        if isinstance(figures, dict) and isinstance(figures.get("growth_mib"), float | int):
            growth = float(figures["growth_mib"])
            verdict = "PASS" if growth < STREAM_LIMIT_MIB else "FAIL"
            label = f"{mib_label(figures['bytes'])} {key} through lbd: RSS growth < {STREAM_LIMIT_MIB:.0f} MiB"
            results.append({"target": label, "growth_mib": growth, "verdict": verdict, "note": f"{growth:.1f} MiB"})
    return results


def mib_label(size: object) -> str:
    mib = int(size) // (1 << 20) if isinstance(size, int) else 0
    return f"{mib // 1024} GiB" if mib >= 1024 and mib % 1024 == 0 else f"{mib} MiB"


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def fmt(value: object, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(report: dict[str, object]) -> str:
    """The rows as fixed-width text (pasted as is into the README's Performance section).

    cpu% is the proxy's own CPU use over the run (100 = its whole core); wait% the time it was
    runnable but waiting for its CPU: alone on that CPU it is about 0, so more means other load.
    user and sys are the proxy's own CPU per request in µs: its code, and the kernel's work for it.
    """
    header = f"{'proxy':<14} {'response':<9} {'conns':>5} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7}"
    header += f" {'xHAProxy':>8} {'xdirect':>7} {'p99 xHAProxy':>12} {'cpu%':>5} {'wait%':>5}"
    header += f" {'user us':>7} {'sys us':>6}  flags"
    lines = [header]
    rows = report["rows"]
    assert isinstance(rows, list)
    for row in rows:
        flag = shorten(row["failure"] or (f"{row['errors']} errors" if row.get("errors") else ""), 72)
        lines.append(
            f"{row['proxy']:<14} {row['response']:<9} {row['conns']:>5} {fmt(row.get('rps'), ',.0f'):>9}"
            f" {fmt(row.get('p50_ms'), '.2f'):>7} {fmt(row.get('p99_ms'), '.2f'):>7}"
            f" {fmt(row['x_haproxy_rps'], '.2f'):>8} {fmt(row['x_direct_rps'], '.2f'):>7}"
            f" {fmt(row['x_haproxy_p99'], '.2f'):>12} {fmt(row.get('proxy_cpu_pct'), '.0f'):>5}"
            f" {fmt(row.get('proxy_wait_pct'), '.0f'):>5} {fmt(row.get('user_us'), '.2f'):>7}"
            f" {fmt(row.get('sys_us'), '.2f'):>6}  {flag}".rstrip()
        )
    return "\n".join(lines)


def targets_text(report: dict[str, object]) -> str:
    lines = [f"targets ({TARGET_CONNS} connections unless named; a ratio is the median of the rounds' ratios)"]
    targets = report["targets"]
    assert isinstance(targets, list)
    lines += [f"  {t['verdict']:<4}  {t['target']}: {t['note']}" for t in targets]
    return "\n".join(lines)


def memory_text(report: dict[str, object]) -> str:
    memory = report.get("memory")
    if not isinstance(memory, dict):
        return "memory: not measured"
    lines = ["memory (lbd static, fresh process)"]
    if memory.get("failure"):
        lines.append(f"  {memory['failure']}")
    idle = memory.get("idle")
    if isinstance(idle, dict):
        lines.append(
            f"  {idle['opened']:,} of {idle['connections']:,} idle keep-alive connections open"
            f" (lbd counts {idle['lbd_reported_connections']}): RSS {idle['rss_before_mib']} -> {idle['rss_after_mib']}"
            f" MiB, +{idle['growth_mib']} MiB, {idle['kib_per_connection']} KiB per connection"
            + (f"  [{idle['problem']}]" if idle.get("problem") else "")
        )
    elif isinstance(idle, str):
        lines.append(f"  idle connections: {idle}")
    for key in ("download", "upload"):
        figures = memory.get(key)
        if isinstance(figures, dict):
            lines.append(
                f"  {mib_label(figures['bytes'])} {key}: RSS {figures['rss_before_mib']} MiB, max growth"
                f" {figures['growth_mib']} MiB, {figures['seconds']} s ({figures['mib_per_s']} MiB/s)"
            )
        elif isinstance(figures, str):
            lines.append(f"  {key}: {figures}")
    verdicts = memory.get("verdicts")
    if isinstance(verdicts, list):
        lines += [f"  {v['verdict']:<4}  {v['target']}: {v['note']}" for v in verdicts]
    return "\n".join(lines)


def machine() -> dict[str, object]:
    """Where and with what the numbers were measured."""
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "haproxy": first_line([tool("haproxy"), "-v"]),
        "nginx": first_line([tool("nginx"), "-v"]),
        "wrk": first_line([tool("wrk"), "-v"]),
        "lbd_data_plane": DATA_PLANE,  # compiled (mypyc, setup.py) or interpreted
        "lbd_commit": first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "lbd_uncommitted_changes": bool(first_line(["git", "-C", str(ROOT), "status", "--porcelain", "lbd"])),
    }


def first_line(argv: list[str]) -> str:
    """A tool's first line of output (stdout or stderr: nginx -v writes to stderr)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError as error:
        return f"unavailable ({error})"
    return next(iter((done.stdout.strip() or done.stderr.strip()).splitlines()), "")
