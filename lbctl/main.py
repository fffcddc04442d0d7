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
from collections.abc import Callable, Iterator
from enum import StrEnum
from operator import itemgetter
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import quote, urlencode

import typer
from rich.console import Group, RenderableType

from lbctl import suggest, views
from lbctl.client import ApiError, Client, DaemonUnreachable, PermissionDenied
from lbctl.output import print_error, print_note, show, show_text, waiting, watch
from lbctl.watch import Frame, Sample, frame
from lbd import __version__
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
    "needs_cluster": EXIT_CONFLICT,
}
# `status --watch` refreshes at least once a second unless told otherwise.
WATCH_INTERVAL_S = 1.0
# lbd answers DELETE /v1/servers/{id} once the server's requests in flight are done or its drain
# grace (drain_grace_ms, 30 s by default) is over; wait well past that before calling lbd gone.
REMOVE_TIMEOUT_S = 300.0
EPILOG = "\b\nExit codes: 0 ok, 1 error reported by lbd, 2 usage error,\n3 lbd not reachable, 4 not found, 5 conflict."

app = typer.Typer(
    help="Inspect and drive a running lbd through its admin socket.",
    epilog=EPILOG,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,  # plain help: value names (not <bool>), 80 columns, greppable
)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print the admin API's JSON instead of a table.")]
ServerIdArg = Annotated[
    str,
    typer.Argument(
        metavar="ID", help="The server's id, as `lbctl servers` lists it.", autocompletion=suggest.server_ids
    ),
]
ServerIdsArg = Annotated[
    list[str],
    typer.Argument(
        metavar="ID...",
        help="One or more server ids, as `lbctl servers` lists them.",
        autocompletion=suggest.server_ids,
    ),
]


class UsageProblem(Exception):
    """A usage error lbctl finds beyond what Typer checks; reported as one line, exit 2."""


# The daemon's mode names, as a choice Typer validates (a typo is a usage error, exit 2).
Mode = StrEnum("Mode", {mode.upper(): mode for mode in MODES})  # type: ignore[misc]


def _version(shown: bool) -> None:
    if shown:
        print(f"lbctl {__version__}")
        raise typer.Exit()


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
    version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_version, help="Print lbctl's version."),
    ] = False,
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
    """Show lbd's mode, listeners, uptime, server health and traffic counters (--watch: live).

    Example: lbctl status --watch --interval 0.5
    """
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
            autocompletion=suggest.client_regions,
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Show which server lbd would pick for a client now and why, with the ranked candidates; sends nothing.

    Reasons: hash, hash_next (static); sticky, best_in_region, fallback_region, backup_nearly_full, moved (dynamic).

    Example: lbctl route alice --region eu-west
    """
    if not client_id:
        raise UsageProblem("CLIENT_ID must not be empty")
    client = _client(ctx)
    try:
        answer = client.get(f"/v1/route/{_segment(client_id)}{_query(region=region)}")
    except ApiError as exc:
        if exc.code != "bad_route":
            raise
        known = ", ".join(suggest.client_regions_of(client))
        if region is None:
            needs = "lbd is in dynamic mode, which routes a client by its region: pass --region REGION"
            raise ApiError(exc.status, exc.code, f"{needs} (client regions: {known})") from None
        raise ApiError(
            exc.status, exc.code, f"--region {region!r} is not a client region; client regions: {known}"
        ) from None
    if region is not None and answer.get("mode") == "static":
        print_note("--region has no effect in static mode: a client's server depends on its id only")
    show(answer, as_json, views.route_decision)


class Output(StrEnum):
    TABLE = "table"
    WIDE = "wide"


@app.command()
def servers(
    ctx: typer.Context,
    as_json: JsonFlag = False,
    output: Annotated[
        Output,
        typer.Option("-o", "--output", metavar="table|wide", help="wide: every column, whatever the terminal's width."),
    ] = Output.TABLE,
) -> None:
    """List the servers lbd balances across, with health and load (--json: the list itself).

    Example: lbctl servers --json | jq -r '.[] | select(.health != "healthy") | .id'
    """
    view = views.wide_servers_table if output is Output.WIDE else views.servers_table
    show(_client(ctx).get("/v1/servers")["servers"], as_json, view, wide=output is Output.WIDE)


@app.command()
def server(ctx: typer.Context, server_id: ServerIdArg, as_json: JsonFlag = False) -> None:
    """Show one server in detail (exit 4 when lbd has no server with that id).

    Example: lbctl server s1
    """
    show(_client(ctx).get(f"/v1/servers/{_segment(server_id)}"), as_json, views.server_panel)


@app.command()
def register(
    ctx: typer.Context,
    server_id: Annotated[str | None, typer.Option("--id", metavar="ID", help="The new server's id.")] = None,
    url: Annotated[
        str | None, typer.Option("--url", metavar="URL", help="Its base URL: http://HOST:PORT or https://HOST:PORT.")
    ] = None,
    region: Annotated[
        str | None,
        typer.Option(
            "--region", metavar="REGION", help="Its region, e.g. us-east.", autocompletion=suggest.server_regions
        ),
    ] = None,
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

    Example: lbctl register --id s4 --url http://10.0.0.7:9000 --region eu-west --capacity 20
    """
    flags = {"--id": server_id, "--url": url, "--region": region, "--capacity": capacity}
    show(_client(ctx).post("/v1/servers", _registration(flags, from_file)), as_json, views.registration)


