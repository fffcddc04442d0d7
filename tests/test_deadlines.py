"""The deadline wheel on a real event loop and the monotonic clock: deadlines fire within a tick
after they are due, never before; a moved deadline fires only at its new time; a cleared one never
fires."""

from __future__ import annotations

import asyncio
import time

from lbd.proxy.deadlines import TICK_S, DeadlineWheel, KeptDeadline


class Recorder:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.fired: list[float] = []

    def deadline_reached(self) -> None:
        self.fired.append(time.monotonic())


def test_deadlines_fire_on_time_and_moves_and_clears_are_honoured() -> None:
    async def scenario() -> tuple[float, dict[str, list[float]]]:
        loop = asyncio.get_running_loop()
        wheel = DeadlineWheel(loop)
        items = {name: Recorder(loop) for name in ("plain", "moved", "cleared", "past")}
        start = time.monotonic()
        wheel.arm(items["plain"], start + 0.05)
        handle = wheel.arm(items["moved"], start + 0.03)
        wheel.move(items["moved"], handle, start + 0.12)
        handle = wheel.arm(items["cleared"], start + 0.04)
        assert wheel.move(items["cleared"], handle, None) == 0
        wheel.arm(items["past"], start - 1.0)  # already due: fires at the next tick
        await asyncio.sleep(0.2)
        return start, {name: item.fired for name, item in items.items()}

    start, fired = asyncio.run(scenario())
    assert len(fired["plain"]) == 1 and 0.05 <= fired["plain"][0] - start < 0.05 + 3 * TICK_S + 0.02
    assert len(fired["moved"]) == 1 and fired["moved"][0] - start >= 0.12
    assert fired["cleared"] == []
    assert len(fired["past"]) == 1 and fired["past"][0] - start < 3 * TICK_S + 0.02


class Rearming(Recorder):
    """Arms itself once more from its own callback, as an exchange does while the client is slow."""

    def __init__(self, loop: asyncio.AbstractEventLoop, wheel: DeadlineWheel, again_s: float) -> None:
        super().__init__(loop)
        self.wheel = wheel
        self.again_s = again_s

    def deadline_reached(self) -> None:
        super().deadline_reached()
        if len(self.fired) == 1:
            self.wheel.arm(self, time.monotonic() + self.again_s)


def test_deadlines_sharing_a_tick_are_kept_apart_and_the_wheel_works_after_each_round() -> None:
    """Deadlines due together share a bucket that arm and move reach without a look-up: clearing
    or moving one of them leaves the others, and buckets made after a round has fired still fire."""

    async def scenario() -> tuple[list[Recorder], list[Recorder], Rearming, list[Recorder]]:
        loop = asyncio.get_running_loop()
        wheel = DeadlineWheel(loop)
        when = time.monotonic() + 0.03
        together = [Recorder(loop) for _ in range(6)]
        handles = [wheel.arm(item, when) for item in together]
        assert len(set(handles)) == 1  # one tick, one bucket
        cleared = together[:3]
        for item, handle in zip(cleared, handles[:3], strict=True):
            assert wheel.move(item, handle, None) == 0
        wheel.move(together[3], handles[3], when)  # moved to where it was: still armed once
        rearming = Rearming(loop, wheel, 0.03)
        wheel.arm(rearming, when)
        deadline = time.monotonic() + 5.0
        while not all(item.fired for item in together[3:]) and time.monotonic() < deadline:
            await asyncio.sleep(TICK_S)
        later = [Recorder(loop) for _ in range(3)]  # armed after that round: new buckets, same wheel
        for item in later:
            wheel.arm(item, time.monotonic() + 0.02)
        while (len(rearming.fired) < 2 or not all(item.fired for item in later)) and time.monotonic() < deadline:
            await asyncio.sleep(TICK_S)
        await asyncio.sleep(5 * TICK_S)  # nothing fires twice, nothing cleared fires late
        return cleared, together[3:], rearming, later

    cleared, kept, rearming, later = asyncio.run(scenario())
    assert all(item.fired == [] for item in cleared)
    assert all(len(item.fired) == 1 for item in kept)
    assert len(rearming.fired) == 2 and rearming.fired[1] - rearming.fired[0] >= 0.03
    assert all(len(item.fired) == 1 for item in later)


class Holder(Recorder):
    """A request on a kept deadline: told when the entry fires, it acts only once its own deadline is
    due and arms again before that, as an exchange does."""

    def __init__(self, loop: asyncio.AbstractEventLoop, kept: KeptDeadline, due: float) -> None:
        super().__init__(loop)
        self.kept = kept
        self.due = due
        self.early: list[float] = []

    def deadline_reached(self) -> None:
        now = time.monotonic()
        if now < self.due:
            self.early.append(now)
            self.kept.arm(self, self.due)
        else:
            super().deadline_reached()


def test_a_kept_deadline_serves_requests_one_after_another() -> None:
    """One wheel entry for a connection's requests: a released request is never told, a later one
    armed behind it is told early and arms again, and an earlier deadline moves the entry forward."""

    async def scenario() -> tuple[float, Holder, Holder, Holder]:
        loop = asyncio.get_running_loop()
        kept = KeptDeadline(DeadlineWheel(loop))
        start = time.monotonic()
        first = Holder(loop, kept, start + 0.05)
        kept.arm(first, first.due)
        kept.release(first)  # answered before its deadline
        second = Holder(loop, kept, start + 0.15)
        kept.arm(second, second.due)  # the entry stays at 0.05: second is told then, early
        deadline = start + 5.0
        while not second.fired and time.monotonic() < deadline:
            await asyncio.sleep(TICK_S)
        kept.release(second)
        third = Holder(loop, kept, time.monotonic() + 30.0)  # beyond the wait below: never seen unless moved
        kept.arm(third, third.due)
        third.due = time.monotonic() + 0.03  # a shorter timeout than the one armed: moved forward
        kept.arm(third, third.due)
        while not third.fired and time.monotonic() < deadline:
            await asyncio.sleep(TICK_S)
        return start, first, second, third

    start, first, second, third = asyncio.run(scenario())
    assert first.fired == [] and first.early == []
    assert len(second.early) == 1 and second.early[0] - start >= 0.05
    assert len(second.fired) == 1 and second.fired[0] - start >= 0.15
    assert third.early == [] and len(third.fired) == 1  # within the 5 s wait: not at the 30 s first armed
