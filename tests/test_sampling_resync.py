"""Sampling across a resync: the verifier's random draws are a function of (seed, position), so a
session rebuilt from its history (eviction, verifier restart, timeout) continues its random
stream instead of restarting it from the seed. Before, every rebuild re-seeded the session's
generator, and the draws after a resync repeated the session's first ones."""

import math

import pytest
import torch

from pipeline.config import LimitsConfig
from pipeline.protocol import Propose
from tests.conftest import TINY_VOCAB, tiny_llama
from workers.target import TargetVerifier

HISTORY = [11, 22, 33, 44]
TEMPERATURE = 1.0


@pytest.fixture(scope="module")
def model():
    return tiny_llama(1)


def verifier(model) -> TargetVerifier:
    return TargetVerifier(model, max_sessions=64, limits=LimitsConfig())


def generate(v: TargetVerifier, sid: str, seed: int, rounds: int, resync_at: set[int] = frozenset()) -> list[int]:
    """Rounds with a two-token draft (ids only); the history is resent at round 0 and at ``resync_at``."""
    committed = list(HISTORY)
    for r in range(rounds):
        history = list(committed) if r == 0 or r in resync_at else None
        draft = [committed[-1], (committed[-1] * 7 + 3) % TINY_VOCAB]
        (verdict,) = v.verify_batch([Propose(sid, r, len(committed), draft, history=history,
                                             temperature=TEMPERATURE, seed=seed)])
        assert not verdict.error, verdict
        committed += [*draft[: verdict.accepted], verdict.token]
    return committed[len(HISTORY):]


def test_a_resync_continues_the_random_stream(model):
    for seed in (1, 2, 3):
        straight = generate(verifier(model), "a", seed, 12)
        # the same session on another verifier, rebuilt from its history twice on the way
        resynced = generate(verifier(model), "b", seed, 12, resync_at={4, 9})
        assert resynced == straight, f"seed {seed}: the draws after a resync differ from the stream's"


def test_draws_on_both_sides_of_a_forced_resync_are_independent(model):
    """The token sampled right after a resync (position n + 1) is drawn independently of the one
    before it (position n). The expected rate of equal pairs comes from the model's logits alone:
    sum over x of p(x | history) * p(x | history + [x])."""
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([HISTORY])).logits[0, -1].double() / TEMPERATURE, -1)
        after = torch.tensor([[*HISTORY, x] for x in range(TINY_VOCAB)])
        p2 = torch.softmax(model(after).logits[:, -1].double() / TEMPERATURE, -1)
    expected_rate = float((p1 * p2.diagonal()).sum())
    trials = 200
    v = verifier(model)
    equal = 0
    for seed in range(trials):
        sid = f"s{seed}"
        (first,) = v.verify_batch([Propose(sid, 0, len(HISTORY), [], history=HISTORY, temperature=TEMPERATURE,
                                           seed=seed)])
        history = [*HISTORY, first.token]
        (second,) = v.verify_batch([Propose(sid, 1, len(history), [], history=history, temperature=TEMPERATURE,
                                            seed=seed)])  # forced resync: the history again
        equal += first.token == second.token
        v.close(sid)
    mean = trials * expected_rate
    bound = mean + 5 * math.sqrt(mean) + 3  # far in the tail of Binomial(trials, expected_rate)
    assert equal <= bound, f"{equal} of {trials} pairs equal, expected about {mean:.1f}"
