"""One entry shape for every command that runs until stopped: the roles (broker, verifier,
drafter, gateway) and the launchers (`sled up`, `sled launch`). Signals are handled here only.

configure logging -> build the role's object -> run it until SIGINT/SIGTERM sets the shutdown
event -> exit with the code ``serve`` returns (None: 0; a launcher returns 1 when a child
failed); any exception is logged as ``role_died`` and exits non-zero, so a launcher watching
the child sees the death at once. A setting that would expose an unauthenticated socket
(pipeline/security.py, InsecureConfig) is logged as ``role_refused`` and exits 2, before any work.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

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


def run_role(role: str, config: Config, serve: Serve) -> int:
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
        return 2
    except Exception:
        log.exception("role_died")
        return 1
    log.info("role_stopped", code=code)
    return code
