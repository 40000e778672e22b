"""`sled eval drafters`: per rung, parameters, draft tokens/s on this CPU and held-out α at γ = 4.

The rungs are the ladder's (kind "model"), the feature-conditioned head (kind "feature",
drafters/feature) and the model-free kind ("ngram": context lookup alone, and "ngram+datastore"
with the datastore of drafters/ngram behind it), measured on the same held-out sequences. Each
model rung and the head is measured alone; as "NAME+lookup", with context lookup in front of it
(workers/lookup.py, ``lookup_min_match`` = DEFAULT_MIN_MATCH), which drafts where the context
repeats and leaves the rest to the model; and as "NAME+lookup+datastore", with the n-gram class's
datastore behind it too, drafting where the model is unsure (workers/lookup.py ``stand_in``). A
lookup rung's draft speed is its model's: lookup costs no model step, so it is a lower bound.
The feature head is measured a fourth way, and with ``model_trees`` (`--trees`) the ladder's
rungs too: drafting token trees ("NAME+tree", "NAME+lookup+tree" with the repeat's continuation
as one more branch, and "NAME+lookup+datastore+tree" with the datastore's continuation as
another) by the device's own code: tokens per round, and the tree's draft tokens per round, each
a verify row (training/tree_eval.py). A rung's trees take a few minutes of this CPU, its model
runs once per tree level and round, hence opt-in.

Draft speeds are timed on the weights a device drafts with: its linear layers reordered once for
oneDNN (``drafters.NAME.prepack``, default true; workers/packed_linear.py): on this CPU the
``pi5`` rung's chain drafts 49.4 tokens/s packed against 42.6 dense, and a tree's levels (several
rows a step) gain more. α and tokens per round are measured on
the weights as loaded, before packing, so that they compare with the earlier rounds' figures; a
tree rung's draft speed comes from the same run as its α, so trees are measured packed whole.

Every chain rung's α and tokens per round are also given per prompt kind (``by_kind``: templated
questions, requests to continue a passage, raw prose; training/distill_prompts.py
``prompt_kinds``): the held-out set is half questions, and questions are where drafters are
weakest."""

from __future__ import annotations

import platform
import statistics
import time

import torch
from transformers import DynamicCache

from pipeline.protocol import Sampling
from training.distill_prompts import prompt_kinds
from training.heldout_alpha import KindTally, acceptance, accepted_lengths, heldout_sequences
from training.ladder import RUNGS, load_rung
from workers.datastore import BUILTIN, load_datastore
from workers.drafts import NgramDrafter
from workers.lookup import DEFAULT_MIN_MATCH as LOOKUP_MIN_MATCH
from workers.packed_linear import prepack_linears
from workers.token_tree import TreeShape


@torch.no_grad()
def draft_tokens_per_s(model, prompts: list[list[int]], new_tokens: int = 32) -> float:
    """Batch-1 greedy drafting through the KV cache (what a drafter worker does per round);
    the prompt's prefill is not timed. Median over prompts."""
    rates = []
    for prompt in prompts:
        cache = DynamicCache()
        step = model(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True)
        token = step.logits[:, -1:].argmax(-1)
        started = time.perf_counter()
        for _ in range(new_tokens):
            step = model(input_ids=token, cache=step.past_key_values, use_cache=True)
            token = step.logits[:, -1:].argmax(-1)
        rates.append(new_tokens / (time.perf_counter() - started))
    return statistics.median(rates)


