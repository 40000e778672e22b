"""The target model's side of verification: per-session KV caches and one batched forward.

Each session's cache holds the keys/values of every committed token except the last one, which
is fed together with the draft in the next round. A round therefore costs the target exactly
``1 + len(draft)`` new tokens, whatever the history length (the KV-reuse property); rejected
positions are cut off after the forward.

Sessions of one batch have different cache lengths and draft lengths. They share one forward:
caches are left-padded to the longest (masked out), new tokens right-padded (their outputs are
ignored; causality keeps real rows from seeing them), and position ids given explicitly.
Nothing here touches sockets or the event loop: the worker calls :meth:`verify_batch` in a
thread.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from pipeline.config import LimitsConfig
from pipeline.figures import VerifierFigures
from pipeline.protocol import ErrorCode, Propose, Sampling, SledError, Verdict
from workers.rejection_sampling import position_generator, target_probs, verify_greedy, verify_sampling
from workers.token_tree import tree_inputs, verify_tree_greedy
from workers.prefill import plan_prefill

# One tensor per session: [layers, 2 (keys, values), kv_heads, length, head_dim]. One tensor, not
# one per layer, so that gathering B sessions into a batch and scattering them back costs O(B)
# copies instead of O(B x layers) -- on a GPU those small copies dominated the forward pass.
KV = torch.Tensor
# A (re)built session returns the features of at most this many history positions, the latest
# ones: a feature drafter's head only needs recent context, and a frame stays well under
# limits.max_message_bytes (256 rows x 576 x 2 bytes = 295 kB for the default target).
MAX_PREFILL_FEATURE_ROWS = 256


@dataclass
class SessionState:
    session_id: str
    committed: int  # tokens committed so far (the drafter's "position")
    last_token: int  # committed, not yet in the cache
    kv: KV | None  # None while the cache is empty (a one-token history)
    sampling: Sampling
    drafter_kind: str = ""
    last_used: float = field(default_factory=time.monotonic)
    # features of history positions computed by a (re)build, sent with this round's verdict
    prefill_features: torch.Tensor | None = None
    prefill_features_start: int = 0

    @property
    def cached(self) -> int:
        return 0 if self.kv is None else self.kv.shape[3]

    def nbytes(self) -> int:
        return 0 if self.kv is None else self.kv.nbytes


VerifierStats = VerifierFigures  # the counters are declared once, where they cross the wire


class TargetVerifier:
    def __init__(self, model, *, max_sessions: int, limits: LimitsConfig, prefill_chunk_tokens: int = 512):
        self.model = model
        # with a device_map the inputs go where the embeddings are
        self.device = model.get_input_embeddings().weight.device
        self.vocab_size = model.config.vocab_size
        self.max_sessions = max_sessions
        self.limits = limits
        # padded tokens per prefill forward (workers/prefill.py); 0: one whole history per forward
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.sessions: OrderedDict[str, SessionState] = OrderedDict()  # LRU order
        self.stats = VerifierStats()

    # --- session bookkeeping -------------------------------------------------------------

    def _drop(self, session_id: str) -> bool:
        """Forget a session and free its cache (a backend with its own storage overrides this)."""
        return self.sessions.pop(session_id, None) is not None

    def close(self, session_id: str) -> bool:
        found = self._drop(session_id)
        self.stats.closed += found
        self._refresh_stats()
        return found

    def _refresh_stats(self) -> None:
        self.stats.sessions = len(self.sessions)
        self.stats.cache_bytes = sum(s.nbytes() for s in self.sessions.values())

    def evict_idle(self, idle_s: float) -> int:
        """Free caches unused for ``idle_s`` seconds (their drafter may be gone for good)."""
        cutoff = time.monotonic() - idle_s
        stale = [sid for sid, state in self.sessions.items() if state.last_used < cutoff]
        for sid in stale:
            self._drop(sid)
        self.stats.evictions += len(stale)
        if stale:
            self._refresh_stats()
        return len(stale)

    def _evict_to_fit(self) -> None:
        while len(self.sessions) >= self.max_sessions:
            self.sessions.popitem(last=False)
            self.stats.evictions += 1

    # --- validation ----------------------------------------------------------------------

    def _check_ids(self, ids: list[int], what: str) -> None:
        for t in ids:
            if not 0 <= t < self.vocab_size:
                raise SledError(ErrorCode.INVALID, f"{what}: token id {t} outside [0, {self.vocab_size})")

    def _validate(self, item: Propose) -> None:
        """Only what needs the model: the broker has checked every other rule (pipeline/rules.py)."""
        self._check_ids(item.draft, "draft")
        if item.history is not None:
            self._check_ids(item.history, "history")
        for ids in item.q_ids:
            self._check_ids(ids, "q_ids")
        layers = self.model.config.num_hidden_layers
        if any(i > layers for i in item.feature_layers):
            raise SledError(ErrorCode.INVALID, f"feature_layers: indices must be in -1..{layers}")

    # --- forward passes ------------------------------------------------------------------

    def _open(self, item: Propose) -> SessionState:
        """(Re)build a session from its full history. Its cache stays empty until ``_prefill``
        runs the batch's new histories together (all but each history's last token)."""
        self.sessions.pop(item.session_id, None)
        self._evict_to_fit()
        history = item.history
        state = SessionState(item.session_id, len(history), history[-1], None, item.sampling, item.drafter_kind)
        self.sessions[item.session_id] = state
        return state

    def _prefill(self, jobs: list[tuple[SessionState, list[int], list[int]]]) -> None:
        """Fill the caches of freshly opened sessions: ``(state, tokens, feature_layers)`` each,
        in the forwards ``plan_prefill`` gives, and keep the latest history features asked for."""
        jobs = [job for job in jobs if job[1]]
        if not jobs:
            return
        cpu = time.process_time()
        features: list[list[torch.Tensor]] = [[] for _ in jobs]
        for forward in plan_prefill([len(tokens) for _, tokens, _ in jobs], self.prefill_chunk_tokens):
            states = [jobs[s.index][0] for s in forward]
            rows = [jobs[s.index][1][s.start : s.stop] for s in forward]
            want = any(jobs[s.index][2] for s in forward)
            _, kv, past, hidden = ragged_forward(self.model, self.device, [st.kv for st in states], rows,
                                                 hidden=want, logits=False)
            for row, (s, state) in enumerate(zip(forward, states)):
                state.kv = session_kv(kv, row, past - state.cached, past + s.stop - s.start)
                if jobs[s.index][2]:
                    picked = pick_hidden(hidden, jobs[s.index][2])[row, : s.stop - s.start]
                    features[s.index].append(picked[-MAX_PREFILL_FEATURE_ROWS:])
            self.stats.prefill_forwards += 1
        self._prefilled(jobs, features, cpu)

    def _failed(self, item: Propose, exc: SledError) -> Verdict:
        """This item's error verdict (the rest of the batch goes on), counted by code."""
        self.stats.item_errors += 1
        self.stats.errors[exc.code] = self.stats.errors.get(exc.code, 0) + 1
        return Verdict(item.session_id, item.round, 0, 0, exc.code, exc.detail)

    def _prefilled(self, jobs: list, features: list[list[torch.Tensor]], cpu: float) -> None:
        """After a batch's prefill forwards (either backend): keep each session's latest history
        features for its verdict, and count the work."""
        for (state, tokens, _), rows in zip(jobs, features):
            if rows:
                state.prefill_features = torch.cat(rows)[-MAX_PREFILL_FEATURE_ROWS:]
                state.prefill_features_start = len(tokens) - state.prefill_features.shape[0]
        self.stats.prefills += len(jobs)
        self.stats.prefill_tokens += sum(len(tokens) for _, tokens, _ in jobs)
        self.stats.target_tokens += sum(len(tokens) for _, tokens, _ in jobs)
        self.stats.prefill_cpu_s += time.process_time() - cpu

    def _state_for(self, item: Propose) -> SessionState:
        if item.history is not None:
            return self._open(item)
        state = self.sessions.get(item.session_id)
        if state is None:
            raise SledError(ErrorCode.UNKNOWN_SESSION, "session not held by this verifier; resend the history")
        if state.committed != item.position:
            raise SledError(
                ErrorCode.OUT_OF_SYNC, f"verifier is at position {state.committed}, proposal at {item.position}"
            )
        self.sessions.move_to_end(item.session_id)
        state.last_used = time.monotonic()
        return state

    def _forward(self, states: list[SessionState], drafts: list[list[int]], hidden: bool,
                 parents: list[list[int]] | None = None):
        rows = [[s.last_token, *d] for s, d in zip(states, drafts)]
        out = ragged_forward(self.model, self.device, [s.kv for s in states], rows, hidden=hidden, parents=parents)
        self.stats.verify_tokens += sum(map(len, rows))
        self.stats.target_tokens += sum(map(len, rows))
        self.stats.padded_tokens += len(rows) * max(map(len, rows))
        return out

    @torch.inference_mode()
    def verify_batch(self, items: list[Propose]) -> list[Verdict]:
        started = time.perf_counter()
        verdicts: list[Verdict | None] = [None] * len(items)
        ready: list[tuple[int, Propose, SessionState]] = []
        for index, item in enumerate(items):
            try:
                self._validate(item)
                if any(item.session_id == other.session_id for _, other, _ in ready):
                    raise SledError(ErrorCode.INVALID, "two proposals for one session in one batch")
                ready.append((index, item, self._state_for(item)))
            except SledError as exc:
                verdicts[index] = self._failed(item, exc)
        if ready:
            self._prefill([(state, item.history[:-1], item.feature_layers)
                           for _, item, state in ready if item.history is not None])
            states = [s for _, _, s in ready]
            drafts = [item.draft for _, item, _ in ready]
            logits, kv, past, hidden = self._forward(states, drafts, any(item.feature_layers for _, item, _ in ready),
                                                     [item.parents for _, item, _ in ready])
            for row, (index, item, state) in enumerate(ready):
                rows = logits[row, : 1 + len(item.draft)]
                path: list[int] = []
                if item.parents:  # a token tree: greedy only (pipeline/rules.py)
                    path, token = verify_tree_greedy(rows.argmax(-1).tolist(), item.draft, item.parents)
                    accepted = len(path)
                elif state.sampling.greedy:
                    accepted, token = verify_greedy(rows, item.draft)
                else:
                    probs = target_probs(rows, state.sampling)
                    # draws derived from (seed, position): a resync continues the stream, never repeats it
                    generator = position_generator(state.sampling.seed, state.committed)
                    accepted, token = verify_sampling(probs, item.draft, item.q_ids, item.q_probs, generator)
                # keep the cache through the last committed token and the accepted draft tokens
                kept = [0, *(1 + node for node in path)] if path else list(range(1 + accepted))
                state.kv = session_kv(kv, row, past - state.cached, past + 1 + accepted,
                                      [past + i for i in kept] if path else None)
                features, start = b"", 0
                if item.feature_layers:
                    features, start = self._features(state, pick_hidden(hidden, item.feature_layers)[row, kept])
                state.committed += accepted + 1
                state.last_token = token
                self.stats.draft_tokens += len(item.draft)
                self.stats.accepted_tokens += accepted
                verdicts[index] = Verdict(item.session_id, item.round, accepted, token, features=features,
                                          features_start=start, path=path)
        self.stats.batches += 1
        self.stats.items += len(ready)
        self.stats.compute_s += time.perf_counter() - started
        self._refresh_stats()
        return verdicts  # type: ignore[return-value]


    def _features(self, state: SessionState, rows: torch.Tensor) -> tuple[bytes, int]:
        """fp16 bytes of this round's feature rows (the token fed first, at position
        committed - 1, and the accepted drafts), after any history features of a rebuild."""
        start = state.committed - 1
        if state.prefill_features is not None:
            rows = torch.cat((state.prefill_features, rows))
            start = state.prefill_features_start
            state.prefill_features = None
        return rows.to(torch.float16).cpu().numpy().tobytes(), start


