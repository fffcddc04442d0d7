"""Assertions about how lbctl speaks: one error line, exit codes, views rendered as text."""

from __future__ import annotations

import io
import subprocess

from rich.console import Console, RenderableType


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *fragments: str) -> str:
    """Exit `code`, nothing on stdout, one `lbctl: error:` line holding every fragment."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lbctl: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def render(renderable: RenderableType, width: int = 80) -> str:
    """A view as a plain-text terminal of `width` columns would show it."""
    out = io.StringIO()
    Console(file=out, width=width, no_color=True).print(renderable)
    return out.getvalue()
