"""Shell completion scripts for lbctl, as `make completions` writes them into completions/.

The scripts call `lbctl` back at completion time, so they change only when the program name or
Typer's templates do; tests/test_lbctl.py regenerates them and fails when the committed ones drift.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

SCRIPT_FILES: Mapping[str, str] = {"bash": "lbctl.bash", "zsh": "_lbctl", "fish": "lbctl.fish"}


def completion_script(shell: str) -> str:
    """Ask lbctl the way a shell would (Typer spells the instruction `source_<shell>`)."""
    env = {**os.environ, "_LBCTL_COMPLETE": f"source_{shell}"}
    command = [sys.executable, "-m", "lbctl.main"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    # Typer starts some scripts with a blank line; zsh's compinit wants `#compdef` on the first.
    return result.stdout.strip() + "\n"


def write_completions(directory: Path) -> None:
    for shell, name in SCRIPT_FILES.items():
        (directory / name).write_text(completion_script(shell))


if __name__ == "__main__":
    write_completions(Path(sys.argv[1]))
