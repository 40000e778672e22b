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

Behind the drafter, a datastore of the target's earlier continuations (workers/datastore.py, the
n-gram class's) drafts where the drafter is unsure, and adds a branch to its token trees
(`LookupDrafter`'s docstring).
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

# A chain drafts the datastore's continuation instead of the drafter's where the drafter's first
# token has probability below this and the datastore has an entry for the context's last 2+
# tokens (`Datastore.match`: a pruned entry counts as its shorter suffix's). Chosen
# on the validation set (topic list 16, 4,100 rounds): the feature head with lookup 2.484 tokens
# per round; with the datastore below 0.2 / 0.25 / 0.3 / 0.4 2.521 / 2.527 / 2.518 / 2.506, below
# 0.3 at any match 2.508; the `pi5` rung with lookup 2.430, below 0.3 / 0.4 / 0.5 2.515 / 2.509 /
# 2.500; held out, the rungs gain 0.012-0.043 and the head nothing (docs/incremental-training.md,
# "The datastore behind the drafters").
DATASTORE_BELOW = 0.3
DATASTORE_MIN_MATCH = 2


class LookupDrafter(DraftStrategy):
    """A drafter (model, feature or translating kind) with context lookup in front of it.

    With a ``datastore`` (workers/datastore.py), the target's most frequent continuation of the
    context's end in its earlier text stands in where the drafter is unsure: a chain drafts it
    instead of the drafter's where the drafter's first token has probability below
    ``DATASTORE_BELOW`` (or it drafted nothing: a confidence stop, a feature head's first round)
    and the datastore's longest entry for the context's end (``Datastore.match``) is
    ``DATASTORE_MIN_MATCH`` tokens or more; and a token
    tree gets it as one more branch, as deep as the tree. Both choices depend on the context alone,
    so greedy output stays the target's and sampling stays lossless (q = 1 per token, as for a
    repeat's tokens)."""

    def __init__(self, inner, *, min_match: int = 2, ngram_max: int = 4, datastore=None):
        """``min_match`` 0: no context lookup, the datastore only."""
        self.inner = inner
        self.min_match = min_match
        self.ngram_max = max(ngram_max, min_match)
        self.datastore = datastore
        self.kind = inner.kind
        self.supports_proactive = inner.supports_proactive
        self.tree_nodes = inner.tree_nodes
        self.feature_layers = inner.feature_layers  # a feature drafter's verdicts still bring features

    @property
    def tree_rows(self) -> int:
        """The inner tree's rows and the datastore branch's (the lookup branch is rare and mostly
        right, so it is not priced)."""
        return self.inner.tree_rows + (self.inner.tree_depth if self.datastore is not None and self.tree_nodes else 0)

    def new_state(self):
        return self.inner.new_state()

    def match(self, committed: list[int]) -> int:
        """The length of the repeat a round on ``committed`` drafts from, 0 when the model drafts
        (the drafter service keeps separate acceptance figures per length: a 4-token repeat is
        right far more often than a 2-token one, and both differ from the model)."""
        return lookup_draft(committed, 1, self.ngram_max, self.min_match)[1] if self.min_match else 0

    def propose(self, state, committed: list[int], gamma: int, sampling: Sampling, generator, interrupt=None,
                tree: bool = False) -> Draft:
        """``tree``: the inner drafter's token tree, with the repeat's continuation (and the
        datastore's) as one more branch each."""
        tokens = lookup_draft(committed, gamma, self.ngram_max, self.min_match)[0] if self.min_match else []
        if tree and sampling.greedy and self.tree_nodes:
            draft = self.inner.propose(state, committed, gamma, sampling, generator, interrupt=interrupt, tree=True)
            draft.tokens, draft.parents = with_branches(draft.tokens, draft.parents, committed, tokens,
                                                        self.datastore, self.inner.tree_depth)
            draft.lookup = bool(tokens)
            return draft
        if not tokens:
            as_tree = {"tree": True} if tree else {}  # a translating drafter takes no such argument
            draft = self.inner.propose(state, committed, gamma, sampling, generator, interrupt=interrupt, **as_tree)
            stored = self._unsure(committed, gamma, draft)
            if not stored:
                return draft
            self.inner.rewind(state, len(committed))  # none of the drafter's tokens go out
            return fixed_draft(stored, sampling, datastore=True)
        # a zero-length proposal tells the inner drafter that none of its draft tokens are out
        # (the model drafter's commit keeps only the fed drafts of its own last proposal)
        self.inner.propose(state, committed, 0, sampling, generator)
        return fixed_draft(tokens, sampling, lookup=True)

    def _unsure(self, committed: list[int], gamma: int, draft: Draft) -> list[int]:
        if self.datastore is None or draft.parents:
            return []
        return stand_in(self.datastore, committed, gamma, draft.confidence if draft.tokens else 0.0)

    def commit(self, state, position: int, accepted: int) -> None:
        self.inner.commit(state, position, accepted)

    def rewind(self, state, length: int) -> None:
        self.inner.rewind(state, length)

    def take_features(self, state, verdict) -> None:
        self.inner.take_features(state, verdict)


def stand_in(datastore, committed: list[int], gamma: int, confidence: float) -> list[int]:
    """The datastore's chain where it stands in for a drafter whose first token has probability
    ``confidence`` (0: it drafted nothing), else []: below DATASTORE_BELOW, where the datastore's
    longest entry for the context's end is DATASTORE_MIN_MATCH tokens or more."""
    if gamma <= 0 or confidence >= DATASTORE_BELOW or datastore.match(committed) < DATASTORE_MIN_MATCH:
        return []
    return datastore.draft(committed, gamma)


def fixed_draft(tokens: list[int], sampling: Sampling, **source) -> Draft:
    """A draft that is a function of the context (a repeat's or a datastore's continuation). A
    sampled session sends q = 1 for each token, given explicitly so that a draft joined from a cut
    model draft and its rest keeps one q row per token; the verifier accepts each with the
    target's probability and resamples from the residual otherwise."""
    if sampling.greedy:
        return Draft(tokens, **source)
    return Draft(tokens, [[t] for t in tokens], [[1.0] for _ in tokens], **source)


def with_lookup(strategy, *, min_match: int, ngram_max: int = 4, datastore=None):
    """``strategy`` with context lookup in front of it (``min_match`` > 0) and a datastore behind
    it (class docstring); ``strategy`` itself where neither applies."""
    if min_match <= 0 and datastore is None:
        return strategy
    return LookupDrafter(strategy, min_match=max(0, min_match), ngram_max=ngram_max, datastore=datastore)


def with_branches(tokens: list[int], parents: list[int], committed: list[int], repeat: list[int],
                  datastore=None, depth: int = 0) -> tuple[list[int], list[int]]:
    """A drafter's token tree with the context repeat's continuation and, with a datastore, its
    ``depth``-token continuation of ``committed`` added as paths from the root. The feature head's
    16-token tree six levels deep with the repeat's branch, held out: 2.702 tokens per round at
    16.4 rows; with the datastore's branch 2.785 at 21.1, where a 24-token tree gives 2.762 at
    24.4 (docs/incremental-training.md, "The datastore behind the drafters")."""
    for chain in (repeat, datastore.draft(committed, depth) if datastore is not None and depth else []):
        if chain:
            tokens, parents = with_chain(tokens, parents, chain)
    return tokens, parents


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
