"""`sled demo`: start a local stack, run concurrent sessions through different drafters, print
the text and a summary, optionally check every output against the target decoding alone."""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time

import structlog

from pipeline.client import DrafterClient, broker_stats
from pipeline.config import Config
from pipeline.figures import BrokerFigures
from pipeline.security import client_keys
from pipeline.stack import Stack
from pipeline.models import load_causal_lm, load_tokenizer
from pipeline.sample_prompts import SAMPLE_PROMPTS, chat_prompt_ids
from pipeline.reference import greedy_reference

log = structlog.get_logger("sled.demo")


async def run_sessions(config: Config, drafters: list[str], prompts: list[list[int]], max_new_tokens: int,
                       stop_ids: list[int]) -> tuple[list, float]:
    clients = {name: DrafterClient(config.drafter(name).client) for name in drafters}
    try:
        started = time.perf_counter()
        results = await asyncio.gather(*[
            clients[drafters[i % len(drafters)]].complete(prompt, max_new_tokens, stop_ids=stop_ids)
            for i, prompt in enumerate(prompts)
        ])
        return results, time.perf_counter() - started
    finally:
        for client in clients.values():
            client.close()


def summarize(results, elapsed: float, broker: dict) -> dict:
    generated = sum(len(r.tokens) for r in results)
    figures = BrokerFigures.of(broker)  # sums and bucket counts; the means are taken here
    by_drafter: dict[str, dict] = {}
    for r in results:
        d = by_drafter.setdefault(r.stats["drafter"], {"kind": r.stats["drafter_kind"], "proposed": 0, "accepted": 0,
                                                       "sessions": 0, "rounds": 0, "generated": 0, "wire_bytes": 0,
                                                       "proactive_hits": 0, "proactive_wasted": 0, "plain_rounds": 0,
                                                       "sent_ahead_confirmed": 0, "drafted_rounds": 0, "lookup_rounds": 0,
                                                       "datastore_rounds": 0, "tree_rounds": 0})
        for key in ("proposed", "accepted", "rounds", "wire_bytes"):
            d[key] += r.stats[key]
        d["drafted_rounds"] += r.stats["rounds"] - r.stats["draft_lengths"][0]
        # drafts made ahead: used, and tokens dropped; rounds the broker ran on its own (bursts);
        # rounds sent ahead of their predecessor's verdict and queued at it; rounds drafted by
        # context lookup, by the datastore where the model was unsure, and as token trees
        for key in ("proactive_hits", "proactive_wasted", "plain_rounds", "sent_ahead_confirmed", "lookup_rounds",
                    "datastore_rounds", "tree_rounds"):
            d[key] += r.stats.get(key, 0)
        d["generated"] += len(r.tokens)
        d["sessions"] += 1
    proposed = sum(d["proposed"] for d in by_drafter.values())
    accepted = sum(d["accepted"] for d in by_drafter.values())
    rounds = sum(r.stats["rounds"] for r in results)
    verifier_stats = list(broker["verifiers"].values())
    target_tokens = sum(v.get("target_tokens", 0) for v in verifier_stats)
    return {
        "sessions": len(results),
        "generated_tokens": generated,
        "elapsed_s": round(elapsed, 3),
        "tokens_per_s": round(generated / elapsed, 2) if elapsed else 0.0,
        "acceptance_rate": round(accepted / proposed, 4) if proposed else 0.0,
        "acceptance_by_drafter": {n: round(d["accepted"] / d["proposed"], 4) if d["proposed"] else 0.0 for n, d in by_drafter.items()},
        "tokens_per_round_by_drafter": {n: round(d["generated"] / d["rounds"], 3) if d["rounds"] else 0.0
                                        for n, d in by_drafter.items()},
        # the same over the rounds that carried a draft: what the class's drafts give when the
        # adaptive policy lets it draft (each such round commits its accepted drafts and the
        # target's token); the rest of its rounds, plain or undrafted, commit one token each
        "tokens_per_drafted_round_by_drafter": {n: round(1 + d["accepted"] / d["drafted_rounds"], 3)
                                                if d["drafted_rounds"] else 0.0 for n, d in by_drafter.items()},
        # proposal and verdict frames each class exchanged with the broker, per generated token
        "wire_bytes_per_token_by_drafter": {n: round(d["wire_bytes"] / d["generated"], 1) if d["generated"] else 0.0
                                            for n, d in by_drafter.items()},
        "drafters": by_drafter,
        "mean_batch_sessions": round(figures.batch_sessions.mean, 3),
        "batches": broker["batches"],
        "verify_rounds": rounds,
        "tokens_per_round": round(generated / rounds, 3) if rounds else 0.0,
        "target_tokens_processed": target_tokens,
        "target_tokens_per_generated": round(target_tokens / generated, 3) if generated else 0.0,
        "mean_queue_wait_ms": round(1000 * figures.queue_wait.mean, 3),
        "verifier_compute_s": round(sum(v.get("compute_s", 0.0) for v in verifier_stats), 3),
    }


def demo(config: Config, config_path: str | None, overrides: list[str], *, sessions: int, max_new_tokens: int,
         drafters: list[str], as_json: bool, verify: bool) -> int:
    tokenizer = load_tokenizer(config.verifier.target)
    texts = [SAMPLE_PROMPTS[i % len(SAMPLE_PROMPTS)] for i in range(sessions)]
    prompts = [chat_prompt_ids(tokenizer, t) for t in texts]
    stop_ids = [tokenizer.eos_token_id]

    async def go():
        with tempfile.TemporaryDirectory(prefix="sled-demo-") as logs:
            stack = Stack(config, config_path, overrides, drafters, log_dir=logs)
            async with stack:
                results, elapsed = await run_sessions(config, drafters, prompts, max_new_tokens, stop_ids)
                stack.check_alive()
                figures = await broker_stats(config.broker.frontend, curve=client_keys(config, config.security.admin_key))
            return results, elapsed, figures

    results, elapsed, broker = asyncio.run(go())
    summary = summarize(results, elapsed, broker)
    out = sys.stdout
    if not as_json:
        for text, r in zip(texts, results):
            print(f"\n[{r.stats['drafter']}] {text}\n  -> {tokenizer.decode(r.tokens, skip_special_tokens=True).strip()}", file=out)
    if verify:
        if config.verifier.threads > 0:  # the same thread budget as the verifier (see config.toml)
            import torch

            torch.set_num_threads(config.verifier.threads)
        # the target alone, on the verifier's own device and dtype
        model = load_causal_lm(config.verifier.target, dtype=config.verifier.dtype, device=config.verifier.device)
        mismatched = [
            i for i, (prompt, r) in enumerate(zip(prompts, results))
            if greedy_reference(model, prompt, max_new_tokens, stop_ids) != r.tokens
        ]
        summary["lossless"] = not mismatched
        summary["mismatched_sessions"] = len(mismatched)
    if as_json:
        print(json.dumps(summary), file=out)
    else:
        print("\nsummary", file=out)
        for key, value in summary.items():
            print(f"  {key:28s} {value}", file=out)
    return 0 if summary.get("lossless", True) else 1
