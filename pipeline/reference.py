"""The target model decoding alone, with transformers' own `generate`: the yardstick SLED's
output is compared with (never SLED's own code path)."""

from __future__ import annotations

import torch


@torch.inference_mode()
def greedy_reference(model, prompt: list[int], max_new_tokens: int, stop_ids: list[int] | None = None) -> list[int]:
    ids = torch.tensor([prompt], dtype=torch.long, device=model.get_input_embeddings().weight.device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        do_sample=False,
        num_beams=1,
        eos_token_id=list(stop_ids) if stop_ids else None,
        pad_token_id=0,
        repetition_penalty=None,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    return out[0, len(prompt):].tolist()
