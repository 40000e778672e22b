"""A session's cache and a verifier's death, in one process: a real Broker and a real VerifierWorker
(tiny target) on loopback sockets, a raw DEALER playing the drafter.

* A close while the session's first proposal is still queued (round 0) or still at the verifier
  must leave no KV cache behind: before, the queued proposal was verified after the close and
  its cache stayed until ``session_idle_s`` (5 minutes by default).
* A verifier whose forward fails with a non-item error (out of memory, say) tells the broker
  with a Dying message: the drafter gets ``verifier_lost`` at once, not after
  ``heartbeat_ms * liveness``.
"""

import asyncio
import contextlib
import time

import pytest
import zmq
import zmq.asyncio

from brokers.broker import Broker
from pipeline.client import broker_stats
from pipeline.config import load_config
from pipeline.protocol import (
    DRAFTER_UPSTREAM_ACCEPTS,
    BatchVerdicts,
    CloseSession,
    ErrorCode,
    ErrorReply,
    Inbox,
    Propose,
    Ready,
    VerifyBatch,
)
from tests.conftest import free_ports, tiny_llama
from workers.target import TargetVerifier
from workers.verifier import VerifierWorker

HISTORY = [5, 4, 3, 2, 1]


def config_for(**settings):
    front, back = free_ports(2)
    overrides = [f'broker.frontend="tcp://127.0.0.1:{front}"', f'broker.backend="tcp://127.0.0.1:{back}"',
                 "broker.heartbeat_ms=200", "broker.liveness=15", 'verifier.name="verifier-t"']
    return load_config(None, overrides + [f"{k}={v}" for k, v in settings.items()])


def dealer(ctx, endpoint: str) -> zmq.asyncio.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    return sock


@contextlib.asynccontextmanager
async def running(config, target: TargetVerifier, broker: bool = True):
    """The broker (optional) and one verifier worker as tasks of this loop; with the broker, a
    drafter's DEALER once the verifier has had time to register."""
    ctx = zmq.asyncio.Context()
    stop = asyncio.Event()
    tasks = []
    if broker:
        tasks.append(asyncio.create_task(Broker(config, ctx).run(stop)))
    worker = asyncio.create_task(VerifierWorker(config, target, ctx).run(stop))
    drafter = dealer(ctx, config.broker.frontend) if broker else None
    await asyncio.sleep(0.5)  # the verifier registers
    try:
        yield ctx, worker, drafter
    finally:
        stop.set()
        for task in [*tasks, worker]:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 5)
        ctx.destroy(0)


async def verifier_sessions(config) -> int:
    """What `sled status` shows: the verifier's own session count, relayed by the broker."""
    stats = await broker_stats(config.broker.frontend)
    return sum(v["sessions"] for v in stats["verifiers"].values())


async def test_a_close_in_round_0_at_the_broker_leaves_no_cache():
    # a long deadline keeps the first proposal queued at the broker when the close arrives
    config = config_for(**{"broker.max_wait_ms": 300.0})
    target = TargetVerifier(tiny_llama(1), max_sessions=8, limits=config.limits)
    async with running(config, target) as (_, _, drafter):
        await drafter.send(Propose("s-0", 0, len(HISTORY), [1, 2], history=HISTORY).encode())
        await asyncio.sleep(0.05)
        await drafter.send(CloseSession("s-0").encode())  # the client cancelled during round 0
        await asyncio.sleep(1.0)
        assert not target.sessions, "the closed session's KV cache was rebuilt after the close"
        assert await verifier_sessions(config) == 0
        # the broker keeps serving: a new session is verified
        await drafter.send(Propose("s-1", 0, len(HISTORY), [1], history=HISTORY).encode())
        reply = DRAFTER_UPSTREAM_ACCEPTS.decode(await asyncio.wait_for(drafter.recv(), 5))
        assert reply.session_id == "s-1" and not getattr(reply, "code", "")


