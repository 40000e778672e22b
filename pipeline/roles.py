"""One entry shape for every command that runs until stopped: the roles (broker, verifier,
drafter, gateway) and the launchers (`sled up`, `sled launch`). Signals are handled here only.

configure logging -> build the role's object -> run it until SIGINT/SIGTERM sets the shutdown
event -> exit at once (``exit_now``) with the code ``serve`` returns (None: 0; a launcher
returns 1 when a child failed); any exception is logged as ``role_died`` and exits non-zero, so
a launcher watching the child sees the death at once. A setting that would expose an
unauthenticated socket (pipeline/security.py, InsecureConfig) is logged as ``role_refused`` and
exits 2, before any work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import NoReturn

import structlog

from pipeline.config import Config
from pipeline.logs import configure_logging

Serve = Callable[[Config, asyncio.Event], Awaitable[int | None]]


async def cancel_and_wait(tasks) -> None:
    tasks = [t for t in tasks if t is not None]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def supervise(stop: asyncio.Event, *coros) -> None:
    """Run a role's loops until ``stop`` is set or one of them fails (its exception propagates);
    then cancel the rest and wait for them."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    stopper = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopper and not task.cancelled() and task.exception():
                raise task.exception()
    finally:
        await cancel_and_wait([stopper, *tasks])


def exit_now(code: int) -> NoReturn:
    """End a role's process without the interpreter's teardown. Once ``serve`` has returned, its
    sockets, threads and children are closed and nothing is left to do, but finalizing the modules
    of torch and transformers still costs about 1.3 s of CPU per process: a stack of six children
    stopped 3 s after SIGTERM on two cores, every test and every `sled demo` paying for it."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def run_role(role: str, config: Config, serve: Serve) -> NoReturn:
    configure_logging(config.log.format, config.log.level)
    structlog.contextvars.bind_contextvars(role=role)
    log = structlog.get_logger("sled.role")

    async def main() -> int | None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await serve(config, stop)

    from pipeline.security import InsecureConfig

    try:
        code = asyncio.run(main()) or 0
    except InsecureConfig as exc:
        log.error("role_refused", error=str(exc))
        exit_now(2)
    except Exception:
        log.exception("role_died")
        exit_now(1)
    log.info("role_stopped", code=code)
    exit_now(code)
