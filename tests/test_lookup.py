"""Context lookup in front of a model or feature drafter (workers/lookup.py): where the context
repeats, the round drafts what followed the repeat; elsewhere the model drafts, and the model's
own cache stays right either way. Over real sockets it stays token-identical to the target alone,
and against a scripted broker each way of drafting keeps its own adaptive length."""

import asyncio
import random

from pipeline.client import DrafterClient
from pipeline.models import load_causal_lm
from pipeline.protocol import Propose, Sampling, Verdict
from pipeline.reference import greedy_reference
from tests.conftest import TINY_VOCAB, make_stack
from tests.scripted_broker import run_drafter
from tests.test_feature_drafter import feature_head_dir, prompts  # noqa: F401 - the module's head fixture
from training.heldout_alpha import accepted_lengths
from workers.datastore import build_datastore
from workers.drafts import Draft, DraftStrategy, ModelDrafter, draft_generator, lookup_draft
from workers.lookup import LookupDrafter


def test_lookup_draft_follows_the_latest_longest_match():
    context = [1, 2, 3, 9, 2, 3, 4, 5, 1, 2, 3]
    assert lookup_draft(context, 3) == ([9, 2, 3], 3)  # "1 2 3" occurred once: what followed it
    assert lookup_draft([7, 2, 3, 4, 8, 2, 3, 5, 6, 2, 3], 2) == ([5, 6], 2)  # the latest "2 3"
    assert lookup_draft([5, 1, 2, 6, 2], 4, min_match=2) == ([], 0)  # only a 1-token repeat
    assert lookup_draft([5, 1, 2, 6, 2], 4, min_match=1) == ([6, 2], 1)
    assert lookup_draft([1, 2, 1, 2], 0) == ([], 0)


def test_lookup_draft_equals_a_plain_search_on_random_contexts():
    """The packed-bytes search against the obvious loop, on vocabularies with ids of one to three
    bytes (a match inside a token's bytes must not count)."""
    def plain(committed, gamma, ngram_max, min_match):
        size = len(committed)
        for n in range(min(ngram_max, size - 1), max(1, min_match) - 1, -1):
            for start in range(size - n - 1, -1, -1):
                if gamma > 0 and committed[start:start + n] == committed[size - n:]:
                    return committed[start + n:start + n + gamma], n
        return [], 0

    rng = random.Random(2)
    for _ in range(3000):
        vocab = rng.choice([2, 3, 7, 256, 300, 70_000])
        context = [rng.randrange(vocab) for _ in range(rng.randint(0, 40))]
        gamma, ngram_max, min_match = rng.randint(0, 5), rng.randint(1, 6), rng.randint(1, 4)
        assert lookup_draft(context, gamma, ngram_max, min_match) == plain(context, gamma, ngram_max, min_match), context


def test_rounds_with_a_lookup_draft_accept_its_agreeing_run():
    agree = [True, False, True, True, True, True, False]
    assert accepted_lengths(agree, 4) == [1, 4]
    # a lookup draft at position 2 that agrees twice, the model elsewhere
    lookup = lambda pos: [True, True, False] if pos == 2 else None  # noqa: E731
    assert accepted_lengths(agree, 4, lookup) == [1, 2, 1]


def test_a_repeating_context_drafts_by_lookup_and_the_model_cache_stays_right(tiny_models):
    model = load_causal_lm(str(tiny_models["small"]))
    plain, wrapped = ModelDrafter(model), LookupDrafter(ModelDrafter(model), min_match=2)
    state, reference = wrapped.new_state(), plain.new_state()
    fresh = [11, 12, 13, 14, 15]
    draft = wrapped.propose(state, fresh, 3, Sampling(), draft_generator(0))
    assert not draft.lookup and draft.tokens == plain.propose(reference, fresh, 3, Sampling(), draft_generator(0)).tokens
    wrapped.commit(state, len(fresh), 1)
    committed = [*fresh, draft.tokens[0], 12, 13]  # ends in "12 13", which was followed by 14 15
    draft = wrapped.propose(state, committed, 3, Sampling(), draft_generator(0))
    assert draft.lookup and draft.tokens == [14, 15, draft.tokens[2]] and draft.tokens[2] == committed[len(fresh)]
    wrapped.commit(state, len(committed), 0)  # nothing accepted: the model kept none of its drafts
    committed += [77]
    # the next model draft is the one a fresh drafter makes on the same context
    after = wrapped.propose(state, committed, 3, Sampling(), draft_generator(0))
    assert not after.lookup
    assert after.tokens == ModelDrafter(model).propose(ModelDrafter(model).new_state(), committed, 3, Sampling(),
                                                       draft_generator(0)).tokens
    sampled = wrapped.propose(state, [*committed, 12, 13], 2, Sampling(temperature=1.0, seed=1), draft_generator(0))
    assert sampled.lookup and sampled.q_ids == [[t] for t in sampled.tokens] and sampled.q_probs == [[1.0], [1.0]]


