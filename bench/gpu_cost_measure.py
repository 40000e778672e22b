"""Measure a GPU cost table, and replay a recorded `sled bench` run against its projection.

``python -m bench.gpu_cost_measure --out bench/results/gpu_cost_h200.json``: random weights of
real shapes (SmolLM2-135M, Qwen2.5-1.5B, Llama-3-8B), each verifier backend (eager, static), one
``verify_batch`` per timing (what the verifier does in a round, host work included) of S sessions
x T new tokens over a cached prefix, median of ``--rounds``. T = 1 is centralized AR's step,
T = 5 a SLED verify at gamma 4. The table is written after every row, so a run cut short still
leaves what it measured.

``--replay RESULT.json --method sled --level 16``: the forwards that method ran at that level
(workers/forward_log.py) are run again on this device with the target's shape, and the measured
total is printed next to the projection from ``--table`` (goal: within 15 %).

``--trees`` also times each token count above 2 as random token trees of that many rows (rows
marked ``"tree": true``; the projection prices chains only and skips them): what a tree's mask
and the accepted path's copy add to a verify round of the same rows.

``--device cpu --shapes tiny`` is the smoke test on a machine without a GPU (not a cost table).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from pipeline.config import LimitsConfig
from pipeline.protocol import Propose
from bench.gpu_cost import cpu_fields, cpu_identity
from bench.gpu_verify import SHAPES as GPU_VERIFY_SHAPES
from workers.packed_linear import prepack_linears
from workers.static_verifier import StaticVerifier
from workers.target import TargetVerifier

SHAPES = {
    **GPU_VERIFY_SHAPES,  # the shapes bench/gpu_verify.py times, plus the 8B the cost table needs
    "Llama-3-8B": lambda: LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                                      rope_theta=500000.0),
    # the CPU smoke test's shapes
    "tiny": lambda: LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
    "tiny-qwen2": lambda: Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
}


def build(shape: str, dtype, device, prepack: bool = True):
    """Random weights of ``shape``; on a CPU with ``prepack``, the linears reordered for oneDNN as
    the verifier's are (``verifier.prepack``, workers/packed_linear.py; a no-op elsewhere)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(SHAPES[shape](), dtype=dtype)
    model = model.eval().requires_grad_(False)
    if prepack:
        prepack_linears(model)
    return model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make(backend: str, model, sessions: int, context: int, compile: bool):
    limits = LimitsConfig(max_history_tokens=context, max_draft_tokens=16)
    if backend == "eager":
        return TargetVerifier(model, max_sessions=sessions + 1, limits=limits)
    c = model.config
    dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * dim * model.dtype.itemsize
    mb = (sessions + 2) * (context + 64) * per_token / 2**20
    return StaticVerifier(model, max_sessions=sessions + 1, limits=limits, kv_cache_mb=mb, compile=compile)


class Sessions:
    """S open sessions of ``prefix`` cached tokens; ``round(rows)`` verifies random drafts."""

    def __init__(self, verifier, count: int, prefix: int, vocab: int, seed: int):
        self.verifier, self.vocab, self.rng = verifier, vocab, random.Random(seed)
        self.position = {}
        for i in range(count):
            history = [self.rng.randrange(vocab) for _ in range(prefix)]
            verdict = verifier.verify_batch([Propose(f"s{i}", 0, len(history), [], history=history)])[0]
            assert not verdict.error, verdict
            self.position[f"s{i}"] = len(history) + 1

    def round(self, rows: list[int], device: str, tree: bool = False) -> float:
        """``tree``: each session's draft is a random token tree of its rows - 1 tokens (greedy)."""
        items = [Propose(sid, 1, pos, [self.rng.randrange(self.vocab) for _ in range(r - 1)],
                         parents=[self.rng.randint(-1, i - 1) for i in range(r - 1)] if tree else [])
                 for (sid, pos), r in zip(self.position.items(), rows)]
        sync(device)
        started = time.perf_counter()
        verdicts = self.verifier.verify_batch(items)
        sync(device)
        elapsed = time.perf_counter() - started
        for v in verdicts:
            assert not v.error, v
            self.position[v.session_id] += v.accepted + 1
        return elapsed


def spread(sessions: int, rows: int) -> list[int]:
    """``rows`` token rows over ``sessions`` sessions, as even as can be (each at least 1)."""
    base, extra = divmod(rows, sessions)
    return [base + (i < extra) for i in range(sessions)]


def cpu_name() -> str:
    """The CPU's model name and the torch threads a table was measured with: "cpu (AMD EPYC, 1 thread)"."""
    threads = torch.get_num_threads()
    return f"cpu ({cpu_fields().get('model name', 'unknown')}, {threads} thread{'s' * (threads > 1)})"


