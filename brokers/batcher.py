"""DeadlineBatcher: dynamic batching under a deadline, pure asyncio (no sockets, no torch).

A batch closes when it is full (by sessions or by target tokens) or when its oldest item has
waited ``max_wait_s`` -- the deadline starts at the first arrival, not when the previous batch
left (Ray Serve's old bug). The queue is bounded: ``submit`` on a full queue raises QueueFull at
once, which the broker turns into a retriable "overloaded" reply. Every item carries its own
future; ``Batch.fail`` fails all of them.

With a ``hold`` policy (brokers/slo.py, when ``broker.slo_tpot_ms`` > 0) a batch whose deadline has
passed may still be held for proposals expected soon, and queued items leave in the policy's
priority order (closest to their objective first); without one, the batch leaves at its deadline
in arrival order. Either way a batch takes running sessions' rows before the histories of
sessions that open (``_take``).
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
    max_sessions: int = 128  # the defaults are BrokerConfig's max_batch_sessions and max_batch_tokens
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
    key: object = None
    prefill: bool = False  # it (re)opens its session: most of its tokens are its history's prefill


@dataclass
class Batch(Generic[T]):
    batch_id: int
    items: list[Item[T]]
    opened: float  # arrival of the oldest item
    closed: float
    reason: str  # "full", "deadline" or "held" (past its deadline, by the hold policy)
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

    def __init__(self, policy: BatchPolicy, clock=None, hold=None):
        self.policy = policy
        self.clock = clock or MonotonicClock()
        self.hold = hold  # hold_until(now, items, held_since) and priority(item), or None
        self.holds = 0  # batches that left later than their deadline because the policy held them
        self.held_s = 0.0
        self._queue: deque[Item[T]] = deque()
        self._by_key: dict[object, Item[T]] = {}  # queued items that carry a key
        self._queued_tokens = 0
        self._queued_histories = 0  # queued items that open their session (prefill)
        self.superseded = 0
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._queue)

    def submit(self, payload: T, tokens: int = 1, key: object = None, prefill: bool = False) -> asyncio.Future:
        """Queue ``payload``. An item with the same ``key`` still queued is superseded: the new
        payload takes its place in line (and its deadline) and the old future is cancelled, so at
        most one item per key waits (a session's resent or newer proposal replaces the one its
        drafter no longer waits for; two of one session must never share a batch). ``prefill``:
        it opens its session, and a batch's token budget goes to running sessions first."""
        future = asyncio.get_running_loop().create_future()
        old = self._by_key.get(key) if key is not None else None
        if old is not None:
            old.future.cancel()
            self._queued_tokens += tokens - old.tokens
            self._queued_histories += prefill - old.prefill
            old.payload, old.tokens, old.future, old.prefill = payload, tokens, future, prefill
            self.superseded += 1
        else:
            if len(self._queue) >= self.policy.max_queue:
                raise QueueFull(f"{len(self._queue)} proposals already queued")
            item = Item(payload, tokens, self.clock.now(), future, key, prefill)
            self._queue.append(item)
            if key is not None:
                self._by_key[key] = item
            self._queued_tokens += tokens
            self._queued_histories += prefill
        self._changed.set()
        return future

    def has(self, key: object) -> bool:
        """Whether an item of ``key`` is queued."""
        return key in self._by_key

    def withdraw(self, key: object) -> bool:
        """Drop the queued item of ``key`` (its session was closed) and cancel its future."""
        item = self._by_key.pop(key, None)
        if item is None:
            return False
        self._queue.remove(item)
        self._queued_tokens -= item.tokens
        self._queued_histories -= item.prefill
        item.future.cancel()
        self._changed.set()
        return True

    def _full(self) -> bool:
        return len(self._queue) >= self.policy.max_sessions or self._queued_tokens >= self.policy.max_tokens

    async def next_batch(self) -> Batch[T]:
        """Wait for the next batch: at least one item, closed by size or by the deadline."""
        while not self._queue:
            self._changed.clear()
            await self._changed.wait()
        reason = "deadline"
        held_since = None  # when the deadline passed and the hold policy was first asked
        while True:
            if self._full():
                reason = "full"
                break
            now = self.clock.now()
            remaining = self._queue[0].arrived + self.policy.max_wait_s - now
            if remaining <= 0:
                if self.hold is None:
                    break
                held_since = now if held_since is None else held_since
                until = self.hold.hold_until(now, list(self._queue), held_since)
                if until is None or until <= now:
                    break
                remaining = until - now  # an arrival before then wakes us to ask again
            self._changed.clear()
            await self.clock.wait(self._changed, remaining)
            if not self._queue:  # drained by fail_all or withdraw while we waited
                return await self.next_batch()
        if held_since is not None and self.clock.now() > held_since:
            self.holds += 1
            self.held_s += self.clock.now() - held_since
            reason = "held" if reason == "deadline" else reason
        return self._take(reason)

    def _take(self, reason: str) -> Batch[T]:
        if self.hold is not None and len(self._queue) > 1:
            # closest to its objective first (a stable sort: ties keep their arrival order)
            self._queue = deque(sorted(self._queue, key=self.hold.priority))
        # Running sessions' rows first, then the histories of sessions that open, while the token
        # budget lasts (vLLM's order: decodes before prefills). Taken head first, a wave of
        # arrivals, older than every running session's round, filled batch after batch and left
        # the running sessions out of all of them. Every batch opens at least one waiting session,
        # whatever its size, so none waits for the running ones to fall silent.
        items: list[Item[T]] = []
        tokens = 0
        left: list[Item[T]] = []  # what stays queued, in its order
        histories: list[Item[T]] = []
        queue = self._queue
        # a seat kept for a waiting session: with more sessions running than a batch holds, the
        # running rows alone would fill every batch
        seats = self.policy.max_sessions - (self._queued_histories > 0)
        while queue and (len(items) < seats or (self._queued_histories and not histories)):  # the running rows
            item = queue.popleft()
            if item.prefill:
                histories.append(item)
                left.append(item)
            elif len(items) < seats and (not items or tokens + item.tokens <= self.policy.max_tokens):
                items.append(item)
                tokens += item.tokens
            else:
                left.append(item)
        opened = set()
        for item in histories:  # then the histories that fit, at least one
            if len(items) >= self.policy.max_sessions:
                break
            if not opened or tokens + item.tokens <= self.policy.max_tokens:
                items.append(item)
                tokens += item.tokens
                opened.add(id(item))
        queue.extendleft(reversed([item for item in left if id(item) not in opened]))
        self._queued_histories -= len(opened)
        for item in items:
            self._by_key.pop(item.key, None)
        self._queued_tokens -= tokens
        now = self.clock.now()
        return Batch(next(self._ids), items, min(item.arrived for item in items), now, reason)

    def close(self) -> None:
        """Release the clock's resources (a PreciseClock's timer) once the batcher is discarded."""
        close = getattr(self.clock, "close", None)
        if close is not None:
            close()

    def fail_all(self, exc: BaseException) -> int:
        """Fail every queued item (its verifier died); returns how many."""
        n = len(self._queue)
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(exc)
        self._by_key.clear()
        self._queued_tokens = 0
        self._queued_histories = 0
        self._changed.set()
        return n
