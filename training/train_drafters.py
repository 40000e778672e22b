"""`sled train drafters`: distil the drafter ladder from the target with the incremental trainer.

Every rung keeps an exit loss ("all"), so a rung stays a valid drafter after deeper partitions
join; joining partitions get a look-ahead window. The result is written as fp16 safetensors:
trained layers once (rungs are nested, so they share them) and one norm per rung; the target's
embeddings, stem layers and head are never stored.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import structlog
import torch
from safetensors.torch import save_file

from training.heldout_alpha import heldout_sequences
from training.distill_dataset import endless_batches, load_records
from training.distill_loss import candidate_distill_loss
from training.drafter_net import RUNG_NAMES, LadderSpec, build_drafter_net
from training.incremental import IncrementalConfig, IncrementalTrainer
from training.ladder import ladder_files, ladder_raw

log = structlog.get_logger(__name__)

LADDER_DIR = Path(__file__).resolve().parent.parent / "drafters" / "ladder"


def make_evaluate(embed_weight: torch.Tensor, sequences):
    """Trainer callback, per rung: held-out α and the cross-entropy of the target's greedy
    continuation tokens (the held-out loss), teacher-forced."""

    def evaluate(rung_outputs, rungs):
        metrics = {}
        for k in rungs:
            nll, matched, count = 0.0, 0, 0
            for ids, n in sequences:
                x = torch.tensor([ids])
                logits = (rung_outputs(x, [k])[k] @ embed_weight.T)[0, n - 1 : -1]
                truth = x[0, n:]
                nll += float(torch.nn.functional.cross_entropy(logits, truth, reduction="sum"))
                matched += int((logits.argmax(-1) == truth).sum())
                count += len(truth)
            metrics[k] = {"acc": matched / max(1, count), "loss": nll / max(1, count)}
        return metrics

    return evaluate


def train_ladder(
    data_dir: Path,
    out_dir: Path = LADDER_DIR,
    *,
    spec: LadderSpec = LadderSpec(),
    target: str = "smollm2",
    steps: int = 1200,
    init: str = "lookahead",
    init_from_target: bool = True,
    lookahead_steps: int = 60,
    tokens_per_batch: int = 3072,
    lr: float = 3e-4,
    eval_prompts: int = 16,
    head_top_k: int = 8,
    head_positions: int | None = 1024,
    continuation_only: bool = False,
    full_vocab_positions: int = 128,
    seed: int = 0,
    save: bool = True,
    name: str = "ladder",
    max_shards: int | None = None,
    init_from: Path | None = None,
    grow: tuple[int, ...] = (),
    weights: str = "int8",
) -> dict:
    """Train the ladder, or with ``init_from`` (a saved ladder folder) go on training that ladder:
    its spec replaces ``spec`` and its rungs are active from the first step.

    ``grow`` (with ``init_from``) adds partitions of that many layers on top of the saved ladder,
    one at a time, as the ladder was first grown: each starts as the target's layers at its depth,
    trains alone for a look-ahead window of ``lookahead_steps`` while the saved rungs are frozen,
    then joins (the first at once, later ones after equal stages). Without ``grow``, ``init`` and
    ``lookahead_steps`` do not apply. ``weights``: how the saved matrices are stored (save_ladder)."""
    from pipeline.models import load_causal_lm, load_tokenizer

    started = time.monotonic()
    torch.manual_seed(seed)
    target_model = load_causal_lm(target)
    tokenizer = load_tokenizer(target)
    heldout = heldout_sequences(target, model=target_model, tokenizer=tokenizer)
    saved = None
    if init_from is not None:
        saved = ladder_spec(init_from)
        spec = grown_spec(saved, grow)
    elif grow:
        raise ValueError("grow adds partitions to a saved ladder: pass init_from")
    net, embed_weight = build_drafter_net(target_model, spec, init_from_target=init_from_target, seed=seed)
    if saved is not None:
        load_ladder_weights(net, saved, init_from, target_model)
    seen: dict[str, int] = {}

    def records_now() -> list[dict]:  # re-read each epoch: generation may still be adding shards
        records = load_records(data_dir, max_shards)
        for r in records:  # the ladder reads tokens and top-k only; features would cost GBs of RAM
            r.pop("features", None)
        seen["records"], seen["tokens"] = len(records), sum(len(r["ids"]) for r in records)
        log.info("distill_epoch_data", **seen)
        return records

    records = records_now()
    n_tokens = seen["tokens"]
    log.info("drafter_training_started", records=len(records), tokens=n_tokens, steps=steps, init=init)
    del records  # the iterator reloads per epoch
    start = 1 if saved is None else len(saved.partition_layers)
    joins = len(net) - start
    if saved is not None and not grow:
        lookahead_steps = 0
    stage = (steps - lookahead_steps * joins) // max(1, joins if saved is not None else len(net))
    # A grown ladder's saved rungs are trained already: its first new partition joins at step 0.
    stage_steps = [stage] * len(net) if saved is None else [0] * start + [stage] * joins
    config = IncrementalConfig(
        total_steps=steps, lr=lr, init=init, lookahead_steps=lookahead_steps, schedule="steps",
        stage_steps=stage_steps, exit_loss="all", eval_every=max(50, steps // 12), grad_clip=1.0, seed=seed,
        start_partitions=start,
    )
    trainer = IncrementalTrainer(
        net, config, endless_batches(records_now, tokens_per_batch, top_k=16, seed=seed,
                                        continuation_only=continuation_only),
        loss_fn=lambda h, batch: candidate_distill_loss(h, batch, embed_weight, top_k=head_top_k,
                                                        random_negatives=512, max_positions=head_positions,
                                                        full_vocab_positions=full_vocab_positions),
        evaluate=make_evaluate(embed_weight, heldout[:eval_prompts] + heldout[-eval_prompts:]),
        name=name,
    )
    history = trainer.run()
    wall = time.monotonic() - started
    summary = {"spec": asdict(spec), "target": target, "data": str(data_dir), "steps": steps, "init": init,
               "init_from_target": init_from_target, "train_tokens_at_start": n_tokens,
               "train_tokens_at_end": seen["tokens"], "records_at_end": seen["records"],
               "tokens_per_batch": tokens_per_batch, "head_top_k": head_top_k, "head_positions": head_positions,
               "continuation_only": continuation_only, "full_vocab_positions": full_vocab_positions,
               "lr": lr, "seed": seed, "max_shards": max_shards, "wall_s": round(wall, 1),
               "init_from": None if init_from is None else str(init_from), "grow": list(grow),
               "weights": weights, "history": history.to_dict()}
    if save:
        save_ladder(net, spec, out_dir, summary, weights=weights, base=target_model.model.state_dict())
    log.info("drafter_training_finished", wall_s=round(wall), final=history.final())
    return summary


def repack_ladder(src: Path, out_dir: Path, weights: str, target: str = "smollm2") -> int:
    """Write the ladder in ``src`` to ``out_dir`` in another weight layout (its layout and summary
    files copied); returns the new weight file's bytes."""
    from pipeline.models import load_causal_lm

    model = load_causal_lm(target)
    meta, tensors = ladder_files(str(src), model)
    summary = src / "training-summary.json"
    if summary.exists() and src.resolve() != out_dir.resolve():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / summary.name).write_text(summary.read_text())
    size = write_ladder(out_dir, tensors, meta, weights=weights, base=model.model.state_dict())
    log.info("ladder_repacked", src=str(src), out=str(out_dir), weights=weights, bytes=size)
    return size


