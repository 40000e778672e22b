"""workers/rejection_sampling.py's rules for a whole padded batch at once, on the model's device.

No host work and no data-dependent shapes: the static verifier runs this right after its forward
and brings back one ``[B, 2]`` tensor of (accepted, next token) with a single transfer.

Greedy rows: accept while the draft equals the argmax. Sampling rows: speculative rejection
sampling with the target's tempered, top-p distribution p and the draft's distribution q (the
drafter's top-k pairs, or a point mass for an ids-only draft): accept x when u < p(x) / q(x),
then draw the next token from norm(max(0, p - q)) at the first rejection, or from p after a
fully accepted draft. The uniforms ``u`` come from a generator seeded by (session seed, position)
on the host (drawn before the forward, workers/rejection_sampling.py ``position_generator``), so a
session's samples depend only on its seed and a rebuilt session continues its stream; the draw is
by inverse CDF in float64.
"""

from __future__ import annotations

import torch


def batch_target_probs(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V]; temperature, top_p [B] (rows with top_p >= 1 skip the nucleus cut)."""
    probs = torch.softmax(logits.float() / temperature[:, None, None], dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    cut = torch.where(top_p < 1.0, top_p, torch.full_like(top_p, float("inf")))[:, None, None]
    drop = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= cut  # the top token always stays
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return probs / probs.sum(dim=-1, keepdim=True)


def _prefix_accepted(ok: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(ok.long(), dim=1).sum(dim=1)


def accept_batch(logits: torch.Tensor, draft: torch.Tensor, n_draft: torch.Tensor, greedy: torch.Tensor,
                 temperature: torch.Tensor, top_p: torch.Tensor, q_ids: torch.Tensor, q_probs: torch.Tensor,
                 uniforms: torch.Tensor, sampling: bool) -> torch.Tensor:
    """One verdict per row, ``[B, 2]`` (accepted, token).

    logits [B, T, V] (T = 1 + longest draft, padded); draft [B, T - 1] (padding: any id);
    n_draft [B]; greedy [B] bool; temperature, top_p [B]; q_ids, q_probs [B, T - 1, K] (padding:
    probability 0); uniforms [B, T]. ``sampling``: whether any row samples (else that path is skipped).
    """
    batch, width, vocab = logits.shape
    valid = torch.arange(width - 1, device=logits.device)[None, :] < n_draft[:, None]
    best = torch.argmax(logits, dim=-1)  # [B, T]
    g_accepted = _prefix_accepted((best[:, :-1] == draft) & valid)
    g_token = best.gather(1, g_accepted[:, None])[:, 0]
    if not sampling:
        return torch.stack((g_accepted, g_token), dim=1)

    safe_t = torch.where(greedy, torch.ones_like(temperature), temperature)
    probs = batch_target_probs(logits, safe_t, top_p)  # [B, T, V]
    q = torch.zeros((batch, width, vocab), dtype=probs.dtype, device=probs.device)
    q[:, :-1].scatter_add_(2, q_ids, q_probs.to(probs.dtype))  # the bonus position has q = 0
    p_x = probs[:, :-1].gather(2, draft[:, :, None])[:, :, 0]
    q_x = q[:, :-1].gather(2, draft[:, :, None])[:, :, 0]
    s_accepted = _prefix_accepted((uniforms[:, :-1] * q_x < p_x) & valid)
    at = s_accepted[:, None, None].expand(batch, 1, vocab)
    p_at, q_at = probs.gather(1, at)[:, 0], q.gather(1, at)[:, 0]  # [B, V]
    residual = torch.clamp(p_at - q_at, min=0.0)
    mass = residual.sum(dim=-1, keepdim=True)
    # mass is 0 only where p == q, where acceptance was certain; guard rounding with p itself
    dist = torch.where(mass > 0, residual, p_at).double()
    cdf = torch.cumsum(dist, dim=-1)
    point = uniforms[:, -1:].double() * cdf[:, -1:]
    s_token = torch.searchsorted(cdf, point, right=True)[:, 0].clamp(max=vocab - 1)
    accepted = torch.where(greedy, g_accepted, s_accepted)
    token = torch.where(greedy, g_token, s_token)
    return torch.stack((accepted, token), dim=1)
