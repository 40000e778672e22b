"""The feature-conditioned drafter (`kind = "feature"`): the verifier returns the target's hidden
states with each verdict, a small head drafts from them, and SLED stays lossless.

The head here is random (seeded) over the tiny target: these tests are about the wire, the
bookkeeping and losslessness, not about acceptance (training/feature_eval.py measures that)."""

import asyncio
import dataclasses
import random

import numpy as np
import pytest
import torch
import zmq
import zmq.asyncio

from pipeline.client import DrafterClient, broker_stats
from pipeline.models import load_causal_lm
from pipeline.protocol import DRAFTER_UPSTREAM_ACCEPTS, Propose, Verdict
from pipeline.reference import greedy_reference
from pipeline.sockets import make_socket
from tests.conftest import TINY_VOCAB, make_stack
from workers.datastore import build_datastore
from workers.drafts import context_key
from workers.feature_head import build_head, save_head, spec_for


@pytest.fixture(scope="module")
def feature_head_dir(tiny_models, tmp_path_factory):
    """A seeded random head over the tiny target, saved like the committed one (int8), with a
    draft vocabulary smaller than the target's so the id mapping is exercised."""
    torch.manual_seed(5)
    target = load_causal_lm(str(tiny_models["target"]))
    head = build_head(target, dataclasses.replace(spec_for(target), layers=2),  # a stack: the general case of the cache
                      torch.arange(0, TINY_VOCAB, 1)[: TINY_VOCAB - 40])
    with torch.no_grad():  # sharpen it so that drafts pass min_confidence = 0 with some agreement
        head.fc.weight.mul_(1.5)
    folder = tmp_path_factory.mktemp("feature-head")
    save_head(head, folder, {"target": str(tiny_models["target"])})
    return folder


def prompts(n, seed):
    rng = random.Random(seed)
    return [[rng.randrange(TINY_VOCAB) for _ in range(rng.randint(2, 16))] for _ in range(n)]


async def generate_all(stack, batch, new_tokens, **kwargs):
    names = stack.drafters
    clients = {n: DrafterClient(stack.config.drafter(n).client) for n in names}
    try:
        return await asyncio.gather(*[
            clients[names[i % len(names)]].complete(p, new_tokens, timeout=60, **kwargs) for i, p in enumerate(batch)
        ])
    finally:
        for c in clients.values():
            c.close()


async def test_features_on_the_wire_equal_the_target_hidden_states(tmp_path, tiny_models):
    """A raw drafter peer asks for two layers; the verdicts' bytes are the target's own
    output_hidden_states at every committed position, prefill and rounds alike."""
    stack = make_stack(tmp_path, tiny_models["target"], {})
    target = load_causal_lm(str(tiny_models["target"]))
    layers = [1, -1]
    history = [5, 17, 99, 3, 42, 7]
    ctx = zmq.asyncio.Context()
    peer = make_socket(ctx, zmq.DEALER, connect=stack.config.broker.frontend, max_message_bytes=1 << 20)
    received: dict[int, np.ndarray] = {}
    try:
        async with stack:
            committed, round_ = list(history), 0
            for draft in ([], [11, 12], [13]):
                item = Propose("wire", round_, len(committed), draft, history=list(committed) if round_ == 0 else None,
                               feature_layers=layers)
                await peer.send(item.encode())
                async with asyncio.timeout(10):
                    while True:
                        reply = DRAFTER_UPSTREAM_ACCEPTS.decode(await peer.recv())
                        if isinstance(reply, Verdict):
                            break
                rows = np.frombuffer(reply.features, dtype=np.float16).reshape(-1, 2 * target.config.hidden_size)
                for i, row in enumerate(rows):
                    received[reply.features_start + i] = row
                committed += [*draft[: reply.accepted], reply.token]
                round_ += 1
    finally:
        peer.close(0)
        ctx.term()
    # every committed position but the last has its feature, each exactly once
    assert sorted(received) == list(range(len(committed) - 1))
    with torch.no_grad():
        hidden = target(input_ids=torch.tensor([committed]), output_hidden_states=True).hidden_states
    expected = torch.cat([hidden[i][0] for i in layers], -1)
    got = torch.tensor(np.stack([received[p] for p in sorted(received)])).float()
    assert torch.allclose(got, expected[: len(committed) - 1], atol=2e-3, rtol=2e-3)


def feature_drafters(tiny_models, feature_head_dir, **feat):
    return {"feat": {"kind": "feature", "model": str(feature_head_dir), "gamma": 3, **feat},
            "small": {"kind": "model", "model": str(tiny_models["small"]), "gamma": 3}}


