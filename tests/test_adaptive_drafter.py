"""The drafter service's adaptive draft length over real sockets, against a scripted broker that
rejects every draft at a dear row cost, then accepts every draft at a cheap one: the drafts
shorten, then lengthen again; with ``adaptive = false`` they stay at gamma."""

import asyncio

import pytest

from pipeline.protocol import Propose, Verdict
from tests.scripted_broker import run_drafter
from workers.drafts import NgramDrafter

PERIOD = 4
PROMPT = [i % PERIOD + 1 for i in range(12)]  # periodic: the n-gram drafter always has a continuation
REJECTING_ROUNDS = 20


VERIFY_FIXED_S = 0.02  # a verifier's round has a fixed part: with none, drafting could never save time


async def scripted_answer(msg: Propose, lengths: list[int]) -> Verdict:
    """Rounds < REJECTING_ROUNDS: nothing accepted, rows at 5 ms; after: all accepted, rows at 0.5 ms.
    Each verdict leaves after the round's fixed part and its rows' cost, like a verifier's."""
    lengths.append(len(msg.draft))
    rejecting = msg.round < REJECTING_ROUNDS
    accepted = 0 if rejecting else len(msg.draft)
    token = (msg.position + accepted) % PERIOD + 1  # the periodic text's next token
    row_cost_ms = 5.0 if rejecting else 0.5
    await asyncio.sleep(VERIFY_FIXED_S + row_cost_ms * (1 + len(msg.draft)) / 1000)
    return Verdict(msg.session_id, msg.round, accepted, token, row_cost_ms=row_cost_ms)


async def draft_lengths(adaptive: bool) -> list[int]:
    lengths: list[int] = []
    result = await run_drafter("ng", {"kind": "ngram", "gamma": 4, "adaptive": adaptive}, NgramDrafter(ngram_max=4),
                               lambda msg: scripted_answer(msg, lengths), PROMPT, 120)
    assert result.tokens == [(len(PROMPT) + i) % PERIOD + 1 for i in range(120)]
    return lengths


@pytest.mark.asyncio
async def test_drafts_shorten_under_rejection_at_a_dear_row_and_lengthen_when_rows_are_cheap():
    lengths = await draft_lengths(adaptive=True)
    assert lengths[0] == 4  # no cost known yet: today's gamma
    rejecting = lengths[REJECTING_ROUNDS - 8:REJECTING_ROUNDS]
    assert sum(rejecting) / len(rejecting) <= 1.0, lengths  # at most a probing token now and then
    assert lengths[-4] == 4, lengths  # accepted again, at cheap rows: back to the whole gamma


@pytest.mark.asyncio
async def test_a_fixed_gamma_drafter_ignores_acceptance_and_cost():
    lengths = await draft_lengths(adaptive=False)
    assert lengths[:-1] == [4] * (len(lengths) - 1)  # the last round is cut by max_new_tokens


@pytest.mark.asyncio
async def test_a_new_session_starts_from_what_the_drafters_last_session_learnt():
    """Every draft rejected at a dear row: the first session starts at gamma and learns to stop
    drafting; the next session of the same drafter starts where it ended, not at gamma again."""
    lengths: dict[str, list[int]] = {}

    async def reject_all(msg: Propose) -> Verdict:
        lengths.setdefault(msg.session_id, []).append(len(msg.draft))
        await asyncio.sleep(VERIFY_FIXED_S)
        return Verdict(msg.session_id, msg.round, 0, (msg.position % PERIOD) + 1, row_cost_ms=5.0)

    results = await run_drafter("ng", {"kind": "ngram", "gamma": 4, "adaptive": True}, NgramDrafter(ngram_max=4),
                                reject_all, PROMPT, 24, requests=2)
    assert [r.tokens for r in results] == [[(len(PROMPT) + i) % PERIOD + 1 for i in range(24)]] * 2
    first, second = lengths.values()
    assert first[0] == 4 and first[-1] == 0, first  # no reading yet: gamma; then learnt
    # starts from the first session's readings, not at gamma: those drift back towards the prior
    # while no draft is observed (speculation.RELAX) and the session clock's device and wait
    # timings take part, so how far below gamma depends on the machine's pace (1 or 2 seen)
    assert second[0] < first[0], second
    assert sum(second) < sum(first), (first, second)


@pytest.mark.asyncio
async def test_a_drafter_that_stops_drafting_hands_the_next_rounds_to_the_broker():
    """Every draft rejected at a dear row: once the policy drafts nothing, the proposal asks the
    broker for ``burst`` plain rounds (Propose.plain_after) and the drafter follows them without
    proposing; the scripted broker runs them as the broker does. With burst = 0 every round is
    the drafter's own."""
    async def reject_all(msg: Propose, seen: list[tuple[int, int]]) -> Verdict:
        seen.append((len(msg.draft), msg.plain_after))
        await asyncio.sleep(VERIFY_FIXED_S)
        return Verdict(msg.session_id, msg.round, 0, (msg.position % PERIOD) + 1, row_cost_ms=5.0)

    expected = [(len(PROMPT) + i) % PERIOD + 1 for i in range(40)]
    for burst in (3, 0):
        seen: list[tuple[int, int]] = []
        result = await run_drafter("ng", {"kind": "ngram", "gamma": 4, "adaptive": True, "burst": burst},
                                   NgramDrafter(ngram_max=4), lambda msg: reject_all(msg, seen), PROMPT, 40)
        assert result.tokens == expected and len(seen) == 40 == result.stats["rounds"]
        asked, i = [], 0  # (round, plain rounds asked) of the drafter's own proposals that asked for some
        while i < len(seen):
            if seen[i][1]:
                asked.append((i, seen[i][1]))
            i += 1 + seen[i][1]
        if burst == 0:
            assert not asked and result.stats["plain_rounds"] == 0
            continue
        assert seen[0] == (4, 0) and asked and asked[0][0] > 0, seen  # no cost known yet: a draft of gamma first
        for i, after in asked:
            assert seen[i][0] == 0 and after <= burst
            assert seen[i + 1:i + 1 + after] == [(0, after - 1 - j) for j in range(after)], seen  # the broker's rounds
        assert result.stats["plain_rounds"] == sum(after for _, after in asked) >= 20, seen
