"""Token trees: a draft of several candidate continuations verified in one forward (greedy).

A chain proposes one continuation; a tree proposes several that share prefixes, as SpecInfer and
EAGLE-2 do: draft token i continues token ``parents[i]`` (an earlier one) or, when -1, the last
committed token. The verifier feeds every node as one row; each sits at the position of its depth
and attends only to its ancestors (``tree_inputs``), so the target's logits at a node are exactly
those it would give the chain from the root to that node. The accepted tokens are then the
longest root-to-node path the target's greedy argmax follows (``verify_tree_greedy``), and the
rows off that path are cut from the cache. Sampling keeps chains: exact multi-draft rejection
sampling is another algorithm (pipeline/rules.py refuses a sampled tree).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


# a drafted tree's shape (grow_tree, for the feature and model drafters; each class may set its
# own: drafters.NAME.tree_nodes, tree_depth, tree_branch). Chosen on topic list 16's validation set
# with the head's round 29 (docs/incremental-training.md, "Token trees"), not on the held-out set:
# 16 tokens 6 levels deep, each level expanding its 3 likeliest paths with 3 children each, gave
# 3.08 tokens per round against 2.68 for the earlier default (8 tokens, 4 levels, branch 2), for 8
# more verify rows, which a GPU server's forward hardly notices (a CPU one does, and there the
# adaptive policy drafts chains). With the lookup branch (γ tokens more) a tree stays within
# limits.max_draft_tokens = 32.
DEFAULT_TREE_BRANCH = 3
DEFAULT_TREE_NODES = 16
DEFAULT_TREE_DEPTH = 6


@dataclass(frozen=True)
class TreeShape:
    """A drafted tree's size (its verify rows), levels and branching (`sled eval drafters`)."""
    nodes: int = DEFAULT_TREE_NODES
    depth: int = DEFAULT_TREE_DEPTH
    branch: int = DEFAULT_TREE_BRANCH


def grow_tree(root: torch.Tensor, expand, depth: int, size: int, token_of=int,
              branch: int = DEFAULT_TREE_BRANCH) -> tuple[list[int], list[int]]:
    """EAGLE-2's dynamic tree, for any drafter: (tokens, parents) of a tree ``depth`` levels deep.

    Each level expands its ``branch`` likeliest tokens (by the drafter's probability of the whole
    path) with their ``branch`` likeliest next tokens. ``root``: the drafter's log-probabilities
    for the first draft token. ``expand(level, picked)``, with ``picked`` a list of (node, token,
    ancestors: the node's path from the root, itself last), runs the drafter one step over all of
    them at once and returns their next-token log-probabilities, one row each. ``token_of`` maps a
    row's index to a token id (a drafter with a draft vocabulary). The draft keeps the ``size``
    likeliest paths' tokens, listed from the likeliest down, so any prefix of it is the tree a
    smaller size would keep."""
    nodes: list[tuple[float, int, int, int]] = []  # (path log-probability, depth, parent, token)
    ancestors: dict[int, list[int]] = {-1: []}
    frontier = [(0.0, -1, root)]  # (log-probability, node, its next-token log-probabilities)
    for level in range(1, depth + 1):
        children = []
        for logp, node, row in frontier:
            top = row.topk(branch)
            children += [(logp + lp, node, token_of(index)) for lp, index in zip(top.values.tolist(), top.indices.tolist())]
        for logp, parent, token in children:
            nodes.append((logp, level, parent, token))
            ancestors[len(nodes) - 1] = [*ancestors[parent], len(nodes) - 1]
        if level == depth:
            break
        picked = sorted(range(len(nodes) - len(children), len(nodes)), key=lambda n: -nodes[n][0])[:branch]
        rows = expand(level, [(n, nodes[n][3], ancestors[n]) for n in picked])
        frontier = [(nodes[n][0], n, rows[i]) for i, n in enumerate(picked)]
    # the likeliest paths: a child is never likelier than its parent, so ties go to the shallower
    kept = sorted(range(len(nodes)), key=lambda n: (-nodes[n][0], nodes[n][1]))[:size]
    index = {n: i for i, n in enumerate(kept)}
    return [nodes[n][3] for n in kept], [index.get(nodes[n][2], -1) for n in kept]


def child(draft: list[int], parents: list[int], node: int, token: int) -> int | None:
    """The index of ``node``'s child holding ``token`` (-1: the root), or None."""
    return next((i for i, (t, up) in enumerate(zip(draft, parents)) if up == node and t == token), None)


def verify_tree_greedy(best: list[int], draft: list[int], parents: list[int]) -> tuple[list[int], int]:
    """A token tree, greedy. ``best[r]``: the target's argmax at row r (row 0 the last committed
    token, row 1 + i draft token i). From the root, follow the child whose token is the target's
    argmax while there is one. Returns (the accepted tokens' indices, root to leaf; the next
    token: the target's argmax after the last of them)."""
    path, node = [], -1
    while (node := child(draft, parents, node, best[node + 1])) is not None:
        path.append(node)
    return path, best[path[-1] + 1 if path else 0]


def accepted_along(draft: list[int], parents: list[int], tokens: list[int]) -> int:
    """How many of ``tokens`` (the target's own continuation) a tree accepts: the longest path
    from the root that spells their start (parents empty: a chain)."""
    parents = parents or list(range(-1, len(draft) - 1))
    accepted, node = 0, -1
    while accepted < len(tokens) and (node := child(draft, parents, node, tokens[accepted])) is not None:
        accepted += 1
    return accepted


def tree_depths(parents: list[int]) -> list[int]:
    """Each draft token's depth in its tree (1 for a child of the last committed token)."""
    depths: list[int] = []
    for parent in parents:
        depths.append(1 if parent < 0 else depths[parent] + 1)
    return depths


def tree_inputs(parents: list[list[int]], batch: int, width: int) -> dict[str, torch.Tensor]:
    """``depths`` [batch, width] and ``tree`` [batch, width, width] for StaticModel's token trees:
    row r's column 0 is the last committed token (depth 0), column 1 + i its draft token i. Each
    token sees its ancestors and itself; rows without parents (chains), padding columns and
    padding rows are chains, and no real token sees a padding column."""
    depths = torch.arange(width).repeat(batch, 1)
    tree = torch.ones(width, width, dtype=torch.bool).tril().repeat(batch, 1, 1)
    for row, links in enumerate(parents):  # an empty list stays a chain
        n = len(links)
        depths[row, 1 : 1 + n] = torch.tensor(tree_depths(links), dtype=torch.long)
        tree[row, 1 : 1 + n, 1 : 1 + n] = False
        for i, parent in enumerate(links):
            tree[row, 1 + i, 1 + i] = True
            if parent >= 0:
                tree[row, 1 + i, 1 : 1 + n] |= tree[row, 1 + parent, 1 : 1 + n]
    return {"depths": depths, "tree": tree}
