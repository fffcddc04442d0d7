"""The balancer's explanation (`lbctl route`) predicts its choice exactly and changes nothing."""

from __future__ import annotations

import random

import pytest

from lbd.balancer import Balancer
from lbd.config import Regions
from lbd.models import Health, ServerSpec
from lbd.registry import Registry
from lbd.sessions import SessionTable

REGIONS = Regions()


def balancer(mode: str) -> Balancer:
    registry = Registry(REGIONS.latency_ms)
    rng = random.Random(5)
    for i, region in enumerate(["us-east"] * 12 + ["eu-west"] * 3 + ["ca-central"] * 2):
        registry.register(ServerSpec(f"s{i:02}", "http", "127.0.0.1", 9000 + i, region, rng.randint(2, 20)))
    for server in registry.servers():
        server.state.active = rng.randint(0, server.spec.capacity)
        server.state.latency_ewma_ms = rng.uniform(1, 60)
        server.state.draining = rng.random() < 0.1
        if rng.random() < 0.1:
            server.state.health = Health.COOLDOWN
    return Balancer(registry, "dynamic" if mode == "dynamic" else "static", REGIONS, SessionTable(100, 10_000))


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_explain_predicts_choose_and_changes_nothing(mode: str) -> None:
    subject = balancer(mode)
    regions = ["us-east", "eu-west", "me-central", "oceania"]
    for i in range(300):
        client, region = f"client-{i}", regions[i % len(regions)]
        sessions_before = len(subject.sessions)
        explained = subject.explain(client, region, now=1.0)
        assert len(subject.sessions) == sessions_before  # explaining pins nobody
        assert subject.choose(client, region, now=1.0) is explained.server
        assert subject.explain(client, region, now=1.5).server is explained.server
        if mode == "dynamic":
            assert subject.explain(client, region, now=1.5).reason in ("sticky", "backup_nearly_full")
        assert explained.candidates, explained
