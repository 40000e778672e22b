"""The whole pipeline through real sockets between separate processes (broker, verifier,
drafters), compared with the target model decoding alone."""

import asyncio
import random

import pytest
import pytest_asyncio

from pipeline.client import DrafterClient, broker_stats
from pipeline.figures import BrokerFigures
from pipeline.protocol import SledError
from pipeline.models import load_causal_lm
from pipeline.reference import greedy_reference
from tests.conftest import TINY_VOCAB, make_stack

DRAFTERS = {  # four device classes: different sizes, architectures, draft lengths
    "twin": {"kind": "model", "gamma": 5},  # a copy of the target: every draft accepted
    # a fixed γ: a seed reproduces its output only under the same draft lengths (the acceptance
    # draws depend on the draft), and adaptive lengths follow the broker's timing-based row cost
    "small": {"kind": "model", "gamma": 3, "adaptive": False},
    "gpt2": {"kind": "model", "gamma": 2},
    "ngram": {"kind": "ngram", "gamma": 4},
}


# one stack for the module: starting six Python processes costs more than the tests themselves
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory, tiny_models):
    tmp_path = tmp_path_factory.mktemp("stack")
    drafters = {name: dict(cfg) for name, cfg in DRAFTERS.items()}
    drafters["twin"]["model"] = str(tiny_models["copy"])
    drafters["small"]["model"] = str(tiny_models["small"])
    drafters["gpt2"]["model"] = str(tiny_models["gpt2"])
    s = make_stack(tmp_path, tiny_models["target"], drafters, **{"broker__max_wait_ms": 20.0})
    async with s:
        yield s


async def test_greedy_is_token_identical_to_the_target_alone(stack, tiny_models):
    rng = random.Random(7)
    prompts = [[rng.randrange(TINY_VOCAB) for _ in range(rng.randint(1, 24))] for _ in range(12)]
    names = list(DRAFTERS)
    clients = {n: DrafterClient(stack.config.drafter(n).client) for n in names}
    try:
        results = await asyncio.gather(*[
            clients[names[i % len(names)]].complete(p, 40, stop_ids=[]) for i, p in enumerate(prompts)
        ])
        figures = await broker_stats(stack.config.broker.frontend)
        drafter_figures = {n: await c.stats() for n, c in clients.items()}
        await asyncio.sleep(0.5)  # CloseSession messages reach the verifier
        after = await broker_stats(stack.config.broker.frontend)
    finally:
        for c in clients.values():
            c.close()
    target = load_causal_lm(str(tiny_models["target"]))
    assert [r.tokens for r in results] == [greedy_reference(target, p, 40) for p in prompts]
    assert all(r.finish_reason == "length" for r in results)
    batches = BrokerFigures.of(figures).batch_sessions
    assert batches.mean > 1.5  # sessions really were verified together
    assert sum(batches.counts) == batches.count == figures["batches"]  # every batch observed once
    assert drafter_figures["twin"]["acceptance_rate"] == 1.0  # bonus-token path exercised
    assert drafter_figures["gpt2"]["proposed"] > 0
    assert after["sessions"] == 0
    assert sum(v["sessions"] for v in after["verifiers"].values()) == 0  # caches freed


async def test_stop_tokens_end_a_session_like_eos(stack, tiny_models):
    target = load_causal_lm(str(tiny_models["target"]))
    prompt = [3, 1, 4, 1, 5]
    free_run = greedy_reference(target, prompt, 30)
    stop = free_run[10]
    client = DrafterClient(stack.config.drafter("small").client)
    try:
        result = await client.complete(prompt, 30, stop_ids=[stop])
    finally:
        client.close()
    assert result.tokens == greedy_reference(target, prompt, 30, [stop])
    assert result.finish_reason == "stop" and result.tokens[-1] == stop


async def test_sampling_is_reproducible_per_seed(stack):
    client = DrafterClient(stack.config.drafter("small").client)
    try:
        runs = [await client.complete([9, 8, 7], 24, temperature=0.9, top_p=0.95, seed=s) for s in (11, 11, 12)]
    finally:
        client.close()
    assert runs[0].tokens == runs[1].tokens
    assert runs[0].tokens != runs[2].tokens


async def test_bad_requests_fail_alone(stack):
    client = DrafterClient(stack.config.drafter("ngram").client)
    try:
        with pytest.raises(SledError) as info:
            await client.complete([], 5)
        assert info.value.code == "invalid"
        with pytest.raises(SledError) as info:
            await client.complete([TINY_VOCAB + 10], 5)  # only the verifier knows the vocabulary
        assert info.value.code == "invalid"
        ok = await client.complete([1, 2, 3], 5)
        assert len(ok.tokens) == 5
    finally:
        client.close()
