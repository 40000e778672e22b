"""The acceptance rules alone. Sampling: the emitted token must be distributed exactly as the
target's p, whatever the draft distribution q; checked with a chi-square test that is shown to
detect a real bias (accepting drafts too eagerly)."""

import pytest
import torch
from scipy.stats import chisquare

from pipeline.protocol import Sampling
from workers.rejection_sampling import target_probs, verify_greedy, verify_sampling

SAMPLES = 20_000
ALPHA = 1e-3  # false-alarm rate of each test


def test_greedy_accepts_matching_prefix_then_corrects():
    logits = torch.full((4, 10), -5.0)
    for pos, best in enumerate([3, 4, 7, 1]):
        logits[pos, best] = 5.0
    assert verify_greedy(logits, [3, 4, 7]) == (3, 1)  # all accepted + bonus token
    assert verify_greedy(logits, [3, 9, 7]) == (1, 4)  # correction at the first mismatch
    assert verify_greedy(logits[:1], []) == (0, 3)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = target_probs(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])), Sampling(1.0, 0.8, 0))
    assert torch.allclose(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


def first_token_counts(p: torch.Tensor, draw_q, *, eager: bool = False) -> torch.Tensor:
    """Emit the first token SAMPLES times; draw_q gives (x, q_ids, q_probs) for one draft token."""
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(p.shape[-1])
    probs = torch.stack([p, p])  # position 0 and the bonus position
    for _ in range(SAMPLES):
        x, q_ids, q_probs = draw_q(gen)
        if eager:  # a biased verifier: always takes the draft
            counts[x] += 1
            continue
        accepted, token = verify_sampling(probs, [x], q_ids, q_probs, gen)
        counts[x if accepted else token] += 1
    return counts


def p_value(counts: torch.Tensor, p: torch.Tensor) -> float:
    keep = p > 0
    assert counts[~keep].sum() == 0, "emitted a token the target gives probability 0"
    return chisquare(counts[keep].numpy(), (p[keep] * counts.sum()).numpy()).pvalue


P = torch.tensor([0.30, 0.25, 0.20, 0.10, 0.08, 0.05, 0.02, 0.0])
Q = torch.tensor([0.05, 0.10, 0.05, 0.40, 0.30, 0.05, 0.05, 0.0])  # a badly aligned drafter


def topk_draft(gen):
    x = int(torch.multinomial(Q, 1, generator=gen))
    ids = [i for i in range(len(Q)) if Q[i] > 0]
    return x, [ids], [[float(Q[i]) for i in ids]]


def ids_only_draft(gen):
    return 3, [], []  # a deterministic proposal (n-gram lookup): q is a point mass


@pytest.mark.parametrize("draw", [topk_draft, ids_only_draft], ids=["top-k q", "ids only"])
def test_sampling_keeps_the_target_distribution(draw):
    assert p_value(first_token_counts(P, draw), P) > ALPHA


@pytest.mark.parametrize("draw", [topk_draft, ids_only_draft], ids=["top-k q", "ids only"])
def test_the_check_detects_a_biased_verifier(draw):
    assert p_value(first_token_counts(P, draw, eager=True), P) < ALPHA
