"""The verifier's model side in-process: batched verification of ragged drafts equals the target
decoding alone, KV caches are reused across rounds, errors fail one item only, and sampling
through real drafters keeps the target's sequence distribution."""

import math
import random

import pytest
import torch
from scipy.stats import chisquare

from pipeline.config import LimitsConfig
from pipeline.protocol import ErrorCode, Propose, Sampling
from pipeline.reference import greedy_reference
from tests.conftest import TINY_VOCAB, tiny_llama
from workers.datastore import build_datastore
from workers.drafts import ModelDrafter, NgramDrafter, draft_generator, settle
from workers.feature_drafter import FeatureDrafter
from workers.feature_head import build_head, spec_for
from workers.lookup import LookupDrafter
from workers.target import TargetVerifier


def verifier(model, max_sessions=64):
    return TargetVerifier(model, max_sessions=max_sessions, limits=LimitsConfig())


def run_rounds(ver, prompts, new_tokens, propose, check=None):
    """Verify rounds until every session has ``new_tokens``: ``propose(i, history, done, round,
    first)`` makes session i's Propose (``first``: it must carry the history), ``check(item,
    verdict, history)`` looks at each verdict once its tokens are in. Returns the continuations
    and the number of rounds."""
    hist = [list(p) for p in prompts]
    opened = set()
    rounds = 0
    while any(len(h) - len(p) < new_tokens for h, p in zip(hist, prompts)):
        items = []
        for i, (h, p) in enumerate(zip(hist, prompts)):
            done = len(h) - len(p)
            if done >= new_tokens:
                continue
            items.append(propose(i, h, done, rounds, i not in opened))
            opened.add(i)
        for item, verdict in zip(items, ver.verify_batch(items)):
            assert not verdict.error, verdict
            i = int(item.session_id[1:])
            hist[i] += verdict.accepted_tokens(item.draft) + [verdict.token]
            if check is not None:
                check(item, verdict, hist[i])
        rounds += 1
    return [h[len(p) : len(p) + new_tokens] for h, p in zip(hist, prompts)], rounds


def run_greedy(ver, prompts, refs, new_tokens, rng, gamma_max=5, corrupt=0.3):
    """A simulated fleet: each session drafts a noisy copy of the right answer."""
    def propose(i, h, done, rounds, first):
        draft = refs[i][done : done + rng.randint(0, gamma_max)]
        draft = [t if rng.random() > corrupt else rng.randrange(TINY_VOCAB) for t in draft]
        return Propose(f"s{i}", rounds, len(h), draft, history=list(h) if first else None)

    return run_rounds(ver, prompts, new_tokens, propose)


def test_batched_ragged_verification_equals_target_alone():
    model = tiny_llama(1)
    rng = random.Random(0)
    prompts = [[rng.randrange(TINY_VOCAB) for _ in range(rng.randint(1, 20))] for _ in range(10)]
    refs = [greedy_reference(model, p, 40) for p in prompts]
    outputs, _ = run_greedy(verifier(model), prompts, refs, 40, rng)
    assert outputs == refs


def test_target_work_grows_linearly_with_generated_length():
    """KV reuse: each round feeds 1 + len(draft) tokens, never the history again."""
    model = tiny_llama(1)
    figures = {}
    for new_tokens in (60, 240):
        ver = verifier(model)
        rng = random.Random(1)
        prompt = [rng.randrange(TINY_VOCAB) for _ in range(8)]
        ref = greedy_reference(model, prompt, new_tokens)
        _, rounds = run_greedy(ver, [prompt], [ref], new_tokens, rng, gamma_max=4)
        stats = ver.stats.as_dict()
        assert stats["prefill_tokens"] == len(prompt) - 1
        assert stats["verify_tokens"] == rounds + stats["draft_tokens"] <= 5 * rounds
        figures[new_tokens] = stats["target_tokens"]
    # 4x the tokens costs about 4x the work (quadratic re-processing would cost ~16x)
    assert 3.0 < figures[240] / figures[60] < 5.0


