"""The data side of `lbctl status --watch`: one sample per refresh, and the rates between two.

Pure: no socket, no clock, no terminal. main.py takes the samples (it owns the client and the
schedule), views.py draws a frame, output.py decides between a live screen and NDJSON lines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard


@dataclass(frozen=True, slots=True)
class Sample:
    """What lbd said at one refresh. `sessions` is None when lbd has no sessions summary."""

    monotonic: float
    time: float
    status: Mapping[str, Any]
    servers: Sequence[Mapping[str, Any]]
    sessions: Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class Frame:
    """One refresh: the sample and the rates since the previous one (None on the first frame)."""

    sample: Sample
    rates: Mapping[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        """The NDJSON line: `{"time", "status", "servers", "sessions", "rates"}`."""
        return {
            "time": round(self.sample.time, 3),
            "status": self.sample.status,
            "servers": list(self.sample.servers),
            "sessions": self.sample.sessions,
            "rates": self.rates,
        }


def frame(previous: Sample | None, current: Sample) -> Frame:
    return Frame(current, None if previous is None else rates(previous, current))


def rates(previous: Sample, current: Sample) -> dict[str, Any] | None:
    """Per-second rates from the counters' growth between two samples.

    `{"elapsed_s", "requests_per_s", "errors_per_s", "servers": {id: {"requests_per_s",
    "errors_per_s"}}}`: errors are 5xx answers overall and failed attempts per server. A counter
    that went down (lbd restarted, a server removed and registered again) or is missing gives None
    rather than a negative rate; a server new since the previous sample is absent from "servers".
    """
    elapsed = current.monotonic - previous.monotonic
    if elapsed <= 0:
        return None
    before = {server.get("id"): server for server in previous.servers}
    per_server: dict[str, dict[str, float | None]] = {}
    for server in current.servers:
        server_id = server.get("id")
        old = before.get(server_id)
        if not isinstance(server_id, str) or old is None:
            continue
        per_server[server_id] = {
            "requests_per_s": _rate(old.get("requests"), server.get("requests"), elapsed),
            "errors_per_s": _rate(old.get("errors"), server.get("errors"), elapsed),
        }
    old_requests = _mapping(previous.status.get("requests"))
    new_requests = _mapping(current.status.get("requests"))
    return {
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": _rate(old_requests.get("total"), new_requests.get("total"), elapsed),
        "errors_per_s": _rate(
            _mapping(old_requests.get("responses")).get("5xx"),
            _mapping(new_requests.get("responses")).get("5xx"),
            elapsed,
        ),
        "servers": per_server,
    }


def _rate(before: object, after: object, elapsed: float) -> float | None:
    if not (_is_count(before) and _is_count(after)) or after < before:
        return None
    return round((after - before) / elapsed, 2)


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}