async def test_a_close_that_overtakes_its_batch_at_the_verifier_leaves_no_cache():
    """The batch and the close arrive together: the close must not run before the forward."""
    config = config_for()
    target = TargetVerifier(tiny_llama(1), max_sessions=8, limits=config.limits)
    ctx = zmq.asyncio.Context()
    broker = ctx.socket(zmq.ROUTER)
    broker.linger = 0
    broker.bind(config.broker.backend)
    inbox = Inbox(Ready, BatchVerdicts)
    try:
        async with running(config, target, broker=False):
            while True:  # the verifier's Ready (heartbeats are not in the inbox: skip them)
                identity, frame = await asyncio.wait_for(broker.recv_multipart(), 5)
                with contextlib.suppress(Exception):
                    if isinstance(inbox.decode(frame), Ready):
                        break
            batch = VerifyBatch(1, [Propose("s-0", 0, len(HISTORY), [1, 2], history=HISTORY)])
            await broker.send_multipart([identity, batch.encode()])
            await broker.send_multipart([identity, CloseSession("s-0").encode()])
            deadline, reply = time.monotonic() + 10, None
            while time.monotonic() < deadline:
                identity, frame = await asyncio.wait_for(broker.recv_multipart(), 5)
                with contextlib.suppress(Exception):
                    reply = inbox.decode(frame)
                    if isinstance(reply, BatchVerdicts):
                        break
            await asyncio.sleep(0.5)
            assert not target.sessions, "the closed session's KV cache outlived the close"
            # the batch's cost, which the broker prices rows with: on this CPU, the forward's CPU time
            assert isinstance(reply, BatchVerdicts) and reply.cost_ms > 0 and reply.compute_ms > 0
            assert reply.cost_ms == pytest.approx(1000 * target.stats.batch_cpu_s, rel=0.01)
    finally:
        broker.close(0)
        ctx.destroy(0)


class OutOfMemory(RuntimeError):
    pass


class FailingTarget(TargetVerifier):
    """An injected fault: the forward fails for the whole batch, as CUDA out of memory does."""

    def verify_batch(self, items):
        raise OutOfMemory("CUDA out of memory (injected)")


async def test_a_verifier_that_dies_mid_batch_is_failed_over_at_once():
    # liveness alone would notice only after 200 ms x 15 = 3 s
    config = config_for(**{"broker.max_wait_ms": 1.0})
    target = FailingTarget(tiny_llama(1), max_sessions=8, limits=config.limits)
    async with running(config, target) as (_, worker, drafter):
        started = time.monotonic()
        await drafter.send(Propose("s-0", 0, len(HISTORY), [1, 2], history=HISTORY).encode())
        reply = DRAFTER_UPSTREAM_ACCEPTS.decode(await asyncio.wait_for(drafter.recv(), 5))
        waited = time.monotonic() - started
        assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.VERIFIER_LOST and reply.retriable
        assert waited < 1.0, f"the broker noticed the dead verifier after {waited:.2f} s"
        assert "out of memory" in reply.detail
        with pytest.raises(OutOfMemory):  # and the worker still dies of it (its process exits 1)
            await asyncio.wait_for(worker, 5)
        assert (await broker_stats(config.broker.frontend))["verifiers_lost"] == 1


class SlowTarget(TargetVerifier):
    """Each forward takes 20 ms more, so that a close can land while a batch is at the verifier."""

    def verify_batch(self, items):
        time.sleep(0.02)
        return super().verify_batch(items)


async def test_closes_racing_round_0_at_every_moment_leave_no_cache():
    """A close sent 0 to 60 ms after the first proposal: still queued at the broker, in the
    batch on its way, inside the forward, or after the verdict. Whichever it meets, no cache
    stays behind, and the verifier serves on."""
    config = config_for(**{"broker.max_wait_ms": 5.0})
    target = SlowTarget(tiny_llama(1), max_sessions=32, limits=config.limits)
    async with running(config, target) as (_, _, drafter):
        for i, delay in enumerate([0.0, 0.0005, 0.002, 0.004, 0.006, 0.01, 0.015, 0.02, 0.03, 0.045, 0.06]):
            await drafter.send(Propose(f"r-{i}", 0, len(HISTORY), [1, 2], history=HISTORY).encode())
            await asyncio.sleep(delay)
            await drafter.send(CloseSession(f"r-{i}").encode())
        await asyncio.sleep(1.0)
        assert not target.sessions, f"caches left behind: {sorted(target.sessions)}"
        assert await verifier_sessions(config) == 0
        await drafter.send(Propose("after", 0, len(HISTORY), [1], history=HISTORY).encode())
        while True:  # verdicts or errors of the closed sessions may still be in the socket
            reply = DRAFTER_UPSTREAM_ACCEPTS.decode(await asyncio.wait_for(drafter.recv(), 5))
            if reply.session_id == "after":
                break
        assert not getattr(reply, "code", "")
