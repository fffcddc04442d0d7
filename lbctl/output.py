"""The only module that decides how results look: Rich for people, JSON for programs.

Results go to stdout and nothing else does, so `lbctl ... --json | jq` always sees clean JSON;
errors are one plain line on stderr that a person can read and a script can grep.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console, RenderableType

Data = TypeVar("Data")


def show(
    data: Data,
    as_json: bool,
    view: Callable[[Data], RenderableType],
    json_of: Callable[[Data], object] | None = None,
) -> None:
    """Print API data as JSON (the part `json_of` picks, if given), or through its view for a person."""
    if as_json:
        print_json(data if json_of is None else json_of(data))
    else:
        print_renderable(view(data))


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


def print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def print_renderable(renderable: RenderableType) -> None:
    # highlight=False: colour carries meaning here, Rich's guesses about numbers and paths would not.
    Console(highlight=False).print(renderable)


def print_error(message: str) -> None:
    """`lbctl: error: <message>` on one line: never wrapped, never Rich markup."""
    one_line = " ".join(message.split())
    sys.stderr.write(f"lbctl: error: {one_line}\n")
