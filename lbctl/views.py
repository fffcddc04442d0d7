"""Pure functions from admin API data to Rich renderables.

Data in, renderable out, no I/O: the one-shot commands print these and a live `status --watch` can
redraw them. Colour only reinforces what the words already say, so output reads the same with
NO_COLOR. Missing fields show as "-" and unknown ones are ignored (the server panel lists them), so
the views render both older and newer daemons.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import tomli_w
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
LISTENER_LABELS: Mapping[str, str] = {"admin": "admin socket", "tls": "proxy (tls)"}
EXPIRY_WARNING_DAYS = 14  # lbd warns in its log from then on, and so does this view


def status_panel(status: Mapping[str, Any]) -> Panel:
    """`GET /v1/status`: what the daemon is, then what it is doing."""
    servers = _mapping(status.get("servers"))
    requests = _mapping(status.get("requests"))
    rows: list[tuple[str, RenderableType]] = [
        ("mode", mode_line_of(status)),
        ("version", _text(status.get("version"))),
        ("pid", _text(status.get("pid"))),
        *worker_rows(_sequence(status.get("workers"))),
        ("uptime", _uptime(status.get("uptime_s"))),
        *listener_rows(_mapping(status.get("listeners"))),
        *certificate_rows(_mapping(status.get("tls"))),
        ("servers", Text(f"{_str(servers.get('total'))} total, {_str(servers.get('in_rotation'))} in rotation")),
        ("health", health_counts(_mapping(servers.get("by_health")))),
        ("clients", Text(f"{_str(_mapping(status.get('clients')).get('connections'))} connections")),
        ("sessions", _text(_mapping(status.get("sessions")).get("total"))),
        ("requests", request_counts(requests)),
        ("responses", response_counts(_mapping(requests.get("responses")))),
        ("config", config_line(_mapping(status.get("reload")))),
        ("state dir", _text(status.get("state_dir"))),
        *cluster_rows(status.get("cluster")),
    ]
    return Panel(_key_values(rows), title="lbd status", title_align="left", expand=False)


def worker_rows(workers: Sequence[Any]) -> list[tuple[str, RenderableType]]:
    """The status panel's workers line, when a supervisor runs several (`lbctl workers` has the table)."""
    if len(workers) < 2:
        return []
    rows = [_mapping(worker) for worker in workers]
    serving = sum(1 for row in rows if row.get("state") == "serving")
    restarts = sum(int(row.get("restarts") or 0) for row in rows)
    line = Text(f"{serving} of {len(rows)} serving", style="" if serving == len(rows) else "yellow")
    line.append(f", {restarts} restarts" if restarts != 1 else ", 1 restart")
    return [("workers", line)]


def workers_table(status: Mapping[str, Any]) -> RenderableType:
    """`lbctl workers`: each proxy process, from `GET /v1/status`."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    columns = ("WORKER", "PID", "STATE", "REQUESTS", "CONNECTIONS", "UPTIME", "RESTARTS")
    for header in columns:
        table.add_column(header, justify="left" if header in ("STATE",) else "right", no_wrap=True)
    for worker in _sequence(status.get("workers")):
        row = _mapping(worker)
        state = _str(row.get("state"))
        table.add_row(
            _str(row.get("index")),
            _str(row.get("pid")),
            Text(state, style="green" if state == "serving" else "yellow"),
            _str(row.get("requests")),
            _str(row.get("connections")),
            _uptime(row.get("uptime_s")),
            _str(row.get("restarts")),
        )
    return table


def cluster_rows(cluster: object) -> list[tuple[str, RenderableType]]:
    """The status panel's cluster line, when lbd is part of one."""
    if not isinstance(cluster, Mapping):
        return []
    store = cluster.get("store")
    peers = len(_sequence(cluster.get("peers")))
    return [
        (
            "cluster",
            Text.assemble(
                f"{_str(cluster.get('name'))} as {_str(cluster.get('instance'))}, store ",
                (_str(store), "green" if store == "connected" else "red"),
                f", {peers} live instances",
            ),
        )
    ]


