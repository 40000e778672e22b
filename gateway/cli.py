"""`sled gateway` (run the REST gateway) and `sled status` (a table of the running stack);
`pipeline.cli` finds this module and calls :func:`register`."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from pipeline.cli import add_http_flags

    p = subparsers.add_parser("gateway", help="run the REST gateway: OpenAI-style API, /metrics, status page at /")
    add_http_flags(p)  # the same as `sled up`'s; pipeline.cli.main applies them to the config
    p.set_defaults(handler=run_gateway)
    p = subparsers.add_parser("status", help="print verifiers, sessions, queue depth and acceptance of the running stack")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object instead")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for each process (default 2)")
    p.set_defaults(handler=run_status)


def run_gateway(args: argparse.Namespace) -> int:
    from gateway.server import serve
    from pipeline.roles import run_role

    return run_role("gateway", args.sled_config, serve)


def run_status(args: argparse.Namespace) -> int:
    from gateway.status_cli import status

    return status(args.sled_config, as_json=args.json, timeout=args.timeout)
