"""A drafter that resends while its proposal is still queued (its verdict timeout ran out during a
long batch) must get one verdict, not a batch holding both copies -- the real broker process,
a hand-driven verifier and drafter on real sockets."""

import contextlib
import time

import zmq

from bench.broker_micro import BrokerProcess
from pipeline.protocol import (
    DRAFTER_UPSTREAM_ACCEPTS,
    VERIFIER_ACCEPTS,
    BatchVerdicts,
    Heartbeat,
    Propose,
    Ready,
    Verdict,
    VerifyBatch,
)
from pipeline.sockets import make_socket, new_identity

HISTORY = [5, 6, 7]


def recv(sock: zmq.Socket, accepts, timeout_s: float = 5.0):
    """The next message of an accepted kind other than a heartbeat."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "nothing arrived in time"
        if sock.poll(int(left * 1000)):
            msg = accepts.decode(sock.recv_multipart()[-1])
            if not isinstance(msg, Heartbeat):
                return msg


@contextlib.contextmanager
def hand_driven_broker(deadline_ms: float, extra: list[str] | None = None):
    """The real broker process with a verifier (registered: it said Ready) and a drafter socket,
    both driven by the test: yields (verifier, drafter)."""
    broker = BrokerProcess(deadline_ms=deadline_ms, core=None, extra=extra or [])
    ctx = zmq.Context()
    try:
        broker.start()
        verifier = make_socket(ctx, zmq.DEALER, connect=broker.backend, identity=new_identity("v"), max_message_bytes=1 << 20)
        drafter = make_socket(ctx, zmq.DEALER, connect=broker.frontend, identity=new_identity("d"), max_message_bytes=1 << 20)
        verifier.send(Ready().encode())
        time.sleep(0.5)  # registered
        yield verifier, drafter
    finally:
        ctx.destroy(0)
        broker.stop()


def test_a_resent_proposal_replaces_the_queued_copy():
    with hand_driven_broker(1.0) as (verifier, drafter):
        # the verifier gets a batch and stays busy with it (no Ready) ...
        drafter.send(Propose("busy", 0, 3, [], history=HISTORY).encode())
        first = recv(verifier, VERIFIER_ACCEPTS)
        assert isinstance(first, VerifyBatch) and [p.session_id for p in first.items] == ["busy"]
        # ... while session s1 proposes, times out and resends the same round
        drafter.send(Propose("s1", 0, 3, [9], history=HISTORY).encode())
        drafter.send(Propose("s1", 0, 3, [9], history=HISTORY).encode())
        time.sleep(0.2)
        verifier.send(BatchVerdicts(first.batch_id, [Verdict("busy", 0, 0, 1)]).encode())
        verifier.send(Ready().encode())
        second = recv(verifier, VERIFIER_ACCEPTS)
        assert [p.session_id for p in second.items] == ["s1"]  # one copy, not two
        verifier.send(BatchVerdicts(second.batch_id, [Verdict("s1", 0, 1, 4)]).encode())
        replies = [recv(drafter, DRAFTER_UPSTREAM_ACCEPTS) for _ in range(2)]
        assert sorted((r.session_id, type(r).__name__) for r in replies) == [("busy", "Verdict"), ("s1", "Verdict")]
        assert not drafter.poll(300)  # and nothing else: the replaced copy gets no reply


def test_a_wave_of_new_sessions_is_spread_over_batches_by_its_prefill():
    """Histories count against ``broker.max_batch_tokens``: eight sessions opening at once with
    60-token histories (60 target tokens each) go out four to a 256-token batch, not all eight in
    one batch that would answer none of them before every prefill is done."""
    with hand_driven_broker(20.0) as (verifier, drafter):
        for i in range(8):
            drafter.send(Propose(f"s{i}", 0, 60, [], history=list(range(1, 61))).encode())
        sizes = []
        while sum(sizes) < 8:
            batch = recv(verifier, VERIFIER_ACCEPTS)
            assert isinstance(batch, VerifyBatch)
            assert sum(p.batch_tokens for p in batch.items) <= 256
            sizes.append(len(batch.items))
            verifier.send(BatchVerdicts(batch.batch_id, [Verdict(p.session_id, 0, 0, 1) for p in batch.items]).encode())
            verifier.send(Ready().encode())
        assert sizes == [4, 4]
