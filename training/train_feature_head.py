"""`sled train drafters --kind feature`: distil the feature-conditioned head (workers/feature_head.py).

Teacher-forced, EAGLE-style, on the distillation shards (training/distill_data.py stores the
target's features and top-k logits at every position). The loss is a soft cross-entropy
against the target's top-k distribution at every unroll level (EAGLE-3's "training-time test":
level j feeds the head its own predicted features, as draft step j + 1 does), weighted
0.8^j, plus a small smooth-L1 pull of the level-0 prediction towards the true next feature
(EAGLE-1's regression term, kept small: the probe in shared/MODELS.md found a regression-heavy
loss underfits). Gaussian noise on the input features makes the head robust to its own errors.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path

import structlog
import torch
import torch.nn.functional as F

from training.distill_dataset import length_batches
from workers.feature_head import (FEATURE_DIR, FeatureHead, build_head, draft_vocab, load_head, residual_rms, save_head,
                                  spec_for, target_layer_state)

log = structlog.get_logger(__name__)
TREE_NODES = 8  # the held-out tree figure is measured for the default feature class's tree (config.toml)


def load_feature_records(folder: Path, feature_layers: tuple[int, ...], max_shards: int | None = None,
                         seed: int = 0, first_shard: int = 0) -> list[dict]:
    """Shard records with only the asked feature layers kept (fp16), the first ``max_shards``
    shards (a learning-curve subset is a prefix of the same data, as for the ladder), numbered
    ``first_shard`` or above (a warm-started run continues on shards the head has not seen;
    workers write shard numbers out of order, so this is the number, not the rank)."""
    records = []
    paths = [p for p in sorted(Path(folder).glob("shard_*.pt")) if int(p.stem.split("_")[1]) >= first_shard]
    for path in paths[:max_shards]:
        for r in torch.load(path):
            if "features" not in r:
                raise ValueError(f"{path} has no features: regenerate it (training/distill_data.py)")
            keep = [r["feature_layers"].index(i) for i in feature_layers]
            r["features"] = r["features"][:, keep].reshape(len(r["ids"]), -1)
            records.append(r)
    random.Random(seed).shuffle(records)
    return records


def widen_inputs(head: FeatureHead, target, feature_layers: tuple[int, ...]) -> FeatureHead:
    """The saved head grown to condition on more of the target's layers (EAGLE-3 fuses a low, a
    middle and the top one), without changing what it computes: the new fuse layer starts as
    the identity on the layer the head was trained on and zero on the added ones, so training
    starts from the saved head's figures and learns what the other layers add
    (docs/training-history.md, rounds 19 and 20)."""
    old = tuple(head.spec.feature_layers)
    if len(old) != 1 or old[0] not in feature_layers:
        raise ValueError(f"a head on layers {old} can only be widened to layers that include {old[0]}, not {feature_layers}")
    grown = FeatureHead(dataclasses.replace(head.spec, feature_layers=feature_layers),
                        target.get_input_embeddings().weight, head.vocab_ids)
    missing, unexpected = grown.load_state_dict(head.state_dict(), strict=False)
    assert not unexpected and set(missing) == {"fuse.weight"}, (missing, unexpected)
    h, at = head.spec.hidden, feature_layers.index(old[0])
    with torch.no_grad():
        grown.fuse.weight.zero_()
        grown.fuse.weight[:, at * h:(at + 1) * h] = torch.eye(h)
    log.info("feature_head_widened", from_layers=list(old), to_layers=list(feature_layers))
    return grown


def deepen(head: FeatureHead, target, layers: int) -> FeatureHead:
    """The saved head grown to ``layers`` decoder layers, the incremental-training way: each
    added layer joins in front (where the target's own earlier layer sits), copied from that
    target layer with its two residual branches' output projections (o_proj, down_proj) at zero,
    so the grown head computes exactly what the saved one did and training starts from its
    figures; the copied projections give the branches a direction to grow in."""
    if layers < head.spec.layers:
        raise ValueError(f"a head of {head.spec.layers} layers cannot be cut to {layers}")
    added = layers - head.spec.layers
    spec = dataclasses.replace(head.spec, layers=layers)
    grown = FeatureHead(spec, target.get_input_embeddings().weight, head.vocab_ids)
    state = {}
    for key, value in head.state_dict().items():
        if key.startswith("layers."):  # the saved layers move back behind the added ones
            index, rest = key[len("layers."):].split(".", 1)
            key = f"layers.{int(index) + added}.{rest}"
        state[key] = value
    first = spec.target_layer - layers + 1
    for i in range(added):
        layer = target_layer_state(target, first + i)
        layer["o_proj.weight"].zero_()
        layer["down_proj.weight"].zero_()
        state.update({f"layers.{i}.{k}": v for k, v in layer.items()})
    grown.load_state_dict(state)
    log.info("feature_head_deepened", from_layers=head.spec.layers, to_layers=layers)
    return grown


def vocab_counts(records: list[dict], vocab_size: int) -> torch.Tensor:
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for r in records:
        counts += torch.bincount(r["top_ids"][:, 0].long(), minlength=vocab_size)
    return counts


def collate(records: list[dict], lookup: torch.Tensor) -> dict:
    """Right-padded batch: features [B, W, width], tokens [B, W], the target's top-k at each
    position mapped into the draft vocabulary (-1: outside it), and real lengths."""
    width = max(len(r["ids"]) for r in records)
    b, feat = len(records), records[0]["features"].shape[-1]
    k = records[0]["top_ids"].shape[-1]
    out = {
        "features": torch.zeros(b, width, feat), "tokens": torch.zeros(b, width, dtype=torch.long),
        "top_ids": torch.full((b, width, k), -1, dtype=torch.long), "top_logits": torch.zeros(b, width, k),
        "lengths": torch.tensor([len(r["ids"]) for r in records]),
    }
    for i, r in enumerate(records):
        n = len(r["ids"])
        out["features"][i, :n] = r["features"].float()
        out["tokens"][i, :n] = r["ids"].long()
        out["top_ids"][i, :n] = lookup[r["top_ids"].long()]
        out["top_logits"][i, :n] = r["top_logits"].float()
    return out


def head_loss(head: FeatureHead, batch: dict, levels: int, noise: float, reg_weight: float) -> tuple[torch.Tensor, dict]:
    feats, tokens = batch["features"], batch["tokens"]
    outs = head.unrolled(feats, tokens, levels, noise=noise)
    t1 = tokens.shape[1] - 1
    # entry t predicts the token at t+2 from the target's distribution at position t+1
    top_ids, top_logits = batch["top_ids"][:, 1:], batch["top_logits"][:, 1:]
    in_vocab = top_ids >= 0
    target = torch.softmax(top_logits.masked_fill(~in_vocab, -1e4), -1)
    valid = torch.arange(t1)[None] < (batch["lengths"][:, None] - 1)
    valid &= in_vocab.any(-1)
    total, figures = 0.0, {}
    for j, pred in enumerate(outs):
        mask = valid & (torch.arange(t1)[None] >= j)
        logp = torch.log_softmax(head.logits(pred), -1)
        picked = logp.gather(-1, top_ids.clamp(min=0)) * in_vocab
        ce = -(target * picked).sum(-1)
        level_loss = (ce * mask).sum() / mask.sum().clamp(min=1)
        total = total + 0.8**j * level_loss
        with torch.no_grad():  # the head's greedy token is the target's (both in draft-vocabulary indices)
            hit = logp.argmax(-1) == top_ids[..., 0]
            figures[f"acc{j}"] = float((hit & mask).sum() / mask.sum().clamp(min=1))
    if reg_weight:
        true_next = (feats[:, 1:] if head.fuse is None else feats[:, 1:, -head.spec.hidden:])
        reg = F.smooth_l1_loss(outs[0], true_next, reduction="none").mean(-1)
        total = total + reg_weight * (reg * valid).sum() / valid.sum().clamp(min=1)
    return total, figures


def train_head(
    data_dir: Path,
    out_dir: Path = FEATURE_DIR,
    *,
    target: str = "smollm2",
    feature_layers: tuple[int, ...] = (-1,),
    vocab: int = 8192,
    max_shards: int | None = None,
    epochs: float = 2.0,
    tokens_per_batch: int = 1024,
    lr: float = 1e-3,
    levels: int = 3,
    noise: float = 0.05,
    reg_weight: float = 0.1,
    seed: int = 0,
    save: bool = True,
    time_budget_s: float | None = None,
    init_from: Path | None = None,
    first_shard: int = 0,
    head_layers: int | None = None,
) -> dict:
    """``init_from``: continue from a saved head (its vocabulary and shape; ``feature_layers``
    must match, or include its one layer) instead of starting from the target's last layer.
    ``head_layers``: decoder layers (default 1, or the saved head's); more than a saved head
    has grows it (``deepen``)."""
    from pipeline.models import load_causal_lm

    from training.feature_eval import evaluate_head, evaluate_tree, heldout_features

    started = time.monotonic()
    torch.manual_seed(seed)
    model = load_causal_lm(target)
    records = load_feature_records(data_dir, feature_layers, max_shards, seed, first_shard)
    if not records:
        raise ValueError(f"no shards in {data_dir} from {first_shard} to {max_shards}")
    positions = sum(len(r["ids"]) for r in records)
    if init_from is not None:
        head = load_head(model, init_from)
        if tuple(head.spec.feature_layers) != tuple(feature_layers):
            head = widen_inputs(head, model, tuple(feature_layers))
        if head_layers and head_layers != head.spec.layers:
            head = deepen(head, model, head_layers)
        head.requires_grad_(True)
        vocab_ids = head.vocab_ids
    else:
        vocab_ids = draft_vocab(vocab_counts(records, model.config.vocab_size), vocab)
        layers = head_layers or 1
        spec = dataclasses.replace(spec_for(model, feature_layers), layers=layers,
                                   residual_scale=residual_rms(model, model.config.num_hidden_layers - layers,
                                                               records[0]["ids"].tolist()[:256]))
        head = build_head(model, spec, vocab_ids)
    lookup = torch.full((model.config.vocab_size,), -1, dtype=torch.long)
    lookup[vocab_ids] = torch.arange(len(vocab_ids))
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    batches_per_epoch = len(length_batches(records, tokens_per_batch, seed))
    steps = max(1, int(batches_per_epoch * epochs))
    warmup = min(50, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    log.info("feature_head_training_started", positions=positions, records=len(records), steps=steps,
             vocab=len(vocab_ids), levels=levels)
    step, epoch, history = 0, 0, []
    head.train()
    while step < steps:
        for group in length_batches(records, tokens_per_batch, seed + epoch):
            if step >= steps or (time_budget_s and time.monotonic() - started > time_budget_s):
                steps = step
                break
            loss, figures = head_loss(head, collate(group, lookup), levels, noise, reg_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            if step % 50 == 0 or step == steps:
                history.append({"step": step, "loss": round(float(loss.detach()), 4), **{k: round(v, 4) for k, v in figures.items()},
                                "wall_s": round(time.monotonic() - started, 1)})
                log.info("feature_head_step", **history[-1])
        epoch += 1
    head.eval()
    heldout = heldout_features(target, model=model, feature_layers=feature_layers)
    result = evaluate_head(head, heldout, gamma=4)
    # and as the default fleet's feature class drafts greedy rounds (config.toml: tree_nodes = 8),
    # so that each round's summary has its tree figure too
    tree = evaluate_tree(head, heldout, gamma=4, tree_nodes=TREE_NODES)
    result.update(tree_tokens_per_round=tree["tokens_per_round"], tree_nodes=TREE_NODES)
    wall = time.monotonic() - started
    summary = {"target": target, "positions": positions, "records": len(records), "steps": steps,
               "epochs": epochs, "vocab": len(vocab_ids), "levels": levels, "noise": noise,
               "reg_weight": reg_weight, "lr": lr, "tokens_per_batch": tokens_per_batch,
               "feature_layers": list(feature_layers), "head_layers": head.spec.layers, "seed": seed,
               "wall_s": round(wall, 1),
               "init_from": str(init_from) if init_from else None, "first_shard": first_shard,
               "heldout": result, "history": history}
    if save:
        summary["file_bytes"] = save_head(head, out_dir, {k: v for k, v in summary.items() if k != "history"})
    log.info("feature_head_training_finished", wall_s=round(wall), **result)
    return summary
