"""Context lookup: draft what followed the latest earlier occurrence of the context's end.

`lookup_draft` (workers/drafts.py) is the n-gram drafter's whole method (prompt lookup); `LookupDrafter` puts it in
front of a model or feature drafter: when the committed context ends in an n-gram of at least
`min_match` tokens that occurred before, the round drafts that occurrence's continuation instead
of the model's tokens, and the model drafts otherwise. The default target repeats itself often
(its greedy continuations of the held-out prompts end in such a 4-gram at a third of the
positions, and what followed is right 93 % of the time there), where even the feature head is
right about half the time: on the held-out set at γ = 4 the feature head alone gives 1.81 tokens
per round and with lookup at `min_match = 2` 2.03 (`sled eval drafters`, docs/training-history.md).

The choice depends on the context only, so greedy output stays the target's and sampling stays
lossless: a lookup draft is deterministic, sent with q = 1 for each token (the verifier accepts
it with the target's probability and resamples from the residual otherwise).
"""

from __future__ import annotations

from pipeline.protocol import Sampling
from workers.drafts import Draft, DraftStrategy, lookup_draft
from workers.token_tree import child

# the shortest repeat worth drafting from, for the default fleet (config.toml), its benchmark
# (bench/profiles.py) and the "+lookup" rungs of `sled eval drafters`. Chosen on the target's
# continuations of training prompts, not the held-out ones: feature head 1.80 / 1.93 / 2.04 /
# 2.04 / 2.03 tokens per round at γ = 4 with min_match off / 1 / 2 / 3 / 4, the orin rung
# 1.62 / 1.91 / 1.99 / 1.97 / 1.94 (48 prompts, topic set 2, 64 tokens each).
DEFAULT_MIN_MATCH = 2


class LookupDrafter(DraftStrategy):
    """A drafter (model, feature or translating kind) with context lookup in front of it."""

    def __init__(self, inner, *, min_match: int = 2, ngram_max: int = 4):
        self.inner = inner
        self.min_match = min_match
        self.ngram_max = max(ngram_max, min_match)
        self.kind = inner.kind
        self.supports_proactive = inner.supports_proactive
        self.tree_nodes = inner.tree_nodes
        self.feature_layers = inner.feature_layers  # a feature drafter's verdicts still bring features

    def new_state(self):
        return self.inner.new_state()

    def match(self, committed: list[int]) -> int:
        """The length of the repeat a round on ``committed`` drafts from, 0 when the model drafts
        (the drafter service keeps separate acceptance figures per length: a 4-token repeat is
        right far more often than a 2-token one, and both differ from the model)."""
        return lookup_draft(committed, 1, self.ngram_max, self.min_match)[1]

    def propose(self, state, committed: list[int], gamma: int, sampling: Sampling, generator, interrupt=None,
                tree: bool = False) -> Draft:
        """``tree``: the inner drafter's token tree, with the repeat's continuation as one more branch."""
        tokens, _ = lookup_draft(committed, gamma, self.ngram_max, self.min_match)
        as_tree = {"tree": True} if tree else {}  # a translating drafter takes no such argument
        if not tokens:
            return self.inner.propose(state, committed, gamma, sampling, generator, interrupt=interrupt, **as_tree)
        if tree and sampling.greedy and self.tree_nodes:
            tree = self.inner.propose(state, committed, gamma, sampling, generator, interrupt=interrupt, tree=True)
            tree.tokens, tree.parents = with_chain(tree.tokens, tree.parents, tokens)
            tree.lookup = True
            return tree
        # a zero-length proposal tells the inner drafter that none of its draft tokens are out
        # (the model drafter's commit keeps only the fed drafts of its own last proposal)
        self.inner.propose(state, committed, 0, sampling, generator)
        if sampling.greedy:
            return Draft(tokens, lookup=True)
        # q = 1 on each token, given explicitly so that a draft joined from a cut model draft and
        # its lookup rest keeps one q row per token
        return Draft(tokens, [[t] for t in tokens], [[1.0] for _ in tokens], lookup=True)

    def commit(self, state, position: int, accepted: int) -> None:
        self.inner.commit(state, position, accepted)

    def rewind(self, state, length: int) -> None:
        self.inner.rewind(state, length)

    def take_features(self, state, verdict) -> None:
        self.inner.take_features(state, verdict)


def with_chain(tokens: list[int], parents: list[int], chain: list[int]) -> tuple[list[int], list[int]]:
    """A token tree with ``chain`` added as a path from the root, sharing the nodes it already has."""
    tokens, parents, at = list(tokens), list(parents), -1
    for token in chain:
        found = child(tokens, parents, at, token)
        if found is None:
            tokens.append(token)
            parents.append(at)
            found = len(tokens) - 1
        at = found
    return tokens, parents
