"""Centralized AR alone, with and without its clients' links: what the links cost the baseline.

``python -m bench.baseline_links --levels 4 8 16 --sessions 32``: the default setup's prompts,
budget and backend, as `sled bench` runs AR (bench/run.py), each level twice, once with every
client on the link of the device class SLED serves its session on (``client_links``) and once
with none; prints forwards, rows and the server time a token priced by the newest CPU cost table
(bench/gpu_cost.py), which a machine's drift and other load do not move. Where sessions turn
over (more sessions than run at once), a link delays the next session's arrival by a round trip,
and the steps meanwhile run with a session fewer.
"""

from __future__ import annotations

import argparse

import torch

from bench.central import run_central
from bench.gpu_cost import cost_models, load_table, project
from bench.profiles import DEFAULT
from bench.run import BenchOptions, client_links, prompt_ids
from bench.sessions import plan
from pipeline.config import load_config
from pipeline.models import load_causal_lm, load_tokenizer
from workers.static_verifier import make_verifier


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--levels", nargs="+", type=int, default=[4, 8, 16])
    p.add_argument("--sessions", type=int, default=32, help="sessions per level (the closed loop's turnovers)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(1)
    setup, options = DEFAULT, BenchOptions(network="netns")
    target, tokenizer = load_causal_lm(setup.target), load_tokenizer(setup.target)
    prompts = prompt_ids(setup, tokenizer, options.prompts)
    config = load_config(None, list(setup.sled_overrides))
    table, path = load_table(kind="cpu")
    models = cost_models(table, target.config, backend=config.verifier.backend) if table else None
    print(f"AR alone, {args.sessions} sessions a level; priced by {path}")
    for n in args.levels:
        for links in (False, True):
            records = plan(n, args.sessions, prompts, [])
            server = run_central(target, records, n, args.max_new_tokens, [tokenizer.eos_token_id],
                                 verifier=make_verifier(target, config), max_batch_tokens=config.broker.max_batch_tokens,
                                 link_rtt_s=client_links(records, setup.fleet, options) if links else None)
            verify = server["forwards"]["verify"]
            generated = sum(len(r.tokens) for r in records)
            priced = project(server["forwards"], models, generated, prefix="table") if models else None
            print(f"  {n:>3} sessions at once, {'links  ' if links else 'no link'}: forwards {sum(c for _, _, c in verify)}, "
                  f"rows {sum(r * c for _, r, c in verify)}"
                  + (f", {priced['table_server_ms_per_token']:.2f} ms a token by the table" if priced else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
