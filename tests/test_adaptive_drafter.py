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
    assert second[0] <= 1, second  # starts from the first session's readings
    assert sum(second) < sum(first), (first, second)
