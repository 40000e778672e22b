"""Batches of distillation shards: whole sequences, right-padded, grouped by length.

Whole sequences (not fixed chunks) keep each position's full left context, as at serving time;
grouping by length keeps padding small. The iterator is endless and reshuffles every epoch.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path

import torch


def load_records(folder: Path, max_shards: int | None = None) -> list[dict]:
    paths = sorted(Path(folder).glob("shard_*.pt"))[:max_shards]
    if not paths:
        raise FileNotFoundError(f"no distillation shards in {folder} (run `sled train drafters --generate`)")
    records = []
    for path in paths:
        records += torch.load(path)
    return records


def shard_sequences(folders: list[Path], max_shards: int | None = None) -> Iterator[tuple[list[int], int]]:
    """(ids, prompt_len) of every record in the folders' shards (the first ``max_shards``, folder
    by folder), one shard in memory at a time (the n-gram datastore needs only the ids, not the
    features and top-k that fill the shards)."""
    paths = [path for folder in folders for path in sorted(Path(folder).glob("shard_*.pt"))][:max_shards]
    if not paths:
        raise FileNotFoundError(f"no distillation shards in {list(map(str, folders))} (run `sled train drafters --generate`)")
    for path in paths:
        for record in torch.load(path):
            ids = record["ids"]
            yield (ids.tolist() if hasattr(ids, "tolist") else list(ids)), int(record["prompt_len"])


def collate(records: list[dict], top_k: int, continuation_only: bool = False) -> dict:
    width = max(len(r["ids"]) for r in records)
    ids = torch.zeros((len(records), width), dtype=torch.long)
    mask = torch.zeros((len(records), width), dtype=torch.bool)
    top_ids = torch.zeros((len(records), width, top_k), dtype=torch.long)
    top_logits = torch.zeros((len(records), width, top_k), dtype=torch.float32)
    for row, r in enumerate(records):
        n = len(r["ids"])
        ids[row, :n] = r["ids"].long()
        # the loss may skip prompt positions: position prompt_len-1 predicts the first generated token
        mask[row, (r["prompt_len"] - 1 if continuation_only else 0) : n] = True
        top_ids[row, :n] = r["top_ids"][:, :top_k].long()
        top_logits[row, :n] = r["top_logits"][:, :top_k].float()
    return {"ids": ids, "mask": mask, "top_ids": top_ids, "top_logits": top_logits}


def length_batches(records: list[dict], tokens_per_batch: int, seed: int) -> list[list[dict]]:
    """Batches of similar-length sequences holding about `tokens_per_batch` padded tokens."""
    rng = random.Random(seed)
    order = sorted(records, key=lambda r: len(r["ids"]) + rng.random())
    batches, current = [], []
    for r in order:
        width = max([len(x["ids"]) for x in current] + [len(r["ids"])])
        if current and width * (len(current) + 1) > tokens_per_batch:
            batches.append(current)
            current = []
        current.append(r)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def endless_batches(records: list[dict] | Callable[[], list[dict]], tokens_per_batch: int, top_k: int,
                    seed: int = 0, continuation_only: bool = False) -> Iterator[tuple]:
    """(ids, batch dict) pairs forever, a new shuffle each epoch. `records` may be a loader
    called at every epoch, so shards written meanwhile (generation still running) join in."""
    epoch = 0
    while True:
        current = records() if callable(records) else records
        for group in length_batches(current, tokens_per_batch, seed + epoch):
            batch = collate(group, top_k, continuation_only)
            yield batch["ids"], batch
        epoch += 1
