"""lbd's CPU instructions per proxied request, counted by valgrind's callgrind: the same count for the
same code and traffic whatever else the machine is doing, so two builds compare exactly where
`make bench`'s req/s swing by half from minute to minute.

    .venv/bin/python -m bench.instructions                                  # this checkout's lbd
    .venv/bin/python -m bench.instructions --lbd-cmd OTHER/.venv/bin/lbd    # and another one beside it

One nginx backend answers /tiny; lbd runs under callgrind (static and dynamic mode); after a warm-up,
the counters are zeroed, a fixed number of small GETs go through over keep-alive connections (each
with its own client id, some new and some returning), and the counters are dumped. Prints the
instructions per request of each lbd and mode (all of lbd: Python, uvloop, the compiled modules).
With --tls, each mode also through lbd's TLS listener (keep-alive; the handshakes happen in the
warm-up), as MODE+tls.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shlex
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

from bench.stack import VENV_BIN, Stack, admin, free_port, tool

WARMUP = 300
# Health checks come every interval of wall time, not per request, and under callgrind a run takes a
# minute: at the default 2 s, some 30 checks (aiohttp, interpreted) would add about 2,000 instructions
# to each request, more when the machine is busy. An hour's interval (the first check falls at a
# random point of it) keeps them out of the count.
QUIET_HEALTH = "[health]\ninterval_ms = 3600000\n"


def requests_through(port: int, count: int, clients: int, tls: bool = False) -> None:
    """`count` GET /tiny over 4 keep-alive connections (over TLS with `tls`), client ids cycling over `clients`."""
    if tls:
        unverified = ssl._create_unverified_context()  # the bench's own certificate; only lbd's cost is counted
        connections: list[http.client.HTTPConnection] = [
            http.client.HTTPSConnection("127.0.0.1", port, timeout=60, context=unverified) for _ in range(4)
        ]
    else:
        connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=60) for _ in range(4)]
    try:
        for n in range(count):
            connection = connections[n % len(connections)]
            connection.request("GET", "/tiny", headers={"client-id": f"c{n % clients}", "client-region": "us-east"})
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"request {n}: HTTP {response.status}")
    finally:
        for connection in connections:
            connection.close()


def counted(output: Path) -> int:
    """The total instruction count of a callgrind dump (its `totals:` or `summary:` line)."""
    for line in output.read_text().splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {output}")


def measure(
    stack: Stack,
    command: list[str],
    mode: str,
    count: int,
    clients: int,
    tls: bool = False,
    profile: int = 0,
    extra: tuple[str, ...] = (),
) -> tuple[float, float]:
    """lbd's instructions per request: all of them, and without the deadline wheel's ticks."""
    port = free_port()
    rundir = Path(tempfile.mkdtemp(prefix="instr-", dir=stack.workdir))
    tls_port = free_port()
    config = QUIET_HEALTH
    if tls:
        files = stack.tls_files()
        config += f'[tls]\nlisten = "127.0.0.1:{tls_port}"\ncert = "{files.cert}"\nkey = "{files.key}"\n'
    (rundir / "lbd.toml").write_text(config)
    socket_path = rundir / "lbd.sock"
    out = rundir / "callgrind.out"
    servers = [{"id": "s1", "url": f"http://127.0.0.1:{stack.backend_ports[0]}", "region": "us-east", "capacity": 1000}]
    (rundir / "servers.json").write_text(json.dumps(servers))
    argv = [tool("valgrind"), "--tool=callgrind", f"--callgrind-out-file={out}", *command, "start"]
    argv += ["--listen", f"127.0.0.1:{port}", "--mode", mode, "--admin-socket", str(socket_path)]
    argv += ["--state-dir", str(rundir / "state"), "--servers", str(rundir / "servers.json"), "--log-level", "warning"]
    argv += ["--config", str(rundir / "lbd.toml")]
    argv += [argument.replace("{rundir}", str(rundir)) for argument in extra]
    child = stack.spawn(f"lbd-{mode}", argv, None)
    through = tls_port if tls else port
    try:
        stack.wait_http(child, port, "/tiny", {"client-id": "warmup", "client-region": "us-east"}, timeout_s=120)
        requests_through(through, WARMUP, clients, tls)
        pid = str(child.pid)
        subprocess.run([tool("callgrind_control"), "--zero", pid], check=True, capture_output=True)
        requests_through(through, count, clients, tls)
        before = set(rundir.glob("callgrind.out*"))
        subprocess.run([tool("callgrind_control"), "--dump", pid], check=True, capture_output=True)
        deadline = time.monotonic() + 60
        while not (set(rundir.glob("callgrind.out*")) - before - {out}) and time.monotonic() < deadline:
            time.sleep(0.2)
        dumps = sorted(set(rundir.glob("callgrind.out*")) - before - {out})
        if not dumps:
            raise RuntimeError(f"callgrind wrote no dump:\n{child.tail()}")
        status, _ = admin(socket_path, "GET", "/v1/status")
        if status != 200:
            raise RuntimeError(f"lbd answered {status} after the run")
        listing = annotated(dumps[-1])
        if profile:
            print_profile(listing, profile, count)
        total = counted(dumps[-1])
        return total / count, (total - ticks_counted(listing)) / count
    finally:
        stack.stop(child)


def annotated(dump: Path) -> str:
    """callgrind_annotate's inclusive listing of a dump."""
    return subprocess.run(
        [tool("callgrind_annotate"), "--inclusive=yes", "--threshold=100", str(dump)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip


def ticks_counted(listing: str) -> int:
    """The instructions of the deadline wheel's ticks (`DeadlineWheel._run`, inclusive). They come
    100 times a second, not per request: under callgrind lbd runs some 50 times slower, so they add
    hundreds of instructions to each request, more when the machine is busy."""
    for line in listing.splitlines():  # the costliest first: the first line is the tick's entry
        instructions, _, rest = line.strip().partition(" ")
        if instructions[:1].isdigit() and "DeadlineWheel____run " in rest:
            return int(instructions.replace(",", ""))
    return 0  # interpreted (LB_PURE_PYTHON): no compiled names to find


def print_profile(listing: str, top: int, count: int) -> None:
    """lbd's `top` costliest functions (its compiled modules, and the request parser) by inclusive
    instructions per request (callgrind_annotate), to see where they go."""
    seen: set[str] = set()
    for line in listing.splitlines():
        instructions, _, rest = line.strip().partition(" ")
        name = rest.rsplit(":", 1)[-1].split(" [", 1)[0] if ":" in rest else ""
        if not instructions[:1].isdigit() or name in seen or not name.startswith(("CPyDef_", "llhttp__on_")):
            continue
        seen.add(name)
        print(f"    {int(instructions.replace(',', '')) / count:>10,.0f}  {name.removeprefix('CPyDef_')}")
        if len(seen) == top:
            break


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lbd-cmd", action="append", help="an lbd to measure (repeatable) [.venv/bin/lbd]")
    parser.add_argument("--requests", type=int, default=3000, help="requests counted per lbd and mode [3000]")
    parser.add_argument("--clients", type=int, default=1000, help="distinct client ids [1000]")
    parser.add_argument("--modes", default="static,dynamic")
    parser.add_argument("--tls", action="store_true", help="also through lbd's TLS listener (keep-alive), as MODE+tls")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print lbd's N costliest functions")
    parser.add_argument(
        "--lbd-args",
        default="",
        help="more arguments for lbd start, {rundir} standing for its directory "
        "(e.g. '--access-log {rundir}/access.log --access-log-format json')",
    )
    args = parser.parse_args()
    commands = args.lbd_cmd or [str(VENV_BIN / "lbd")]
    with tempfile.TemporaryDirectory(prefix="lb-instr-") as workdir:
        stack = Stack(Path(workdir), None, None)
        try:
            stack.start_nginx(big_bytes=1, count=1)
            print(f"{'lbd':<50} {'mode':<11} {'instructions/request':>20} {'without ticks':>14}")
            for command in commands:
                for mode in args.modes.split(","):
                    for tls in (False, True) if args.tls else (False,):
                        per_request, untimed = measure(
                            stack, shlex.split(command), mode, args.requests, args.clients, tls, args.profile,
                            tuple(shlex.split(args.lbd_args)),
                        )  # fmt: skip
                        shown = f"{mode}+tls" if tls else mode
                        print(f"{command:<50} {shown:<11} {per_request:>20,.0f} {untimed:>14,.0f}", flush=True)
        finally:
            stack.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
