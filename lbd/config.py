"""Configuration as frozen data, resolved once: embedded defaults < TOML file < command-line flags.

Every key of the TOML file mirrors a `lbd start` flag (`--timeout-base-ms` is `timeout_base_ms`), and
every mistake is reported with the file, the key and what is allowed.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

from lbd.errors import ConfigError, ValidationError
from lbd.models import ServerSpec, parse_server
from lbd.proxy.headers import REQUEST_HEADERS

T = TypeVar("T")
Mode = Literal["static", "dynamic"]
MODES: tuple[Mode, ...] = ("static", "dynamic")
# What identifies a request that brings no client-id header: nothing (400), the client's IP address,
# or a cookie lbd issues (HAProxy's `balance hdr()` falls back likewise; Traefik and HAProxy stick
# browsers with a cookie)
CLIENT_ID_FALLBACKS = ("reject", "client-ip", "cookie")
COOKIE_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")  # an RFC 6265 cookie-name (a token)
FIELD_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")  # an HTTP field name (RFC 9110 token)
ACCESS_LOG_FORMATS = ("text", "json")

DEFAULT_LATENCY_MS: Mapping[str, int] = MappingProxyType(
    {"us-east": 10, "eu-west": 50, "asia-south": 100, "oceania": 150, "ca-central": 30}
)
DEFAULT_PROXIMITY: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "us-east": ("us-east", "ca-central", "eu-west", "asia-south", "oceania"),
        "us-west": ("us-east", "ca-central", "eu-west", "asia-south", "oceania"),
        "ca-central": ("ca-central", "us-east", "eu-west", "asia-south", "oceania"),
        "eu-west": ("eu-west", "us-east", "ca-central", "asia-south", "oceania"),
        "me-central": ("eu-west", "asia-south", "us-east", "ca-central", "oceania"),
        "asia-south": ("asia-south", "oceania", "eu-west", "us-east", "ca-central"),
        "oceania": ("oceania", "asia-south", "eu-west", "us-east", "ca-central"),
    }
)


def default_admin_socket() -> Path:
    """`$LBD_SOCKET`, else `$XDG_RUNTIME_DIR/lbd.sock`, else `/tmp/lbd-$UID.sock` (shared with lbctl)."""
    if env := os.environ.get("LBD_SOCKET"):
        return Path(env)
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(runtime) / "lbd.sock"
    return Path(f"/tmp/lbd-{os.getuid()}.sock")


def default_state_dir() -> Path:
    """`$XDG_STATE_HOME/lbd`, else `~/.local/state/lbd` (the XDG base directory rule)."""
    state_home = os.environ.get("XDG_STATE_HOME", "")
    base = Path(state_home) if os.path.isabs(state_home) else Path.home() / ".local" / "state"
    return base / "lbd"


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, where: str) -> Address:
    """`HOST:PORT` or `[V6]:PORT`; port 0 asks the kernel for a free port (tests use it)."""
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{where}: {text!r} is not HOST:PORT (for example 127.0.0.1:8080 or [::1]:8080)")
    return Address(host, int(port_text))


@dataclass(frozen=True, slots=True)
class Regions:
    """Region latencies (ms, added to each upstream timeout) and each client region's fallback order."""

    latency_ms: Mapping[str, int] = field(default_factory=lambda: DEFAULT_LATENCY_MS)
    proximity: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: DEFAULT_PROXIMITY)

    @property
    def server_regions(self) -> frozenset[str]:
        """Regions a server may be placed in: those with a known latency."""
        return frozenset(self.latency_ms)


