"""Prometheus samples as the tests read them: scraped from lbd's admin socket, keyed by name and labels."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.harness.daemon import Lbd

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def scrape(lbd: Lbd) -> Samples:
    status, body = lbd.request("GET", "/metrics")
    assert status == 200 and isinstance(body, str), body
    return parse(body)
