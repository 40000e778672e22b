"""The broker microbenchmark (bench/broker_micro.py): its hand-built frames are the protocol's own,
and a tiny run against real broker processes gets a verdict for every proposal. No timing limits:
this machine's speed is not under test."""

import math

import msgpack

from bench import broker_micro
from pipeline.protocol import (
    BROKER_FRONTEND_ACCEPTS,
    BatchVerdicts,
    CloseSession,
    Heartbeat,
    Propose,
    Ready,
    StatsRequest,
    Verdict,
    decode,
)


def test_frames_are_the_protocols_encoding():
    history = broker_micro.HISTORY
    assert broker_micro.propose_frame("s-1", 0, len(history), history) == Propose(
        "s-1", 0, len(history), broker_micro.DRAFT, [], [], history, 0.0, 1.0, 0, "ngram"
    ).encode()
    later = broker_micro.propose_frame("s-1", 3, 40, None)
    assert later == Propose("s-1", 3, 40, broker_micro.DRAFT, drafter_kind="ngram").encode()
    assert decode(later, BROKER_FRONTEND_ACCEPTS).history is None
    items = msgpack.unpackb(later)[2:]
    assert broker_micro.verdicts_frame(9, [items, items]) == BatchVerdicts(
        9, [Verdict("s-1", 3, 0, broker_micro.VERDICT_TOKEN)] * 2
    ).encode()
    assert broker_micro.READY == Ready().encode()
    assert broker_micro.IDLE_HEARTBEAT == Heartbeat(idle=True).encode()
    assert broker_micro.HEARTBEAT == Heartbeat().encode()
    assert broker_micro.STATS_REQUEST == StatsRequest().encode()
    assert broker_micro.close_frame("s-1") == CloseSession("s-1").encode()


def test_a_tiny_run_gets_every_verdict():
    figures = broker_micro.run(quick=True, latency_samples=60, sessions=16, drafters=2, warmup_s=0.2, window_s=0.6)
    assert figures["proposals_sent"] == figures["verdicts_received"] > 0
    assert figures["broker_proposals"] == figures["broker_verdicts"] == figures["proposals_sent"]
    assert figures["broker_rejected"] == {}
    assert figures["latency_samples"] == 60
    for key in ("broker_proposals_per_s", "broker_proposals_per_cpu_s", "broker_cpu_utilisation",
                "zero_deadline_rtt_p50_ms", "zero_deadline_rtt_p99_ms", "deadline_ms"):
        assert math.isfinite(figures[key]) and figures[key] > 0, key
    for key in ("broker_added_latency_p50_ms", "broker_added_latency_p99_ms"):
        # round trip minus the deadline: finite, and the round trip itself is positive
        assert math.isfinite(figures[key]) and figures[key] + figures["deadline_ms"] > 0, key
