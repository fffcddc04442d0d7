"""lbctl: inspect and drive a running lbd through its admin Unix socket.

Each command is parse -> one client call -> render (`status --watch`: the same, once per refresh);
errors end here as one line on stderr and an exit code a script can branch on:

    0  ok
    1  lbd reported an error (or lbctl failed unexpectedly)
    2  usage error
    3  lbd is not reachable on the admin socket
    4  not found (no such server or session)
    5  conflict with the daemon's current state
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator
from enum import StrEnum
from operator import itemgetter
from pathlib import Path
from typing import Annotated, NoReturn
from urllib.parse import quote, urlencode

import typer

from lbctl import views
from lbctl.client import ApiError, Client, DaemonUnreachable, PermissionDenied
from lbctl.output import print_error, show, show_text, waiting, watch
from lbctl.watch import Frame, Sample, frame
from lbd.config import MODES, default_admin_socket

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_NOT_FOUND = 4
EXIT_CONFLICT = 5
EXIT_CODES_BY_ERROR_CODE = {
    "server_not_found": EXIT_NOT_FOUND,
    "session_not_found": EXIT_NOT_FOUND,
    "not_found": EXIT_NOT_FOUND,
    "conflict": EXIT_CONFLICT,
    "no_config_file": EXIT_CONFLICT,
}
# `status --watch` refreshes at least once a second unless told otherwise.
WATCH_INTERVAL_S = 1.0
# lbd answers DELETE /v1/servers/{id} once the server's requests in flight are done or its drain
# grace (drain_grace_ms, 30 s by default) is over; wait well past that before calling lbd gone.
REMOVE_TIMEOUT_S = 300.0
EPILOG = "Exit codes: 0 ok, 1 error reported by lbd, 2 usage error, 3 lbd not reachable, 4 not found, 5 conflict."

app = typer.Typer(
    help="Inspect and drive a running lbd through its admin socket.",
    epilog=EPILOG,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print the admin API's JSON instead of a table.")]
ServerIdArg = Annotated[str, typer.Argument(metavar="ID", help="The server's id, as `lbctl servers` lists it.")]


class UsageProblem(Exception):
    """A usage error lbctl finds beyond what Typer checks; reported as one line, exit 2."""


# The daemon's mode names, as a choice Typer validates (a typo is a usage error, exit 2).
Mode = StrEnum("Mode", {mode.upper(): mode for mode in MODES})  # type: ignore[misc]


@app.callback()
def root(
    ctx: typer.Context,
    socket_path: Annotated[
        Path | None,
        typer.Option(
            "--socket",
            envvar="LBD_SOCKET",
            metavar="PATH",
            show_default=False,
            readable=False,  # a socket lbctl may not use is the client's to explain (one line, exit 3)
            help="lbd's admin socket (default: $XDG_RUNTIME_DIR/lbd.sock, else /tmp/lbd-$UID.sock).",
        ),
    ] = None,
) -> None:
    # Same default as `lbd start`, so both find each other with no flags at all.
    ctx.obj = Client(socket_path or default_admin_socket())


@app.command()
def status(
    ctx: typer.Context,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print the admin API's JSON (with --watch: one JSON object per line per refresh)."),
    ] = False,
    watch_: Annotated[
        bool,
        typer.Option("--watch", help="Keep refreshing: a live full-screen view with rates, servers and sessions."),
    ] = False,
    interval: Annotated[
        float | None,
        typer.Option(
            "--interval",
            metavar="S",
            show_default=False,
            help=f"With --watch: seconds between refreshes, any number above 0 (default {WATCH_INTERVAL_S:g}).",
        ),
    ] = None,
    count: Annotated[
        int | None,
        typer.Option("--count", metavar="N", show_default=False, help="With --watch: stop after N refreshes."),
    ] = None,
) -> None:
    """Show lbd's mode, listeners, uptime, server health and traffic counters (--watch: live)."""
    if not watch_:
        if interval is not None or count is not None:
            raise UsageProblem("--interval and --count only apply with --watch")
        show(_client(ctx).get("/v1/status"), as_json, views.status_panel)
        return
    if interval is not None and not (math.isfinite(interval) and interval > 0):
        raise UsageProblem(f"--interval must be a number of seconds above 0; got {interval:g}")
    if count is not None and count < 1:
        raise UsageProblem(f"--count must be at least 1; got {count}")
    frames = _watch_frames(_client(ctx), WATCH_INTERVAL_S if interval is None else interval, count)
    watch(
        frames,
        as_json,
        lambda f: views.dashboard(f.sample.status, f.sample.servers, f.sample.sessions, f.rates),
        json_of=Frame.to_json,
    )


