"""Compact storage for committed drafter weights (the drafter issue's weight budget: a device call
carries the whole tracked tree, at most 64 MiB, and the wheels a GPU check needs must fit beside it).

Three layouts, chosen per file by :func:`pack`'s ``mode``; :func:`unpack` reads any of them back
to float32 by the tensor names' suffixes:

- ``fp16``: every tensor fp16.
- ``int8``: each matrix row-wise symmetric int8 (``NAME.q``) with an fp16 scale per row
  (``NAME.scale``), the rest fp16. Rounding each row to 1/127 of its largest entry is below what
  changes a drafter's argmax in practice (docs/incremental-training.md).
- ``int4-delta``: for a matrix that fine-tuning started from a weight of the target at the same
  name (the ladder's layers start as copies of the target's), only the difference is stored:
  4-bit symmetric in groups of 64 along each row, two per byte (``NAME.d4``), with an fp16 scale
  per group (``NAME.d4scale``). Fine-tuning moves these matrices by about a tenth of their norm,
  so rounding the difference to 4 bits errs about as much as rounding the whole matrix to 8 (on
  the committed ladder 1.1 % against 0.84 % of the weights' norm) in a little over half the
  bytes. Reading it back needs the same base weights (the loaded target)."""

from __future__ import annotations

import torch

GROUP = 64  # int4-delta: entries per scale along a row


def pack(state: dict[str, torch.Tensor], *, mode: str = "int8",
         base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``state`` in the ``mode`` layout. ``int4-delta`` stores matrices that have an entry of the
    same name and shape in ``base`` as differences from it; other matrices int8."""
    if mode not in ("fp16", "int8", "int4-delta"):
        raise ValueError(f"unknown weight layout {mode!r}")
    out = {}
    for name, value in state.items():
        value = value.detach().float()
        ref = None if base is None or mode != "int4-delta" else base.get(name)
        if value.dim() != 2 or mode == "fp16":
            out[name] = value.to(torch.float16).contiguous()
        elif ref is not None and ref.shape == value.shape and value.shape[1] % GROUP == 0:
            out[f"{name}.d4"], out[f"{name}.d4scale"] = _int4_groups(value - ref.detach().float())
        else:
            scale = value.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127
            out[f"{name}.q"] = (value / scale).round().to(torch.int8).contiguous()
            out[f"{name}.scale"] = scale.to(torch.float16).contiguous()
    return out


def unpack(tensors: dict[str, torch.Tensor], base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """float32 tensors back from :func:`pack`'s layouts; ``base`` (the same weights ``pack`` was
    given) is needed only for ``int4-delta`` entries."""
    state = {}
    for name, value in tensors.items():
        if name.endswith(".q"):
            state[name[:-2]] = value.float() * tensors[name[:-2] + ".scale"].float()
        elif name.endswith(".d4"):
            key = name[:-3]
            if base is None or key not in base:
                raise KeyError(f"{key} is stored as a difference from the target's weight: pass the target's weights")
            state[key] = base[key].detach().float() + _from_int4_groups(value, tensors[key + ".d4scale"])
        elif not name.endswith((".scale", ".d4scale")):
            state[name] = value.float()
    return state


def _int4_groups(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = delta.shape
    groups = delta.reshape(rows, cols // GROUP, GROUP)
    scale = (groups.abs().amax(2, keepdim=True).clamp(min=1e-12) / 7).to(torch.float16)
    q = (groups / scale.float()).round().clamp(-7, 7).to(torch.int16) + 8  # 1..15 in a nibble
    q = q.reshape(rows, cols).to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous(), scale.squeeze(2).contiguous()


def _from_int4_groups(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows = packed.shape[0]
    q = torch.stack([packed & 0xF, packed >> 4], dim=2).reshape(rows, -1).float() - 8
    return (q.reshape(rows, scale.shape[1], GROUP) * scale.float().unsqueeze(2)).reshape(rows, -1)
