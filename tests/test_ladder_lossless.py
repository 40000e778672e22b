"""The committed drafter ladder drives SLED on the real target: every rung loads, drafts, and the
output stays token-identical to the target decoding alone (greedy), with drafts really accepted."""

import pytest
import torch

from pipeline.config import LimitsConfig
from pipeline.models import load_causal_lm, load_tokenizer
from pipeline.sample_prompts import chat_prompt_ids
from pipeline.protocol import Propose, Sampling
from pipeline.reference import greedy_reference
from training.ladder import RUNGS, load_rung
from workers.drafts import ModelDrafter, draft_generator
from workers.target import TargetVerifier

PROMPTS = ["Name three rivers in Europe.", "Write two sentences about the moon."]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def target():
    torch.set_num_threads(1)
    return load_causal_lm("smollm2")


@pytest.mark.parametrize("rung", RUNGS)
def test_each_rung_keeps_sled_lossless(rung, target):
    tokenizer = load_tokenizer("smollm2")
    drafter = ModelDrafter(load_rung(rung, target=target))
    verifier = TargetVerifier(target, max_sessions=8, limits=LimitsConfig())
    accepted = proposed = 0
    for i, text in enumerate(PROMPTS):
        prompt = chat_prompt_ids(tokenizer, text)
        committed, state = list(prompt), drafter.new_state()
        stop = tokenizer.eos_token_id
        while len(committed) - len(prompt) < NEW_TOKENS and committed[-1] != stop:
            budget = NEW_TOKENS - (len(committed) - len(prompt))
            draft = drafter.propose(state, committed, min(4, budget - 1), Sampling(), draft_generator(0))
            item = Propose(f"{rung}-{i}", 0, len(committed), draft.tokens,
                           history=list(committed) if len(committed) == len(prompt) else None)
            verdict = verifier.verify_batch([item])[0]
            assert not verdict.error, verdict
            drafter.commit(state, len(committed), verdict.accepted)
            new = [*draft.tokens[: verdict.accepted], verdict.token][:budget]
            if stop in new:
                new = new[: new.index(stop) + 1]
            committed += new
            accepted += verdict.accepted
            proposed += len(draft.tokens)
        assert committed[len(prompt):] == greedy_reference(target, prompt, NEW_TOKENS, [stop])
    assert proposed > 0 and accepted > 0  # the rung drafts, and the target agrees with some of it
