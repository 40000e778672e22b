"""The SLO-aware hold (brokers/slo.py) inside a DeadlineBatcher with a manual clock: a free
verifier's batch waits for a proposal expected soon only when that lowers the estimated cost per
token and keeps every session within its TPOT objective; and, on the real broker process with a
hand-driven verifier and drafter, every verdict carries the estimator's row cost."""

import asyncio
import time

import pytest

from brokers.batcher import BatchPolicy, DeadlineBatcher
from brokers.clock import ManualClock
from brokers.estimator import VerifyTimeEstimator
from brokers.slo import SLACK_TOKENS, SloHold
from pipeline.protocol import DRAFTER_UPSTREAM_ACCEPTS, VERIFIER_ACCEPTS, BatchVerdicts, Propose, Ready, Verdict
from tests.test_broker_supersede import HISTORY, hand_driven_broker, recv

SLO = 0.200  # seconds per output token


def trained(cost) -> VerifyTimeEstimator:
    est = VerifyTimeEstimator()
    for s in range(1, 9):
        for r in (s, 2 * s, 5 * s):
            est.observe(s, r, cost(s, r))
    return est


LINEAR = lambda s, r: 0.020 + 0.001 * s + 0.002 * r  # noqa: E731 - a fixed cost worth sharing


def past_round(hold: SloHold, session: str, *, arrived: float, answered: float, accepted: int,
               next_arrival: float | None = None, answered_again: float | None = None) -> None:
    """Give ``session`` a history: one round (arrived -> answered), optionally a second one, which
    measures its device time (answered -> next_arrival)."""
    hold.arrived(session, arrived, 5)
    hold.answered(session, answered, accepted)
    if next_arrival is not None:
        hold.arrived(session, next_arrival, 5)
        hold.answered(session, answered_again, accepted)


def make(cost=LINEAR, **policy):
    clock = ManualClock()
    hold = SloHold(SLO, trained(cost))
    batcher = DeadlineBatcher(BatchPolicy(**{"max_wait_s": 0.005, **policy}), clock, hold)
    return batcher, hold, clock


def a_arrives(batcher, hold):
    """Session a's 5-row proposal arrives at t = 0; the batch the verifier will take, pending."""
    batcher.submit("a", 5, key="a")
    hold.arrived("a", 0.0, 5)
    return asyncio.create_task(batcher.next_batch())


async def arrive(batcher, hold, clock, task, *names: str):
    """5-row proposals of ``names`` arrive now; the batch that then leaves."""
    for name in names:
        batcher.submit(name, 5, key=name)
        hold.arrived(name, clock.now(), 5)
    await clock.advance(0)
    return await asyncio.wait_for(task, 1)


async def test_holds_for_a_session_expected_soon_and_leaves_when_it_arrives():
    batcher, hold, clock = make()
    past_round(hold, "a", arrived=-0.3, answered=-0.15, accepted=2)
    # b's device answers 50 ms after its verdict; its last verdict left at -20 ms: expected at +30 ms
    past_round(hold, "b", arrived=-0.3, answered=-0.2, accepted=2, next_arrival=-0.15, answered_again=-0.02)
    task = a_arrives(batcher, hold)
    await clock.advance(0.006)  # past a's deadline: held, since b makes a cheaper batch per token
    assert not task.done()
    await clock.advance(0.014)
    assert not task.done()
    batch = await arrive(batcher, hold, clock, task, "b")  # b arrives early: the batch leaves at once with both
    assert sorted(batch.payloads) == ["a", "b"] and batch.reason == "held"
    assert batcher.holds == 1 and batcher.held_s == pytest.approx(0.014)  # from the first look past the deadline