# the tree case on the fixed policy: every greedy round drafts the tree, whatever a loaded machine
# makes the adaptive policy think of its rows (it once chose chains only for one drafter)
@pytest.mark.parametrize("tree", [{}, {"tree_nodes": 6, "lookup_min_match": 1, "adaptive": False}],
                         ids=["chain", "tree+lookup"])
async def test_feature_drafter_is_token_identical_to_the_target_alone(tmp_path, tiny_models, feature_head_dir, tree):
    """With trees, a model drafter drafts them too: a twin of the target (its first path is always
    the target's) and the small model (mostly rejected, often off its first path), whose trees get
    a datastore's branch (built from the target's own continuations of the prompts, so the branch
    is often right where the small model is not)."""
    batch = prompts(6, 3)
    target = load_causal_lm(str(tiny_models["target"]))
    expected = [greedy_reference(target, p, 40) for p in batch]
    drafters = feature_drafters(tiny_models, feature_head_dir, **tree)
    if tree:
        build_datastore([(p + e, len(p)) for p, e in zip(batch, expected)], vocab_size=TINY_VOCAB,
                        max_order=3).save(tmp_path / "ds")
        drafters["small"].update(tree, datastore=str(tmp_path / "ds"))
        drafters["twin"] = {"kind": "model", "model": str(tiny_models["copy"]), "gamma": 3, **tree}
    stack = make_stack(tmp_path, tiny_models["target"], drafters)
    async with stack:
        results = await generate_all(stack, batch, 40)
    assert [r.tokens for r in results] == expected
    feat = [r.stats for r in results if r.stats["drafter"] == "feat"]
    assert sum(s["proposed"] for s in feat) > 0, "the feature head never drafted"
    assert all(s["wire_bytes"] > 0 for s in feat)
    if tree:
        for name in drafters:
            stats = [r.stats for r in results if r.stats["drafter"] == name]
            assert sum(s["tree_rounds"] for s in stats) > 0, name
        for name in ("twin", "small"):  # small: along the datastore's branch
            stats = [r.stats for r in results if r.stats["drafter"] == name]
            assert sum(s["accepted"] for s in stats) > sum(s["rounds"] for s in stats), f"{name}'s trees were not accepted"


async def test_a_feature_drafter_drafting_ahead_is_token_identical_to_the_target_alone(tmp_path, tiny_models,
                                                                                       feature_head_dir):
    """``proactive``: while a proposal is out the head drafts the next round on its own predicted
    features of the assumed tokens; a confirmed draft leaves at once, and the verdict's true
    features are kept either way (the next rounds' drafts stand on them)."""
    batch = prompts(6, 4)
    drafters = {"feat": {"kind": "feature", "model": str(feature_head_dir), "gamma": 1, "proactive": True,
                         "adaptive": False}}  # fixed γ: every round drafts, so every round can be confirmed ahead
    stack = make_stack(tmp_path, tiny_models["target"], drafters)
    async with stack:
        results = await generate_all(stack, batch, 40)
        client = DrafterClient(stack.config.drafter("feat").client)
        try:
            figures = await client.stats()
        finally:
            client.close()
    target = load_causal_lm(str(tiny_models["target"]))
    assert [r.tokens for r in results] == [greedy_reference(target, p, 40) for p in batch]
    assert figures["proactive_hits"] > 0 and figures["proactive_misses"] > 0, figures  # both paths taken
    assert sum(r.stats["accepted"] for r in results) > 0


