"""The n-gram drafter's datastore (workers/datastore.py): its tables answer as plain counting
does, pruning changes no answer, it round-trips through its files, the drafter puts the context's
repeat first and the datastore's tokens after it, it drafts a model drafter's chain where the
model is unsure, a drafter of token trees gets its continuation as one more branch, and over real
sockets a datastore class stays token-identical to the target
alone."""

import random
from collections import Counter, defaultdict

import pytest

from pipeline.client import DrafterClient
from pipeline.models import load_causal_lm
from pipeline.protocol import Sampling
from pipeline.reference import greedy_reference
from tests.conftest import TINY_VOCAB, make_stack
from workers.datastore import build_datastore, load_datastore
from workers.drafts import Draft, DraftStrategy, NgramDrafter
from workers.lookup import with_lookup

GREEDY = Sampling()


def counted_next(sequences, max_order):
    """The reference: per order, n-gram -> Counter of the generated tokens that followed it."""
    tables = [defaultdict(Counter) for _ in range(max_order + 1)]
    for ids, prompt_len in sequences:
        for i in range(max(prompt_len, 1), len(ids)):
            for n in range(1, min(max_order, i) + 1):
                tables[n][tuple(ids[i - n:i])][ids[i]] += 1
    return tables


def reference_next(tables, context, max_order):
    for n in range(min(max_order, len(context)), 0, -1):
        counts = tables[n].get(tuple(context[-n:]))
        if counts:
            top = max(counts.values())
            return min(t for t, c in counts.items() if c == top)  # ties: the smaller id
    return None


def test_the_most_frequent_continuation_of_the_longest_match_wins():
    # after [1, 2] the target wrote 3 twice and 4 once; after [9, 2] it wrote 4; prompt tokens
    # (before prompt_len) are context only, never a continuation
    sequences = [([1, 2, 3, 5], 0), ([1, 2, 3], 0), ([7, 1, 2, 4], 1), ([9, 2, 4], 0), ([1, 2, 6, 6], 3)]
    store = build_datastore(sequences, vocab_size=16, max_order=3)
    assert store.next_token([8, 1, 2]) == 3  # order 2 ([1, 2]) seen: 3 twice, 4 once
    assert store.next_token([9, 2]) == 4  # order 2 ([9, 2]) overrides order 1's guess
    assert store.next_token([0, 0, 2]) == 3  # unseen [0, 2]: back off to [2] (3 twice, 4 twice: the smaller id)
    assert store.next_token([15]) is None  # never seen
    assert store.draft([1, 2], 3) == [3, 5]  # [2, 3] -> 5; then [3, 5] and [5] were never followed
    assert store.meta["generated_tokens"] == 3 + 2 + 3 + 2 + 1  # positions from max(prompt_len, 1) on


def test_pruned_tables_answer_as_plain_counting_does(tmp_path):
    """Entries the lower order predicts anyway are dropped; every context still gets the answer of
    the full counted tables, and the saved files load to the same answers."""
    rng = random.Random(0)
    vocab, max_order = 12, 4
    sequences = []
    for _ in range(60):  # a skewed walk, so that n-grams repeat and orders disagree
        ids = [rng.randrange(vocab)]
        for _ in range(rng.randint(5, 40)):
            ids.append((ids[-1] * 3 + rng.choice([0, 0, 1, 2, 5])) % vocab)
        sequences.append((ids, rng.randint(0, 3)))
    store = build_datastore(sequences, vocab_size=vocab, max_order=max_order)
    tables = counted_next(sequences, max_order)
    full = sum(len(t) for t in tables[1:])
    assert sum(store.meta["entries"]) < full  # something was pruned
    store.save(tmp_path / "ds")
    loaded = load_datastore(tmp_path / "ds")
    for _ in range(2000):
        context = [rng.randrange(vocab) for _ in range(rng.randint(1, 6))]
        want = reference_next(tables, context, max_order)
        assert store.next_token(context) == want == loaded.next_token(context), context


def test_ids_outside_the_vocabulary_find_nothing():
    store = build_datastore([([1, 2, 3], 0)], vocab_size=4, max_order=2)
    assert store.next_token([2]) == 3
    assert store.next_token([2, 9]) is None


def test_the_drafter_puts_the_repeat_first_and_the_datastore_after_it():
    # the datastore learnt 1 -> 2 -> 3 -> 4 -> 5
    store = build_datastore([([1, 2, 3, 4, 5], 0)], vocab_size=16, max_order=2)
    drafter = NgramDrafter(datastore=store, min_match=2)
    # the context repeats [7, 1] (followed by 8 before): the repeat's tokens, then the datastore's
    assert drafter.propose(None, [7, 1, 8, 7, 1], 4, GREEDY, None).tokens == [8, 7, 1, 2]
    assert drafter.match([7, 1, 8, 7, 1]) == 2
    # a one-token repeat ([1]) is below min_match: the datastore drafts alone
    assert drafter.propose(None, [1, 9, 1], 3, GREEDY, None).tokens == [2, 3, 4]
    assert drafter.match([1, 9, 1]) == 0
    assert drafter.propose(None, [11, 12], 4, GREEDY, None).tokens == []
    # without a datastore it is the plain n-gram drafter
    assert NgramDrafter().propose(None, [1, 9, 1], 3, GREEDY, None).tokens == [9, 1]
    assert NgramDrafter().match([1, 9, 1]) == 0