async def test_an_expected_session_that_does_not_come_is_waited_for_until_its_time_only():
    batcher, hold, clock = make()
    past_round(hold, "a", arrived=-0.3, answered=-0.15, accepted=2)
    past_round(hold, "b", arrived=-0.3, answered=-0.2, accepted=2, next_arrival=-0.15, answered_again=-0.02)
    task = a_arrives(batcher, hold)
    await clock.advance(0.029)
    assert not task.done()
    await clock.advance(0.0011)  # b's expected arrival (+30 ms) passed without it: no second hold
    batch = await asyncio.wait_for(task, 1)
    assert batch.payloads == ["a"] and batch.reason == "held"


async def test_an_overdue_session_is_still_expected_within_its_usual_spread():
    batcher, hold, clock = make()
    past_round(hold, "a", arrived=-0.5, answered=-0.35, accepted=2)
    # b's device answered 40 ms and then 60 ms after its verdicts: it is expected ~44 ms after its
    # last one (-20 ms): at +26 ms, give or take its spread (an EWMA of 20 ms misses: 6 ms), so
    # still until +38 ms (two spreads); past that it is not waited for
    hold.arrived("b", -0.5, 5)
    hold.answered("b", -0.4, 2)
    hold.arrived("b", -0.36, 5)
    hold.answered("b", -0.3, 2)
    hold.arrived("b", -0.24, 5)
    hold.answered("b", -0.02, 2)
    pace = hold.sessions["b"]
    assert pace.device_s == pytest.approx(0.046) and pace.spread == pytest.approx(0.006)
    task = a_arrives(batcher, hold)
    await clock.advance(0.030)  # b's mean (+26 ms) has passed: it is overdue, but within its spread
    assert not task.done()
    await clock.advance(0.0081)  # two spreads too: the batch leaves without it
    batch = await asyncio.wait_for(task, 1)
    assert batch.payloads == ["a"] and batch.reason == "held"


async def test_no_hold_that_would_push_a_session_past_its_objective():
    batcher, hold, clock = make()
    # a's last verdict left at -150 ms and its rounds commit one token: its verdict is due at +50 ms;
    # sent now it is back at ~36 ms, held for b (+30 ms) at ~72 ms
    past_round(hold, "a", arrived=-0.3, answered=-0.15, accepted=0)
    past_round(hold, "b", arrived=-0.3, answered=-0.2, accepted=2, next_arrival=-0.15, answered_again=-0.02)
    task = a_arrives(batcher, hold)
    await clock.advance(0.0051)
    batch = await asyncio.wait_for(task, 1)
    assert batch.payloads == ["a"] and batch.reason == "deadline" and batcher.holds == 0


async def test_an_overloaded_convoy_is_merged_when_that_lowers_the_lateness():
    # a slow verifier (~111 ms a forward): a is already late whatever happens; b, expected at
    # +10 ms, would miss its objective (+160 ms) in a batch of its own after a's, and meets it
    # if the two share one forward
    batcher, hold, clock = make(cost=lambda s, r: 0.100 + 0.001 * s + 0.002 * r)
    past_round(hold, "a", arrived=-0.5, answered=-0.35, accepted=0)
    past_round(hold, "b", arrived=-0.3, answered=-0.2, accepted=0, next_arrival=-0.15, answered_again=-0.04)
    task = a_arrives(batcher, hold)
    await clock.advance(0.006)
    assert not task.done()
    assert sorted((await arrive(batcher, hold, clock, task, "b")).payloads) == ["a", "b"]
    # the same, but b's objective is loose enough on its own: b meets it either way and a, late
    # either way, does not veto the hold by its own wait (it is bounded by the forward the hold
    # saves, which the verifier would otherwise spend on b before a's next round)
    batcher, hold, clock = make(cost=lambda s, r: 0.100 + 0.001 * s + 0.002 * r)
    past_round(hold, "a", arrived=-0.5, answered=-0.35, accepted=0)
    past_round(hold, "b", arrived=-0.3, answered=-0.2, accepted=4, next_arrival=-0.15, answered_again=-0.04)
    task = a_arrives(batcher, hold)
    await clock.advance(0.006)
    assert not task.done()
    assert sorted((await arrive(batcher, hold, clock, task, "b")).payloads) == ["a", "b"]