@app.command()
def route(
    ctx: typer.Context,
    client_id: Annotated[
        str, typer.Argument(metavar="CLIENT_ID", help="The client, as its client-id header names it.")
    ],
    region: Annotated[
        str | None,
        typer.Option(
            "--region",
            metavar="REGION",
            help="The client's region, as its client-region header would say (dynamic mode).",
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Show which server lbd would pick for a client now and why, with the ranked candidates; sends nothing.

    Reasons: hash, hash_next (static); sticky, best_in_region, fallback_region, backup_nearly_full, moved (dynamic).
    """
    if not client_id:
        raise UsageProblem("CLIENT_ID must not be empty")
    answer = _client(ctx).get(f"/v1/route/{_segment(client_id)}{_query(region=region)}")
    show(answer, as_json, views.route_decision)


@app.command()
def servers(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List the servers lbd balances across, with health and load (--json: the list itself)."""
    show(_client(ctx).get("/v1/servers")["servers"], as_json, views.servers_table)


@app.command()
def server(ctx: typer.Context, server_id: ServerIdArg, as_json: JsonFlag = False) -> None:
    """Show one server in detail (exit 4 when lbd has no server with that id)."""
    show(_client(ctx).get(f"/v1/servers/{_segment(server_id)}"), as_json, views.server_panel)


@app.command()
def register(
    ctx: typer.Context,
    server_id: Annotated[str | None, typer.Option("--id", metavar="ID", help="The new server's id.")] = None,
    url: Annotated[
        str | None, typer.Option("--url", metavar="URL", help="Its base URL: http://HOST:PORT or https://HOST:PORT.")
    ] = None,
    region: Annotated[str | None, typer.Option("--region", metavar="REGION", help="Its region, e.g. us-east.")] = None,
    capacity: Annotated[
        int | None, typer.Option("--capacity", metavar="N", help="Requests it takes at once; also its weight.")
    ] = None,
    from_file: Annotated[
        Path | None,
        typer.Option(
            "--from-file",
            metavar="PATH",
            help="Instead of the flags: a JSON file in servers.json's format, a list or one object ('-' for stdin).",
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Add servers to a running lbd: one from the flags, or every entry of a file, all or nothing.

    Registering a server again with the same fields changes nothing; the same id with other fields is a conflict.
    """
    flags = {"--id": server_id, "--url": url, "--region": region, "--capacity": capacity}
    show(_client(ctx).post("/v1/servers", _registration(flags, from_file)), as_json, views.registration)


@app.command()
def deregister(
    ctx: typer.Context,
    server_id: ServerIdArg,
    now: Annotated[
        bool, typer.Option("--now", help="Remove at once, without waiting for its requests in flight.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Remove a server: drain it, wait for its requests in flight (up to lbd's drain grace), remove it."""
    path = f"/v1/servers/{_segment(server_id)}" + ("?now=1" if now else "")
    with waiting(f"draining {server_id}, waiting for its requests in flight"):
        answer = _client(ctx).delete(path, timeout=REMOVE_TIMEOUT_S)
    show(answer, as_json, views.removal)


@app.command()
def drain(ctx: typer.Context, server_id: ServerIdArg, as_json: JsonFlag = False) -> None:
    """Take a server out of rotation: no new clients; its requests in flight finish."""
    show(_client(ctx).post(f"/v1/servers/{_segment(server_id)}/drain"), as_json, views.drain_state)


@app.command()
def undrain(ctx: typer.Context, server_id: ServerIdArg, as_json: JsonFlag = False) -> None:
    """Put a drained server back in rotation."""
    show(_client(ctx).post(f"/v1/servers/{_segment(server_id)}/undrain"), as_json, views.drain_state)


@app.command()
def mode(
    ctx: typer.Context,
    new_mode: Annotated[
        Mode | None,
        typer.Argument(metavar="MODE", help="Switch lbd to this mode.", show_default=False),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Print lbd's balancing mode, or switch it (static: by capacity; dynamic: by client region and load)."""
    client = _client(ctx)
    answer = client.get("/v1/mode") if new_mode is None else client.put("/v1/mode", {"mode": new_mode.value})
    show(answer, as_json, views.mode_line)


sessions_app = typer.Typer(context_settings={"help_option_names": ["-h", "--help"]})
app.add_typer(sessions_app, name="sessions")


@sessions_app.callback(invoke_without_command=True)
def sessions(
    ctx: typer.Context,
    server: Annotated[str | None, typer.Option("--server", metavar="ID", help="Only sessions on this server.")] = None,
    region: Annotated[
        str | None, typer.Option("--region", metavar="REGION", help="Only clients from this region.")
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", metavar="N", min=1, help="At most N sessions (lbd's default: 1000).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """List sticky sessions, most recently active first (--json: the list itself); `clear` forgets them."""
    if ctx.invoked_subcommand is not None:
        return
    query = _query(server=server, region=region, limit=limit)
    show(_client(ctx).get(f"/v1/sessions{query}"), as_json, views.sessions_table, json_of=itemgetter("sessions"))


@sessions_app.command("clear")
def sessions_clear(
    ctx: typer.Context,
    client_id: Annotated[
        str | None, typer.Argument(metavar="CLIENT_ID", help="The client whose session to forget.", show_default=False)
    ] = None,
    server: Annotated[
        str | None, typer.Option("--server", metavar="ID", help="Instead: forget every session on this server.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Forget one client's session, or every session on a server; their next requests are routed afresh."""
    if bool(client_id) == bool(server):
        raise UsageProblem("sessions clear takes exactly one of CLIENT_ID or --server ID")
    client = _client(ctx)
    if client_id:
        answer = client.delete(f"/v1/sessions/{_segment(client_id)}")
    else:
        answer = client.delete(f"/v1/sessions{_query(server=server)}")
    show(answer, as_json, views.sessions_cleared)


@app.command()
def reload(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Make lbd re-read its config file and apply the changes live, dropping no connection; prints what changed.

    An invalid file changes nothing (exit 1, its error on one line); so does a change to a key bound at start
    (listen, admin_socket, admin_listen, metrics_listen, state_dir), which needs a restart.
    """
    show(_client(ctx).post("/v1/reload"), as_json, views.reload_report)


config_app = typer.Typer(
    help="The running lbd's configuration.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(config_app, name="config")


@config_app.command("dump")
def config_dump(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Print lbd's effective configuration as TOML that `lbd start --config` accepts back unchanged.

    The admin token is never shown; give it with env LBD_ADMIN_TOKEN when starting from the dump.
    """
    show_text(_client(ctx).get("/v1/config"), as_json, views.config_toml)


def _watch_frames(client: Client, interval: float, count: int | None) -> Iterator[Frame]:
    """One frame per `interval` seconds (on a fixed beat: slow answers do not add up), `count` at most."""
    previous: Sample | None = None
    due = time.monotonic()
    taken = 0
    while count is None or taken < count:
        if taken:
            due += interval
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                due = time.monotonic()  # behind (a slow lbd): start the beat again from now
        sample = _sample(client)
        yield frame(previous, sample)
        previous = sample
        taken += 1


def _sample(client: Client) -> Sample:
    started = time.monotonic()
    now = time.time()
    status = client.get("/v1/status")
    servers = client.get("/v1/servers")["servers"]
    try:
        sessions = client.get("/v1/sessions/summary")
    except ApiError as exc:
        if exc.status not in (404, 405):  # an lbd from before the summary: show it as unavailable
            raise
        sessions = None
    return Sample(started, now, status, servers, sessions)


def _client(ctx: typer.Context) -> Client:
    client = ctx.obj
    assert isinstance(client, Client)
    return client


def _segment(value: str) -> str:
    """One path segment: an id with `/` or `?` in it stays one id."""
    return quote(value, safe="")


def _query(**params: str | int | None) -> str:
    """`?a=1&b=x` from the parameters that are set, or "" when none is."""
    given = {name: value for name, value in params.items() if value is not None}
    return f"?{urlencode(given)}" if given else ""


def _registration(flags: dict[str, str | int | None], from_file: Path | None) -> object:
    """The POST /v1/servers body: the file's JSON as is, or one object from the flags."""
    given = [flag for flag, value in flags.items() if value is not None]
    if from_file is not None:
        if given:
            raise UsageProblem(f"--from-file cannot be combined with {', '.join(given)}")
        return _read_json(from_file)
    missing = [flag for flag, value in flags.items() if value is None]
    if missing:
        raise UsageProblem(f"register needs {', '.join(missing)} (or --from-file PATH); see 'lbctl register -h'")
    return {flag.removeprefix("--"): value for flag, value in flags.items()}


def _read_json(path: Path) -> object:
    """A JSON file's content, or a usage error naming the file and what is wrong with it."""
    stdin = str(path) == "-"
    name = "stdin" if stdin else str(path)
    try:
        text = sys.stdin.read() if stdin else path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageProblem(f"cannot read {name}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageProblem(f"cannot read {name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageProblem(f"{name} is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


def main() -> None:
    """Run the app; turn every error into one stderr line and its exit code, never a traceback."""
    try:
        app(prog_name="lbctl")
    except UsageProblem as exc:
        _fail(str(exc), EXIT_USAGE)
    except PermissionDenied as exc:
        _fail(str(exc), EXIT_UNREACHABLE)
    except DaemonUnreachable as exc:
        _fail(f"{exc}; is lbd running? start it with 'lbd start' or pass --socket", EXIT_UNREACHABLE)
    except ApiError as exc:
        _fail(exc.message, EXIT_CODES_BY_ERROR_CODE.get(exc.code, EXIT_ERROR))
    except Exception as exc:
        _fail(f"unexpected {type(exc).__name__}: {exc}", EXIT_ERROR)


def _fail(message: str, code: int) -> NoReturn:
    print_error(message)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
