"""The gateway role's entry: load the target's tokenizer, serve the app until ``stop`` is set."""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web

from gateway.routes import create_app
from pipeline.config import Config
from pipeline.models import load_tokenizer
from pipeline.security import check_gateway

log = structlog.get_logger("sled.gateway")

SHUTDOWN_GRACE_S = 5.0  # open streams get this long at shutdown


def read_api_keys(path: str) -> list[str]:
    """One API key a line; blank lines and # comments are skipped. A missing file is an error."""
    with open(path, encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip() and not line.lstrip().startswith("#")]


async def serve(config: Config, stop: asyncio.Event) -> None:
    g = config.gateway
    if g.api_keys_file:
        g.api_keys = [*g.api_keys, *read_api_keys(g.api_keys_file)]
    check_gateway(config)  # off loopback only with API keys (or security.allow_insecure)
    tokenizer = await asyncio.get_running_loop().run_in_executor(None, load_tokenizer, config.verifier.target)
    app = create_app(config, tokenizer)
    # handler_cancellation: a client that disconnects cancels its handler, which closes its session
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=SHUTDOWN_GRACE_S, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, g.host, g.port).start()
        log.info("gateway_started", url=f"http://{g.host}:{g.port}/", target=config.verifier.target,
                 drafters=list(config.drafters))
        await stop.wait()
    finally:
        await asyncio.wait_for(runner.cleanup(), SHUTDOWN_GRACE_S * 3)
