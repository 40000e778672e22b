"""`python -m training train …` / `python -m training eval …` until the `sled` CLI wires register()."""

import argparse
import sys

import structlog

from training.cli import register


def main(argv: list[str] | None = None) -> int:
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # keep stdout for --json
    parser = argparse.ArgumentParser(prog="python -m training")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
