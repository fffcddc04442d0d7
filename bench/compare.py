"""`make bench`: lbd against HAProxy and nginx straight, in one run on loopback (issue #6).

    .venv/bin/python -m bench.compare                  # every row, 5 rounds of 3 s (about 6 minutes)
    .venv/bin/python -m bench.compare --quick          # a smoke run: 1 round of 3 s
    .venv/bin/python -m bench.compare --only haproxy,lbd-static --responses tiny --conns 64

Three nginx backends (one worker) and wrk run on CPU 1, the proxies under test on CPU 0, one at a
time under load. Rows are measured in interleaved rounds: every proxy once per round, back to back;
a row keeps its median round, and a ratio to HAProxy is the median of the rounds' ratios. Every
row sends the same requests (bench/wrk/clients.lua: 10,000 client ids with fixed regions), so
HAProxy's and lbd's hashing and lbd's sticky sessions see the same mix; except the two lbd-new
rows (tiny responses only): lbd static sending a client id never seen before on every request,
with 3 servers and with 1,000 (the 1,000 spread over the same three backends, health checks once a
minute in both), to show what a new client's pick costs as the server count grows. lbd-static-log is
lbd static writing every request to a JSON access log (`--access-log FILE --access-log-format json`,
the file emptied after each run), judged against lbd-static in the same rounds. After the rows, a fresh lbd
(static) holds many idle keep-alive connections, then streams a large body each way, with its RSS
measured. Prints one table and the targets' verdicts, and writes the same as JSON under
bench/results/. Exit 0 when everything ran (FAILs included; --strict makes a FAIL exit 1), 1 when a
row or check could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from types import FrameType

from bench import memcheck
from bench.loadgen import run_observed, run_wrk
from bench.report import Row, machine, memory_text, memory_verdicts, row_dict, table, targets_text, verdicts
from bench.stack import (
    CAPACITY,
    VENV_BIN,
    Child,
    Stack,
    StartError,
    client_routed_to,
    haproxy_stats,
    lbd_access_log,
    lbd_stats,
)

PROXIES = (
    "direct", "haproxy", "lbd-static", "lbd-static-log", "lbd-dynamic", "lbd-cluster", "lbd-new-3", "lbd-new-1000",
    "haproxy-tls", "lbd-tls",
)  # fmt: skip
# lbd static with every request in a JSON access log (a file in the run's directory, emptied after each
# measured run so a long run does not fill the disk)
ACCESS_LOG_ROWS = ("lbd-static-log",)
NEW_CLIENT_ROWS = {"lbd-new-3": 3, "lbd-new-1000": 1000}  # static, a new client id per request: servers
# Their health checks run once a minute: at the default 2 s, checking 1,000 servers takes about a fifth
# of the proxy CPU all run long, beside every other row, and is not what these rows measure.
NEW_CLIENT_CONFIG = "[health]\ninterval_ms = 60000\n"
PHASES = (*PROXIES, "memory")
# "handshake": GET /tiny with Connection: close, so every request opens a new connection (measured on the
# TLS rows only, where that is a full handshake each: neither proxy resumes sessions here)
PATHS = {"tiny": "/tiny", "64k": "/64k", "handshake": "/tiny"}
TLS_PROXIES = ("haproxy-tls", "lbd-tls")  # the same ECDSA P-256 certificate; tiny over keep-alive, and handshakes
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, 2,000 idle clients, 256 MiB streams")
    parser.add_argument("--duration", type=float, help="seconds per measured run [3]")
    parser.add_argument("--repeat", type=int, help="interleaved rounds, one measured run per row each [5; --quick 1]")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up before each measured run [1]")
    parser.add_argument("--only", default=",".join(PHASES), help=f"comma-separated phases to run [{','.join(PHASES)}]")
    parser.add_argument(
        "--responses", default="tiny,64k,handshake", help="comma-separated: tiny, 64k, handshake (TLS rows) [all]"
    )
    parser.add_argument("--conns", default="64,8", help="comma-separated wrk connection counts [64,8]")
    parser.add_argument("--idle-connections", type=int, help="idle keep-alive clients held open [10000; --quick 2000]")
    parser.add_argument("--stream-mib", type=int, help="body streamed each way through lbd [1024; --quick 256]")
    parser.add_argument("--proxy-cpu", type=int, default=0, help="CPU of the proxy under test [0]")
    parser.add_argument("--load-cpu", type=int, default=1, help="CPU of wrk, nginx and this script [1]")
    parser.add_argument("--no-pin", action="store_true", help="no CPU pinning (automatic on fewer than 2 CPUs)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target FAILs")
    parser.add_argument("--note", default="", help="free text saved with the results (e.g. 'machine busy')")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--lbd-cmd", default=str(VENV_BIN / "lbd"), help="command that runs lbd [.venv/bin/lbd]")
    parser.add_argument(
        "--base-lbd-cmd",
        help="also measure this lbd (e.g. another checkout's .venv/bin/lbd) as rows base-static and base-dynamic, "
        "interleaved with the others: a change's effect measured in one run",
    )
    parser.add_argument("--lbd-config", type=Path, help="a config file for every lbd (--config), e.g. [health]")
    args = parser.parse_args(argv)
    args.duration = args.duration or 3.0
    args.warmup = args.warmup if args.warmup is not None else 1.0
    args.idle_connections = args.idle_connections or (2000 if args.quick else 10_000)
    args.stream_mib = args.stream_mib or (256 if args.quick else 1024)
    args.repeat = max(1, args.repeat or (1 if args.quick else 5))
    args.phases = split(args.only, PHASES, "--only")
    if args.base_lbd_cmd:
        # the other build's plain rows only: its flags and config keys may differ from this one's
        args.phases += [f"base-{mode}" for mode in ("static", "dynamic") if f"lbd-{mode}" in args.phases]
    args.response_list = split(args.responses, tuple(PATHS), "--responses")
    args.conn_list = [int(value) for value in args.conns.split(",") if value]
    return args


def split(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    chosen = [item.strip() for item in value.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in allowed]
    if unknown:
        raise SystemExit(f"{flag}: unknown {', '.join(unknown)} (choose from {', '.join(allowed)})")
    return [item for item in allowed if item in chosen]  # the canonical order: direct first, memory last


def prepare_process(args: argparse.Namespace) -> None:
    """Enough descriptors for 10,000 clients (children inherit the limit); SIGTERM unwinds like Ctrl-C."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.idle_connections + 1000:
        print(f"warning: RLIMIT_NOFILE hard limit {hard} is low for {args.idle_connections} connections")
    if args.no_pin or (os.cpu_count() or 1) < 2:
        args.proxy_cpu = args.load_cpu = None
    else:
        os.sched_setaffinity(0, {args.load_cpu})  # the memory checks' client stays off the proxy's CPU

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)


