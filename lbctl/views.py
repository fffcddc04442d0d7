"""Pure functions from admin API data to Rich renderables.

Data in, renderable out, no I/O: the one-shot commands print these and a live `status --watch` can
redraw them. Colour only reinforces what the words already say, so output reads the same with
NO_COLOR. Missing fields show as "-" and unknown ones are ignored (the server panel lists them), so
the views render both older and newer daemons.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console, ConsoleOptions, Group, JustifyMethod, RenderableType, RenderResult
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

MISSING = "-"
HEALTH_STYLES: Mapping[str, str] = {
    "healthy": "green",
    "failing": "yellow",
    "cooldown": "red",
    "degraded": "red",
}
OUT_OF_ROTATION = frozenset(("cooldown", "degraded"))
URL_MIN_WIDTH = 12
LISTENER_LABELS: Mapping[str, str] = {"admin": "admin socket"}


def status_panel(status: Mapping[str, Any]) -> Panel:
    """`GET /v1/status`: what the daemon is, then what it is doing."""
    servers = _mapping(status.get("servers"))
    requests = _mapping(status.get("requests"))
    rows: list[tuple[str, RenderableType]] = [
        ("mode", _text(status.get("mode"))),
        ("version", _text(status.get("version"))),
        ("pid", _text(status.get("pid"))),
        ("uptime", _uptime(status.get("uptime_s"))),
        *listener_rows(_mapping(status.get("listeners"))),
        ("servers", Text(f"{_str(servers.get('total'))} total, {_str(servers.get('in_rotation'))} in rotation")),
        ("health", health_counts(_mapping(servers.get("by_health")))),
        ("clients", Text(f"{_str(_mapping(status.get('clients')).get('connections'))} connections")),
        ("sessions", _text(_mapping(status.get("sessions")).get("total"))),
        ("requests", request_counts(requests)),
        ("responses", response_counts(_mapping(requests.get("responses")))),
    ]
    return Panel(_key_values(rows), title="lbd status", title_align="left", expand=False)


@dataclass(frozen=True, slots=True)
class Column:
    """One column of the servers table: which field, under which header, rendered how."""

    header: str
    key: str
    render: Callable[[object], Text]
    justify: JustifyMethod = "right"


def servers_table(servers: Sequence[Mapping[str, Any]]) -> RenderableType:
    """`GET /v1/servers`: one row per server, in the daemon's order.

    All columns need about 100 terminal columns at two spaces apart. Narrower, they close up to
    one space and long URLs fold, which keeps every value whole at 80 columns; narrower still, the
    identity columns give way to the live ones (`lbctl server ID` shows them).
    """
    live = [column for column in SERVER_COLUMNS if column.key not in IDENTITY_KEYS]
    return FirstThatFits(
        [
            (_table_width(servers, SERVER_COLUMNS, gap=2), _servers_table(servers, SERVER_COLUMNS, gap=2)),
            (
                _table_width(servers, SERVER_COLUMNS, gap=1, url_width=URL_MIN_WIDTH),
                _servers_table(servers, SERVER_COLUMNS, gap=1),
            ),
        ],
        fallback=_servers_table(servers, live, gap=1),
    )


def server_panel(server: Mapping[str, Any]) -> Panel:
    """`GET /v1/servers/{id}`: every field, those this version does not know about last."""
    known = [(label, render(server.get(key))) for label, key, render in SERVER_DETAILS]
    shown = {key for _, key, _ in SERVER_DETAILS} | SERVER_DETAILS_HIDDEN
    extra = [(key, _text(value)) for key, value in server.items() if key not in shown]
    return Panel(_key_values(known + extra), title=f"server {_str(server.get('id'))}", title_align="left", expand=False)


def listener_rows(listeners: Mapping[str, Any]) -> list[tuple[str, RenderableType]]:
    """The proxy and admin socket always (as "-" if absent), then any listener a newer lbd adds."""
    names = dict.fromkeys(("proxy", "admin", *listeners))
    return [(LISTENER_LABELS.get(name, name.replace("_", " ")), _text(listeners.get(name))) for name in names]


def health_text(health: object) -> Text:
    """A health word in its colour: green serves, yellow is at risk, red is out of rotation."""
    if not isinstance(health, str):
        return Text(MISSING)
    return Text(health, style=HEALTH_STYLES.get(health, ""))


def health_counts(by_health: Mapping[str, Any]) -> Text:
    """`3 healthy, 0 failing, ...`; zero counts are dimmed so the non-zero ones stand out."""
    if not by_health:
        return Text(MISSING)
    parts = [
        Text(f"{count} {health}", style=HEALTH_STYLES.get(health, "") if count else "dim")
        for health, count in by_health.items()
    ]
    return Text(", ").join(parts)


def request_counts(requests: Mapping[str, Any]) -> Text:
    """`120 total, 3 retries, 1 failovers`; non-zero retries and failovers are yellow."""
    parts = [Text(f"{_str(requests.get('total'))} total")]
    for key in ("retries", "failovers"):
        count = requests.get(key)
        parts.append(Text(f"{_str(count)} {key}", style="yellow" if isinstance(count, int) and count else ""))
    return Text(", ").join(parts)


def registration(answer: Mapping[str, Any]) -> Text:
    """`POST /v1/servers`: one line per server in the request, new or already there."""
    created = set(_sequence(answer.get("created")))
    lines = [
        Text(
            f"registered {_str(server.get('id'))} {_str(server.get('url'))} "
            f"({_str(server.get('region'))}, capacity {_str(server.get('capacity'))})"
        )
        if server.get("id") in created
        else Text(f"{_str(server.get('id'))} already registered (no change)")
        for server in map(_mapping, _sequence(answer.get("servers")))
    ]
    return Text("\n").join(lines) if lines else Text("no servers in the request; nothing changed")


def removal(answer: Mapping[str, Any]) -> Text:
    """`DELETE /v1/servers/{id}`: removed, and whether requests were still running then."""
    server_id = _str(answer.get("removed"))
    in_flight = answer.get("in_flight_at_removal")
    if answer.get("drained") or not in_flight:
        return Text(f"removed {server_id} (drained in {humanize_ms(answer.get('waited_ms'))})")
    noun = "request" if in_flight == 1 else "requests"
    return Text(f"removed {server_id} with {_str(in_flight)} {noun} still in flight", style="yellow")


def drain_state(server: Mapping[str, Any]) -> Text:
    """`POST /v1/servers/{id}/drain|undrain`: the server's rotation as it now stands."""
    server_id = _str(server.get("id"))
    if server.get("draining"):
        return Text(f"{server_id} draining")
    health = server.get("health")
    if health in OUT_OF_ROTATION or server.get("in_rotation") is False:
        return Text.assemble(f"{server_id} no longer draining, but out of rotation while ", health_text(health))
    return Text(f"{server_id} back in rotation")


