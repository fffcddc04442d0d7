"""The deadline wheel on a real event loop: deadlines fire within a tick after they are due, never
before; a moved deadline fires only at its new time; a cleared one never fires."""

from __future__ import annotations

import asyncio

from lbd.proxy.deadlines import TICK_S, DeadlineWheel


class Recorder:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.fired: list[float] = []

    def deadline_reached(self) -> None:
        self.fired.append(self.loop.time())


def test_deadlines_fire_on_time_and_moves_and_clears_are_honoured() -> None:
    async def scenario() -> tuple[float, dict[str, list[float]]]:
        loop = asyncio.get_running_loop()
        wheel = DeadlineWheel(loop)
        items = {name: Recorder(loop) for name in ("plain", "moved", "cleared", "past")}
        start = loop.time()
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
