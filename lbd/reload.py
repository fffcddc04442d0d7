"""Reloading the config file into the running daemon: `lbctl reload`, `POST /v1/reload`, SIGHUP.

A reload reads the file lbd was started with (`--config`) exactly as the start did (the flags still
override it) and checks everything before it changes anything: an invalid file, or a change to a key
bound at start (`RESTART_KEYS`), is refused with one precise message and the running config stays.
Otherwise the rest applies live, and no connection is dropped: requests in flight keep the server
and the upstream timeout they started with, new ones follow the new settings.

The servers file is applied as an edit, not as a reset: entries new or changed in the file are
added (or replace the server of that id, the file winning as at start), entries gone from the file
are removed, and what run time did to entries the file did not touch (a registration, a
deregistration, a drain flag) stands. The mode switched at run time outlives the file's mode, as it
does across restarts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from lbd.accesslog_writer import AccessLog, open_target
from lbd.audit import AuditTrail
from lbd.balancer import Balancer
from lbd.config import RESTART_KEYS, Config, ConfigSource, Mode, config_changes
from lbd.errors import LbError
from lbd.health.active import HealthChecker
from lbd.models import ServerSpec
from lbd.proxy.context import ProxyContext
from lbd.registry import Registry
from lbd.sessions import SessionTable
from lbd.tls import Certificates, TlsTerminator, load_certificates

log = logging.getLogger("lbd.reload")


class ReloadError(LbError):
    """The reload changed nothing; `status` and `code` are the admin API's answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class StateFollower(Protocol):
    """The state keeper's part in a reload (lbd/state.py's StateKeeper)."""

    def follow_config(self, seed: Iterable[ServerSpec], mode: Mode) -> bool: ...

    def mode_switched(self) -> bool: ...

    def follow_config_mode(self, mode: Mode) -> None: ...

    def save(self) -> None: ...


@dataclass(slots=True)
class ReloadStats:
    """Reloads so far and how the last one went (`GET /v1/status`, `lbd_config_reloads_total`)."""

    succeeded: int = 0
    failed: int = 0
    last_at: float | None = None  # Unix time
    last_ok: bool | None = None
    last_error: str | None = None

    def record(self, error: str | None) -> None:
        self.last_at, self.last_ok, self.last_error = round(time.time(), 3), error is None, error
        if error is None:
            self.succeeded += 1
        else:
            self.failed += 1

    def to_json(self) -> dict[str, Any]:
        last = None if self.last_at is None else {"at": self.last_at, "ok": self.last_ok, "error": self.last_error}
        return {"succeeded": self.succeeded, "failed": self.failed, "last": last}


@dataclass(frozen=True, slots=True)
class SeedPlan:
    """What an edit of the servers file does to the running membership."""

    added: tuple[ServerSpec, ...] = ()
    replaced: tuple[ServerSpec, ...] = ()
    removed: tuple[str, ...] = ()


def plan_seed(old: Mapping[str, ServerSpec], new: Mapping[str, ServerSpec], live: Mapping[str, ServerSpec]) -> SeedPlan:
    """Entries new or changed in the file are added, or replace the live server of that id when it
    differs; entries gone from the file are removed unless the live server of that id differs from
    the old entry (it was registered again at run time); untouched entries leave the live set alone."""
    added: list[ServerSpec] = []
    replaced: list[ServerSpec] = []
    for server_id, spec in new.items():
        if old.get(server_id) == spec or live.get(server_id) == spec:
            continue
        (added if server_id not in live else replaced).append(spec)
    removed = [server_id for server_id, spec in old.items() if server_id not in new and live.get(server_id) == spec]
    return SeedPlan(tuple(added), tuple(replaced), tuple(removed))


