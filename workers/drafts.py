"""Draft strategies: what an edge device runs to propose tokens. No sockets here.

* ModelDrafter -- any causal LM sharing the target's tokenizer, with its own KV cache per session,
  rolled back to the accepted prefix after each verdict.
* TranslatingDrafter (workers/translating_drafter.py) -- a causal LM with another tokenizer: its
  drafts are re-encoded as target ids (ids only, q = 1).
* FeatureDrafter (workers/feature_drafter.py) -- a small head conditioned on the target's own
  hidden states, which the verifier returns with each verdict (EAGLE-style).
* NgramDrafter -- model-free prompt lookup for the weakest devices: find the latest earlier
  occurrence of the longest recent n-gram and propose what followed it (`lookup_draft`); with a
  datastore of the target's earlier continuations behind it (workers/datastore.py) where the
  context has not repeated.
* LookupDrafter (workers/lookup.py) -- that lookup in front of a model or feature drafter
  (``lookup_min_match``): lookup's draft where the context repeats, the model's elsewhere.
* ReplayDrafter -- benchmarks only: proposes drafts a real drafter made earlier for the same
  contexts (bench/traces.py records them), with the compute time each took, so that a 2-core
  machine can stand in for a fleet of devices drafting in parallel.

Both are deterministic functions of the context in greedy mode, so the verifier needs only the
token ids. In sampling mode the model drafter samples from its own top-k distribution and sends
those k (id, probability) pairs; the n-gram drafter stays deterministic (see workers/rejection_sampling.py).
"""

from __future__ import annotations

import hashlib
from array import array
from pathlib import Path
from dataclasses import dataclass, field

import msgpack
import structlog
import torch
from transformers import DynamicCache

from pipeline.protocol import Sampling
from workers.token_tree import DEFAULT_TREE_BRANCH, grow_tree, tree_depths

log = structlog.get_logger(__name__)


def pick_token(logits: torch.Tensor, sampling: Sampling, top_k: int, generator: torch.Generator):
    """One draft token from a drafter's logits: (index, confidence = the top probability, top-k
    indices, their renormalised q). Greedy takes the argmax (no q); sampling draws from the top-k
    at the request's temperature, and that q is what the verifier's rejection sampling needs."""
    if sampling.greedy:
        confidence, index = torch.max(torch.softmax(logits, dim=-1), dim=-1)
        return int(index), float(confidence), None, None
    top_p, top_ids = torch.topk(torch.softmax(logits / sampling.temperature, dim=-1), top_k)
    q = top_p / top_p.sum()
    pick = int(torch.multinomial(q, 1, generator=generator))
    return int(top_ids[pick]), float(top_p[0]), top_ids, q


@dataclass
class Draft:
    tokens: list[int]
    q_ids: list[list[int]] = field(default_factory=list)
    q_probs: list[list[float]] = field(default_factory=list)
    compute_s: float = 0.0  # CPU seconds drafting took (measured by the drafter service, or recorded)
    cut: bool = False  # interrupted before gamma tokens (not a confidence stop): the rest may follow
    device_s: float = 0.0  # seconds the device spent on it (set by the drafter service: wall time, or emulated)
    lookup: bool = False  # drafted by context lookup (workers/lookup.py), not by the model
    datastore: bool = False  # drafted from a datastore (workers/lookup.py) where the model was unsure
    confidence: float = 1.0  # a chain's: the drafter's probability of its first token (drafted or not)
    parents: list[int] = field(default_factory=list)  # a token tree (workers/token_tree.py); empty: a chain

    @property
    def depth(self) -> int:
        """Draft positions a verdict can test: a chain's length, a tree's deepest level."""
        if not self.parents:
            return len(self.tokens)
        return max(tree_depths(self.parents), default=0)


def draft_generator(seed: int) -> torch.Generator:
    """The drafter's random stream for a session. It must differ from the verifier's stream
    (seeded with the same session seed): if the draft sample and the acceptance test drew the
    same uniforms they would be correlated and the output biased (caught by
    tests/test_target.py's distribution test)."""
    return torch.Generator().manual_seed((seed * 6364136223846793005 + 1442695040888963407) % (1 << 63))


