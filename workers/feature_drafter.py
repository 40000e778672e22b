"""FeatureDrafter: the device-side strategy of `kind = "feature"` (see workers/feature_head.py).

Its proposals ask the verifier for the target's features; each verdict brings them back for
the newly committed positions, and the head turns them into cache entries before it drafts
again. A session's first round therefore drafts nothing (no feature has arrived yet); after
that, entry t = (feature t, token t+1) exists for every committed position but the last, and
draft step k chains on the head's own predicted feature. Drafted entries are dropped as soon
as the proposal leaves: the verdict brings the true features of whatever was accepted.

Drafting ahead (``proactive``, workers/drafter.py) drafts the next round while a proposal is out,
on a context that assumes the proposal accepted and the target's next token guessed: no feature
of those positions has come back yet, so the head chains over them on its own predicted features,
as it does over a draft's own tokens, and drops those entries after. Such a draft is a little
weaker than one made after the verdict (its first token stands where a chain's fifth or sixth
would), and it leaves without a link round trip when the verdict confirms it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.protocol import Sampling, Verdict
from workers.drafts import Draft, DraftStrategy, pick_token
from workers.feature_head import FeatureHead, HeadCache
from workers.token_tree import grow_tree



@dataclass
class FeatureDraftState:
    cache: HeadCache = field(default_factory=HeadCache)
    first: int = 0  # position of the cache's first entry (a rebuild may send only recent features)
    pending: torch.Tensor | None = None  # true features not yet in the cache, [n, width]
    pending_start: int = 0  # position of pending's first row
    predicted: torch.Tensor | None = None  # the head's prediction after the last true entry [1, 1, H]

    @property
    def next_entry(self) -> int:
        return self.first + self.cache.length


class FeatureDrafter(DraftStrategy):
    kind = "feature"
    supports_proactive = True  # past a proposal it chains on its own predicted features (module docstring)

    def __init__(self, head: FeatureHead, *, min_confidence: float = 0.0, top_k: int = 8, tree_nodes: int = 0,
                 gamma: int = 4, tree_depth: int = 0, tree_branch: int = 0):
        self.head = head
        self._set_draft_shape(min_confidence, top_k, tree_nodes, gamma, tree_depth, tree_branch)
        self.feature_layers = list(head.spec.feature_layers)
        self.width = head.spec.hidden * len(self.feature_layers)

    def new_state(self) -> FeatureDraftState:
        return FeatureDraftState()

    def _catch_up(self, state: FeatureDraftState, committed: list[int]) -> bool:
        """Turn pending true features into entries, as far as they go up to position
        len(committed) - 2 (the last committed token has no feature yet); False when the head
        holds none to draft from (a session's first round)."""
        last = len(committed) - 2
        if state.pending is not None and state.pending_start <= state.next_entry <= last:
            rows = state.pending[state.next_entry - state.pending_start : last + 1 - state.pending_start]
            if rows.shape[0]:
                start = state.next_entry
                tokens = torch.tensor([committed[start + 1 : start + 1 + rows.shape[0]]])
                entries = self.head.entry(self.head.fused(rows[None]), tokens)
                state.predicted = self.head.extend(state.cache, entries, start)[:, -1:]
        return state.predicted is not None

    def _assume(self, state: FeatureDraftState, committed: list[int]) -> torch.Tensor:
        """The head's predicted feature of the last committed position. Past the true entries (a
        draft made ahead of its verdict) it chains over the assumed tokens on its own predicted
        features, as over a draft's; the caller drops those entries."""
        predicted = state.predicted
        for position in range(state.next_entry, len(committed) - 1):
            entry = self.head.entry(predicted[:, -1:], torch.tensor([[committed[position + 1]]]))
            predicted = self.head.extend(state.cache, entry, position)[:, -1:]
        return predicted

    @torch.inference_mode()
    def propose(self, state: FeatureDraftState, committed: list[int], gamma: int, sampling: Sampling,
                generator: torch.Generator, interrupt=None, tree: bool = False) -> Draft:
        """``tree`` (with ``tree_nodes``, greedy only): the full token tree, ``tree_depth`` levels deep."""
        draft = Draft([])
        if gamma <= 0 or len(committed) < 2 or not self._catch_up(state, committed):
            return draft
        true_entries, true_predicted = state.cache.length, state.predicted
        try:
            state.predicted = self._assume(state, committed)
            if tree and self.tree_nodes and sampling.greedy:
                return self._tree(state, committed, self.tree_depth, self.tree_nodes)
            return self._chain(state, committed, gamma, sampling, generator)
        finally:  # drafted and assumed entries go; verified features replace them
            state.cache.crop(true_entries)
            state.predicted = true_predicted

    def _chain(self, state: FeatureDraftState, committed: list[int], gamma: int, sampling: Sampling,
               generator: torch.Generator) -> Draft:
        draft = Draft([])
        predicted, position = state.predicted, len(committed) - 1
        for k in range(gamma):
            logits = self.head.logits(predicted[0, -1]).float()
            index, confidence, top_index, q = pick_token(logits, sampling, self.top_k, generator)
            if k == 0:
                draft.confidence = confidence
            if confidence < self.min_confidence:
                break
            token = int(self.head.vocab_ids[index])
            draft.tokens.append(token)
            if not sampling.greedy:
                draft.q_ids.append(self.head.vocab_ids[top_index].tolist())
                draft.q_probs.append(q.tolist())
            if k + 1 < gamma:
                entry = self.head.entry(predicted[:, -1:], torch.tensor([[token]]))
                predicted = self.head.extend(state.cache, entry, position - 1 + k + 1)
        return draft

    def _tree(self, state: FeatureDraftState, committed: list[int], depth: int, size: int) -> Draft:
        """EAGLE-2's dynamic tree (workers/token_tree.py grow_tree): all nodes of one level go
        through the head in one step, each new entry seeing the true entries, its ancestors' and
        itself. Drafted entries are dropped after, as in a chain."""
        head, cache = self.head, state.cache
        position = len(committed) - 1  # where the first draft token's entry sits
        tree_kv: list[list] = []  # per tree level, the new entries' (k, v) per decoder layer
        entry_of: dict[int, int] = {}  # node -> its entry among the drafted ones
        predicted_at: dict[int, torch.Tensor] = {-1: state.predicted[0, -1]}  # node -> the feature predicted after it

        def log_probs(features: torch.Tensor) -> torch.Tensor:
            return torch.log_softmax(head.logits(features).float(), -1)

        def expand(level: int, picked: list[tuple[int, int, list[int]]]) -> torch.Tensor:
            feats = torch.stack([predicted_at[path[-2] if len(path) > 1 else -1] for _, _, path in picked])
            entries = head.entry(feats[None], torch.tensor([[token for _, token, _ in picked]]))
            drafted = sum(level_kv[0][0].shape[2] for level_kv in tree_kv)
            mask = torch.zeros(len(picked), cache.length + drafted + len(picked), dtype=torch.bool)
            mask[:, : cache.length] = True
            for row, (node, _, path) in enumerate(picked):
                entry_of[node] = drafted + row
                for a in path:
                    mask[row, cache.length + entry_of[a]] = True
            past = [(torch.cat([k, *(t[i][0] for t in tree_kv)], 2), torch.cat([v, *(t[i][1] for t in tree_kv)], 2))
                    for i, (k, v) in enumerate(cache.kv)]
            out, new = head.decode(entries, torch.full((len(picked),), position - 1 + level), past, mask)
            out = out[0]
            tree_kv.append(new)
            predicted_at.update({node: out[row] for row, (node, _, _) in enumerate(picked)})
            return log_probs(out)

        tokens, parents = grow_tree(log_probs(predicted_at[-1]), expand, depth, size,
                                    token_of=lambda index: int(head.vocab_ids[index]), branch=self.tree_branch)
        return Draft(tokens, parents=parents)

    def take_features(self, state: FeatureDraftState, verdict: Verdict) -> None:
        """Keep the verdict's true features for positions the cache does not hold yet. The cache
        holds true entries only (propose drops what it drafts and chains), so ``commit`` and
        ``rewind`` have nothing to cut."""
        if not verdict.features:
            return
        rows = torch.from_numpy(np.frombuffer(verdict.features, dtype=np.float16).copy()).float()
        rows = rows.view(-1, self.width)
        start = verdict.features_start
        if start > state.next_entry or (state.pending is None and state.cache.length == 0):
            # a gap (a rebuild sent only recent features) or nothing held yet: restart from here
            state.cache, state.first, state.predicted = HeadCache(), start, None
        held_until = state.pending_start + (0 if state.pending is None else state.pending.shape[0])
        if state.pending is not None and state.pending_start <= start <= held_until:
            rows = torch.cat((state.pending[: start - state.pending_start], rows))
            start = state.pending_start
        skip = max(0, state.next_entry - start)
        state.pending, state.pending_start = rows[skip:], start + skip
