"""What shell completion offers beyond the commands and flags: the server ids and regions of the
running lbd, asked for with a short timeout, and nothing (never an error) when it does not answer."""

from __future__ import annotations

from pathlib import Path

import typer

from lbctl.client import Client, DaemonUnreachable, PermissionDenied
from lbd.config import default_admin_socket

TIMEOUT_S = 0.5  # a completion that hangs is worse than none


def _client(ctx: typer.Context) -> Client:
    """The socket the command line names so far (--socket, $LBD_SOCKET), else the default."""
    socket = ctx.find_root().params.get("socket_path")
    return Client(Path(socket) if socket else default_admin_socket(), TIMEOUT_S)


def _matching(values: list[str], incomplete: str) -> list[str]:
    return [value for value in values if value.startswith(incomplete)]


def _regions(client: Client) -> list[dict[str, object]]:
    try:
        regions: list[dict[str, object]] = client.get("/v1/regions")["regions"]
    except (DaemonUnreachable, PermissionDenied, KeyError, TypeError, Exception):
        return []
    return regions


def server_ids(ctx: typer.Context, incomplete: str) -> list[str]:
    try:
        servers = _client(ctx).get("/v1/servers")["servers"]
    except Exception:
        return []
    return _matching(sorted(str(server["id"]) for server in servers), incomplete)


def client_regions_of(client: Client) -> list[str]:
    """Regions a client may name (those with a proximity order), client-only ones marked."""
    return [
        f"{row['region']} (client only)" if row.get("client_only") else str(row["region"])
        for row in _regions(client)
        if row.get("proximity") is not None
    ]


def client_regions(ctx: typer.Context, incomplete: str) -> list[str]:
    regions = [str(row["region"]) for row in _regions(_client(ctx)) if row.get("proximity") is not None]
    return _matching(regions, incomplete)


def server_regions(ctx: typer.Context, incomplete: str) -> list[str]:
    regions = [str(row["region"]) for row in _regions(_client(ctx)) if row.get("latency_ms") is not None]
    return _matching(regions, incomplete)