def test_errors_fail_only_their_item_and_resync_works():
    model = tiny_llama(1)
    ver = verifier(model)
    ok = Propose("good", 0, 3, [1, 2], history=[5, 6, 7])
    items = [
        ok,
        Propose("ghost", 0, 4, [1]),  # never opened
        Propose("bad-token", 0, 2, [TINY_VOCAB + 5], history=[1, 2]),
        # the only rules the verifier checks: those that need the model (pipeline/rules.py has the rest)
        Propose("bad-q-id", 0, 2, [3], [[3, TINY_VOCAB + 1]], [[0.5, 0.5]], history=[1, 2], temperature=1.0),
        Propose("bad-layer", 0, 2, [3], history=[1, 2], feature_layers=[99]),
    ]
    verdicts = ver.verify_batch(items)
    assert verdicts[0].error == ""
    assert [v.error for v in verdicts[1:]] == [ErrorCode.UNKNOWN_SESSION] + [ErrorCode.INVALID] * 3
    position = 3 + verdicts[0].accepted + 1
    stale = ver.verify_batch([Propose("good", 1, position - 1, [])])[0]
    assert stale.error == ErrorCode.OUT_OF_SYNC
    history = [5, 6, 7, *ok.draft[: verdicts[0].accepted], verdicts[0].token]
    again = ver.verify_batch([Propose("good", 1, position, [], history=history)])[0]
    assert again.error == "" and again.token == greedy_reference(model, history, 1)[0]


def test_least_recently_used_sessions_are_evicted_and_can_come_back():
    model = tiny_llama(1)
    ver = verifier(model, max_sessions=2)
    for name in ("a", "b", "c"):
        ver.verify_batch([Propose(name, 0, 2, [], history=[1, 2])])
    assert set(ver.sessions) == {"b", "c"} and ver.stats.evictions == 1
    assert ver.verify_batch([Propose("a", 1, 3, [])])[0].error == ErrorCode.UNKNOWN_SESSION
    assert ver.close("b") and not ver.close("b")


@pytest.mark.parametrize("kind", ["model", "ngram", "ngram+datastore", "feature", "model+lookup", "model+datastore",
                                  "feature+lookup+tree"])
def test_sampling_through_drafters_keeps_the_sequence_distribution(kind):
    """Two-token continuations sampled by SLED (model drafter sending top-k q, the n-gram
    drafter sending ids only, and the two mixed by lookup) against the exact joint distribution
    of the target."""
    vocab = 8
    target = _tiny_vocab_llama(vocab, seed=11)
    drafter_model = _tiny_vocab_llama(vocab, seed=12)
    sampling = Sampling(temperature=1.0, top_p=0.9, seed=0)
    prompt = [1, 2, 3, 1, 2]
    with torch.inference_mode():  # the expected distribution from the logits, not from workers/rejection_sampling.py
        first = torch.tensor(reference_top_p(target(torch.tensor([prompt])).logits[0, -1].tolist(), 1.0, 0.9))
        second = torch.tensor([
            reference_top_p(target(torch.tensor([prompt + [t]])).logits[0, -1].tolist(), 1.0, 0.9) for t in range(vocab)
        ])
    joint = (first[:, None] * second).flatten()
    torch.manual_seed(13)
    strategies = {
        "model": lambda: ModelDrafter(drafter_model, top_k=4),
        "ngram": lambda: NgramDrafter(ngram_max=2),
        # the repeat "1 2" first, then a datastore's guesses (ids only, q = 1, like the repeat's)
        "ngram+datastore": lambda: NgramDrafter(ngram_max=2, min_match=2, datastore=build_datastore(
            [([1, 2, 3, 1, 2, 4, 5, 6, 7, 0, 3, 3], 0)], vocab_size=vocab, max_order=2)),
        # a random head over the target's features; it drafts the second token (round 0 has none)
        "feature": lambda: FeatureDrafter(build_head(target, spec_for(target), torch.arange(vocab)), top_k=4),
        # lookup drafts (q = 1) where the context repeats ("1 2" does), the model's top-k elsewhere
        "model+lookup": lambda: LookupDrafter(ModelDrafter(drafter_model, top_k=4), min_match=2),
        # a model that always stops at once (min_confidence above 1): the datastore's chain (q = 1)
        # where it has an entry of 2 tokens for the context's end ("1 2" -> 4, where "2" alone says 5)
        "model+datastore": lambda: LookupDrafter(ModelDrafter(drafter_model, top_k=4, min_confidence=1.01), min_match=0,
                                                 datastore=build_datastore([([6, 2, 5, 7, 2, 5, 1, 2, 4, 5, 3], 0)],
                                                                           vocab_size=vocab, max_order=2)),
        # a drafter of token trees drafts chains for a sampled session (a tree is greedy only)
        "feature+lookup+tree": lambda: LookupDrafter(FeatureDrafter(build_head(target, spec_for(target), torch.arange(vocab)),
                                                                    top_k=4, tree_nodes=4, gamma=2), min_match=2),
    }
    for strategy in (strategies[kind](),):
        counts = _sample_pairs(target, strategy, prompt, sampling, vocab, sessions=2500)
        keep = joint > 0
        assert counts[~keep].sum() == 0
        assert chisquare(counts[keep], joint[keep] * counts.sum()).pvalue > 1e-3, type(strategy).__name__


