"""Held-out figures of the feature head, measured like the ladder's (training/heldout_alpha.py).

The held-out sequences are the same (the target's greedy continuations of the held-out
prompts). A round starts at position p with tokens 0..p-1 committed and the target's features
known for positions 0..p-2 (what a verdict has delivered); the head drafts up to γ tokens
chained on its own predicted features, the run agreeing with the target's tokens is accepted,
the target supplies one more, and the next round starts after it. That is exactly what the
device does in SLED, apart from a session's first round, which drafts nothing because no
feature has arrived yet.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from pathlib import Path

import torch

from pipeline.protocol import Sampling
from training.heldout_alpha import KindTally, heldout_sequences, lookup_agreement, stand_in_agreement
from workers.feature_head import FeatureHead, HeadCache

GREEDY = Sampling()


def heldout_features(target: str = "smollm2", *, model=None, feature_layers=(-1,)) -> list[tuple]:
    """(ids, prompt_len, features [T, width]) per held-out sequence, cached on disk."""
    from pipeline.models import cache_root, load_causal_lm

    model = model or load_causal_lm(target)
    sequences = heldout_sequences(target, model=model)
    key = hashlib.sha256(json.dumps([target, list(feature_layers), sequences]).encode()).hexdigest()[:16]
    path = cache_root() / "heldout" / f"features-{key}.pt"
    if path.is_file():
        return torch.load(path)
    out = []
    with torch.no_grad():
        for ids, n in sequences:
            hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            feats = torch.cat([hs[i][0] for i in feature_layers], -1).to(torch.float16)
            out.append((ids, n, feats))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def shard_heldout(folder: Path, feature_layers=(-1,), sequences: int = 160, new_tokens: int = 64,
                  every: int = 4, max_shards: int = 16) -> list[tuple]:
    """A validation set in the held-out set's shape, (ids, prompt_len, features [T, width]), from
    distillation shards no drafter has read (`sled eval drafters --validation DIR`): every
    ``every``-th record with at least 8 continuation tokens in the first ``max_shards`` shards, cut
    to ``new_tokens`` continuation tokens like the held-out sequences, at most ``sequences``. The
    48 held-out prompts give 3,039 positions, too few to tell apart rounds 0.02 tokens per round
    apart; the default here gives about 10,000 (160 sequences)."""
    records = []
    for path in sorted(Path(folder).glob("shard_*.pt"))[:max_shards]:
        for record in torch.load(path):
            ids, prompt_len = record["ids"].tolist(), int(record["prompt_len"])
            if len(ids) <= prompt_len + 8:
                continue
            stored = list(record["feature_layers"])
            missing = [layer for layer in feature_layers if layer not in stored]
            if missing:
                raise ValueError(f"{path} holds features of layers {stored}, not {missing}")
            cut = min(len(ids), prompt_len + new_tokens)
            feats = record["features"][:cut, [stored.index(layer) for layer in feature_layers], :]
            records.append((ids[:cut], prompt_len, feats.reshape(cut, -1)))
    return records[::every][:sequences]


@torch.no_grad()
def evaluate_head(head: FeatureHead, heldout: list[tuple], gamma: int = 4, lookup_min_match: int = 0,
                  datastore=None, kinds: list[str] | None = None) -> dict:
    """α (first draft, teacher-forced on true features: comparable with the ladder's α), the
    acceptance rate of every chained draft position, and mean tokens per round at γ. With
    ``lookup_min_match``, rounds (and α's first drafts) come from context lookup wherever it
    finds a match, as a LookupDrafter drafts, and with a ``datastore`` from it where it stands in
    for the head (workers/lookup.py ``stand_in``); the per-position rates stay the head's own.
    ``kinds``: each sequence's prompt kind, for ``by_kind``."""
    first_hits = first_total = lookup_rounds = 0
    tally = KindTally()
    rounds: list[int] = []
    position_hits = [0] * gamma
    position_tries = [0] * gamma
    for index, (ids, prompt_len, feats) in enumerate(heldout):
        n = len(ids)
        if n <= prompt_len or prompt_len < 2:
            continue
        before = len(rounds)
        tokens = torch.tensor([ids])
        entries = head.entry(head.fused(feats[None, :-1].float()), tokens[:, 1:])  # entry t: (f_t, x_{t+1})
        positions = torch.arange(n - 1)
        level0, kv = head.decode(entries, positions)  # prediction of f_{t+1}
        confidence, best = torch.softmax(head.logits(level0[0]).float(), -1).max(-1)
        first = head.vocab_ids[best]  # entry t drafts token t+2
        agree = (first[prompt_len - 2 : n - 2] == tokens[0, prompt_len:]).tolist()
        looked_up = {}
        if lookup_min_match or datastore is not None:
            looked_up = {p: lookup_agreement(ids, p, gamma, lookup_min_match) if lookup_min_match else None
                         for p in range(prompt_len, n)}
            if datastore is not None:
                looked_up = {p: d if d is not None else stand_in_agreement(ids, p, gamma, datastore,
                                                                           float(confidence[p - 2]))
                             for p, d in looked_up.items()}
            agree = [a if looked_up[p] is None else looked_up[p][0] for p, a in zip(range(prompt_len, n), agree)]
        first_hits += sum(agree)
        first_total += len(agree)
        p = prompt_len
        while p < n:
            if looked_up.get(p) is not None:
                run = looked_up[p]
                accepted = next((i for i, ok in enumerate(run) if not ok), len(run))
                rounds.append(accepted)
                lookup_rounds += 1
                p += accepted + 1
                continue
            accepted = 0
            if first[p - 2] == ids[p]:  # draft 1 from entry p-2 (true feature f_{p-2}, token p-1)
                accepted = 1
                cache = HeadCache(kv, p - 1)
                predicted, last = level0[:, p - 2 : p - 1], ids[p]
                while accepted < gamma and p + accepted < n:
                    predicted = head.extend(cache, head.entry(predicted, torch.tensor([[last]])), p - 2 + accepted)
                    token = int(head.vocab_ids[head.logits(predicted[0, -1]).argmax()])
                    position_tries[accepted] += 1
                    if token != ids[p + accepted]:
                        break
                    position_hits[accepted] += 1
                    last = token
                    accepted += 1
            position_tries[0] += 1
            position_hits[0] += accepted > 0
            rounds.append(accepted)
            p += accepted + 1
        if kinds is not None:
            tally.add(kinds[index], sum(agree), len(agree), rounds[before:])
    return {
        "alpha": round(first_hits / max(1, first_total), 4),
        "alpha_by_position": [round(h / max(1, t), 4) for h, t in zip(position_hits, position_tries)],
        "mean_accepted_per_round": round(sum(rounds) / max(1, len(rounds)), 3),
        "tokens_per_round": round(sum(rounds) / max(1, len(rounds)) + 1, 3),
        "positions": first_total,
        "lookup_rounds_fraction": round(lookup_rounds / max(1, len(rounds)), 4),
        **({"by_kind": tally.report()} if kinds is not None else {}),
    }


@torch.no_grad()
def evaluate_tree(head: FeatureHead, heldout: list[tuple], gamma: int = 4, tree_nodes: int = 8,
                  lookup_min_match: int = 0, tree_depth: int = 0, tree_branch: int = 0, datastore=None) -> dict:
    """Token trees (workers/token_tree.py) drafted by the device's own code (FeatureDrafter with
    ``tree_nodes``, ``tree_depth`` levels, 0: γ; ``tree_branch`` 0: the default; a ``datastore``'s
    branch as deep) on the held-out rounds: training/tree_eval.py ``tree_rounds``. Each round
    starts from the true entries of positions 0..p-2, as after a verdict."""
    from workers.feature_drafter import FeatureDrafter, FeatureDraftState
    from training.tree_eval import tree_rounds

    drafter = FeatureDrafter(head, tree_nodes=tree_nodes, gamma=gamma, tree_depth=tree_depth, tree_branch=tree_branch)

    def sequences():
        for ids, prompt_len, feats in heldout:
            n = len(ids)
            if n <= prompt_len or prompt_len < 2:
                continue
            tokens = torch.tensor([ids])
            entries = head.entry(head.fused(feats[None, :-1].float()), tokens[:, 1:])
            level0, kv = head.decode(entries, torch.arange(n - 1))

            def draft_round(p: int, level0=level0, kv=kv, ids=ids):
                state = FeatureDraftState(cache=HeadCache(kv, p - 1), predicted=level0[:, p - 2 : p - 1])
                return drafter.propose(state, ids[:p], gamma, GREEDY, None, tree=True)

            yield ids, prompt_len, draft_round

    return tree_rounds(sequences(), gamma, lookup_min_match, datastore, drafter.tree_depth)


@torch.no_grad()
def head_draft_tokens_per_s(head: FeatureHead, heldout: list[tuple], new_tokens: int = 32, prompts: int = 3) -> float:
    """Batch-1 chained drafting through the head's cache, as the device drafts; median over
    prompts, the prompt's entries not timed."""
    rates = []
    for ids, n, feats in heldout[:: max(1, len(heldout) // prompts)][:prompts]:
        cache = HeadCache()
        predicted = head.extend(cache, head.entry(head.fused(feats[None, : n - 1].float()), torch.tensor([ids[1:n]])), 0)
        predicted = predicted[:, -1:]
        token = int(head.vocab_ids[head.logits(predicted[0, -1]).argmax()])
        started = time.perf_counter()
        for i in range(new_tokens):
            predicted = head.extend(cache, head.entry(predicted, torch.tensor([[token]])), n - 1 + i)
            token = int(head.vocab_ids[head.logits(predicted[0, -1]).argmax()])
        rates.append(new_tokens / (time.perf_counter() - started))
    return statistics.median(rates)

