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