def ladder_spec(folder: Path) -> LadderSpec:
    meta, _ = ladder_raw(str(folder))
    return LadderSpec(rungs=tuple(meta["rungs"]), stem_layers=meta["stem_layers"],
                      partition_layers=tuple(meta["partition_layers"]))


def grown_spec(saved: LadderSpec, grow: tuple[int, ...]) -> LadderSpec:
    """``saved`` with partitions of ``grow`` layers added on top; a new rung takes the device-class
    name of its position in RUNG_NAMES."""
    layers = tuple(saved.partition_layers) + tuple(grow)
    if len(layers) > len(RUNG_NAMES):
        raise ValueError(f"at most {len(RUNG_NAMES)} rungs ({', '.join(RUNG_NAMES)})")
    names = tuple(saved.rungs) + RUNG_NAMES[len(saved.rungs) : len(layers)]
    return LadderSpec(rungs=names, stem_layers=saved.stem_layers, partition_layers=layers)


def load_ladder_weights(net, spec: LadderSpec, folder: Path, target=None) -> None:
    """The saved ladder's trained layers and rung norms into the first partitions of ``net`` (the
    inverse of save_ladder; quantised matrices come back as their dequantised values). ``spec`` is
    the saved ladder's; ``net`` may have more partitions (a grown ladder). ``target``: the loaded
    target, for a ladder stored as differences from its layers."""
    _, tensors = ladder_files(str(folder), target)
    depth = spec.stem_layers
    with torch.no_grad():
        for k, part in enumerate(net.partitions[: len(spec.partition_layers)]):
            trained = list(part.layers)[spec.stem_layers:] if k == 0 else list(part.layers)
            for layer in trained:
                state = {key: tensors[f"layers.{depth}.{key}"].float() for key in layer.state_dict()}
                layer.load_state_dict(state)
                depth += 1
            net.heads[k].norm.weight.copy_(tensors[f"norms.{k}.weight"].float())


