"""The only module that decides how results look: Rich for people, JSON for programs.

Results go to stdout and nothing else does, so `lbctl ... --json | jq` always sees clean JSON;
errors are one plain line on stderr that a person can read and a script can grep.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

Data = TypeVar("Data")


WIDE_COLUMNS = 4096  # `-o wide`: no table needs more, and none is cut to the terminal's width


def show(
    data: Data,
    as_json: bool,
    view: Callable[[Data], RenderableType],
    json_of: Callable[[Data], object] | None = None,
    wide: bool = False,
) -> None:
    """Print API data as JSON (the part `json_of` picks, if given), or through its view for a person
    (`wide`: as wide as the view needs, lines longer than the terminal left to it to wrap)."""
    if as_json:
        print_json(data if json_of is None else json_of(data))
    else:
        print_renderable(view(data), WIDE_COLUMNS if wide else None)


def show_text(data: Data, as_json: bool, to_text: Callable[[Data], str]) -> None:
    """Like `show`, for results that are a file's text (a config): printed as is, never as markup."""
    if as_json:
        print_json(data)
    else:
        print_text(to_text(data))


@contextmanager
def waiting(message: str) -> Iterator[None]:
    """A spinner on stderr while a slow call runs, only when a person watches the terminal.

    Nothing is written when stderr is not a terminal, so scripts still see stdout only.
    """
    console = Console(stderr=True, highlight=False)
    if not console.is_terminal:
        yield
        return
    with console.status(message):
        yield


def watch(
    frames: Iterable[Data],
    as_json: bool,
    view: Callable[[Data], RenderableType],
    json_of: Callable[[Data], object],
) -> None:
    """Show each frame as it comes until the frames end, Ctrl-C, or stdout is closed.

    --json: one compact JSON object per line (NDJSON), flushed at once so `| jq` sees each
    refresh. A terminal: a full-screen live view redrawn in place, restored on exit. Anything
    else (a pipe, a file): each frame printed after the previous one. Ctrl-C and a closed stdout
    (`| head`) are the normal ways to stop, so they end quietly; errors from fetching a frame
    propagate, after the terminal is restored, and become main's one-line error.
    """
    try:
        if as_json:
            for data in frames:
                sys.stdout.write(json.dumps(json_of(data), separators=(",", ":")) + "\n")
                sys.stdout.flush()
            return
        console = _WatchConsole(highlight=False)
        if not console.is_terminal:
            for index, data in enumerate(frames):
                if index:
                    console.print()
                console.print(view(data))
                console.file.flush()
            return
        _live(console, iter(frames), view)
    except KeyboardInterrupt:
        return
    except BrokenPipeError:
        # Nobody reads stdout any more: point it at /dev/null so the interpreter's final flush
        # does not complain, and end as a successful reader-stopped pipeline stage would.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


class _WatchConsole(Console):
    def on_broken_pipe(self) -> None:
        # Rich would exit 1 here; for a watch a closed stdout is a reader that has seen enough.
        raise BrokenPipeError


def _live(console: Console, frames: Iterator[Data], view: Callable[[Data], RenderableType]) -> None:
    # The first frame is fetched before the screen switches, so an lbd that is not there is a
    # plain error line, not a flash of an empty screen.
    first = next(frames, None)
    if first is None:
        return
    hint = Text("Ctrl-C to quit", style="dim")
    with Live(Group(view(first), Text(), hint), console=console, screen=True, auto_refresh=False) as live:
        for data in frames:
            live.update(Group(view(data), Text(), hint), refresh=True)


def print_text(text: str) -> None:
    """Text exactly as given: no markup, no wrapping (a config file must survive the trip)."""
    sys.stdout.write(text)


def print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def print_renderable(renderable: RenderableType, width: int | None = None) -> None:
    # highlight=False: colour carries meaning here, Rich's guesses about numbers and paths would not.
    Console(highlight=False, width=width).print(renderable)


def print_note(message: str) -> None:
    """`lbctl: note: <message>` on stderr: worth knowing, not an error (the exit code stays 0)."""
    sys.stderr.write(f"lbctl: note: {' '.join(message.split())}\n")


def print_error(message: str) -> None:
    """`lbctl: error: <message>` on one line: never wrapped, never Rich markup."""
    one_line = " ".join(message.split())
    sys.stderr.write(f"lbctl: error: {one_line}\n")
