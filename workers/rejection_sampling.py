"""Accept or reject a draft against the target's logits. Pure torch math, no model, no I/O.

Greedy: accept while the draft equals the target's argmax; the next token is the target's argmax
after the accepted prefix (the correction, or the bonus token when all were accepted).

Sampling (speculative rejection sampling, Leviathan et al. / Chen et al.): with target
distribution p and draft distribution q at a position, accept the draft token x with
probability min(1, p(x)/q(x)); on rejection sample from norm(max(0, p - q)). The emitted token
is then distributed exactly as p. Two cases of q reach the verifier:

* the drafter sampled x from its own top-k distribution and sent those k (token, probability)
  pairs: q is exactly that truncated distribution (zero outside the k tokens);
* the drafter sent token ids only (n-gram lookup, or a greedy drafter): the proposal is a
  deterministic function of the context, i.e. q is a point mass on x. Then min(1, p(x)/1) = p(x)
  and norm(max(0, p - q)) is p with x removed -- also exact.
"""

from __future__ import annotations

import torch

from pipeline.protocol import Sampling


def target_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Rows of logits -> the distribution the target alone would sample from (temperature, top-p)."""
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token always stays)
        drop = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= sampling.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def verify_greedy(logits: torch.Tensor, draft: list[int]) -> tuple[int, int]:
    """logits: [len(draft) + 1, vocab] at the positions after the last committed token and after
    each draft token. Returns (accepted, next token)."""
    best = torch.argmax(logits, dim=-1).tolist()
    accepted = 0
    for token, target_token in zip(draft, best):
        if token != target_token:
            break
        accepted += 1
    return accepted, best[accepted]


def position_generator(seed: int, position: int) -> torch.Generator:
    """The random stream of the round whose draft starts at ``position`` (tokens committed before
    it), a function of (seed, position) alone: rebuilding a session (a resync, another verifier)
    continues the session's stream where it was instead of restarting it from the seed, and the
    same round verified twice draws the same numbers. SplitMix64 mixes the pair."""
    x = (seed * 0x9E3779B97F4A7C15 + (position + 1) * 0xD1B54A32D192ED03) % (1 << 64)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % (1 << 64)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % (1 << 64)
    return torch.Generator().manual_seed((x ^ (x >> 31)) % (1 << 63))


def _sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator).item())


def verify_sampling(
    probs: torch.Tensor,
    draft: list[int],
    q_ids: list[list[int]],
    q_probs: list[list[float]],
    generator: torch.Generator,
) -> tuple[int, int]:
    """probs: [len(draft) + 1, vocab] target distributions. Returns (accepted, next token)."""
    for i, x in enumerate(draft):
        p = probs[i]
        if q_ids:
            q = torch.zeros_like(p)
            q[torch.tensor(q_ids[i], dtype=torch.long)] = torch.tensor(q_probs[i], dtype=p.dtype)
        else:
            q = torch.zeros_like(p)
            q[x] = 1.0
        # the verifier checked that x is among q_ids[i] with positive probability
        if float(torch.rand((), generator=generator)) < min(1.0, float(p[x]) / float(q[x])):
            continue
        residual = torch.clamp(p - q, min=0.0)
        mass = float(residual.sum())
        # mass is 0 only when p == q, where the acceptance above was certain; guard rounding
        return i, _sample(residual / mass if mass > 0 else p, generator)
    return len(draft), _sample(probs[len(draft)], generator)