def save_ladder(net, spec: LadderSpec, out_dir: Path, summary: dict, *, weights: str = "int8",
                base: dict | None = None) -> None:
    """safetensors of what training changed: trained layers (once) and per-rung norms, matrices in
    the ``weights`` layout of pipeline/packed_weights.py (``int4-delta``: as differences from
    ``base``, the target's ``model.state_dict()``, whose layer names the ladder's share)."""
    tensors, depth = {}, spec.stem_layers
    for k, part in enumerate(net.partitions):
        trained = list(part.layers)[spec.stem_layers:] if k == 0 else list(part.layers)
        for layer in trained:
            for key, value in layer.state_dict().items():
                tensors[f"layers.{depth}.{key}"] = value
            depth += 1
        tensors[f"norms.{k}.weight"] = net.heads[k].norm.weight
    meta = {"rungs": list(spec.rungs), "stem_layers": spec.stem_layers,
            "partition_layers": list(spec.partition_layers), "target": summary["target"],
            "export": lineage(summary)}
    size = write_ladder(out_dir, tensors, meta, weights=weights, base=base)
    log.info("ladder_saved", out=str(out_dir), tensors=len(tensors), bytes=size)


def lineage(summary: dict) -> str:
    """ladder.json's ``export`` line: how this ladder came to be, one clause per training run. A
    warm-started run extends the line of the ladder it started from, so a ladder trained over many
    rounds still says where it came from without anyone copying the line by hand."""
    how = f"{summary.get('steps', '?')} steps at lr {summary.get('lr', '?')} on {summary.get('data', '?')}"
    source = summary.get("init_from")
    if source is None:
        return f"trained from the target with partitions {summary.get('spec', {}).get('partition_layers')}, {how}"
    before = ladder_raw(str(source))[0].get("export", "")  # read (and cached) by the warm start
    grown = f", grown by partitions {summary['grow']} (a look-ahead window each)" if summary.get("grow") else ""
    return f"{before or f'the ladder in {source}'}; then a warm-started round{grown}, {how}"


def write_ladder(out_dir: Path, tensors: dict, meta: dict, *, weights: str, base: dict | None) -> int:
    """``ladder.safetensors`` (``tensors`` packed in the ``weights`` layout) and ``ladder.json``
    (``meta``, with ``weights`` naming the layout: pipeline/packed_weights.py) in ``out_dir``;
    returns the weight file's bytes."""
    from pipeline.packed_weights import pack

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "ladder.safetensors"
    save_file(pack(tensors, mode=weights, base=base), str(path), metadata={"format": "pt"})
    (out_dir / "ladder.json").write_text(json.dumps({**meta, "weights": weights}, indent=2) + "\n")
    ladder_raw.cache_clear()  # a folder read before (a warm start's own --out) now holds other weights
    return path.stat().st_size