@app.command()
def deregister(
    ctx: typer.Context,
    server_ids: ServerIdsArg,
    now: Annotated[
        bool, typer.Option("--now", help="Remove at once, without waiting for its requests in flight.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Remove servers: drain them, wait for their requests in flight (up to lbd's drain grace), remove them.

    With several ids every one is checked first (an unknown id changes nothing, exit 4), all are
    drained, then each is removed once its requests in flight are done; --json prints a list.

    Example: lbctl deregister s3 s4
    """
    client = _client(ctx)
    _known_servers(client, server_ids)
    if len(server_ids) > 1 and not now:
        for server_id in server_ids:  # drained together, so their waits overlap
            client.post(f"/v1/servers/{_segment(server_id)}/drain")
    answers = []
    for server_id in server_ids:
        path = f"/v1/servers/{_segment(server_id)}" + ("?now=1" if now else "")
        with waiting(f"draining {server_id}, waiting for its requests in flight"):
            answers.append(client.delete(path, timeout=REMOVE_TIMEOUT_S))
    _show_each(answers, as_json, views.removal)


@app.command()
def drain(ctx: typer.Context, server_ids: ServerIdsArg, as_json: JsonFlag = False) -> None:
    """Take servers out of rotation: no new clients; their requests in flight finish.

    Example: lbctl drain s1 s2
    """
    _set_draining(_client(ctx), server_ids, "drain", as_json)


@app.command()
def undrain(ctx: typer.Context, server_ids: ServerIdsArg, as_json: JsonFlag = False) -> None:
    """Put drained servers back in rotation.

    Example: lbctl undrain s1 s2
    """
    _set_draining(_client(ctx), server_ids, "undrain", as_json)


@app.command()
def check(ctx: typer.Context, server_ids: ServerIdsArg, as_json: JsonFlag = False) -> None:
    """Probe servers' health now, without waiting for their next check or the end of a cooldown.

    The result counts like a scheduled check's: a server in cooldown is probed from now on, and is
    back in rotation after `rise` passes (a failure doubles its cooldown, as a scheduled one would).

    Example: lbctl check s2
    """
    client = _client(ctx)
    _known_servers(client, server_ids)
    _show_each([client.post(f"/v1/servers/{_segment(sid)}/check") for sid in server_ids], as_json, views.check_result)


@app.command()
def workers(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List the proxy processes (lbd start --workers N): pid, state, requests, connections, restarts.

    Example: lbctl workers
    """
    show(_client(ctx).get("/v1/status"), as_json, views.workers_table, json_of=itemgetter("workers"))


@app.command()
def cluster(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Show the cluster this lbd is part of: the store and its health, the live instances.

    Example: lbctl cluster
    """
    show(_client(ctx).get("/v1/cluster"), as_json, views.cluster_panel)


@app.command()
def regions(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List the regions: each one's latency, where its clients fall back to, its servers; client-only marked.

    Example: lbctl regions
    """
    show(_client(ctx).get("/v1/regions"), as_json, views.regions_table, json_of=itemgetter("regions"))


def _set_draining(client: Client, server_ids: list[str], action: str, as_json: bool) -> None:
    _known_servers(client, server_ids)
    answers = [client.post(f"/v1/servers/{_segment(server_id)}/{action}") for server_id in server_ids]
    _show_each(answers, as_json, views.drain_state)


def _known_servers(client: Client, server_ids: list[str]) -> None:
    """Every id names a registered server, or nothing is changed (exit 4)."""
    known = {server["id"] for server in client.get("/v1/servers")["servers"]}
    unknown = [server_id for server_id in server_ids if server_id not in known]
    if unknown:
        names = ", ".join(repr(server_id) for server_id in unknown)
        raise ApiError(404, "server_not_found", f"no server with id {names}; nothing was changed")


def _show_each(answers: list[Any], as_json: bool, view: Callable[[Any], RenderableType]) -> None:
    """One answer as it is; several as a list (--json) or one after the other."""
    if len(answers) == 1:
        show(answers[0], as_json, view)
    else:
        show(answers, as_json, lambda each: Group(*(view(answer) for answer in each)))


@app.command()
def mode(
    ctx: typer.Context,
    new_mode: Annotated[
        Mode | None,
        typer.Argument(metavar="MODE", help="Switch lbd to this mode.", show_default=False),
    ] = None,
    from_config: Annotated[
        bool,
        typer.Option("--from-config", help="Go back to the config file's mode (undo a switch made at run time)."),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Print lbd's balancing mode, or switch it (static: by capacity; dynamic: by client region and load).

    A mode switched at run time stands over the config file's, across reloads and restarts, until
    --from-config gives the choice back to the file.

    Example: lbctl mode dynamic
    """
    client = _client(ctx)
    if from_config and new_mode is not None:
        raise UsageProblem("give either MODE or --from-config, not both")
    if from_config:
        answer = client.put("/v1/mode", {"from_config": True})
    elif new_mode is not None:
        answer = client.put("/v1/mode", {"mode": new_mode.value})
    else:
        answer = client.get("/v1/mode")
    show(answer, as_json, views.mode_line)


def command_group(name: str, help_text: str) -> typer.Typer:
    """A command with subcommands (`lbctl set capacity`, `lbctl config dump`)."""
    group = typer.Typer(help=help_text, no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]})
    app.add_typer(group, name=name)
    return group


set_app = command_group("set", "Change a setting of a server live.")


@set_app.command("capacity")
def set_capacity(
    ctx: typer.Context,
    server_id: ServerIdArg,
    capacity: Annotated[int, typer.Argument(metavar="N", min=1, help="Requests it takes at once; also its weight.")],
    as_json: JsonFlag = False,
) -> None:
    """Change a server's capacity live, without deregistering it (HAProxy's `set server ... weight`).

    In static mode only the clients the new weight implies move: to the server when it grows, away
    from it when it shrinks. A server registered at run time keeps the new capacity across restarts;
    one of the servers file keeps it across reloads that leave its entry alone, until lbd restarts.

    Example: lbctl set capacity s1 40
    """
    answer = _client(ctx).put(f"/v1/servers/{_segment(server_id)}/capacity", {"capacity": capacity})
    show(answer, as_json, views.capacity_line)


sessions_app = typer.Typer(context_settings={"help_option_names": ["-h", "--help"]})
app.add_typer(sessions_app, name="sessions")


@sessions_app.callback(invoke_without_command=True)
def sessions(
    ctx: typer.Context,
    server: Annotated[
        str | None,
        typer.Option("--server", metavar="ID", help="Only sessions on this server.", autocompletion=suggest.server_ids),
    ] = None,
    region: Annotated[
        str | None,
        typer.Option(
            "--region", metavar="REGION", help="Only clients from this region.", autocompletion=suggest.client_regions
        ),
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", metavar="N", min=1, help="At most N sessions (lbd's default: 1000).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """List sticky sessions, most recently active first (--json: the list itself); `clear` forgets them.

    Example: lbctl sessions --server s1 --limit 20
    """
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
    """Forget one client's session, or every session on a server; their next requests are routed afresh.

    Example: lbctl sessions clear --server s1
    """
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

    Example: lbctl reload
    """
    show(_client(ctx).post("/v1/reload"), as_json, views.reload_report)


config_app = command_group("config", "The running lbd's configuration.")


@config_app.command("dump")
def config_dump(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Print lbd's effective configuration as TOML that `lbd start --config` accepts back unchanged.

    The admin token is never shown; give it with env LBD_ADMIN_TOKEN when starting from the dump.

    Example: lbctl config dump > lbd.toml
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
        code = app(prog_name="lbctl", standalone_mode=False)
    except typer.TyperException as exc:  # a usage error Typer found: one line, naming the command
        context = getattr(exc, "ctx", None)
        command = context.command_path if context is not None else "lbctl"
        message = exc.format_message()
        if not message and context is not None:  # no arguments at all: the help is the answer
            print(context.get_help())
            raise SystemExit(0) from None
        _fail(f"{message.rstrip('.')} (see '{command} --help')", EXIT_USAGE)
    except typer.Abort:
        raise SystemExit(130) from None
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
    raise SystemExit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int) -> NoReturn:
    print_error(message)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
