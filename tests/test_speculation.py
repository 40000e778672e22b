"""The adaptive draft-length policy (workers/speculation.py) as a pure object: the draft length
follows acceptance and the server's row cost, and an unknown cost keeps today's fixed gamma."""

import pytest

from workers.speculation import (
    MAX_MISSED,
    PRIOR_ALPHA,
    ROUND_COST_ROWS,
    RowCostFloor,
    TIME_SLACK,
    Absence,
    SpeculationPolicy,
    best_length,
    expected_tokens,
    longest_within,
    per_token,
)


def test_expected_tokens_counts_the_target_token_and_each_reachable_draft():
    assert expected_tokens([0.5, 0.5, 0.5], 0) == 1.0
    assert expected_tokens([0.5, 0.5, 0.5], 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens([1.0, 0.0, 1.0], 3) == 2.0  # nothing past a certain rejection


def test_unknown_row_cost_keeps_the_fixed_gamma():
    policy = SpeculationPolicy(gamma=4)
    assert policy.choose() == 4
    for _ in range(20):
        policy.observe(4, 0)  # every draft rejected, but the server never said what a row costs
    assert policy.choose() == 4
    assert policy.choose(cap=2) == 2


def test_high_acceptance_and_cheap_rows_draft_the_whole_gamma():
    assert best_length([0.9] * 6, 6, row_cost=1.0, fixed=ROUND_COST_ROWS) == 6
    policy = SpeculationPolicy(gamma=5)
    for _ in range(30):
        policy.observe(5, 5, row_cost_ms=2.0)
    assert policy.choose() == 5


def test_low_acceptance_and_dear_rows_draft_little_or_nothing():
    assert best_length([0.1] * 4, 4, row_cost=10.0, fixed=8.0) == 0
    policy = SpeculationPolicy(gamma=4)
    policy.observe(4, 4, row_cost_ms=1.0, now=0.0)  # the idle verifier: floor 1 ms
    for _ in range(30):
        policy.observe(4, 0, row_cost_ms=5.0, now=1.0)  # loaded, and the first draft token always wrong
    assert policy.choose() <= 1
    assert policy.alphas[0] < 0.05
    assert policy.alphas[1] == pytest.approx(PRIOR_ALPHA, abs=0.05)  # never tested again: no evidence against it


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.7, 0.9])
def test_the_draft_never_lengthens_as_rows_get_dearer(alpha):
    lengths = [best_length([alpha] * 8, 8, row_cost=cost, fixed=8.0) for cost in (0.1, 0.5, 1, 2, 4, 8, 16, 64)]
    assert lengths == sorted(lengths, reverse=True)
    assert lengths[0] > lengths[-1]  # and the cost really moves it


def test_the_draft_never_shortens_as_acceptance_rises():
    lengths = [best_length([a] * 6, 6, row_cost=2.0, fixed=8.0) for a in (0.05, 0.2, 0.4, 0.6, 0.8, 0.95)]
    assert lengths == sorted(lengths)
    assert lengths[0] == 0 and lengths[-1] == 6


def test_load_shortens_and_idle_lengthens_a_session_drafts():
    """The same acceptance: the verifier's row cost rising from its idle floor shortens drafts."""
    floor = RowCostFloor()
    policy = SpeculationPolicy(gamma=6, floor=floor, alphas=[0.7] * 6)
    policy.observe(0, 0, row_cost_ms=1.0, now=0.0)  # idle verifier (an empty draft: no acceptance news)
    idle = policy.choose()
    policy.observe(0, 0, row_cost_ms=6.0, now=1.0)  # loaded: rows six times dearer
    loaded = policy.choose()
    assert loaded < idle
    assert SpeculationPolicy(gamma=6, floor=floor).choose() == 6  # a new session: cost unknown yet
    policy.observe(0, 0, row_cost_ms=1.0, now=2.0)
    assert policy.choose() == idle