def round_generator(seed: int, position: int) -> torch.Generator:
    """The drafter's random stream for the round whose draft starts after ``position`` committed
    tokens: a function of (seed, position) alone, like the verifier's ``position_generator`` but
    mixed from a different seed (see draft_generator), so the two never share numbers. A draft
    made ahead of its verdict (proactive drafting) therefore draws exactly what the same round
    drafted after the verdict would, and a session's sampled output does not depend on timing."""
    from workers.rejection_sampling import position_generator

    mixed = (seed * 6364136223846793005 + 1442695040888963407) % (1 << 63)
    return position_generator(mixed, position)


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Cut a cache back to its first ``length`` tokens (transformers 5.x takes the count to
    remove, as a negative number; tested in tests/test_drafts.py)."""
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)


class DraftStrategy:
    """What the drafter service (workers/drafter.py) and the benchmark's traces (bench/traces.py)
    ask of a way of drafting; each kind overrides what it does. Called in a worker thread, one
    session's ``state`` (from ``new_state``) at a time; no sockets, no asyncio.

    A round: ``propose`` drafts up to ``gamma`` tokens after the committed ones; the verdict on
    that draft then ``commit``s its accepted prefix (the state keeps nothing of the rejected rest).
    ``rewind`` cuts the state back to a length, whatever was fed after it: a draft made ahead of
    its verdict (``supports_proactive``) that the verdict did not confirm. A verdict that carries
    the target's features (asked for with ``feature_layers``) goes to ``take_features``, whichever
    draft it judged: the one just committed or one the strategy has drafted past since."""

    kind = "model"  # the wire's drafter_kind, and the figures' key
    supports_proactive = False  # may draft past a proposal that is still out (rewind undoes it)
    feature_layers: tuple[int, ...] | list[int] = ()  # the target layers whose features its verdicts should bring
    tree_nodes = 0  # > 0: greedy rounds may ask ``propose(tree=True)`` for a token tree of this many tokens

    @property
    def tree_rows(self) -> int:
        """The verify rows a full tree round may take (the speculation policy prices them)."""
        return self.tree_nodes

    def _set_draft_shape(self, min_confidence: float, top_k: int, tree_nodes: int, gamma: int, tree_depth: int,
                         tree_branch: int) -> None:
        """The settings every model-backed kind shares (the class's ``[drafters.NAME]`` keys)."""
        self.min_confidence = min_confidence
        self.top_k = top_k
        # > 0: greedy rounds may draft a token tree of at most this many tokens, ``tree_depth`` levels
        # deep (0: ``gamma``), each level expanding its ``tree_branch`` likeliest paths (0: the default)
        self.tree_nodes = tree_nodes
        self.tree_depth = tree_depth or gamma
        self.tree_branch = tree_branch or DEFAULT_TREE_BRANCH

    def new_state(self):
        return None

    def match(self, committed: list[int]) -> int:
        """The length of the context repeat a round on ``committed`` drafts from, 0 when it
        drafts otherwise (the drafter service keeps acceptance figures per length)."""
        return 0

    def propose(self, state, committed: list[int], gamma: int, sampling: Sampling, generator, interrupt=None,
                tree: bool = False) -> Draft:
        raise NotImplementedError

    def commit(self, state, position: int, accepted: int) -> None:
        """The verdict on the last draft, proposed after ``position`` committed tokens, accepted
        ``accepted`` of its tokens. Nothing to do for a strategy that holds nothing past the context."""

    def rewind(self, state, length: int) -> None:
        """Keep what the state holds for the first ``length`` tokens only."""

    def take_features(self, state, verdict) -> None:
        """The target's features a verdict brought (``Verdict.features``, from ``features_start``)."""


def settle(strategy: DraftStrategy, state, position: int, verdict) -> None:
    """A verdict on the strategy's last draft (proposed after ``position`` committed tokens):
    keep what it accepted, and the features it brings."""
    strategy.commit(state, position, verdict.accepted)
    if verdict.features:
        strategy.take_features(state, verdict)


@dataclass
class ModelDraftState:
    cache: DynamicCache = field(default_factory=DynamicCache)
    cached: int = 0  # committed tokens whose keys/values are in the cache
    fed_drafts: int = 0  # draft tokens of the last proposal that went into the cache


class ModelDrafter(DraftStrategy):
    supports_proactive = True  # see rewind

    def __init__(self, model, *, min_confidence: float = 0.0, top_k: int = 8, tree_nodes: int = 0, gamma: int = 4,
                 tree_depth: int = 0, tree_branch: int = 0):
        self.model = model
        self._set_draft_shape(min_confidence, top_k, tree_nodes, gamma, tree_depth, tree_branch)
        self.device = next(model.parameters()).device

    def new_state(self) -> ModelDraftState:
        return ModelDraftState()

    def _step(self, state: ModelDraftState, tokens: list[int]) -> torch.Tensor:
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, cache=state.cache, use_cache=True)
        state.cache = out.cache
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def propose(self, state: ModelDraftState, committed: list[int], gamma: int, sampling: Sampling,
                generator: torch.Generator, interrupt=None, tree: bool = False) -> Draft:
        """``interrupt``: called between tokens; True ends the draft there (proactive drafting
        yields the model to a draft that is needed now). ``tree`` (with ``tree_nodes``, greedy
        only): the full token tree, ``tree_depth`` levels deep."""
        draft = Draft([])
        state.fed_drafts = 0
        if gamma <= 0:
            return draft
        logits = self._step(state, committed[state.cached:])
        state.cached = len(committed)
        if tree and self.tree_nodes and sampling.greedy:
            return self._tree(state, logits, self.tree_depth, self.tree_nodes)
        for k in range(gamma):
            token, confidence, top_ids, q = pick_token(logits, sampling, self.top_k, generator)
            if top_ids is not None:
                q_ids, q_probs = top_ids.tolist(), q.tolist()
            if k == 0:
                draft.confidence = confidence
            if confidence < self.min_confidence:
                break  # the drafter is unsure: let the target decide from here
            draft.tokens.append(token)
            if not sampling.greedy:
                draft.q_ids.append(q_ids)
                draft.q_probs.append(q_probs)
            if k + 1 < gamma and interrupt is not None and interrupt():
                draft.cut = True
                break
            if k + 1 < gamma:
                logits = self._step(state, [token])
                state.fed_drafts += 1
        return draft

    def _tree(self, state: ModelDraftState, logits: torch.Tensor, depth: int, size: int) -> Draft:
        """EAGLE-2's dynamic tree (workers/token_tree.py grow_tree) through the model's own KV cache:
        each level's expanded nodes go in one step, at their depth's position, under a mask that
        lets each see the committed context, its ancestors and itself. The tree's entries are cut
        from the cache after, so the next round feeds the accepted tokens as committed ones."""
        cached = state.cached
        fed: dict[int, int] = {}  # node -> its column among the tree entries in the cache
        dtype = next(self.model.parameters()).dtype
        blocked = torch.finfo(dtype).min

        def expand(level: int, picked: list[tuple[int, int, list[int]]]) -> torch.Tensor:
            width = state.cache.get_seq_length()
            mask = torch.full((len(picked), width + len(picked)), blocked, dtype=dtype)
            mask[:, :cached] = 0.0
            for row, (node, _, path) in enumerate(picked):
                fed[node] = width - cached + row
                for a in path:
                    mask[row, cached + fed[a]] = 0.0
            out = self.model(input_ids=torch.tensor([[token for _, token, _ in picked]], device=self.device),
                             position_ids=torch.full((1, len(picked)), cached - 1 + level, device=self.device),
                             attention_mask=mask[None, None].to(self.device), cache=state.cache, use_cache=True)
            return torch.log_softmax(out.logits[0].float(), -1)

        tokens, parents = grow_tree(torch.log_softmax(logits, -1), expand, depth, size, branch=self.tree_branch)
        crop_cache(state.cache, cached)
        return Draft(tokens, parents=parents)

    def commit(self, state: ModelDraftState, position: int, accepted: int) -> None:
        """The verifier accepted ``accepted`` draft tokens after ``position`` committed ones:
        keep the cache for those that were fed, drop the rejected rest. A proposal this drafter did
        not draft (a lookup draft, workers/lookup.py) fed nothing: the cache keeps what it held."""
        if state.cached >= position:
            state.cached = position + min(accepted, state.fed_drafts)
        crop_cache(state.cache, state.cached)

    def rewind(self, state: ModelDraftState, length: int) -> None:
        """Keep the cache's first ``length`` tokens only, whatever was fed after them. Proactive
        drafting feeds tokens in the order it assumes them (committed, draft, guess, next draft),
        so any prefix of the cache is a prefix of some context and only the valid one is kept."""
        state.cached = min(length, state.cache.get_seq_length())
        state.fed_drafts = 0
        crop_cache(state.cache, state.cached)


