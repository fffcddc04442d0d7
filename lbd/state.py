"""State that survives a restart: registrations, drain flags, the mode, and the sticky sessions.

Two files in the state directory (created 0700), each replaced atomically (temporary file in the
same directory, flush, fsync, rename, fsync of the directory), so a crash at any moment leaves the
previous version or the new one, never a mix:

- `state.json`, written by the admin API after every change and before it answers, so an
  acknowledged change survives `kill -9`: servers registered at run time (seed-format specs; the
  servers of `--servers` are config and come from that file), the ids of draining servers, and the
  mode when the operator switched it at run time.
- `sessions.json`, the sticky session table, written once on graceful shutdown and consumed at the
  next start (idle ages in seconds, since monotonic clocks do not survive a restart).

A `lock` file held with `flock` for the daemon's life keeps two daemons off one directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from lbd.balancer import Balancer
from lbd.config import MODES, Mode, parse_server_list
from lbd.errors import LbError, ValidationError
from lbd.models import ServerSpec
from lbd.registry import Registry
from lbd.sessions import SessionRecord, SessionTable

log = logging.getLogger("lbd.state")

STATE_VERSION = 1
SESSIONS_VERSION = 1
STATE_FILE = "state.json"
SESSIONS_FILE = "sessions.json"
LOCK_FILE = "lock"
SESSION_ROW_LENGTH = 4


class StateError(LbError):
    """The state directory or one of its files cannot be used; the message names the path."""


@dataclass(frozen=True, slots=True)
class PersistedState:
    """What `state.json` holds: the operator's run-time decisions."""

    servers: tuple[ServerSpec, ...] = ()
    draining: frozenset[str] = frozenset()
    mode: Mode | None = None  # None: never switched at run time, the config's mode applies
    saved_at: float = field(default=0.0, compare=False)


