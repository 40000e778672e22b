"""DeadlineBatcher with a manual clock: no sockets, no sleeping."""

import asyncio

import pytest

from brokers.batcher import BatchPolicy, DeadlineBatcher, QueueFull
from brokers.clock import ManualClock


def make(**policy):
    clock = ManualClock()
    return DeadlineBatcher(BatchPolicy(**{"max_wait_s": 0.010, **policy}), clock), clock


async def test_deadline_starts_at_first_arrival():
    batcher, clock = make(max_sessions=10)
    await clock.advance(5.0)  # idle time before the first arrival must not count
    batcher.submit("a")
    task = asyncio.create_task(batcher.next_batch())
    await clock.advance(0.006)
    batcher.submit("b")  # a later arrival does not restart the deadline
    await clock.advance(0.003)
    assert not task.done()
    await clock.advance(0.0011)
    batch = await asyncio.wait_for(task, 1)
    assert batch.payloads == ["a", "b"] and batch.reason == "deadline"
    assert batch.closed - batch.opened == pytest.approx(0.0101)


async def test_closes_at_max_sessions_without_waiting():
    batcher, clock = make(max_sessions=3)
    task = asyncio.create_task(batcher.next_batch())
    for x in "abcd":
        batcher.submit(x)
    batch = await asyncio.wait_for(task, 1)
    assert batch.payloads == ["a", "b", "c"] and batch.reason == "full"
    assert len(batcher) == 1  # the fourth waits for the next batch


async def test_token_limit_never_exceeded():
    batcher, clock = make(max_sessions=10, max_tokens=10)
    for tokens in (4, 4, 5):
        batcher.submit(tokens, tokens)
    batch = await asyncio.wait_for(batcher.next_batch(), 1)
    assert batch.payloads == [4, 4] and batch.tokens == 8
    task = asyncio.create_task(batcher.next_batch())
    await clock.advance(0.02)
    assert (await asyncio.wait_for(task, 1)).payloads == [5]


async def test_running_rows_go_before_a_wave_of_histories_and_every_batch_opens_one():
    """Under the token budget, running sessions' rows are taken before the histories of sessions
    that open, however much older the wave is; the histories fill what is left, and a batch
    opens at least one waiting session even when the running rows leave no room."""
    batcher, clock = make(max_sessions=10, max_tokens=100)
    for i in range(4):
        batcher.submit(f"new{i}", 40, key=f"new{i}", prefill=True)  # a wave, queued first
    await clock.advance(0.001)
    for i in range(3):
        batcher.submit(f"run{i}", 5, key=f"run{i}")
    batch = await asyncio.wait_for(batcher.next_batch(), 1)
    assert batch.payloads == ["run0", "run1", "run2", "new0", "new1"] and batch.tokens == 95
    for i in range(3):
        batcher.submit(f"run{i}", 35, key=f"run{i}")  # rows that fill the budget on their own
    batch = await asyncio.wait_for(batcher.next_batch(), 1)
    assert batch.payloads == ["run0", "run1", "new2"]  # run2 waits; new2 goes over the budget
    task = asyncio.create_task(batcher.next_batch())  # 75 tokens: not full, so at the deadline
    await clock.advance(0.02)
    assert (await asyncio.wait_for(task, 1)).payloads == ["run2", "new3"]


async def test_a_waiting_session_gets_a_seat_when_running_sessions_fill_every_batch():
    """More sessions running than a batch holds: each batch keeps one seat for a session that
    opens, wherever it stands in the queue, so it is not left out for as long as they run."""
    batcher, clock = make(max_sessions=3, max_tokens=100)
    for i in range(5):
        batcher.submit(f"run{i}", 1, key=f"run{i}")
    batcher.submit("new", 10, key="new", prefill=True)
    batch = await asyncio.wait_for(batcher.next_batch(), 1)
    assert batch.payloads == ["run0", "run1", "new"]
    batch = await asyncio.wait_for(batcher.next_batch(), 1)
    assert batch.payloads == ["run2", "run3", "run4"]  # no one waits to open: every seat runs
    single, _ = make(max_sessions=1)  # one seat: the waiting session takes it, then the running one
    single.submit("run", 1, key="run")
    single.submit("new", 10, key="new", prefill=True)
    assert [(await asyncio.wait_for(single.next_batch(), 1)).payloads for _ in range(2)] == [["new"], ["run"]]


async def test_waits_for_first_arrival():
    batcher, clock = make()
    task = asyncio.create_task(batcher.next_batch())
    await clock.advance(1.0)
    assert not task.done()
    batcher.submit("x")
    await clock.advance(0.01)
    assert (await asyncio.wait_for(task, 1)).payloads == ["x"]


async def test_queue_bound_is_a_retriable_error():
    batcher, _ = make(max_queue=2)
    batcher.submit(1)
    batcher.submit(2)
    with pytest.raises(QueueFull) as info:
        batcher.submit(3)
    assert info.value.retriable


async def test_failed_batch_fails_every_item():
    batcher, clock = make(max_sessions=3)
    futures = [batcher.submit(i) for i in range(3)]
    batch = await batcher.next_batch()
    batch.fail(RuntimeError("verifier died"))
    for fut in futures:
        with pytest.raises(RuntimeError, match="verifier died"):
            await fut


async def test_resolve_gives_each_item_its_result():
    batcher, _ = make(max_sessions=2)
    futures = [batcher.submit(i) for i in range(2)]
    batch = await batcher.next_batch()
    batch.resolve(["r0", "r1"])
    assert [await f for f in futures] == ["r0", "r1"]


async def test_fail_all_empties_the_queue():
    batcher, _ = make()
    futures = [batcher.submit(i) for i in range(3)]
    assert batcher.fail_all(RuntimeError("gone")) == 3
    assert len(batcher) == 0
    assert all(isinstance(f.exception(), RuntimeError) for f in futures)


def test_zero_or_negative_limits_are_rejected():
    with pytest.raises(ValueError):
        BatchPolicy(max_sessions=0)


async def test_a_newer_item_with_the_same_key_supersedes_the_queued_one():
    batcher, clock = make(max_sessions=10)
    first = batcher.submit("s1-round3", 2, key="s1")
    other = batcher.submit("s2", 1, key="s2")
    await clock.advance(0.004)
    newer = batcher.submit("s1-round3-resent", 5, key="s1")  # a drafter's timeout resend
    assert first.cancelled() and not newer.done()  # the replaced one gets no reply
    task = asyncio.create_task(batcher.next_batch())
    await clock.advance(0.0061)  # the deadline is still the first arrival's
    batch = await asyncio.wait_for(task, 1)
    assert batch.payloads == ["s1-round3-resent", "s2"] and batch.tokens == 6
    assert batcher.superseded == 1
    again = batcher.submit("s1-round4", 1, key="s1")  # after dispatch a key queues anew
    assert len(batcher) == 1 and not again.done()
