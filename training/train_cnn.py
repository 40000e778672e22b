"""`sled train cnn`: baseline vs incremental (random / look-ahead) on ResNet and VGG.

All three methods of one network start from the same seed-initialised weights, see the same
batches and run the same number of optimiser steps (look-ahead windows included); they differ
only in which partitions train when. Results: a JSON summary and a PNG of the curves.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import structlog
import torch
from torch import nn

from training.cnn_models import CNNS
from training.image_data import FASHION_MNIST_DIR, ImageSplit, endless_image_batches, load_cifar10, load_fashion_mnist
from training.incremental import IncrementalConfig, IncrementalTrainer, smallest_sufficient
from training.plots import plot_runs

log = structlog.get_logger(__name__)

METHODS = ("baseline", "incremental-random", "incremental-lookahead")


def make_evaluate(test: ImageSplit, batch_size: int = 1000):
    def evaluate(rung_outputs, rungs):
        correct = {k: 0 for k in rungs}
        loss = {k: 0.0 for k in rungs}
        for first in range(0, len(test.labels), batch_size):
            x, y = test.images[first : first + batch_size], test.labels[first : first + batch_size]
            outputs = rung_outputs(x, rungs)
            for k in rungs:
                correct[k] += int((outputs[k].argmax(-1) == y).sum())
                loss[k] += float(nn.functional.cross_entropy(outputs[k], y, reduction="sum"))
        n = len(test.labels)
        return {k: {"acc": correct[k] / n, "loss": loss[k] / n} for k in rungs}

    return evaluate


def stage_lengths(steps: int, n: int, final_fraction: float | None) -> list[int]:
    """Steps per stage: equal, or `final_fraction` of them for the full network and the rest
    split equally among the earlier stages."""
    if final_fraction is None:
        return [steps // n] * n
    early = int(steps * (1 - final_fraction)) // (n - 1)
    return [early] * (n - 1) + [steps - early * (n - 1)]


def run_method(net_name: str, method: str, train: ImageSplit, test: ImageSplit, *, steps: int, width: float,
               batch_size: int, lr: float, lookahead_steps: int, seed: int, final_fraction: float | None = None) -> dict:
    torch.manual_seed(seed)
    net = CNNS[net_name](in_channels=train.images.shape[1], width=width)
    n = len(net)
    baseline = method == "baseline"
    stage_steps = stage_lengths(steps - (lookahead_steps * (n - 1) if method.endswith("lookahead") else 0), n,
                                final_fraction)
    config = IncrementalConfig(
        total_steps=steps, lr=lr, weight_decay=5e-4, optimizer="adamw",
        init="lookahead" if method.endswith("lookahead") else "random", lookahead_steps=lookahead_steps,
        schedule="steps", stage_steps=stage_steps, exit_loss="last" if baseline else "all",
        start_partitions=n if baseline else 1, eval_every=max(20, steps // 20), seed=seed,
    )
    trainer = IncrementalTrainer(
        net, config, endless_image_batches(train, batch_size, seed=seed), nn.functional.cross_entropy,
        make_evaluate(test), probe=train.images[:2], name=f"{net_name}/{method}",
    )
    started = time.monotonic()
    history = trainer.run()
    result = history.to_dict()
    result["wall_s"] = time.monotonic() - started
    result["flops_per_sample_note"] = "FLOPs counted per sample from Linear/Conv MACs (x2), backward = 2x forward"
    return result


def summarise(net_name: str, runs: dict[str, dict], tolerance: float) -> list[dict]:
    """One row per method: final accuracy, smallest rung within `tolerance` of the baseline's
    final accuracy and its parameter fraction, and the cost to first reach that accuracy."""
    base_acc = runs["baseline"]["evals"][-1]["rungs"][max(runs["baseline"]["evals"][-1]["rungs"])]["acc"]
    # "reaches a given loss in fewer steps": the given loss is incremental-random's final held-out loss
    random_final = runs["incremental-random"]["evals"][-1]["rungs"]
    given_loss = random_final[max(random_final)]["loss"]
    rows = []
    for method, hist in runs.items():
        final = hist["evals"][-1]["rungs"]
        to_loss = next((e["step"] for e in hist["evals"] if e["rungs"][max(e["rungs"])]["loss"] <= given_loss
                        and e["active"] == len(hist["rung_params"])), None)
        last = max(final)
        accs = [final[k]["acc"] for k in sorted(final)]
        small = smallest_sufficient(accs, base_acc, tolerance) if method != "baseline" else last
        reach = next((e for e in hist["evals"] if any(r["acc"] >= base_acc - tolerance for r in e["rungs"].values())), None)
        params = hist["rung_params"]
        # also: the smallest rung matching this run's own deepest rung (what a ladder would ship)
        own = smallest_sufficient(accs, accs[-1], tolerance)
        rows.append({
            "network": net_name, "method": method, "final_acc": final[last]["acc"],
            "rung_acc": accs, "smallest_sufficient_rung": small,
            "param_fraction": None if small is None else params[small] / params[-1],
            "reach_step": reach and reach["step"], "reach_wall_s": reach and round(reach["wall_s"], 1),
            "reach_tflops": reach and round(reach["flops"] / 1e12, 3),
            "total_tflops": round(hist["evals"][-1]["flops"] / 1e12, 3), "wall_s": round(hist["wall_s"], 1),
            "baseline_acc": base_acc, "smallest_matching_own_full": own,
            "given_loss": round(given_loss, 4), "steps_to_given_loss": to_loss,
            "own_param_fraction": params[own] / params[-1],
        })
    return rows


def train_cnns(*, networks=("resnet20", "vgg11"), dataset: str = "fashion-mnist", cifar_dir: Path | None = None,
               fashion_dir: Path = FASHION_MNIST_DIR,
               steps: int = 600, width: float = 0.5, batch_size: int = 64, lr: float = 2e-3, lookahead_steps: int = 30,
               tolerance: float = 0.005, test_samples: int = 5000, train_samples: int | None = None, seed: int = 0,
               final_fraction: float | None = None, tag: str = "",  # file-name suffix, e.g. "final60"
               out: Path = Path("out/cnn"), img_dir: Path | None = Path("docs/img")) -> list[dict]:
    if dataset == "cifar10":
        if cifar_dir is None:
            raise ValueError("--cifar-dir must point to a cifar-10-batches-py folder")
        train, test = load_cifar10(cifar_dir)
    else:
        train, test = load_fashion_mnist(fashion_dir)
    if train_samples:
        train = ImageSplit(train.images[:train_samples], train.labels[:train_samples])
    test = ImageSplit(test.images[:test_samples], test.labels[:test_samples])
    out.mkdir(parents=True, exist_ok=True)
    tag = f"-{tag}" if tag else ""
    rows = []
    for net_name in networks:
        runs = {m: run_method(net_name, m, train, test, steps=steps, width=width, batch_size=batch_size, lr=lr,
                              lookahead_steps=lookahead_steps, seed=seed, final_fraction=final_fraction)
                for m in METHODS}
        (out / f"{net_name}-{dataset}{tag}.json").write_text(json.dumps(runs))
        if img_dir is not None:
            split = "equal stages" if final_fraction is None else f"final stage {final_fraction:.0%} of steps"
            plot_runs(runs, img_dir / f"cnn-{net_name}-{dataset}{tag}.png",
                      f"{net_name} (width x{width}) on {dataset}, {steps} steps of {batch_size}, {split}")
        net_rows = summarise(net_name, runs, tolerance)
        for row in net_rows:
            log.info("cnn_result", **{k: v for k, v in row.items() if k != "rung_acc"})
        rows += net_rows
    (out / f"summary-{dataset}{tag}.json").write_text(json.dumps(rows, indent=2))
    print(format_table(rows))
    return rows


def replot(*, networks=("resnet20", "vgg11"), dataset: str = "fashion-mnist", tag: str = "",
           tolerance: float = 0.005, out: Path = Path("out/cnn"), img_dir: Path = Path("docs/img"),
           title: str = "") -> list[dict]:
    """Plots and table again from saved runs (no training)."""
    tag = f"-{tag}" if tag else ""
    rows = []
    for net_name in networks:
        path = out / f"{net_name}-{dataset}{tag}.json"
        if not path.is_file():
            continue
        runs = json.loads(path.read_text())
        for hist in runs.values():  # JSON turned rung indices into strings
            for e in hist["evals"]:
                e["rungs"] = {int(k): v for k, v in e["rungs"].items()}
        plot_runs(runs, img_dir / f"cnn-{net_name}-{dataset}{tag}.png", f"{net_name} on {dataset} {title}".strip())
        rows += summarise(net_name, runs, tolerance)
    print(format_table(rows))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| network | method | final acc | per-rung acc | smallest rung ≥ baseline−tol (param fraction) "
             "| smallest rung ≥ own full−tol (param fraction) | steps / wall s / TFLOPs to baseline−tol "
             "| total wall s / TFLOPs | steps to loss L |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        small = "none" if r["smallest_sufficient_rung"] is None else (
            f"{r['smallest_sufficient_rung'] + 1} ({r['param_fraction']:.2f})")
        reach = "not reached" if r["reach_step"] is None else f"{r['reach_step']} / {r['reach_wall_s']} / {r['reach_tflops']}"
        lines.append(f"| {r['network']} | {r['method']} | {r['final_acc']:.4f} | "
                     f"{' '.join(f'{a:.3f}' for a in r['rung_acc'])} | {small} | "
                     f"{r['smallest_matching_own_full'] + 1} ({r['own_param_fraction']:.2f}) | {reach} | {r['wall_s']} / {r['total_tflops']} | "
                     f"{r['steps_to_given_loss']} (L={r['given_loss']}) |")
    return "\n".join(lines)
