"""Distillation data for drafters: the target's greedy continuations of a varied prompt set,
with the target's top-k logits and its hidden states ("features", at FEATURE_LAYERS) at every
position (prompt and continuation), saved in shards.

The ladder trains on the top-k logits; the feature-conditioned head (training/feature_head.py)
on the features and the same logits. One teacher-forced forward gives both for every position.

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

from training.distill_prompts import build_prompts

log = structlog.get_logger(__name__)


# Hidden-state indices stored per position (transformers' output_hidden_states numbering: 0 is the
# embeddings, the last is the final-norm output that feeds the head): a low, a middle and the top
# layer, as EAGLE-3 fuses them. Index -1 is the default feature a verifier returns.
FEATURE_LAYERS = (2, 15, -1)


@torch.no_grad()
def target_topk(model, sequences: list[list[int]], pad_id: int, k: int, feature_layers=None):
    """Teacher-forced target logits over right-padded sequences; top-k per real position, and
    the hidden states at ``feature_layers`` (fp16 ``[T, layers, hidden]``) when asked."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=feature_layers is not None)
    values, indices = out.logits.topk(k, dim=-1)
    feats = None
    if feature_layers is not None:
        feats = torch.stack([out.hidden_states[i] for i in feature_layers], dim=2).to(torch.float16)
    return [
        (indices[row, : len(seq)].to(torch.int32), values[row, : len(seq)].to(torch.float16),
         None if feats is None else feats[row, : len(seq)].clone())
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


@torch.no_grad()
def greedy_records(model, tokenizer, prompts: list[str], max_new_tokens: int, top_k: int,
                   feature_layers: tuple[int, ...]) -> list[dict]:
    """Shard records from one batched greedy generation, reading the features and the top-k
    logits off the generation's own forwards (output_hidden_states) rather than a second
    teacher-forced pass: the head's top-k comes from the final-norm state, so a record costs
    the generation plus one head matmul per position. The last generated token has no forward
    of its own, so each sequence ends one token before it."""
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(
        **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
        output_hidden_states=True, return_dict_in_generate=True,
    )
    width = batch["input_ids"].shape[1]
    layers = tuple(feature_layers) if -1 in feature_layers else (*feature_layers, -1)
    # [B, width + steps - 1, len(layers), H]: step 0 covers the (left-padded) prompt, step i the
    # token generated at step i - 1
    steps = [torch.stack([h[i] for i in layers], dim=2) for h in out.hidden_states]
    hidden = torch.cat(steps, dim=1)
    top = layers.index(-1)
    head = model.get_output_embeddings().weight
    records = []
    for row in range(len(prompts)):
        real = batch["attention_mask"][row].bool()
        prompt = batch["input_ids"][row][real].tolist()
        cont = out.sequences[row, width:].tolist()
        if tokenizer.eos_token_id in cont:
            cont = cont[: cont.index(tokenizer.eos_token_id) + 1]
        seq = (prompt + cont)[: len(prompt) + len(out.hidden_states) - 1]
        first = width - len(prompt)
        h = hidden[row, first : first + len(seq)]
        values, indices = (h[:, top] @ head.T).topk(top_k, dim=-1)
        keep = [layers.index(i) for i in feature_layers]
        records.append({
            "ids": torch.tensor(seq, dtype=torch.int32), "prompt_len": len(prompt),
            "top_ids": indices.to(torch.int32), "top_logits": values.to(torch.float16),
            "features": h[:, keep].to(torch.float16).clone(), "feature_layers": list(feature_layers),
        })
    return records


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
    feature_layers: tuple[int, ...] | None = FEATURE_LAYERS,
    worker: int = 0,
    workers: int = 1,
    topic_set: int | tuple[int, ...] = 1,
    template_set: int = 1,
) -> int:
    """Write shard_NNNN.pt files under out_dir until prompts or time run out; returns tokens.
    ``workers`` processes (each one torch thread: OpenMP teams stall on shared cores) fill one
    folder together, worker w writing the shards w, w + workers, ..."""
    from pipeline.models import load_causal_lm, load_tokenizer
    from workers.packed_linear import prepack_linears

    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_causal_lm(target, dtype="float32")
    prepack_linears(model)  # batched generation and the teacher-forced forward: many rows per linear
    tokenizer = load_tokenizer(target)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = build_prompts(tokenizer, held_out=False, n_chat=n_chat, n_prose=n_prose, seed=seed,
                            topic_set=topic_set, template_set=template_set)
    random.Random(seed).shuffle(prompts)
    start, total = time.monotonic(), 0
    batches = range(0, len(prompts), batch_size)[:max_shards]  # a shard count reproduces a data set exactly
    for shard, first in enumerate(tqdm(batches, desc="distill data", unit="batch")):
        path = out_dir / f"shard_{shard:04d}.pt"
        if shard % workers != worker or path.exists():  # resumable: a rerun continues where the last one stopped
            continue
        if time.monotonic() - start > time_budget_s:
            log.info("distill_data_time_budget_reached", shards=shard, tokens=total)
            break
        chunk = prompts[first : first + batch_size]
        if feature_layers:
            records = greedy_records(model, tokenizer, chunk, max_new_tokens, top_k, feature_layers)
        else:
            pairs = greedy_continuations(model, tokenizer, chunk, max_new_tokens)
            tops = target_topk(model, [p for p, _ in pairs], tokenizer.pad_token_id, top_k)
            records = [
                {"ids": torch.tensor(s, dtype=torch.int32), "prompt_len": n, "top_ids": ti, "top_logits": tv}
                for (s, n), (ti, tv, _) in zip(pairs, tops)
            ]
        seqs = [r["ids"] for r in records]
        torch.save(records, path.with_suffix(".partial"))
        path.with_suffix(".partial").rename(path)
        total += sum(len(s) for s in seqs)
        log.info("distill_shard_written", shard=shard, tokens=total, elapsed_s=round(time.monotonic() - start))
    return total