def mode_line_of(status: Mapping[str, Any]) -> Text:
    """The mode in effect, and whether it is the config's or a run-time choice that overrides it."""
    mode = _str(status.get("mode"))
    configured = status.get("config_mode")
    if status.get("mode_from_config", True) or configured is None:
        return Text(mode)
    return Text.assemble(
        mode, (f" (switched at run time; the config says {configured}: 'lbctl mode --from-config' undoes it)", "yellow")
    )


def config_line(reload: Mapping[str, Any]) -> Text:
    """The config file and how its last reload went (a refused one in red, since lbd runs the old config)."""
    source = reload.get("config_file") or ("no --config" if "config_file" in reload else MISSING)
    last = _mapping(reload.get("last"))
    if not last:
        return Text(str(source))
    if last.get("ok"):
        return Text(f"{source}, last reload ok")
    return Text.assemble(f"{source}, ", (f"last reload refused: {_str(last.get('error'))}", "red"))


@dataclass(frozen=True, slots=True)
class Column:
    """One column of the servers table: which field, under which header, rendered how."""

    header: str
    key: str
    render: Callable[[object], Text]
    justify: JustifyMethod = "right"


def servers_table(servers: Sequence[Mapping[str, Any]]) -> RenderableType:
    """`GET /v1/servers`: one row per server, in the daemon's order, every value whole.

    All columns need about 120 terminal columns at two spaces apart. Narrower, they close up to one
    space, then columns go in `SERVERS_DROP_ORDER` (the URL first, then the score's terms, ...) until
    the rest fits, and a last line names those left out; ID, HEALTH, DRAIN and ACTIVE always stay.
    `lbctl servers -o wide` shows every column whatever the width; `lbctl server ID` has them all.
    """
    return ServersThatFit(servers)


class ServersThatFit:
    """The servers table with as many columns as the console's width allows (decided when it is
    drawn, so a live view adapts when the terminal is resized)."""

    def __init__(self, servers: Sequence[Mapping[str, Any]]) -> None:
        self.servers = servers
        self.widths = {column.key: _column_width(servers, column) for column in SERVER_COLUMNS}

    def columns_for(self, width: int) -> tuple[list[Column], int, list[Column]]:
        """The columns that fit `width`, the gap between them, and those left out."""
        columns = list(SERVER_COLUMNS)
        for gap in (2, 1):
            if self._width(columns, gap) <= width:
                return columns, gap, []
        left_out: list[Column] = []
        for key in SERVERS_DROP_ORDER:
            column = next(c for c in columns if c.key == key)
            columns.remove(column)
            left_out.append(column)
            if self._width(columns, 1) <= width:
                break
        return columns, 1, left_out

    def _width(self, columns: Sequence[Column], gap: int) -> int:
        return sum(self.widths[column.key] for column in columns) + gap * (len(columns) - 1)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        columns, gap, left_out = self.columns_for(options.max_width)
        yield _servers_table(self.servers, columns, gap)
        if left_out and self.servers:
            hidden = ", ".join(column.header for column in left_out)
            yield Text(f"not shown at this width: {hidden} (-o wide shows them)", style="dim")


def wide_servers_table(servers: Sequence[Mapping[str, Any]]) -> RenderableType:
    """`lbctl servers -o wide`: every column, as wide as it takes."""
    return _servers_table(servers, SERVER_COLUMNS, gap=2)


def _column_width(servers: Sequence[Mapping[str, Any]], column: Column) -> int:
    return max([len(column.header)] + [column.render(server.get(column.key)).cell_len for server in servers])


def server_panel(server: Mapping[str, Any], now: float | None = None) -> Panel:
    """`GET /v1/servers/{id}`: every field in words (times as "3 s ago", the checks as sentences),
    those this version does not know about last. `now` is Unix time (default: the clock)."""
    at = time.time() if now is None else now
    known = [(label, render(server.get(key))) for label, key, render in SERVER_DETAILS]
    known += [
        ("in rotation", _text(server.get("in_rotation"))),
        ("last check", last_check(_mapping(server.get("checks")), at)),
        ("checks", check_counts(_mapping(server.get("checks")))),
        ("cooldown", cooldown_left(server.get("cooldown_remaining_s"))),
        ("ejections", _text(server.get("ejections"))),
        (
            "last transition",
            last_transition(server.get("last_transition_at"), server.get("last_transition_reason"), at),
        ),
    ]
    shown = {key for _, key, _ in SERVER_DETAILS} | SERVER_DETAILS_HIDDEN
    extra = [(key, _text(value)) for key, value in server.items() if key not in shown]
    return Panel(_key_values(known + extra), title=f"server {_str(server.get('id'))}", title_align="left", expand=False)