@dataclass(frozen=True, slots=True)
class CertificateFiles:
    """One certificate (its chain, leaf first) and its private key, PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """`[tls]`: the HTTPS listener beside the plain one. Off (`listen` None) by default."""

    listen: Address | None = None
    cert: Path | None = None  # the default certificate; `certificates` add more, chosen by SNI
    key: Path | None = None
    certificates: tuple[CertificateFiles, ...] = ()
    client_ca: Path | None = None  # mutual TLS: only clients with a certificate this CA verifies
    client_subject_header: str = "X-Client-Cert-Subject"  # carries a verified client's subject to servers
    session_tickets: bool = True  # TLS 1.3 tickets (and 1.2 ones) for resumption by this process

    @property
    def pairs(self) -> tuple[CertificateFiles, ...]:
        """Every certificate in order, the default first: `cert`/`key`, then `certificates`."""
        single = () if self.cert is None or self.key is None else (CertificateFiles(self.cert, self.key),)
        return single + self.certificates


@dataclass(frozen=True, slots=True)
class HealthSettings:
    """`[health]`: active checks (HAProxy's inter/fall/rise) and passive outlier detection."""

    interval_ms: int = field(default=2000, metadata={"min": 50})
    timeout_ms: int = field(default=1000, metadata={"min": 10})
    fall: int = field(default=3, metadata={"min": 1})
    rise: int = field(default=2, metadata={"min": 1})
    cooldown_ms: int = 120_000
    max_cooldown_ms: int = 600_000
    path: str = "/health"
    passive_fall: int = field(default=3, metadata={"min": 1})
    passive_5xx: bool = False
    panic_threshold: float = 0.5


@dataclass(frozen=True, slots=True)
class FailoverSettings:
    """`[failover]`: how dynamic mode lets clients leave a region short of capacity and brings them
    back (docs/routing-at-scale.md). A region's load is its requests in flight per unit of capacity in
    rotation; a new choice takes the first region of the client's proximity order with room: the
    client's home region (the first of its order) below `home_max_load`, any other below
    `fallback_max_load`."""

    home_max_load: float = field(default=0.9, metadata={"min": 0.05, "max": 1.0})
    fallback_max_load: float = field(default=0.8, metadata={"min": 0.05, "max": 1.0})
    # a session away from its home region goes back once the home region has had room this long, ...
    failback: bool = True
    failback_stable_ms: int = 30_000
    # ... the share of away clients allowed back growing from 0 to all over this long (a client's share
    # is fixed by its id's hash, so `lbctl route` knows whose turn it is)
    failback_ramp_ms: int = 60_000


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """What one client may send or hold open; each breach is answered (status in the comment), the
    connection closed and the breach counted. Defaults follow HAProxy, Envoy and nginx."""

    # client connections open at once; beyond it, 503 (HAProxy maxconn)
    max_connections: int = field(default=16_384, metadata={"min": 1})
    # 414 (nginx large_client_header_buffers: 8k)
    max_request_line_bytes: int = field(default=8192, metadata={"min": 64})
    # request line + headers; 431 (Envoy max_request_headers_kb: 60)
    max_header_bytes: int = field(default=65_536, metadata={"min": 1024})
    # header fields; 431 (Envoy max_headers_count: 100, HAProxy maxhdr: 101)
    max_headers: int = field(default=100, metadata={"min": 8})
    max_body_bytes: int = 1 << 30  # 413; 0 means no limit (nginx client_max_body_size)
    # to receive a request head; 408 (HAProxy timeout http-request)
    header_timeout_ms: int = field(default=10_000, metadata={"min": 100})
    # idle between requests, then closed (nginx keepalive_timeout)
    keepalive_timeout_ms: int = field(default=60_000, metadata={"min": 100})


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """`[cluster]`: the Redis (or Valkey) several lbd instances share servers, mode and sessions
    through. Off (`url` None) by default: one instance with its state directory."""

    url: str | None = None  # redis://, rediss:// or unix://, without its password (see `password`)
    name: str = "default"  # a key prefix: several clusters can share one Redis
    instance: str | None = None  # this instance's name; default HOSTNAME:PORT of the proxy listener
    # from the URL or env LBD_CLUSTER_PASSWORD; never shown, dumped or logged (so not in the repr)
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        """How a message names it: never with the password."""
        if self.url is None:
            return "unset"
        return f"{self.url} (name {self.name!r}, instance {self.instance or 'HOSTNAME:PORT'})"


CLUSTER_SCHEMES = ("redis", "rediss", "unix")
CLUSTER_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def _keys(settings: type) -> tuple[str, ...]:
    """A settings table's keys: its dataclass fields, in declaration order (the file's order)."""
    return tuple(f.name for f in fields(settings))


def _int_minimums(settings: type) -> dict[str, int]:
    """The integer keys of a settings table, each with its smallest allowed value (0 unless declared)."""
    return {f.name: f.metadata.get("min", 0) for f in fields(settings) if f.type == "int"}


HEALTH_KEYS = _keys(HealthSettings)
HEALTH_INT_KEYS = _int_minimums(HealthSettings)
FAILOVER_KEYS = _keys(FailoverSettings)
FAILOVER_INT_KEYS = _int_minimums(FailoverSettings)
FAILOVER_SHARES = {
    f.name: (f.metadata["min"], f.metadata["max"]) for f in fields(FailoverSettings) if f.type == "float"
}
LIMIT_KEYS = _int_minimums(ClientLimits)


@dataclass(frozen=True, slots=True)
class Config:
    mode: Mode = "static"
    servers: Path | None = None
    listen: Address | None = Address("127.0.0.1", 8080)  # None: off (`listen = false`), TLS only
    workers: int = 1  # proxy processes; above 1, a supervisor runs them (lbd/workers/)
    admin_socket: Path = field(default_factory=default_admin_socket)
    state_dir: Path = field(default_factory=default_state_dir)
    admin_listen: Address | None = None
    admin_token: str | None = None
    metrics_listen: Address | None = None
    timeout_base_ms: int = 2000
    shutdown_grace_ms: int = 10_000
    client_timeout_ms: int = 60_000
    drain_grace_ms: int = 30_000
    default_client_region: str | None = None
    client_id_fallback: str = "reject"
    client_id_cookie: str = "lbd_client"
    session_idle_timeout: int = 9000
    max_sessions: int = 1_000_000
    retry_body_limit_bytes: int = 64 * 1024
    non_idempotent_reuse_ms: int = 1000  # a POST takes a pooled connection only if it served this recently
    splice_responses: bool = True  # large response bodies moved in the kernel (HAProxy's option splice-response)
    access_log: str | None = None  # a file to append one line per request to, "-" for stdout; None: off
    access_log_format: str = "text"  # or "json"
    access_log_sample: float = 1.0  # the fraction of clients whose successful requests are logged
    access_log_buffer: int = field(default=16_384, metadata={"min": 256})  # lines waiting for the writer
    tls: TlsSettings = field(default_factory=TlsSettings)
    regions: Regions = field(default_factory=Regions)
    health: HealthSettings = field(default_factory=HealthSettings)
    limits: ClientLimits = field(default_factory=ClientLimits)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    failover: FailoverSettings = field(default_factory=FailoverSettings)

    def upstream_timeout_s(self, region: str) -> float:
        """An upstream attempt's timeout for a server in `region`: timeout_base_ms + its latency."""
        return (self.timeout_base_ms + self.regions.latency_ms.get(region, 0)) / 1000.0


TOP_LEVEL_KEYS = _keys(Config)
ACCESS_LOG_MIN_BUFFER = _int_minimums(Config)["access_log_buffer"]  # one batch handed to the writer
INTEGER_KEYS = tuple(key for key in _int_minimums(Config) if key != "workers")
MAX_WORKERS = 256
MIN_TOKEN_LENGTH = 16
REGION_KEYS = ("latency_ms", "proximity")
# Bound to a socket or a directory when lbd starts: a reload that changes one is refused (restart lbd).
RESTART_KEYS = (
    "listen", "workers", "admin_socket", "admin_listen", "metrics_listen", "state_dir", "cluster", "tls.listen",
)  # fmt: skip
CLUSTER_KEYS = ("url", "name", "instance")
TLS_KEYS = _keys(TlsSettings)
CERTIFICATE_KEYS = _keys(CertificateFiles)
HIDDEN = "(hidden)"


@dataclass(frozen=True, slots=True)
class ConfigSource:
    """Where the running config comes from, so a reload reads it exactly as the start did: the file,
    then the command-line flags (and env) that override it."""

    path: Path | None
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def load(self) -> tuple[Config, list[ServerSpec]]:
        """The config and the servers file it names, validated; ConfigError naming the first problem."""
        config = load_config(self.path, self.overrides)
        return config, load_seed(config)


def load_config(path: Path | None, overrides: Mapping[str, Any]) -> Config:
    """Build the effective config: defaults, then the TOML file, then non-None flag overrides."""
    raw: dict[str, Any] = {}
    where = "config"
    if path is not None:
        where = str(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    given = {key: value for key, value in overrides.items() if value is not None}
    if isinstance(given.get("cluster"), str) and isinstance(raw.get("cluster"), dict):
        given["cluster"] = {**raw["cluster"], "url": given["cluster"]}  # --cluster URL keeps [cluster]'s name
    raw.update(given)
    return _config_from_mapping(raw, where, base_dir=path.parent if path else Path.cwd())


def config_from_mapping(raw: Mapping[str, Any], where: str) -> Config:
    """A config in the TOML file's shape (config_to_mapping's: its paths are absolute), checked as a
    file would be."""
    return _config_from_mapping(raw, where, Path.cwd())


def _config_from_mapping(raw: Mapping[str, Any], where: str, base_dir: Path) -> Config:
    raw = _nested_flags(raw)
    _reject_unknown(raw, TOP_LEVEL_KEYS, where)
    parsers: dict[str, Callable[[object, str], Any]] = {
        "mode": _mode,
        "servers": lambda value, at: _path(value, at, base_dir),
        "admin_socket": lambda value, at: _path(value, at, base_dir),
        "state_dir": lambda value, at: _path(value, at, base_dir),
        "listen": _listen,
        "workers": _workers,
        "admin_listen": _address,
        "metrics_listen": _address,
        "tls": lambda value, at: _tls(value, at, base_dir),
        "admin_token": _token,
        "regions": _regions,
        "health": _health,
        "limits": _limits,
        "cluster": _cluster,
        "failover": _failover,
        "splice_responses": _boolean,
        "client_id_fallback": _client_id_fallback,
        "client_id_cookie": _cookie_name,
        "access_log": lambda value, at: _access_log(value, at, base_dir),
        "access_log_format": _access_log_format,
        "access_log_sample": _fraction,
        **dict.fromkeys(INTEGER_KEYS, _non_negative_int),
        "access_log_buffer": _access_log_buffer,
    }
    values = {key: parse(raw[key], f"{where}: {key}") for key, parse in parsers.items() if key in raw}
    config = replace(Config(), **values)
    if config.max_sessions < 1:
        raise ConfigError(f"{where}: max_sessions must be at least 1")
    if "default_client_region" in raw:  # after regions: it must be one of them
        region = raw["default_client_region"]
        if region not in config.regions.proximity:
            known = ", ".join(sorted(config.regions.proximity))
            raise ConfigError(f"{where}: default_client_region {region!r} is not a client region; known: {known}")
        config = replace(config, default_client_region=region)
    if config.admin_listen is not None and config.admin_token is None:
        raise ConfigError(
            f"{where}: admin_listen needs admin_token (or env LBD_ADMIN_TOKEN): "
            "the TCP admin listener never runs without authentication"
        )
    if config.listen is None and config.tls.listen is None:
        raise ConfigError(f"{where}: listen is off and tls.listen is not set: lbd would have no listener")
    if config.mode == "dynamic":
        check_workers_share_sessions(config, where)
    return config


def check_workers_share_sessions(config: Config, where: str) -> None:
    """Dynamic mode pins each client to a server; several workers must share those pins, and they
    do through the cluster store. Without one lbd refuses to start rather than pin a client to a
    different server in each worker."""
    if config.workers > 1 and config.cluster.url is None:
        raise ConfigError(
            f"{where}: dynamic mode with workers = {config.workers} needs the sessions shared between "
            "workers: add --cluster redis://HOST:PORT/0 (TOML [cluster] url), or run workers = 1"
        )


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, as nginx's `worker_processes auto`)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _workers(value: object, where: str) -> int:
    if value == "auto":
        return usable_cpus()
    if isinstance(value, str) and value.isdigit():
        value = int(value)  # --workers 4 arrives as a string
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ConfigError(f'{where}: must be "auto" or a whole number from 1 to {MAX_WORKERS}; got {value!r}')
    return value


def _cluster(raw: object, where: str) -> ClusterSettings:
    """`[cluster]` (or `--cluster URL`, a string): where the shared state lives, checked here so a
    bad URL is one line from `lbd check-config`; the password is taken out of the URL at once."""
    if isinstance(raw, str):
        raw = {"url": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table with keys {', '.join(CLUSTER_KEYS)}")
    _reject_unknown(raw, CLUSTER_KEYS, where)
    settings = ClusterSettings()
    if "name" in raw:
        name = raw["name"]
        if not isinstance(name, str) or not CLUSTER_NAME.fullmatch(name):
            raise ConfigError(f"{where}.name: must be 1-64 letters, digits, '.', '_' or '-'; got {name!r}")
        settings = replace(settings, name=name)
    if "instance" in raw:
        instance = raw["instance"]
        if not isinstance(instance, str) or not 1 <= len(instance) <= 128 or any(c.isspace() for c in instance):
            raise ConfigError(f"{where}.instance: must be 1-128 characters without spaces; got {instance!r}")
        settings = replace(settings, instance=instance)
    if raw.get("url") is not None:
        url, password = _cluster_url(raw["url"], f"{where}.url")
        settings = replace(settings, url=url, password=password)
    return settings


def _cluster_url(value: object, where: str) -> tuple[str, str | None]:
    """The URL without its password, and the password (from the URL, else env LBD_CLUSTER_PASSWORD)."""
    allowed = "redis://[:PASSWORD@]HOST[:PORT][/DB], rediss://... (TLS) or unix:///PATH/redis.sock"
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: must be a URL ({allowed})")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises for a port that is not a number
    except ValueError as exc:
        raise ConfigError(f"{where}: not a valid URL ({exc}); allowed: {allowed}") from None
    if parts.scheme not in CLUSTER_SCHEMES:
        scheme = parts.scheme or "(none)"
        raise ConfigError(f"{where}: scheme {scheme!r} is not one of {', '.join(CLUSTER_SCHEMES)}; allowed: {allowed}")
    if parts.scheme == "unix" and not parts.path:
        raise ConfigError(f"{where}: a unix:// URL needs the socket's path; allowed: {allowed}")
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"{where}: the URL has no host; allowed: {allowed}")
    database = parts.path.strip("/") if parts.scheme != "unix" else ""
    if database and not database.isdigit():
        raise ConfigError(f"{where}: the database {database!r} is not a number; allowed: {allowed}")
    password = parts.password or os.environ.get("LBD_CLUSTER_PASSWORD") or None
    netloc = parts.hostname or ""
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    if parts.hostname and ":" in parts.hostname:
        netloc = netloc.replace(parts.hostname, f"[{parts.hostname}]")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, "")), password