async def test_a_late_session_does_not_veto_a_hold_that_keeps_everyone_elses_objective():
    # a is behind its average already (due at -150 ms); b, c and d are on time and expected at
    # +20 ms: one forward for all four instead of a's now and theirs after it
    batcher, hold, clock = make(cost=lambda s, r: 0.040 + 0.001 * s + 0.002 * r)
    past_round(hold, "a", arrived=-0.5, answered=-0.35, accepted=0)
    for name in "bcd":
        past_round(hold, name, arrived=-0.3, answered=-0.2, accepted=2, next_arrival=-0.15, answered_again=-0.03)
    task = a_arrives(batcher, hold)
    await clock.advance(0.006)
    assert not task.done()
    await clock.advance(0.014)
    batch = await arrive(batcher, hold, clock, task, "b", "c", "d")
    assert sorted(batch.payloads) == ["a", "b", "c", "d"] and batch.reason == "held"


async def test_no_hold_when_the_bigger_batch_costs_more_per_token():
    # no fixed cost to share, and b commits one token per 5-row round where a commits 3
    batcher, hold, clock = make(cost=lambda s, r: 0.001 * s + 0.010 * r)
    past_round(hold, "a", arrived=-0.3, answered=-0.15, accepted=2)
    past_round(hold, "b", arrived=-0.3, answered=-0.2, accepted=0, next_arrival=-0.15, answered_again=-0.02)
    task = a_arrives(batcher, hold)
    await clock.advance(0.0051)
    batch = await asyncio.wait_for(task, 1)
    assert batch.payloads == ["a"] and batch.reason == "deadline"


async def test_a_bigger_batch_that_costs_less_per_token_is_held_for_though_its_round_trip_does_not_shrink():
    """The same rows, round trip and sessions, but the verifier reports a GPU's compute (or a GPU
    cost table's prices, verifier.cost_table): a forward costs about the same whatever its rows, so
    b's tokens in a's forward come nearly free, and the batch waits for b."""
    batcher, hold, clock = make(cost=lambda s, r: 0.001 * s + 0.010 * r)
    for s in range(1, 9):
        for r in (s, 2 * s, 5 * s):
            hold.estimator.observe(s, r, 0.001 * s + 0.010 * r, cost=0.060 + 0.0001 * r)
    past_round(hold, "a", arrived=-0.3, answered=-0.15, accepted=2)
    past_round(hold, "b", arrived=-0.3, answered=-0.2, accepted=0, next_arrival=-0.15, answered_again=-0.02)
    task = a_arrives(batcher, hold)
    await clock.advance(0.0051)
    assert not task.done()
    await clock.advance(0.02)
    batch = await arrive(batcher, hold, clock, task, "b")
    assert sorted(batch.payloads) == ["a", "b"] and batch.reason == "held"


async def test_a_late_session_is_never_held_longer_than_the_batch_it_has_would_take():
    batcher, hold, clock = make()
    past_round(hold, "a", arrived=-0.5, answered=-0.35, accepted=0)  # due at -150 ms: late already
    # b's device takes 150 ms: expected at +130 ms, later than a's ~31 ms forward would end
    past_round(hold, "b", arrived=-0.5, answered=-0.4, accepted=2, next_arrival=-0.25, answered_again=-0.02)
    task = a_arrives(batcher, hold)
    await clock.advance(0.0051)
    batch = await asyncio.wait_for(task, 1)
    assert batch.payloads == ["a"] and batch.reason == "deadline"


async def test_past_the_batchs_own_time_a_hold_spends_only_slack():
    """The same b, but a is due at +450 ms: merged, both are done by ~172 ms, within every
    objective, so the verifier (idle meanwhile) waits the 130 ms for b and runs one forward, not two."""
    batcher, hold, clock = make()
    past_round(hold, "a", arrived=-0.3, answered=-0.15, accepted=2)
    past_round(hold, "b", arrived=-0.5, answered=-0.4, accepted=2, next_arrival=-0.25, answered_again=-0.02)
    task = a_arrives(batcher, hold)
    await clock.advance(0.12)
    assert not task.done()
    assert sorted((await arrive(batcher, hold, clock, task, "b")).payloads) == ["a", "b"]