def lookup_draft(committed: list[int], gamma: int, ngram_max: int = 4, min_match: int = 1) -> tuple[list[int], int]:
    """(up to ``gamma`` tokens that followed the latest earlier occurrence of the longest suffix
    of ``committed`` of ``min_match`` .. ``ngram_max`` tokens, that suffix's length); ([], 0)
    when no such suffix occurred before. The search is bytes.rfind over the ids packed as 4-byte
    words (tens of microseconds on a 4096-token history, where a Python loop took a millisecond:
    the drafter service asks once per round, on its event loop)."""
    size = len(committed)
    if gamma <= 0 or size < 2:
        return [], 0
    data = array("I", committed).tobytes()
    for n in range(min(ngram_max, size - 1), max(1, min_match) - 1, -1):
        suffix = data[4 * (size - n):]
        end = 4 * (size - 1)  # an occurrence ends before the context's last token
        while (found := data.rfind(suffix, 0, end)) >= 0:
            if found % 4 == 0:  # aligned on a token, not inside one
                start = found // 4
                return committed[start + n:start + n + gamma], n
            end = found + len(suffix) - 1
    return [], 0


class NgramDrafter(DraftStrategy):
    """Context lookup (``lookup_draft``) and, with a ``datastore`` (workers/datastore.py), the
    target's earlier continuations behind it: the repeat's tokens first, then the datastore's,
    up to the round's length. ``min_match``: the shortest repeat drafted from (with a datastore
    a 1-token repeat is worse than the datastore's guess: 2.254 against 2.263 tokens per round
    on topic list 12's chats, 64 tokens each, from a datastore of topic list 11)."""

    kind = "ngram"
    supports_proactive = True

    def __init__(self, *, ngram_max: int = 4, datastore=None, min_match: int = 1):
        self.ngram_max = max(ngram_max, min_match)
        self.datastore = datastore
        self.min_match = min_match

    def match(self, committed: list[int]) -> int:
        """With a datastore, the length of the repeat a round drafts from (0: the datastore alone),
        so the drafter service keeps the two kinds' acceptance apart (workers/lookup.py)."""
        if self.datastore is None:
            return 0
        return lookup_draft(committed, 1, self.ngram_max, self.min_match)[1]

    def propose(self, state, committed: list[int], gamma: int, sampling: Sampling, generator, interrupt=None) -> Draft:
        tokens, _ = lookup_draft(committed, gamma, self.ngram_max, self.min_match)
        if self.datastore is not None and len(tokens) < gamma:
            tokens = tokens + self.datastore.draft(committed + tokens, gamma - len(tokens))
        return Draft(tokens)