class Reloader:
    """Owns the configuration in effect; `reload` is the only way it changes."""

    def __init__(
        self,
        source: ConfigSource,
        config: Config,
        seed: Iterable[ServerSpec],
        *,
        registry: Registry,
        balancer: Balancer,
        sessions: SessionTable,
        proxy: ProxyContext,
        checker: HealthChecker,
        state: StateFollower | None = None,
        audit: AuditTrail | None = None,
        tls: TlsTerminator | None = None,
        access_log: AccessLog | None = None,
    ) -> None:
        self.source = source
        self.config = config
        self.stats = ReloadStats()
        self._seed = {spec.id: spec for spec in seed}
        self._registry = registry
        self._balancer = balancer
        self._sessions = sessions
        self._proxy = proxy
        self.checker = checker  # the admin API's `lbctl check` probes through it
        self._state = state
        self.audit = audit or AuditTrail()
        self.tls = tls  # the TLS listener's certificates, re-read by every reload
        self.access_log = access_log  # reopened by every reload (logrotate's postrotate), its settings live
        self._lock = asyncio.Lock()  # one reload at a time: each one compares with the config in effect
        # told of each reload that applied, in order (a supervisor passes it on to its workers)
        self.followers: list[Callable[[Config, list[ServerSpec]], Awaitable[None]]] = []

    async def reload(self, who: str) -> dict[str, Any]:
        """Re-read and apply the config file; returns what changed. ReloadError: nothing changed."""
        async with self._lock:
            try:
                report = await self._reload()
            except ReloadError as exc:
                self.stats.record(str(exc))
                log.error("config not reloaded, the running config stays: %s", exc)
                raise
            for follow in self.followers:
                await follow(self.config, self.seed)
        self.stats.record(None)
        changed = "; ".join(f"{c['key']} {_shown(c['old'])} -> {_shown(c['new'])}" for c in report["changed"])
        servers = report["servers"]
        moves = ", ".join(f"servers {what} {' '.join(ids)}" for what, ids in servers.items() if ids)
        summary = "; ".join(part for part in (changed, moves) if part) or "nothing changed"
        self.audit.record(who, "reload", str(self.source.path), summary, changed=report["changed"], servers=servers)
        for warning in report["warnings"]:
            log.warning("reload: %s", warning)
        return report

    async def _reload(self) -> dict[str, Any]:
        path = self.source.path
        if path is None:
            raise ReloadError(
                409, "no_config_file", "lbd was started without --config, so there is no file to re-read; "
                "restart it with --config FILE to reload settings",
            )  # fmt: skip
        try:
            new, seed = self.source.load()
        except LbError as exc:
            raise ReloadError(422, "invalid_config", str(exc)) from None
        return await self._apply(new, seed)

    async def apply(self, new: Config, seed: list[ServerSpec]) -> dict[str, Any]:
        """A config read and checked elsewhere (the supervisor's, for its workers), applied as a
        reload of it would be; not counted or audited here (the supervisor does both)."""
        async with self._lock:
            return await self._apply(new, seed)

    async def _apply(self, new: Config, seed: list[ServerSpec]) -> dict[str, Any]:
        path = self.source.path
        old = self.config
        for key in RESTART_KEYS:
            if _setting(old, key) != _setting(new, key):
                raise ReloadError(
                    422, "restart_required", f"{path}: {key} changed from {_shown(_setting(old, key))} to "
                    f"{_shown(_setting(new, key))}, which only a restart of lbd can apply (it is bound at start); "
                    "nothing was reloaded",
                )  # fmt: skip
        new_seed = {spec.id: spec for spec in seed}
        plan = plan_seed(self._seed, new_seed, {server.id: server.spec for server in self._registry.servers()})
        self._check_regions(new, plan)
        certificates = self._reread_certificates(new)
        access_fd = self._open_access_log(new)  # the last check: nothing after it can fail and leak it
        # Checked: from here on nothing fails, so a reload applies whole or not at all.
        mode_before = self._balancer.mode
        self._registry.configure(new.regions.latency_ms, new.health)
        self._balancer.configure(new.regions, new.default_client_region)
        self._balancer.configure_failover(new.failover)
        self._sessions.configure(new.session_idle_timeout, new.max_sessions)
        self._proxy.apply(new)
        tls_changes = [] if self.tls is None or certificates is None else self.tls.apply(certificates)
        if self.access_log is not None:
            self.access_log.apply(new, access_fd)
        self._apply_seed(plan)
        self._seed = new_seed
        # the state keeper learns the new seed, and whether the file's mode applies
        applies = self._state is None or self._state.follow_config(seed, new.mode)
        warnings = self._apply_mode(old, new, applies)
        if self.tls is not None and old.limits.header_timeout_ms != new.limits.header_timeout_ms:
            warnings.append(
                f"limits.header_timeout_ms: request heads get {new.limits.header_timeout_ms} ms from now on, but a "
                f"TLS handshake keeps its limit of {old.limits.header_timeout_ms} ms, bound when the listener "
                "started, until lbd restarts"
            )
        self.config = new
        await self.checker.apply(new.health)
        if self._state is not None:
            try:
                self._state.save()
            except LbError as exc:
                warnings.append(f"the state file was not saved: {exc}")
        changes = config_changes(replace(old, mode=mode_before), replace(new, mode=self._balancer.mode))
        changes += tls_changes
        return {
            "config_file": str(path),
            "changed": [{"key": key, "old": was, "new": now} for key, was, now in changes],
            "servers": {
                "added": [spec.id for spec in plan.added],
                "replaced": [spec.id for spec in plan.replaced],
                "removed": list(plan.removed),
            },
            "mode": self._balancer.mode,
            "warnings": warnings,
        }

    @property
    def seed(self) -> list[ServerSpec]:
        """The servers file's entries in effect (a cluster overlays the store's registrations on them)."""
        return list(self._seed.values())

    @property
    def mode_overridden(self) -> bool:
        """The mode in effect was chosen at run time (`lbctl mode`), not by the config file."""
        switched = self._state is not None and self._state.mode_switched()
        return switched or self._balancer.mode != self.config.mode

    def use_config_mode(self) -> Mode:
        """Drop the run-time choice of mode: the config's mode applies again, now and after restarts."""
        mode = self.config.mode
        self._balancer.set_mode(mode)
        if self._state is not None:
            self._state.follow_config_mode(mode)
        return mode

    def _reread_certificates(self, new: Config) -> Certificates | None:
        """Every certificate and key read again and checked (the files may have changed even where
        the config did not); a bad one refuses the reload and the old certificates stay."""
        if self.tls is None:
            return None
        try:
            return load_certificates(new.tls)
        except LbError as exc:
            raise ReloadError(422, "invalid_config", str(exc)) from None

    def _open_access_log(self, new: Config) -> int:
        """The access log's file opened again (its path may be new, or renamed by a rotation) and
        checked writable; an unwritable one refuses the reload and the file in use stays."""
        if new.access_log is None or self.access_log is None:
            return -1
        try:
            return open_target(new.access_log)
        except LbError as exc:
            raise ReloadError(422, "invalid_config", str(exc)) from None

    def _check_regions(self, new: Config, plan: SeedPlan) -> None:
        """Every server that stays must be in a region the new config still has (as at start)."""
        leaving = {*plan.removed, *(spec.id for spec in plan.replaced)}
        for server in self._registry.servers():
            if server.id not in leaving and server.spec.region not in new.regions.latency_ms:
                raise ReloadError(
                    422, "invalid_config", f"{self.source.path}: regions.latency_ms: region {server.spec.region!r} "
                    f"is gone but server {server.id!r} is in it; deregister the server first or keep the region",
                )  # fmt: skip

    def _apply_seed(self, plan: SeedPlan) -> None:
        """Requests in flight to a replaced or removed server finish where they are."""
        registry, pool = self._registry, self._proxy.pool
        for spec in plan.added:
            registry.register(spec)
        for spec in plan.replaced:
            previous = registry.deregister(spec.id)
            registry.register(spec)
            if previous is not None and previous.state.draining:
                registry.set_draining(spec.id, True)
            pool.close_idle(server_id=spec.id)
        for server_id in plan.removed:
            registry.deregister(server_id)
            self._sessions.remove_server(server_id)  # its clients are placed afresh at their next request
            pool.close_idle(server_id=server_id)

    def _apply_mode(self, old: Config, new: Config, applies: bool) -> list[str]:
        """The file's mode applies unless the operator switched the mode at run time (that choice
        stands, as across restarts). Returns the warnings for the answer."""
        if applies:
            self._balancer.set_mode(new.mode)
            return []
        if new.mode not in (old.mode, self._balancer.mode):
            return [
                f"mode: the file now says {new.mode}, but the mode was switched to {self._balancer.mode} at run "
                f"time and that choice stands; 'lbctl mode {new.mode}' switches it"
            ]
        return []


def _setting(config: Config, key: str) -> object:
    """A setting by its dotted key (`tls.listen`)."""
    value: object = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _shown(value: object) -> str:
    return "unset" if value is None else str(value)
