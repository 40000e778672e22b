"""Held-out figures of token trees (workers/token_tree.py), for any drafter that drafts them.

A round starts at continuation position p with tokens 0..p-1 committed; the drafter's own code
drafts its tree (with the repeat's continuation as one more branch where context lookup finds
one, as workers/lookup.py does); the accepted tokens are the longest path of the tree that spells
the target's next tokens, the target adds one more, and the next round starts after it. Every
tree token costs one verify row, so besides tokens per round this reports the draft tokens (rows)
per round, tokens per verify row, and the drafting time per round."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch

from pipeline.protocol import Sampling
from workers.drafts import Draft, lookup_draft
from workers.lookup import with_branches
from workers.token_tree import accepted_along


def tree_rounds(sequences: Iterable[tuple[list[int], int, Callable[[int], Draft]]], gamma: int = 4,
                lookup_min_match: int = 0, datastore=None, datastore_depth: int = 0) -> dict:
    """``sequences``: (ids, prompt length, draft_round) each, where ``draft_round(p)`` is the
    drafter's tree for the round that starts at position p (called in order along a sequence).
    With a ``datastore``, its ``datastore_depth``-token continuation is one more branch, as the
    device adds it (workers/lookup.py ``with_branches``)."""
    rounds: list[int] = []
    rows: list[int] = []
    seconds = 0.0
    lookup_rounds = first_level_hits = 0
    for ids, prompt_len, draft_round in sequences:
        p = prompt_len
        while p < len(ids):
            started = time.perf_counter()
            draft = draft_round(p)
            seconds += time.perf_counter() - started
            chain = lookup_draft(ids[:p], gamma, 4, lookup_min_match)[0] if lookup_min_match else []
            draft.tokens, draft.parents = with_branches(draft.tokens, draft.parents, ids[:p], chain, datastore,
                                                        datastore_depth)
            lookup_rounds += bool(chain)
            accepted = accepted_along(draft.tokens, draft.parents, ids[p:])
            rounds.append(accepted)
            rows.append(len(draft.tokens))
            first_level_hits += accepted > 0
            p += accepted + 1
    mean_accepted = sum(rounds) / max(1, len(rounds))
    mean_rows = sum(rows) / max(1, len(rows))
    return {
        # per round, not per position: how often the tree's first level holds the target's token
        "first_level_hit_rate": round(first_level_hits / max(1, len(rounds)), 4),
        "tokens_per_round": round(mean_accepted + 1, 3),
        "mean_accepted_per_round": round(mean_accepted, 3),
        "draft_tokens_per_round": round(mean_rows, 2),
        "tokens_per_verify_row": round((mean_accepted + 1) / (1 + mean_rows), 3),
        "draft_ms_per_round": round(1000 * seconds / max(1, len(rounds)), 2),
        "rounds": len(rounds),
        "lookup_rounds_fraction": round(lookup_rounds / max(1, len(rounds)), 4),
    }


@torch.no_grad()
def evaluate_model_tree(model, sequences: list[tuple[list[int], int]], gamma: int = 4, tree_nodes: int = 8,
                        lookup_min_match: int = 0, tree_depth: int = 0, tree_branch: int = 0,
                        datastore=None) -> dict:
    """A model drafter's trees (ModelDrafter with ``tree_nodes``, ``tree_depth`` levels, 0: γ;
    ``tree_branch`` 0: the default), through its own KV cache as on the device: each round feeds
    the tokens committed since the last, drafts, and is rolled back to what the target committed.
    The lookup branch is γ long, a ``datastore``'s as deep as the tree."""
    from workers.drafts import ModelDrafter

    drafter = ModelDrafter(model, tree_nodes=tree_nodes, gamma=gamma, tree_depth=tree_depth, tree_branch=tree_branch)
    greedy = Sampling()

    def rounds():
        for ids, prompt_len in sequences:
            if len(ids) <= prompt_len:
                continue
            state = drafter.new_state()

            def draft_round(p: int, state=state, ids=ids):
                drafter.commit(state, p, 0)  # the cache holds committed tokens only (a tree feeds none)
                return drafter.propose(state, ids[:p], gamma, greedy, None, tree=True)

            yield ids, prompt_len, draft_round

    return tree_rounds(rounds(), gamma, lookup_min_match, datastore, drafter.tree_depth)
