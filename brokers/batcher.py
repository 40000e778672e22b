"""DeadlineBatcher: dynamic batching under a deadline, pure asyncio (no sockets, no torch).

A batch closes when it is full (by sessions or by target tokens) or when its oldest item has
waited ``max_wait_s`` -- the deadline starts at the first arrival, not when the previous batch
left (Ray Serve's old bug). The queue is bounded: ``submit`` on a full queue raises QueueFull at
once, which the broker turns into a retriable "overloaded" reply. Every item carries its own
future; ``Batch.fail`` fails all of them.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from brokers.clock import MonotonicClock

T = TypeVar("T")


class QueueFull(Exception):
    retriable = True


@dataclass(frozen=True)
class BatchPolicy:
    max_sessions: int = 32
    max_tokens: int = 256
    max_wait_s: float = 0.005
    max_queue: int = 256

    def __post_init__(self):
        if self.max_sessions < 1 or self.max_tokens < 1 or self.max_queue < 1 or self.max_wait_s < 0:
            raise ValueError(f"invalid batch policy {self}")


@dataclass
class Item(Generic[T]):
    payload: T
    tokens: int
    arrived: float
    future: asyncio.Future


@dataclass
class Batch(Generic[T]):
    batch_id: int
    items: list[Item[T]]
    opened: float  # arrival of the oldest item
    closed: float
    reason: str  # "full" or "deadline"
    sent: float = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def payloads(self) -> list[T]:
        return [item.payload for item in self.items]

    @property
    def tokens(self) -> int:
        return sum(item.tokens for item in self.items)

    def resolve(self, results: list) -> None:
        for item, result in zip(self.items, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)

    def fail(self, exc: BaseException) -> None:
        for item in self.items:
            if not item.future.done():
                item.future.set_exception(exc)


class DeadlineBatcher(Generic[T]):
    _ids = itertools.count(1)

    def __init__(self, policy: BatchPolicy, clock=None):
        self.policy = policy
        self.clock = clock or MonotonicClock()
        self._queue: deque[Item[T]] = deque()
        self._queued_tokens = 0
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._queue)

    def submit(self, payload: T, tokens: int = 1) -> asyncio.Future:
        if len(self._queue) >= self.policy.max_queue:
            raise QueueFull(f"{len(self._queue)} proposals already queued")
        future = asyncio.get_running_loop().create_future()
        self._queue.append(Item(payload, tokens, self.clock.now(), future))
        self._queued_tokens += tokens
        self._changed.set()
        return future

    def _full(self) -> bool:
        return len(self._queue) >= self.policy.max_sessions or self._queued_tokens >= self.policy.max_tokens

    async def next_batch(self) -> Batch[T]:
        """Wait for the next batch: at least one item, closed by size or by the deadline."""
        while not self._queue:
            self._changed.clear()
            await self._changed.wait()
        reason = "deadline"
        while True:
            if self._full():
                reason = "full"
                break
            remaining = self._queue[0].arrived + self.policy.max_wait_s - self.clock.now()
            if remaining <= 0:
                break
            self._changed.clear()
            await self.clock.wait(self._changed, remaining)
            if not self._queue:  # drained by fail_all while we waited
                return await self.next_batch()
        return self._take(reason)

    def _take(self, reason: str) -> Batch[T]:
        items: list[Item[T]] = []
        tokens = 0
        while self._queue and len(items) < self.policy.max_sessions:
            nxt = self._queue[0]
            if items and tokens + nxt.tokens > self.policy.max_tokens:
                break
            items.append(self._queue.popleft())
            tokens += nxt.tokens
        self._queued_tokens -= tokens
        now = self.clock.now()
        return Batch(next(self._ids), items, items[0].arrived, now, reason)

    def fail_all(self, exc: BaseException) -> int:
        """Fail every queued item (its verifier died); returns how many."""
        n = len(self._queue)
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(exc)
        self._queued_tokens = 0
        self._changed.set()
        return n
