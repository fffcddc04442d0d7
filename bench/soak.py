"""Soak: lbd under a bounded mixed load for minutes while one backend flaps, watching for leaks.

    .venv/bin/python -m bench.soak                   # 600 s (make soak)
    .venv/bin/python -m bench.soak --duration 60     # a short run

Three backends run as their own processes on loopback (tests/harness/backend_process.py); one of
them is SIGKILLed every `--flap-every` seconds and started again on its port `--down` seconds
later. The load (tests/harness/load.py, every request accounted for) mixes keep-alive GETs of
small and 64 KiB bodies, 16 KiB POST uploads, requests on a new connection each, and slow
requests, from clients that come and go (sticky sessions are created and expire all along, and a
backend back from a kill gets new clients). lbd's RSS (VmRSS) and open file descriptors are sampled every
`--sample-every` seconds. At the end it prints, and writes to bench/results/soak-<time>.json:

- RSS after the warm-up, at the end and the largest after the warm-up;
- open fds before the load and after it, once lbd's idle upstream connections expired (30 s);
- requests by outcome, and failures split into those the flaps explain (a response the killed
  backend was streaming, cut mid-body) and the rest;
- PASS/FAIL: RSS growth after the warm-up within `--rss-limit-mib`; fds back to the baseline;
  no unexplained failure and no ERROR in lbd's log.

Run from the repository's root (it imports the test harness). The exit code is 0 when all pass.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lbd
from tests.harness.backend_process import BackendProcess, backend_processes
from tests.harness.clients import rss_bytes
from tests.harness.daemon import running_lbd, wait_until
from tests.harness.load import CUT, LoadGenerator, LoadReport, Request, Result

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MIB = 1 << 20
# A client sends 20 requests in a row, then is not seen again until the 5,000 ids come round (every
# 100,000 requests, two minutes at 800/s), by when its session expired (session_idle_timeout below)
CLIENT_IDS = 5_000
VISIT = 20
UPLOAD = os.urandom(16 * 1024)  # at most retry_body_limit_bytes: a failed upload can be replayed
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ lbd (\w+) ")  # lbd's log format: time, "lbd", level
FD_SLACK = 3  # a health probe in progress at the sample holds one more fd per server
POOL_IDLE_S = 30  # lbd closes idle upstream connections after this long
CONFIG = """
session_idle_timeout = 20

