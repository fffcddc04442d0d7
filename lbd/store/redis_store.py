"""The cluster store's commands against Redis (redis-py's asyncio client, with hiredis when present).

Every change is one Lua script run atomically by Redis: it checks, writes, takes the next version
and publishes the change with it, so every instance can apply the changes in one order. A snapshot
is one script too (every control key at one version). Sessions are single commands, pipelined when
many: a new pin is `SET ... NX GET` (one round trip: our pin, or the one another instance made
first), refreshes are `EXPIRE` in batches. Any failure to reach Redis is `StoreUnavailable`.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

import redis.asyncio as redis
from redis.exceptions import RedisError, ResponseError

from lbd.config import ClusterSettings
from lbd.errors import StoreConflict, StoreUnavailable
from lbd.store.keys import Keys

TIMEOUT_S: Final = 1.0  # connect and answer: a store slower than this counts as unreachable
PIPELINE_BATCH: Final = 1000

# KEYS: servers, draining, removed, mode, version, events. ARGV: op, origin, args...
CHANGE_SCRIPT: Final = """
local op, origin = ARGV[1], ARGV[2]
if op == 'register' then
  for i = 3, #ARGV, 2 do
    local existing = redis.call('HGET', KEYS[1], ARGV[i])
    if existing and existing ~= ARGV[i + 1] then
      return redis.error_reply('conflict ' .. ARGV[i] .. ' ' .. existing)
    end
  end
  for i = 3, #ARGV, 2 do
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    redis.call('SREM', KEYS[3], ARGV[i])
  end
elseif op == 'deregister' then
  redis.call('HDEL', KEYS[1], ARGV[3])
  redis.call('SREM', KEYS[2], ARGV[3])
  redis.call('SADD', KEYS[3], ARGV[3])
elseif op == 'drain' then
  if ARGV[4] == '1' then redis.call('SADD', KEYS[2], ARGV[3]) else redis.call('SREM', KEYS[2], ARGV[3]) end
elseif op == 'capacity' then
  redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
elseif op == 'mode' then
  if ARGV[3] == '' then redis.call('DEL', KEYS[4]) else redis.call('SET', KEYS[4], ARGV[3]) end
else
  return redis.error_reply('unknown op ' .. op)
end
local version = redis.call('INCR', KEYS[5])
local args = {}
for i = 3, #ARGV do args[#args + 1] = ARGV[i] end
redis.call('PUBLISH', KEYS[6], cjson.encode({version = version, origin = origin, op = op, args = args}))
return version
"""
# KEYS: servers, draining, removed, mode, version, epoch
SNAPSHOT_SCRIPT: Final = """
return {redis.call('GET', KEYS[5]) or '0', redis.call('HGETALL', KEYS[1]), redis.call('SMEMBERS', KEYS[2]),
        redis.call('SMEMBERS', KEYS[3]), redis.call('GET', KEYS[4]) or '', redis.call('GET', KEYS[6]) or ''}
"""


# a claim's answer: None when ours took, the pin the store holds, or the store's refusal of that claim
ClaimAnswer = str | StoreUnavailable | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every control key at one version."""

    version: int
    servers: dict[str, dict[str, Any]]  # id -> seed-format entry
    draining: frozenset[str]
    removed: frozenset[str]
    mode: str | None
    epoch: str | None


