"""The broker's routing and liveness in one process, on real sockets, with a ManualClock: batch
deadlines and peer liveness move only when the test advances time, so each step is exact.

Peers are bare DEALER sockets speaking the wire protocol: two verifiers that answer by hand and
two drafters."""

from __future__ import annotations

import asyncio
import contextlib

import zmq
import zmq.asyncio

from brokers.broker import Broker
from brokers.clock import ManualClock
from pipeline.config import load_config
from pipeline.errors import ErrorCode
from pipeline.protocol import (
    DRAFTER_UPSTREAM_ACCEPTS, VERIFIER_ACCEPTS, BatchVerdicts, CloseSession, ErrorReply, Heartbeat, Propose, Ready,
    Verdict, VerifyBatch,
)
from tests.conftest import free_ports

HEARTBEAT_S, LIVENESS = 0.02, 3  # a peer silent for 60 ms of the manual clock is dead
MAX_WAIT_S = 0.005


async def receive(sock, inbox, kinds, timeout: float = 2.0):
    """The next message of one of ``kinds``, skipping the broker's heartbeats."""
    async with asyncio.timeout(timeout):
        while True:
            msg = inbox.decode(await sock.recv())
            if isinstance(msg, kinds):
                return msg


async def nothing_arrives(sock, inbox, kinds, within: float = 0.1) -> bool:
    with contextlib.suppress(TimeoutError):
        await receive(sock, inbox, kinds, within)
        return False
    return True


@contextlib.asynccontextmanager
async def broker_with_peers():
    front, back = free_ports(2)
    config = load_config(None, [
        f'broker.frontend="tcp://127.0.0.1:{front}"', f'broker.backend="tcp://127.0.0.1:{back}"',
        f"broker.heartbeat_ms={int(HEARTBEAT_S * 1000)}", f"broker.liveness={LIVENESS}",
        f"broker.max_wait_ms={MAX_WAIT_S * 1000}", "broker.max_batch_sessions=4",
    ])
    ctx = zmq.asyncio.Context()
    clock = ManualClock(start=100.0)
    broker = Broker(config, ctx, clock=clock)
    stop = asyncio.Event()
    task = asyncio.create_task(broker.run(stop))
    peers = {}
    for name, endpoint in [("verifier-0", config.broker.backend), ("verifier-1", config.broker.backend),
                           ("drafter-a", config.broker.frontend), ("drafter-b", config.broker.frontend)]:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.identity = name.encode()
        sock.connect(endpoint)
        peers[name] = sock
    try:
        for name in ("verifier-0", "verifier-1"):  # registered in this order: ties go to verifier-0
            await peers[name].send(Ready().encode())
            for _ in range(200):
                if name.encode() in broker.verifiers:
                    break
                await asyncio.sleep(0.01)
        yield broker, clock, peers
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        for sock in peers.values():
            sock.close(0)
        ctx.term()


async def until(predicate, timeout: float = 5.0) -> None:
    """Real time for messages to cross the sockets (however loaded the machine); the manual clock stands."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.002)


async def dispatched(broker, clock, verifier) -> VerifyBatch:
    """Once the proposal is queued, let its deadline pass on the manual clock: the verifier then holds the batch."""
    await until(lambda: any(len(v.batcher) for v in broker.verifiers.values()))
    await clock.advance(MAX_WAIT_S)
    return await receive(verifier, VERIFIER_ACCEPTS, VerifyBatch)


async def heard(broker, clock, *peers) -> None:
    """Each peer has sent a heartbeat, and the broker has taken note of it at the clock's present time."""
    for peer in peers:
        await peer.send(Heartbeat(idle=True).encode())

    def noted(peer) -> bool:
        handle = broker.verifiers.get(peer.identity)
        return (handle.last_seen if handle else broker.drafter_seen.get(peer.identity)) == clock.now()
    await until(lambda: all(noted(p) for p in peers))


async def answer(verifier, batch: VerifyBatch) -> None:
    verdicts = [Verdict(p.session_id, p.round, len(p.draft), 7) for p in batch.items]
    await verifier.send(BatchVerdicts(batch.batch_id, verdicts).encode())
    await verifier.send(Ready().encode())


