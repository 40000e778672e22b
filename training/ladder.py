"""The committed drafter ladder: `load_rung` builds a plain LlamaForCausalLM per device class.

A rung is the target's embeddings and first `stem_layers` layers (verbatim, read from the
loaded target, never stored), the ladder's trained layers up to the rung's depth, the rung's own
final norm and the target's tied head. It is an ordinary HF causal LM (KV cache, `.logits`),
with the target's tokenizer and vocabulary.
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path

import torch

LADDER_DIR = Path(__file__).resolve().parent.parent / "drafters" / "ladder"
RUNGS: list[str] = ["pi5", "orin", "large"]  # the committed rungs (drafters/ladder/ladder.json)


@lru_cache(maxsize=4)
def ladder_raw(folder: str) -> tuple[dict, dict]:
    """A saved ladder's ladder.json and its tensors as stored, read once per folder."""
    from safetensors.torch import load_file

    meta = json.loads((Path(folder) / "ladder.json").read_text())
    return meta, load_file(str(Path(folder) / "ladder.safetensors"))


def ladder_files(folder: str, target=None) -> tuple[dict, dict]:
    """A saved ladder's ladder.json and its tensors in float32 (pipeline/packed_weights.py). A
    ladder stored as differences from the target's layers needs the loaded ``target``."""
    from pipeline.packed_weights import unpack

    meta, raw = ladder_raw(folder)
    return meta, unpack(raw, base=None if target is None else target.model.state_dict())


def load_rung(name: str, target_spec: str = "smollm2", dtype: str = "float32", *, target=None,
              folder: Path = LADDER_DIR):
    """The drafter for device class `name` (one of RUNGS), in eval mode without gradients.
    Pass an already-loaded `target` to reuse it (its modules are copied, not shared)."""
    from transformers import LlamaForCausalLM

    from pipeline.models import load_causal_lm

    meta, _ = ladder_raw(str(folder))
    if name not in meta["rungs"]:
        raise ValueError(f"unknown rung {name!r}; the ladder has {meta['rungs']}")
    rung = meta["rungs"].index(name)
    stem = meta["stem_layers"]
    depth = stem + sum(meta["partition_layers"][: rung + 1])
    target = target if target is not None else load_causal_lm(target_spec, dtype="float32")
    _, tensors = ladder_files(str(folder), target)

    config = copy.deepcopy(target.config)
    config.num_hidden_layers = depth
    config.layer_types = None if getattr(config, "layer_types", None) is None else config.layer_types[:depth]
    model = LlamaForCausalLM(config)
    state = {
        "model.embed_tokens.weight": target.model.embed_tokens.weight,
        "model.norm.weight": tensors[f"norms.{rung}.weight"],
    }
    for key, value in target.model.layers[:stem].state_dict().items():
        state[f"model.layers.{key}"] = value
    for key, value in tensors.items():
        if key.startswith("layers.") and int(key.split(".")[1]) < depth:
            state[f"model.{key}"] = value
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"ladder rung {name!r} does not match its files: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.to(getattr(torch, dtype))
    model.eval()
    model.requires_grad_(False)
    return model