class RedisStore:
    def __init__(self, settings: ClusterSettings) -> None:
        assert settings.url is not None
        self.keys = Keys(settings.name)
        self.client: redis.Redis = redis.Redis.from_url(
            settings.url,
            password=settings.password,
            socket_timeout=TIMEOUT_S,
            socket_connect_timeout=TIMEOUT_S,
            decode_responses=True,
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._change = self.client.register_script(CHANGE_SCRIPT)
        self._snapshot = self.client.register_script(SNAPSHOT_SCRIPT)

    async def close(self) -> None:
        await self.client.aclose()

    async def ping(self) -> None:
        async with _reaching():
            await self.client.ping()

    async def change(self, op: str, origin: str, *args: str) -> int:
        """Make one change everywhere: its version, once Redis has it (StoreConflict when it conflicts)."""
        try:
            async with _reaching():
                return int(await self._change(keys=self.keys.control, args=[op, origin, *args]))
        except ResponseError as exc:
            message = str(exc)
            if message.startswith("conflict "):
                _, server_id, existing = message.split(" ", 2)
                entry = json.loads(existing)
                raise StoreConflict(
                    f"server {server_id!r} is already registered in the cluster as {entry.get('url')} (region "
                    f"{entry.get('region')}, capacity {entry.get('capacity')}); deregister it first to change it"
                ) from None
            raise StoreUnavailable(f"the cluster store refused the change: {message}", message) from None

    async def snapshot(self) -> Snapshot:
        keys = self.keys
        async with _reaching():
            version, pairs, draining, removed, mode, epoch = await self._snapshot(
                keys=[keys.servers, keys.draining, keys.removed, keys.mode, keys.version, keys.epoch]
            )
        servers = {pairs[i]: json.loads(pairs[i + 1]) for i in range(0, len(pairs), 2)}
        return Snapshot(int(version), servers, frozenset(draining), frozenset(removed), mode or None, epoch or None)

    async def claim_epoch(self, token: str) -> str:
        """The store's epoch: `token` if it had none (a new or emptied Redis), else the one it has."""
        async with _reaching():
            existing = await self.client.set(self.keys.epoch, token, nx=True, get=True)
        return token if existing is None else str(existing)

    # --- sessions ----------------------------------------------------------------------------------

    async def claim_sessions(self, claims: list[tuple[str, str]], ttl_s: int) -> list[ClaimAnswer]:
        """Pin each (client, value) unless the client is pinned already, in one round trip: for each,
        None when ours took, the value the store holds, or StoreUnavailable where it refused that one."""
        keys = self.keys
        async with _reaching(refusal_too=True):
            if len(claims) == 1:  # one command costs redis-py less than a pipeline of one
                client_id, value = claims[0]
                answers = [await self.client.set(keys.session(client_id), value, nx=True, ex=ttl_s, get=True)]
            else:
                async with self.client.pipeline(transaction=False) as pipe:
                    for client_id, value in claims:
                        pipe.set(keys.session(client_id), value, nx=True, ex=ttl_s, get=True)
                    answers = await pipe.execute(raise_on_error=False)  # one refusal spoils no other answer
        return [_claim_answer(answer) for answer in answers]

    async def write_sessions(self, entries: Iterable[tuple[str, str, int]], only_new: bool) -> list[tuple[str, str]]:
        """(client, value, ttl) in pipelined batches. `only_new`: keep what another instance wrote,
        and return those pins, (client, the value the store kept), so this instance adopts them."""
        kept: list[tuple[str, str]] = []
        batch: list[tuple[str, str, int]] = []
        for entry in entries:
            batch.append(entry)
            if len(batch) >= PIPELINE_BATCH:
                kept += await self._write(batch, only_new)
                batch = []
        if batch:
            kept += await self._write(batch, only_new)
        return kept

    async def _write(self, batch: list[tuple[str, str, int]], only_new: bool) -> list[tuple[str, str]]:
        async with _reaching(), self.client.pipeline(transaction=False) as pipe:
            for client_id, value, ttl in batch:
                pipe.set(self.keys.session(client_id), value, ex=max(1, ttl), nx=only_new, get=only_new)
            answers = await pipe.execute()
        if not only_new:
            return []
        return [
            (client_id, str(existing))
            for (client_id, value, _), existing in zip(batch, answers, strict=True)
            if existing is not None and existing != value
        ]

    async def refresh_sessions(self, client_ids: list[str], ttl_s: int) -> None:
        async with _reaching(), self.client.pipeline(transaction=False) as pipe:
            for client_id in client_ids:
                pipe.expire(self.keys.session(client_id), ttl_s)
            await pipe.execute()

    async def forget_sessions(self, client_ids: list[str]) -> None:
        if client_ids:
            async with _reaching():
                await self.client.delete(*(self.keys.session(c) for c in client_ids))

    async def publish_moves(self, origin: str, moves: list[tuple[str, str | None]]) -> None:
        payload = json.dumps({"origin": origin, "moves": moves}, separators=(",", ":"))
        async with _reaching():
            await self.client.publish(self.keys.session_events, payload)

    # --- instances ---------------------------------------------------------------------------------

    async def heartbeat(self, instance: str, info: dict[str, Any], ttl_s: float) -> list[dict[str, Any]]:
        """Say this instance lives, and list the live ones (heartbeats within `ttl_s`), itself included."""
        now = time.time()
        keys = self.keys
        async with _reaching():
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.zadd(keys.instances, {instance: now})
                pipe.set(keys.instance(instance), json.dumps(info), ex=max(1, round(ttl_s)))
                pipe.zremrangebyscore(keys.instances, 0, now - ttl_s)
                pipe.zrange(keys.instances, 0, -1, withscores=True)
                *_, members = await pipe.execute()
            names = [name for name, _ in members]
            infos = await self.client.mget([keys.instance(name) for name in names]) if names else []
        peers = []
        for (name, seen), raw in zip(members, infos, strict=True):
            details = json.loads(raw) if raw else {}
            peers.append({"instance": name, "listen": details.get("listen"), "last_seen_s": round(now - seen, 3)})
        return peers

    async def leave(self, instance: str) -> None:
        async with _reaching():
            await self.client.zrem(self.keys.instances, instance)
            await self.client.delete(self.keys.instance(instance))

    # --- change notices ----------------------------------------------------------------------------

    async def version(self) -> int:
        """The version of the last change the store holds (0: none, or an emptied store)."""
        async with _reaching():
            return int(await self.client.get(self.keys.version) or 0)

    @asynccontextmanager
    async def subscription(self) -> AsyncIterator[Subscription]:
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            async with _reaching():
                await pubsub.subscribe(self.keys.events, self.keys.session_events)
            yield Subscription(pubsub)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # untyped before redis-py 8


class Subscription:
    """The change notices of one connection; a lost connection is StoreUnavailable like any other."""

    def __init__(self, pubsub: redis.client.PubSub) -> None:
        self._pubsub = pubsub

    async def next(self, timeout_s: float) -> tuple[str, str] | None:
        """The next notice as (channel, data), or None after `timeout_s` without one."""
        async with _reaching():
            message = await self._pubsub.get_message(timeout=timeout_s)
        if message is None or message.get("type") != "message":
            return None
        return str(message["channel"]), str(message["data"])


def _claim_answer(answer: object) -> ClaimAnswer:
    if answer is None:
        return None
    if isinstance(answer, ResponseError):
        return StoreUnavailable(f"the cluster store refused a claim ({answer})", str(answer))
    return str(answer)


@asynccontextmanager
async def _reaching(refusal_too: bool = False) -> AsyncIterator[None]:
    """Redis's connection errors and timeouts as one StoreUnavailable naming the cause; a refusal
    (ResponseError) too when `refusal_too`, for a caller with no other answer to it."""
    try:
        yield
    except ResponseError as exc:
        if not refusal_too:
            raise
        raise StoreUnavailable(f"the cluster store refused ({exc})", str(exc)) from None
    except (RedisError, OSError, TimeoutError) as exc:
        cause = f"{type(exc).__name__}: {exc}"
        raise StoreUnavailable(f"the cluster store is unreachable ({cause})", cause) from None