def reference_top_p(logits: list[float], temperature: float, top_p: float) -> list[float]:
    """Top-p (nucleus) sampling's distribution written out in plain Python: softmax at the
    temperature, then the most likely tokens until their mass reaches top_p, renormalised."""
    top = max(logits)
    weights = [math.exp((x - top) / temperature) for x in logits]
    total = sum(weights)
    probs = [w / total for w in weights]
    kept, mass = set(), 0.0
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        if mass >= top_p:
            break
        kept.add(i)
        mass += probs[i]
    return [p / mass if i in kept else 0.0 for i, p in enumerate(probs)]


def test_reference_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = [math.log(p) for p in (0.5, 0.3, 0.15, 0.05)]
    assert reference_top_p(logits, 1.0, 0.75) == pytest.approx([0.625, 0.375, 0.0, 0.0])
    assert reference_top_p(logits, 1.0, 1.0) == pytest.approx([0.5, 0.3, 0.15, 0.05])


def _tiny_vocab_llama(vocab, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, eos_token_id=None, bos_token_id=None)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharpen the random logits so acceptance is neither certain nor rare
        model.lm_head.weight.mul_(20)
    return model


def _sample_pairs(target, strategy, prompt, sampling, vocab, sessions, batch=500):
    counts = torch.zeros(vocab * vocab)
    for start in range(0, sessions, batch):
        ver = verifier(target, max_sessions=batch)
        runs = {}
        for seed in range(start, start + batch):
            session_sampling = Sampling(sampling.temperature, sampling.top_p, seed)
            runs[f"s{seed}"] = [list(prompt), strategy.new_state(), draft_generator(seed), session_sampling]
        rounds = 0
        while any(len(r[0]) < len(prompt) + 2 for r in runs.values()):
            items = []
            for sid, (hist, state, gen, smp) in runs.items():
                if len(hist) >= len(prompt) + 2:
                    continue
                # a drafter of token trees is asked for one: it must answer a sampled session with a chain
                draft = strategy.propose(state, hist, 2, smp, gen, **({"tree": True} if strategy.tree_nodes else {}))
                items.append((sid, draft, Propose(sid, rounds, len(hist), draft.tokens, draft.q_ids, draft.q_probs,
                                                  list(hist) if rounds == 0 else None, smp.temperature, smp.top_p, smp.seed,
                                                  feature_layers=list(strategy.feature_layers),
                                                  parents=draft.parents)))
            for (sid, draft, item), verdict in zip(items, ver.verify_batch([i for _, _, i in items])):
                assert not verdict.error, verdict
                hist, state = runs[sid][0], runs[sid][1]
                settle(strategy, state, len(hist), verdict)
                hist += draft.tokens[: verdict.accepted] + [verdict.token]
            rounds += 1
        for hist, *_ in runs.values():
            a, b = hist[len(prompt) : len(prompt) + 2]
            counts[a * vocab + b] += 1
    return counts.numpy()