async def test_lookup_drafters_are_token_identical_to_the_target_alone(tmp_path, tiny_models, feature_head_dir):  # noqa: F811
    """A feature class (its verdicts still bring features after a lookup round) and a proactive
    model class with a datastore behind it too, both with lookup, on prompts that repeat and
    prompts that do not. Fixed γ: an
    adaptive class may draft nothing on two busy cores against a tiny target, and then neither
    way of drafting is exercised."""
    batch = [*prompts(4, 8), [5, 6, 7, 8] * 4, [1, 2, 1, 2, 1, 2, 3], [9, 10, 11, 9, 10, 11, 9], [4, 4, 4, 4]]
    target = load_causal_lm(str(tiny_models["target"]))
    expected = [greedy_reference(target, p, 32) for p in batch]
    # the model class has a datastore behind it, of the target's continuations of half the prompts:
    # it drafts where the small model is unsure (below min_confidence it drafts nothing itself)
    build_datastore([(p + e, len(p)) for p, e in zip(batch[::2], expected[::2])], vocab_size=TINY_VOCAB,
                    max_order=3).save(tmp_path / "ds")
    drafters = {"feat": {"kind": "feature", "model": str(feature_head_dir), "gamma": 3, "adaptive": False,
                         "lookup_min_match": 2},
                "small": {"kind": "model", "model": str(tiny_models["small"]), "gamma": 3, "adaptive": False,
                          "proactive": True, "lookup_min_match": 2, "datastore": str(tmp_path / "ds"),
                          "min_confidence": 0.5}}
    stack = make_stack(tmp_path, tiny_models["target"], drafters)
    async with stack:
        clients = {n: DrafterClient(stack.config.drafter(n).client) for n in drafters}
        try:
            results = []
            for name in drafters:
                for p in batch:
                    results.append(await clients[name].complete(p, 32, stop_ids=[], timeout=60))
        finally:
            for c in clients.values():
                c.close()
    assert [r.tokens for r in results] == expected * 2
    for name, rows in (("feat", results[: len(batch)]), ("small", results[len(batch):])):
        assert sum(r.stats["lookup_rounds"] for r in rows) > 0, f"{name} never drafted by lookup"
        own = sum(r.stats["rounds"] - r.stats["lookup_rounds"] - r.stats["datastore_rounds"] for r in rows)
        assert own > 0, f"{name} never drafted by model"
        assert sum(r.stats["accepted"] for r in rows) > 0
    assert sum(r.stats["datastore_rounds"] for r in results[len(batch):]) > 0, "the datastore never stood in"
    assert sum(r.stats["datastore_rounds"] for r in results[: len(batch)]) == 0  # no datastore


def test_a_recorded_trace_replays_which_rounds_lookup_drafted(tmp_path, tiny_models):
    """bench/traces.py keeps each round's repeat length, so a replaying session keys its adaptive
    figures by it as the live drafter does (workers/drafter.py)."""
    from bench.traces import record_trace
    from workers.drafts import ReplayDrafter, context_key

    target = load_causal_lm(str(tiny_models["target"]))
    strategy = LookupDrafter(ModelDrafter(load_causal_lm(str(tiny_models["small"]))), min_match=2)
    prompt = [5, 6, 7, 8] * 3
    reference = greedy_reference(target, prompt, 20)
    path = tmp_path / "trace.msgpack"
    record_trace(strategy, "model", [prompt], [reference], 3, 20, [], path)
    replay = ReplayDrafter(str(path))
    assert replay.match(prompt) == strategy.match(prompt) == 4  # "5 6 7 8" repeats
    assert replay.propose(None, prompt, 3, Sampling(), None).tokens == [5, 6, 7]
    recorded = [c for c in replay.drafts]
    assert recorded and replay.match([99, 98]) == 0  # a context never recorded
    assert context_key(prompt) in recorded


# --- the adaptive length per way of drafting, against a scripted broker -------------------------

BLOCK = [1, 2, 3, 4, 1, 2, 3, 4]


def scripted_text(length: int) -> list[int]:
    """Fresh tokens (never seen before: the model drafts, and is always wrong) between repeats of
    one block (lookup drafts, right once two of its tokens have gone by)."""
    text, fresh = [], 100
    while len(text) < length:
        text += list(range(fresh, fresh + 6)) + BLOCK
        fresh += 6
    return text[:length]


class WrongModel(DraftStrategy):
    """A model-kind strategy whose every draft token is wrong."""

    def propose(self, state, committed, gamma, sampling, generator, interrupt=None):
        return Draft([999] * gamma)


async def test_lookup_rounds_keep_drafting_where_the_models_stop():
    """Dear rows: the model's drafts, always rejected, shrink to nothing, while lookup drafts,
    mostly right, keep their length; each way of drafting has its own acceptance figures."""
    text = scripted_text(400)
    prompt, new_tokens = text[:14], 200
    drafts: list[list[int]] = []

    async def answer(msg: Propose) -> Verdict:
        drafts.append(list(msg.draft))
        truth = text[msg.position:msg.position + len(msg.draft) + 1]
        accepted = next((i for i, t in enumerate(msg.draft) if t != truth[i]), len(msg.draft))
        # a verifier's time: the round's fixed part and its rows (with none, drafting could never
        # save the session time, and its clock would stop every draft)
        await asyncio.sleep((10.0 + 5.0 * (1 + len(msg.draft))) / 1000)
        return Verdict(msg.session_id, msg.round, accepted, truth[accepted], row_cost_ms=5.0, round_cost_ms=10.0)

    # burst = 0: a burst hands the next rounds to the broker whatever a lookup would have drafted
    # in them (drafters.NAME.burst); here each way of drafting must be seen choosing its own length
    result = await run_drafter("lk", {"kind": "model", "gamma": 4, "lookup_min_match": 2, "burst": 0},
                               LookupDrafter(WrongModel(), min_match=2), answer, prompt, new_tokens, stop_ids=[])
    assert result.tokens == text[14:14 + new_tokens]
    assert result.stats["lookup_rounds"] > 0
    later = drafts[len(drafts) // 2:]
    model = [d for d in later if d[:1] == [999] or not d]
    looked_up = [d for d in later if d and d[0] != 999]
    assert len(model) >= 10 and len(looked_up) >= 10, drafts
    assert sum(len(d) for d in model) <= 0.25 * len(model), model  # at most a probe now and then
    assert sum(len(d) for d in looked_up) >= 2.0 * len(looked_up), looked_up
