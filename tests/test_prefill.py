"""Batched, chunked prefill (workers/prefill.py) on both verifier backends: the plan keeps every
forward under its token budget and feeds each history once, in order; a wave of arrivals is
prefilled in a bounded number of forwards (counted by workers/forward_log.py) and every session
stays token-identical to the target decoding alone, also when one history spans several
forwards and when new sessions join running ones; history features survive chunking."""

import random

import numpy as np
import pytest
import torch

import tests.test_target as target_tests
from pipeline.config import LimitsConfig
from pipeline.protocol import Propose
from pipeline.reference import greedy_reference
from tests.conftest import TINY_VOCAB, tiny_llama
from tests.test_static_verifier import tiny_qwen2
from workers.forward_log import ForwardLog, verify_recorded
from workers.prefill import Slice, plan_prefill
from workers.static_verifier import StaticVerifier
from workers.target import TargetVerifier


def make(backend: str, model, budget: int, max_sessions: int = 64):
    if backend == "static":
        return StaticVerifier(model, max_sessions=max_sessions, limits=LimitsConfig(), kv_cache_mb=8.0,
                              prefill_chunk_tokens=budget)
    return TargetVerifier(model, max_sessions=max_sessions, limits=LimitsConfig(), prefill_chunk_tokens=budget)


def check_plan(lengths: list[int], budget: int, forwards: list[list[Slice]]) -> None:
    fed = [0] * len(lengths)
    for forward in forwards:
        assert len({s.index for s in forward}) == len(forward), "a history twice in one forward"
        if budget > 0:
            assert len(forward) * max(s.stop - s.start for s in forward) <= budget
        for s in forward:
            assert s.start == fed[s.index] < s.stop, "slices of a history come in order, none empty"
            fed[s.index] = s.stop
    assert fed == lengths


@pytest.mark.parametrize("budget", [0, 1, 7, 64, 512])
def test_the_plan_feeds_every_history_once_in_order_under_the_budget(budget):
    rng = random.Random(budget)
    for _ in range(50):
        lengths = [rng.choice([0, 1, rng.randint(1, 40), rng.randint(1, 700)]) for _ in range(rng.randint(1, 40))]
        check_plan(lengths, budget, plan_prefill(lengths, budget))


def test_the_plan_packs_a_wave_into_few_forwards():
    assert plan_prefill([30] * 8, 512) == [[Slice(i, 0, 30) for i in range(8)]]
    assert len(plan_prefill([30] * 8, 0)) == 8  # the serial path: one history per forward
    # long histories advance side by side: as many forwards as the budget needs, no padding
    forwards = plan_prefill([256] * 8, 512)
    assert len(forwards) == 4 and all(len(f) == 8 and f[0].stop - f[0].start == 64 for f in forwards)
    assert len(plan_prefill([1000], 512)) == 2


def prompts_for(seed: int, count: int, low: int, high: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(TINY_VOCAB) for _ in range(rng.randint(low, high))] for _ in range(count)]


@pytest.mark.parametrize("backend", ["eager", "static"])
def test_eight_arrivals_are_prefilled_in_one_forward_and_stay_lossless(backend):
    model = tiny_llama(1)
    prompts = prompts_for(0, 8, 10, 40)
    refs = [greedy_reference(model, p, 24) for p in prompts]
    counts = {}
    for budget in (512, 0):
        ver = make(backend, model, budget)
        log = ForwardLog()
        first = verify_recorded(ver, [Propose(f"s{i}", 0, len(p), [], history=list(p)) for i, p in enumerate(prompts)], log)
        assert [v.token for v in first] == [r[0] for r in refs]
        counts[budget] = (log.prefill_forwards, sum(log.verify.values()))
        assert log.prefill_tokens == sum(len(p) - 1 for p in prompts)
        # the rest of the generation through the same verifier: token-identical to the target alone
        hist = [p + [v.token] for p, v in zip(prompts, first)]
        outputs, _ = run_from(ver, hist, prompts, refs, 24, random.Random(1))
        assert outputs == refs
    assert counts == {512: (1, 1), 0: (8, 1)}  # one prefill and one verify forward, against 8 + 1


