"""Plain rounds the broker runs on its own (Propose.plain_after; drafters.<class>.burst): when a
drafter's policy drafts nothing, its session stays in the verifier's batches for ``burst`` more
tokens, as under centralized decoding, and the device proposes again after them. Through real
sockets between separate processes: greedy output is token-identical to the target alone,
sampled output keeps the target's distribution, a stop token or the request's end cuts a burst
short, a verifier lost mid-burst changes nothing, and the figures count the rounds.

``gamma = 0`` makes the adaptive policy draft nothing every round, so every proposal asks for
its burst: the mechanism is tested on its own here; when a real policy reaches a draft of 0 is
tests/test_adaptive_drafter.py's business."""

import asyncio
import random

import pytest
import pytest_asyncio

from pipeline.client import DrafterClient, broker_stats
from pipeline.models import load_causal_lm
from pipeline.reference import greedy_reference
from tests.conftest import TINY_VOCAB, make_stack
from tests.test_faults import FAST_LIVENESS
from tests.test_proactive import PROMPT, assert_target_pair_distribution, vocab8_models  # noqa: F401 - a fixture

pytestmark = pytest.mark.asyncio(loop_scope="module")

BURST = 5
PLAIN = {"kind": "ngram", "gamma": 0, "burst": BURST}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory, tiny_models):
    s = make_stack(tmp_path_factory.mktemp("bursts"), tiny_models["target"],
                   {"plain": PLAIN, "none": {**PLAIN, "burst": 0}, "ahead": {**PLAIN, "proactive": True}},
                   broker__max_wait_ms=5.0)
    async with s:
        yield s


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(TINY_VOCAB) for _ in range(rng.randint(2, 16))] for _ in range(n)]


async def test_a_bursting_session_is_token_identical_to_the_target_alone(stack, tiny_models):
    batch = prompts(6, 5)
    plain, none = (DrafterClient(stack.config.drafter(n).client) for n in ("plain", "none"))
    try:
        before = await broker_stats(stack.config.broker.frontend)
        results = await asyncio.gather(*[plain.complete(p, 30, stop_ids=[], timeout=60) for p in batch])
        after = await broker_stats(stack.config.broker.frontend)
        unbursted = await none.complete(batch[0], 30, stop_ids=[], timeout=60)
    finally:
        plain.close()
        none.close()
    target = load_causal_lm(str(tiny_models["target"]))
    assert [r.tokens for r in results] == [greedy_reference(target, p, 30) for p in batch]
    for r in results:
        # one token a round; the drafter proposes at rounds 0, 6, 12, 18 and 24, each followed by 5 plain rounds
        assert r.stats["rounds"] == 30 and r.stats["plain_rounds"] == 25 and r.stats["proposed"] == 0
    assert after["plain_rounds"] - before["plain_rounds"] == 6 * 25
    assert after["proposals"] - before["proposals"] == 6 * 30  # the broker's own rounds count as proposals
    assert unbursted.tokens == results[0].tokens and unbursted.stats["plain_rounds"] == 0  # burst = 0: every round proposed


async def test_a_device_that_drafts_ahead_but_would_draft_nothing_bursts_from_its_first_round(stack, tiny_models):
    """A proactive device's greedy first round goes without a draft, so that the prompt's prefill
    hides the drafting of the next round; a session its policy would not draft for has nothing to
    hide, and its first round asks for the burst itself, as a device that does not draft ahead
    does: it is never out of the batches for a link round trip after its prefill."""
    prompt = prompts(1, 7)[0]
    client = DrafterClient(stack.config.drafter("ahead").client)
    try:
        result = await client.complete(prompt, 30, stop_ids=[], timeout=60)
    finally:
        client.close()
    assert result.tokens == greedy_reference(load_causal_lm(str(tiny_models["target"])), prompt, 30)
    # rounds 0, 6, 12, 18 and 24 asked for 5 plain rounds each; the last four were sent ahead
    assert result.stats["plain_rounds"] == 25 and result.stats["sent_ahead_confirmed"] == 4


