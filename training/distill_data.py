"""Distillation data for drafters: the target's greedy continuations of a varied prompt set,
with the target's top-k logits at every position (prompt and continuation), saved in shards.

Greedy continuations are what a drafter must predict at serving time (greedy verification), so
they are the best-matched data; the top-k logits give a soft target without storing 49k-way
rows. Shards are written as they complete so training can start on a partial set.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import structlog
import torch
from tqdm import tqdm

from training.prompts import build_prompts

log = structlog.get_logger(__name__)


@torch.no_grad()
def target_topk(model, sequences: list[list[int]], pad_id: int, k: int):
    """Teacher-forced target logits over right-padded sequences; top-k per real position."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    logits = model(input_ids=ids, attention_mask=mask).logits
    values, indices = logits.topk(k, dim=-1)
    return [
        (indices[row, : len(seq)].to(torch.int32), values[row, : len(seq)].to(torch.float16))
        for row, seq in enumerate(sequences)
    ]


@torch.no_grad()
def greedy_continuations(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[tuple[list[int], int]]:
    """(prompt + continuation ids, prompt length) per prompt; continuation stops at EOS."""
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(
        **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    width = batch["input_ids"].shape[1]
    results = []
    for row in range(len(prompts)):
        prompt = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        cont = out[row, width:].tolist()
        if tokenizer.eos_token_id in cont:
            cont = cont[: cont.index(tokenizer.eos_token_id) + 1]
        results.append((prompt + cont, len(prompt)))
    return results


def generate_shards(
    out_dir: Path,
    *,
    target: str = "smollm2",
    n_chat: int = 1100,
    n_prose: int = 1500,
    batch_size: int = 48,
    max_new_tokens: int = 160,
    top_k: int = 32,
    time_budget_s: float = 3600.0,
    max_shards: int | None = None,
    seed: int = 0,
) -> int:
    """Write shard_NNNN.pt files under out_dir until prompts or time run out; returns tokens."""
    from pipeline.models import load_causal_lm, load_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_causal_lm(target, dtype="float32")
    tokenizer = load_tokenizer(target)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = build_prompts(tokenizer, held_out=False, n_chat=n_chat, n_prose=n_prose, seed=seed)
    random.Random(seed).shuffle(prompts)
    start, total = time.monotonic(), 0
    batches = range(0, len(prompts), batch_size)[:max_shards]  # a shard count reproduces a data set exactly
    for shard, first in enumerate(tqdm(batches, desc="distill data", unit="batch")):
        path = out_dir / f"shard_{shard:04d}.pt"
        if path.exists():  # resumable: a rerun continues where the last one stopped
            continue
        if time.monotonic() - start > time_budget_s:
            log.info("distill_data_time_budget_reached", shards=shard, tokens=total)
            break
        pairs = greedy_continuations(model, tokenizer, prompts[first : first + batch_size], max_new_tokens)
        seqs = [p for p, _ in pairs]
        tops = target_topk(model, seqs, tokenizer.pad_token_id, top_k)
        records = [
            {"ids": torch.tensor(s, dtype=torch.int32), "prompt_len": n, "top_ids": ti, "top_logits": tv}
            for (s, n), (ti, tv) in zip(pairs, tops)
        ]
        torch.save(records, path.with_suffix(".partial"))
        path.with_suffix(".partial").rename(path)
        total += sum(len(s) for s in seqs)
        log.info("distill_shard_written", shard=shard, tokens=total, elapsed_s=round(time.monotonic() - start))
    return total