def test_positions_past_the_first_rejection_are_not_observed_and_relax_to_the_prior():
    policy = SpeculationPolicy(gamma=3)
    policy.alphas = [0.8, 0.1, 0.8]
    policy.observe(3, 0)  # position 0 rejected: positions 1 and 2 were never compared
    assert policy.alphas[0] < 0.8
    assert 0.1 < policy.alphas[1] < PRIOR_ALPHA  # drifts back up: a short-drafting session probes again
    for _ in range(400):
        policy.observe(0, 0)
    assert policy.alphas[1] == pytest.approx(PRIOR_ALPHA, abs=0.02)


def test_the_floor_is_the_cheapest_row_and_rises_slowly():
    floor = RowCostFloor()
    floor.observe(2.0, now=0.0)
    floor.observe(1.0, now=1.0)
    assert floor.value == 1.0
    floor.observe(5.0, now=2.0)  # one second later: up 1 %, not to 5
    assert floor.value == pytest.approx(1.01)
    floor.observe(5.0, now=1000.0)  # long after: it has caught up with the newer readings
    assert floor.value == 5.0
    floor.observe(0.0, now=1001.0)  # unknown: ignored
    assert floor.value == 5.0


def _measured(policy: SpeculationPolicy, draft_ms: float, wait_ms: float, rounds: int = 30) -> None:
    """Rounds of 2-token drafts whose device time and verdict wait are as given (row cost 1 ms)."""
    for _ in range(rounds):
        policy.observe(2, 1, row_cost_ms=1.0)
        policy.observe_draft(2, 2 * draft_ms / 1000)
        policy.observe_wait(2, (wait_ms + 3 * 1.0) / 1000)


def test_a_slow_device_drafts_less_than_the_server_alone_would_allow():
    """α 0.4 on a cheap verifier: the server's rule drafts, but at 100 ms per draft token the
    session commits a token sooner by not drafting (80 ms per round without a draft)."""
    server_only = SpeculationPolicy(gamma=4, alphas=[0.4] * 4)
    server_only.observe(0, 0, row_cost_ms=1.0)
    assert server_only.choose() > 0
    slow = SpeculationPolicy(gamma=4, alphas=[0.4] * 4)
    _measured(slow, draft_ms=100.0, wait_ms=80.0)
    slow.alphas = [0.4] * 4
    assert slow.wait_ms == pytest.approx(80.0)
    assert slow.draft_ms == pytest.approx(100.0)
    assert slow.choose() == 0


def test_a_fast_device_keeps_the_server_choice():
    fast = SpeculationPolicy(gamma=4, alphas=[0.6] * 4)
    _measured(fast, draft_ms=2.0, wait_ms=80.0)
    fast.alphas = [0.6] * 4
    server = best_length([0.6] * 4, 4, row_cost=1.0, fixed=fast.fixed_cost)
    assert server > 0
    assert fast.choose() == server


def test_a_high_acceptance_drafter_keeps_the_servers_choice_where_its_clock_barely_cares():
    """The Qwen pair's shape (session 18): α 0.9, ~190 ms per draft token, ~300 ms of wait. On the
    session's clock 2, 3 and 4 tokens are within a few percent of each other, while the server's
    cost per token falls all the way to γ: the draft stays γ, not the clock's exact minimum."""
    alphas, draft_ms, wait_ms, row_ms = [0.9] * 4, 190.0, 300.0, 1.0
    times = [per_token(alphas, k, row_ms, wait_ms, draft_ms) for k in range(5)]
    assert min(times) < times[4] <= min(times) * (1 + TIME_SLACK)  # the clock's best is shorter, but barely
    policy = SpeculationPolicy(gamma=4, alphas=list(alphas))
    _measured(policy, draft_ms=draft_ms, wait_ms=wait_ms)
    policy.alphas = list(alphas)
    assert best_length(alphas, 4, row_ms, policy.fixed_cost) == 4
    assert policy.choose() == 4