def mode_line(answer: Mapping[str, Any]) -> Text:
    """`GET /v1/mode` (`mode: static`) or `PUT /v1/mode` (`mode: dynamic (was static)`)."""
    mode = _str(answer.get("mode"))
    if "previous" not in answer:
        return Text(f"mode: {mode}")
    previous = _str(answer.get("previous"))
    return Text(f"mode: {mode} (unchanged)" if previous == mode else f"mode: {mode} (was {previous})")


def sessions_table(answer: Mapping[str, Any]) -> RenderableType:
    """`GET /v1/sessions`: most recently active first, then how many of all sessions are shown.

    The total counts every session in lbd, whatever the filters; only CLIENT folds, so every other
    value stays whole at 80 columns.
    """
    sessions = [_mapping(session) for session in _sequence(answer.get("sessions"))]
    table = Table(box=None, padding=(0, 2, 0, 0), pad_edge=False, header_style="bold")
    for header, justify in SESSION_COLUMNS:
        folds = header == "CLIENT"
        table.add_column(header, justify=justify, no_wrap=not folds, overflow="fold" if folds else "ellipsis")
    for session in sessions:
        table.add_row(
            _text(session.get("client_id")),
            _text(session.get("server")),
            _text(session.get("region")),
            _duration(session.get("idle_s")),
            _duration(session.get("expires_in_s")),
        )
    total = answer.get("total")
    footer = Text(f"{len(sessions)} shown of {_str(total)} {'session' if total == 1 else 'sessions'}", style="dim")
    return Group(table, footer) if sessions else footer


def sessions_cleared(answer: Mapping[str, Any]) -> Text:
    """`DELETE /v1/sessions/{client_id}` or `DELETE /v1/sessions?server=ID`."""
    if "server" in answer:
        count = answer.get("cleared")
        noun = "session" if count == 1 else "sessions"
        return Text(f"cleared {_str(count)} {noun} on {_str(answer.get('server'))}")
    return Text(f"cleared the session of {_str(answer.get('cleared'))}")


def humanize_ms(milliseconds: object) -> str:
    """`120 ms` under a second, else `2.5 s` (or `1m 05s` past a minute)."""
    if not isinstance(milliseconds, int | float):
        return _str(milliseconds)
    if milliseconds < 1000:
        return f"{milliseconds:.0f} ms"
    if milliseconds < 60_000:
        return f"{milliseconds / 1000:.1f} s"
    return humanize_duration(milliseconds / 1000)