class FixedTree(DraftStrategy):
    """A drafter of token trees that always drafts the same one (root children 2 and 9, then 3
    under 2), and the chain [9] with its first token's probability ``confidence``."""

    tree_nodes, tree_depth = 3, 3

    def __init__(self, confidence: float = 1.0):
        self.confidence = confidence
        self.rewound: list[int] = []

    def propose(self, state, committed, gamma, sampling, generator, interrupt=None, tree=False):
        if tree and sampling.greedy:
            return Draft([2, 9, 3], parents=[-1, -1, 0])
        return Draft([9] if self.confidence >= 0.1 else [], confidence=self.confidence)

    def rewind(self, state, length):
        self.rewound.append(length)


def test_the_datastore_drafts_a_chain_where_the_drafter_is_unsure():
    # "2" was followed by 3 and by 9 (ties: 3), "8 2" by 9: an order-2 entry; "1 2" -> 3 is pruned
    # (its suffix "2" says the same), so a context ending in "1 2" matches one token only
    store = build_datastore([([1, 2, 3, 4, 5, 6, 8, 2, 9, 10], 0)], vocab_size=16, max_order=2)
    assert store.match([7, 8, 2]) == 2 and store.match([7, 1, 2]) == 1 and store.match([15]) == 0
    sure, unsure, stopped = FixedTree(0.9), FixedTree(0.2), FixedTree(0.05)  # stopped: drafted nothing
    # it stands in for the unsure drafter, whose cache is rewound to the context (none of its tokens went out)
    for inner, expected in ((sure, [9]), (unsure, [9, 10]), (stopped, [9, 10])):
        draft = with_lookup(inner, min_match=2, datastore=store).propose(None, [7, 8, 2], 3, GREEDY, None)
        assert (draft.tokens, draft.datastore, draft.lookup) == (expected, inner is not sure, False)
        assert inner.rewound == ([] if inner is sure else [3])
    # a context that matches one token only: the drafter's own draft
    assert with_lookup(FixedTree(0.2), min_match=2, datastore=store).propose(None, [7, 1, 2], 3, GREEDY, None).tokens == [9]
    # γ = 0 leaves it to the drafter; a sampled session gets q = 1 on each datastore token, as for a repeat's
    drafter = with_lookup(FixedTree(0.2), min_match=2, datastore=store)
    assert not drafter.propose(None, [7, 8, 2], 0, GREEDY, None).datastore
    sampled = drafter.propose(None, [7, 8, 2], 2, Sampling(temperature=1.0), None)
    assert (sampled.tokens, sampled.q_ids, sampled.q_probs) == ([9, 10], [[9], [10]], [[1.0], [1.0]])


def test_a_drafter_of_trees_gets_the_datastores_continuation_as_one_more_branch():
    store = build_datastore([([1, 2, 3, 4, 5], 0)], vocab_size=16, max_order=2)  # 1 -> 2 -> 3 -> 4 -> 5
    drafter = with_lookup(FixedTree(), min_match=2, datastore=store)
    assert drafter.tree_rows == 3 + 3  # the policy prices the branch's rows
    tree = drafter.propose(None, [7, 1], 4, GREEDY, None, tree=True)
    # the branch 2 3 4 shares the tree's nodes 2 and 3 and adds 4 under 3
    assert (tree.tokens, tree.parents, tree.lookup) == ([2, 9, 3, 4], [-1, -1, 0, 2], False)
    # the repeat's branch too (context "7 1" repeats, followed by 8 7 1 before), then the datastore's
    tree = drafter.propose(None, [7, 1, 8, 7, 1], 4, GREEDY, None, tree=True)
    assert tree.lookup and (tree.tokens[3:], tree.parents[3:]) == ([8, 7, 1, 4], [-1, 3, 4, 2])
    # chains and sampled rounds take neither branch from the datastore
    assert drafter.propose(None, [7, 1], 4, GREEDY, None).tokens == [9]
    assert drafter.propose(None, [7, 1], 4, Sampling(temperature=1.0), None, tree=True).tokens == [9]
    # no lookup (min_match 0): the datastore's branch alone; no datastore and no lookup: the drafter itself
    alone = with_lookup(FixedTree(), min_match=0, datastore=store)
    assert alone.propose(None, [7, 1, 8, 7, 1], 4, GREEDY, None, tree=True).tokens == [2, 9, 3, 4]
    assert isinstance(with_lookup(FixedTree(), min_match=0), FixedTree)