async def test_closest_to_its_objective_goes_first():
    batcher, hold, clock = make(max_sessions=2)
    for name, answered in (("far", -0.01), ("near", -0.18), ("mid", -0.1)):
        past_round(hold, name, arrived=-0.3, answered=answered, accepted=0)
    for name in ("far", "near", "mid"):
        batcher.submit(name, 2, key=name)
        hold.arrived(name, 0.0, 2)
    batch = await asyncio.wait_for(batcher.next_batch(), 1)  # full: 2 of 3
    assert batch.payloads == ["near", "mid"] and batch.reason == "full"


async def test_without_a_trained_estimator_it_never_holds():
    clock = ManualClock()
    hold = SloHold(SLO, VerifyTimeEstimator())
    batcher = DeadlineBatcher(BatchPolicy(max_wait_s=0.005), clock, hold)
    past_round(hold, "b", arrived=-0.3, answered=-0.2, accepted=2, next_arrival=-0.15, answered_again=-0.02)
    batcher.submit("a", 5, key="a")
    task = asyncio.create_task(batcher.next_batch())
    await clock.advance(0.0051)
    assert (await asyncio.wait_for(task, 1)).reason == "deadline"


def test_the_broker_stamps_each_verdict_with_the_row_and_round_costs():
    """... and with its batch's number among the verifier's batches (Verdict.batch_seq): one
    session's rounds, each in the next batch, are numbered 1, 2, 3 ..."""
    with hand_driven_broker(0.5, ["broker.slo_tpot_ms=200.0"]) as (verifier, drafter):
        costs, seqs = [], []
        for round_ in range(10):
            draft = [9] * (round_ % 4)  # shapes vary, so rows and sessions can be told apart
            drafter.send(Propose("s", round_, 3 + round_, draft, history=HISTORY if round_ == 0 else None).encode())
            batch = recv(verifier, VERIFIER_ACCEPTS)
            time.sleep(0.01 + 0.005 * len(draft))  # the "forward": back to back, so fully busy
            verifier.send(BatchVerdicts(batch.batch_id, [Verdict("s", round_, 0, 4)]).encode())
            verifier.send(Ready().encode())
            verdict = recv(drafter, DRAFTER_UPSTREAM_ACCEPTS)
            assert isinstance(verdict, Verdict)
            costs.append((verdict.row_cost_ms, verdict.round_cost_ms))
            seqs.append(verdict.batch_seq)
        assert seqs == list(range(1, 11))
        assert costs[0] == (0.0, 0.0)  # unknown before the warm-up
        assert all(row > 0 and fixed > 0 for row, fixed in costs[6:]), costs
        # the "forward" costs 10 ms whatever its rows and 5 ms a draft row: a round's fixed part
        # is worth about two rows (the fit is young, so only roughly)
        row, fixed = costs[-1]
        assert 0.5 < fixed / row < 8, costs


def test_the_prices_follow_the_compute_the_verifier_reports_not_the_round_trip():
    """A verifier that reports its batches' compute (BatchVerdicts.cost_ms: 2 ms + 5 ms a row)
    while each round trip also waits 40 ms (a core shared with other processes, the event loop):
    the verdicts price a round's fixed part from the compute, under a row, where the round trip
    would make it worth several rows (brokers/estimator.py)."""
    with hand_driven_broker(0.5, ["broker.slo_tpot_ms=200.0"]) as (verifier, drafter):
        for round_ in range(12):
            draft = [9] * (round_ % 4)
            drafter.send(Propose("s", round_, 3 + round_, draft, history=HISTORY if round_ == 0 else None).encode())
            batch = recv(verifier, VERIFIER_ACCEPTS)
            time.sleep(0.04 + 0.002 * len(draft))
            cost_ms = 2.0 + 5.0 * (1 + len(draft))
            verifier.send(BatchVerdicts(batch.batch_id, [Verdict("s", round_, 0, 4)], cost_ms=cost_ms).encode())
            verifier.send(Ready().encode())
            verdict = recv(drafter, DRAFTER_UPSTREAM_ACCEPTS)
        row, fixed = verdict.row_cost_ms, verdict.round_cost_ms
        assert row > 0 and fixed / row < 1.5, (row, fixed)


