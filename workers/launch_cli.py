"""`sled launch`: one verifier process per GPU (see workers/launch.py); `pipeline.cli` finds this
module and calls :func:`register`."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
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
    p.add_argument("--log-dir", type=Path, help="write each worker's output to DIR/NAME.log instead of ours")
    p.set_defaults(handler=run_launch)


def run_launch(args: argparse.Namespace) -> int:
    from pipeline.logs import configure_logging
    from workers.launch import Backoff, LaunchError, Supervisor, plan_slots

    config = args.sled_config
    configure_logging(config.log.format, config.log.level)
    try:
        slots = plan_slots(args.gpus, per_worker=args.per_worker, prefix=args.prefix)
    except LaunchError as exc:
        print(f"sled launch: {exc}", file=sys.stderr)
        return 2
    base_args = ["--config", str(args.config)] if args.config else []
    for item in args.sled_overrides:
        base_args += ["--set", item]
    supervisor = Supervisor(
        slots, base_args, per_worker=args.per_worker, device_map=config.verifier.device_map,
        backoff=Backoff(cap_s=args.backoff_max), grace_s=args.grace, log_dir=args.log_dir,
    )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await supervisor.run(stop)

    asyncio.run(main())
    return 0
