"""Proactive drafting (drafters.<class>.proactive) through real sockets between separate
processes: a drafter that keeps drafting while its proposal is out stays lossless, greedy
(token-identical to the target alone) and sampled (the same tokens as without proactive
drafting for the same seed, and the target's exact distribution), and its drafts made ahead
are really used; a greedy session's first proposal leaves without a draft. The per-request
figures (drafted, accepted, rounds, mean_gamma, proactive hits) ride on the final Tokens
message."""

import asyncio
import random

import pytest
import pytest_asyncio
import torch
from scipy.stats import chisquare

from pipeline.client import DrafterClient
from pipeline.models import load_causal_lm
from pipeline.reference import greedy_reference
from tests.conftest import TINY_VOCAB, make_stack
from tests.test_target import _tiny_vocab_llama, reference_top_p
from workers.feature_head import build_head, save_head, spec_for

pytestmark = pytest.mark.asyncio(loop_scope="module")

DRAFTERS = {
    # the target's copy: every guess right. Fixed gamma: an adaptive twin drafts only when its
    # device time per token is below its wait for a verdict, which on two shared cores against a
    # tiny target's millisecond verify is a matter of timing, and a round without a draft has no guess
    "twin": {"kind": "model", "gamma": 3, "proactive": True, "adaptive": False},
    "small": {"kind": "model", "gamma": 3, "proactive": True},
    "ngram": {"kind": "ngram", "gamma": 3, "proactive": True},
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory, tiny_models):
    drafters = {name: dict(cfg) for name, cfg in DRAFTERS.items()}
    drafters["twin"]["model"] = str(tiny_models["copy"])
    drafters["small"]["model"] = str(tiny_models["small"])
    s = make_stack(tmp_path_factory.mktemp("proactive"), tiny_models["target"], drafters, broker__max_wait_ms=5.0)
    async with s:
        yield s


def clients_for(stack, names):
    return {n: DrafterClient(stack.config.drafter(n).client) for n in names}


async def test_proactive_greedy_is_token_identical_to_the_target_alone(stack, tiny_models):
    rng = random.Random(3)
    prompts = [[rng.randrange(TINY_VOCAB) for _ in range(rng.randint(1, 20))] for _ in range(9)]
    prompts += [[5, 6, 7, 8] * 4, [1, 2, 1, 2, 1, 2]]  # repetitive: the n-gram drafter has something to draft
    names = ["twin", "small", "ngram"]
    clients = clients_for(stack, names)
    try:
        results = await asyncio.gather(*[
            clients[names[i % len(names)]].complete(p, 30, stop_ids=[], timeout=120) for i, p in enumerate(prompts)
        ] + [clients["ngram"].complete(p, 30, stop_ids=[], timeout=120) for p in prompts[-2:]])
        figures = {n: await c.stats() for n, c in clients.items()}
    finally:
        for c in clients.values():
            c.close()
    target = load_causal_lm(str(tiny_models["target"]))
    expected = [greedy_reference(target, p, 30) for p in prompts + prompts[-2:]]
    assert [r.tokens for r in results] == expected
    # the twin's guesses are the target's own tokens: nearly every round after the first left at once
    assert figures["twin"]["proactive_hits"] >= figures["twin"]["rounds"] // 2
    assert figures["small"]["proactive_hits"] + figures["small"]["proactive_misses"] > 0
    assert figures["small"]["proactive_wasted"] > 0  # a random small model guesses wrong: counted
    twin = [r for i, r in enumerate(results[:len(prompts)]) if i % 3 == 0]
    for r in twin:  # the per-request figures
        s = r.stats
        assert s["drafted"] == s["proposed"] > 0 and s["accepted"] == s["drafted"]
        assert s["rounds"] >= 1 and 0 < s["mean_gamma"] <= 3
        assert s["proactive_hits"] >= 1
        # greedy: the first proposal leaves without a draft (the device drafts the next round
        # while the server prefills), and the last has a budget of one token: 1 + 7 x 4 + 1 = 30
        assert s["draft_lengths"][0] == 2 and s["rounds"] == 9 and s["proposed"] == 21


VOCAB = 8
PROMPT = [1, 2, 3, 1, 2]


@pytest.fixture(scope="module")
def vocab8_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab8")
    paths = {}
    for name, seed in (("target", 11), ("drafter", 12)):
        paths[name] = root / name
        _tiny_vocab_llama(VOCAB, seed).save_pretrained(paths[name])
    torch.manual_seed(13)
    target = load_causal_lm(str(paths["target"]))
    paths["head"] = root / "head"
    save_head(build_head(target, spec_for(target), torch.arange(VOCAB)), paths["head"], {"target": str(paths["target"])})
    return paths


