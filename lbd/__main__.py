"""`lbd start ...`: resolve the configuration once, then run the daemon in the foreground."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from lbd import logs
from lbd.accesslog_writer import check_target
from lbd.config import ConfigSource
from lbd.daemon import Daemon
from lbd.errors import LbError
from lbd.state import StateStore
from lbd.tls import load_certificates
from lbd.workers.protocol import Boot
from lbd.workers.supervisor import Supervisor
from lbd.workers.worker import run_worker_process

app = typer.Typer(
    name="lbd",
    help="lbd: a region-aware HTTP load balancer daemon.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: value names (not <bool>), 80 columns, greppable
)

EXIT_CONFIG = 2
EXIT_RUNTIME = 1


@app.callback()
def _root() -> None:
    """lbd: a region-aware HTTP load balancer daemon."""


@app.command()
def start(
    config: Annotated[
        Path | None, typer.Option("--config", metavar="FILE", help="TOML config file (flags override its keys).")
    ] = None,
    mode: Annotated[
        str | None, typer.Option("--mode", metavar="static|dynamic", help="Routing mode: static or dynamic.")
    ] = None,
    servers: Annotated[Path | None, typer.Option("--servers", metavar="FILE", help="servers.json seed list.")] = None,
    listen: Annotated[
        str | None,
        typer.Option(
            "--listen", metavar="HOST:PORT|off", help="Proxy address HOST:PORT, or off (TLS only) [127.0.0.1:8080]."
        ),
    ] = None,
    tls_listen: Annotated[
        str | None,
        typer.Option("--tls-listen", metavar="HOST:PORT", help="Also serve HTTPS on HOST:PORT (needs a certificate)."),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option("--tls-cert", metavar="FILE", help="The TLS listener's certificate (PEM, chain leaf first)."),
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option("--tls-key", metavar="FILE", help="The certificate's private key (PEM).")
    ] = None,
    admin_socket: Annotated[
        Path | None,
        typer.Option(
            "--admin-socket",
            metavar="PATH",
            envvar="LBD_SOCKET",
            help="Admin API Unix socket [$XDG_RUNTIME_DIR/lbd.sock, else /tmp/lbd-$UID.sock].",
        ),
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            "--state-dir",
            metavar="DIR",
            help="Where registrations, drain flags, the run-time mode and sessions survive restarts "
            "[$XDG_STATE_HOME/lbd, else ~/.local/state/lbd].",
        ),
    ] = None,
    admin_listen: Annotated[
        str | None,
        typer.Option(
            "--admin-listen",
            metavar="HOST:PORT",
            help="Also serve the admin API (and the seed's /register, /deregister) on TCP HOST:PORT; "
            "needs admin_token in the config or env LBD_ADMIN_TOKEN.",
        ),
    ] = None,
    metrics_listen: Annotated[
        str | None,
        typer.Option(
            "--metrics-listen",
            metavar="HOST:PORT",
            help="Also serve Prometheus GET /metrics (and nothing else) on TCP HOST:PORT; no token needed.",
        ),
    ] = None,
    timeout_base_ms: Annotated[
        int | None,
        typer.Option("--timeout-base-ms", metavar="MS", help="Upstream timeout before region latency [2000]."),
    ] = None,
    shutdown_grace_ms: Annotated[
        int | None,
        typer.Option(
            "--shutdown-grace-ms", metavar="MS", help="How long requests in flight may finish on stop [10000]."
        ),
    ] = None,
    client_id_fallback: Annotated[
        str | None,
        typer.Option(
            "--client-id-fallback",
            metavar="reject|client-ip|cookie",
            help="For a request without client-id: refuse it (400), route by the client's IP address, or "
            "by a cookie lbd issues [reject].",
        ),
    ] = None,
    workers: Annotated[
        str | None,
        typer.Option(
            "--workers",
            metavar="N|auto",
            help="Proxy processes: N, or auto (one per usable CPU) [1]. Above 1 a supervisor runs them.",
        ),
    ] = None,
    cluster: Annotated[
        str | None,
        typer.Option(
            "--cluster",
            metavar="URL",
            help="Share servers, mode and sessions with other lbd instances through this Redis "
            "(redis://HOST:PORT/DB, rediss://..., unix:///PATH).",
        ),
    ] = None,
    access_log: Annotated[
        str | None,
        typer.Option("--access-log", metavar="FILE|-", help="Append one line per request to FILE (-: stdout) [off]."),
    ] = None,
    access_log_format: Annotated[
        str | None,
        typer.Option("--access-log-format", metavar="text|json", help="Access-log lines as text or JSON [text]."),
    ] = None,
    access_log_sample: Annotated[
        float | None,
        typer.Option("--access-log-sample", metavar="F", help="Log this fraction of clients' successful requests [1]."),
    ] = None,
    log_level: Annotated[
        str, typer.Option("--log-level", metavar="debug|info|warning|error", help="What lbd logs to stderr.")
    ] = "info",
    log_format: Annotated[
        str,
        typer.Option("--log-format", metavar="text|json", help="Lines for people, or one JSON object per line."),
    ] = "text",
) -> None:
    """Run the load balancer in the foreground until SIGTERM or SIGINT; SIGHUP reloads the config file."""
    _setup_logging(log_level, log_format)
    overrides: dict[str, Any] = {  # paths from the working directory (the file's are from the file's directory)
        "mode": mode,
        "servers": _absolute(servers),
        "listen": listen,
        "tls.listen": tls_listen,
        "tls.cert": _absolute(tls_cert),
        "tls.key": _absolute(tls_key),
        "admin_socket": _absolute(admin_socket),
        "state_dir": _absolute(state_dir),
        "admin_listen": admin_listen,
        "metrics_listen": metrics_listen,
        "admin_token": os.environ.get("LBD_ADMIN_TOKEN"),
        "timeout_base_ms": timeout_base_ms,
        "shutdown_grace_ms": shutdown_grace_ms,
        "client_id_fallback": client_id_fallback,
        "cluster": cluster,
        "workers": workers,
        "access_log": access_log if access_log in (None, "-") else _absolute(Path(access_log)),
        "access_log_format": access_log_format,
        "access_log_sample": access_log_sample,
    }
    source = ConfigSource(config, overrides)
    try:
        resolved, seed = source.load()
        load_certificates(resolved.tls)  # a bad certificate is a config error (the daemon loads them again)
        if resolved.access_log is not None:  # likewise an access log that cannot be written (opened again)
            check_target(resolved.access_log, create=True)
        store = StateStore(resolved.state_dir)
        store.open()  # locked for the process's life: one daemon per state directory
        persisted = store.load(resolved.regions.server_regions)
    except LbError as exc:
        _fail(str(exc), EXIT_CONFIG)
    try:
        daemon = (
            Daemon(resolved, seed, store, persisted, source)
            if resolved.workers == 1
            else Supervisor(resolved, seed, store, persisted, source, (log_level, log_format))
        )
    except LbError as exc:
        _fail(str(exc), EXIT_CONFIG)
    try:
        _run(daemon)
    except (LbError, OSError) as exc:
        _fail(str(exc), EXIT_RUNTIME)


@app.command("worker", hidden=True)
def worker() -> None:
    """One worker of a supervisor (lbd/workers/): started by `lbd start --workers N`, not by hand."""
    line = sys.stdin.buffer.readline()
    if not line:
        _fail("'lbd worker' is started by 'lbd start --workers N', which sends its configuration", EXIT_CONFIG)
    boot = Boot.parse(line)
    logs.setup(boot.log_level, boot.log_format, worker=boot.index)
    try:
        run_worker_process(boot, _run)
    except (LbError, OSError) as exc:
        _fail(f"worker {boot.index}: {exc}", EXIT_RUNTIME)


@app.command("check-config")
def check_config(
    path: Annotated[
        Path, typer.Argument(metavar="FILE", help="The TOML config file to validate (and the servers file it names).")
    ],
) -> None:
    """Validate a config file without starting anything: prints what it would run, or the first error."""
    try:
        resolved, seed = ConfigSource(path, {"admin_token": os.environ.get("LBD_ADMIN_TOKEN")}).load()
        certificates = load_certificates(resolved.tls)
        if resolved.access_log is not None:
            check_target(resolved.access_log, create=False)
    except LbError as exc:
        _fail(str(exc), EXIT_CONFIG)
    source = f" from {resolved.servers}" if resolved.servers is not None else ""
    tls = ""
    if certificates is not None:
        names = "; ".join(", ".join(c.names) for c in certificates.certificates)
        tls = f", tls listen {resolved.tls.listen} with {len(certificates.certificates)} certificates ({names})"
    listen = resolved.listen or "off"
    cluster = resolved.cluster
    shared = "" if cluster.url is None else f", cluster {cluster.name!r} at {cluster.url}"
    print(f"{path}: ok ({resolved.mode} mode, {len(seed)} servers{source}, listen {listen}{tls}{shared})")


def _absolute(path: Path | None) -> str | None:
    return None if path is None else str(path.absolute())


def _run(daemon: Daemon) -> None:
    try:
        import uvloop  # noqa: PLC0415 - optional: the proxy runs (slower) on the stdlib loop without it
    except ImportError:
        asyncio.run(daemon.run())
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(daemon.run())


def _setup_logging(level: str, log_format: str) -> None:
    if level.lower() not in logs.LEVELS:
        _fail(f"--log-level must be one of {', '.join(logs.LEVELS)}; got {level!r}", EXIT_CONFIG)
    if log_format not in logs.FORMATS:
        _fail(f"--log-format must be one of {', '.join(logs.FORMATS)}; got {log_format!r}", EXIT_CONFIG)
    logs.setup(level, log_format)


def _fail(message: str, code: int) -> NoReturn:
    print(f"lbd: error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
