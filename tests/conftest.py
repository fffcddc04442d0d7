"""Shared fixtures: real backends and a real lbd process (see tests/harness)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.harness.backends import Backend, backends
from tests.harness.daemon import Lbd, running_lbd


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