[health]
interval_ms = 200
timeout_ms = 1000
cooldown_ms = 500
max_cooldown_ms = 2000
rise = 1
"""


def mixed_requests(mode: str) -> Callable[[int], Request]:
    """Per 100 requests: 60 small GETs, 10 GETs of 64 KiB, 10 uploads of 16 KiB, 17 small GETs each
    on a new connection, 3 slow GETs (200 ms); all keep-alive except the 17."""
    region = (("client-region", "us-east"),) if mode == "dynamic" else ()

    def request(index: int) -> Request:
        headers = (("client-id", f"c{index // VISIT % CLIENT_IDS}"), *region)
        slot = index % 100
        if slot < 60:
            return Request(path="/echo", headers=headers, kind="small")
        if slot < 70:
            return Request(path="/bytes/65536", headers=headers, kind="64k")
        if slot < 80:
            return Request("POST", "/upload", headers, UPLOAD, kind="upload")
        if slot < 97:
            return Request(path="/echo", headers=headers, close=True, kind="new-connection")
        return Request(path="/slow/200", headers=headers, kind="slow")

    return request


def git_commit() -> str:
    """The commit of the lbd under test (the package this Python imports), marked when lbd/ is modified."""
    where = str(Path(lbd.__file__).resolve().parent)
    head = subprocess.run(
        ["git", "-C", where, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    dirty = subprocess.run(
        ["git", "-C", where, "status", "--porcelain", "."], capture_output=True, text=True, check=False
    )
    if head.returncode != 0:
        return f"unknown ({where} is not in a git checkout)"
    return head.stdout.strip() + (" (lbd/ modified)" if dirty.stdout.strip() else "")


@dataclass
class Sample:
    t: float  # seconds since the load started
    rss_mib: float
    fds: int


@dataclass
class Flap:
    killed_at: float  # time.monotonic()
    restarted_at: float | None = None


@dataclass
class Soak:
    args: argparse.Namespace
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    commit: str = field(default_factory=git_commit)  # at the start: what the lbd process runs
    samples: list[Sample] = field(default_factory=list)
    flaps: list[Flap] = field(default_factory=list)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def run(args: argparse.Namespace) -> dict[str, Any]:
    soak = Soak(args)
    config = Path(os.environ.get("TMPDIR", "/tmp")) / f"lbd-soak-{os.getpid()}.toml"
    config.write_text(CONFIG)
    with backend_processes("s1", "s2", "s3") as procs:
        entries = [proc.entry(capacity=1000) for proc in procs]
        with running_lbd(["--config", str(config), "--mode", args.mode], entries) as lbd:
            assert lbd.process is not None
            pid = lbd.process.pid
            time.sleep(1.0)  # the first health round has opened its connections
            fds_before = open_fds(pid)
            rss_before = rss_bytes(pid)
            load = LoadGenerator(
                lbd.port,
                mixed_requests(args.mode),
                connections=args.connections,
                rate=args.rate,
                max_duration_s=args.duration,
                max_requests=int(args.rate * args.duration) + 1,
                keep_all=False,
            )
            with load:
                drive(soak, load, procs[2], pid)
            report = load.report
            wait_until(lambda: lbd.servers()[procs[2].id]["health"] == "healthy", timeout=10)
            print(f"load done; waiting {POOL_IDLE_S + 5} s for idle upstream connections to expire", flush=True)
            time.sleep(POOL_IDLE_S + 5)
            fds_after = open_fds(pid)
            status = lbd.get("/v1/status")
            servers = lbd.servers()
            status["flapper_ejections"] = servers[procs[2].id]["ejections"]
            status["requests_by_server"] = {server_id: server["requests"] for server_id, server in servers.items()}
            log = lbd.log()
    config.unlink(missing_ok=True)
    return summarize(soak, report, status, log, fds_before, fds_after, rss_before)


def drive(soak: Soak, load: LoadGenerator, flapper: BackendProcess, pid: int) -> None:
    """Until the load ends: sample lbd, kill the flapping backend every `flap_every` s, and start it
    again `down` s later."""
    args = soak.args
    start = time.monotonic()
    next_sample = start
    next_kill = start + args.flap_every
    while load.running:
        now = time.monotonic()
        if now >= next_sample:
            soak.samples.append(Sample(round(now - start, 1), rss_bytes(pid) / MIB, open_fds(pid)))
            next_sample += args.sample_every
            last = soak.samples[-1]
            print(
                f"t={last.t:6.1f}s rss={last.rss_mib:6.1f} MiB fds={last.fds:4d} "
                f"requests={load.report.total} failed={len(load.report.results)}",
                flush=True,
            )
        if now >= next_kill and now - start < args.duration - args.down - 2:
            flapper.kill()
            soak.flaps.append(Flap(time.monotonic()))
            next_kill += args.flap_every
        flap = soak.flaps[-1] if soak.flaps else None
        if flap is not None and flap.restarted_at is None and now >= flap.killed_at + args.down:
            flapper.start()
            flap.restarted_at = time.monotonic()
        time.sleep(0.1)
    if not flapper.running:
        flapper.start()


def explained(result: Result, flaps: list[Flap], flapper: str) -> bool:
    """Cut mid-body by a kill: the flapping backend was streaming it when it died."""
    return (
        result.outcome == CUT
        and result.backend == flapper
        and any(result.started < flap.killed_at <= result.ended for flap in flaps)
    )


def summarize(
    soak: Soak,
    report: LoadReport,
    status: dict[str, Any],
    log: str,
    fds_before: int,
    fds_after: int,
    rss_before: int,
) -> dict[str, Any]:
    args = soak.args
    warm = [s for s in soak.samples if s.t >= args.warmup] or soak.samples[-1:]
    rss_warm, rss_end = warm[0].rss_mib, soak.samples[-1].rss_mib
    rss_max = max(s.rss_mib for s in warm)
    failures = report.results  # keep_all=False: only the failures were kept
    unexplained = [r for r in failures if not explained(r, soak.flaps, "s3")]
    log_errors = error_records(log)
    checks = {
        "rss_flat": rss_end - rss_warm <= args.rss_limit_mib,
        "fds_back_to_baseline": fds_after <= fds_before + FD_SLACK,
        "no_unexplained_errors": not unexplained and not log_errors,
    }
    return {
        "started": soak.started,
        "commit": soak.commit,
        "args": vars(args),
        "load": {
            "requests": report.total,
            "seconds": round(report.ended - report.started, 1),
            "rate": round(report.rate, 1),
            "by_outcome": dict(report.counts),
            "connections_opened": report.connections_opened,
            "stale_retries": report.stale_retries,
        },
        "failures": {
            "explained_by_flaps": len(failures) - len(unexplained),
            "unexplained": len(unexplained),
            "unexplained_first": [asdict(r) for r in unexplained[:20]],
            "lbd_log_errors": log_errors[:20],
        },
        "flaps": len(soak.flaps),
        "flapper_ejections": status["flapper_ejections"],  # lbd noticed each flap
        "rss_mib": {
            "before_load": round(rss_before / MIB, 1),
            "after_warmup": round(rss_warm, 1),
            "end": round(rss_end, 1),
            "max_after_warmup": round(rss_max, 1),
            "growth_after_warmup": round(rss_end - rss_warm, 1),
        },
        "fds": {"before_load": fds_before, "max": max(s.fds for s in soak.samples), "after_settle": fds_after},
        "lbd_status": {"requests": status["requests"], "sessions": status.get("sessions")},
        "requests_by_server": status["requests_by_server"],  # attempts forwarded, retries included
        "checks": checks,
        "pass": all(checks.values()),
        "samples": [asdict(s) for s in soak.samples],
    }


def error_records(log: str) -> list[str]:
    """lbd's log records at ERROR level, each whole (a traceback is part of its record)."""
    records: list[str] = []
    for line in log.splitlines():
        if LOG_RECORD.match(line):
            records.append(line)
        elif records:
            records[-1] += "\n" + line
    return [record for record in records if (match := LOG_RECORD.match(record)) and match.group(1) == "ERROR"]


