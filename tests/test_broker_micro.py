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
    f = figures
    # the figures agree with each other: throughput = throughput per CPU second x CPU utilisation
    assert math.isclose(f["broker_proposals_per_s"], f["broker_proposals_per_cpu_s"] * f["broker_cpu_utilisation"],
                        rel_tol=1e-6)
    assert 0 < f["broker_cpu_utilisation"] <= 1.5  # one pinned core (+ its share of ZeroMQ's I/O thread)
    assert 1 <= f["throughput_mean_batch"] <= 16  # never more than the sessions in flight
    # one session in flight: each batch holds one proposal and leaves at its deadline, not before
    assert f["broker_queue_wait_ms"] >= 0.95 * f["deadline_ms"]
    for name in ("broker_added_latency", "zero_deadline_rtt"):
        assert 0 < f[f"{name}_p50_ms"] + f["deadline_ms"] and f[f"{name}_p50_ms"] <= f[f"{name}_p99_ms"], name
    # without a deadline the same round trip is shorter than with one
    assert f["zero_deadline_rtt_p50_ms"] < f["broker_added_latency_p50_ms"] + f["deadline_ms"]


def test_sessions_begin_again_at_the_history_limit():
    """A closed-loop session that reaches the broker's history limit is closed and begins again
    as a new session, so a long window is never refused; every proposal still gets its verdict."""
    limit = len(broker_micro.HISTORY) + 20
    figures = broker_micro.run(quick=True, latency_samples=30, sessions=8, drafters=2, warmup_s=0.2, window_s=0.4,
                               broker_settings=(f"limits.max_history_tokens={limit}",))
    assert figures["sessions_restarted"] > 0
    assert figures["proposals_sent"] == figures["verdicts_received"] == figures["broker_verdicts"]
    assert figures["broker_rejected"] == {}
