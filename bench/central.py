"""The server-side baselines, run in this process on the same target and prompts as SLED.

* Centralized autoregressive serving with dynamic batching: every step, one target forward over
  all running sessions, one new token (one row) each -- what a server without SLED does
  (continuous batching, as vLLM's scheduler does). It uses the verifier's own batched, KV-cached
  forward with empty drafts, so the two differ only in the drafts.
* Server-side speculative decoding: the drafts are computed on the server too, batched across
  sessions (one ragged draft forward per draft step, each session with its own draft KV cache),
  then verified in one batched target forward -- vLLM's draft-model mode.
* transformers' assisted generation (``assistant_model``), one session at a time: a peer's
  implementation, for per-session latency.

Server compute is the process's CPU time over the run (``time.process_time``), the same measure
the SLED verifier is charged with, so a noisy shared machine does not move it much.
"""

from __future__ import annotations

import time
from collections import deque

import torch

from bench.sessions import SessionRecord
from pipeline.config import LimitsConfig
from pipeline.protocol import Propose
from workers.forward_log import ForwardLog, verify_recorded
from workers.target import TargetVerifier, ragged_forward, session_kv


class BatchedDrafter:
    """Greedy drafts for many sessions at once, on the server (the server-SD baseline)."""

    def __init__(self, model, gamma: int, min_confidence: float = 0.0):
        self.model = model
        self.device = model.get_input_embeddings().weight.device
        self.gamma = gamma
        self.min_confidence = min_confidence
        self.kv: dict[int, torch.Tensor | None] = {}
        self.cached: dict[int, int] = {}  # committed tokens whose keys/values are cached
        self.fed: dict[int, int] = {}  # draft tokens of the last round fed into the cache
        self.forwards = 0
        self.log = ForwardLog()  # (sessions, rows) of each draft forward

    def close(self, key: int) -> None:
        for table in (self.kv, self.cached, self.fed):
            table.pop(key, None)

    @torch.inference_mode()
    def propose(self, sessions: list[SessionRecord], budgets: list[int]) -> list[list[int]]:
        keys = [s.index for s in sessions]
        drafts: list[list[int]] = [[] for _ in sessions]
        live = [i for i, b in enumerate(budgets) if min(self.gamma, b - 1) > 0]
        rows = {i: list(sessions[i].prompt) + sessions[i].tokens for i in live}
        rows = {i: row[self.cached.get(keys[i], 0):] for i, row in rows.items()}
        for i in live:
            self.fed[keys[i]] = 0
        step = 0
        while live:
            logits, kv, past, _ = ragged_forward(self.model, self.device, [self.kv.get(keys[i]) for i in live],
                                              [rows[i] for i in live])
            self.forwards += 1
            self.log.add("draft", len(live), sum(len(rows[i]) for i in live))
            still = []
            for row, i in enumerate(live):
                key = keys[i]
                held = 0 if self.kv.get(key) is None else self.kv[key].shape[3]
                self.kv[key] = session_kv(kv, row, past - held, past + len(rows[i]))
                if step == 0:
                    self.cached[key] = self.cached.get(key, 0) + len(rows[i])
                else:
                    self.fed[key] += 1
                probs = torch.softmax(logits[row, len(rows[i]) - 1].float(), dim=-1)
                confidence, token = torch.max(probs, dim=-1)
                if float(confidence) < self.min_confidence:
                    continue
                drafts[i].append(int(token))
                if len(drafts[i]) < min(self.gamma, budgets[i] - 1):
                    rows[i] = [int(token)]
                    still.append(i)
            live = still
            step += 1
        return drafts

    def commit(self, session: SessionRecord, position: int, accepted: int) -> None:
        """Keep the cache for the committed prefix and the accepted draft tokens that were fed."""
        key = session.index
        self.cached[key] = position + min(accepted, self.fed.get(key, 0))
        kv = self.kv.get(key)
        if kv is not None and kv.shape[3] > self.cached[key]:
            self.kv[key] = kv[:, :, :, : self.cached[key]].contiguous()


