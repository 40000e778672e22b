"""The feature-conditioned draft head (EAGLE-style), shared by training and the device.

Each entry t fuses the target's feature at position t (its final-norm hidden state, sent back by
the verifier) with the embedding of token t+1; one Llama decoder layer over the entries so far (or
a stack of them, ``HeadSpec.layers``) predicts the feature at t+1, and the target's frozen tied
head -- restricted to a draft vocabulary of the tokens the target emits most -- turns it into
logits for token t+2.
Drafting feeds the head its own predicted feature for the next entry (the verifier has not
computed the real one yet); training unrolls that ("training-time test", EAGLE-3), so later
draft positions learn from the head's own predictions.

Only ``fc``, the decoder layer(s) and the norm are trained and stored; the embedding matrix comes
from the target's package at load time. The layer is written out (not transformers'
LlamaDecoderLayer) because training needs queries of one unroll level to attend to keys of
others, which the library's cache does not express.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_DIR = Path(__file__).resolve().parent.parent / "drafters" / "feature"


@dataclass(frozen=True)
class HeadSpec:
    hidden: int = 576
    heads: int = 9
    kv_heads: int = 3
    intermediate: int = 1536
    rope_theta: float = 100000.0
    eps: float = 1e-5
    feature_layers: tuple[int, ...] = (-1,)
    target_layer: int = 29  # the target layer the (last) decoder layer starts from
    # decoder layers; a head grown by one (training/train_feature_head.py deepen) gains it in
    # front, as the target's own layer before target_layer sits in front of it
    layers: int = 1
    # RMS of the target's residual stream entering target_layer: the fused entry is scaled to it,
    # so the layer copied from the target sees inputs of the size it was trained on
    residual_scale: float = 1.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Llama's rotary embedding (rotate-half form) at absolute ``positions`` [T]."""
    dim = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
    angles = positions.float()[:, None] * freqs[None]
    cos = torch.cat((angles.cos(), angles.cos()), -1).to(x.dtype)
    sin = torch.cat((angles.sin(), angles.sin()), -1).to(x.dtype)
    half = dim // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos + rotated * sin


