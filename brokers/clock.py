"""Clocks for the batcher: the real monotonic one, a precise one whose waits end on time (a
timerfd), and a manual one that tests advance by hand."""

from __future__ import annotations

import asyncio
import ctypes
import heapq
import itertools
import os
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


# --- deadlines on time ---------------------------------------------------------------------------


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_CLOCK_MONOTONIC, _TFD_TIMER_ABSTIME = 1, 1
_TFD_NONBLOCK, _TFD_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC


def _timerfd_calls():
    """(create() -> fd, arm(fd, absolute monotonic time; 0 disarms)) where timerfd exists (Linux)
    and time.monotonic reads CLOCK_MONOTONIC: Python's own os.timerfd_* (3.13+), else libc's."""
    if "CLOCK_MONOTONIC" not in time.get_clock_info("monotonic").implementation:
        return None
    if hasattr(os, "timerfd_create"):
        return (lambda: os.timerfd_create(time.CLOCK_MONOTONIC, flags=os.TFD_NONBLOCK | os.TFD_CLOEXEC),
                lambda fd, when: os.timerfd_settime(fd, flags=os.TFD_TIMER_ABSTIME, initial=when))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        create, settime = libc.timerfd_create, libc.timerfd_settime
    except (OSError, AttributeError):
        return None
    create.argtypes, create.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p]
    settime.restype = ctypes.c_int

    def arm(fd: int, when: float) -> None:
        spec = _Itimerspec()
        spec.it_value.tv_sec = int(when)
        spec.it_value.tv_nsec = int((when - int(when)) * 1e9)
        settime(fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None)

    return lambda: create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC), arm


_TIMERFD = _timerfd_calls()


class PreciseClock(MonotonicClock):
    """A MonotonicClock whose waits end on time, for one waiter at a time (one batcher).

    asyncio's epoll selector rounds every timeout UP to a whole millisecond (selectors:
    ``math.ceil(timeout * 1e3) * 1e-3``; epoll_wait takes milliseconds), so a batch whose deadline
    is 4.3 ms away leaves 5 ms later: up to 1 ms past ``max_wait_ms``, 0.5 ms on average, which
    the configuration promises never happens ("at most this long"). Waking earlier does not help,
    the next wait is rounded up again; closing a batch early would cut batching short. So each
    wait also arms a timerfd (nanosecond deadline, no busy-waiting) on the same clock as
    ``time.monotonic``; when it fires it sets the waiter's event, and the batcher, which re-checks
    its deadline after every wake-up, closes the batch. The loop's own timer stays as the
    fallback, and where timerfd is missing this is a plain MonotonicClock.
    """

    def __init__(self):
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._closed = False

    def _open(self) -> bool:
        if self._fd is None and _TIMERFD is not None and not self._closed:
            fd = _TIMERFD[0]()
            if fd < 0:
                return False
            self._fd, self._loop = fd, asyncio.get_running_loop()
            self._loop.add_reader(fd, self._fired)
        return self._fd is not None

    def _fired(self) -> None:
        try:
            os.read(self._fd, 8)
        except BlockingIOError:  # disarmed or re-armed after it became readable
            return
        if self._event is not None:
            self._event.set()

    async def wait(self, event: asyncio.Event, timeout: float) -> bool:
        if event.is_set() or timeout <= 0 or not self._open():
            return await super().wait(event, timeout)
        self._event = event
        _TIMERFD[1](self._fd, self.now() + timeout)
        try:
            return await super().wait(event, timeout)
        finally:
            self._event = None
            if not self._closed:
                _TIMERFD[1](self._fd, 0)

    def close(self) -> None:
        self._closed = True
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None


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
