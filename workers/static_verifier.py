"""The static verifier backend (``verifier.backend = "static"``): a paged KV pool allocated once,
one forward per round over padded bucket shapes, acceptance on the device.

Same contract as workers/target.py's ``TargetVerifier`` (validation, sessions, LRU eviction,
errors per item, statistics; it is a subclass), different model side:

* KV memory: ``PagedKV`` (workers/static_model.py), ``verifier.kv_cache_mb`` of pages of
  ``PAGE_SIZE`` tokens. A session holds the pages its length needs and keeps them across
  rounds; accepting a prefix of the draft is a length update, pages past it go back to the pool.
  A full pool evicts least recently used sessions that are not in the round.
* Shapes: compiled (``verifier.compile``, on CUDA by default), the batch is padded to
  (sessions, tokens, pages) buckets, so the forward meets few shapes and replays a CUDA graph
  per bucket (``torch.compile(mode="reduce-overhead")``). Uncompiled, it computes the batch's
  real rows only (``StaticModel``'s ``packed``): on a CPU a forward costs about in proportion to
  the rows it computes, and padding every session to the longest draft (a tree beside one-token
  rounds) cost up to 2.8x the time (bench/ragged_forward.py).
* No host syncs inside a round: the inputs go to the device, the forward and
  workers/rejection_sampling_batched.py run there, and one ``tolist()`` brings the verdicts back.

Prefill (new sessions' histories) runs the same forward uncompiled, several sessions per forward
in chunks under ``verifier.prefill_chunk_tokens`` (workers/prefill.py), before the verify forward.
Architectures the static forward does not cover fall back to the eager backend (``make_verifier``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import structlog
import torch

from pipeline.config import Config, LimitsConfig
from pipeline.protocol import ErrorCode, Propose, SledError, Verdict
from workers.rejection_sampling import position_generator
from workers.rejection_sampling_batched import accept_batch
from workers.packed_linear import prepack_linears
from workers.prefill import plan_prefill
from workers.token_tree import tree_inputs, verify_tree_greedy
from workers.static_model import PagedKV, StaticModel, supports
from workers.target import MAX_PREFILL_FEATURE_ROWS, SessionState, TargetVerifier

log = structlog.get_logger("sled.verifier")

PAGE_SIZE = 16
SESSION_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (1, 2, 3, 5, 9, 17, 25, 33)  # 1 + gamma for gamma = 0, 1, 2, 4, 8, 16; trees with a lookup branch


def bucket(n: int, sizes: tuple[int, ...]) -> int:
    for size in sizes:
        if n <= size:
            return size
    return n  # beyond the largest bucket: its own shape


def pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def packed_rows(counts: list[int], width: int) -> torch.Tensor | None:
    """Flat indices (b * width + t) of the real tokens of rows holding ``counts`` tokens each,
    or None when nothing is padding."""
    if all(count == width for count in counts):
        return None
    return torch.tensor([row * width + t for row, count in enumerate(counts) for t in range(count)], dtype=torch.long)


@dataclass
class PagedSession(SessionState):
    pages: list[int] = field(default_factory=list)
    length: int = 0  # tokens whose keys/values are in the pool

    @property
    def cached(self) -> int:
        return self.length

    def nbytes(self) -> int:
        return 0  # the pool is counted once, in _refresh_stats


class StaticVerifier(TargetVerifier):
    backend = "static"

    def __init__(self, model, *, max_sessions: int, limits: LimitsConfig, kv_cache_mb: float = 1024.0,
                 compile: bool = False, prefill_chunk_tokens: int = 512):
        super().__init__(model, max_sessions=max_sessions, limits=limits, prefill_chunk_tokens=prefill_chunk_tokens)
        config = model.config
        dtype = model.get_input_embeddings().weight.dtype
        heads = config.num_key_value_heads
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        page_bytes = 2 * config.num_hidden_layers * heads * PAGE_SIZE * dim * torch.finfo(dtype).bits // 8
        pages = int(kv_cache_mb * 2**20 // page_bytes)
        longest = limits.max_history_tokens + limits.max_draft_tokens + 1  # a full history, then a round's rows
        if pages * PAGE_SIZE < longest:
            raise ValueError(f"verifier.kv_cache_mb={kv_cache_mb} holds {pages * PAGE_SIZE} tokens, "
                             f"less than one session of limits.max_history_tokens={limits.max_history_tokens} "
                             f"and a round of limits.max_draft_tokens={limits.max_draft_tokens}")
        self.kv = PagedKV(config, pages=pages, page_size=PAGE_SIZE, dtype=dtype, device=self.device)
        self.net = StaticModel(model, self.kv)
        self.step = self.net
        if compile:
            # one graph per (sessions, tokens, pages) bucket: more than dynamo's default 8
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
            self.step = torch.compile(self.net, mode="reduce-overhead", dynamic=False)
        self.compiled = compile
        self.busy: set[str] = set()  # sessions of the round being built: never evicted for pages
        log.info("static_backend", pages=pages, page_size=PAGE_SIZE, pool_mb=round(pages * page_bytes / 2**20, 1),
                 compile=compile, device=str(self.device))

    # --- pages ---------------------------------------------------------------------------

    def _drop(self, session_id: str) -> bool:
        state = self.sessions.pop(session_id, None)
        if state is not None:
            self.kv.shrink(state.pages, 0)
        return state is not None

    def _evict_to_fit(self) -> None:
        # never a session of the round being built: its pages are about to be read and written
        while len(self.sessions) >= self.max_sessions:
            victim = next((sid for sid in self.sessions if sid not in self.busy), None)
            if victim is None:
                raise SledError(ErrorCode.OVERLOADED, f"all {self.max_sessions} sessions are in this round; retry")
            self._drop(victim)
            self.stats.evictions += 1

    def _reserve(self, state: PagedSession, tokens: int) -> None:
        """Pages for ``tokens`` tokens, evicting idle-most sessions outside this round when short."""
        while not self.kv.grow(state.pages, tokens):
            victim = next((sid for sid in self.sessions if sid not in self.busy and sid != state.session_id), None)
            if victim is None:
                raise SledError(ErrorCode.OVERLOADED, "the verifier's KV pool is full; retry")
            self._drop(victim)
            self.stats.evictions += 1

    def _refresh_stats(self) -> None:
        self.stats.sessions = len(self.sessions)
        self.stats.cache_bytes = (self.kv.pages - len(self.kv.free)) * self.kv.page_bytes()

    def _table(self, pages: list[list[int]], width: int) -> torch.Tensor:
        table = torch.full((len(pages), width), self.kv.spare, dtype=torch.long)
        for row, held in enumerate(pages):
            table[row, : len(held)] = torch.tensor(held, dtype=torch.long)
        return table

    # --- forward passes ------------------------------------------------------------------

    def _open(self, item: Propose) -> PagedSession:
        """A session rebuilt from its history: pages are reserved by ``verify_batch`` and filled by
        ``_prefill`` together with the batch's other new histories."""
        self._drop(item.session_id)
        self._evict_to_fit()
        history = item.history
        state = PagedSession(item.session_id, len(history), history[-1], None, item.sampling,
                             drafter_kind=item.drafter_kind)
        self.sessions[item.session_id] = state
        return state

    def _prefill(self, jobs: list[tuple[PagedSession, list[int], list[int]]]) -> None:
        """Write freshly opened sessions' histories into their pages (reserved already), several
        sessions per forward under the chunk budget (workers/prefill.py), uncompiled: prefill
        shapes vary too much for a graph per bucket. Keeps the latest history features asked for."""
        jobs = [job for job in jobs if job[1]]
        if not jobs:
            return
        cpu = time.process_time()
        features: list[list[torch.Tensor]] = [[] for _ in jobs]
        for forward in plan_prefill([len(tokens) for _, tokens, _ in jobs], self.prefill_chunk_tokens):
            states = [jobs[s.index][0] for s in forward]
            width = max(s.stop - s.start for s in forward)
            ids = torch.zeros((len(forward), width), dtype=torch.long)
            for row, s in enumerate(forward):
                ids[row, : s.stop - s.start] = torch.tensor(jobs[s.index][1][s.start : s.stop])
            lengths = torch.tensor([state.length for state in states], dtype=torch.long)
            # the padding past a row's slice is not computed (packed) and writes nothing; the table
            # still spans the padded width, which the attention's layout keeps
            span = max(self.kv.pages_for(max(lengths.tolist()) + width), *(len(state.pages) for state in states))
            table = self._table([state.pages for state in states], span)
            layers = tuple(sorted({i for s in forward for i in jobs[s.index][2]}))
            packed = packed_rows([s.stop - s.start for s in forward], width)
            _, hidden = self.net(ids.to(self.device), lengths.to(self.device), table.to(self.device),
                                 hidden_layers=layers, logits=False,
                                 packed=None if packed is None else packed.to(self.device))
            for row, (s, state) in enumerate(zip(forward, states)):
                state.length += s.stop - s.start
                asked = jobs[s.index][2]
                if asked:  # [layers, B, T, H] -> this row's [T, asked layers x H], the latest rows
                    rows = torch.cat([hidden[layers.index(i), row, : s.stop - s.start] for i in asked], dim=-1)
                    features[s.index].append(rows[-MAX_PREFILL_FEATURE_ROWS:])
            self.stats.prefill_forwards += 1
        self._prefilled(jobs, features, cpu)

    def _inputs(self, states: list[PagedSession], items: list[Propose]) -> dict:
        batch, width = len(states), 1 + max(len(item.draft) for item in items)
        span = max(self.kv.pages_for(s.length + width) for s in states)
        if self.compiled:  # shapes that repeat, so each bucket's graph is captured once and replayed
            batch, width, span = bucket(batch, SESSION_BUCKETS), bucket(width, TOKEN_BUCKETS), pow2(span)
        # uncompiled, padding is pure waste: a CPU forward costs about in proportion to its rows
        k = max([1, *(len(row) for item in items for row in item.q_ids)])
        ids = torch.zeros((batch, width), dtype=torch.long)
        lengths = torch.zeros(batch, dtype=torch.long)
        draft = torch.zeros((batch, width - 1), dtype=torch.long)
        n_draft = torch.zeros(batch, dtype=torch.long)
        greedy = torch.ones(batch, dtype=torch.bool)
        temperature = torch.ones(batch)
        top_p = torch.ones(batch)
        q_ids = torch.zeros((batch, width - 1, k), dtype=torch.long)
        q_probs = torch.zeros((batch, width - 1, k))
        uniforms = torch.zeros((batch, width))
        for row, (state, item) in enumerate(zip(states, items)):
            n = len(item.draft)
            ids[row, : n + 1] = torch.tensor([state.last_token, *item.draft])
            lengths[row] = state.length
            draft[row, :n] = torch.tensor(item.draft, dtype=torch.long)
            n_draft[row] = n
            if state.sampling.greedy:
                continue
            greedy[row] = False
            temperature[row] = state.sampling.temperature
            top_p[row] = state.sampling.top_p
            for i, x in enumerate(item.draft):
                if item.q_ids:
                    q_ids[row, i, : len(item.q_ids[i])] = torch.tensor(item.q_ids[i])
                    q_probs[row, i, : len(item.q_probs[i])] = torch.tensor(item.q_probs[i])
                else:  # ids only: q is a point mass on the draft token
                    q_ids[row, i, 0], q_probs[row, i, 0] = x, 1.0
            # the round's draws depend on (seed, position) alone, so a rebuilt session continues its stream
            generator = position_generator(state.sampling.seed, state.committed)
            uniforms[row, :n] = torch.rand(n, generator=generator)
            uniforms[row, -1] = torch.rand((), generator=generator)
        table = self._table([s.pages for s in states] + [[]] * (batch - len(states)), span)
        tensors = dict(ids=ids, lengths=lengths, table=table, draft=draft, n_draft=n_draft, greedy=greedy,
                       temperature=temperature, top_p=top_p, q_ids=q_ids, q_probs=q_probs, uniforms=uniforms)
        if any(item.parents for item in items):
            tensors.update(tree_inputs([item.parents for item in items], batch, width))
        if not self.compiled:  # a ragged batch computes its real rows only (StaticModel's ``packed``)
            packed = packed_rows([1 + len(item.draft) for item in items], width)
            if packed is not None:
                tensors["packed"] = packed
        out = {name: t.to(self.device, non_blocking=True) for name, t in tensors.items()}
        out["sampling"] = not bool(greedy.all())
        return out

    def forward_round(self, states: list[PagedSession], items: list[Propose]) -> tuple[list[tuple[int, int]], dict]:
        """One verify forward and acceptance for ``items``. The verdicts come back in one transfer;
        hidden states, when a proposal asked for features, in one more (``{layer: [B, T, H]}`` on the host)."""
        x = self._inputs(states, items)
        layers = tuple(sorted({i for item in items for i in item.feature_layers}))
        trees = {name: x[name] for name in ("depths", "tree") if name in x}
        shape = {name: x[name] for name in ("packed",) if name in x}
        try:
            logits, hidden = self.step(x["ids"], x["lengths"], x["table"], hidden_layers=layers, **trees, **shape)
        except Exception as exc:
            if self.step is self.net:
                raise
            # a compiler failure (a torch or driver version it does not handle) must not fail every
            # round: serve uncompiled, which the tests check against the target, and say so once
            log.warning("static_compile_failed", error=repr(exc)[:500], fallback="uncompiled")
            self.step, self.compiled = self.net, False
            logits, hidden = self.step(x["ids"], x["lengths"], x["table"], hidden_layers=layers, **trees, **shape)
        verdicts = accept_batch(logits, x["draft"], x["n_draft"], x["greedy"], x["temperature"], x["top_p"],
                                x["q_ids"], x["q_probs"], x["uniforms"], x["sampling"])
        rows = sum(1 + len(item.draft) for item in items)
        self.stats.verify_tokens += rows
        self.stats.target_tokens += rows  # prefill + verify, as the eager backend counts them
        self.stats.padded_tokens += len(x["packed"]) if "packed" in x else x["ids"].numel()  # rows computed
        results = [(accepted, token, []) for accepted, token in verdicts[: len(items)].tolist()]
        if trees:  # a tree row's verdict is a walk down its tree (greedy only: pipeline/rules.py)
            best = logits[: len(items)].argmax(-1).tolist()
            for row, item in enumerate(items):
                if item.parents:
                    path, token = verify_tree_greedy(best[row], item.draft, item.parents)
                    results[row] = (len(path), token, path)
        features = dict(zip(layers, hidden[:, : len(items)].cpu())) if layers else {}
        return results, features

    def _keep_path(self, state: PagedSession, path: list[int]) -> None:
        """Move a tree's accepted tokens' keys/values to the slots right after the last committed
        token (their order along the path), so the session's cache is a plain prefix again."""
        moves = [(state.length + 1 + node, state.length + depth) for depth, node in enumerate(path, 1)
                 if node + 1 != depth]
        if not moves:
            return
        page = self.kv.page_size
        src, dst = zip(*moves)
        src_pages = torch.tensor([state.pages[s // page] for s in src], device=self.device)
        dst_pages = torch.tensor([state.pages[d // page] for d in dst], device=self.device)
        src_at = torch.tensor([s % page for s in src], device=self.device)
        dst_at = torch.tensor([d % page for d in dst], device=self.device)
        for pool in (self.kv.keys, self.kv.values):  # [layers, pages + 1, kv_heads, page, dim]
            pool[:, dst_pages, :, dst_at] = pool[:, src_pages, :, src_at]

    @torch.inference_mode()
    def verify_batch(self, items: list[Propose]) -> list[Verdict]:
        started = time.perf_counter()
        verdicts: list[Verdict | None] = [None] * len(items)
        ready: list[tuple[int, Propose, PagedSession]] = []
        self.busy = set()
        for index, item in enumerate(items):
            try:
                self._validate(item)
                if item.session_id in self.busy:
                    raise SledError(ErrorCode.INVALID, "two proposals for one session in one batch")
                state = self._state_for(item)
                self.busy.add(item.session_id)
                history = len(item.history) - 1 if item.history is not None else 0  # prefilled below
                try:
                    self._reserve(state, state.length + history + 1 + len(item.draft))
                except SledError:
                    if item.history is not None:  # never leave a session whose history is not in its pages
                        self._drop(item.session_id)
                    raise
                ready.append((index, item, state))
            except SledError as exc:
                verdicts[index] = self._failed(item, exc)
        if ready:
            self._prefill([(state, item.history[:-1], item.feature_layers)
                           for _, item, state in ready if item.history is not None])
            states = [s for _, _, s in ready]
            results, hidden = self.forward_round(states, [item for _, item, _ in ready])
            for row, ((index, item, state), (accepted, token, path)) in enumerate(zip(ready, results)):
                self._keep_path(state, path)
                # the pool holds the last committed token and the accepted draft tokens; the rest is cut
                state.length += 1 + accepted
                self.kv.shrink(state.pages, state.length)
                features, start = b"", 0
                if item.feature_layers:  # the token fed first and each accepted draft token
                    kept = [0, *(1 + node for node in path)] if path else slice(0, 1 + accepted)
                    rows = torch.cat([hidden[i][row, kept] for i in item.feature_layers], dim=-1)
                    features, start = self._features(state, rows)
                state.committed += accepted + 1
                state.last_token = token
                self.stats.draft_tokens += len(item.draft)
                self.stats.accepted_tokens += accepted
                verdicts[index] = Verdict(item.session_id, item.round, accepted, token, features=features,
                                          features_start=start, path=path)
        self.busy = set()
        self.stats.batches += 1
        self.stats.items += len(ready)
        self.stats.compute_s += time.perf_counter() - started
        self._refresh_stats()
        return verdicts  # type: ignore[return-value]


def make_verifier(model, config: Config) -> TargetVerifier:
    """The backend ``verifier.backend`` names; "static" falls back to "eager" (with a log line)
    for a model the static forward does not cover."""
    v = config.verifier
    if v.backend not in ("eager", "static"):
        raise ValueError(f"verifier.backend must be 'eager' or 'static', got {v.backend!r}")
    if v.compile not in ("auto", "on", "off"):
        raise ValueError(f"verifier.compile must be 'auto', 'on' or 'off', got {v.compile!r}")
    if v.prepack:  # after the checks: a refused config leaves the caller's model as it was
        prepack_linears(model)  # a no-op off the CPU
    if v.backend == "static":
        reason = supports(model)
        if not reason:
            device = model.get_input_embeddings().weight.device
            compile = v.compile == "on" or (v.compile == "auto" and device.type == "cuda")
            return StaticVerifier(model, max_sessions=v.max_sessions, limits=config.limits,
                                  kv_cache_mb=v.kv_cache_mb, compile=compile,
                                  prefill_chunk_tokens=v.prefill_chunk_tokens)
        log.warning("static_backend_unavailable", reason=reason, fallback="eager", model_type=model.config.model_type)
    return TargetVerifier(model, max_sessions=v.max_sessions, limits=config.limits,
                          prefill_chunk_tokens=v.prefill_chunk_tokens)
