"""The only module that decides how results look: Rich for people, JSON for programs.

Results go to stdout and nothing else does, so `lbctl ... --json | jq` always sees clean JSON;
errors are one plain line on stderr that a person can read and a script can grep.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import TypeVar

from rich.console import Console, RenderableType

Data = TypeVar("Data")


def show(data: Data, as_json: bool, view: Callable[[Data], RenderableType]) -> None:
    """Print API data as JSON, or through its view for a person."""
    if as_json:
        print_json(data)
    else:
        print_renderable(view(data))


def print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def print_renderable(renderable: RenderableType) -> None:
    # highlight=False: colour carries meaning here, Rich's guesses about numbers and paths would not.
    Console(highlight=False).print(renderable)


def print_error(message: str) -> None:
    """`lbctl: error: <message>` on one line: never wrapped, never Rich markup."""
    one_line = " ".join(message.split())
    sys.stderr.write(f"lbctl: error: {one_line}\n")
