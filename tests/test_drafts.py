"""Draft strategies: cache rollback equals a fresh computation, n-gram lookup, the cache API
we rely on in the pinned transformers."""

import torch
from transformers import DynamicCache

from pipeline.protocol import Sampling
from tests.conftest import tiny_gpt2, tiny_llama
from workers.drafts import ModelDrafter, NgramDrafter, crop_cache, draft_generator

GREEDY = Sampling()


def test_crop_cache_keeps_the_first_tokens():
    model = tiny_llama(1)
    cache = DynamicCache()
    with torch.inference_mode():
        model(input_ids=torch.arange(10)[None], cache=cache, use_cache=True)
    keys = cache.layers[0].keys.clone()
    crop_cache(cache, 6)
    assert cache.get_seq_length() == 6
    assert torch.equal(cache.layers[0].keys, keys[:, :, :6])
    crop_cache(cache, 8)  # never grows
    assert cache.get_seq_length() == 6


def test_rolled_back_drafts_equal_fresh_drafts():
    for model in (tiny_llama(2, layers=1, hidden=32), tiny_gpt2(3)):
        drafter = ModelDrafter(model)
        state = drafter.new_state()
        committed = [5, 9, 13, 2]
        gen = draft_generator(0)
        for accepted, correction in [(1, 7), (0, 3), (4, 11), (2, 1)]:
            draft = drafter.propose(state, committed, 4, GREEDY, gen)
            fresh = drafter.propose(drafter.new_state(), committed, 4, GREEDY, gen)
            assert draft.tokens == fresh.tokens
            drafter.commit(state, len(committed), accepted)
            committed = committed + draft.tokens[:accepted] + [correction]
            assert state.cache.get_seq_length() == state.cached <= len(committed)


def test_model_drafter_sends_its_top_k_distribution_when_sampling():
    drafter = ModelDrafter(tiny_llama(2, layers=1, hidden=32), top_k=5)
    draft = drafter.propose(drafter.new_state(), [1, 2, 3], 3, Sampling(0.8, 1.0, 7), draft_generator(7))
    assert len(draft.tokens) == len(draft.q_ids) == len(draft.q_probs) == 3
    for token, ids, probs in zip(draft.tokens, draft.q_ids, draft.q_probs):
        assert len(ids) == 5 and token in ids and abs(sum(probs) - 1) < 1e-5


def test_low_confidence_stops_the_draft_early():
    drafter = ModelDrafter(tiny_llama(2, layers=1, hidden=32), min_confidence=0.99)
    assert drafter.propose(drafter.new_state(), [1, 2, 3], 4, GREEDY, draft_generator(0)).tokens == []


def test_ngram_proposes_what_followed_the_latest_match():
    ngram = NgramDrafter(ngram_max=3)
    history = [1, 2, 3, 4, 9, 9, 1, 2, 3, 5, 6, 1, 2, 3]
    assert ngram.propose(None, history, 3, GREEDY, None).tokens == [5, 6, 1]
    assert ngram.propose(None, [1, 2, 3], 3, GREEDY, None).tokens == []
    assert ngram.propose(None, [7, 7], 4, GREEDY, None).tokens == [7]
    assert ngram.propose(None, history, 0, GREEDY, None).tokens == []


def test_a_classes_tree_shape_comes_from_its_config(tiny_models):
    """``drafters.NAME.tree_nodes``, ``tree_depth`` and ``tree_branch`` reach the drafter (0: γ
    levels, branch DEFAULT_TREE_BRANCH), and its trees keep to them."""
    from pipeline.config import DrafterConfig
    from workers.drafts import build_drafter
    from workers.token_tree import DEFAULT_TREE_BRANCH, tree_depths

    target = str(tiny_models["target"])
    plain = build_drafter(DrafterConfig(model=str(tiny_models["small"]), gamma=3, tree_nodes=8), target)
    assert (plain.tree_nodes, plain.tree_depth, plain.tree_branch) == (8, 3, DEFAULT_TREE_BRANCH)
    # every node of a 5-level tree at branch 2 (2 + 4 * 4 = 18): five levels, two tokens at the root
    deep = build_drafter(DrafterConfig(model=str(tiny_models["small"]), gamma=3, tree_nodes=18, tree_depth=5,
                                       tree_branch=2), target)
    draft = deep.propose(deep.new_state(), [5, 9, 13, 2, 7], 3, GREEDY, draft_generator(0), tree=True)
    depths = tree_depths(draft.parents)
    assert len(draft.tokens) == 18 and max(depths) == 5 and draft.parents.count(-1) == 2
    assert all(depths.count(d) == 4 for d in range(2, 6))


def test_a_model_drafters_tree_follows_its_chains_and_leaves_the_cache_as_it_was():
    """Every node of a drafted token tree is one of the ``tree_branch`` likeliest tokens the model
    gives after the node's path as a plain sequence (a fresh forward, no cache), so the tree's
    mask and positions are right; the tree is at most ``tree_depth`` levels deep (γ when 0); the
    cache ends at the committed context, and the rounds after a tree draft as a fresh drafter would."""
    from workers.token_tree import accepted_along

    shapes = ((tiny_llama(2, layers=2, hidden=32), 0, 2), (tiny_gpt2(3), 0, 2), (tiny_llama(2, layers=2, hidden=32), 6, 3))
    for model, depth, branch in shapes:
        drafter = ModelDrafter(model, tree_nodes=10, gamma=4, tree_depth=depth, tree_branch=branch)
        state = drafter.new_state()
        committed = [5, 9, 13, 2, 7, 7, 1]
        for _ in range(3):
            draft = drafter.propose(state, committed, 4, GREEDY, draft_generator(0), tree=True)
            assert 4 < len(draft.tokens) <= 10 and 2 <= draft.depth <= (depth or 4) and draft.parents[0] == -1
            assert sum(p == -1 for p in draft.parents) <= branch
            assert state.cache.get_seq_length() == state.cached == len(committed)
            for i, token in enumerate(draft.tokens):
                path, at = [], draft.parents[i]
                while at >= 0:
                    path.insert(0, draft.tokens[at])
                    at = draft.parents[at]
                with torch.inference_mode():
                    logits = model(input_ids=torch.tensor([committed + path])).logits[0, -1]
                assert token in logits.topk(branch).indices.tolist(), (i, path, token)
            # the target follows the path to the tree's last node, then adds a token of its own
            accepted = accepted_along(draft.tokens, draft.parents, path + [token])
            assert accepted == len(path) + 1
            drafter.commit(state, len(committed), accepted)
            committed = committed + path + [token, 3]
            chain = drafter.propose(state, committed, 3, GREEDY, draft_generator(0))
            assert chain.tokens == drafter.propose(drafter.new_state(), committed, 3, GREEDY, draft_generator(0)).tokens
            drafter.commit(state, len(committed), 0)
            committed = committed + [4]  # the target rejects the chain's first token