def _ago(moment: object, now: float) -> str:
    if not isinstance(moment, int | float):
        return "never"
    return f"{humanize_duration(max(0.0, now - moment))} ago"


def last_check(checks: Mapping[str, Any], now: float) -> Text:
    """`HTTP 404 (failed), 3s ago`, or `none yet`."""
    if checks.get("last_at") is None:
        return Text("none yet")
    verdict = ("passed", "green") if checks.get("last_ok") else ("failed", "red")
    return Text.assemble(f"{_str(checks.get('last_detail'))} (", verdict, f"), {_ago(checks.get('last_at'), now)}")


def check_counts(checks: Mapping[str, Any]) -> Text:
    """`10 passed, 3 failed; 3 failed in a row`; requests that failed in a row, when any."""
    text = f"{_str(checks.get('passed'))} passed, {_str(checks.get('failed'))} failed"
    in_a_row = [
        f"{checks[key]} {word} in a row"
        for key, word in (("consecutive_failures", "failed"), ("consecutive_passes", "passed"))
        if isinstance(checks.get(key), int) and checks[key]
    ]
    passive = checks.get("passive_failures")
    if isinstance(passive, int) and passive:
        in_a_row.append(f"{passive} requests failed in a row")
    return Text(text + ("; " + ", ".join(in_a_row) if in_a_row else ""))


def cooldown_left(seconds: object) -> Text:
    if isinstance(seconds, int | float) and seconds > 0:
        return Text(f"{humanize_duration(seconds)} left", style="yellow")
    return Text("none")


def last_transition(moment: object, reason: object, now: float) -> Text:
    if moment is None:
        return Text("none")
    return Text(f"{_ago(moment, now)}: {_str(reason)}")


def listener_rows(listeners: Mapping[str, Any]) -> list[tuple[str, RenderableType]]:
    """The proxy and admin socket always (as "-" if absent), then any listener a newer lbd adds."""
    names = dict.fromkeys(("proxy", "admin", *listeners))
    return [(LISTENER_LABELS.get(name, name.replace("_", " ")), _text(listeners.get(name))) for name in names]


def certificate_rows(tls: Mapping[str, Any]) -> list[tuple[str, RenderableType]]:
    """One line per certificate of the TLS listener: its names and days to expiry (yellow within 14
    days, red once expired); then mutual TLS, when a client CA is set."""
    rows: list[tuple[str, RenderableType]] = []
    certificates = tls.get("certificates")
    for certificate in certificates if isinstance(certificates, list) else []:
        entry = _mapping(certificate)
        names = entry.get("names")
        shown = ", ".join(str(name) for name in names) if isinstance(names, list) and names else MISSING
        days = entry.get("days_left")
        if isinstance(days, int | float):
            style = "red" if days <= 0 else "yellow" if days < EXPIRY_WARNING_DAYS else ""
            left = "expired" if days <= 0 else f"{int(days)} days left"
            expiry = Text(f"{left} (until {_str(entry.get('not_after'))})", style=style)
        else:
            expiry = Text(MISSING)
        rows.append(("certificate", Text.assemble(f"{shown}: ", expiry)))
    if tls.get("client_ca"):
        rows.append(
            (
                "client certs",
                Text(f"required, verified by {tls['client_ca']}; subject in {_str(tls.get('client_subject_header'))}"),
            )
        )
    return rows


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


def capacity_line(answer: Mapping[str, Any]) -> Text:
    """`PUT /v1/servers/{id}/capacity`: the capacity as it now stands, and what it was."""
    capacity, previous = _str(answer.get("capacity")), _str(answer.get("previous_capacity"))
    change = "unchanged" if capacity == previous else f"was {previous}"
    return Text(f"{_str(answer.get('id'))} capacity {capacity} ({change})")


