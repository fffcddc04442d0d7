"""One lbd instance's part in a cluster: servers, drain flags, the mode and sticky sessions shared
through Redis with every other instance of the same cluster name.

- **Control**: a change through any instance is one atomic script in Redis that publishes it with
  the next version number; every instance, the one that made it too, applies the changes in version
  order, so all of them hold the same servers. The admin API answers once this instance applied it.
  A gap in versions, a reconnection or a store found emptied makes the instance read a snapshot of
  every control key and apply the difference.
- **Sessions**: the local session table stays the cache the request path reads; Redis is read only
  for a client new to this instance (`claim`: a `SET ... NX GET`, ours or the winner's pin; one
  event-loop turn's claims in one pipeline), pins made or moved here are written in batches,
  sliding expiry is refreshed lazily (a session is refreshed in Redis only once its last refresh is
  older than 1/16 of the idle timeout), and moves are published so other instances' cached copies
  follow.
- **Faults**: with Redis unreachable the instance serves from what it holds; admin changes are
  refused (StoreUnavailable: 503) rather than made here only; new pins wait in a bounded queue. On
  reconnection it resyncs by itself, and if Redis came back empty (its epoch token gone) it writes
  back the registrations, drain flags, mode and sessions it holds.
- Health checks stay per instance, as in HAProxy and Envoy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Final

from lbd.audit import AuditTrail
from lbd.balancer import Balancer
from lbd.config import MODES, ClusterSettings, Mode
from lbd.control import Changes, in_flight_here
from lbd.errors import LbError, StoreConflict, StoreUnavailable
from lbd.models import Server, ServerSpec, parse_server
from lbd.sessions import SessionTable
from lbd.store.keys import Event, parse_session, session_moves, session_value
from lbd.store.redis_store import ClaimAnswer, RedisStore, Snapshot
from lbd.store.session_sync import REFRESH_FRACTION, SessionSync

log = logging.getLogger("lbd.cluster")
HEARTBEAT_S: Final = 1.0
PEER_TTL_S: Final = 5.0  # an instance without a heartbeat this long is no longer a peer
RETRY_S: Final = (0.2, 0.5, 1.0, 2.0, 5.0)  # waits between reconnection attempts
FLUSH_S: Final = 0.02  # pins and moves are written this often (batched)
REFRESH_FLUSH_S: Final = 1.0  # sliding-expiry refreshes are written this often (batched)
CLAIM_TIMEOUT_S: Final = 0.25  # a new client waits this long at most for the store, then is pinned here
CATCH_UP_S: Final = 2.0  # an admin change waits this long for its own notice, then reads a snapshot
STARTED_AT: Final = time.time()
# a new client's claim waiting for its batch: client, proposed server, region, done once held here
PendingClaim = tuple[str, Server, str, asyncio.Future[None]]


class Cluster:
    def __init__(
        self,
        settings: ClusterSettings,
        instance: str,
        listen: str,
        changes: Changes,
        sessions: SessionTable,
        seed: Callable[[], list[ServerSpec]],
        config_mode: Callable[[], Mode],
        server_regions: Callable[[], frozenset[str]],
        audit: AuditTrail,
    ) -> None:
        self.settings = settings
        self.instance = instance
        self.listen = listen
        self.changes = changes
        self.balancer: Balancer = changes.balancer
        self.sessions = sessions
        self._seed = seed
        self._config_mode = config_mode
        self._server_regions = server_regions
        self.audit = audit
        self.store = RedisStore(settings)
        self.applied = 0  # the version of the last change applied here
        self._applied_changed = asyncio.Condition()
        self.epoch: str | None = None
        self.runtime_mode: Mode | None = None  # the mode switched at run time, as the store has it
        self.peers: list[dict[str, Any]] = []
        self.last_error: str | None = None
        self.joined = 0  # how many times this instance (re)joined
        self.joined_once = asyncio.Event()
        self.announces = True  # heartbeats and is listed among the peers (a supervisor's worker is not)
        self.sync = SessionSync(self.balancer, sessions, self.claim)  # what the request path tells the store
        self.claims = {"won": 0, "adopted": 0, "local": 0}  # how new clients' pins were settled
        self.claim_round_trips = 0  # store round trips those claims took (batched per loop turn)
        self._tasks: list[asyncio.Task[None]] = []
        self._claims: list[PendingClaim] = []  # asked for, not yet sent
        self._claiming: set[asyncio.Task[None]] = set()  # claims on their way: held, so never collected
        self._resync = asyncio.Event()

    # --- lifetime ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Join in the background: lbd serves its servers file until the store answers."""
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._stay_joined()), loop.create_task(self._write_sessions())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.connected:
            with contextlib.suppress(StoreUnavailable):
                await self._flush_pins()
                if self.announces:
                    await self.store.leave(self.instance)
        await self.store.close()

    async def _stay_joined(self) -> None:
        failures = 0
        while True:
            try:
                await self._joined()
            except StoreUnavailable as exc:
                self._lost(exc.cause)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not end the cluster membership for good
                log.exception("cluster: unexpected error; reconnecting")
                self._lost(f"unexpected {type(exc).__name__}: {exc}")
            await asyncio.sleep(RETRY_S[min(failures, len(RETRY_S) - 1)])
            failures = 0 if self.connected else failures + 1

    def _lost(self, why: str) -> None:
        if self.connected or self.last_error is None:
            log.log(
                logging.WARNING if self.announces else logging.DEBUG,  # a supervisor speaks for its workers
                "cluster %s: the store is unreachable (%s); serving from what this instance holds",
                self.settings.name,
                why,
            )
        self.sync.connected = False
        self.last_error = why

    async def _joined(self) -> None:
        """One connection's life: subscribe, sync from a snapshot, then follow the changes."""
        await self.store.ping()
        async with self.store.subscription() as notices:
            await self._sync()
            self.sync.connected = True
            self.last_error = None
            self.joined += 1
            self.joined_once.set()
            log.log(
                logging.INFO if self.announces else logging.DEBUG,
                "cluster %s: instance %s joined at version %d (%d servers)",
                self.settings.name, self.instance, self.applied, len(self.changes.registry),
            )  # fmt: skip
            await self._flush_pins(only_new=True)  # what was pinned here while the store was away
            beat = asyncio.get_running_loop().create_task(self._beat())
            try:
                while True:
                    if self._resync.is_set():
                        self._resync.clear()
                        await self._sync()
                    notice = await notices.next(HEARTBEAT_S)
                    if beat.done():
                        beat.result()  # its StoreUnavailable ends this connection
                    if notice is not None:
                        self._received(*notice)
            finally:
                beat.cancel()
                with contextlib.suppress(asyncio.CancelledError, StoreUnavailable):
                    await beat

    async def _beat(self) -> None:
        """Heartbeat, the peer list, and a check that no change was missed."""
        while True:
            if self.announces:
                info = {"listen": self.listen, "pid": os.getpid(), "started_at": STARTED_AT}
                self.peers = await self.store.heartbeat(self.instance, info, PEER_TTL_S)
            if await self.store.version() != self.applied:
                self._resync.set()  # a notice lost, or Redis restarted: read it all again
            await asyncio.sleep(HEARTBEAT_S)

    # --- control ------------------------------------------------------------------------------------

    async def change(self, op: str, *args: str) -> None:
        """Make a change on every instance; returns once this one applied it."""
        if not self.connected:
            why = self.last_error or "not connected yet"
            raise StoreUnavailable(f"the cluster store is unreachable ({why}); nothing was changed", why)
        version = await self.store.change(op, self.instance, *args)
        await self._caught_up(version)

    async def _caught_up(self, version: int) -> None:
        async with self._applied_changed:
            try:
                await asyncio.wait_for(self._applied_changed.wait_for(lambda: self.applied >= version), CATCH_UP_S)
                return
            except TimeoutError:
                pass
        await self._sync()  # the notice did not come: the snapshot has the change

    def _received(self, channel: str, data: str) -> None:
        keys = self.store.keys
        if channel == keys.events:
            event = Event.parse(data)
            if event.version <= self.applied:
                return
            if event.version != self.applied + 1:
                self._resync.set()  # a gap: read the snapshot
                return
            self._apply(event)
            self._set_applied(event.version)
        elif channel == keys.session_events:
            origin, moves = session_moves(data)
            if origin != self.instance:
                for client_id, server_id in moves:
                    if server_id is None:
                        self.sessions.remove(client_id)
                    else:
                        self.sessions.move(client_id, server_id)

    def _set_applied(self, version: int) -> None:
        self.applied = version

        async def notify() -> None:
            async with self._applied_changed:
                self._applied_changed.notify_all()

        asyncio.get_running_loop().create_task(notify())

    def _apply(self, event: Event) -> None:
        """One change from the store, applied here (audited when another instance made it)."""
        changes, args = self.changes, event.args
        remote = event.origin != self.instance
        who = f"instance {event.origin}"
        if event.op == "register":
            for server_id, raw in zip(args[0::2], args[1::2], strict=True):
                spec = self._spec(raw)
                if spec is None:
                    continue
                existed = changes.registry.get(server_id) is not None
                changes.replace(spec)
                if remote and not existed:
                    self.audit.record(who, "register", server_id, f"registered at {spec.url}", server=spec.to_json())
        elif event.op == "deregister":
            dropped = changes.remove(args[0])
            if remote:
                self.audit.record(who, "deregister", args[0], f"removed ({dropped} sessions dropped)")
        elif event.op == "drain":
            server = changes.registry.get(args[0])
            was = server is not None and server.state.draining
            changes.set_draining(args[0], args[1] == "1")
            if remote and server is not None and was != (args[1] == "1"):
                action = "drain" if args[1] == "1" else "undrain"
                self.audit.record(who, action, args[0], f"draining {_yes(was)} -> {_yes(args[1] == '1')}")
        elif event.op == "capacity":
            spec = self._spec(args[1])
            if spec is not None:
                changed = changes.set_capacity(spec.id, spec.capacity)
                if remote and changed is not None and changed[1] != spec.capacity:
                    self.audit.record(who, "capacity", spec.id, f"capacity {changed[1]} -> {spec.capacity}")
        elif event.op == "mode":
            previous = self.balancer.mode
            self.runtime_mode = _mode(args[0])
            mode = self.runtime_mode or self._config_mode()
            changes.set_mode(mode)
            if remote and previous != mode:
                self.audit.record(who, "mode", "", f"{previous} -> {mode}")

    def _spec(self, raw: str) -> ServerSpec | None:
        try:
            return parse_server(json.loads(raw), self._server_regions(), where="cluster store")
        except (ValueError, LbError) as exc:  # another instance's config may differ (an unknown region)
            log.warning("cluster: ignoring a server this instance cannot place: %s", exc)
            return None

    async def _sync(self) -> None:
        """Read every control key at one version and make this instance hold exactly that; a store
        found empty (or restarted empty) first gets back what this instance holds."""
        snapshot = await self.store.snapshot()
        if snapshot.epoch is None or (self.epoch is not None and snapshot.epoch != self.epoch):
            if self.epoch is not None:
                log.warning(
                    "cluster %s: the store lost its data; writing back what this instance holds", self.settings.name
                )
                await self._write_back()
                snapshot = await self.store.snapshot()
            self.epoch = await self.store.claim_epoch(secrets.token_hex(8))
        else:
            self.epoch = snapshot.epoch
        self._hold(snapshot)
        self._set_applied(snapshot.version)

    def _hold(self, snapshot: Snapshot) -> None:
        """The servers file's servers, overridden by those registered or changed at run time in the
        store, less the file's servers deregistered at run time; drain flags; the mode."""
        wanted = {spec.id: spec for spec in self._seed() if spec.id not in snapshot.removed}
        for server_id, entry in snapshot.servers.items():
            spec = self._spec(json.dumps(entry))
            if spec is not None:
                wanted[server_id] = spec
        self.runtime_mode = _mode(snapshot.mode or "")
        self.changes.hold(wanted, snapshot.draining, self.runtime_mode or self._config_mode())

    async def _write_back(self) -> None:
        """Redis came back empty: put back the run-time registrations, drain flags and mode this
        instance holds, and its sessions (never over what another instance wrote first)."""
        seed = {spec.id: spec for spec in self._seed()}
        registry = self.changes.registry
        runtime = [s for s in registry.servers() if seed.get(s.id) != s.spec]
        store = self.store
        if runtime:
            with contextlib.suppress(StoreConflict):
                pairs = [item for s in runtime for item in (s.id, json.dumps(s.spec.to_json()))]
                await store.change("register", self.instance, *pairs)
        for server in registry.servers():
            if server.state.draining:
                await store.change("drain", self.instance, server.id, "1")
        for server_id in set(seed) - {s.id for s in registry.servers()}:
            await store.change("deregister", self.instance, server_id)
        if self.balancer.mode != self._config_mode():
            await store.change("mode", self.instance, self.balancer.mode)
        now = time.monotonic()
        ttl = self._ttl()
        entries = (
            (
                client_id,
                session_value(session.server_id, session.region),
                max(1, ttl - math.floor(now - session.last_seen)),
            )
            for client_id, session in self.sessions.items(now)
        )
        self._adopt(await store.write_sessions(list(entries), only_new=True))

    def _adopt(self, kept: list[tuple[str, str]]) -> None:
        """Pins another instance wrote first (both pinned a client while the store was away): the
        store's is the one every instance uses from now on."""
        for client_id, value in kept:
            self.sessions.move(client_id, parse_session(value)[0])

    # --- sessions ------------------------------------------------------------------------------------

    def _ttl(self) -> int:
        idle = self.sessions.idle_timeout_s
        return math.ceil(idle + idle / REFRESH_FRACTION)

    def claim(self, client_id: str, proposal: Server, region: str) -> asyncio.Future[None]:
        """Pin `client_id` to `proposal` in the store unless another instance pinned it first; the
        future is done once whichever pin won is held here (the store slow or away: the pin is made
        here, written later). Claims asked for in one turn of the event loop go to the store in one
        round trip: a burst of new clients pays redis-py's work per call once."""
        done = asyncio.get_running_loop().create_future()
        self._claims.append((client_id, proposal, region, done))
        if len(self._claims) == 1:
            task = asyncio.get_running_loop().create_task(self._send_claims())
            self._claiming.add(task)
            task.add_done_callback(self._claiming.discard)
        return done

    async def _send_claims(self) -> None:
        batch, self._claims = self._claims, []  # this task runs after the loop's turn that asked for them
        values = [(client_id, session_value(proposal.id, region)) for client_id, proposal, region, _ in batch]
        answers: list[ClaimAnswer] | None = None
        try:
            self.claim_round_trips += 1
            async with asyncio.timeout(CLAIM_TIMEOUT_S):
                answers = await self.store.claim_sessions(values, self._ttl())
        except (StoreUnavailable, TimeoutError):  # pinned here, written back later
            pass
        finally:  # cancelled too: every request waiting on this batch goes on
            self._settle(batch, answers)

    def _settle(self, batch: list[PendingClaim], answers: list[ClaimAnswer] | None) -> None:
        """Hold here the pin each claim settled on: the store's answer, or this instance's proposal
        where the store gave none (unreachable, slow, or refusing that claim)."""
        now = time.monotonic()
        try:
            for index, (client_id, proposal, region, _) in enumerate(batch):
                answer = None if answers is None else answers[index]
                if answers is None or isinstance(answer, StoreUnavailable):
                    result, held = "local", None
                    self.sync.pins[client_id] = (proposal.id, region)  # written once the store answers
                else:
                    result, held = ("won", None) if answer is None else ("adopted", answer)
                self.claims[result] += 1
                if held is None:  # this instance's proposal is the pin
                    self.balancer.note_pin(proposal)
                    self.sessions.pin(client_id, proposal.id, region, now)
                else:
                    server_id, pinned_region = parse_session(held)
                    self.sessions.pin(client_id, server_id, pinned_region or region, now)
        finally:
            for *_, done in batch:
                if not done.done():
                    done.set_result(None)

    async def forget(self, client_ids: list[str]) -> None:
        """Sessions cleared by an operator: gone from the store and from every instance's cache."""
        await self.store.forget_sessions(client_ids)
        await self.store.publish_moves(self.instance, [(client_id, None) for client_id in client_ids])

    async def _write_sessions(self) -> None:
        """The batch writer: pins and moves every FLUSH_S, refreshes every REFRESH_FLUSH_S."""
        last_refresh = time.monotonic()
        while True:
            await asyncio.sleep(FLUSH_S)
            if not self.connected:
                self.sync.moves.clear()  # a reconnection resyncs; the pins themselves wait in sync.pins
                self.sync.refresh.clear()
                continue
            try:
                await self._flush_pins()
                if time.monotonic() - last_refresh >= REFRESH_FLUSH_S:
                    last_refresh = time.monotonic()
                    refresh, self.sync.refresh = self.sync.refresh, []
                    for start in range(0, len(refresh), 1000):
                        await self.store.refresh_sessions(refresh[start : start + 1000], self._ttl())
            except StoreUnavailable as exc:
                self._lost(exc.cause)

    async def _flush_pins(self, only_new: bool = False) -> None:
        sync = self.sync
        if sync.pins:
            pins, sync.pins = sync.pins, OrderedDict()
            ttl = self._ttl()
            kept = await self.store.write_sessions(
                ((client, session_value(server, region), ttl) for client, (server, region) in pins.items()), only_new
            )
            self._adopt(kept)
        if sync.moves:
            moves, sync.moves = sync.moves, []
            await self.store.publish_moves(self.instance, moves)

    # --- the reloader's view (lbd/reload.py's StateFollower) -----------------------------------------

    def follow_config(self, seed: object, mode: Mode) -> bool:
        """A reload's mode applies unless the cluster's mode was switched at run time."""
        return self.runtime_mode is None

    def mode_switched(self) -> bool:
        return self.runtime_mode is not None

    def follow_config_mode(self, mode: Mode) -> None:
        """The store's `mode` change (ClusterControl) is what gives the mode back to the config."""

    def save(self) -> None:
        """Nothing to save here: the store holds what changes at run time."""

    # --- what the admin API shows ----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.sync.connected

    @property
    def pins_dropped(self) -> int:
        return self.sync.pins_dropped

    @property
    def pending_pins(self) -> int:
        """Pins made here not yet written to the store (while it is away, or until the next batch)."""
        return len(self.sync.pins)

    def status(self) -> dict[str, Any]:
        return {
            "name": self.settings.name,
            "instance": self.instance,
            "url": self.settings.url,
            "store": "connected" if self.connected else "unreachable",
            "last_error": self.last_error,
            "version": self.applied,
            "peers": self.peers if self.connected else [],
            "pending_pins": self.pending_pins,
        }


