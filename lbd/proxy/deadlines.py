"""Request deadlines on a timer wheel: one loop timer per tick instead of one per request.

Arming and cancelling an event-loop timer for every request costs more than the rest of a small
request's bookkeeping. Here a deadline is a dict insert into its 10 ms bucket and cancelling it a
dict delete; one loop timer ticks while any deadline is armed. Deadlines fire up to one tick late,
never early.
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