async def test_sessions_spread_stick_and_fail_over_when_a_verifier_falls_silent():
    async with broker_with_peers() as (broker, clock, peers):
        v0, v1, drafter = peers["verifier-0"], peers["verifier-1"], peers["drafter-a"]
        # a new session goes to the verifier with the fewest sessions
        await drafter.send(Propose("A", 0, 3, [5], history=[1, 2, 3]).encode())
        batch = await dispatched(broker, clock, v0)
        assert [p.session_id for p in batch.items] == ["A"]
        await drafter.send(Propose("B", 0, 3, [6], history=[1, 2, 3]).encode())
        batch_b = await dispatched(broker, clock, v1)
        assert [p.session_id for p in batch_b.items] == ["B"]
        await answer(v0, batch)
        verdict = await receive(drafter, DRAFTER_UPSTREAM_ACCEPTS, Verdict)
        assert (verdict.session_id, verdict.accepted, verdict.token) == ("A", 1, 7)
        # a session stays with the verifier that holds its cache, though verifier-1 is as loaded
        await drafter.send(Propose("A", 1, 5, [8]).encode())
        batch = await dispatched(broker, clock, v0)
        assert [p.session_id for p in batch.items] == ["A"]
        await answer(v0, batch)
        await receive(drafter, DRAFTER_UPSTREAM_ACCEPTS, Verdict)

        # liveness: verifier-0 keeps talking, verifier-1 (holding B's batch) falls silent
        for _ in range(5):  # however long it takes in real time, nobody is dropped while the clock stands
            await asyncio.sleep(HEARTBEAT_S)
        assert set(broker.verifiers) == {b"verifier-0", b"verifier-1"}
        await clock.advance(HEARTBEAT_S * LIVENESS * 0.6)
        await heard(broker, clock, v0, drafter)
        assert set(broker.verifiers) == {b"verifier-0", b"verifier-1"}  # nobody silent long enough yet
        await clock.advance(HEARTBEAT_S * LIVENESS * 0.6)  # 72 ms since verifier-1 spoke, 36 since verifier-0
        lost = await receive(drafter, DRAFTER_UPSTREAM_ACCEPTS, ErrorReply)
        assert (lost.session_id, lost.code, lost.retriable) == ("B", ErrorCode.VERIFIER_LOST, True)
        assert set(broker.verifiers) == {b"verifier-0"}
        # the drafter resends B with its history: the surviving verifier rebuilds it
        await drafter.send(Propose("B", 0, 3, [6], history=[1, 2, 3]).encode())
        batch = await dispatched(broker, clock, v0)
        assert [(p.session_id, p.history) for p in batch.items] == [("B", [1, 2, 3])]
        figures = broker.snapshot()
        assert figures.verifiers_lost == 1 and figures.drafters_lost == 0 and set(figures.verifiers) == {"verifier-0"}


async def test_a_silent_drafter_loses_its_sessions_and_a_talking_one_keeps_them():
    async with broker_with_peers() as (broker, clock, peers):
        v0, v1, quiet, talker = peers["verifier-0"], peers["verifier-1"], peers["drafter-a"], peers["drafter-b"]
        await quiet.send(Propose("Q", 0, 2, [], history=[1, 2]).encode())
        await answer(v0, await dispatched(broker, clock, v0))
        await talker.send(Propose("T", 0, 2, [], history=[3, 4]).encode())
        await answer(v1, await dispatched(broker, clock, v1))
        await clock.advance(HEARTBEAT_S * LIVENESS * 0.6)
        await heard(broker, clock, talker, v0, v1)
        assert broker.stats.drafters_lost == 0
        await clock.advance(HEARTBEAT_S * LIVENESS * 0.6)
        closed = await receive(v0, VERIFIER_ACCEPTS, CloseSession)
        assert closed.session_id == "Q"  # the silent drafter's session is freed on its verifier
        assert await nothing_arrives(v1, VERIFIER_ACCEPTS, CloseSession)  # and the talking one's is kept
        assert broker.stats.drafters_lost == 1
        assert set(broker.session_owner) == {"T"}
        assert {v.name: v.sessions for v in broker.verifiers.values()} == {"verifier-0": set(), "verifier-1": {"T"}}
