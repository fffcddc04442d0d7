"""The cluster store's layout in Redis, pure: key names, what a session's value holds, what an event
says. Every key starts with the cluster's name, so several clusters can share one Redis. The control
keys carry the name as a hash tag (`{name}`): a Redis Cluster keeps them in one slot, as the change
script needs; sessions do not, so they spread over the slots.

    lb:{NAME}:servers      HASH   id -> server (seed format, JSON): registered or changed at run time
    lb:{NAME}:draining     SET    ids of draining servers
    lb:{NAME}:removed      SET    ids of servers-file servers deregistered at run time
    lb:{NAME}:mode         STRING the mode switched at run time (absent: each config's)
    lb:{NAME}:version      INT    one more for every change: the order every instance applies them in
    lb:{NAME}:epoch        STRING a random token: absent or new means Redis lost its data
    lb:{NAME}:events       PUBSUB the changes, as they are made (JSON, with their version)
    lb:{NAME}:sessions     PUBSUB a session moved to another server, or was forgotten
    lb:{NAME}:instances    ZSET   instance -> the Unix time of its last heartbeat
    lb:{NAME}:instance:I   STRING what the instance is (JSON), expiring unless refreshed
    lb:NAME:s:CLIENT       STRING "server<TAB>region", expiring after the idle timeout (sliding)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

SEPARATOR: Final = "\t"  # server ids and region names hold no tab


@dataclass(frozen=True, slots=True)
class Keys:
    name: str

    @property
    def prefix(self) -> str:
        return "lb:{" + self.name + "}:"

    @property
    def servers(self) -> str:
        return self.prefix + "servers"

    @property
    def draining(self) -> str:
        return self.prefix + "draining"

    @property
    def removed(self) -> str:
        return self.prefix + "removed"

    @property
    def mode(self) -> str:
        return self.prefix + "mode"

    @property
    def version(self) -> str:
        return self.prefix + "version"

    @property
    def epoch(self) -> str:
        return self.prefix + "epoch"

    @property
    def events(self) -> str:
        return self.prefix + "events"

    @property
    def session_events(self) -> str:
        return self.prefix + "sessions"

    @property
    def instances(self) -> str:
        return self.prefix + "instances"

    def instance(self, instance: str) -> str:
        return self.prefix + "instance:" + instance

    def session(self, client_id: str) -> str:
        return f"lb:{self.name}:s:{client_id}"

    @property
    def control(self) -> list[str]:
        """The keys the change script writes, in its KEYS order."""
        return [self.servers, self.draining, self.removed, self.mode, self.version, self.events]


def session_value(server_id: str, region: str | None) -> str:
    return server_id + SEPARATOR + (region or "")


def parse_session(value: str | bytes) -> tuple[str, str | None]:
    text = value.decode() if isinstance(value, bytes) else value
    server_id, _, region = text.partition(SEPARATOR)
    return server_id, region or None


@dataclass(frozen=True, slots=True)
class Event:
    """One change as the store published it."""

    version: int
    origin: str  # the instance that made it
    op: str  # register, deregister, drain, capacity, mode
    args: tuple[str, ...]

    @staticmethod
    def parse(raw: str | bytes) -> Event:
        data: dict[str, Any] = json.loads(raw)
        args = data.get("args") or []
        return Event(int(data["version"]), str(data["origin"]), str(data["op"]), tuple(str(a) for a in args))


def session_moves(raw: str | bytes) -> tuple[str, list[tuple[str, str | None]]]:
    """A session event: the origin instance, and (client id, new server or None: forgotten) pairs."""
    data: dict[str, Any] = json.loads(raw)
    return str(data["origin"]), [
        (str(client), None if server is None else str(server)) for client, server in data["moves"]
    ]