def _nested_flags(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    """Flags that set a key of a table (`--tls-cert` is `tls.cert`) go into that table, over the file's."""
    dotted = [key for key in raw if "." in key]
    if not dotted:
        return raw
    merged = {key: value for key, value in raw.items() if key not in dotted}
    for key in dotted:
        table, name = key.split(".", 1)
        prior = merged.get(table)
        merged[table] = {**(prior if isinstance(prior, dict) else {}), name: raw[key]}
    return merged


def _listen(value: object, where: str) -> Address | None:
    """The plain listener's address, or off: `false` in the file, `--listen off` (TLS only)."""
    if value is False or value == "off":
        return None
    return _address(value, where)


def _tls(raw: object, where: str, base_dir: Path) -> TlsSettings:
    """`[tls]`; the certificate files themselves are read by lbd/tls.py (check-config, start, reload)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table with keys {', '.join(TLS_KEYS)}")
    _reject_unknown(raw, TLS_KEYS, where)
    paths: dict[str, Any] = {
        key: _path(raw[key], f"{where}.{key}", base_dir) for key in ("cert", "key", "client_ca") if raw.get(key)
    }
    settings = replace(TlsSettings(), **paths)
    if raw.get("listen") is not None:
        settings = replace(settings, listen=_address(raw["listen"], f"{where}.listen"))
    if (settings.cert is None) != (settings.key is None):
        given, missing = ("cert", "key") if settings.key is None else ("key", "cert")
        raise ConfigError(f"{where}: {given} is set but {missing} is not; a certificate needs both")
    if "certificates" in raw:
        certificates = _certificate_list(raw["certificates"], f"{where}.certificates", base_dir)
        settings = replace(settings, certificates=certificates)
    if "client_subject_header" in raw:
        name = raw["client_subject_header"]
        if not isinstance(name, str) or not FIELD_NAME.fullmatch(name):
            raise ConfigError(f"{where}.client_subject_header: must be a header name (a token); got {name!r}")
        if name.lower().encode() in REQUEST_HEADERS:
            # its kind would become "dropped": a framing or routing field of every request with it
            raise ConfigError(
                f"{where}.client_subject_header: {name!r} is a field lbd reads or writes itself (framing, "
                "hop-by-hop, routing, Host, Via, X-Forwarded-*); choose another name, e.g. X-Client-Cert-Subject"
            )
        settings = replace(settings, client_subject_header=name)
    if "session_tickets" in raw:
        settings = replace(settings, session_tickets=_boolean(raw["session_tickets"], f"{where}.session_tickets"))
    if settings.listen is not None and not settings.pairs:
        raise ConfigError(f"{where}: listen is set but no certificate is: set cert and key, or [[tls.certificates]]")
    if settings.listen is None and (settings.pairs or settings.client_ca is not None):
        raise ConfigError(f"{where}: certificates are set but listen is not: set tls.listen (HOST:PORT)")
    return settings


def _certificate_list(raw: object, where: str, base_dir: Path) -> tuple[CertificateFiles, ...]:
    if not isinstance(raw, list) or not all(isinstance(entry, dict) for entry in raw):
        raise ConfigError(f"{where}: must be a list of tables with keys {', '.join(CERTIFICATE_KEYS)}")
    pairs: list[CertificateFiles] = []
    for index, entry in enumerate(raw):
        at = f"{where}[{index}]"
        _reject_unknown(entry, CERTIFICATE_KEYS, at)
        missing = [key for key in CERTIFICATE_KEYS if key not in entry]
        if missing:
            raise ConfigError(f"{at}: {missing[0]} is missing; each certificate needs cert and key")
        cert, key = (_path(entry[name], f"{at}.{name}", base_dir) for name in CERTIFICATE_KEYS)
        pairs.append(CertificateFiles(cert, key))
    return tuple(pairs)


def _mode(value: object, where: str) -> Mode:
    if value not in MODES:
        raise ConfigError(f"{where}: must be one of {', '.join(MODES)}; got {value!r}")
    return value


def _client_id_fallback(value: object, where: str) -> str:
    if value not in CLIENT_ID_FALLBACKS:
        raise ConfigError(f"{where}: must be one of {', '.join(CLIENT_ID_FALLBACKS)}; got {value!r}")
    return str(value)


def _cookie_name(value: object, where: str) -> str:
    if not isinstance(value, str) or not COOKIE_NAME.fullmatch(value):
        raise ConfigError(f"{where}: must be a cookie name (1-64 letters, digits or !#$%&'*+.^_`|~-); got {value!r}")
    return value


def _access_log(value: object, where: str, base_dir: Path) -> str:
    """A file path (absolute, from the config file's directory), or "-" for stdout."""
    return "-" if value == "-" else str(_path(value, where, base_dir))


def _access_log_format(value: object, where: str) -> str:
    if value not in ACCESS_LOG_FORMATS:
        raise ConfigError(f"{where}: must be one of {', '.join(ACCESS_LOG_FORMATS)}; got {value!r}")
    return str(value)


def _access_log_buffer(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < ACCESS_LOG_MIN_BUFFER:
        raise ConfigError(f"{where}: must be an integer >= {ACCESS_LOG_MIN_BUFFER}; got {value!r}")
    return value


def _fraction(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ConfigError(f"{where}: must be a number from 0 to 1; got {value!r}")
    return float(value)


def _boolean(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: must be true or false; got {value!r}")
    return value


def _token(value: object, where: str) -> str:
    if not isinstance(value, str) or len(value) < MIN_TOKEN_LENGTH:
        raise ConfigError(f"{where}: must be a string of at least {MIN_TOKEN_LENGTH} characters")
    return value


def _regions(raw: object, where: str) -> Regions:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table with keys {', '.join(REGION_KEYS)}")
    _reject_unknown(raw, REGION_KEYS, where)
    latency: Mapping[str, int] = DEFAULT_LATENCY_MS
    proximity: Mapping[str, tuple[str, ...]] = DEFAULT_PROXIMITY
    if "latency_ms" in raw:
        latency = _region_table(raw["latency_ms"], f"{where}.latency_ms", "milliseconds", _non_negative_int)
    if "proximity" in raw:
        proximity = _region_table(raw["proximity"], f"{where}.proximity", "[regions, nearest first]", _region_list)
    for client_region, order in proximity.items():
        unknown = [name for name in order if name not in latency]
        if unknown:
            raise ConfigError(
                f"{where}.proximity.{client_region}: region {unknown[0]!r} has no latency in "
                f"regions.latency_ms; known: {', '.join(sorted(latency))}"
            )
    return Regions(latency, proximity)


def _health(raw: object, where: str) -> HealthSettings:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table with keys {', '.join(HEALTH_KEYS)}")
    _reject_unknown(raw, HEALTH_KEYS, where)
    values = _bounded_ints(raw, HEALTH_INT_KEYS, where)
    if "path" in raw:
        if not isinstance(raw["path"], str) or not raw["path"].startswith("/"):
            raise ConfigError(f"{where}.path: must be a path starting with '/'; got {raw['path']!r}")
        values["path"] = raw["path"]
    if "passive_5xx" in raw:
        values["passive_5xx"] = _boolean(raw["passive_5xx"], f"{where}.passive_5xx")
    if "panic_threshold" in raw:
        value = raw["panic_threshold"]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ConfigError(f"{where}.panic_threshold: must be a number from 0 to 1; got {value!r}")
        values["panic_threshold"] = float(value)
    settings = replace(HealthSettings(), **values)
    if settings.max_cooldown_ms < settings.cooldown_ms:
        settings = replace(settings, max_cooldown_ms=settings.cooldown_ms)
    return settings


def _failover(raw: object, where: str) -> FailoverSettings:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table with keys {', '.join(FAILOVER_KEYS)}")
    _reject_unknown(raw, FAILOVER_KEYS, where)
    values = _bounded_ints(raw, FAILOVER_INT_KEYS, where)
    for key, (low, high) in FAILOVER_SHARES.items():
        if key in raw:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
                raise ConfigError(f"{where}.{key}: must be a number from {low} to {high}; got {value!r}")
            values[key] = float(value)
    if "failback" in raw:
        values["failback"] = _boolean(raw["failback"], f"{where}.failback")
    return replace(FailoverSettings(), **values)


def _limits(raw: object, where: str) -> ClientLimits:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table with keys {', '.join(LIMIT_KEYS)}")
    _reject_unknown(raw, tuple(LIMIT_KEYS), where)
    return replace(ClientLimits(), **_bounded_ints(raw, LIMIT_KEYS, where))


def _bounded_ints(raw: Mapping[str, Any], minimums: Mapping[str, int], where: str) -> dict[str, Any]:
    """The integer keys of a table that are present, each checked against its smallest allowed value."""
    values: dict[str, Any] = {}
    for key, minimum in minimums.items():
        if key in raw:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{where}.{key}: must be an integer >= {minimum}; got {value!r}")
            values[key] = value
    return values


def _region_table(raw: object, where: str, values: str, parse: Callable[[object, str], T]) -> Mapping[str, T]:
    """A `region = value` table, each value parsed (and its errors named) by `parse`."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: must be a non-empty table of region = {values}")
    return MappingProxyType({name: parse(value, f"{where}.{name}") for name, value in raw.items()})


def _region_list(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{where}: must be a non-empty list of region names, nearest first")
    if len(set(value)) != len(value):
        raise ConfigError(f"{where}: lists a region more than once")
    return tuple(value)


def _reject_unknown(raw: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(allowed)}")


def _non_negative_int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}: must be a non-negative integer; got {value!r}")
    return value


def _path(value: object, where: str, base_dir: Path) -> Path:
    if isinstance(value, Path):
        return value
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: must be a path string; got {value!r}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir.absolute() / path  # absolute: a dumped config reloads


def _address(value: object, where: str) -> Address:
    if isinstance(value, Address):
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{where}: must be a string HOST:PORT; got {value!r}")
    return parse_address(value, where)


def load_seed(config: Config) -> list[ServerSpec]:
    """The entries of the config's servers file (none without one), placed in its regions."""
    return [] if config.servers is None else load_servers_file(config.servers, config.regions)


def load_servers_file(path: Path, regions: Regions) -> list[ServerSpec]:
    """Read a seed-format servers.json; one precise message for the first problem found."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read servers file: {exc.strerror}") from None
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    try:
        return parse_server_list(entries, regions.server_regions)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse_server_list(entries: object, known_regions: frozenset[str]) -> list[ServerSpec]:
    """Validate a list of seed entries; ids must be unique."""
    if not isinstance(entries, list):
        raise ValidationError("expected a JSON list of server objects")
    specs: list[ServerSpec] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(entries):
        spec = parse_server(entry, known_regions, where=f"entry {index}")
        if spec.id in seen:
            raise ValidationError(
                f"entry {index}: duplicate id {spec.id!r} (first used by entry {seen[spec.id]})", "id"
            )
        seen[spec.id] = index
        specs.append(spec)
    return specs


def config_to_mapping(config: Config) -> dict[str, Any]:
    """The effective config in the TOML file's shape (`lbctl config dump`); `lbd start --config`
    reads it back to the same config. Unset keys are left out (TOML has no null) and the admin
    token is never shown (give it again with env LBD_ADMIN_TOKEN)."""
    shown = {key: _plain(value) for key, value in _fields(config) if value is not None and key != "admin_token"}
    cluster = {key: value for key, value in shown["cluster"].items() if key != "password" and value is not None}
    if cluster.get("url") is None:
        del shown["cluster"]  # off: nothing to say (TOML has no null)
    else:
        shown["cluster"] = cluster
    if config.listen is None:
        shown["listen"] = False  # off (TOML has no null, and a missing listen means the default)
    if config.tls.listen is None:
        del shown["tls"]  # off: nothing to say
    return shown


def config_changes(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) for every setting that differs, in the file's order (`regions.latency_ms.us-east`);
    None stands for unset. The admin token's values are never shown."""
    before, after = _flatten(config_to_mapping(old)), _flatten(config_to_mapping(new))
    keys = dict.fromkeys([*before, *after])
    changes = [(key, before.get(key), after.get(key)) for key in keys if before.get(key) != after.get(key)]
    if old.admin_token != new.admin_token:
        changes.append(("admin_token", HIDDEN if old.admin_token else None, HIDDEN if new.admin_token else None))
    if old.cluster.password != new.cluster.password:
        was, now = old.cluster.password, new.cluster.password
        changes.append(("cluster.password", HIDDEN if was else None, HIDDEN if now else None))
    return changes


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _fields(value: Any) -> list[tuple[str, Any]]:
    return [(name, getattr(value, name)) for name in value.__dataclass_fields__]


def _plain(value: Any) -> Any:
    if isinstance(value, Path | Address):
        return str(value)
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    if hasattr(value, "__dataclass_fields__"):
        return {key: _plain(item) for key, item in _fields(value) if item is not None}
    return value