def response_counts(responses: Mapping[str, Any]) -> Text:
    """`1xx 0  2xx 12 ...`; a non-zero 5xx count is red."""
    if not responses:
        return Text(MISSING)
    parts = [
        Text(f"{status_class} {count}", style="red" if status_class == "5xx" and count else "")
        for status_class, count in responses.items()
    ]
    return Text("  ").join(parts)


def humanize_duration(seconds: float) -> str:
    """`42s`, `5m 03s`, `2h 05m`, `3d 04h`: the two largest units are all a person reads."""
    days, rest = divmod(int(seconds), 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


class FirstThatFits:
    """The first layout whose width fits the console, else the fallback.

    Width is only known when rendering, so this is how a view offers a roomy layout and compact
    ones while staying a pure function of its data (and a live view adapts when resized).
    """

    def __init__(self, layouts: Sequence[tuple[int, RenderableType]], fallback: RenderableType) -> None:
        self.layouts = layouts
        self.fallback = fallback

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield next((layout for width, layout in self.layouts if width <= options.max_width), self.fallback)


def _servers_table(servers: Sequence[Mapping[str, Any]], columns: Sequence[Column], gap: int) -> Table:
    table = Table(
        box=None,
        padding=(0, gap, 0, 0),
        pad_edge=False,
        header_style="bold",
        caption=None if servers else "no servers registered",
    )
    for column in columns:
        # Only the URL may wrap: a folded URL is still whole, a cut id or number is not.
        wraps = column.key == "url"
        table.add_column(
            column.header,
            justify=column.justify,
            no_wrap=not wraps,
            overflow="fold" if wraps else "ellipsis",
        )
    for server in servers:
        table.add_row(*(column.render(server.get(column.key)) for column in columns))
    return table


def _table_width(
    servers: Sequence[Mapping[str, Any]], columns: Sequence[Column], gap: int, url_width: int | None = None
) -> int:
    """What `_servers_table` needs to show every cell whole (the URL folded to `url_width` if given)."""
    widths = [
        url_width
        if url_width is not None and column.key == "url"
        else max([len(column.header)] + [column.render(server.get(column.key)).cell_len for server in servers])
        for column in columns
    ]
    return sum(widths) + gap * (len(columns) - 1)


def _key_values(rows: Sequence[tuple[str, RenderableType]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for label, value in rows:
        grid.add_row(label, value)
    return grid


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _sequence(value: object) -> Sequence[Any]:
    return value if isinstance(value, list | tuple) else ()


def _str(value: object) -> str:
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _text(value: object) -> Text:
    return Text(_str(value))


def _uptime(seconds: object) -> Text:
    return Text(humanize_duration(seconds) if isinstance(seconds, int | float) else _str(seconds))


def _duration(seconds: object) -> Text:
    """Humanized, never negative (a session past its expiry is about to go, not owed time)."""
    return Text(humanize_duration(max(0.0, seconds)) if isinstance(seconds, int | float) else _str(seconds))


def _latency(milliseconds: object) -> Text:
    """`12.3ms`: the unit in the cell costs no width (the header is as wide) and needs no legend."""
    return Text(f"{milliseconds:.1f}ms" if isinstance(milliseconds, int | float) else _str(milliseconds))


def _drain_flag(draining: object) -> Text:
    """`yes` or `-`, so the few draining servers stand out in a long column."""
    return Text("yes" if draining else MISSING)


SERVER_COLUMNS: Sequence[Column] = (
    Column("ID", "id", _text, "left"),
    Column("REGION", "region", _text, "left"),
    Column("URL", "url", _text, "left"),
    Column("CAPACITY", "capacity", _text),
    Column("HEALTH", "health", health_text, "left"),
    Column("DRAIN", "draining", _drain_flag, "left"),
    Column("ACTIVE", "active", _text),
    Column("REQUESTS", "requests", _text),
    Column("ERRORS", "errors", _text),
    Column("LATENCY", "latency_ewma_ms", _latency),
)
IDENTITY_KEYS = frozenset(("region", "url", "capacity"))
SESSION_COLUMNS: Sequence[tuple[str, JustifyMethod]] = (
    ("CLIENT", "left"),
    ("SERVER", "left"),
    ("REGION", "left"),
    ("IDLE", "right"),
    ("EXPIRES IN", "right"),
)

SERVER_DETAILS: Sequence[tuple[str, str, Callable[[object], Text]]] = (
    ("url", "url", _text),
    ("region", "region", _text),
    ("capacity", "capacity", _text),
    ("health", "health", health_text),
    ("draining", "draining", _text),
    ("active", "active", _text),
    ("requests", "requests", _text),
    ("errors", "errors", _text),
    ("latency (ewma)", "latency_ewma_ms", _latency),
)
# The id is the panel's title; hostname and port are already in the URL.
SERVER_DETAILS_HIDDEN = frozenset(("id", "hostname", "port"))