async def test_a_stop_token_or_the_requests_end_cuts_a_burst_short(stack, tiny_models):
    target = load_causal_lm(str(tiny_models["target"]))
    for prompt in prompts(20, 9):  # a token that first occurs in the second burst's plain rounds (7..11)
        reference = greedy_reference(target, prompt, 30)
        stop = next((t for t in reference[7:12] if t not in reference[:7]), None)
        if stop is not None:
            break
    cut = reference.index(stop) + 1
    client = DrafterClient(stack.config.drafter("plain").client)
    try:
        stopped = await client.complete(prompt, 30, stop_ids=[stop], timeout=60)
        short = await client.complete(prompt, 9, stop_ids=[], timeout=60)  # 9 = 1 + 5 + 1 + 2: a burst cut by the budget
        again = await client.complete(prompt, 30, stop_ids=[], timeout=60)  # the session after a cut burst is clean
    finally:
        client.close()
    assert stopped.tokens == reference[:cut] and stopped.finish_reason == "stop"
    assert short.tokens == reference[:9] and short.stats["rounds"] == 9 and short.stats["plain_rounds"] == 7
    assert again.tokens == reference


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vocab8_stack(tmp_path_factory, vocab8_models):  # noqa: F811 - the fixture imported above
    drafters = {"plain": {**PLAIN, "burst": 3, "max_sessions": 128}}
    s = make_stack(tmp_path_factory.mktemp("bursts-vocab8"), vocab8_models["target"], drafters, broker__max_wait_ms=5.0)
    async with s:
        yield s


@pytest.mark.timeout(900)
async def test_bursts_keep_the_target_distribution(vocab8_stack, vocab8_models):  # noqa: F811
    """Four sampled tokens per session: the first from the drafter's proposal, the other three
    from the broker's plain rounds. The joint distribution of tokens 3 and 4 must be the
    target's (chi-square against the exact one, from the logits)."""
    sessions, temperature, top_p = 2400, 1.0, 0.9
    client = DrafterClient(vocab8_stack.config.drafter("plain").client)
    try:
        results = []
        for start in range(0, sessions, 100):
            results += await asyncio.gather(*[
                client.complete(PROMPT, 4, temperature=temperature, top_p=top_p, seed=seed, timeout=120)
                for seed in range(start, start + 100)
            ])
    finally:
        client.close()
    assert all(r.stats["plain_rounds"] == 3 for r in results)
    assert_target_pair_distribution(results, vocab8_models["target"], temperature, top_p)


async def test_a_verifier_lost_mid_burst_changes_no_token(tmp_path, tiny_models):
    """The broker fails the lost verifier's queued and in-flight plain rounds; the drafter then
    proposes that round itself with its history, on the verifier left (workers/drafter.py _followed)."""
    batch = prompts(8, 3)
    s = make_stack(tmp_path, tiny_models["target"], {"plain": {**PLAIN, "burst": 40}}, verifiers=2, **FAST_LIVENESS)
    async with s:
        client = DrafterClient(s.config.drafter("plain").client)
        try:
            run = asyncio.gather(*[client.complete(p, 80, stop_ids=[], timeout=60) for p in batch])
            await asyncio.sleep(1.0)
            assert not run.done(), "generation finished before the fault; slow it down"
            await s.kill("verifier-1")
            results = await asyncio.wait_for(run, 60)
            figures = await broker_stats(s.config.broker.frontend)
        finally:
            client.close()
    target = load_causal_lm(str(tiny_models["target"]))
    assert [r.tokens for r in results] == [greedy_reference(target, p, 80) for p in batch]
    assert figures["verifiers_lost"] == 1 and figures["verifiers"]["verifier-0"]["prefills"] >= 1
    assert figures["rejected"]["verifier_lost"] >= 1  # rounds failed with the verifier, and proposed again
    assert sum(r.stats["plain_rounds"] for r in results) > 0