def measure(args) -> int:
    dtype, device = getattr(torch, args.dtype), args.device
    card = torch.cuda.get_device_name() if device.startswith("cuda") else cpu_name()
    out = Path(args.out)
    table = {"card": card, "measured": time.strftime("%Y-%m-%d"), "backend": "mixed" if len(args.backends) > 1 else args.backends[0],
             "dtype": args.dtype, "prefix_tokens": args.prefix,
             "source": f"bench/gpu_cost_measure.py on {card}, random weights, median of {args.rounds} rounds of "
                       f"verify_batch; torch {torch.__version__}; compile {'on' if args.compile else 'off'} for static"
                       + (f"; prepacked linears {'on' if args.prepack else 'off'}" if device == "cpu" else ""),
             "shapes": {}, "rows": []}
    if not device.startswith("cuda"):
        table["cpu"] = cpu_identity()  # the bench prefers a table of the CPU it runs on
    if args.backends and len(args.backends) > 1:
        table["backend"] = args.backends[0]  # the projection's default; every row names its own
    for shape in args.shapes:
        model = build(shape, dtype, device, args.prepack)
        c = model.config
        table["shapes"][shape] = {"model_type": c.model_type, "num_hidden_layers": c.num_hidden_layers,
                                  "hidden_size": c.hidden_size, "vocab_size": c.vocab_size}
        for backend in args.backends:
            # one verifier per backend (a compiled one keeps its graphs across session counts)
            context = args.prefix + (args.rounds + args.warmup + 3) * max(args.tokens) + 32
            verifier = make(backend, model, max(args.sessions), context, args.compile)
            for sessions in args.sessions:
                for tokens, tree in [(t, tree) for t in args.tokens for tree in (False, True)[: 1 + (args.trees and t > 2)]]:
                    for sid in list(verifier.sessions):
                        verifier.close(sid)
                    group = Sessions(verifier, sessions, args.prefix, c.vocab_size, seed=sessions)
                    times = [group.round([tokens] * sessions, device, tree) for _ in range(args.rounds + args.warmup)]
                    times = sorted(times[args.warmup:] or times)
                    row = {"shape": shape, "backend": backend, "sessions": sessions, "tokens_per_session": tokens,
                           "ms": round(1000 * times[len(times) // 2], 3), **({"tree": True} if tree else {})}
                    table["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    out.write_text(json.dumps(table, indent=1) + "\n")
            del verifier, group
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(f"wrote {out}")
    return 0


def replay(args) -> int:
    from bench.gpu_cost import cost_models, load_table, project

    result = json.loads(Path(args.replay).read_text())
    figures = result["methods"][args.method][str(args.level)]
    table, table_path = load_table(args.table)
    shape = args.shapes[0]
    dtype, device = getattr(torch, args.dtype), args.device
    model = build(shape, dtype, device, args.prepack)
    backend = args.backends[0]
    models = cost_models(table, model.config, None, backend=table.get("backend") if backend == "table" else backend)
    if "error" in models:
        raise SystemExit(models["error"])
    forwards = {"verify": figures["forwards"]["verify"], "draft": []}
    projected = project(forwards, models, 1)["gpu_server_ms"]
    run_backend = backend if backend != "table" else table.get("backend", "eager")
    prefix = table.get("prefix_tokens") or args.prefix
    measured = 0.0
    shapes = forwards["verify"]
    widest = max(max(spread(b, r)) for b, r, _ in shapes)
    runs = args.max_per_shape
    verifier = make(run_backend, model, max(b for b, _, _ in shapes), prefix + (runs + 3) * widest + 32, args.compile)
    for sessions, rows, count in shapes:
        for sid in list(verifier.sessions):
            verifier.close(sid)
        per_session = spread(sessions, rows)
        group = Sessions(verifier, sessions, prefix, model.config.vocab_size, seed=rows)
        group.round(per_session, device)  # warm-up (and compile) outside the timing
        times = sorted(group.round(per_session, device) for _ in range(min(count, runs)))
        measured += 1000 * times[len(times) // 2] * count
    line = {"replay": args.replay, "method": args.method, "level": args.level, "shape": shape, "backend": run_backend,
            "table": str(table_path), "forwards": sum(n for _, _, n in forwards["verify"]),
            "measured_ms": round(measured, 1), "projected_ms": round(projected, 1),
            "measured_over_projected": round(measured / projected, 3) if projected else None}
    print(json.dumps(line))
    print(f"measured {measured:.1f} ms vs projected {projected:.1f} ms ({100 * (measured / projected - 1):+.1f} %; goal within 15 %)")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["SmolLM2-135M", "Qwen2.5-1.5B", "Llama-3-8B"], choices=list(SHAPES))
    p.add_argument("--backends", nargs="+", default=["eager", "static"], choices=["eager", "static", "table"])
    p.add_argument("--sessions", nargs="+", type=int, default=[1, 4, 16, 32, 64])
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 5])
    p.add_argument("--trees", action="store_true",
                   help="also time each token count above 2 as token trees (workers/token_tree.py): rows marked tree")
    p.add_argument("--prefix", type=int, default=512)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available(),
                   help="static backend: torch.compile(mode='reduce-overhead') (default on CUDA)")
    p.add_argument("--out", default="gpu_cost.json")
    p.add_argument("--replay", help="a `sled bench` result JSON whose recorded forwards to run again")
    p.add_argument("--method", default="sled")
    p.add_argument("--level", type=int, default=16)
    p.add_argument("--table", help="the cost table the replay is compared with (default: the newest committed)")
    p.add_argument("--max-per-shape", type=int, default=5, help="replay: timed runs per distinct forward shape")
    p.add_argument("--prepack", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU: linears reordered for oneDNN, as verifier.prepack does (default on)")
    p.add_argument("--threads", type=int, help="torch threads (a CPU table: 1, as the verifier's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return replay(args) if args.replay else measure(args)


if __name__ == "__main__":
    raise SystemExit(main())