def check_result(answer: Mapping[str, Any]) -> Text:
    """`POST /v1/servers/{id}/check`: the probe's result and the health it left."""
    health = _mapping(answer.get("health"))
    before, after = health.get("before"), health.get("after")
    verdict = ("passed", "green") if answer.get("passed") else ("failed", "red")
    moved = Text.assemble(health_text(before), " -> ", health_text(after)) if before != after else health_text(after)
    ended = "; its cooldown ended, so it is probed every interval from now on" if answer.get("cooldown_ended") else ""
    return Text.assemble(
        f"{_str(answer.get('server'))}: check ", verdict, f" ({_str(answer.get('detail'))}); health ", moved, ended
    )


def cluster_panel(answer: Mapping[str, Any]) -> RenderableType:
    """`GET /v1/cluster`: the store and its health, then the live instances (this one marked)."""
    store = answer.get("store")
    health = Text(_str(store), style="green" if store == "connected" else "red")
    rows: list[tuple[str, RenderableType]] = [
        ("cluster", _text(answer.get("name"))),
        ("instance", _text(answer.get("instance"))),
        ("store", Text.assemble(_str(answer.get("url")), "  ", health)),
        ("version", _text(answer.get("version"))),
    ]
    if answer.get("last_error") and store != "connected":
        rows.append(("why", Text(_str(answer.get("last_error")), style="red")))
    pending = answer.get("pending_pins")
    if isinstance(pending, int) and pending:
        rows.append(("pending", Text(f"{pending} sessions to write once the store answers", style="yellow")))
    table = Table(box=None, pad_edge=False, header_style="bold")
    for header in ("INSTANCE", "LISTEN", "LAST SEEN"):
        table.add_column(header, no_wrap=True)
    for peer in _sequence(answer.get("peers")):
        row = _mapping(peer)
        name = _str(row.get("instance")) + (" (this one)" if row.get("instance") == answer.get("instance") else "")
        table.add_row(name, _str(row.get("listen")), f"{row.get('last_seen_s', 0):.1f}s ago")
    return Group(_key_values(rows), Text(), table if table.row_count else Text("no live instance seen", style="dim"))


def regions_table(answer: Mapping[str, Any]) -> RenderableType:
    """`GET /v1/regions`: every region once; those only clients come from are marked."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    for header, justify in (("REGION", "left"), ("LATENCY", "right"), ("SERVERS", "right"), ("FALLS BACK TO", "left")):
        table.add_column(header, justify=cast(JustifyMethod, justify), overflow="fold")
    for row in answer.get("regions") or ():
        region = _mapping(row)
        latency = region.get("latency_ms")
        proximity = region.get("proximity")
        name = _str(region.get("region")) + (" (client only)" if region.get("client_only") else "")
        fallback = " > ".join(str(r) for r in proximity[1:]) if isinstance(proximity, list) else "(servers only)"
        table.add_row(name, MISSING if latency is None else f"{latency} ms", _str(region.get("servers")), fallback)
    return table


def mode_line(answer: Mapping[str, Any]) -> Text:
    """`GET /v1/mode` (`mode: static`) or `PUT /v1/mode` (`mode: dynamic (was static)`)."""
    mode = _str(answer.get("mode"))
    source = (
        ""
        if answer.get("from_config", True)
        else f"; switched at run time, the config says {_str(answer.get('config_mode'))}"
    )
    if "previous" not in answer:
        return Text(f"mode: {mode}" + (f" ({source[2:]})" if source else ""))
    previous = _str(answer.get("previous"))
    change = "unchanged" if previous == mode else f"was {previous}"
    return Text(f"mode: {mode} ({change}{source})")


def reload_report(answer: Mapping[str, Any]) -> Text:
    """`POST /v1/reload`: one line per changed key (`timeout_base_ms: 2000 -> 100`), per servers
    file change, and per warning; or that nothing changed."""
    lines = [
        f"  {_str(change.get('key'))}: {_setting(change.get('old'))} -> {_setting(change.get('new'))}"
        for change in map(_mapping, _sequence(answer.get("changed")))
    ]
    servers = _mapping(answer.get("servers"))
    lines += [
        f"  servers {what}: {', '.join(map(str, _sequence(servers.get(what))))}"
        for what in ("added", "replaced", "removed")
        if _sequence(servers.get(what))
    ]
    lines += [f"  warning: {warning}" for warning in map(str, _sequence(answer.get("warnings")))]
    head = f"reloaded {_str(answer.get('config_file'))}"
    return Text("\n".join([head, *lines]) if lines else f"{head}: nothing changed")


def _setting(value: object) -> str:
    """A config value as the TOML file spells it (lists and strings in JSON's quoting), unset as "unset"."""
    return "unset" if value is None else json.dumps(value)


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


def _servers_table(servers: Sequence[Mapping[str, Any]], columns: Sequence[Column], gap: int) -> Table:
    table = Table(
        box=None,
        padding=(0, gap, 0, 0),
        pad_edge=False,
        header_style="bold",
        caption=None if servers else "no servers registered",
    )
    for column in columns:
        table.add_column(column.header, justify=column.justify, no_wrap=True, overflow="ellipsis")
    for server in servers:
        table.add_row(*(column.render(server.get(column.key)) for column in columns))
    return table


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


def _score(score: object) -> Text:
    return Text(f"{score:.2f}" if isinstance(score, int | float) else _str(score))


def _factor(factor: object) -> Text:
    """The latency factor, `1.00` for a server as fast as its region's typical one."""
    return Text(f"{factor:.2f}" if isinstance(factor, int | float) else _str(factor))


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
    # the dynamic score and its terms besides capacity and active: latency factor, sessions pinned
    Column("FACTOR", "latency_factor", _factor),
    Column("SESS", "sessions", _text),
    Column("SCORE", "score", _score),
)
# At a narrow width the servers table leaves columns out in this order (ID, HEALTH, DRAIN and ACTIVE
# always stay): what `lbctl server ID` shows anyway first, the live counters last.
SERVERS_DROP_ORDER = (
    "url",
    "latency_factor",
    "sessions",
    "region",
    "capacity",
    "requests",
    "errors",
    "latency_ewma_ms",
    "score",
)
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
    ("latency (scored)", "latency_ms", _latency),
    ("region latency", "region_latency_ms", _latency),
    ("latency factor", "latency_factor", _factor),
    ("sessions", "sessions", _text),
    ("score", "score", _score),
)
# The id is the panel's title; hostname and port are already in the URL.
SERVER_DETAILS_HIDDEN = frozenset(
    (
        "id", "hostname", "port", "in_rotation", "checks", "cooldown_remaining_s", "ejections",
        "last_transition_at", "last_transition_reason",
    )
)  # fmt: skip


