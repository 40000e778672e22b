"""The drafter ladder as an IncrementalNet over the target's own modules.

Partition 0 holds the target's embeddings and its first `stem_layers` decoder layers, frozen and
verbatim (never stored: loaded from the target), followed by trainable layers; later partitions
are trainable decoder layers only. Each rung's head is a trainable RMSNorm feeding the target's
frozen tied embedding matrix, so every rung shares the target's vocabulary and tokenizer.
Trainable layers start as copies of the target layers at the same depth (a head start the probe
in shared/MODELS.md measured) or from Llama's random init.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding


RUNG_NAMES = ("pi5", "orin", "large", "xl")  # device classes, smallest first


@dataclass(frozen=True)
class LadderSpec:
    """Layout of the ladder: a frozen stem of target layers, then trained layers per partition."""

    rungs: tuple[str, ...] = ("pi5", "orin", "large")
    stem_layers: int = 6
    partition_layers: tuple[int, ...] = (2, 3, 3)

    def depth(self, rung: int) -> int:
        """Decoder layers in rung `rung` (stem included)."""
        return self.stem_layers + sum(self.partition_layers[: rung + 1])

    def trained_layers(self) -> int:
        return sum(self.partition_layers)


class DecoderBlocks(nn.Module):
    """A run of Llama decoder layers over full sequences (training/eval: causal, no cache)."""

    def __init__(self, layers: list[nn.Module], rotary: nn.Module, embed: nn.Module | None = None):
        super().__init__()
        self.embed = embed
        self.layers = nn.ModuleList(layers)
        self.rotary = rotary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) if self.embed is not None else x
        positions = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        position_embeddings = self.rotary(h, positions)
        for layer in self.layers:
            # attention_mask=None makes SDPA causal; right padding never leaks into real positions.
            h = layer(h, position_ids=positions, position_embeddings=position_embeddings)
        return h


class RungHead(nn.Module):
    """The rung's own final norm; logits come from the shared frozen embedding matrix."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h)


def build_drafter_net(target, spec: LadderSpec, *, init_from_target: bool = True, seed: int = 0):
    """IncrementalNet for the ladder; returns (net, embedding weight for logits)."""
    from training.incremental import IncrementalNet

    torch.manual_seed(seed)
    config = copy.deepcopy(target.config)
    config._attn_implementation = "sdpa"
    base = target.model
    rotary = LlamaRotaryEmbedding(config)
    embed = base.embed_tokens
    embed.requires_grad_(False)
    stem = [base.layers[i] for i in range(spec.stem_layers)]
    for layer in stem:
        layer.requires_grad_(False)

    partitions, heads, depth = [], [], spec.stem_layers
    for k, n in enumerate(spec.partition_layers):
        trained = []
        for _ in range(n):
            layer = LlamaDecoderLayer(config, layer_idx=depth)
            if init_from_target:
                layer.load_state_dict(base.layers[depth].state_dict())
            else:
                _init_random(layer, config.initializer_range)
            layer.requires_grad_(True)
            trained.append(layer)
            depth += 1
        if k == 0:
            partitions.append(DecoderBlocks(stem + trained, rotary, embed=embed))
        else:
            partitions.append(DecoderBlocks(trained, rotary))
        norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        norm.load_state_dict(base.norm.state_dict())
        norm.requires_grad_(True)
        heads.append(RungHead(norm))
    return IncrementalNet(partitions, heads), embed.weight


def _init_random(layer: nn.Module, std: float) -> None:
    for module in layer.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, LlamaRMSNorm):
            nn.init.ones_(module.weight)
