"""PNG plots of incremental-training runs (small files meant for docs/img/)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers
import matplotlib.pyplot as plt  # noqa: E402


def plot_runs(runs: dict[str, dict], path: Path, title: str, metric_label: str = "test accuracy") -> None:
    """Left: the deepest active rung's metric against training FLOPs (or steps when FLOPs are
    unknown); right: the deepest active rung's held-out loss against steps, joins marked.
    (Training losses are not comparable across methods: incremental runs average several exits.)"""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=90)
    for name, hist in runs.items():
        evals = hist["evals"]
        use_flops = any(e["flops"] > 0 for e in evals)
        xs = [e["flops"] / 1e12 if use_flops else e["step"] for e in evals]
        deepest = [e["rungs"][max(e["rungs"], key=int)] for e in evals]
        (line,) = left.plot(xs, [d["acc"] for d in deepest], marker=".", label=name)
        left.set_xlabel("training TFLOPs" if use_flops else "step")
        right.plot([e["step"] for e in evals], [d["loss"] for d in deepest], marker=".", color=line.get_color(),
                   label=name)
        for join in hist["joins"]:
            right.axvline(join["step"], color=line.get_color(), alpha=0.3, lw=0.8)
    left.set_ylabel(metric_label + " (deepest rung)")
    right.set_xlabel("step (vertical lines: joins)")
    right.set_ylabel("held-out loss (deepest rung)")
    right.set_yscale("log")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    right.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