def test_a_trees_branches_are_the_heads_likeliest_tokens_along_their_paths():
    """The committed head on the real target, drafting the default fleet's tree (16 tokens, 6
    levels, branch 3): every node of a drafted tree is one of the ``tree_branch`` likeliest tokens
    the head gives as a chain along the node's path (drafted one token at a time through its
    cache), so the tree's attention mask and positions are the chain's; and the head's cache holds
    only the true entries afterwards."""
    from pipeline.models import load_tokenizer
    from pipeline.protocol import Sampling
    from pipeline.sample_prompts import chat_prompt_ids
    from workers.drafts import draft_generator
    from workers.feature_drafter import FeatureDrafter
    from workers.token_tree import DEFAULT_TREE_BRANCH, DEFAULT_TREE_DEPTH, DEFAULT_TREE_NODES
    from workers.feature_head import HeadCache, load_head

    torch.set_num_threads(1)
    target = load_causal_lm("smollm2")
    head = load_head(target)
    drafter = FeatureDrafter(head, tree_nodes=DEFAULT_TREE_NODES, tree_depth=DEFAULT_TREE_DEPTH)
    assert drafter.tree_branch == DEFAULT_TREE_BRANCH == 3
    ids = chat_prompt_ids(load_tokenizer("smollm2"), "What is a river?")
    with torch.no_grad():
        feats = target(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, :-1]
    state = drafter.new_state()
    drafter.take_features(state, Verdict("s", 0, 0, 0, features=feats.half().numpy().tobytes(), features_start=0))
    draft = drafter.propose(state, ids, 4, Sampling(), draft_generator(0), tree=True)
    assert 8 < len(draft.tokens) <= 16 and 3 <= draft.depth <= DEFAULT_TREE_DEPTH and draft.parents[0] == -1
    assert state.cache.length == len(ids) - 1
    for i, token in enumerate(draft.tokens):
        path = []
        at = draft.parents[i]
        while at >= 0:
            path.insert(0, draft.tokens[at])
            at = draft.parents[at]
        cache = HeadCache(state.cache.kv)
        predicted = state.predicted
        with torch.no_grad():
            for depth, previous in enumerate(path, 1):
                predicted = head.extend(cache, head.entry(predicted[:, -1:], torch.tensor([[previous]])),
                                        len(ids) - 2 + depth)
            likeliest = head.vocab_ids[head.logits(predicted[0, -1]).topk(drafter.tree_branch).indices].tolist()
        assert token in likeliest, (i, path, token, likeliest)


def test_a_draft_made_ahead_chains_on_predicted_features_as_one_long_draft_would():
    """Drafting ahead (greedy) on a context that assumes the head's own draft and guess: the same
    tokens as the tail of one long chain from the true features, and the cache keeps only the
    true entries, so the verdict's features go in where they belong."""
    from pipeline.protocol import Sampling
    from workers.drafts import draft_generator
    from workers.feature_drafter import FeatureDrafter
    from workers.feature_head import load_head

    target = load_causal_lm("smollm2")
    drafter = FeatureDrafter(load_head(target))
    ids = [1, 9690, 198, 2683, 314, 253, 6520, 47, 2, 198, 1, 520, 9531, 198]  # a chat prompt's ids
    with torch.no_grad():
        feats = target(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, :-1]
    state = drafter.new_state()
    drafter.take_features(state, Verdict("s", 0, 0, 0, features=feats.half().numpy().tobytes(), features_start=0))
    greedy = Sampling()
    long = drafter.propose(state, ids, 7, greedy, draft_generator(0)).tokens
    assert len(long) == 7 and state.cache.length == len(ids) - 1
    ahead = drafter.propose(state, ids + long[:3], 4, greedy, draft_generator(0)).tokens  # 2 drafted + the guess
    assert ahead == long[3:] and state.cache.length == len(ids) - 1
    # the verdict accepts 2 and brings their features (and the fed token's): the next draft stands on them
    with torch.no_grad():
        truth = target(input_ids=torch.tensor([ids + long[:3]]), output_hidden_states=True).hidden_states[-1][0, :-1]
    drafter.take_features(state, Verdict("s", 1, 2, long[2], features=truth[len(ids) - 1:].half().numpy().tobytes(),
                                               features_start=len(ids) - 1))
    after = drafter.propose(state, ids + long[:3], 4, greedy, draft_generator(0)).tokens
    assert state.cache.length == len(ids) + 2
    fresh = FeatureDrafter(drafter.head)
    fresh_state = fresh.new_state()
    fresh.take_features(fresh_state, Verdict("s", 0, 0, 0, features=truth.half().numpy().tobytes(), features_start=0))
    assert after == fresh.propose(fresh_state, ids + long[:3], 4, greedy, draft_generator(0)).tokens


async def test_a_killed_verifier_mid_generation_with_a_feature_drafter(tmp_path, tiny_models, feature_head_dir):
    """Its sessions resync on the other verifier, which returns the history's features."""
    batch = prompts(6, 4)
    stack = make_stack(tmp_path, tiny_models["target"], {"feat": {"kind": "feature", "model": str(feature_head_dir),
                                                                  "gamma": 3}},
                       verifiers=2, broker__heartbeat_ms=100, broker__liveness=5, broker__max_wait_ms=40.0,
                       limits__verdict_timeout_s=2.0)
    async with stack:
        run = asyncio.create_task(generate_all(stack, batch, 80))
        await asyncio.sleep(1.0)
        assert not run.done(), "generation finished before the fault; slow it down"
        await stack.kill("verifier-1")
        results = await asyncio.wait_for(run, 60)
        figures = await broker_stats(stack.config.broker.frontend)
    target = load_causal_lm(str(tiny_models["target"]))
    assert [r.tokens for r in results] == [greedy_reference(target, p, 80) for p in batch]
    assert figures["verifiers_lost"] == 1
    assert sum(r.stats["proposed"] for r in results) > 0


