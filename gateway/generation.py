"""One HTTP request as one SLED session: open it on a drafter, turn each round's tokens into a
text delta, stop at a stop string (closing the session early), and count what happened.

The session lives inside ``DrafterClient.stream``; leaving it early (a stop string, a client
that went away and cancelled the handler) closes that generator, which sends Cancel to the
drafter, which closes the session on the verifier and frees its cache.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import structlog

from gateway.detokenize import TextAssembler
from gateway.metrics import GatewayMetrics
from gateway.openai_api import GenerationRequest
from pipeline.client import DrafterClient

log = structlog.get_logger("sled.gateway")


@dataclass
class Step:
    """What one round brought: text that is now final (may be empty), and, on the last step,
    the finish reason and SLED's figures."""

    text: str
    done: bool = False
    finish_reason: str = ""
    completion_tokens: int = 0
    sled: dict = field(default_factory=dict)
    elapsed_s: float = 0.0


class Generation:
    def __init__(self, request: GenerationRequest, client: DrafterClient, *, drafter: str, kind: str, tokenizer,
                 stop_ids: list[int], metrics: GatewayMetrics, timeout_s: float):
        self.request = request
        self.client = client
        self.drafter = drafter
        self.kind = kind
        self.stop_ids = stop_ids
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.text = TextAssembler(tokenizer, request.stop, set(stop_ids))
        self.started = time.monotonic()

    async def steps(self) -> AsyncIterator[Step]:
        req, m = self.request, self.metrics
        rounds, accepted_seen, tokens = 0, 0, 0
        first = True
        last = time.monotonic()
        m.active.labels(self.drafter).inc()
        m.prompt_tokens.labels(self.drafter).inc(len(req.prompt_ids))
        try:
            stream = self.client.stream(req.prompt_ids, req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                                        seed=req.seed, stop_ids=self.stop_ids, timeout=self.timeout_s)
            async with contextlib.aclosing(stream) as messages:
                async for msg in messages:
                    now = time.monotonic()
                    if msg.tokens:
                        rounds += 1
                        accepted_seen += len(msg.tokens) - 1  # a round brings its accepted tokens + one of the target's
                        tokens += len(msg.tokens)
                        m.completion_tokens.labels(self.drafter, self.kind).inc(len(msg.tokens))
                        m.round_seconds.labels(self.kind).observe(now - last)
                        if first:
                            m.first_token_seconds.labels(req.endpoint).observe(now - self.started)
                            first = False
                    last = now
                    delta = self.text.feed(msg.tokens)
                    if self.text.stopped:
                        # a stop string: leaving the stream cancels the session on drafter and verifier
                        figures = {"rounds": rounds, "proposed": None, "accepted": accepted_seen,
                                   "mean_gamma": None, "session_cancelled": True}
                        yield Step(delta, True, "stop", tokens, self._sled(figures), now - self.started)
                        return
                    if msg.done:
                        yield Step(delta + self.text.finish(), True, msg.finish_reason, tokens, self._sled(msg.stats),
                                   now - self.started)
                        return
                    yield Step(delta)
        finally:
            m.active.labels(self.drafter).dec()
            m.request_seconds.labels(req.endpoint).observe(time.monotonic() - self.started)

    def _sled(self, stats: dict) -> dict:
        proposed, accepted = stats.get("proposed"), stats.get("accepted")
        return {
            "drafter": self.drafter,
            "drafter_kind": self.kind,
            "session_id": stats.get("session_id"),
            "rounds": stats.get("rounds"),
            "proposed": proposed,
            "drafted": proposed,  # the same figure under the name other servers use
            "accepted": accepted,
            "acceptance_rate": accepted / proposed if proposed else None,
            "mean_gamma": stats.get("mean_gamma"),  # draft length asked per round (adaptive: it varies)
            "proactive_hits": stats.get("proactive_hits"),  # rounds whose draft was made during the last verify
            "proactive_wasted": stats.get("proactive_wasted"),  # tokens drafted ahead and dropped
            "lookup_rounds": stats.get("lookup_rounds"),  # rounds drafted by context lookup (workers/lookup.py)
            "datastore_rounds": stats.get("datastore_rounds"),  # chains drafted from a datastore (workers/lookup.py)
            "tree_rounds": stats.get("tree_rounds"),  # rounds that proposed a token tree (workers/token_tree.py)
            "plain_rounds": stats.get("plain_rounds"),  # rounds the broker ran on its own (drafters.NAME.burst)
            # rounds sent ahead of the verdict they assumed, which confirmed them: no link round trip
            "sent_ahead_confirmed": stats.get("sent_ahead_confirmed"),
            "seed": self.request.seed,
            **({"session_cancelled": True} if stats.get("session_cancelled") else {}),
        }