def print_summary(result: dict[str, Any], path: Path) -> None:
    load, rss, fds, failures = result["load"], result["rss_mib"], result["fds"], result["failures"]
    print(f"\nsoak {result['args']['duration']} s, {result['args']['mode']} mode, commit {result['commit']}")
    print(f"  load: {load['requests']} requests in {load['seconds']} s ({load['rate']}/s): {load['by_outcome']}")
    print(f"  forwarded to each server: {result['requests_by_server']}")
    print(
        f"  flaps: {result['flaps']} (s3 ejected {result['flapper_ejections']} times); "
        f"failures explained by them: {failures['explained_by_flaps']}"
    )
    print(f"  unexplained failures: {failures['unexplained']}; ERRORs in lbd's log: {len(failures['lbd_log_errors'])}")
    for record in failures["lbd_log_errors"][:3]:
        print("    " + record.replace("\n", "\n    "))
    print(
        f"  RSS: {rss['before_load']} MiB before load, {rss['after_warmup']} after warm-up, {rss['end']} at the end "
        f"(growth {rss['growth_after_warmup']}), max {rss['max_after_warmup']}"
    )
    print(f"  fds: {fds['before_load']} before load, max {fds['max']}, {fds['after_settle']} after settling")
    for name, ok in result["checks"].items():
        print(f"  {'PASS' if ok else 'FAIL'} {name}")
    print(f"  written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load [600]")
    parser.add_argument("--rate", type=float, default=800.0, help="requests per second [800]")
    parser.add_argument("--connections", type=int, default=32, help="concurrent client connections [32]")
    parser.add_argument("--mode", choices=("static", "dynamic"), default="dynamic")
    parser.add_argument("--flap-every", type=float, default=30.0, help="seconds between kills of backend s3 [30]")
    parser.add_argument("--down", type=float, default=5.0, help="seconds s3 stays down each time [5]")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS/fd samples [5]")
    parser.add_argument("--warmup", type=float, default=None, help="seconds before RSS counts [min(60, duration/4)]")
    parser.add_argument("--rss-limit-mib", type=float, default=8.0, help="allowed RSS growth after warm-up [8]")
    args = parser.parse_args()
    if args.warmup is None:
        args.warmup = min(60.0, args.duration / 4)
    result = run(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print_summary(result, path)
    sys.exit(0 if result["pass"] else 1)


if __name__ == "__main__":
    main()
