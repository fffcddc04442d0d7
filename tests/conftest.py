"""Shared fixtures: real backends and a real lbd process (see tests/harness)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.backends import Backend, backends
from tests.harness.daemon import Lbd, running_lbd


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
