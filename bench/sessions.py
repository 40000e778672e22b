"""What every method's run produces: one record per session, and the figures derived from them.

A "level" is one concurrency: ``concurrency`` sessions run at once (closed loop: when one ends
the next starts), ``max(concurrency, min_sessions)`` sessions in all, every method on the same
prompts. Session i uses prompt ``i % len(prompts)`` and device class ``i % len(classes)``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class SessionRecord:
    index: int
    prompt: list[int]
    device: str = ""  # the emulated device class (SLED) or "" (server-side methods)
    tokens: list[int] = field(default_factory=list)
    start: float = 0.0
    first: float | None = None  # when the first output token reached the client
    end: float = 0.0
    rounds: int = 0  # verify rounds (target forwards this session took part in)
    proposed: int = 0
    accepted: int = 0
    rejected_rounds: int = 0  # rounds in which a draft token was rejected
    draft_lengths: list[int] = field(default_factory=list)  # rounds per draft length
    plain_rounds: int = 0  # SLED: rounds the broker ran on its own (drafters.NAME.burst)
    tree_rounds: int = 0  # SLED: rounds that proposed a token tree (their draft_lengths entry is the tree's depth)
    ahead_rounds: int = 0  # SLED: rounds sent ahead of their predecessor's verdict, queued at it (Propose.if_accepted)

    def count_round(self, drafted: int, accepted: int) -> None:
        self.rounds += 1
        self.proposed += drafted
        self.accepted += accepted
        self.rejected_rounds += accepted < drafted
        if len(self.draft_lengths) <= drafted:
            self.draft_lengths += [0] * (drafted + 1 - len(self.draft_lengths))
        self.draft_lengths[drafted] += 1

    @property
    def ttft_s(self) -> float | None:
        return None if self.first is None else self.first - self.start

    @property
    def tpot_s(self) -> float:
        """Time per output token after the first (vLLM's definition); without per-token times
        (assisted generation returns the whole sequence at once), the session's time per token."""
        if self.first is None:
            return (self.end - self.start) / max(1, len(self.tokens))
        if len(self.tokens) < 2:
            return self.end - self.start
        return (self.end - self.first) / (len(self.tokens) - 1)


def plan(concurrency: int, min_sessions: int, prompts: list[list[int]], classes: list[str]) -> list[SessionRecord]:
    return [SessionRecord(i, prompts[i % len(prompts)], classes[i % len(classes)] if classes else "")
            for i in range(max(concurrency, min_sessions))]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def latency_figures(records: list[SessionRecord], elapsed_s: float) -> dict:
    generated = sum(len(r.tokens) for r in records)
    tpot = [r.tpot_s * 1000 for r in records]
    ttft = [r.ttft_s * 1000 for r in records if r.ttft_s is not None]
    rounds = sum(r.rounds for r in records)
    proposed = sum(r.proposed for r in records)
    return {
        "sessions": len(records),
        "generated_tokens": generated,
        "elapsed_s": round(elapsed_s, 3),
        "throughput_tok_s": round(generated / elapsed_s, 2) if elapsed_s else 0.0,
        "tpot_p50_ms": round(percentile(tpot, 50), 1),
        "tpot_p99_ms": round(percentile(tpot, 99), 1),
        "ttft_p50_ms": round(percentile(ttft, 50), 1) if ttft else None,
        "ttft_p99_ms": round(percentile(ttft, 99), 1) if ttft else None,
        "tokens_per_round": round(generated / rounds, 3) if rounds else 0.0,
        "acceptance_rate": round(sum(r.accepted for r in records) / proposed, 4) if proposed else None,
        "draft_tokens_per_round": round(proposed / rounds, 3) if rounds else 0.0,
    }


def ideal_tokens_per_round(alpha: float, gamma: float) -> float:
    """(1 - a^(g+1)) / (1 - a): expected tokens per round when each draft token is accepted
    independently with probability a and drafts hold g tokens (Leviathan et al.)."""
    if alpha >= 1.0:
        return gamma + 1
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def acceptance_model(records: list[SessionRecord]) -> dict:
    """The per-position acceptance probability a -- accepted ÷ (accepted + rejections): each draft
    position reached is either accepted or the round's one rejection -- and the tokens per round
    that a and the drafts' actual lengths predict, against the measured tokens per round."""
    accepted = sum(r.accepted for r in records)
    rejected = sum(r.rejected_rounds for r in records)
    lengths = [0] * max((len(r.draft_lengths) for r in records), default=0)
    for r in records:
        for g, n in enumerate(r.draft_lengths):
            lengths[g] += n
    rounds = sum(lengths)
    if not rounds or not accepted + rejected:
        return {}
    alpha = accepted / (accepted + rejected)
    ideal = sum(n * ideal_tokens_per_round(alpha, g) for g, n in enumerate(lengths)) / rounds
    measured = sum(len(r.tokens) for r in records) / sum(r.rounds for r in records)
    return {"alpha_per_position": round(alpha, 4), "ideal_tokens_per_round": round(ideal, 3),
            "tokens_per_round_vs_ideal": round(measured / ideal, 3)}


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else 0.0
