"""`sled gateway`: run the REST gateway; `pipeline.cli` finds this module and calls :func:`register`."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from pipeline.cli import add_http_flags

    p = subparsers.add_parser("gateway", help="run the REST gateway: OpenAI-style API, /metrics, status page at /")
    add_http_flags(p)  # the same as `sled up`'s; pipeline.cli.main applies them to the config
    p.set_defaults(handler=run_gateway)


def run_gateway(args: argparse.Namespace) -> int:
    from gateway.serve import serve
    from pipeline.roles import run_role

    return run_role("gateway", args.sled_config, serve)