def exact_pair_distribution(target, temperature: float, top_p: float) -> torch.Tensor:
    """P(tokens 3 and 4 of the continuation), summed over tokens 1 and 2, from the target's logits."""
    with torch.inference_mode():
        seqs = torch.tensor([PROMPT + [a, b, c] for a in range(VOCAB) for b in range(VOCAB) for c in range(VOCAB)])
        logits = target(seqs).logits  # [512, len, vocab]; position i predicts token i + 1
    n = len(PROMPT)
    dist = lambda row: torch.tensor(reference_top_p(row.tolist(), temperature, top_p))  # noqa: E731
    out = torch.zeros(VOCAB, VOCAB)
    for i, (a, b, c) in enumerate((a, b, c) for a in range(VOCAB) for b in range(VOCAB) for c in range(VOCAB)):
        if c == 0:  # one (a, b): p(a) p(b | a) p(c | a b) for every c at once
            p_a = dist(logits[i, n - 1])[a]
            p_b = dist(logits[i, n])[b]
            p_c = dist(logits[i, n + 1])
        p_d = dist(logits[i, n + 2])
        out[c] += p_a * p_b * p_c[c] * p_d
    return out.flatten()


def assert_target_pair_distribution(results, target_dir, temperature: float, top_p: float) -> None:
    """Tokens 3 and 4 of the sessions' outputs follow the target's joint distribution (chi-square
    against the exact one, from the logits), and never a pair it cannot produce."""
    counts = torch.zeros(VOCAB * VOCAB)
    for r in results:
        counts[r.tokens[2] * VOCAB + r.tokens[3]] += 1
    joint = exact_pair_distribution(load_causal_lm(str(target_dir)), temperature, top_p)
    keep = joint > 0
    assert counts[~keep].sum() == 0
    assert chisquare(counts[keep].numpy(), (joint[keep] * counts.sum()).numpy()).pvalue > 1e-3


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vocab8_stack(tmp_path_factory, vocab8_models):
    """Two classes of the same small drafter over an 8-token vocabulary (sharp logits, so guesses
    are often right): one drafting ahead, one drafting after each verdict."""
    # fixed γ: with adaptive lengths (timing-based) the two classes' drafts, hence outputs, could differ
    common = {"kind": "model", "model": str(vocab8_models["drafter"]), "gamma": 1, "top_k": 4, "max_sessions": 128,
              "adaptive": False}
    drafters = {"ahead": {**common, "proactive": True}, "after": {**common, "proactive": False},
                # a random feature head over the target: its drafts made ahead chain on predicted features
                "feature-ahead": {**common, "kind": "feature", "model": str(vocab8_models["head"]), "proactive": True}}
    s = make_stack(tmp_path_factory.mktemp("vocab8-stack"), vocab8_models["target"], drafters, broker__max_wait_ms=5.0)
    async with s:
        yield s


async def test_proactive_sampling_draws_the_same_tokens_as_drafting_after_each_verdict(vocab8_stack):
    """Each round's draft is drawn from a stream of (seed, position): a draft made ahead of its
    verdict is the very draft the round would have made after it, so the output is the same."""
    clients = clients_for(vocab8_stack, ["ahead", "after"])
    try:
        runs = {}
        for name, client in clients.items():
            runs[name] = await asyncio.gather(*[
                client.complete(PROMPT, 24, temperature=0.9, top_p=0.95, seed=seed, timeout=120) for seed in range(12)
            ])
        figures = await clients["ahead"].stats()
    finally:
        for c in clients.values():
            c.close()
    assert [r.tokens for r in runs["ahead"]] == [r.tokens for r in runs["after"]]
    assert len({tuple(r.tokens) for r in runs["ahead"]}) > 6  # really sampled
    assert figures["proactive_hits"] > 0 and figures["proactive_misses"] > 0  # both paths taken


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name, sessions, new_tokens", [("ahead", 2400, 4), ("feature-ahead", 3000, 5)])
async def test_proactive_sampling_keeps_the_target_distribution(vocab8_stack, vocab8_models, name, sessions, new_tokens):
    """Four sampled tokens per session: round 1 drafts token 1 and guesses token 2; on a hit the
    round for tokens 3 and 4 leaves with its draft made ahead. The joint distribution of tokens
    3 and 4 must be the target's (chi-square against the exact one, from the logits). The feature
    class drafts nothing in its first round (no features yet): its second drafts token 2 and
    guesses token 3, and on a hit the round for tokens 4 and 5 leaves with its draft made ahead."""
    temperature, top_p = 1.0, 0.9
    client = DrafterClient(vocab8_stack.config.drafter(name).client)
    try:
        before = await client.stats()
        results = []
        for start in range(1000, 1000 + sessions, 100):
            results += await asyncio.gather(*[
                client.complete(PROMPT, new_tokens, temperature=temperature, top_p=top_p, seed=seed, timeout=120)
                for seed in range(start, start + 100)
            ])
        figures = await client.stats()
    finally:
        client.close()
    assert_target_pair_distribution(results, vocab8_models["target"], temperature, top_p)
    assert figures["proactive_hits"] - before["proactive_hits"] > sessions // 20  # the proactive path was really taken