# --- lbctl route -------------------------------------------------------------------------------

ROUTE_CANDIDATES_SHOWN = 10


def route_decision(answer: Mapping[str, Any]) -> RenderableType:
    """`GET /v1/route/{client_id}`: `alice -> s2 (eu-west): best_in_region`, why, then the candidates.

    The candidates are in the balancer's order (rank 1 is its first choice); the chosen one is
    marked `>` and bold, so it stands out without colour. In dynamic mode each shows its score and
    the score's terms: sessions pinned, load (requests in flight / capacity) and latency factor.
    Only the first ten are listed (and the chosen one wherever it ranks); `--json` has them all.
    """
    candidates = [_mapping(candidate) for candidate in _sequence(answer.get("candidates"))]
    chosen = answer.get("server")
    region = answer.get("server_region")
    if region is None:  # static mode: the region is the chosen candidate's
        region = next((c.get("region") for c in candidates if c.get("server") == chosen), None)
    headline = Text.assemble(
        (_str(answer.get("client_id")), "bold"),
        " -> ",
        (_str(chosen), "bold"),
        f" ({_str(region)}): ",
        (_str(answer.get("reason")), "bold cyan"),
    )
    lines: list[RenderableType] = [headline, Text(_str(answer.get("detail")))]
    facts = [f"mode {_str(answer.get('mode'))}"]
    if "client_region" in answer:
        facts.append(f"client region {_str(answer.get('client_region'))}")
    session = answer.get("session")
    if isinstance(session, Mapping):
        facts.append(f"session on {_str(session.get('server'))}, idle {_duration(session.get('idle_s'))}")
    elif "session" in answer:
        facts.append("no session")
    lines.append(Text(", ".join(facts), style="dim"))
    region_rows = [_mapping(row) for row in _sequence(answer.get("regions"))]
    if region_rows:
        lines.append(_regions_line(region_rows, region))
    if candidates:
        lines.extend((Text(), _candidates_table(candidates, chosen)))
    else:
        lines.append(Text("no candidates", style="dim"))
    return Group(*lines)


