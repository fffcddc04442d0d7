"""What a supervisor and its workers say to each other, as data (pure: no I/O).

- **Boot**: the supervisor writes one JSON line to a new worker's stdin: its index, the config in
  effect in the TOML file's shape (with the worker's own admin socket and no TCP listeners of its
  own), the servers file's entries, the secrets that shape leaves out, the log settings and the
  numbers of the listening sockets it inherits. stdin then stays open: end of file means the
  supervisor is gone, and the worker stops.
- **Worker to supervisor**, one word a line on a pipe of its own (`words_fd`; stdout stays lbd's,
  for an access log on `-`): `ready` (its admin socket answers) and `serving` (it accepts
  connections).
- **Supervisor to worker**, on the worker's admin socket: `PUT /v1/internal/state` (a `StateSnapshot`:
  the servers, drain flags and mode every worker must hold) and `PUT /v1/internal/config` (a reload).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from lbd.config import MODES, Mode
from lbd.models import ServerSpec, parse_server

READY: Final = "ready"
SERVING: Final = "serving"
STATE_PATH: Final = "/v1/internal/state"
CONFIG_PATH: Final = "/v1/internal/config"


@dataclass(frozen=True, slots=True)
class Boot:
    index: int
    config: dict[str, Any]  # config_to_mapping's shape
    seed: list[dict[str, Any]]  # the servers file's entries, seed format
    cluster_password: str | None
    log_level: str
    log_format: str
    listen_fd: int | None  # the plain listener's socket, inherited
    tls_listen_fd: int | None
    words_fd: int = -1  # the pipe the worker's words go to, set when it is started

    def to_line(self) -> bytes:
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return json.dumps(fields, separators=(",", ":")).encode() + b"\n"

    @staticmethod
    def parse(line: bytes) -> Boot:
        data: dict[str, Any] = json.loads(line)
        return Boot(**{name: data[name] for name in Boot.__dataclass_fields__})


@dataclass(frozen=True, slots=True)
class StateSnapshot:
    """Everything about servers and the mode that changes at run time, as the supervisor holds it;
    a worker applies the newest it has seen (`version`) and ignores older ones."""

    version: int
    servers: tuple[ServerSpec, ...]
    draining: frozenset[str]
    mode: Mode  # in effect
    mode_switched: bool  # chosen at run time: it stands over the config file's mode on a reload

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "servers": [spec.to_json() for spec in self.servers],
            "draining": sorted(self.draining),
            "mode": self.mode,
            "mode_switched": self.mode_switched,
        }

    @staticmethod
    def from_json(data: Any, known_regions: frozenset[str]) -> StateSnapshot:
        """ValueError (or the seed parser's ValidationError) for anything but what to_json makes."""
        if not isinstance(data, dict) or data.get("mode") not in MODES:
            raise ValueError("a state snapshot is an object with a mode")
        servers = tuple(parse_server(entry, known_regions, where="supervisor") for entry in data["servers"])
        return StateSnapshot(
            int(data["version"]), servers, frozenset(data["draining"]), data["mode"], bool(data["mode_switched"])
        )
