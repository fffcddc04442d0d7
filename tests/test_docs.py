"""The commands the docs show exist as shown: every `lbd …` and `lbctl …` in a code block or inline code of
the README and docs/ names a real command (and subcommand) and only flags that command takes.

Checked against the Typer apps' own click trees, so a renamed flag or command fails here before a
reader finds it. (What the commands do is the subject of the other tests.)
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer

from lbctl.main import app as lbctl_app
from lbd.__main__ import app as lbd_app

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS = {"lbd": typer.main.get_command(lbd_app), "lbctl": typer.main.get_command(lbctl_app)}
ENV_PREFIX = re.compile(r"^(?:[A-Z_]+=\S+\s+)+")


def shown_commands() -> list[tuple[str, str]]:
    """(where, command line) for each lbd/lbctl invocation in a code block or inline code;
    alternatives written `a | b` or `a / b` are each one."""
    found = []
    for path in DOCS:
        in_block = False
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith("```"):
                in_block = not in_block
                continue
            texts = [line.split("  #")[0]] if in_block else re.findall(r"`([^`]+)`", line)
            for text in texts:
                for alternative in re.split(r" \| | / ", ENV_PREFIX.sub("", text.strip())):
                    command = alternative.strip()
                    if command.split(" ", 1)[0] in PROGRAMS:
                        found.append((f"{path.name}:{number}", command))
    return found


def resolve(program: str, words: list[str]) -> Any:
    """The command the words name, walking groups in Typer's click tree; every flag must be one the
    command or a parent takes, and a word where a group expects its subcommand must be one."""
    command: Any = PROGRAMS[program]
    params = list(command.params)
    words = list(words)
    while words:
        word = words.pop(0)
        if word.startswith("-"):
            name = word.split("=", 1)[0]
            param = next((p for p in params if name in p.opts), None)
            assert param is not None or name in ("--help", "-h"), f"{program}: no option {name} here"
            if param is not None and not param.is_flag and "=" not in word and words:
                words.pop(0)  # its value
        elif hasattr(command, "commands"):
            assert word in command.commands, f"{program}: no command {word!r} (has {sorted(command.commands)})"
            command = command.commands[word]
            params += command.params
    return command


COMMANDS = shown_commands()


def test_the_docs_show_commands() -> None:
    assert len(COMMANDS) > 40  # the extraction itself works
    assert any(line.startswith("lbctl cluster") for _, line in COMMANDS)


@pytest.mark.parametrize("where, line", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_a_command_shown_in_the_docs_exists(where: str, line: str) -> None:
    cleaned = re.sub(r"\[|\]|\.\.\.", " ", line)  # optional parts are still parts
    words = shlex.split(cleaned, posix=True)
    resolve(words[0], words[1:])


def test_a_misspelt_command_or_flag_is_caught() -> None:
    with pytest.raises(AssertionError, match="no command 'nosuch'"):
        resolve("lbctl", ["--socket", "/tmp/x.sock", "nosuch"])
    with pytest.raises(AssertionError, match="no option --sever"):
        resolve("lbctl", ["sessions", "--sever", "s1"])
