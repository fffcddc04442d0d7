"""Shared fixtures: real backends and a real lbd process (see tests/harness)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.backends import Backend, backends
from tests.harness.daemon import CREATED_DIRECTORIES, Lbd, running_lbd


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test stale compiled modules: Python imports an extension before the .py beside it, so
    an lbd source edited after `make native` (which touches .venv/.native) would otherwise go untested."""
    root = Path(__file__).resolve().parent.parent
    compiled = list((root / "lbd").rglob("*.so"))
    if not compiled:
        return  # interpreted: the sources are what runs
    stamp = root / ".venv" / ".native"
    built = stamp.stat().st_mtime if stamp.exists() else max(p.stat().st_mtime for p in compiled)
    stale = [str(p.relative_to(root)) for p in (root / "lbd").rglob("*.py") if p.stat().st_mtime > built]
    if stale:
        pytest.exit(f"lbd's compiled modules are older than {', '.join(stale)}: run `make native` (make test does)", 2)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """tmp_path directories under one directory of this run's own (not pytest's shared
    /tmp/pytest-of-USER, which another run on the machine may be pruning), removed at the end."""
    if config.option.basetemp is None:
        config.option.basetemp = tempfile.mkdtemp(prefix="lb-pytest-", dir="/tmp")
        CREATED_DIRECTORIES.append(Path(config.option.basetemp))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The suite leaves nothing in /tmp: every short directory a test made (sockets, state) goes."""
    for directory in CREATED_DIRECTORIES:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _isolated_state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """lbd processes started without --state-dir keep state under $XDG_STATE_HOME/lbd: never the user's."""
    previous = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("xdg-state"))
    yield
    if previous is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = previous


@pytest.fixture
def three_backends() -> Iterator[list[Backend]]:
    with backends("s1", "s2", "s3") as started:
        yield started


@pytest.fixture
def static_lbd(three_backends: list[Backend]) -> Iterator[Lbd]:
    """lbd in static mode in front of three backends with capacities 10, 5, 5."""
    entries = [b.entry(capacity=c) for b, c in zip(three_backends, (10, 5, 5), strict=True)]
    with running_lbd(entries=entries) as daemon:
        yield daemon