class ClusterControl:
    """The admin API's control plane in a cluster: every change through the store (lbd/control.py)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.changes = cluster.changes

    async def register(self, specs: list[ServerSpec]) -> list[str]:
        registry = self.changes.registry
        for spec in specs:
            registry.check_conflict(spec)
        new = [spec.id for spec in specs if registry.get(spec.id) is None]
        await self.cluster.change(
            "register", *(item for spec in specs for item in (spec.id, json.dumps(spec.to_json())))
        )
        return new

    async def remove(self, server_id: str) -> int:
        before = self.changes.sessions.by_server.get(server_id, 0)
        await self.cluster.change("deregister", server_id)
        return before

    async def set_draining(self, server_id: str, draining: bool) -> Server | None:
        if self.changes.registry.get(server_id) is None:
            return None
        await self.cluster.change("drain", server_id, "1" if draining else "0")
        return self.changes.registry.get(server_id)

    async def set_capacity(self, server_id: str, capacity: int) -> tuple[Server, int] | None:
        server = self.changes.registry.get(server_id)
        if server is None:
            return None
        previous = server.spec.capacity
        spec = replace(server.spec, capacity=capacity)
        await self.cluster.change("capacity", server_id, json.dumps(spec.to_json()))
        current = self.changes.registry.get(server_id)
        return None if current is None else (current, previous)

    async def in_flight(self, server_id: str) -> int:
        """This instance's own: every instance drains the server, each finishes its own requests."""
        return in_flight_here(self.cluster.changes.registry, server_id)

    async def set_mode(self, mode: Mode | None) -> Mode:
        await self.cluster.change("mode", mode or "")
        return self.changes.balancer.mode


def _mode(value: str) -> Mode | None:
    return value if value in MODES else None


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"
