"""Probe the Qwen2.5-Coder 0.5B/1.5B pair on CPU (fp32, one thread): tokenizer identity,
configs, greedy agreement alpha on code prompts, forward timings over a cached prefix, peak RSS.

Needs the converted pair (``python -m bench.qwen`` first; this never downloads) and ~9 GB of
RAM. For benchmarks only. Run: ``python -m bench.qwen_probe [--prompts 8 --new-tokens 48]``.
Prints a human summary, then one JSON line with every number.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from bench.qwen import CODE_PROMPTS, pair_paths


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def load(path: str):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval().requires_grad_(False)


def check_tokenizers(tok_t, tok_d) -> dict:
    samples = ["def fibonacci(n):\n    return n", "Hello, world! 你好", "    for i in range(10):\n\tprint(i)"]
    same_ids = all(tok_t(s)["input_ids"] == tok_d(s)["input_ids"] for s in samples)
    messages = [{"role": "user", "content": CODE_PROMPTS[0]}]
    same_template = (tok_t.apply_chat_template(messages, add_generation_prompt=True)
                     == tok_d.apply_chat_template(messages, add_generation_prompt=True))
    return {"len_target": len(tok_t), "len_drafter": len(tok_d), "same_vocab": tok_t.get_vocab() == tok_d.get_vocab(),
            "same_ids": same_ids, "same_chat_template": same_template,
            "has_chat_template": tok_t.chat_template is not None, "eos": tok_t.eos_token}


def config_summary(model) -> dict:
    c = model.config
    return {"layers": c.num_hidden_layers, "hidden": c.hidden_size, "intermediate": c.intermediate_size,
            "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads, "vocab": c.vocab_size,
            "tie_embeddings": c.tie_word_embeddings,
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}


def chat_ids(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


@torch.inference_mode()
def greedy(model, prompt_ids: list[int], n: int, eos_ids: set[int]) -> list[int]:
    cache = DynamicCache()
    out = model(torch.tensor([prompt_ids]), cache=cache, use_cache=True)
    tokens: list[int] = []
    for _ in range(n):
        nxt = int(out.logits[0, -1].argmax())
        tokens.append(nxt)
        if nxt in eos_ids:
            break
        out = model(torch.tensor([[nxt]]), cache=cache, use_cache=True)
    return tokens


@torch.inference_mode()
def agreement(drafter, prompt_ids: list[int], continuation: list[int]) -> tuple[int, int]:
    """Teacher-force the drafter over prompt+continuation: positions where its argmax equals the
    target's greedy token."""
    ids = torch.tensor([prompt_ids + continuation])
    logits = drafter(ids).logits[0]
    p = len(prompt_ids)
    predicted = logits[p - 1 : p - 1 + len(continuation)].argmax(-1).tolist()
    return sum(int(a == b) for a, b in zip(predicted, continuation)), len(continuation)


@torch.inference_mode()
def prefill(model, prefix_ids: list[int]) -> DynamicCache:
    cache = DynamicCache()
    model(torch.tensor([prefix_ids]), cache=cache, use_cache=True)
    return cache


@torch.inference_mode()
def time_forward(model, base: DynamicCache, step_ids: list[int], batch: int, repeats: int) -> dict:
    """One forward of `batch` rows x len(step_ids) new tokens over the cached prefix `base`
    (B=1 prefill, repeated over the batch; the new tokens are cropped off after each run)."""
    cache = copy.deepcopy(base)
    if batch > 1:
        cache.batch_repeat_interleave(batch)
    prefix = cache.get_seq_length()
    step = torch.tensor([step_ids] * batch)
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        start = time.perf_counter()
        model(step, cache=cache, use_cache=True)
        times.append(time.perf_counter() - start)
        cache.crop(-len(step_ids))
        assert cache.get_seq_length() == prefix
    times = times[1:]
    return {"B": batch, "T": len(step_ids), "prefix": prefix, "median_ms": round(1000 * statistics.median(times), 1),
            "min_ms": round(1000 * min(times), 1), "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--prefix", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    paths = pair_paths()
    if paths is None:
        sys.exit("the Qwen pair is not converted yet: run `python -m bench.qwen` first")
    report: dict = {"threads": args.threads, "dtype": "float32", "paths": paths}

    tok_t, tok_d = AutoTokenizer.from_pretrained(paths["target"]), AutoTokenizer.from_pretrained(paths["drafter"])
    report["tokenizers"] = check_tokenizers(tok_t, tok_d)
    print("tokenizers:", report["tokenizers"], flush=True)

    target, drafter = load(paths["target"]), load(paths["drafter"])
    report["config"] = {"target": config_summary(target), "drafter": config_summary(drafter)}
    print("configs:", report["config"], flush=True)

    eos_ids = {tok_t.eos_token_id, tok_t.convert_tokens_to_ids("<|endoftext|>"), tok_t.convert_tokens_to_ids("<|im_end|>")}
    per_prompt, hit, total = [], 0, 0
    start = time.perf_counter()
    for prompt in CODE_PROMPTS[: args.prompts]:
        ids = chat_ids(tok_t, prompt)
        cont = greedy(target, ids, args.new_tokens, eos_ids)
        h, n = agreement(drafter, ids, cont)
        hit, total = hit + h, total + n
        per_prompt.append({"prompt": prompt[:50], "agree": h, "tokens": n, "alpha": round(h / n, 3)})
        print(f"  alpha {h}/{n} = {h / n:.3f}  {prompt[:60]!r} -> {tok_t.decode(cont[:20])!r}", flush=True)
    report["alpha"] = {"agree": hit, "tokens": total, "alpha": round(hit / total, 4), "per_prompt": per_prompt,
                       "seconds": round(time.perf_counter() - start, 1)}
    print(f"alpha (greedy, {args.prompts} code prompts x {args.new_tokens} tokens): {hit}/{total} = {hit / total:.3f}",
          flush=True)

    # a real 256-token prefix: the chat-templated prompts, concatenated and cut
    prefix_ids: list[int] = []
    for prompt in CODE_PROMPTS:
        prefix_ids += chat_ids(tok_t, prompt)
    prefix_ids = (prefix_ids * (args.prefix // len(prefix_ids) + 1))[: args.prefix]
    caches = {"target": prefill(target, prefix_ids), "drafter": prefill(drafter, prefix_ids)}
    step_ids = chat_ids(tok_t, CODE_PROMPTS[1])[-5:]
    timings = []
    for name, model, b, t in [("target", target, 1, 1), ("target", target, 1, 5), ("target", target, 16, 1),
                              ("target", target, 16, 5), ("drafter", drafter, 1, 1), ("drafter", drafter, 1, 5)]:
        row = {"model": name, **time_forward(model, caches[name], step_ids[:t], b, args.repeats)}
        timings.append(row)
        print(f"  {name:8s} B={b:<2d} T={t}  median {row['median_ms']:8.1f} ms  min {row['min_ms']:8.1f} ms", flush=True)
    report["timings"] = timings
    report["peak_rss_mib"] = round(peak_rss_mib())
    print(f"peak RSS: {report['peak_rss_mib']} MiB", flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
