"""lbctl: inspect and drive a running lbd through its admin Unix socket.

Each command is parse -> one client call -> render; errors end here as one line on stderr and an
exit code a script can branch on:

    0  ok
    1  lbd reported an error (or lbctl failed unexpectedly)
    2  usage error
    3  lbd is not reachable on the admin socket
    4  not found (no such server)
    5  conflict with the daemon's current state
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn
from urllib.parse import quote

import typer

from lbctl import views
from lbctl.client import ApiError, Client, DaemonUnreachable
from lbctl.output import print_error, show
from lbd.config import default_admin_socket

EXIT_ERROR = 1
EXIT_UNREACHABLE = 3
EXIT_NOT_FOUND = 4
EXIT_CONFLICT = 5
EXIT_CODES_BY_ERROR_CODE = {
    "server_not_found": EXIT_NOT_FOUND,
    "not_found": EXIT_NOT_FOUND,
    "conflict": EXIT_CONFLICT,
}
EPILOG = "Exit codes: 0 ok, 1 error reported by lbd, 2 usage error, 3 lbd not reachable, 4 not found, 5 conflict."

app = typer.Typer(
    help="Inspect and drive a running lbd through its admin socket.",
    epilog=EPILOG,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print the admin API's JSON instead of a table.")]


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
            help="lbd's admin socket (default: $XDG_RUNTIME_DIR/lbd.sock, else /tmp/lbd-$UID.sock).",
        ),
    ] = None,
) -> None:
    # Same default as `lbd start`, so both find each other with no flags at all.
    ctx.obj = Client(socket_path or default_admin_socket())


@app.command()
def status(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Show lbd's mode, listeners, uptime, server health and traffic counters."""
    show(_client(ctx).get("/v1/status"), as_json, views.status_panel)


@app.command()
def servers(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List the servers lbd balances across, with health and load (--json: the list itself)."""
    show(_client(ctx).get("/v1/servers")["servers"], as_json, views.servers_table)


@app.command()
def server(
    ctx: typer.Context,
    server_id: Annotated[str, typer.Argument(metavar="ID", help="The server's id, as `lbctl servers` lists it.")],
    as_json: JsonFlag = False,
) -> None:
    """Show one server in detail (exit 4 when lbd has no server with that id)."""
    show(_client(ctx).get(f"/v1/servers/{quote(server_id, safe='')}"), as_json, views.server_panel)


def _client(ctx: typer.Context) -> Client:
    client = ctx.obj
    assert isinstance(client, Client)
    return client


def main() -> None:
    """Run the app; turn every error into one stderr line and its exit code, never a traceback."""
    try:
        app(prog_name="lbctl")
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