Running = tuple[Child | None, int, Path | None]  # a started proxy: its process, port and stats/admin socket


@contextlib.contextmanager
def proxy(stack: Stack, name: str) -> Iterator[Running]:
    """A proxy under test (with its stats or admin socket), started for the rounds and stopped after them.

    `direct` is the first nginx backend itself.
    """
    if name == "direct":
        yield None, stack.backend_ports[0], None
        return
    if name == "haproxy":
        child, port, socket_path = stack.start_haproxy()
    elif name == "haproxy-tls":
        child, port, socket_path = stack.start_haproxy(tls=True)
    elif name == "lbd-tls":
        child, port, socket_path = stack.start_lbd_tls()
    elif name.startswith("base-"):
        child, port, socket_path = stack.start_lbd(name.removeprefix("base-"), command=stack.base_lbd_command)
    elif name == "lbd-cluster":  # dynamic mode, its state shared through a Redis of its own
        store, url = stack.start_redis()
        try:
            child, port, socket_path = stack.start_lbd("dynamic", name=name, cluster=url)
        except StartError:
            stack.stop(store)
            raise
        try:
            yield child, port, socket_path
        finally:
            stack.stop(child)
            stack.stop(store)
        return
    elif name in ACCESS_LOG_ROWS:
        log_args = ["--access-log", str(access_log_path(stack, name)), "--access-log-format", "json"]
        child, port, socket_path = stack.start_lbd("static", name=name, args=log_args)
    elif name in NEW_CLIENT_ROWS:
        child, port, socket_path = stack.start_lbd(
            "static", servers=NEW_CLIENT_ROWS[name], name=name, config=NEW_CLIENT_CONFIG
        )
    else:
        child, port, socket_path = stack.start_lbd(name.removeprefix("lbd-"))
    try:
        yield child, port, socket_path
    finally:
        stack.stop(child)


def access_log_path(stack: Stack, name: str) -> Path:
    return stack.workdir / f"{name}.access.log"


def measure_once(args: argparse.Namespace, row: Row, running: Running) -> None:
    """One round of `row`: a warm-up run, then the measured one. A dead proxy or a failed wrk becomes
    the row's failure (its later rounds are skipped)."""
    child, port, _ = running
    url = f"{'https' if row.proxy in TLS_PROXIES else 'http'}://127.0.0.1:{port}"
    try:
        if child is not None:
            child.check_alive()
        new, close = row.proxy in NEW_CLIENT_ROWS, row.response == "handshake"
        if args.warmup > 0:
            run_wrk(url, PATHS[row.response], row.conns, args.warmup, args.load_cpu, new, close)
        pid = child.pid if child is not None else None
        load = run_observed(url, PATHS[row.response], row.conns, args.duration, args.load_cpu, pid, new, close)
        row.rounds.append(load)
        if child is not None:
            child.check_alive()
    except (StartError, RuntimeError, OSError) as error:
        row.failure = str(error).splitlines()[0]
        print(f"\n  {row.proxy} {row.response} c{row.conns}: {error}", file=sys.stderr)