class HeadLayer(nn.Module):
    """A Llama decoder layer whose attention takes explicit extra keys/values and a mask."""

    def __init__(self, spec: HeadSpec):
        super().__init__()
        self.spec = spec
        h, d = spec.hidden, spec.head_dim
        self.input_layernorm = RMSNorm(h, spec.eps)
        self.post_attention_layernorm = RMSNorm(h, spec.eps)
        self.q_proj = nn.Linear(h, spec.heads * d, bias=False)
        self.k_proj = nn.Linear(h, spec.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, spec.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(spec.heads * d, h, bias=False)
        self.gate_proj = nn.Linear(h, spec.intermediate, bias=False)
        self.up_proj = nn.Linear(h, spec.intermediate, bias=False)
        self.down_proj = nn.Linear(spec.intermediate, h, bias=False)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor):
        """x [B, T, H] -> q [B, heads, T, d], k and v [B, kv_heads, T, d] (RoPE applied)."""
        s = self.spec
        b, t, _ = x.shape
        n = self.input_layernorm(x)
        q = self.q_proj(n).view(b, t, s.heads, s.head_dim).transpose(1, 2)
        k = self.k_proj(n).view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)
        v = self.v_proj(n).view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)
        return rope(q, positions, s.rope_theta), rope(k, positions, s.rope_theta), v

    def finish(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of q over (k, v) under ``mask`` (bool, True = may attend; None = causal
        with q as the last rows), then the MLP, both with residuals."""
        s = self.spec
        b, _, t, _ = q.shape
        rep = s.heads // s.kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        if mask is None:
            mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - t)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, -1))
        n = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(n)) * self.up_proj(n))


class FeatureHead(nn.Module):
    def __init__(self, spec: HeadSpec, embed: torch.Tensor, vocab_ids: torch.Tensor):
        super().__init__()
        self.spec = spec
        h = spec.hidden
        width = h * len(spec.feature_layers)
        # the true input fuses the asked layers; a predicted feature is already one hidden-wide
        self.fuse = nn.Linear(width, h, bias=False) if width != h else None
        # features (RMS ~2 for the default target) and embeddings (RMS ~0.1) normed apart, so
        # that neither drowns the other in fc
        self.feature_norm = RMSNorm(h, spec.eps)
        self.embed_norm = RMSNorm(h, spec.eps)
        self.fc = nn.Linear(2 * h, h, bias=True)
        self.layers = nn.ModuleList(HeadLayer(spec) for _ in range(spec.layers))
        self.norm = RMSNorm(h, spec.eps)
        self.register_buffer("embed", embed.detach().float(), persistent=False)
        self.register_buffer("vocab_ids", vocab_ids.long(), persistent=False)
        self.register_buffer("head", embed.detach().float()[vocab_ids.long()], persistent=False)
        self.packed_head = None  # prepack(): the head's projection reordered for oneDNN

    def prepack(self) -> None:
        """Drafting on a CPU: the trained layers and the frozen head projection reordered once for
        oneDNN (workers/packed_linear.py): a tree round drafted 27 % faster (23.4 -> 17.1 ms on
        this CPU, measured beside a data-generation job). Inference only; training keeps the dense weights."""
        from workers.packed_linear import PackedLinear, prepack_linears

        if prepack_linears(self) and self.packed_head is None:
            self.packed_head = PackedLinear(self.head)

    # --- pieces ------------------------------------------------------------------------------

    def fused(self, true_features: torch.Tensor) -> torch.Tensor:
        return true_features if self.fuse is None else self.fuse(true_features)

    def entry(self, feature: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """Decoder input of entries: [fused feature at t, embedding of token t+1]."""
        joined = torch.cat((self.feature_norm(feature), self.embed_norm(self.embed[next_tokens])), -1)
        return self.spec.residual_scale * self.fc(joined)

    def decode(self, x: torch.Tensor, positions: torch.Tensor, past: list | None = None,
               mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list]:
        """Entries x [B, n, H] at ``positions`` through every decoder layer, each attending to its
        ``past`` keys/values (one (k, v) per layer, or None) and the new ones under ``mask`` (None:
        causal, the new entries last). Returns the predicted (normed) features [B, n, H] and the
        new entries' (k, v) per layer."""
        new = []
        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv(x, positions)
            new.append((k, v))
            if past is not None:
                k, v = torch.cat((past[i][0], k), 2), torch.cat((past[i][1], v), 2)
            x = layer.finish(x, q, k, v, mask)
        return self.norm(x), new

    def logits(self, predicted: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits [..., V'] of predicted (normed) features."""
        if self.packed_head is not None:
            return self.packed_head(predicted)
        return predicted @ self.head.T

    # --- training: all entries of whole sequences, unrolled `levels` times -----------------

    def unrolled(self, features: torch.Tensor, tokens: torch.Tensor, levels: int, noise: float = 0.0):
        """Teacher-forced unroll. features [B, T, width] (true, positions 0..T-1), tokens [B, T].
        Entry t (0 <= t <= T-2) joins feature t and token t+1. Level 0 uses true features; level
        j uses the prediction level j-1 made at entry t-1, and attends to true entries up to t-j
        and to its own chain (levels 1..j at entries t-j+1..t), exactly as drafting step j+1
        does. Returns the predicted (normed) features per level, each [B, T-1, H]; entries
        t < j of level j are padding (their loss must be masked)."""
        b, t1 = tokens.shape[0], tokens.shape[1] - 1
        positions = torch.arange(t1, device=tokens.device)
        g = self.fused(features[:, :-1])
        if noise:
            g = g + noise * torch.randn_like(g)
        outs = []
        keys: list[list] = [[] for _ in self.layers]  # per layer, the entries of every level so far
        values: list[list] = [[] for _ in self.layers]
        x = self.entry(g, tokens[:, 1:])
        for j in range(levels):
            if j:
                shifted = torch.cat((torch.zeros_like(outs[-1][:, :1]), outs[-1][:, :-1]), 1)  # made at t-1
                x = self.entry(shifted, tokens[:, 1:])
            mask = _level_mask(j, t1, tokens.device)
            for i, layer in enumerate(self.layers):
                q, k, v = layer.qkv(x, positions)
                keys[i].append(k)
                values[i].append(v)
                x = layer.finish(x, q, torch.cat(keys[i], 2), torch.cat(values[i], 2), mask)
            outs.append(self.norm(x))
        return outs

    # --- drafting: one session's cache of entries -----------------------------------------

    def extend(self, cache: "HeadCache", entries_in: torch.Tensor, first_position: int) -> torch.Tensor:
        """Append entries (decoder inputs [1, n, H]) at positions first_position.. to the cache;
        return the predicted features of the new entries [1, n, H]."""
        positions = torch.arange(first_position, first_position + entries_in.shape[1])
        predicted, new = self.decode(entries_in, positions, cache.kv or None)
        cache.append(new)
        return predicted


def _level_mask(level: int, t: int, device) -> torch.Tensor:
    """Which keys (levels 0..level, each t entries, concatenated) a level-`level` query at entry
    i may see: level-0 entries s <= i - level, and level-l entries s == i - level + l."""
    i = torch.arange(t, device=device)[:, None]
    s = torch.arange(t, device=device)[None, :]
    parts = [s <= i - level]
    for lv in range(1, level + 1):
        parts.append(s == i - level + lv)
    return torch.cat(parts, 1)  # the query's own key (level `level`, s == i) is always visible


class HeadCache:
    """Keys/values of one session's entries, one (k, v) per decoder layer, each
    [1, kv_heads, n, d]; cropping is a slice."""

    def __init__(self, kv: list | None = None, length: int | None = None):
        """``kv`` (as ``FeatureHead.decode`` returns it), its first ``length`` entries."""
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = [(k[:, :, :length], v[:, :, :length]) for k, v in kv or []]

    @property
    def length(self) -> int:
        return self.kv[0][0].shape[2] if self.kv else 0

    def append(self, kv: list) -> None:
        self.kv = kv if not self.kv else [(torch.cat((k0, k), 2), torch.cat((v0, v), 2))
                                         for (k0, v0), (k, v) in zip(self.kv, kv)]

    def crop(self, n: int) -> None:
        self.kv = [(k[:, :, :n], v[:, :, :n]) for k, v in self.kv]


# --- weights -----------------------------------------------------------------------------------


def residual_rms(target, layer: int, sample: list[int]) -> float:
    """RMS of the target's residual stream entering decoder layer ``layer`` over ``sample``."""
    with torch.no_grad():
        hidden = target(input_ids=torch.tensor([sample]), output_hidden_states=True).hidden_states[layer]
    return float(hidden.float().pow(2).mean().sqrt())


def target_layer_state(target, index: int) -> dict:
    """The target's decoder layer ``index`` as a HeadLayer state dict (fp32 copies)."""
    src = target.model.layers[index]
    state = {
        "input_layernorm.weight": src.input_layernorm.weight,
        "post_attention_layernorm.weight": src.post_attention_layernorm.weight,
        **{f"{n}.weight": getattr(src.self_attn, n).weight for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
        **{f"{n}.weight": getattr(src.mlp, n).weight for n in ("gate_proj", "up_proj", "down_proj")},
    }
    return {k: v.detach().float().clone() for k, v in state.items()}


def build_head(target, spec: HeadSpec, vocab_ids: torch.Tensor, *, init_from_target: bool = True) -> FeatureHead:
    """A head over `target`'s frozen embeddings; the decoder layers and norm start from the
    target's last ``spec.layers`` layers up to `spec.target_layer` and its final norm, fc as
    [identity on the feature | 0]."""
    head = FeatureHead(spec, target.get_input_embeddings().weight, vocab_ids)
    if init_from_target:
        first = spec.target_layer - spec.layers + 1
        for i, layer in enumerate(head.layers):
            layer.load_state_dict(target_layer_state(target, first + i))
        head.norm.weight.data.copy_(target.model.norm.weight.detach().float())
        with torch.no_grad():
            h = spec.hidden
            head.fc.weight.zero_()
            head.fc.weight[:, :h] = torch.eye(h) * 0.5
            head.fc.weight[:, h:] = torch.eye(h) * 0.5
            head.fc.bias.zero_()
    return head


def spec_for(target, feature_layers=(-1,)) -> HeadSpec:
    c = target.config
    return HeadSpec(hidden=c.hidden_size, heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
                    intermediate=c.intermediate_size, rope_theta=_rope_theta(c), eps=c.rms_norm_eps,
                    feature_layers=tuple(feature_layers), target_layer=c.num_hidden_layers - 1)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def save_head(head: FeatureHead, folder: Path, meta: dict, *, int8: bool = True) -> int:
    """Trained tensors as safetensors (int8 per-row with fp16 scales, or fp16) plus the draft
    vocabulary; returns the file's size in bytes."""
    from safetensors.torch import save_file

    from pipeline.packed_weights import pack

    tensors = {"vocab_ids": head.vocab_ids.to(torch.int32), **pack(head.state_dict(), mode="int8" if int8 else "fp16")}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "head.safetensors"), metadata={"format": "pt"})
    (folder / "head.json").write_text(json.dumps({"spec": asdict(head.spec), **meta}, indent=2) + "\n")
    return (folder / "head.safetensors").stat().st_size


def load_head(target, folder: Path = FEATURE_DIR) -> FeatureHead:
    """The committed head for `target` (its embeddings are read from the loaded target)."""
    from safetensors.torch import load_file

    meta = json.loads((Path(folder) / "head.json").read_text())
    spec_dict = dict(meta["spec"])
    spec_dict["feature_layers"] = tuple(spec_dict["feature_layers"])
    spec = HeadSpec(**spec_dict)
    tensors = load_file(str(Path(folder) / "head.safetensors"))
    from pipeline.packed_weights import unpack

    head = FeatureHead(spec, target.get_input_embeddings().weight, tensors.pop("vocab_ids"))
    # heads saved before decoder stacks named their one layer "layer."
    head.load_state_dict({("layers.0." + k[6:] if k.startswith("layer.") else k): v for k, v in unpack(tensors).items()})
    head.eval().requires_grad_(False)
    return head


def draft_vocab(counts: torch.Tensor, size: int) -> torch.Tensor:
    """The `size` most frequent target tokens (sorted ids)."""
    return counts.topk(min(size, counts.numel())).indices.sort().values