def run_from(ver, hist, prompts, refs, new_tokens, rng, arrivals=None, gamma_max=5):
    """Rounds of noisy drafts of the right answer (tests/test_target.py's simulated fleet), for
    sessions already open on ``ver`` (``hist`` holds each one's committed tokens) or, with
    ``arrivals``, opening at the round given for each (history sent on its first proposal)."""
    arrivals = arrivals or [None] * len(prompts)
    opened = {i for i, a in enumerate(arrivals) if a is None}
    rounds = 1
    while any(len(h) - len(p) < new_tokens for h, p in zip(hist, prompts)):
        items = []
        for i, (h, p) in enumerate(zip(hist, prompts)):
            done = len(h) - len(p)
            if done >= new_tokens or (i not in opened and arrivals[i] > rounds):
                continue
            draft = refs[i][done : done + rng.randint(0, gamma_max)]
            draft = [t if rng.random() > 0.3 else rng.randrange(TINY_VOCAB) for t in draft]
            items.append(Propose(f"s{i}", rounds, len(h), draft, history=None if i in opened else list(h)))
            opened.add(i)
        for item, verdict in zip(items, ver.verify_batch(items)):
            assert not verdict.error, verdict
            i = int(item.session_id[1:])
            hist[i] += item.draft[: verdict.accepted] + [verdict.token]
        rounds += 1
    return [h[len(p) : len(p) + new_tokens] for h, p in zip(hist, prompts)], rounds


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("backend", ["eager", "static"])
def test_histories_longer_than_the_budget_span_several_forwards_and_stay_lossless(backend, arch):
    """A 24-token budget against 30..90-token histories, arriving in three waves beside running
    sessions: each wave's histories are cut over several forwards within its batch."""
    model = tiny_llama(2) if arch == "llama" else tiny_qwen2(2)
    prompts = prompts_for(2, 9, 30, 90)
    refs = [greedy_reference(model, p, 20) for p in prompts]
    ver = make(backend, model, 24)
    outputs, _ = run_from(ver, [list(p) for p in prompts], prompts, refs, 20, random.Random(3),
                          arrivals=[1, 1, 1, 3, 3, 3, 6, 6, 6])
    assert outputs == refs
    stats = ver.stats
    assert stats.prefills == 9 and stats.prefill_tokens == sum(len(p) - 1 for p in prompts)
    # no forward computed more than 24 padded tokens, so it took at least that many forwards
    assert stats.prefill_forwards >= -(-stats.prefill_tokens // 24)
    assert stats.prefill_forwards <= 3 * max(-(-(len(p) - 1) // 8) for p in prompts)


@pytest.mark.parametrize("backend", ["eager", "static"])
@torch.inference_mode()
def test_history_features_are_the_same_whatever_the_chunking(backend):
    """The latest MAX_PREFILL_FEATURE_ROWS history positions' hidden states, from histories cut
    into 16-token slices, equal those of one whole-history forward each."""
    model = tiny_llama(7)
    prompts = prompts_for(4, 3, 5, 40) + [prompts_for(5, 1, 300, 300)[0]]  # one history past 256 rows
    layers = [[-1], [0, 2, -1], [], [1]]
    got = {}
    for budget in (0, 16):
        ver = make(backend, model, budget)
        got[budget] = ver.verify_batch([Propose(f"s{i}", 0, len(p), [], history=list(p), feature_layers=asked)
                                        for i, (p, asked) in enumerate(zip(prompts, layers))])
    for whole, chunked, p, asked in zip(got[0], got[16], prompts, layers):
        assert (whole.token, whole.features_start, len(whole.features)) == (chunked.token, chunked.features_start, len(chunked.features))
        rows = min(len(p) - 1, 256) + 1 if asked else 0  # the history's latest rows and the round's first
        assert len(whole.features) == rows * len(asked) * model.config.hidden_size * 2
        np.testing.assert_allclose(np.frombuffer(chunked.features, np.float16), np.frombuffer(whole.features, np.float16),
                                   atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("kind", ["model", "ngram"])
def test_sampling_with_a_budget_of_fewer_tokens_than_sessions_keeps_the_distribution(monkeypatch, kind):
    """500 sessions open per batch under a 64-token budget: every history (4 tokens) is fed one
    token per forward over several forwards, and sampled pairs keep the target's distribution."""
    monkeypatch.setattr(target_tests, "verifier", lambda model, max_sessions=64: make("static", model, 64, max_sessions))
    target_tests.test_sampling_through_drafters_keeps_the_sequence_distribution(kind)


@pytest.mark.parametrize("backend", ["eager", "static"])
def test_the_budget_comes_from_the_configuration(backend):
    from pipeline.config import load_config
    from workers.static_verifier import make_verifier

    config = load_config(None, [f'verifier.backend="{backend}"', "verifier.kv_cache_mb=8.0", "verifier.prefill_chunk_tokens=5"])
    ver = make_verifier(tiny_llama(1), config)
    assert ver.prefill_chunk_tokens == 5 and load_config(None, []).verifier.prefill_chunk_tokens == 512
    ver.verify_batch([Propose("a", 0, 12, [], history=list(range(1, 13)))])
    assert ver.stats.prefill_forwards == 3  # 11 tokens, at most 5 a forward