def test_longest_within_takes_the_longest_draft_near_the_best():
    costs_of = [0.9] * 4  # flat-ish: every k within a few percent on this clock
    assert longest_within(costs_of, 4, 20.0, 300.0, 190.0, slack=0.0) == best_length(costs_of, 4, 20.0, 300.0, 190.0)
    assert longest_within(costs_of, 4, 20.0, 300.0, 190.0, slack=0.1) == 4
    assert longest_within([0.2] * 4, 4, 1.0, 80.0, 100.0, slack=0.1) == 0  # steep: drafting costs far more
    assert longest_within([0.2] * 4, 3, 0.0, 80.0, 100.0, slack=0.1) == 3  # row cost unknown: gamma


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.7, 0.9])
def test_the_draft_never_lengthens_as_the_device_gets_slower(alpha):
    lengths = []
    for draft_ms in (0.5, 5, 20, 50, 100, 400):
        policy = SpeculationPolicy(gamma=6, alphas=[alpha] * 6)
        _measured(policy, draft_ms=draft_ms, wait_ms=60.0)
        policy.alphas = [alpha] * 6
        lengths.append(policy.choose())
    assert lengths == sorted(lengths, reverse=True)
    assert lengths[-1] < lengths[0] or lengths[0] == 0


def test_the_time_rule_waits_for_both_readings():
    policy = SpeculationPolicy(gamma=4, alphas=[0.4] * 4)
    policy.observe(2, 1, row_cost_ms=1.0)
    policy.alphas = [0.4] * 4
    before = policy.choose()
    policy.observe_draft(2, 0.4)  # 200 ms per token, but no wait measured yet
    assert policy.choose() == before
    policy.observe_wait(2, 0.083)
    assert policy.choose() < before


def test_a_session_that_stopped_drafting_on_its_device_time_probes_again():
    policy = SpeculationPolicy(gamma=4, alphas=[0.5] * 4)
    _measured(policy, draft_ms=100.0, wait_ms=80.0)
    policy.alphas = [0.5] * 4
    assert policy.choose() == 0
    rounds = 0
    while policy.choose() == 0 and rounds < 1000:
        policy.observe(0, 0, row_cost_ms=1.0)  # no draft: no new reading of the device
        rounds += 1
    assert 10 < rounds < 1000  # not at once, and not never


def test_the_brokers_round_cost_prices_a_round_when_it_sends_one():
    """The same weak drafts (α 0.3): on a CPU-like server, where a round's fixed part is worth 2
    rows, drafting does not pay; on a GPU-like one, where it is worth 200, the whole γ does.
    Without a round cost the floor rule stays."""
    cpu = SpeculationPolicy(gamma=4, alphas=[0.3] * 4)
    cpu.observe(0, 0, row_cost_ms=4.0, now=0.0, round_cost_ms=8.0)
    assert cpu.fixed_cost == 8.0 and cpu.choose() == 0
    gpu = SpeculationPolicy(gamma=4, alphas=[0.3] * 4)
    gpu.observe(0, 0, row_cost_ms=0.05, now=0.0, round_cost_ms=10.0)
    assert gpu.choose() == 4
    older = SpeculationPolicy(gamma=4, alphas=[0.3] * 4)
    older.observe(0, 0, row_cost_ms=4.0, now=0.0)  # a broker that sends no round cost
    assert older.fixed_cost == ROUND_COST_ROWS * 4.0


def test_a_fork_starts_from_the_readings_and_learns_on_its_own():
    floor = RowCostFloor()
    done = SpeculationPolicy(4, floor=floor, tree_rows=8)
    for _ in range(10):
        done.observe(4, 0, row_cost_ms=3.0, round_cost_ms=6.0, tree=False)
    done.observe(8, 1, row_cost_ms=3.0, round_cost_ms=6.0, tree=True)
    new = done.fork()
    assert (new.alphas, new.tree_tokens, new.row_cost, new.round_cost) == (done.alphas, done.tree_tokens, 3.0, 6.0)
    assert new.choose() == done.choose() < 4  # not gamma, as a session with no readings would draft
    new.observe(4, 4, row_cost_ms=3.0, round_cost_ms=6.0)
    assert new.alphas != done.alphas and new.floor is done.floor  # its own estimates; the drafter's floor