def _regions_line(rows: Sequence[Mapping[str, Any]], chosen_region: object) -> Text:
    """The client's proximity order as the spill rule sees it: `regions (load/limit): us-east home
    93%/90% full, ca-central 41%/80%, ...`; the chosen server's region in bold."""
    line = Text("regions (load/limit): ", style="dim")
    for position, row in enumerate(rows):
        if position:
            line.append(", ", style="dim")
        name = _str(row.get("region"))
        utilization, limit = row.get("utilization"), row.get("max_load")
        shown = "no servers in rotation" if not isinstance(utilization, int | float) else _share(utilization)
        if isinstance(limit, int | float) and isinstance(utilization, int | float):
            shown += f"/{_share(limit)}"
        state = "" if row.get("room") else " full" if isinstance(utilization, int | float) else ""
        home = " home" if row.get("home") else ""
        line.append(f"{name}{home} ", style="bold" if name == chosen_region else "")
        line.append(shown + state, style="yellow" if state else "")
    return line


def _share(value: float) -> str:
    return f"{value:.0%}"


def _candidates_table(candidates: Sequence[Mapping[str, Any]], chosen: object) -> RenderableType:
    dynamic = any("score" in candidate for candidate in candidates)
    table = Table(box=None, padding=(0, 2, 0, 0), pad_edge=False, header_style="bold")
    table.add_column("", no_wrap=True)
    table.add_column("RANK", justify="right", no_wrap=True)
    table.add_column("SERVER", overflow="fold")
    table.add_column("REGION", no_wrap=True)
    if dynamic:
        table.add_column("SCORE", justify="right", no_wrap=True)
        table.add_column("SESS", justify="right", no_wrap=True)
        table.add_column("LOAD", justify="right", no_wrap=True)
        table.add_column("FACTOR", justify="right", no_wrap=True)
    else:
        table.add_column("CAPACITY", justify="right", no_wrap=True)
    table.add_column("AVAILABLE", no_wrap=True)
    shown = [
        (rank, candidate)
        for rank, candidate in enumerate(candidates, start=1)
        if rank <= ROUTE_CANDIDATES_SHOWN or candidate.get("server") == chosen
    ]
    for rank, candidate in shown:
        picked = candidate.get("server") == chosen
        load = (
            [_score(candidate.get("score")), _text(candidate.get("sessions")), _load(candidate),
             _factor(candidate.get("latency_factor"))]
            if dynamic
            else [_text(candidate.get("capacity"))]
        )  # fmt: skip
        available = candidate.get("available")
        table.add_row(
            Text(">" if picked else ""),
            Text(str(rank)),
            _text(candidate.get("server")),
            _text(candidate.get("region")),
            *load,
            Text("yes" if available else "no", style="" if available else "yellow")
            if isinstance(available, bool)
            else Text(MISSING),
            style="bold" if picked else None,
        )
    hidden = len(candidates) - len(shown)
    if hidden <= 0:
        return table
    return Group(table, Text(f"{hidden} more candidates (--json lists them all)", style="dim"))


def _load(server: Mapping[str, Any]) -> Text:
    """`active/capacity`, e.g. `3/10`."""
    return Text(f"{_str(server.get('active'))}/{_str(server.get('capacity'))}")


# --- lbctl config dump -------------------------------------------------------------------------

CONFIG_DUMP_HEADER = (
    "# lbd effective configuration (lbctl config dump); admin_token is never shown: set env LBD_ADMIN_TOKEN\n"
)


def config_toml(config: Mapping[str, Any]) -> str:
    """`GET /v1/config` as the TOML file `lbd start --config` reads back to the same config.

    Plain text, not a renderable: `[health]` must not be read as Rich markup. The comment about
    the admin token is only there when the config has a TCP admin listener, which needs one.
    """
    text = tomli_w.dumps(config)
    return CONFIG_DUMP_HEADER + text if "admin_listen" in config else text


# --- lbctl status --watch ----------------------------------------------------------------------

BAR_STYLES: Sequence[tuple[float, str]] = ((0.7, "green"), (0.9, "yellow"), (float("inf"), "red"))


