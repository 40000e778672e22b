"""Token trees (workers/token_tree.py): a tree's walk, the broker's rules for it, and both
verifier backends verifying random trees in ragged batches, mixed with chains, round after round:
the output must equal the target decoding alone (the right continuation hides at a random branch,
so the accepted path's keys/values must be moved into place for the next rounds to be right),
and the features a tree round returns must equal the target's own hidden states."""

import random

import pytest
import torch

from pipeline.config import LimitsConfig
from pipeline.protocol import Propose
from pipeline.reference import greedy_reference
from pipeline.rules import propose_problem
from tests.conftest import TINY_VOCAB, tiny_llama
from tests.test_static_verifier import static, tiny_qwen2
from tests.test_target import run_rounds
from workers.target import TargetVerifier
from workers.token_tree import tree_depths, tree_inputs, verify_tree_greedy


def test_the_walk_follows_the_targets_argmax_down_the_tree():
    draft, parents = [7, 5, 8, 6, 9], [-1, -1, 0, 1, 3]  # 7 -> 8 ; 5 -> 6 -> 9
    best = [5, 0, 6, 0, 0, 4]  # the target's argmax after the root, then after draft token i at 1 + i
    assert verify_tree_greedy(best, draft, parents) == ([1, 3], 0)  # 5, 6; then the target wants best[1 + 3] = 0
    best = [5, 0, 6, 0, 9, 4]
    assert verify_tree_greedy(best, draft, parents) == ([1, 3, 4], 4)
    assert verify_tree_greedy([1, 0, 0, 0, 0, 0], draft, parents) == ([], 1)
    assert tree_depths(parents) == [1, 1, 2, 2, 3]
    tree = tree_inputs([parents], 1, 7)["tree"][0]
    assert tree[5].tolist() == [True, False, True, False, True, True, False]  # 9 sees root, 5, 6, itself


def test_the_broker_refuses_malformed_or_sampled_trees():
    limits = LimitsConfig()
    assert propose_problem(Propose("s", 1, 3, [1, 2, 3], parents=[-1, -1, 0]), limits) is None
    assert "one entry per draft token" in propose_problem(Propose("s", 1, 3, [1, 2, 3], parents=[-1, 0]), limits)
    assert "earlier draft token" in propose_problem(Propose("s", 1, 3, [1, 2], parents=[-1, 1]), limits)
    assert "earlier draft token" in propose_problem(Propose("s", 1, 3, [1, 2], parents=[-2, 0]), limits)
    assert "greedy" in propose_problem(Propose("s", 1, 3, [1, 2], parents=[-1, -1], temperature=0.7), limits)


def random_tree(rng: random.Random, right: list[int], nodes: int) -> tuple[list[int], list[int]]:
    """A random tree of ``nodes`` tokens in which the first ``len(right)`` of them, chained, sit
    at random places among decoys (wrong tokens, also on branches below the right ones)."""
    tokens, parents, on_path = [], [], -1
    keep = rng.randint(0, len(right))  # how deep the right continuation goes in this tree
    for _ in range(nodes):
        if keep and rng.random() < 0.5:
            tokens.append(right[0])
            parents.append(on_path)
            on_path, right, keep = len(tokens) - 1, right[1:], keep - 1
        else:
            parent = rng.randint(-1, len(tokens) - 1)
            decoy = rng.randrange(TINY_VOCAB)
            tokens.append(decoy)
            parents.append(parent)
    return tokens, parents


BACKENDS = {
    "eager": lambda model: TargetVerifier(model, max_sessions=16, limits=LimitsConfig()),
    "static": lambda model: static(model),
}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@torch.inference_mode()
def test_random_trees_in_ragged_batches_decode_exactly_as_the_target_alone(backend, arch, one_torch_thread):
    model = (tiny_llama if arch == "llama" else tiny_qwen2)(3)
    ver = BACKENDS[backend](model)
    rng = random.Random(7)
    prompts = [[rng.randrange(TINY_VOCAB) for _ in range(rng.randint(1, 30))] for _ in range(5)]
    new_tokens = 30
    refs = [greedy_reference(model, p, new_tokens) for p in prompts]
    tree_paths = 0

    def propose(i, h, done, rounds, first):
        right = refs[i][done : done + 4]
        if i % 2 == 0 or rng.random() < 0.5:  # trees, and chains in the same batches
            draft, parents = random_tree(rng, right, rng.randint(1, 10))
        else:
            draft, parents = right[: rng.randint(0, 4)], []
        return Propose(f"s{i}", rounds, len(h), draft, history=list(h) if first else None, parents=parents,
                       feature_layers=[-1] if i == 0 else [])

    def check(item, verdict, history):
        nonlocal tree_paths
        assert len(verdict.accepted_tokens(item.draft)) == verdict.accepted
        if item.parents:
            tree_paths += any(node + 1 != depth for depth, node in enumerate(verdict.path, 1))
        if item.feature_layers:  # the last committed token's and each accepted token's hidden state
            full = model(input_ids=torch.tensor([history[:-1]]), output_hidden_states=True).hidden_states[-1][0]
            got = torch.frombuffer(bytearray(verdict.features), dtype=torch.float16).view(-1, full.shape[-1])
            assert verdict.features_start + got.shape[0] == len(history) - 1
            assert verdict.features_start <= item.position - 1
            torch.testing.assert_close(got.float(), full[verdict.features_start :].half().float(), atol=2e-3, rtol=1e-2)

    outputs, _ = run_rounds(ver, prompts, new_tokens, propose, check)
    assert outputs == refs
    assert tree_paths >= 5  # accepted paths that were not the tree's first tokens: the cache moves were tested


