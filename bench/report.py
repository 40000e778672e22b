"""Tables and plots for docs/benchmarks.md from `sled bench` result files.

``sled bench report`` takes the newest full (not --quick) result of each setup under
bench/results/, draws docs/img/bench-SETUP.png and rewrites the block between
``<!-- bench:SETUP:start -->`` and ``<!-- bench:SETUP:end -->`` in docs/benchmarks.md; the text
around the blocks is written by hand.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
IMG = ROOT / "docs" / "img"
LABELS = {"ar": "centralized AR", "server_sd": "server-side SD", "sled": "SLED adaptive (emulated fleet)",
          "sled_fixed": "SLED fixed policy (emulated fleet)", "sled_loopback": "SLED adaptive (loopback control)",
          "sled_gpu_priced": "SLED adaptive, drafting at the GPU table's prices (emulated fleet)",
          "assisted": "HF assisted (1 at a time)"}


def latest(setup: str) -> Path | None:
    files = sorted(p for p in RESULTS.glob(f"bench-{setup}-2*.json"))
    return files[-1] if files else None


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def tables(result: dict) -> str:
    rows = ["| method | sessions | tok/s | TPOT p50 / p99 ms | TTFT p50 ms | server CPU ms/token (decode only) | target fwd/token "
            "| tokens/round | acceptance | mean batch | bytes/token | energy J/token (server + devices) | projected GPU server ms/token |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, levels in result["methods"].items():
        for n, f in sorted(levels.items(), key=lambda kv: int(kv[0])):
            energy = f["energy_j_per_token_estimate"]
            rows.append(
                f"| {LABELS[method]} | {n} | {_fmt(f['throughput_tok_s'])} | {_fmt(f['tpot_p50_ms'], 0)} / {_fmt(f['tpot_p99_ms'], 0)} "
                f"| {_fmt(f['ttft_p50_ms'], 0)} | {_fmt(f['server_cpu_ms_per_token'])} ({_fmt(f.get('decode_cpu_ms_per_token'))}) | {_fmt(f['target_forwards_per_token'], 3)} "
                f"| {_fmt(f['tokens_per_round'], 2) if f['tokens_per_round'] else '–'} | {_fmt(f['acceptance_rate'], 2)} "
                f"| {_fmt(f['mean_batch_sessions'], 1)} | {_fmt(f.get('network_bytes_per_token'), 0)} "
                f"| {energy['server']:.3f} + {energy['devices']:.3f} "
                f"| {_fmt((f.get('gpu_projection') or {}).get('gpu_server_ms_per_token'), 2)} |")
    head = result["headline"]
    cap = result["capacity"]
    lines = [
        f"Result file: `{result.get('result_file', '')}`; command: `{result.get('command', '')}`; "
        f"{result['machine']['cpus']} CPUs, torch {result['machine']['torch']}, {result['machine']['torch_threads']} torch thread(s) for every server; "
        f"{result['options']['max_new_tokens']} new tokens per session; run took {result['elapsed_s']} s.",
        "",
        *rows,
        "",
        f"Capacity within TPOT p50 ≤ {head['slo_tpot_ms']:.0f} ms (sessions; ≥ = every measured level met it): "
        + ", ".join(f"{LABELS[m]} {'≥ ' if c['lower_bound'] else ''}{c['sessions']}" for m, c in cap.items()) + ".",
        "",
        "| headline (at {0} sessions) | value |".format(head["ratio_sessions"]),
        "|---|---|",
        *(f"| `{k}` | {v} |" for k, v in head.items() if k not in ("setup", "ratio_sessions")),
        "",
        _gpu_line(result),
        "",
        "Drafts per device class (recorded before the timed run; α per position = accepted ÷ (accepted + rounds with a rejection)):",
        "",
        "| class | drafter | γ | min confidence | accepted ÷ proposed | α per position | draft tokens/round | drafting ms/round (this machine, 1 thread) |",
        "|---|---|---|---|---|---|---|---|",
        *(f"| {name} | `{Path(d['drafter']).name}` | {d['gamma']} | {d['min_confidence']} | {d['acceptance_rate']:.3f} "
          f"| {_fmt(d.get('alpha_per_position'), 3)} "
          f"| {d['proposed'] / max(1, d['rounds']):.2f} | {1000 * d['draft_s_per_round']:.1f} |"
          for name, d in result["drafters"].items()),
        "",
        "Outputs identical to the target decoding alone: "
        + ("**all**" if result["all_identical"] else "**NO**") + " ("
        + ", ".join(f"{k}: {v['sessions'] - v['mismatched']}/{v['sessions']}" for k, v in result["identical_outputs"].items()) + ").",
    ]
    micro = result.get("broker_micro")
    if micro:
        shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in micro.items() if not isinstance(v, (dict, list))}
        lines += ["", "Broker microbenchmark (same run): " + ", ".join(f"`{k}` {v}" for k, v in shown.items()) + "."]
    return "\n".join(lines)


def _gpu_line(result: dict) -> str:
    table = result.get("gpu_cost_table")
    if not table:
        return "No GPU projection in this result (it predates bench/gpu_cost.py)."
    if table.get("error"):
        return f"No GPU projection: {table['error']}."
    return (f"*Projected* GPU server ms/token: the recorded forwards priced with `{table['file']}` ({table['card']}, "
            f"{table['backend']} backend, {table['dtype']}, {table['prefix_tokens']}-token prefix; target shape "
            f"{table.get('target_shape')}, server drafter {table.get('server_drafter_shape')}); projections, not measurements "
            "(see \"GPU projection\" below).")


def plot(result: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for method, levels in result["methods"].items():
        if method == "assisted":
            continue
        xs = sorted(int(n) for n in levels)
        style = "--" if method in ("sled_loopback", "sled_gpu_priced") else "-"
        for ax, key in zip(axes, ("throughput_tok_s", "tpot_p50_ms", "server_cpu_ms_per_token")):
            ax.plot(xs, [levels[str(x)][key] for x in xs], style, marker="o", label=LABELS[method])
    slo = result["headline"]["slo_tpot_ms"]
    axes[1].axhline(slo, color="grey", linewidth=0.8, linestyle=":", label=f"SLO {slo:.0f} ms")
    for ax, title in zip(axes, ("throughput (tokens/s)", "time per output token, p50 (ms)", "server CPU per token (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent sessions")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"SLED benchmark, setup '{result['setup']}' ({Path(result['target']).name})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(files: list[Path] | None = None) -> str:
    files = files or [p for p in (latest("default"), latest("qwen")) if p]
    if not DOC.is_file():
        raise SystemExit(f"{DOC} is missing")
    doc = DOC.read_text()
    done = []
    for path in files:
        result = json.loads(path.read_text())
        result["result_file"] = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
        setup = result["setup"]
        image = IMG / f"bench-{setup}.png"
        plot(result, image)
        block = f"<!-- bench:{setup}:start -->\n![{setup}](img/{image.name})\n\n{tables(result)}\n<!-- bench:{setup}:end -->"
        pattern = re.compile(rf"<!-- bench:{setup}:start -->.*?<!-- bench:{setup}:end -->", re.DOTALL)
        if not pattern.search(doc):
            raise SystemExit(f"docs/benchmarks.md has no block for setup {setup!r}")
        doc = pattern.sub(lambda _, block=block: block, doc)
        done.append(f"{setup}: {path.name} -> {image.relative_to(ROOT)}")
    DOC.write_text(doc)
    return "\n".join(done)
