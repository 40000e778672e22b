"""Clocks for the batcher: the real monotonic one, and a manual one that tests advance by hand."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    async def wait(self, event: asyncio.Event, timeout: float) -> bool:
        """Wait until ``event`` is set or ``timeout`` seconds pass; True if the event was set."""
        if event.is_set():
            return True
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        return True


class ManualClock:
    """Time moves only when ``advance`` is called; waits end when their deadline is passed."""

    def __init__(self, start: float = 0.0):
        self._now = start
        self._timers: list[tuple[float, int, asyncio.Future]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    async def advance(self, seconds: float) -> None:
        self._now += seconds
        while self._timers and self._timers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._timers)
            if not fut.done():
                fut.set_result(None)
        for _ in range(5):  # let woken tasks run before the test looks
            await asyncio.sleep(0)

    async def wait(self, event: asyncio.Event, timeout: float) -> bool:
        if event.is_set():
            return True
        timer = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self._now + timeout, next(self._seq), timer))
        waiter = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({timer, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            timer.cancel()
        return event.is_set()