def test_a_recorded_trace_replays_the_tree_or_the_chain_as_asked(tmp_path):
    import msgpack

    from pipeline.protocol import Sampling
    from workers.drafts import ReplayDrafter, context_key

    tree, parents = [7, 5, 8, 6, 9], [-1, -1, 0, 1, 3]
    path = tmp_path / "trace.msgpack"
    path.write_bytes(msgpack.packb({"kind": "feature", "feature_layers": [-1], "tree_nodes": 5,
                                    "drafts": {context_key([1, 2]): [[7, 8, 1, 2], 0.02, 0, parents, tree, 0.03]}}))
    replay = ReplayDrafter(str(path))
    draft = replay.propose(None, [1, 2], 4, Sampling(), None, tree=True)
    assert (draft.tokens, draft.parents, draft.depth, draft.compute_s) == (tree, parents, 3, 0.03)
    chain = replay.propose(None, [1, 2], 2, Sampling(), None)
    assert (chain.tokens, chain.parents, chain.compute_s) == ([7, 8], [], 0.01)


def test_the_policy_drafts_the_tree_where_rows_are_cheap_and_the_chain_where_they_are_dear():
    """The same acceptance figures on two servers: a GPU-like one (a forward's fixed cost worth
    hundreds of rows) takes the 8-token tree that commits 2.5 tokens a round against the chain's
    1.5, a CPU-like one (a row worth half the fixed cost) the chain; and a chain-only session never
    drafts a tree."""
    from workers.speculation import SpeculationPolicy

    def policy(tree_rows):
        p = SpeculationPolicy(4, tree_rows=tree_rows)
        for _ in range(40):  # a chain committing 1.5 tokens a round, a tree 2.5
            p.observe(4, 0, 1.0, 0.0, 10.0)
            p.observe(4, 1, 1.0, 0.0, 10.0)
            p.observe(8, 1, 1.0, 0.0, 10.0, tree=True)
            p.observe(8, 2, 1.0, 0.0, 10.0, tree=True)
        return p

    gpu = policy(8)
    gpu.observe(4, 1, 0.05, 0.0, 20.0)
    gpu.choose()
    assert gpu.tree
    cpu = policy(8)
    cpu.observe(4, 1, 5.0, 0.0, 10.0)
    cpu.choose()
    assert not cpu.tree
    chains = policy(0)
    chains.observe(4, 1, 0.05, 0.0, 20.0)
    chains.choose()
    assert not chains.tree


def test_held_out_tree_figures_of_a_model_drafter():
    """training/tree_eval.py: a twin of the target always has the target's next token on its
    tree's first level (its likeliest node), so every round accepts at least one token; the rounds
    account for every continuation token; a stranger's trees accept less; both cost their tree's
    tokens in rows."""
    from training.tree_eval import evaluate_model_tree

    target = tiny_llama(1)
    prompts = [[5, 9, 13], [7, 7, 2, 40], [11]]
    sequences = [(p + greedy_reference(target, p, 21), len(p)) for p in prompts]
    twin = evaluate_model_tree(tiny_llama(1), sequences, gamma=4, tree_nodes=8)
    assert twin["first_level_hit_rate"] == 1.0 and twin["draft_tokens_per_round"] == 8.0
    assert twin["mean_accepted_per_round"] >= 1.0
    # a sequence's last round may count the target's token past its end, as the chains' figures do
    assert 3 * 21 - 0.01 <= twin["tokens_per_round"] * twin["rounds"] <= 3 * 22 + 0.01
    stranger = evaluate_model_tree(tiny_llama(2, hidden=32), sequences, gamma=4, tree_nodes=8)
    assert stranger["tokens_per_round"] < twin["tokens_per_round"] and stranger["rounds"] > twin["rounds"]
