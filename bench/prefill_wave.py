"""A wave of arrivals: the time one verifier batch takes to open N new sessions at once (their
histories prefilled, then one verify row each), by backend and prefill chunk budget.

``verifier.prefill_chunk_tokens = 0`` is the serial path (one history per forward); a budget
shares forwards among the wave (workers/prefill.py). Runs in-process on the verifier's model
side, no sockets, so the figure is the server's work alone. The repeats of every configuration
are interleaved, so the machine's load drifts over all of them alike; the median is reported.

    OMP_NUM_THREADS=1 python -m bench.prefill_wave --sessions 8 32 --budgets 0 512
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pipeline.config import LimitsConfig
from pipeline.models import load_causal_lm, load_tokenizer
from pipeline.sample_prompts import SAMPLE_PROMPTS, chat_prompt_ids
from pipeline.protocol import Propose
from workers.static_verifier import StaticVerifier
from workers.target import TargetVerifier


def histories(tokenizer, count: int, tokens: int) -> list[list[int]]:
    """Chat-templated sample prompts (as `sled bench` sends them); with ``tokens``, each padded to
    that length with the following prompts' tokens (longer conversations)."""
    prompts = [chat_prompt_ids(tokenizer, SAMPLE_PROMPTS[i % len(SAMPLE_PROMPTS)]) for i in range(count + 8)]
    if not tokens:
        return prompts[:count]
    out = []
    for i in range(count):
        ids: list[int] = []
        j = i
        while len(ids) < tokens:
            ids += prompts[j % len(prompts)]
            j += 1
        out.append(ids[:tokens])
    return out


def make(backend: str, model, budget: int, sessions: int):
    # budget -1: leave the setting out, to time a checkout from before batched prefill
    extra = {"prefill_chunk_tokens": budget} if budget >= 0 else {}
    limits = LimitsConfig()
    if backend == "static":
        return StaticVerifier(model, max_sessions=sessions + 1, limits=limits, kv_cache_mb=512.0, **extra)
    return TargetVerifier(model, max_sessions=sessions + 1, limits=limits, **extra)


def prefill_forwards(ver) -> int:
    return getattr(ver.stats, "prefill_forwards", ver.stats.prefills)  # older checkouts: one per session


def wave(backend: str, model, budget: int, hists: list[list[int]]) -> dict:
    ver = make(backend, model, budget, len(hists))
    ver.verify_batch([Propose("warm", 0, 3, [], history=hists[0][:3])])  # first-call costs out of the timing
    ver.close("warm")
    forwards0 = prefill_forwards(ver)
    started, cpu = time.perf_counter(), time.process_time()
    verdicts = ver.verify_batch([Propose(f"s{i}", 0, len(h), [], history=list(h)) for i, h in enumerate(hists)])
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert not any(v.error for v in verdicts), [v.error for v in verdicts if v.error][:3]
    return {"seconds": elapsed, "cpu_s": cpu, "prefill_forwards": prefill_forwards(ver) - forwards0,
            "tokens": [v.token for v in verdicts]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.prefill_wave", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--sessions", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--budgets", type=int, nargs="+", default=[0, 512],
                        help="verifier.prefill_chunk_tokens values (-1: not passed, for an older checkout)")
    parser.add_argument("--backends", nargs="+", default=["eager", "static"], choices=["eager", "static"])
    parser.add_argument("--history-tokens", type=int, default=0, help="pad each history to this length (0: the prompt)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_causal_lm(args.target)
    tokenizer = load_tokenizer(args.target)
    results = []
    for sessions in args.sessions:
        hists = histories(tokenizer, sessions, args.history_tokens)
        runs: dict[tuple[str, int], list[dict]] = {}
        with torch.inference_mode():
            for _ in range(args.repeats):
                for backend in args.backends:
                    for budget in args.budgets:
                        runs.setdefault((backend, budget), []).append(wave(backend, model, budget, hists))
        reference = next(iter(runs.values()))[0]["tokens"]
        for (backend, budget), done in runs.items():
            row = {"sessions": sessions, "history_tokens": sum(map(len, hists)), "backend": backend,
                   "prefill_chunk_tokens": budget, "prefill_forwards": done[0]["prefill_forwards"],
                   "median_s": round(statistics.median(d["seconds"] for d in done), 3),
                   "median_cpu_s": round(statistics.median(d["cpu_s"] for d in done), 3),
                   "runs_s": [round(d["seconds"], 3) for d in done],
                   "same_tokens": all(d["tokens"] == reference for d in done)}
            results.append(row)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