def test_a_draft_its_drafter_did_not_make_counts_as_a_miss_at_that_position():
    """A drafter that stops where it is unconfident (min_confidence) returns an empty draft on
    most rounds: each is a round trip for the target's one token. The policy that asked for it
    learns the position as a miss, so under load it stops asking (the server decodes the session
    in bursts); the positions after it stay untested."""
    def loaded(empty: bool) -> SpeculationPolicy:
        policy = SpeculationPolicy(gamma=4)
        for _ in range(30):
            # the policy asked for 4; the drafter had no confident first token: nothing was proposed
            if empty:
                policy.observe(0, 0, row_cost_ms=3.0, round_cost_ms=4.0, wanted=4)
            else:
                policy.observe(0, 0, row_cost_ms=3.0, round_cost_ms=4.0)  # a plain round it chose
        return policy

    unconfident, untested = loaded(True), loaded(False)
    assert unconfident.alphas[0] < 0.05 and unconfident.choose() == 0
    assert untested.alphas[0] == pytest.approx(PRIOR_ALPHA) and untested.choose() > 0
    assert unconfident.alphas[1] == pytest.approx(PRIOR_ALPHA)
    # a chain cut short after two accepted tokens: position 2 is the miss, 3 untested
    policy = SpeculationPolicy(gamma=4)
    policy.observe(2, 2, row_cost_ms=3.0, wanted=4)
    assert policy.alphas[:2] == [pytest.approx(PRIOR_ALPHA + 0.25 * (1 - PRIOR_ALPHA))] * 2
    assert policy.alphas[2] == pytest.approx(0.75 * PRIOR_ALPHA) and policy.alphas[3] == PRIOR_ALPHA
    # a rejection before the stop says nothing about the stop's position
    policy = SpeculationPolicy(gamma=4)
    policy.observe(2, 0, row_cost_ms=3.0, wanted=4)
    assert policy.alphas[1:] == [PRIOR_ALPHA] * 3


def test_the_batches_a_draft_sits_out_are_counted_per_length_and_scaled_where_unseen():
    absence = Absence(4)
    assert [absence.of(k) for k in range(5)] == [0.0] * 5  # nothing seen: no price
    absence.observe(2, 2)
    assert [absence.of(k) for k in range(5)] == [0.0, 1.0, 2.0, 3.0, 4.0]  # per draft token from k = 2
    absence.observe(4, 1)  # a draft made ahead of its verdict sat out little
    assert absence.of(4) == 1.0 and absence.of(3) == pytest.approx(0.99 * 2.0 * 3 / 2)
    for _ in range(200):
        absence.observe(0, None)  # bursts: nothing drafted, every reading drifts towards none
    assert 0 < absence.of(4) < 0.2
    absence.observe(1, 99)
    assert absence.of(1) == MAX_MISSED  # a count no draft can explain is capped


def test_a_draft_that_keeps_the_session_out_of_the_batches_pays_their_fixed_shares():
    """α 0.5, rows cheap against a round's fixed share: the server's rule drafts. A slow device
    whose draft sits out a batch per token pays a fixed share for each and drafts nothing; a lone
    session (no batch leaves while it drafts) drafts as if there were no such price."""
    def policy(missed_per_token: float | None) -> SpeculationPolicy:
        p = SpeculationPolicy(gamma=4, alphas=[0.5] * 4)
        p.observe(0, 0, row_cost_ms=1.0, round_cost_ms=8.0)
        p.alphas = [0.5] * 4
        if missed_per_token is not None:
            p.absence.observe(2, round(2 * missed_per_token))
        return p

    unpriced = policy(None)
    assert unpriced.choose() > 0
    assert policy(0.0).choose() == unpriced.choose()
    slow = policy(1.0)
    assert slow.choose() == 0
    fork = slow.fork()
    assert fork.absence.missed == slow.absence.missed and fork.absence is not slow.absence