def context_key(tokens: list[int]) -> str:
    """A short fingerprint of a whole committed context (the replay lookup key)."""
    return hashlib.blake2b(array("q", tokens).tobytes(), digest_size=12).hexdigest()


@dataclass
class ReplayState:
    true_features: int = 0  # positions whose target features the session's verdicts have brought


class ReplayDrafter(DraftStrategy):
    """Replays a recorded draft trace: ``{"kind": ..., "drafts": {context_key: [tokens, compute_s, match]}}``
    (``match``: the repeat length a lookup draft came from, 0 for the model's; older traces lack
    it), and for a drafter of token trees ``+ [parents, tree tokens, tree compute_s]``.

    Under greedy decoding a drafter's proposal is a function of the committed context, and a
    lossless verifier makes every session follow the recorded path, so each lookup hits. A miss
    (the context was never recorded) proposes nothing and is counted: the session still ends
    with the target's output, only slower.

    A feature class's drafts depend on more than the context: on how many of its last positions
    the head had no true feature for and chained over its own predicted ones, as it does when it
    drafts ahead of a verdict (workers/feature_drafter.py). Its trace keeps those drafts apart,
    ``"ahead": {context_key: [[tokens, compute_s] for 1, 2, ... chained positions]}``, and the
    replay counts the true features its verdicts brought (``take_features``) to pick the one its
    device would have made. A trace without them (an older one) does not draft ahead.
    """

    def __init__(self, path: str):
        with open(path, "rb") as fh:
            trace = msgpack.unpackb(fh.read())
        self.kind = trace["kind"]
        self.drafts: dict[str, list] = trace["drafts"]
        # a feature class's replay asks for the features its device would (they cross the link)
        self.feature_layers: list[int] = list(trace.get("feature_layers", []))
        self.ahead: dict[str, list] = trace.get("ahead") or {}
        self.feature_width = trace.get("feature_width", 0)  # fp16 values per position's features
        # a lookup finds any recorded context ahead of time too; a feature class, only with the
        # drafts made on predicted features (class docstring)
        self.supports_proactive = not self.feature_layers or bool(self.ahead)
        self.tree_nodes = trace.get("tree_nodes", 0)  # its drafts were recorded as token trees
        self.recorded_tree_rows = trace.get("tree_rows", self.tree_nodes)
        self.hits = 0
        self.misses = 0

    @property
    def tree_rows(self) -> int:
        return self.recorded_tree_rows

    def new_state(self) -> ReplayState:
        return ReplayState()

    def take_features(self, state: ReplayState, verdict) -> None:
        if self.feature_width:
            rows = len(verdict.features) // (2 * self.feature_width)
            state.true_features = max(state.true_features, verdict.features_start + rows)

    def propose(self, state, committed: list[int], gamma: int, sampling: Sampling, generator, interrupt=None,
                tree: bool = False) -> Draft:
        if not sampling.greedy:
            raise ValueError("a replayed drafter supports greedy decoding only")
        # positions before the last committed one that the head chains over (a draft made ahead);
        # none before the first verdict's features: the head has nothing to draft from, as recorded
        chained = len(committed) - 1 - state.true_features if self.feature_width and state.true_features else 0
        if chained > 0 and not tree:
            made = self.ahead.get(context_key(committed), [])
            entry = made[chained - 1] if gamma > 0 and chained <= len(made) else None
        else:
            entry = self.drafts.get(context_key(committed)) if gamma > 0 else None
        if entry is None:
            # a draft made ahead (interrupt given) on a wrong guess asks for a context the recorded
            # path never had: not a miss of the trace
            self.misses += gamma > 0 and interrupt is None
            return Draft([])
        self.hits += 1
        tokens, compute_s = entry[0], entry[1]
        if tree and len(entry) > 5:  # the recorded token tree (drawn whole, whatever gamma)
            return Draft(list(entry[4]), compute_s=entry[5], parents=list(entry[3]))
        if 0 < gamma < len(tokens):  # a shorter draft than the recorded one costs its share of the time
            compute_s *= gamma / len(tokens)
        return Draft(list(tokens[:gamma]), compute_s=compute_s)

    def match(self, committed: list[int]) -> int:
        """As LookupDrafter.match, from the recording."""
        entry = self.drafts.get(context_key(committed))
        return entry[2] if entry is not None and len(entry) > 2 else 0