def evaluate_ladder(target_spec: str = "smollm2", rungs: list[str] | None = None, gamma: int = 4,
                    speed_prompts: int = 3, feature_dir=None, ladder_dir=None, model_trees: bool = False,
                    datastore_dir=None, validation=None, tree: TreeShape | None = None) -> dict:
    """``validation``: a folder of distillation shards no drafter has read, measured instead of
    the held-out prompts (training/feature_eval.py ``shard_heldout``). ``tree``: the token trees'
    shape (default: the default fleet's, workers/token_tree.py)."""
    from pipeline.models import load_causal_lm, load_tokenizer
    from training.feature_eval import heldout_features, shard_heldout

    target = load_causal_lm(target_spec)

    def with_features(layers) -> list[tuple]:
        if validation is not None:
            return shard_heldout(validation, tuple(layers))
        return heldout_features(target_spec, model=target, feature_layers=tuple(layers))

    if validation is not None:
        sequences = [(ids, n) for ids, n, _ in with_features((-1,))]
    else:
        sequences = heldout_sequences(target_spec, model=target)
    prompts = [ids[:n] for ids, n in sequences[:: max(1, len(sequences) // speed_prompts)][:speed_prompts]]
    # questions are where the drafters are weakest: each rung's figures per prompt kind too
    kinds = prompt_kinds(load_tokenizer(target_spec), [ids[:n] for ids, n in sequences])
    embed_params = target.get_input_embeddings().weight.numel()
    report = {
        "target": target_spec, "gamma": gamma, "greedy": True,
        "heldout": {"sequences": len(sequences), "positions": sum(len(i) - n for i, n in sequences),
                    "sequences_by_kind": {k: kinds.count(k) for k in sorted(set(kinds))},
                    **({"validation": str(validation)} if validation is not None else {})},
        "cpu": {"machine": platform.machine(), "threads": torch.get_num_threads()},
        "target_tokens_per_s": round(draft_tokens_per_s(target, prompts), 1),
        "target_params": sum(p.numel() for p in target.parameters()),
        "rungs": [],
    }
    tree = tree or TreeShape()
    names = rungs if rungs is not None else [*RUNGS, "feature", "ngram"]
    store = load_datastore(datastore_dir or BUILTIN)
    bases = [n for n in names if "+" not in n and n != "ngram"]
    for name in [*names, *(f"{n}+lookup" for n in bases), *(f"{n}+lookup+datastore" for n in bases)]:
        if name.endswith("+tree"):
            continue
        if name == "ngram":  # context lookup alone, then with the datastore behind it
            report["rungs"] += [_ngram_rung(sequences, gamma, None, kinds), _ngram_rung(sequences, gamma, store, kinds)]
            continue
        base, lookup = name.split("+")[0], LOOKUP_MIN_MATCH if "+lookup" in name else 0
        datastore = store if name.endswith("+datastore") else None
        if base == "feature":
            rung = _feature_rung(target, with_features, gamma, feature_dir, lookup, datastore, kinds)
        else:
            rung = _model_rung(target, target_spec, base, sequences, prompts, gamma, ladder_dir, lookup, datastore,
                               kinds)
            rung["params_without_embeddings"] = rung["params"] - embed_params
        if lookup:
            rung.update(name=name, lookup_min_match=lookup)
        report["rungs"].append(rung)
    for base in dict.fromkeys(n.split("+")[0] for n in names):
        if base != "feature" and not model_trees:
            continue
        for lookup, datastore in ((0, None), (LOOKUP_MIN_MATCH, None), (LOOKUP_MIN_MATCH, store)):
            if base == "feature":
                rung = _tree_rung(target, with_features, gamma, tree, feature_dir, lookup, datastore)
            else:
                rung = _model_tree_rung(target, target_spec, base, sequences, gamma, tree, ladder_dir, lookup, datastore)
            report["rungs"].append(rung)
    return report


def _tree_name(base: str, lookup: int, datastore) -> str:
    return "+".join([base, *(["lookup"] if lookup else []), *(["datastore"] if datastore is not None else []), "tree"])


def _shape(tree: TreeShape) -> dict:
    return {"tree_nodes": tree.nodes, "tree_depth": tree.depth, "tree_branch": tree.branch}


def _model_tree_rung(target, target_spec: str, name: str, sequences, gamma: int, tree: TreeShape, ladder_dir,
                     lookup: int, datastore=None) -> dict:
    """A ladder rung drafting token trees through its KV cache."""
    from training.tree_eval import evaluate_model_tree

    model = load_rung(name, target_spec, target=target, **({"folder": ladder_dir} if ladder_dir else {}))
    params = sum(p.numel() for p in model.parameters())  # before packing, which drops dense weights
    prepack_linears(model)  # as the device drafts; α and speed come from this one run
    stats = evaluate_model_tree(model, sequences, gamma, tree.nodes, lookup_min_match=lookup, tree_depth=tree.depth,
                                tree_branch=tree.branch, datastore=datastore)
    return {
        "name": _tree_name(name, lookup, datastore), "kind": "model",
        "layers": model.config.num_hidden_layers, "params": params,
        **_shape(tree), "alpha": stats["first_level_hit_rate"], **stats,
        "draft_tokens_per_s": round(1000 * stats["draft_tokens_per_round"] / max(1e-9, stats["draft_ms_per_round"]), 1),
        **({"lookup_min_match": lookup} if lookup else {}),
    }


def _tree_rung(target, with_features, gamma: int, tree: TreeShape, folder=None, lookup: int = 0,
               datastore=None) -> dict:
    """The feature head drafting token trees (workers/token_tree.py): tokens per round, and what
    the tree costs: its tokens are verify rows."""
    from training.feature_eval import evaluate_tree
    from workers.feature_head import FEATURE_DIR, load_head

    head = load_head(target, folder or FEATURE_DIR)
    params = sum(p.numel() for p in head.parameters())  # before packing, which drops dense weights
    head.prepack()  # as the device drafts; α and speed come from this one run
    heldout = with_features(head.spec.feature_layers)
    stats = evaluate_tree(head, heldout, gamma, tree.nodes, lookup_min_match=lookup, tree_depth=tree.depth,
                          tree_branch=tree.branch, datastore=datastore)
    return {
        "name": _tree_name("feature", lookup, datastore), "kind": "feature", "layers": head.spec.layers,
        "params": params, **_shape(tree),
        # α of a tree: how often its first level holds the target's next token, per round
        "alpha": stats["first_level_hit_rate"], **stats,
        "draft_tokens_per_s": round(1000 * stats["draft_tokens_per_round"] / max(1e-9, stats["draft_ms_per_round"]), 1),
        **({"lookup_min_match": lookup} if lookup else {}),
    }


def _model_rung(target, target_spec: str, name: str, sequences, prompts, gamma: int, ladder_dir, lookup: int,
                datastore=None, kinds=None) -> dict:
    model = load_rung(name, target_spec, target=target, **({"folder": ladder_dir} if ladder_dir else {}))

    stats = acceptance(lambda ids: model(input_ids=ids).logits, sequences, gamma, lookup_min_match=lookup,
                       datastore=datastore, kinds=kinds)
    params = sum(p.numel() for p in model.parameters())  # before packing, which drops dense weights
    packed = prepack_linears(model) > 0  # after α: speed as the device drafts
    return {
        "name": name, "kind": "model", "layers": model.config.num_hidden_layers, "params": params,
        "alpha": round(stats["alpha"], 4), "mean_accepted_per_round": round(stats["mean_accepted"], 3),
        "tokens_per_round": round(stats["mean_accepted"] + 1, 3),
        "draft_tokens_per_s": round(draft_tokens_per_s(model, prompts), 1), "draft_weights_packed": packed,
        **({"by_kind": stats["by_kind"]} if kinds is not None else {}),
    }


def _ngram_rung(sequences, gamma: int, store, kinds=None) -> dict:
    """The model-free kind as the device drafts (NgramDrafter.propose): context lookup alone
    (``ngram``, the repeat from one token up), or with a datastore behind it (``ngram+datastore``,
    repeats from LOOKUP_MIN_MATCH tokens up). α is the first draft token's agreement at every
    position (no draft: a miss); draft speed is proposals' tokens per second of this CPU. ``store``:
    the loaded datastore, or None; ``kinds``: each sequence's prompt kind, for ``by_kind``."""
    drafter = NgramDrafter(datastore=store, min_match=LOOKUP_MIN_MATCH if store is not None else 1)
    greedy = Sampling(0.0, 1.0, 0)
    first, positions, rounds, drafted, spent = 0, 0, [], 0, 0.0
    tally = KindTally()
    for index, (ids, prompt_len) in enumerate(sequences):
        cache: dict[int, list[bool]] = {}

        def agreement(pos: int) -> list[bool]:
            nonlocal drafted, spent
            if pos not in cache:
                started = time.perf_counter()
                tokens = drafter.propose(None, ids[:prompt_len + pos], gamma, greedy, None).tokens
                spent += time.perf_counter() - started
                drafted += len(tokens)
                cache[pos] = [a == b for a, b in zip(tokens, ids[prompt_len + pos:])] or [False]
            return cache[pos]

        hits = sum(agreement(pos)[0] for pos in range(len(ids) - prompt_len))
        runs = accepted_lengths([False] * (len(ids) - prompt_len), gamma, agreement)
        first += hits
        positions += len(ids) - prompt_len
        rounds += runs
        if kinds is not None:
            tally.add(kinds[index], hits, len(ids) - prompt_len, runs)
    mean = sum(rounds) / max(1, len(rounds))
    return {
        "name": "ngram+datastore" if store is not None else "ngram", "kind": "ngram", "layers": 0, "params": 0,
        **({"datastore_entries": store.meta["entries"], "datastore_generated_tokens": store.meta["generated_tokens"],
            "lookup_min_match": LOOKUP_MIN_MATCH} if store is not None else {}),
        "alpha": round(first / max(1, positions), 4), "mean_accepted_per_round": round(mean, 3),
        "tokens_per_round": round(mean + 1, 3), "draft_tokens_per_s": round(drafted / max(spent, 1e-9), 1),
        **({"by_kind": tally.report()} if kinds is not None else {}),
    }


def _feature_rung(target, with_features, gamma: int, folder=None, lookup: int = 0, datastore=None,
                  kinds=None) -> dict:
    """The feature head as a rung: its stored (trained) parameters, α of its first draft,
    chained acceptance per draft position, tokens per round and draft speed."""
    from training.feature_eval import evaluate_head, head_draft_tokens_per_s
    from workers.feature_head import FEATURE_DIR, load_head

    head = load_head(target, folder or FEATURE_DIR)
    heldout = with_features(head.spec.feature_layers)
    stats = evaluate_head(head, heldout, gamma, lookup_min_match=lookup, datastore=datastore, kinds=kinds)
    params = sum(p.numel() for p in head.parameters())  # before packing, which drops dense weights
    head.prepack()  # after α: speed as the device drafts
    return {
        "name": "feature", "kind": "feature", "layers": head.spec.layers, "params": params,
        "draft_vocab": int(head.vocab_ids.numel()),
        "alpha": stats["alpha"], "alpha_by_position": stats["alpha_by_position"],
        "mean_accepted_per_round": stats["mean_accepted_per_round"],
        "tokens_per_round": stats["tokens_per_round"],
        "draft_tokens_per_s": round(head_draft_tokens_per_s(head, heldout), 1),
        **({"lookup_rounds_fraction": stats["lookup_rounds_fraction"]} if lookup else {}),
        **({"by_kind": stats["by_kind"]} if kinds is not None else {}),
    }
