"""Acceptance of drafters of the target's family and of other families, side by side, for one target.

    python -m bench.xtok_alpha --target smollm2 --prompts chat --drafter ladder:pi5 \
        --drafter ladder:pi5@translate --drafter ~/.cache/sled/models/Qwen2.5-Coder-0.5B-Instruct

Greedy, in one process, without sockets: the target's own continuations (transformers'
``generate``) are the reference, and each drafter walks every session as the device would
(bench/traces.py), proposing from the committed context; a round accepts the draft's longest
prefix agreeing with the reference, then the target's token. A drafter whose tokenizer differs
from the target's drafts through workers/translating_drafter.py; ``NAME@translate`` forces the
translation on a drafter of the target's own family (what translating costs in acceptance).
Prints one JSON object per drafter: α per position, acceptance rate, tokens per verify round.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from bench.profiles import DrafterChoice, Setup
from bench.run import load_drafter_model, prompt_ids
from bench.traces import record_trace
from pipeline.models import load_causal_lm, load_tokenizer
from pipeline.reference import greedy_reference
from workers.drafts import ModelDrafter
from workers.translating_drafter import TranslatingDrafter, tokenizers_to_translate


def measure(target_spec: str, drafters: list[str], *, prompts: str, count: int, max_new_tokens: int, gamma: int,
            target_dtype: str = "float32") -> list[dict]:
    target = load_causal_lm(target_spec, dtype=target_dtype)
    tokenizer = load_tokenizer(target_spec)
    setup = Setup(name="xtok", target=target_spec, drafters={}, server_drafter=DrafterChoice("ngram", gamma), prompts=prompts)
    ids = prompt_ids(setup, tokenizer, count)
    stops = [tokenizer.eos_token_id]
    started = time.perf_counter()
    references = [greedy_reference(target, p, max_new_tokens, stops) for p in ids]
    reference_s = time.perf_counter() - started
    if target_dtype != "float32":  # only the references need the target: free it for the drafters
        del target
        target = None
    out = []
    for spec in drafters:
        model_spec, _, flag = spec.partition("@")
        choice = DrafterChoice(model_spec, gamma)
        model = load_drafter_model(choice, target)
        tokenizers = tokenizers_to_translate(SimpleNamespace(model=model_spec, translate=True if flag == "translate" else None),
                                             target_spec)
        strategy = TranslatingDrafter(model, *tokenizers) if tokenizers else ModelDrafter(model)
        with tempfile.TemporaryDirectory() as tmp:
            figures = record_trace(strategy, "model", ids, references, gamma, max_new_tokens, stops, Path(tmp) / "t.msgpack")
        out.append({
            "target": target_spec, "target_dtype": target_dtype, "drafter": spec, "translating": bool(tokenizers), "prompts": f"{count} {prompts}",
            "max_new_tokens": max_new_tokens, "gamma": gamma,
            "alpha_per_position": round(figures["alpha_per_position"], 3),
            "acceptance_rate": round(figures["acceptance_rate"], 3),
            "tokens_per_round": round(figures["generated"] / figures["rounds"], 3) if figures["rounds"] else 0.0,
            "draft_s_per_round": round(figures["draft_s_per_round"], 4),
            "reference_s": round(reference_s, 1),
        })
        print(json.dumps(out[-1]), flush=True)
        del model, strategy
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--drafter", action="append", required=True, help="model spec; NAME@translate forces translation")
    parser.add_argument("--prompts", default="chat", choices=["chat", "code"])
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--target-dtype", default="float32", help="bfloat16 halves the target's memory (references only)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    measure(args.target, args.drafter, prompts=args.prompts, count=args.count, max_new_tokens=args.max_new_tokens,
            gamma=args.gamma, target_dtype=args.target_dtype)


if __name__ == "__main__":
    main()