def test_committed_drafter_weights_fit_the_budget():
    """Ladder, feature head and the n-gram class's datastore together at most 24 MB: a GPU device
    call carries the whole tracked tree (64 MiB) and the wheels it needs must still fit."""
    from training.ladder import LADDER_DIR
    from workers.datastore import DATASTORE_DIR
    from workers.feature_head import FEATURE_DIR

    files = [*LADDER_DIR.glob("*.safetensors"), *FEATURE_DIR.glob("*.safetensors"), *DATASTORE_DIR.glob("*.npz")]
    assert len(files) == 3
    assert sum(f.stat().st_size for f in files) <= 24 * 10**6


def test_committed_feature_head_drafts_what_the_target_would_say():
    """The committed head on the real default target: it loads, and on a chat answer the
    target itself wrote, its first drafts agree with the target far more often than chance."""
    from pipeline.models import load_tokenizer
    from pipeline.sample_prompts import chat_prompt_ids
    from training.feature_eval import evaluate_head
    from workers.feature_head import load_head

    torch.set_num_threads(1)
    target = load_causal_lm("smollm2")
    head = load_head(target)
    assert head.spec.hidden == target.config.hidden_size
    tokenizer = load_tokenizer("smollm2")
    prompt = chat_prompt_ids(tokenizer, "Write two sentences about the moon.")
    ids = prompt + greedy_reference(target, prompt, 24, [tokenizer.eos_token_id])
    with torch.no_grad():
        feats = target(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    stats = evaluate_head(head, [(ids, len(prompt), feats)], gamma=4, kinds=["question"])
    assert stats["alpha"] > 0.2 and stats["tokens_per_round"] > 1.2
    # one sequence: its kind's figures are the whole's
    assert stats["by_kind"]["question"] == {"alpha": stats["alpha"], "tokens_per_round": stats["tokens_per_round"],
                                             "positions": stats["positions"]}


@pytest.mark.parametrize("tree_nodes, backend", [(0, "eager"), (8, "static")])
def test_committed_feature_head_keeps_sled_lossless_on_the_real_target(tree_nodes, backend):
    """Round by round through the real verifier (features on every verdict): token-identical to
    the target alone, with the head's drafts really accepted, as chains and as token trees (with
    the lookup's and the committed datastore's branches, as the default fleet drafts them)."""
    from pipeline.config import LimitsConfig
    from pipeline.models import load_tokenizer
    from pipeline.sample_prompts import chat_prompt_ids
    from pipeline.protocol import Sampling
    from workers.drafts import draft_generator, settle
    from workers.feature_drafter import FeatureDrafter
    from workers.feature_head import load_head
    from workers.datastore import BUILTIN, load_datastore
    from workers.lookup import with_lookup
    from workers.static_verifier import StaticVerifier
    from workers.target import TargetVerifier

    torch.set_num_threads(1)
    target = load_causal_lm("smollm2")
    tokenizer = load_tokenizer("smollm2")
    drafter = FeatureDrafter(load_head(target), tree_nodes=tree_nodes)
    drafter = with_lookup(drafter, min_match=2, datastore=load_datastore(BUILTIN) if tree_nodes else None)
    verifier = (TargetVerifier(target, max_sessions=4, limits=LimitsConfig()) if backend == "eager"
                else StaticVerifier(target, max_sessions=4, limits=LimitsConfig(max_history_tokens=512), kv_cache_mb=64))
    prompt = chat_prompt_ids(tokenizer, "Name three rivers in Europe.")
    stop, new_tokens = tokenizer.eos_token_id, 24
    committed, state, accepted, round_, trees, branched = list(prompt), drafter.new_state(), 0, 0, 0, 0
    while len(committed) - len(prompt) < new_tokens and committed[-1] != stop:
        budget = new_tokens - (len(committed) - len(prompt))
        draft = drafter.propose(state, committed, min(4, budget - 1), Sampling(), draft_generator(0), tree=bool(tree_nodes))
        item = Propose("real", round_, len(committed), draft.tokens, history=list(committed) if round_ == 0 else None,
                       feature_layers=drafter.feature_layers, parents=draft.parents)
        verdict = verifier.verify_batch([item])[0]
        assert not verdict.error, verdict
        settle(drafter, state, len(committed), verdict)
        trees += bool(draft.parents)
        branched += len(draft.tokens) > tree_nodes > 0  # a lookup's or the datastore's branch added rows
        new = [*verdict.accepted_tokens(draft.tokens), verdict.token][:budget]
        if stop in new:
            new = new[: new.index(stop) + 1]
        committed += new
        accepted += verdict.accepted
        round_ += 1
    assert committed[len(prompt):] == greedy_reference(target, prompt, new_tokens, [stop])
    assert accepted > 0
    assert (trees > 0) == (tree_nodes > 0) and (branched > 0) == (tree_nodes > 0)


def test_a_bench_trace_hands_the_head_what_the_verdicts_would(tmp_path, tiny_models, feature_head_dir):
    """bench/traces.py records a feature class without a verifier: each round it hands the head
    the target's features as a verdict would carry them. Every committed position but the last
    gets its feature, exactly once, equal to the target's hidden states there; the replay asks
    the verifier for the same layers."""
    from bench.traces import record_trace
    from workers.drafts import ReplayDrafter
    from workers.feature_drafter import FeatureDrafter
    from workers.feature_head import load_head
    from workers.target import pick_hidden

    target = load_causal_lm(str(tiny_models["target"]))
    strategy = FeatureDrafter(load_head(target, feature_head_dir))
    received: dict[int, np.ndarray] = {}
    take_features = strategy.take_features

    def spy(state, verdict):
        rows = np.frombuffer(verdict.features, dtype=np.float16).reshape(-1, strategy.width)
        for i, row in enumerate(rows):
            assert verdict.features_start + i not in received, "a feature handed twice"
            received[verdict.features_start + i] = row
        take_features(state, verdict)

    strategy.take_features = spy
    prompt = prompts(1, 8)[0]
    reference = greedy_reference(target, prompt, 30)
    path = tmp_path / "feature.msgpack"
    figures = record_trace(strategy, "feature", [prompt], [reference], 3, 30, [], path, target=target)
    committed = prompt + reference[: figures["generated"]]
    assert figures["generated"] == 30 and figures["proposed"] > 0
    assert sorted(received) == list(range(len(committed) - 1))
    with torch.no_grad():
        hidden = target(input_ids=torch.tensor([committed]), output_hidden_states=True).hidden_states
    expected = pick_hidden(hidden, strategy.feature_layers)[0, :-1]
    got = torch.from_numpy(np.stack([received[i] for i in sorted(received)])).float()
    assert torch.allclose(got, expected, atol=2e-3, rtol=2e-3)
    replay = ReplayDrafter(str(path))
    assert replay.kind == "feature" and replay.feature_layers == strategy.feature_layers


def test_a_bench_trace_replays_the_drafts_a_feature_device_makes_ahead(tmp_path, tiny_models, feature_head_dir):
    """A feature class's replay drafts ahead as its device would: on a context m tokens past the
    true features its session's verdicts brought, it proposes what the head drafts there chaining
    over m predicted features, and with every feature in, what it drafts on true ones."""
    from bench.traces import GREEDY, record_trace, target_features
    from workers.drafts import ReplayDrafter, draft_generator
    from workers.feature_drafter import FeatureDrafter
    from workers.feature_head import load_head

    target = load_causal_lm(str(tiny_models["target"]))
    head = load_head(target, feature_head_dir)
    prompt = prompts(1, 9)[0]
    reference = greedy_reference(target, prompt, 30)
    path = tmp_path / "feature.msgpack"
    record_trace(FeatureDrafter(head), "feature", [prompt], [reference], 3, 30, [], path, target=target)
    replay = ReplayDrafter(str(path))
    assert replay.supports_proactive
    features = target_features(target, prompt + reference, replay.feature_layers)
    differ = 0
    for at in (4, 13):  # tokens generated when the last verdict came
        committed = prompt + reference[:at]
        verdict = Verdict("s", 0, 0, 0, features=features[: len(committed) - 1].numpy().tobytes(), features_start=0)
        live, replayed = FeatureDrafter(head), replay.new_state()
        state = live.new_state()
        live.take_features(state, verdict)
        replay.take_features(replayed, verdict)
        on_true = live.propose(state, committed, 3, GREEDY, draft_generator(0)).tokens
        assert replay.propose(replayed, committed, 3, GREEDY, draft_generator(0)).tokens == on_true
        for m in range(1, 5):  # a proposal of m - 1 tokens and the guess are out
            context = committed + reference[at : at + m]
            made = live.propose(state, context, 4, GREEDY, draft_generator(0)).tokens
            assert replay.propose(replayed, context, 4, GREEDY, draft_generator(0)).tokens == made
            assert len(made) == 4
            differ += made != replay.drafts[context_key(context)][0][:3] + made[3:]
    assert replay.misses == 0
    assert differ  # predicted features drafted otherwise somewhere: the two tables are not the same