class StateStore:
    """The state directory: atomic writes, validated reads, an exclusive lock."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.state_path = directory / STATE_FILE
        self.sessions_path = directory / SESSIONS_FILE
        self._lock_fd: int | None = None

    def open(self) -> None:
        """Create the directory (0700) and take its lock for the life of the process."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create the state directory {self.directory}: {exc.strerror}") from None
        lock_path = self.directory / LOCK_FILE
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateError(f"cannot use the state directory {self.directory}: {lock_path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StateError(
                f"the state directory {self.directory} is in use by another lbd (pid {holder}); "
                "stop it or choose another --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- state.json ---------------------------------------------------------------------------

    def load(self, server_regions: frozenset[str]) -> PersistedState | None:
        """The saved state, None when there is none; StateError naming the file when it is unusable."""
        raw = self._read_json(self.state_path)
        if raw is None:
            return None
        where = str(self.state_path)
        if not isinstance(raw, dict):
            raise StateError(f"{where}: expected a JSON object with version, servers, draining and mode")
        version = raw.get("version")
        if version != STATE_VERSION:
            raise StateError(f"{where}: format version {version!r} is not supported (this lbd reads {STATE_VERSION})")
        try:
            servers = parse_server_list(raw.get("servers", []), server_regions)
        except ValidationError as exc:
            raise StateError(f"{where}: servers: {exc}") from None
        draining = raw.get("draining", [])
        if not isinstance(draining, list) or not all(isinstance(item, str) for item in draining):
            raise StateError(f"{where}: field 'draining' must be a list of server ids; got {draining!r}")
        mode = raw.get("mode")
        if mode is not None and mode not in MODES:
            raise StateError(f"{where}: field 'mode' must be one of {', '.join(MODES)} or null; got {mode!r}")
        saved_at = raw.get("saved_at", 0.0)
        if isinstance(saved_at, bool) or not isinstance(saved_at, int | float):
            raise StateError(f"{where}: field 'saved_at' must be a number (Unix time); got {saved_at!r}")
        return PersistedState(tuple(servers), frozenset(draining), cast(Mode | None, mode), float(saved_at))

    def save(self, state: PersistedState) -> None:
        """Replace `state.json` atomically and durably; StateError naming the file on failure."""
        document = {
            "version": STATE_VERSION,
            "saved_at": round(time.time(), 3),
            "mode": state.mode,
            "servers": [_seed_entry(spec) for spec in state.servers],
            "draining": sorted(state.draining),
        }
        self._write(self.state_path, json.dumps(document, indent=1).encode())

    # --- sessions.json ------------------------------------------------------------------------

    def save_sessions(self, records: Iterable[SessionRecord], saved_at: float) -> int:
        """Write the session snapshot (least recently active first); returns how many were written."""
        rows = [(client_id, server_id, region, round(idle_s, 3)) for client_id, server_id, region, idle_s in records]
        document = {"version": SESSIONS_VERSION, "saved_at": saved_at, "sessions": rows}
        self._write(self.sessions_path, json.dumps(document, separators=(",", ":")).encode())
        return len(rows)

    def load_sessions(self) -> tuple[list[SessionRecord], float] | None:
        """(records, wall time of the snapshot), None when there is none; StateError when unusable."""
        raw = self._read_json(self.sessions_path)
        if raw is None:
            return None
        where = str(self.sessions_path)
        if not isinstance(raw, dict) or raw.get("version") != SESSIONS_VERSION:
            raise StateError(f"{where}: not a version {SESSIONS_VERSION} session snapshot")
        saved_at = raw.get("saved_at")
        rows = raw.get("sessions")
        if isinstance(saved_at, bool) or not isinstance(saved_at, int | float) or not isinstance(rows, list):
            raise StateError(f"{where}: expected 'saved_at' (Unix time) and a 'sessions' list")
        records = []
        for index, row in enumerate(rows):
            if not _valid_session_row(row):
                raise StateError(f"{where}: session {index} is not [client_id, server_id, region, idle_s]")
            records.append(SessionRecord(row[0], row[1], row[2], float(row[3])))
        return records, float(saved_at)

    def discard_sessions(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.sessions_path.unlink()

    # --- files --------------------------------------------------------------------------------

    def _read_json(self, path: Path) -> Any:
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"{path}: cannot read: {exc.strerror}") from None
        try:
            return json.loads(text)
        except UnicodeDecodeError:
            raise StateError(f"{path}: not valid JSON: not UTF-8 text") from None
        except json.JSONDecodeError as exc:
            raise StateError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None

    def _write(self, path: Path, data: bytes) -> None:
        """Temporary file in the same directory, flush + fsync, rename over `path`, fsync the directory."""
        temporary = path.with_name(f".{path.name}.tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
            directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise StateError(f"{path}: cannot write: {exc.strerror}") from None


def _seed_entry(spec: ServerSpec) -> dict[str, Any]:
    return {"id": spec.id, "url": spec.url, "region": spec.region, "capacity": spec.capacity}


def _valid_session_row(row: object) -> bool:
    if not isinstance(row, list) or len(row) != SESSION_ROW_LENGTH:
        return False
    client_id, server_id, region, idle_s = row
    return (
        isinstance(client_id, str)
        and isinstance(server_id, str)
        and (region is None or isinstance(region, str))
        and not isinstance(idle_s, bool)
        and isinstance(idle_s, int | float)
        and idle_s >= 0
    )


class StateKeeper:
    """Connects the store to the live registry and balancer: restores at start, saves on each change.

    `save` is the admin API's hook, called after a change and before the answer; it is synchronous
    (a few ms with fsync) and never runs on the proxy's request path.
    """

    def __init__(self, store: StateStore, registry: Registry, balancer: Balancer, seed: Iterable[ServerSpec]) -> None:
        self.store = store
        self.registry = registry
        self.balancer = balancer
        self._seed = {spec.id: spec for spec in seed}
        self._mode_decided = False  # the operator chose the mode at run time (now or before a restart)
        self._start_mode: Mode = balancer.mode

    def restore(self, state: PersistedState | None) -> None:
        """Registrations on top of the seed (the seed wins a conflict), drain flags, then the mode."""
        if state is None:
            return
        where = self.store.state_path
        added = 0
        for spec in state.servers:
            seeded = self._seed.get(spec.id)
            if seeded is None:
                self.registry.register(spec)
                added += 1
            elif seeded != spec:
                log.warning(
                    "%s: server %s was registered at run time as %s (region %s, capacity %d), but the "
                    "servers file declares it as %s (region %s, capacity %d); the servers file wins",
                    where, spec.id, spec.url, spec.region, spec.capacity,
                    seeded.url, seeded.region, seeded.capacity,
                )  # fmt: skip
        drained = [server_id for server_id in sorted(state.draining) if self.registry.set_draining(server_id, True)]
        if state.mode is not None:
            if state.mode != self.balancer.mode:
                configured = self.balancer.mode
                log.info("mode %s restored from %s (overrides the configured %s)", state.mode, where, configured)
            self.balancer.set_mode(state.mode)
            self._mode_decided = True
        self._start_mode = self.balancer.mode
        log.info(
            "restored from %s: %d registered servers, %d draining%s",
            where, added, len(drained), f", mode {state.mode}" if state.mode else "",
        )  # fmt: skip

    def mode_switched(self) -> bool:
        """Whether the operator switched the mode at run time (now or before a restart): that choice
        outlives the config's mode, across restarts and reloads alike."""
        if self.balancer.mode != self._start_mode:
            self._mode_decided = True
        return self._mode_decided

    def follow_config(self, seed: Iterable[ServerSpec], mode: Mode) -> bool:
        """After a reload: the servers file's entries are config from now on (not saved as
        registrations). Returns whether the config's `mode` applies (the caller switches to it): not
        when the operator switched the mode at run time."""
        self._seed = {spec.id: spec for spec in seed}
        if self.mode_switched():
            return False
        self._start_mode = mode
        return True

    def follow_config_mode(self, mode: Mode) -> None:
        """The operator gave the mode back to the config (`lbctl mode --from-config`), which is in `mode`."""
        self._mode_decided = False
        self._start_mode = mode

    def current(self) -> PersistedState:
        servers = self.registry.servers()
        return PersistedState(
            servers=tuple(s.spec for s in servers if self._seed.get(s.id) != s.spec),
            draining=frozenset(s.id for s in servers if s.state.draining),
            mode=self.balancer.mode if self.mode_switched() else None,
        )

    def save(self) -> None:
        self.store.save(self.current())

    def restore_sessions(self, sessions: SessionTable) -> None:
        """Load the shutdown snapshot, dropping what expired meanwhile or lost its server. The file is
        deleted by `sessions_consumed` once lbd serves (kept if the start fails)."""
        try:
            loaded = self.store.load_sessions()
        except StateError as exc:
            log.warning("%s; sticky sessions not restored", exc)
            return
        if loaded is None:
            return
        records, saved_at = loaded
        downtime_s = max(0.0, time.time() - saved_at)
        restored = sessions.restore(
            records,
            time.monotonic(),
            downtime_s=downtime_s,
            servers={server.id for server in self.registry.servers()},
        )
        log.info(
            "restored %d of %d sticky sessions from %s (lbd was down %.1f s)",
            restored, len(records), self.store.sessions_path, downtime_s,
        )  # fmt: skip

    def sessions_consumed(self) -> None:
        """Delete the snapshot (or an unreadable one) once serving: a later crash must not bring it back."""
        try:
            self.store.discard_sessions()
        except OSError as exc:
            log.warning("cannot remove %s: %s", self.store.sessions_path, exc.strerror)

    def save_sessions(self, sessions: SessionTable) -> None:
        """Snapshot the session table; on graceful shutdown, after the proxy stopped."""
        try:
            written = self.store.save_sessions(sessions.snapshot(time.monotonic()), time.time())
        except StateError as exc:
            log.error("%s; sticky sessions will not be restored", exc)
            return
        log.info("saved %d sticky sessions to %s", written, self.store.sessions_path)
