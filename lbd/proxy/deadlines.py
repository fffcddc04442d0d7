"""Request deadlines on a timer wheel: one loop timer per tick instead of one per request.

Arming and cancelling an event-loop timer for every request costs more than the rest of a small
request's bookkeeping. Here a deadline is a dict insert into its 10 ms bucket and cancelling it a
dict delete; one loop timer ticks while any deadline is armed. The wheel's entries fire up to one
tick late, never early.

A keep-alive connection's requests, one after another, share one `KeptDeadline`: armed once and
left on the wheel when a request ends, it costs the next request a comparison, not an insert and
a delete. Its holder may be told early (the entry was armed for an earlier request) and arms again.
"""

from __future__ import annotations

import asyncio
from typing import Final, Protocol

from lbd.clock import monotonic  # deadlines are monotonic times

TICK_S: Final = 0.01


class Timed(Protocol):
    def deadline_reached(self) -> None: ...


class DeadlineWheel:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._buckets: dict[int, dict[Timed, None]] = {}
        self._next_tick = 0  # the first tick not yet processed
        self._timer: asyncio.TimerHandle | None = None
        # the bucket last armed into: requests arriving together share a tick, and comparing the tick
        # costs less than looking it up (a tick is a large int: boxed and hashed for the dict)
        self._last_tick = 0  # 0: none
        self._last_bucket: dict[Timed, None] = {}

    def arm(self, item: Timed, when: float) -> int:
        """Call `item.deadline_reached()` at `when` (`time.monotonic()`) or within a tick after; returns the
        handle `move` takes."""
        tick = int(when / TICK_S) + 1
        if self._timer is None:
            self._next_tick = min(tick, int(monotonic() / TICK_S))
            self._timer = self.loop.call_later(TICK_S, self._run)
        elif tick < self._next_tick:
            tick = self._next_tick  # already due: the next tick fires it
        if tick == self._last_tick:
            self._last_bucket[item] = None
            return tick
        bucket = self._buckets.get(tick)
        if bucket is None:
            bucket = self._buckets[tick] = {}
        bucket[item] = None
        self._last_tick, self._last_bucket = tick, bucket
        return tick

    def move(self, item: Timed, handle: int, when: float | None) -> int:
        """Replace `item`'s deadline `handle` (0: none armed) by one at `when` (None: no deadline);
        returns the new handle, 0 when none."""
        if handle:
            bucket = self._last_bucket if handle == self._last_tick else self._buckets.get(handle)
            if bucket is not None:
                try:  # noqa: SIM105 (compiled, a try costs nothing; contextlib.suppress is a call and a context)
                    del bucket[item]  # one look-up: `in` first would hash and search twice
                except KeyError:
                    pass  # not expected (an item is in its handle's bucket until that fires and goes)
        return 0 if when is None else self.arm(item, when)

    def _run(self) -> None:
        now_tick = int(monotonic() / TICK_S)
        first, self._next_tick = self._next_tick, now_tick + 1  # items re-armed below land after now
        if self._last_tick <= now_tick:  # its bucket is popped below: let it go with what it holds
            self._last_tick, self._last_bucket = 0, {}
        buckets = self._buckets
        for tick in range(first, now_tick + 1):
            bucket = buckets.pop(tick, None)
            if bucket:
                for item in list(bucket):
                    item.deadline_reached()
        self._timer = self.loop.call_later(TICK_S, self._run) if buckets else None


class KeptDeadline:
    """One connection's request deadlines, one request after another, on one wheel entry that stays
    armed between them. `arm` moves the entry only to make it earlier; when it fires, the request
    holding it then is told (`deadline_reached`), which acts if its own deadline is due and arms
    again if not. A request that ends lets go (`release`): the entry then fires for nobody."""

    __slots__ = ("handle", "holder", "wheel", "when")

    def __init__(self, wheel: DeadlineWheel) -> None:
        self.wheel = wheel
        self.holder: Timed | None = None
        self.handle = 0  # the wheel's, 0 when not armed
        self.when = 0.0  # when the armed entry fires

    def arm(self, holder: Timed, when: float) -> None:
        """`holder.deadline_reached()` no later than a tick after `when` (possibly before)."""
        self.holder = holder
        if self.handle and self.when <= when:
            return  # fires first; the holder arms again then for what is due
        self.handle = self.wheel.move(self, self.handle, when)
        self.when = when

    def release(self, holder: Timed) -> None:
        if self.holder is holder:
            self.holder = None

    def clear(self) -> None:
        """The connection is gone: off the wheel now, not when the entry would fire."""
        self.holder = None
        if self.handle:
            self.handle = self.wheel.move(self, self.handle, None)

    def deadline_reached(self) -> None:
        self.handle = 0
        holder = self.holder
        if holder is not None:
            holder.deadline_reached()
