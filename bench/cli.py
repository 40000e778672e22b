"""`sled bench` (run the comparison), `sled bench fetch-qwen` (get the Qwen pair once),
`sled bench report` (tables and plots for docs/benchmarks.md from result files)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: SLED vs centralized AR, server-side SD and assisted generation")
    p.add_argument("action", nargs="?", default="run", choices=["run", "fetch-qwen", "report"])
    p.add_argument("--quick", action="store_true", help="the default setup, fewer tokens and sessions, SLED fixed and adaptive (~7 min on 2 quiet cores)")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the headline figures")
    p.add_argument("--setup", default="default", choices=["default", "qwen", "all"],
                   help="default: SmolLM2 + drafter ladder; qwen: Qwen2.5-Coder 1.5B + 0.5B (fetch-qwen first)")
    p.add_argument("--levels", type=_ints, help="concurrent sessions to measure, e.g. 1,4,16,32")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--min-sessions", type=int, help="sessions per level at least")
    p.add_argument("--prompts", type=int, help="distinct prompts (default 12)")
    p.add_argument("--slo-ms", type=float, help="time-per-output-token objective for capacity (default: the setup's, 200 ms / 1000 ms for qwen)")
    p.add_argument("--network", choices=["netns", "loopback"], help="emulate the edge links in namespaces (default when root)")
    p.add_argument("--profile", action="append", default=[], metavar="CLASS.FIELD=VALUE",
                   help="change a device profile, e.g. pi5.slowdown=3 or orin.rtt_ms=10 (repeatable)")
    p.add_argument("--threads", type=int, help="torch threads of every server method (default 1, as verifier.threads)")
    p.add_argument("--gpu-cost", type=Path, help="GPU cost table for the projected GPU server figures "
                   "(default: the newest bench/results/gpu_cost_*.json)")
    p.add_argument("--cpu-cost", type=Path, help="CPU cost table (the verifier alone on this CPU) that prices every "
                   "method's recorded forwards alike (default: the newest bench/results/cpu_cost_*.json)")
    p.add_argument("--no-broker-micro", action="store_true", help="skip the broker microbenchmark")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the result JSON")
    p.add_argument("--files", nargs="*", type=Path, help="report: result files (default: the latest of each setup)")
    p.set_defaults(handler=main)


def options_from(args):
    from bench.netns import unavailable_reason
    from bench.profiles import PROFILES, with_overrides
    from bench.run import BenchOptions

    options = BenchOptions(config_path=args.config, overrides=list(args.overrides), profiles=with_overrides(PROFILES, args.profile), quick=args.quick)
    if args.quick:
        options.max_new_tokens, options.min_sessions, options.assisted_sessions = 32, 2, 2
    for name, value in (("levels", args.levels), ("max_new_tokens", args.max_new_tokens),
                        ("min_sessions", args.min_sessions), ("slo_tpot_ms", args.slo_ms), ("threads", args.threads), ("prompts", args.prompts)):
        if value is not None:
            setattr(options, name, value)
    if options.ratio_level not in options.levels:
        options.ratio_level = max(options.levels)
    options.loopback_levels = [options.ratio_level]
    reason = unavailable_reason()
    options.network = args.network or ("loopback" if reason else "netns")
    if options.network == "netns" and reason:
        raise SystemExit(f"--network netns: {reason}")
    options.broker_micro = not args.no_broker_micro
    if args.gpu_cost is not None:
        if not args.gpu_cost.is_file():
            raise SystemExit(f"--gpu-cost: no file at {args.gpu_cost}")
        options.gpu_cost = str(args.gpu_cost)
    if args.cpu_cost is not None:
        if not args.cpu_cost.is_file():
            raise SystemExit(f"--cpu-cost: no file at {args.cpu_cost}")
        options.cpu_cost = str(args.cpu_cost)
    return options


def main(args) -> int:
    if args.action == "fetch-qwen":
        from bench.qwen import fetch

        print(json.dumps(fetch()))
        return 0
    if args.action == "report":
        from bench.report import write_report

        print(write_report(args.files or None))
        return 0
    from bench.profiles import DEFAULT, qwen_setup
    from bench.run import run_setup

    options = options_from(args)
    setups = []
    if args.setup in ("default", "all"):
        setups.append(DEFAULT)
    if args.setup in ("qwen", "all"):
        from bench.qwen import pair_paths

        paths = pair_paths()
        if paths is None:
            raise SystemExit("the Qwen pair is not in the cache: run `sled bench fetch-qwen` first (~1.6 GB)")
        setups.append(qwen_setup(paths))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    micro = None
    if options.broker_micro:
        from bench.broker_micro import run as broker_micro

        micro = broker_micro(quick=options.quick)
    headline = {}
    for setup in setups:
        result = run_setup(setup, options)
        result["broker_micro"] = micro
        result["command"] = "sled " + " ".join(sys.argv[1:])
        path = args.out / f"bench-{setup.name}{'-quick' if options.quick else ''}-{stamp}.json"
        path.write_text(json.dumps(result, indent=1))
        if not args.json:
            print(f"{setup.name}: {path}")
            print(json.dumps(result["headline"], indent=1))
        if not headline:  # the line is for the first (default) setup
            headline = dict(result["headline"], result_file=str(path))
    if micro:
        headline.update({k: micro[k] for k in ("broker_proposals_per_s", "broker_added_latency_p50_ms",
                                               "broker_added_latency_p99_ms") if k in micro})
    if args.json:
        print(json.dumps(headline))
    return 0 if headline.get("all_outputs_identical", True) else 1