@pytest.mark.parametrize("built_for", ["target", "other vocabulary"])
async def test_a_datastore_class_is_token_identical_to_the_target_alone(tmp_path, tiny_models, built_for):
    """The datastore holds the target's own greedy continuations of some prompts; the class then
    serves those prompts and others. A datastore of another vocabulary is dropped at start (its
    ids would be refused by the verifier), and the class drafts by context lookup alone."""
    target_path = str(tiny_models["target"])
    target = load_causal_lm(target_path)
    rng = random.Random(5)
    seen = [[rng.randrange(1, TINY_VOCAB) for _ in range(rng.randint(3, 8))] for _ in range(6)]
    fresh = [[rng.randrange(1, TINY_VOCAB) for _ in range(rng.randint(3, 8))] for _ in range(3)]
    vocab = TINY_VOCAB if built_for == "target" else 2 * TINY_VOCAB
    build_datastore([(p + greedy_reference(target, p, 40), len(p)) for p in seen], vocab_size=vocab,
                    max_order=3, meta={"target": target_path}).save(tmp_path / "ds")
    drafters = {"ds": {"kind": "ngram", "datastore": str(tmp_path / "ds"), "lookup_min_match": 2,
                       "gamma": 4, "adaptive": False}}
    stack = make_stack(tmp_path, target_path, drafters)
    async with stack:
        client = DrafterClient(stack.config.drafter("ds").client)
        try:
            results = [await client.complete(p, 32, stop_ids=[], timeout=60) for p in seen + fresh]
        finally:
            client.close()
    assert [r.tokens for r in results] == [greedy_reference(target, p, 32) for p in seen + fresh]
    accepted = sum(r.stats["accepted"] for r in results[: len(seen)])
    if built_for == "target":  # the seen prompts' continuations are in the datastore (147 of 192 when written)
        assert accepted >= 0.5 * 32 * len(seen), accepted
    else:  # dropped: context lookup alone (18 when written)
        assert accepted < 0.5 * 32 * len(seen), accepted


def test_the_committed_datastore_drafts_what_the_default_target_would_say():
    """The committed datastore (drafters/ngram) is for the default target's vocabulary, and on
    chat answers the target itself wrote, the n-gram class drafts more of them right with it than
    by context lookup alone."""
    from pipeline.models import load_tokenizer, vocab_size
    from pipeline.sample_prompts import chat_prompt_ids
    from training.heldout_alpha import accepted_lengths
    from workers.datastore import BUILTIN

    store = load_datastore(BUILTIN)
    assert store.meta["vocab_size"] == vocab_size("smollm2") and store.meta["target"] == "smollm2"
    target, tokenizer = load_causal_lm("smollm2"), load_tokenizer("smollm2")
    answers = []
    for question in ("Write two sentences about the moon.", "Give three tips for staying focused."):
        prompt = chat_prompt_ids(tokenizer, question)
        answers.append((prompt, greedy_reference(target, prompt, 32, [tokenizer.eos_token_id])))

    def tokens_per_round(drafter):
        rounds = []
        for prompt, answer in answers:
            ids = prompt + answer

            def agreement(pos, ids=ids, prompt=prompt):
                tokens = drafter.propose(None, ids[:len(prompt) + pos], 4, GREEDY, None).tokens
                return [a == b for a, b in zip(tokens, ids[len(prompt) + pos:])] or [False]

            rounds += accepted_lengths([False] * len(answer), 4, agreement)
        return 1 + sum(rounds) / len(rounds)

    with_store, alone = tokens_per_round(NgramDrafter(datastore=store, min_match=2)), tokens_per_round(NgramDrafter())
    assert with_store > alone and with_store > 1.2, (with_store, alone)


def test_sled_train_datastore_builds_from_shard_folders(tmp_path, tiny_models):
    """The CLI reads distillation shards (only their ids and prompt lengths), the first --shards of
    them, and writes a datastore for the target's vocabulary that the drafter loads."""
    import json
    import subprocess
    import sys

    import torch

    shards = tmp_path / "data"
    shards.mkdir()
    torch.save([{"ids": torch.tensor([3, 4, 5, 6]), "prompt_len": 2, "top_ids": None}], shards / "shard_0000.pt")
    torch.save([{"ids": torch.tensor([3, 4, 9]), "prompt_len": 1}], shards / "shard_0001.pt")
    out = tmp_path / "ds"
    args = [sys.executable, "-m", "pipeline", "train", "datastore", "--data", str(shards), "--target",
            str(tiny_models["target"]), "--shards", "1", "--out", str(out), "--note", "two shards"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["generated_tokens"] == 2
    store = load_datastore(out)
    assert store.meta["vocab_size"] == TINY_VOCAB and store.meta["note"] == "two shards"
    assert store.draft([3, 4], 4) == [5, 6]  # the second shard (4 -> 9) was left out