def run_rows(args: argparse.Namespace, stack: Stack) -> tuple[list[Row], dict[str, object]]:
    """Every selected proxy's rows, measured in interleaved rounds, and what each proxy counted.

    All proxies run at once (idle ones cost nothing), and each round measures every proxy back to
    back, in an order rotated between rounds: a ratio then compares runs made seconds apart, not
    minutes, so drift of a shared machine cancels out of it.
    """
    names = [phase for phase in args.phases if phase in PROXIES or phase.startswith("base-")]
    plan = [(response, conns) for response in args.response_list for conns in args.conn_list]
    rows = {
        (name, response, conns): Row(name, response, conns)
        for name in names
        for response, conns in plan
        if measured(name, response)
    }
    counted: dict[str, object] = {}
    with contextlib.ExitStack() as started:
        running: dict[str, Running] = {}
        for name in names:
            try:
                running[name] = started.enter_context(proxy(stack, name))
            except StartError as error:
                print(f"  {name}: {error}", file=sys.stderr)
                for key, row in rows.items():
                    if key[0] == name:
                        row.failure = str(error).splitlines()[0]
        for response, conns in plan:
            if not any((name, response, conns) in rows for name in running):
                continue  # no proxy measures it (e.g. 64k with only the TLS rows)
            for round_index in range(args.repeat):
                order = rotated(list(running), round_index)
                print(f"  {response:<5} c{conns:<3} round {round_index + 1}/{args.repeat}:", end="", flush=True)
                for name in order:
                    row = rows.get((name, response, conns))
                    if row is not None and row.failure is None:
                        measure_once(args, row, running[name])
                        if name in ACCESS_LOG_ROWS:
                            os.truncate(access_log_path(stack, name), 0)  # the writer appends at the new end
                        done = f"{row.rounds[-1].rps:,.0f}" if row.failure is None else "failed"
                        print(f"  {name} {done}", end="", flush=True)
                print(flush=True)
        for name, (child, _, socket_path) in running.items():
            if socket_path is not None and child is not None and child.process.poll() is None:
                stats = haproxy_stats(socket_path) if name.startswith("haproxy") else lbd_stats(socket_path)
                if name in ACCESS_LOG_ROWS:
                    stats["access_log"] = lbd_access_log(socket_path)
                counted[name] = stats
                print(f"  {name} counted: {stats_line(stats)}", flush=True)
    return list(rows.values()), counted


def measured(name: str, response: str) -> bool:
    """Which responses a proxy's rows measure: the new-client rows measure routing (tiny only), the TLS
    rows tiny over keep-alive and handshakes, the others tiny and 64k."""
    if name in NEW_CLIENT_ROWS:
        return response == "tiny"
    if name in TLS_PROXIES:
        return response in ("tiny", "handshake")
    return response != "handshake"


def rotated(names: list[str], turn: int) -> list[str]:
    """`names` starting from the turn-th: no proxy always runs first (or right after another)."""
    if not names:
        return names
    turn %= len(names)
    return names[turn:] + names[:turn]


def stats_line(stats: dict[str, object]) -> str:
    """The proxy's own counters in one line: did the traffic spread over the backends (and stick, for lbd)?"""
    requests, per_server = stats.get("requests"), stats.get("per_server")
    if not isinstance(requests, dict) or not isinstance(per_server, dict):
        return "unavailable"
    classes = ", ".join(f"{name} {count:,}" for name, count in requests["responses"].items() if count)
    servers = ", ".join(f"{name} {count:,}" for name, count in per_server.items())
    if len(per_server) > 12:  # the lbd-new-1000 row: how even, not each of them
        counts = sorted(per_server.values())
        servers = f"{len(counts)} servers, {counts[0]:,} to {counts[-1]:,} (median {counts[len(counts) // 2]:,})"
    sessions = f"; sessions {stats['sessions']:,}" if isinstance(stats.get("sessions"), int) else ""
    logged = stats.get("access_log")
    lines = f"; access log {logged['lines']:,} lines, {logged['dropped']:,} dropped" if isinstance(logged, dict) else ""
    return f"{requests['total']:,} requests ({classes}); per server: {servers}{sessions}{lines}"