def run_central(target, sessions: list[SessionRecord], concurrency: int, max_new_tokens: int, stop_ids: list[int],
                drafter: BatchedDrafter | None = None, *, max_sessions: int = 512, verifier=None,
                max_batch_tokens: int = 0, link_rtt_s: dict[int, float] | None = None) -> dict:
    """Serve ``sessions``, at most ``concurrency`` at once; fills each record, returns server figures.
    ``verifier``: the backend to serve with (default: the eager ``TargetVerifier``).
    ``max_batch_tokens`` (> 0): the token budget of a step, as SLED's broker applies it
    (``broker.max_batch_tokens``, Propose.batch_tokens, brokers/batcher.py): the running sessions'
    verify rows, then new sessions while their prompts' prefill fits (vLLM's
    ``max_num_batched_tokens``, without splitting a prompt), and at least one new session a step
    whatever its size. 0: every waiting session joins at once.
    ``link_rtt_s``: each session's client link round trip (by ``SessionRecord.index``), the link of
    the device class SLED's fleet serves it on: its request reaches the server half a round trip
    after the client sends it, and its tokens reach the client half a round trip after the step
    that made them. So a closed loop's next session joins a round trip after its predecessor's
    last step, as in SLED, whose sessions cross the same links (bench/fleet.py); and TTFT, counted
    at the client, includes the round trip. None: clients with no link."""
    verifier = verifier or TargetVerifier(target, max_sessions=max_sessions, limits=LimitsConfig())
    forwards = ForwardLog()
    stops = set(stop_ids)
    pending = deque(sessions)
    active: list[SessionRecord] = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    peak_cache = 0
    rows = 1 + (drafter.gamma if drafter else 0)  # what a running session puts through a step at most
    half = {s.index: (link_rtt_s or {}).get(s.index, 0.0) / 2 for s in sessions}
    arrived = 0  # sessions whose client is waiting (closed loop: one arrives as one ends)
    freed: deque[float] = deque()  # when each slot freed by a finished session reached its client
    ready: dict[int, float] = {}  # when each arrived session's request reaches the server
    while pending or active:
        now = time.perf_counter()
        while arrived < min(len(sessions), concurrency + len(sessions) - len(pending) - len(active)):
            s = sessions[arrived]
            s.start = freed.popleft() if arrived >= concurrency and freed else now  # TTFT counts from here, admitted or not
            ready[s.index] = s.start + half[s.index]
            arrived += 1
        if not active and pending and ready.get(pending[0].index, now) > now:
            time.sleep(ready[pending[0].index] - now)  # nothing to run until the next request crosses its link
            now = time.perf_counter()
        used, opened = rows * len(active), False
        while pending and len(active) < concurrency and ready.get(pending[0].index, now + 1) <= now:
            cost = len(pending[0].prompt)  # its prefill and its first row
            if max_batch_tokens and opened and used + cost > max_batch_tokens:
                break
            active.append(pending.popleft())
            used, opened = used + cost, True
        budgets = [max_new_tokens - len(s.tokens) for s in active]
        drafts = drafter.propose(active, budgets) if drafter else [[] for _ in active]
        items = [
            Propose(str(s.index), s.rounds, len(s.prompt) + len(s.tokens), d, history=list(s.prompt) if s.rounds == 0 else None,
                    drafter_kind="server")
            for s, d in zip(active, drafts)
        ]
        verdicts = verify_recorded(verifier, items, forwards)
        peak_cache = max(peak_cache, verifier.stats.cache_bytes)
        now = time.perf_counter()
        finished = []
        for s, d, v, budget in zip(active, drafts, verdicts, budgets):
            if v.error:
                raise RuntimeError(f"baseline verify failed: {v.error}: {v.detail}")
            position = len(s.prompt) + len(s.tokens)
            new = [*d[: v.accepted], v.token][:budget]
            for i, token in enumerate(new):
                if token in stops:
                    new = new[: i + 1]
                    break
            s.tokens += new
            s.count_round(len(d), v.accepted)
            if s.first is None:
                s.first = now + half[s.index]  # at the client
            if drafter:
                drafter.commit(s, position, v.accepted)
            if len(s.tokens) >= max_new_tokens or (new and new[-1] in stops):
                s.end = now + half[s.index]
                finished.append(s)
                freed.append(s.end)  # the client sends its next request as its last token arrives
        for s in finished:
            active.remove(s)
            verifier.close(str(s.index))
            if drafter:
                drafter.close(s.index)
    stats = verifier.stats
    if drafter:
        forwards.draft = drafter.log.draft
    cpu = time.process_time() - cpu0
    return {
        "server_cpu_s": cpu,
        "elapsed_s": time.perf_counter() - wall0,
        "target_forwards": stats.batches + stats.prefill_forwards,
        "verify_forwards": stats.batches,
        "draft_forwards": drafter.forwards if drafter else 0,
        "target_tokens": stats.prefill_tokens + stats.verify_tokens,
        "prefill_cpu_s": stats.prefill_cpu_s,
        "outside_batch_cpu_s": cpu - stats.batch_cpu_s,
        "mean_batch_sessions": stats.items / stats.batches if stats.batches else 0.0,
        "peak_kv_cache_mb": peak_cache / 2**20,
        "forwards": forwards.as_dict(),
    }


@torch.inference_mode()
def run_assisted(target, assistant, sessions: list[SessionRecord], max_new_tokens: int, stop_ids: list[int]) -> dict:
    """transformers' assisted generation, one session at a time (it serves one sequence)."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    device = target.get_input_embeddings().weight.device
    for s in sessions:
        ids = torch.tensor([s.prompt], dtype=torch.long, device=device)
        s.start = time.perf_counter()
        out = target.generate(
            ids, attention_mask=torch.ones_like(ids), assistant_model=assistant, max_new_tokens=max_new_tokens,
            min_new_tokens=0, do_sample=False, num_beams=1, eos_token_id=list(stop_ids) or None, pad_token_id=0,
            repetition_penalty=None, temperature=None, top_p=None, top_k=None,
        )
        s.end = time.perf_counter()
        s.tokens = out[0, len(s.prompt):].tolist()
        s.first = None  # generate() returns the whole sequence at once: no per-token times
    return {"server_cpu_s": time.process_time() - cpu0, "elapsed_s": time.perf_counter() - wall0}