def target_datastore(datastore: str, target_spec: str):
    """The datastore a drafter config names, or None where it names none or one built for another
    vocabulary than the target's (its ids would be refused by the verifier, or be other tokens)."""
    if not datastore:
        return None
    from pipeline.models import vocab_size
    from workers.datastore import load_datastore

    store = load_datastore(datastore)
    vocab = vocab_size(target_spec)
    if store.meta["vocab_size"] != vocab:
        log.warning("datastore_not_for_this_target", datastore=datastore, built_for=store.meta.get("target"),
                    vocab_size=store.meta["vocab_size"], target=target_spec, target_vocab_size=vocab)
        return None
    return store


def ngram_drafter(target_spec: str, ngram_max: int = 4, datastore: str = "", lookup_min_match: int = 0) -> NgramDrafter:
    """The n-gram kind (config.toml's ``datastore``, ``lookup_min_match``; also the benchmark's class)."""
    return NgramDrafter(ngram_max=ngram_max, datastore=target_datastore(datastore, target_spec),
                        min_match=max(1, lookup_min_match))


def build_drafter(cfg, target_spec: str):
    """Build the strategy a drafter config names (``cfg`` is a DrafterConfig)."""
    strategy = _build_strategy(cfg, target_spec)
    if cfg.kind not in ("model", "feature") or cfg.replay:
        return strategy
    from workers.lookup import with_lookup

    # the datastore drafts where the drafter is unsure, and branches its trees (workers/lookup.py)
    store = target_datastore(cfg.datastore, target_spec)
    return with_lookup(strategy, min_match=cfg.lookup_min_match, ngram_max=cfg.ngram_max, datastore=store)