def run_memory(args: argparse.Namespace, stack: Stack) -> dict[str, object]:
    """Idle connections, then a download (nginx) and an upload (bench/sink.py) on a fresh lbd (static).

    The sink is one more server of that lbd; GET /v1/route picks client ids hashed to each backend.
    A check that cannot run is recorded as a string saying why; the other checks still run.
    """
    size = args.stream_mib << 20
    timeout_s = max(60.0, args.stream_mib / 10)  # 10 MiB/s at the very least
    memory: dict[str, object] = {"stream_bytes": size}
    try:
        sink, sink_port = stack.start_sink()
        sink_server = {"id": "sink", "url": f"http://127.0.0.1:{sink_port}", "region": "us-east", "capacity": CAPACITY}
        child, port, socket_path = stack.start_lbd("static", extra=[sink_server])
        to_nginx, to_sink = client_routed_to(socket_path, "s1"), client_routed_to(socket_path, "sink")
    except (StartError, OSError) as error:
        memory["failure"] = f"failed to start: {error}".splitlines()[0]
        return memory
    checks = (
        ("idle", partial(memcheck.idle_connections, port, child.pid, socket_path, to_nginx, args.idle_connections)),
        ("download", partial(memcheck.stream_download, port, child.pid, to_nginx, size)),
        ("upload", partial(memcheck.stream_upload, port, child.pid, to_sink, size)),
    )
    labels = {"idle": f"{args.idle_connections:,} idle keep-alive connections", "download": "", "upload": ""}
    try:
        for key, check in checks:
            print(f"  memory: {labels[key] or f'{args.stream_mib} MiB {key}'} ...", flush=True)
            try:
                child.check_alive()
                memory[key] = check(timeout_s)
            except (StartError, OSError) as error:  # OSError includes timeouts and cut connections
                memory[key] = f"failed: {type(error).__name__}: {error}".splitlines()[0]
                print(f"  memory: {memory[key]}", file=sys.stderr)
    finally:
        stack.stop(child)
        stack.stop(sink)
    memory["verdicts"] = memory_verdicts(memory)
    return memory


def build_report(
    args: argparse.Namespace,
    where: dict[str, object],
    rows: list[Row],
    targets: list[dict[str, object]],
    memory: dict[str, object] | None,
) -> dict[str, object]:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join([os.path.relpath(sys.executable), *sys.argv]),
        "note": args.note,
        "machine": where,
        "setup": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "rounds": args.repeat,
            "proxy_cpu": args.proxy_cpu,
            "load_cpu": args.load_cpu,
            "lbd_command": args.lbd_cmd,
            "base_lbd_command": args.base_lbd_cmd,
            "lbd_config": None if args.lbd_config is None else str(args.lbd_config),
            "wrk": "-t1 --latency -s bench/wrk/clients.lua (10,000 client ids, 7 client regions)",
            "backends": "3 server blocks of one nginx (1 worker), /tiny = 3 bytes, /64k = 65536 bytes",
        },
        "rows": [row_dict(row, rows) for row in rows],
        "targets": targets,
        "memory": memory,
    }


def save(report: dict[str, object], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path = directory / f"{stamp}.json"
    text = json.dumps(report, indent=2) + "\n"
    path.write_text(text)
    (directory / "latest.json").write_text(text)
    return path


def main() -> int:
    args = parse_args()
    prepare_process(args)
    where = machine()  # before the run: the lbd commit measured, not one made meanwhile
    workdir = Path(tempfile.mkdtemp(prefix="lbbench-"))
    stack = Stack(workdir, args.proxy_cpu, args.load_cpu, shlex.split(args.lbd_cmd), args.lbd_config)
    stack.base_lbd_command = shlex.split(args.base_lbd_cmd or "")
    rows: list[Row] = []
    counted: dict[str, object] = {}
    memory = None
    started = time.monotonic()
    try:
        stack.start_nginx(args.stream_mib << 20)
        rows, counted = run_rows(args, stack)
        if "memory" in args.phases:
            memory = run_memory(args, stack)
    except StartError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench: interrupted; every child stopped, nothing saved", file=sys.stderr)
        return 130
    finally:
        stack.close()
        shutil.rmtree(workdir, ignore_errors=True)
    targets = verdicts(rows)
    report = build_report(args, where, rows, targets, memory) | {"lbd_counted": counted}
    print(f"\n{table(report)}\n\n{targets_text(report)}\n\n{memory_text(report)}\n")
    print(f"saved {save(report, args.results_dir)} ({time.monotonic() - started:.0f} s)")
    memory_results = memory_verdicts(memory) if memory else []
    failed = any(v["verdict"] == "FAIL" for v in [*targets, *memory_results])
    failed_to_run = any(row.failure for row in rows) or any(isinstance(v, str) for v in (memory or {}).values())
    return 1 if failed_to_run or (args.strict and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