def pick_hidden(hidden_states, layers: list[int]) -> torch.Tensor:
    """[batch, tokens, len(layers) x hidden] from transformers' output_hidden_states tuple."""
    return torch.cat([hidden_states[i] for i in layers], dim=-1)


def ragged_forward(model, device, kvs: list[KV | None], rows: list[list[int]], *, hidden: bool = False,
                   logits: bool = True, parents: list[list[int]] | None = None):
    """One forward over several sequences with different cached lengths and new-token counts.

    ``kvs[i]`` caches sequence i's earlier tokens (None: nothing cached); ``rows[i]`` are its new
    tokens (at least one). Caches are left-padded to the longest (masked out), new tokens
    right-padded (their outputs are ignored; causality keeps real rows from seeing them), and
    position ids given explicitly. Returns the logits ``[batch, width, vocab]``, the whole cache
    after the forward as (keys, values), each ``[layers, batch, heads, past + width, dim]``, ``past``,
    the padded cache length (sequence i's new tokens sit at ``past .. past + len(rows[i])``), and
    with ``hidden`` transformers' output_hidden_states tuple (else None). ``logits=False`` runs the
    base model without the head (a prefill needs only the cache) and returns None for the logits.
    ``parents[i]`` (non-empty): row i's new tokens after the first are a token tree, token 1 + j
    continuing token 1 + parents[i][j] (the first token when -1); each sits at its depth's
    position and sees only its ancestors among the new tokens (a 4-D mask).
    Used by the verifier and by the server-side drafting baseline of the benchmarks.
    """
    batch = len(rows)
    lengths = [0 if kv is None else kv.shape[3] for kv in kvs]
    past = max(lengths)
    width = max(map(len, rows))
    input_ids = torch.zeros((batch, width), dtype=torch.long)
    mask = torch.zeros((batch, past + width), dtype=torch.long)
    positions = torch.zeros((batch, width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, past - lengths[i] : past + len(row)] = 1
        positions[i] = torch.arange(lengths[i], lengths[i] + width)
    cache = DynamicCache()
    if past > 0:
        reference = next(kv for kv in kvs if kv is not None)
        layers, _, heads, _, dim = reference.shape
        stacked = reference.new_zeros((layers, 2, batch, heads, past, dim))
        for i, kv in enumerate(kvs):
            if lengths[i]:  # left-padded: each sequence's cache ends where the new tokens start
                stacked[:, :, i, :, past - lengths[i] :] = kv
        cache = DynamicCache(ddp_cache_data=[(stacked[layer, 0], stacked[layer, 1]) for layer in range(layers)])
    attention = mask
    if parents and any(parents):
        trees = tree_inputs(parents, batch, width)
        positions = torch.tensor(lengths)[:, None] + trees["depths"]
        allowed = torch.cat((mask[:, None, :past].expand(batch, width, past).bool(), trees["tree"]), 2)
        allowed[:, :, past:] &= mask[:, None, past:].bool()
        dtype = model.get_input_embeddings().weight.dtype
        attention = torch.zeros((batch, 1, width, past + width), dtype=dtype).masked_fill(
            ~allowed[:, None], torch.finfo(dtype).min)  # additive: transformers takes a 4-D mask as given
    out = (model if logits else model.base_model)(
        input_ids=input_ids.to(device),
        attention_mask=attention.to(device),
        position_ids=positions.to(device),
        cache=cache,
        use_cache=True,
        output_hidden_states=hidden,
    )
    keys = torch.stack([layer.keys for layer in out.cache.layers])  # [layers, batch, heads, len, dim]
    values = torch.stack([layer.values for layer in out.cache.layers])
    return out.logits if logits else None, (keys, values), past, out.hidden_states if hidden else None


def session_kv(kv: tuple[torch.Tensor, torch.Tensor], row: int, start: int, stop: int,
               new: list[int] | None = None) -> KV:
    """Sequence ``row``'s cache positions ``start:stop`` out of a ragged_forward cache, as one
    tensor [layers, 2, heads, length, dim] (one copy). ``new``: take these positions after the
    cached ones instead (a token tree's accepted path, in order)."""
    keys, values = kv
    if new is not None:
        index = torch.tensor([*range(start, new[0]), *new], device=keys.device)
        return torch.stack((keys[:, row, :, index], values[:, row, :, index]), dim=1)
    return torch.stack((keys[:, row, :, start:stop], values[:, row, :, start:stop]), dim=1)
