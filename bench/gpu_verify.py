"""Time SLED's verifier (workers.target.TargetVerifier) on a GPU with random-weight models of
real shapes: one batched verify forward for B sessions with a gamma-token draft each, against
the centralized autoregressive step (B sessions, one token each), over a cached prefix.

Random weights cost the same as trained ones; the 98 MB default target and larger models do
not fit the 64 MiB a device call carries. Prints one JSON line per shape and a table.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, Qwen2Config

from pipeline.config import LimitsConfig
from pipeline.protocol import Propose
from workers.target import TargetVerifier

SHAPES = {
    "SmolLM2-135M": lambda: LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                                        max_position_embeddings=8192, rope_theta=100000.0),
    "Qwen2.5-1.5B": lambda: Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                        num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                                        max_position_embeddings=32768),
}


def build(shape: str, dtype, device):
    config = SHAPES[shape]() if shape in SHAPES else AutoConfig.from_pretrained(shape)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_rounds(verifier, sessions, gamma, rounds, device, rng, vocab):
    times = []
    for r in range(rounds + 2):
        items = []
        for sid, state in sessions.items():
            draft = [rng.randrange(vocab) for _ in range(gamma)]
            items.append(Propose(sid, r, state["position"], draft))
        sync(device)
        t0 = time.perf_counter()
        verdicts = verifier.verify_batch(items)
        sync(device)
        if r >= 2:
            times.append(time.perf_counter() - t0)
        for v in verdicts:
            assert not v.error, v
            sessions[v.session_id]["position"] += v.accepted + 1
    times.sort()
    return 1000 * times[len(times) // 2]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16, 32, 64])
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--prefix", type=int, default=256)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    rows = []
    for shape in args.shapes:
        model = build(shape, dtype, args.device)
        vocab = model.config.vocab_size
        for batch in args.batches:
            rng = random.Random(batch)
            figures = {}
            for mode, gamma in (("ar", 0), ("sled", args.gamma)):
                verifier = TargetVerifier(model, max_sessions=batch + 1, limits=LimitsConfig(max_history_tokens=8192))
                sessions = {}
                for i in range(batch):
                    history = [rng.randrange(vocab) for _ in range(args.prefix)]
                    verifier.verify_batch([Propose(f"s{i}", 0, len(history), [], history=history)])
                    sessions[f"s{i}"] = {"position": len(history) + 1}
                figures[mode] = time_rounds(verifier, sessions, gamma, args.rounds, args.device, rng, vocab)
            row = {"card": card, "shape": shape, "dtype": args.dtype, "sessions": batch, "gamma": args.gamma,
                   "prefix": args.prefix, "ar_step_ms": round(figures["ar"], 2), "verify_ms": round(figures["sled"], 2),
                   "verify_over_ar": round(figures["sled"] / figures["ar"], 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(f"\n{'shape':14s} {'B':>4s} {'AR step ms':>11s} {'verify γ+1 ms':>14s} {'ratio':>6s}   ({card}, {args.dtype})")
    for r in rows:
        print(f"{r['shape']:14s} {r['sessions']:4d} {r['ar_step_ms']:11.2f} {r['verify_ms']:14.2f} {r['verify_over_ar']:6.2f}")
    print("server cost per token, SLED / AR = ratio / tokens_per_round, tokens_per_round = (1-a^(g+1))/(1-a)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
