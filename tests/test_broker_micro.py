"""The broker microbenchmark (bench/broker_micro.py): its frames are what the broker reads,
and a tiny run against real broker processes gets a verdict for every proposal. No timing limits:
this machine's speed is not under test."""

import math

from bench import broker_micro
from pipeline.protocol import (
    BROKER_BACKEND_ACCEPTS,
    BROKER_FRONTEND_ACCEPTS,
    BatchVerdicts,
    CloseSession,
    Heartbeat,
    Propose,
    Ready,
    StatsRequest,
    Verdict,
    VerifyBatch,
)


def test_frames_are_what_the_broker_and_peers_read():
    history = broker_micro.HISTORY
    first = BROKER_FRONTEND_ACCEPTS.decode(broker_micro.propose_frame("s-1", 0, len(history), history))
    assert first == Propose("s-1", 0, len(history), broker_micro.DRAFT, history=history, drafter_kind="ngram")
    later = BROKER_FRONTEND_ACCEPTS.decode(broker_micro.propose_frame("s-1", 3, 40, None))
    assert later.history is None and later.round == 3
    batch = VerifyBatch(9, [later, later])
    assert BROKER_BACKEND_ACCEPTS.decode(broker_micro.verdicts_frame(batch)) == BatchVerdicts(
        9, [Verdict("s-1", 3, 0, broker_micro.VERDICT_TOKEN)] * 2
    )
    assert BROKER_BACKEND_ACCEPTS.decode(broker_micro.READY) == Ready()
    assert BROKER_BACKEND_ACCEPTS.decode(broker_micro.IDLE_HEARTBEAT) == Heartbeat(idle=True)
    assert BROKER_FRONTEND_ACCEPTS.decode(broker_micro.HEARTBEAT) == Heartbeat()
    assert BROKER_FRONTEND_ACCEPTS.decode(broker_micro.STATS_REQUEST) == StatsRequest()
    assert BROKER_FRONTEND_ACCEPTS.decode(broker_micro.close_frame("s-1")) == CloseSession("s-1")


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