async def test_when_everyone_is_late_either_way_the_cheaper_batch_per_token_is_held_for():
    """An overloaded verifier (~100 ms fixed per forward): six queued sessions and one expected
    20 ms later, all past their objectives whatever happens. Merged, the queued six finish 25 ms
    later (150 ms in all) and the seventh 86 ms sooner, so the summed lateness of this batch
    grows; but one forward for seven serves more tokens per verifier second than two forwards,
    and only that shrinks an overloaded verifier's backlog."""
    queued = ("a", "c", "d", "e", "f", "g")
    batcher, hold, clock = make(cost=lambda s, r: 0.100 + 0.001 * s + 0.002 * r)
    for name in queued:
        past_round(hold, name, arrived=-0.6, answered=-0.45, accepted=0)
    past_round(hold, "b", arrived=-0.6, answered=-0.45, accepted=0, next_arrival=-0.3, answered_again=-0.13)
    for name in queued:
        batcher.submit(name, 5, key=name)
        hold.arrived(name, 0.0, 5)
    task = asyncio.create_task(batcher.next_batch())
    await clock.advance(0.006)
    assert not task.done()  # b is expected at +20 ms: held for it
    assert sorted((await arrive(batcher, hold, clock, task, "b")).payloads) == sorted([*queued, "b"])


def ran(hold: SloHold, session: str, *, first: float, last: float, rounds: int, accepted: int = 0) -> None:
    """``rounds`` answered rounds from ``first`` to ``last`` (its device time measured on the way)."""
    for i in range(rounds):
        at = first + (last - first) * i / max(1, rounds - 1)
        hold.arrived(session, at - 0.05, 5)
        hold.answered(session, at, accepted)


async def test_a_session_ahead_of_its_average_spends_its_slack_on_a_hold():
    """The objective is TPOT over the request, as the bench and users measure it, not each round
    on its own: a that ran ahead (10 tokens in 0.85 s against 2 s promised) may be held for b past
    what one round alone allows (+50 ms, as in test_no_hold_that_would_push_a_session_past_its_objective)."""
    batcher, hold, clock = make()
    ran(hold, "a", first=-1.0, last=-0.15, rounds=10)
    past_round(hold, "b", arrived=-0.3, answered=-0.2, accepted=2, next_arrival=-0.15, answered_again=-0.02)
    assert hold.objective("a", 0.0) == pytest.approx(-0.15 + SLO + SLO * SLACK_TOKENS)  # slack capped
    task = a_arrives(batcher, hold)
    await clock.advance(0.0051)
    assert not task.done()  # held for b, expected at +30 ms
    assert sorted((await arrive(batcher, hold, clock, task, "b")).payloads) == ["a", "b"]


async def test_a_session_behind_its_average_is_late_already_and_goes_first():
    batcher, hold, clock = make(max_sessions=1)
    ran(hold, "behind", first=-2.0, last=-0.01, rounds=3)  # 2 tokens in 2 s: due at -1.4 s
    ran(hold, "on-time", first=-0.4, last=-0.15, rounds=2)  # due at +50 ms
    assert hold.objective("behind", 0.0) == pytest.approx(-2.0 + SLO * 3)
    for name in ("on-time", "behind"):
        batcher.submit(name, 2, key=name)
        hold.arrived(name, 0.0, 2)
    batch = await asyncio.wait_for(batcher.next_batch(), 1)
    assert batch.payloads == ["behind"]