def dashboard(
    status: Mapping[str, Any],
    servers: Sequence[Mapping[str, Any]],
    sessions_summary: Mapping[str, Any] | None,
    rates: Mapping[str, Any] | None,
) -> RenderableType:
    """One frame of `status --watch`: the daemon, its traffic rates, sessions, then a server table.

    `sessions_summary` is `GET /v1/sessions/summary` (None when lbd has none); `rates` are lbctl's
    per-second rates since the previous frame (None on the first frame: shown as "-"). The table
    picks the widest layout that fits: with URLs, then without them, then without the load bar
    (its numbers stay), then without regions; ids and health are in every layout and never cut.
    """
    summary = None if sessions_summary is None else _mapping(sessions_summary)
    rates = _mapping(rates) if rates is not None else None
    return Group(
        _dashboard_header(status, summary, rates),
        Text(),
        ServerBoard([_mapping(server) for server in servers], summary, rates),
    )


def _dashboard_header(
    status: Mapping[str, Any], summary: Mapping[str, Any] | None, rates: Mapping[str, Any] | None
) -> Table:
    servers = _mapping(status.get("servers"))
    requests = _mapping(status.get("requests"))
    rate = None if rates is None else rates.get("requests_per_s")
    errors = None if rates is None else rates.get("errors_per_s")
    identity = (
        f"{_str(status.get('mode'))} mode, version {_str(status.get('version'))}, pid {_str(status.get('pid'))}, "
        f"up {_uptime(status.get('uptime_s'))}"
    )
    connections = _str(_mapping(status.get("clients")).get("connections"))
    rows: list[tuple[str, RenderableType]] = [
        ("lbd", Text(identity)),
        *listener_rows(_mapping(status.get("listeners"))),
        (
            "rates",
            Text.assemble(
                f"{_per_s(rate)} req/s, ",
                (f"{_per_s(errors)} 5xx/s", "red" if isinstance(errors, int | float) and errors > 0 else ""),
            ),
        ),
        ("requests", Text.assemble(request_counts(requests), f"; {connections} client connections")),
        ("servers", Text(f"{_str(servers.get('total'))} total, {_str(servers.get('in_rotation'))} in rotation")),
        ("health", health_counts(_mapping(servers.get("by_health")))),
        ("sessions", _sessions_line(status, summary)),
    ]
    return _key_values(rows)


def _sessions_line(status: Mapping[str, Any], summary: Mapping[str, Any] | None) -> Text:
    """`12 pinned; by region: eu-west 5, us-east 7` (per server: the table's SESS column)."""
    if summary is None:
        total = _mapping(status.get("sessions")).get("total")
        return Text(f"{_str(total)} pinned (per region and server: unavailable from this lbd)")
    by_region = _mapping(summary.get("by_region"))
    regions = ", ".join(f"{region} {_str(count)}" for region, count in sorted(by_region.items()))
    return Text(f"{_str(summary.get('total'))} pinned" + (f"; by region: {regions}" if regions else ""))


def _per_s(rate: object) -> str:
    return f"{rate:.1f}" if isinstance(rate, int | float) else MISSING


@dataclass(frozen=True, slots=True)
class BoardLayout:
    keys: Sequence[str]
    gap: int
    bar_width: int


BOARD_HEADERS: Mapping[str, tuple[str, JustifyMethod]] = {
    "id": ("ID", "left"),
    "region": ("REGION", "left"),
    "url": ("URL", "left"),
    "health": ("HEALTH", "left"),
    "draining": ("DRAIN", "left"),
    "load": ("LOAD", "left"),
    "score": ("SCORE", "right"),
    "latency": ("LATENCY", "right"),
    "rate": ("REQ/S", "right"),
    "errors": ("ERRORS", "right"),
    "sessions": ("SESS", "right"),
}
_ALL = tuple(BOARD_HEADERS)
_NO_URL = tuple(key for key in _ALL if key != "url")
_NARROW = tuple(key for key in _NO_URL if key != "region")
BOARD_LAYOUTS: Sequence[BoardLayout] = (
    BoardLayout(_ALL, gap=2, bar_width=10),
    BoardLayout(_ALL, gap=1, bar_width=6),
    BoardLayout(_NO_URL, gap=2, bar_width=10),
    BoardLayout(_NO_URL, gap=1, bar_width=6),
    BoardLayout(_NO_URL, gap=1, bar_width=0),
    BoardLayout(_NARROW, gap=1, bar_width=0),
)
BOARD_FALLBACK = BoardLayout(("id", "health", "load", "rate"), gap=1, bar_width=0)


