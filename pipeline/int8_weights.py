"""int8 storage for committed drafter weights: each matrix row-wise symmetric int8 with an fp16
scale per row, everything else fp16. It halves the files against fp16 (the weight budget of
the drafter issue: a device call carries the whole tracked tree, at most 64 MiB), and rounding
each row to 1/127 of its largest entry is below what changes a drafter's argmax in practice
(measured on the ladder and the feature head: docs/incremental-training.md)."""

from __future__ import annotations

import torch


def pack(state: dict[str, torch.Tensor], *, int8: bool = True) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in state.items():
        value = value.detach().float()
        if int8 and value.dim() == 2:
            scale = value.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127
            out[f"{name}.q"] = (value / scale).round().to(torch.int8).contiguous()
            out[f"{name}.scale"] = scale.to(torch.float16).contiguous()
        else:
            out[name] = value.to(torch.float16).contiguous()
    return out


def unpack(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float32 tensors back from :func:`pack`'s layout (fp16-only files pass through)."""
    state = {}
    for name, value in tensors.items():
        if name.endswith(".q"):
            state[name[:-2]] = value.float() * tensors[name[:-2] + ".scale"].float()
        elif not name.endswith(".scale"):
            state[name] = value.float()
    return state
