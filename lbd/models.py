"""A server's identity (immutable) and its live state (mutated only through the registry and proxy)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final
from urllib.parse import urlsplit

from lbd.errors import ValidationError

SERVER_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
MAX_CAPACITY: Final = 1_000_000
# Upper bounds (seconds) of the per-server upstream latency histogram's buckets, plus +Inf (Prometheus
# `le` semantics: a value equal to a bound counts in that bucket).
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# How fast a server's latency estimate forgets itself while the server gets no answers: after this long
# without one, what it still holds of its own past is 1/e, the rest is its region's typical latency
# (Linkerd's EWMA_DECAY and Envoy peak_ewma's decay_time, both 10 s).
LATENCY_DECAY_S: Final = 10.0


class Outcome(StrEnum):
    """How one forwarded request ended, as the proxy reports it (passive health feeds on these)."""

    OK = "ok"
    STATUS_5XX = "status_5xx"
    CONNECT_FAILED = "connect_failed"
    RESET = "reset"
    TIMEOUT = "timeout"
    BAD_RESPONSE = "bad_response"
    CLIENT_ABORTED = "client_aborted"

    @property
    def is_error(self) -> bool:
        return self not in (Outcome.OK, Outcome.CLIENT_ABORTED)


class Health(StrEnum):
    """Operational health; issue-4 health checks move servers between these."""

    HEALTHY = "healthy"
    FAILING = "failing"
    COOLDOWN = "cooldown"
    DEGRADED = "degraded"

    serving: bool  # its health admits traffic: healthy, or failing but not yet out (set below; read per request)


for _health in Health:  # a plain attribute, set once; ServerState keeps its own copy for the request path
    _health.serving = _health in (Health.HEALTHY, Health.FAILING)


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """What an operator declared about a server: it never changes while the server is registered."""

    id: str
    scheme: str
    host: str
    port: int
    region: str
    capacity: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "url": self.url,
            "hostname": self.host,
            "port": self.port,
            "region": self.region,
            "capacity": self.capacity,
        }


@dataclass(slots=True)
class RegionLatency:
    """The typical time to response headers of one region's servers, all their answers together.

    It stands in for a server not measured yet (as Envoy's and Linkerd's default RTT does, but
    learned per region rather than fixed), and is what an idle server's estimate decays toward.
    `configured_ms` is the region's configured latency: the typical value before any answer.
    """

    configured_ms: float = 0.0
    typical_ms: float = 0.0
    measured: bool = False


class StatusCounts:
    """Responses by status class, 1xx to 5xx (lbd's own 502/504 included). Five native integers
    when compiled: a list's items are Python ints, and each count would make a new one."""

    def __init__(self) -> None:
        self.informational = self.success = self.redirection = self.client_error = self.server_error = 0

    def add(self, status: int) -> None:
        """Count a status of 100-599 (lbd sends no other)."""
        if status < 300:
            if status >= 200:
                self.success += 1
            else:
                self.informational += 1
        elif status < 400:
            self.redirection += 1
        elif status < 500:
            self.client_error += 1
        else:
            self.server_error += 1

    def counts(self) -> list[int]:
        """1xx, 2xx, 3xx, 4xx, 5xx."""
        return [self.informational, self.success, self.redirection, self.client_error, self.server_error]


@dataclass(slots=True)
class ServerState:
    """What lbd observes about a server while it runs (times are monotonic seconds)."""

    _health: Health = Health.HEALTHY
    serving: bool = True  # `health.serving`, kept beside it: read per request (an enum attribute is slow)
    draining: bool = False
    active: int = 0
    requests: int = 0
    errors: int = 0
    latency_ewma_ms: float = 0.0
    latency_at: float = -1.0  # when the last latency sample came; negative: never measured
    consecutive_failures: int = 0
    consecutive_passes: int = 0
    passive_failures: int = 0
    cooldown_ms: int = 0
    cooldown_until: float = 0.0
    last_check_at: float | None = None
    last_check_ok: bool | None = None
    last_check_detail: str = ""
    checks_passed: int = 0
    checks_failed: int = 0
    ejections: int = 0
    last_transition_at: float | None = None
    last_transition_reason: str = ""
    responses: StatusCounts = field(default_factory=StatusCounts)  # to clients, from this server or for it
    # time to response headers: counts per LATENCY_BUCKETS_S bucket (not cumulative; last is +Inf)
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    latency_sum_s: float = 0.0

    @property
    def health(self) -> Health:
        return self._health

    @health.setter
    def health(self, health: Health) -> None:
        self._health = health
        self.serving = health.serving

    @property
    def health_in_cooldown(self) -> bool:
        return self.health in (Health.COOLDOWN, Health.DEGRADED)

    def latency_estimate_ms(self, typical_ms: float, now: float) -> float:
        """The latency this server is expected to answer in: its EWMA, decaying toward `typical_ms`
        (its region's) for as long as it gets no answers; `typical_ms` itself when never measured.
        So an estimate never keeps a server from being measured again."""
        if self.latency_at < 0.0:
            return typical_ms
        idle = now - self.latency_at
        if idle <= 0.0:
            return self.latency_ewma_ms
        return typical_ms + (self.latency_ewma_ms - typical_ms) * math.exp(-idle / LATENCY_DECAY_S)


@dataclass(slots=True)
class Server:
    spec: ServerSpec
    state: ServerState = field(default_factory=ServerState)
    region_latency: RegionLatency = field(default_factory=RegionLatency)  # shared by the region's servers

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def in_rotation(self) -> bool:
        """Takes new requests: its health admits traffic and it is not draining. The one meaning of
        "in rotation" everywhere (`lbctl servers`, `lbctl status`, routing)."""
        state = self.state
        return state.serving and not state.draining

    def to_json(self, now: float, wall_offset: float) -> dict[str, Any]:
        """`now` is the monotonic clock; `wall_offset` turns monotonic times into Unix times."""
        state = self.state

        def wall(moment: float | None) -> float | None:
            return None if moment is None else round(moment + wall_offset, 3)

        in_cooldown = state.health_in_cooldown and state.cooldown_until > now
        return {
            **self.spec.to_json(),
            "health": state.health.value,
            "in_rotation": self.in_rotation,
            "draining": state.draining,
            "active": state.active,
            "requests": state.requests,
            "errors": state.errors,
            "latency_ewma_ms": round(state.latency_ewma_ms, 3),
            "checks": {
                "last_at": wall(state.last_check_at),
                "last_ok": state.last_check_ok,
                "last_detail": state.last_check_detail,
                "passed": state.checks_passed,
                "failed": state.checks_failed,
                "consecutive_failures": state.consecutive_failures,
                "consecutive_passes": state.consecutive_passes,
                "passive_failures": state.passive_failures,
            },
            "cooldown_remaining_s": round(state.cooldown_until - now, 3) if in_cooldown else 0.0,
            "ejections": state.ejections,
            "last_transition_at": wall(state.last_transition_at),
            "last_transition_reason": state.last_transition_reason,
        }


SEED_FIELDS = ("id", "hostname", "port", "region", "capacity", "url")


def parse_server(entry: object, known_regions: frozenset[str], where: str = "server") -> ServerSpec:
    """Validate one seed-format entry `{id, hostname, port, region, capacity, url}`.

    `url` may be omitted (derived from hostname + port); when both are given they must agree, so a
    typo in one of them cannot silently send traffic to the wrong place.
    """
    if not isinstance(entry, dict):
        raise ValidationError(f"{where}: expected a JSON object, got {_kind(entry)}")
    unknown = sorted(set(entry) - set(SEED_FIELDS))
    if unknown:
        raise ValidationError(
            f"{where}: unknown field {unknown[0]!r}; allowed fields: {', '.join(SEED_FIELDS)}", unknown[0]
        )
    server_id = _server_id(entry, where)
    where = f"{where} {server_id!r}"
    capacity = _capacity(entry, where)
    region = _region(entry, where, known_regions)
    scheme, host, port = _address(entry, where)
    return ServerSpec(server_id, scheme, host, port, region, capacity)


def _server_id(entry: dict[str, Any], where: str) -> str:
    if "id" not in entry:
        raise ValidationError(f"{where}: missing field 'id'", "id")
    value = entry["id"]
    if not isinstance(value, str) or not SERVER_ID_PATTERN.fullmatch(value):
        raise ValidationError(
            f"{where}: field 'id' must be 1-64 characters of letters, digits, '.', '_', ':' or '-' "
            f"starting with a letter or digit; got {value!r}",
            "id",
        )
    return value


def _capacity(entry: dict[str, Any], where: str) -> int:
    if "capacity" not in entry:
        raise ValidationError(f"{where}: missing field 'capacity'", "capacity")
    value = entry["capacity"]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CAPACITY:
        raise ValidationError(
            f"{where}: field 'capacity' must be a positive integer (1..{MAX_CAPACITY}); got {value!r}",
            "capacity",
        )
    return value


def _region(entry: dict[str, Any], where: str, known_regions: frozenset[str]) -> str:
    if "region" not in entry:
        raise ValidationError(f"{where}: missing field 'region'", "region")
    value = entry["region"]
    if value not in known_regions:
        raise ValidationError(
            f"{where}: field 'region' is {value!r}, which is not a configured region; "
            f"known regions: {', '.join(sorted(known_regions))}",
            "region",
        )
    return str(value)


def _address(entry: dict[str, Any], where: str) -> tuple[str, str, int]:
    hostname = entry.get("hostname")
    port = entry.get("port")
    if hostname is not None and (not isinstance(hostname, str) or not hostname):
        raise ValidationError(f"{where}: field 'hostname' must be a non-empty string; got {hostname!r}", "hostname")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535):
        raise ValidationError(f"{where}: field 'port' must be an integer 1..65535; got {port!r}", "port")
    url = entry.get("url")
    if url is None:
        if hostname is None or port is None:
            missing = "hostname" if hostname is None else "port"
            raise ValidationError(f"{where}: missing field 'url' (or both 'hostname' and 'port')", missing)
        return "http", hostname, port
    scheme, url_host, url_port = parse_url(url, where)
    if hostname is not None and hostname.lower() != url_host.lower():
        raise ValidationError(
            f"{where}: field 'hostname' is {hostname!r} but 'url' names host {url_host!r}; they must agree",
            "hostname",
        )
    if port is not None and port != url_port:
        raise ValidationError(
            f"{where}: field 'port' is {port} but 'url' names port {url_port}; they must agree", "port"
        )
    return scheme, url_host, url_port


def parse_url(url: object, where: str) -> tuple[str, str, int]:
    """Split an upstream base URL; only `http(s)://host[:port]` with no path is meaningful here."""
    allowed = "allowed: http://HOST:PORT or https://HOST:PORT"
    if not isinstance(url, str):
        raise ValidationError(f"{where}: field 'url' must be a string; {allowed}; got {url!r}", "url")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValidationError(f"{where}: field 'url' {url!r} is not a valid URL ({exc}); {allowed}", "url") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError(f"{where}: field 'url' {url!r} is not an http(s) URL with a host; {allowed}", "url")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise ValidationError(f"{where}: field 'url' {url!r} has a path, query or credentials; {allowed}", "url")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    if port == 0:
        raise ValidationError(f"{where}: field 'url' {url!r} has port 0; {allowed}", "url")
    return parts.scheme, parts.hostname, port


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(
        type(value), type(value).__name__
    )
