"""`sled launch`: one verifier process per GPU (see workers/gpu_launch.py); `pipeline.cli` finds this
module and calls :func:`register`."""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "launch", help="run one verifier per GPU, restart a crashed one, stop all on SIGINT/SIGTERM",
        description="Start one `sled verifier` per selected GPU, each pinned with CUDA_VISIBLE_DEVICES.",
    )
    p.add_argument("--gpus", default="all",
                   help="all (default) | N (the first N visible) | 0,2 or device=1 (those ids) | cpu:N (N CPU workers)")
    p.add_argument("--per-worker", type=int, default=1, metavar="K",
                   help="GPUs per worker, for a target larger than one GPU (its layers spread with device_map)")
    p.add_argument("--prefix", default="verifier",
                   help="worker names are PREFIX-gpuN / PREFIX-cpuN; make it unique per server (default: verifier)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds the workers get to stop before SIGKILL")
    p.add_argument("--backoff-max", type=float, default=30.0, help="longest wait before a restart, in seconds")
    p.add_argument("--healthy-after", type=float, default=60.0, metavar="S",
                   help="a restarted worker up this long counts as healthy again (resets its back-off; default 60)")
    p.add_argument("--max-restarts", type=int, default=10, metavar="N",
                   help="give a worker up after N restarts in a row without a healthy spell (default 10); "
                        "a given-up worker makes the exit code 1")
    p.add_argument("--log-dir", type=Path, help="write each worker's output to DIR/NAME.log instead of ours")
    p.set_defaults(handler=run_launch)


def run_launch(args: argparse.Namespace) -> int:
    """Exit 2 for an impossible plan; else 0 or 1 as workers.gpu_launch describes."""
    from pipeline.roles import run_role
    from pipeline.supervisor import Backoff, Supervisor
    from workers.gpu_launch import LaunchError, plan_slots, serve_workers

    try:
        slots = plan_slots(args.gpus, per_worker=args.per_worker, prefix=args.prefix)
    except LaunchError as exc:
        print(f"sled launch: {exc}", file=sys.stderr)
        return 2
    base_args = ["--config", str(args.config)] if args.config else []
    for item in args.sled_overrides:
        base_args += ["--set", item]
    supervisor = Supervisor(base_args, log_dir=args.log_dir, grace_s=args.grace, max_restarts=args.max_restarts,
                            backoff=Backoff(cap_s=args.backoff_max, reset_after_s=args.healthy_after))
    return run_role("launch", args.sled_config,
                    partial(serve_workers, slots=slots, supervisor=supervisor, per_worker=args.per_worker))