class ServerBoard:
    """The server table of the dashboard, laid out for the width (and charset) it is drawn at."""

    def __init__(
        self,
        servers: Sequence[Mapping[str, Any]],
        summary: Mapping[str, Any] | None,
        rates: Mapping[str, Any] | None,
    ) -> None:
        self.servers = servers
        self.pinned = None if summary is None else _mapping(summary.get("by_server"))
        self.rates = None if rates is None else _mapping(rates.get("servers"))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if not self.servers:
            yield Text("no servers registered", style="dim")
            return
        ascii_only = options.ascii_only
        for layout in BOARD_LAYOUTS:
            rows = self._rows(layout, ascii_only)
            if _board_width(layout, rows) <= options.max_width:
                yield _board_table(layout, rows)
                return
        yield _board_table(BOARD_FALLBACK, self._rows(BOARD_FALLBACK, ascii_only))

    def _rows(self, layout: BoardLayout, ascii_only: bool) -> list[list[Text]]:
        return [
            [self._cell(key, server, layout.bar_width, ascii_only) for key in layout.keys] for server in self.servers
        ]

    def _cell(self, key: str, server: Mapping[str, Any], bar_width: int, ascii_only: bool) -> Text:
        server_id = server.get("id")
        if key == "health":
            return health_text(server.get("health"))
        if key == "draining":
            return Text("yes", style="yellow") if server.get("draining") else Text(MISSING)
        if key == "load":
            return load_bar(server.get("active"), server.get("capacity"), bar_width, ascii_only)
        if key == "score":
            return _score(server.get("score"))
        if key == "latency":
            return _latency(server.get("latency_ewma_ms"))
        if key == "rate":
            rates = None if self.rates is None else _mapping(self.rates.get(str(server_id)))
            return Text(_per_s(None if rates is None else rates.get("requests_per_s")))
        if key == "errors":
            errors = server.get("errors")
            return Text(_str(errors), style="red" if isinstance(errors, int) and errors else "")
        if key == "sessions":
            return Text(MISSING if self.pinned is None else _str(self.pinned.get(str(server_id), 0)))
        return _text(server.get(key))


def load_bar(active: object, capacity: object, width: int, ascii_only: bool = False) -> Text:
    """`███░░░░░░░ 3/10`: requests in flight against capacity, green, then yellow from 70%, red from 90%.

    The numbers always follow the bar, so it reads without colour; `width` 0 gives the numbers only.
    """
    numbers = f"{_str(active)}/{_str(capacity)}"
    if not (isinstance(active, int) and isinstance(capacity, int) and capacity > 0):
        return Text(numbers)
    fraction = min(1.0, max(0.0, active / capacity))
    style = next(style for limit, style in BAR_STYLES if fraction < limit)
    if width <= 0:
        return Text(numbers, style=style if active else "")
    filled = max(1, round(fraction * width)) if active > 0 else 0
    full, empty = ("#", ".") if ascii_only else ("█", "░")
    return Text.assemble((full * filled, style), (empty * (width - filled), "dim"), " ", numbers)


def _board_width(layout: BoardLayout, rows: Sequence[Sequence[Text]]) -> int:
    widths = [
        max([len(BOARD_HEADERS[key][0])] + [row[index].cell_len for row in rows])
        for index, key in enumerate(layout.keys)
    ]
    return sum(widths) + layout.gap * (len(widths) - 1)


def _board_table(layout: BoardLayout, rows: Sequence[Sequence[Text]]) -> Table:
    table = Table(box=None, padding=(0, layout.gap, 0, 0), pad_edge=False, header_style="bold")
    for key in layout.keys:
        header, justify = BOARD_HEADERS[key]
        # Ids and URLs fold when the terminal is narrower than even the fallback: whole, never cut.
        folds = key in ("id", "url")
        table.add_column(header, justify=justify, no_wrap=not folds, overflow="fold" if folds else "ellipsis")
    for row in rows:
        table.add_row(*row)
    return table