def _build_strategy(cfg, target_spec: str):
    if cfg.replay:
        return ReplayDrafter(cfg.replay)
    if cfg.kind == "ngram":
        return ngram_drafter(target_spec, cfg.ngram_max, cfg.datastore, cfg.lookup_min_match)
    if cfg.kind == "feature":
        from pipeline.models import load_causal_lm
        from workers.feature_drafter import FeatureDrafter
        from workers.feature_head import FEATURE_DIR, load_head

        # the head's embeddings and vocabulary rows are the target's, read from its package
        target = load_causal_lm(target_spec, dtype="float32")
        head = load_head(target, Path(cfg.model) if cfg.model else FEATURE_DIR)
        del target
        if cfg.prepack:
            head.prepack()
        return FeatureDrafter(head, min_confidence=cfg.min_confidence, top_k=cfg.top_k, tree_nodes=cfg.tree_nodes,
                              gamma=cfg.gamma, tree_depth=cfg.tree_depth, tree_branch=cfg.tree_branch)
    if cfg.kind != "model":
        raise ValueError(f"unknown drafter kind {cfg.kind!r} (model, feature or ngram)")
    if cfg.model.startswith("ladder:"):
        from training.ladder import load_rung  # the trained drafter ladder (issue 4)

        model = load_rung(cfg.model.removeprefix("ladder:"), target_spec=target_spec, dtype=cfg.dtype)
    else:
        from pipeline.models import load_causal_lm

        model = load_causal_lm(cfg.model, dtype=cfg.dtype)
    if cfg.prepack:
        from workers.packed_linear import prepack_linears

        prepack_linears(model)
    from workers.translating_drafter import TranslatingDrafter, tokenizers_to_translate

    tokenizers = tokenizers_to_translate(cfg, target_spec)  # a drafter of another model family
    if tokenizers:
        return TranslatingDrafter(model, *tokenizers, min_confidence=cfg.min_confidence, top_k=cfg.top_k)
    return ModelDrafter(model, min_confidence=cfg.min_confidence, top_k=cfg.top_k, tree_nodes=cfg.tree_nodes,
                        gamma=cfg.gamma, tree_depth=cfg.tree_depth, tree_branch=cfg.tree_branch)
