"""One drafter service against a scripted broker, over real sockets: the script answers each
Propose with a Verdict (after whatever verify time it sleeps), and then the plain rounds it
asks for (``plain_after``) as the broker would; heartbeats are echoed, and the request's result
comes back. Tests of the drafter's adaptive draft length use it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import zmq
import zmq.asyncio

from pipeline.client import DrafterClient
from pipeline.config import load_config
from pipeline.protocol import BROKER_FRONTEND_ACCEPTS, Heartbeat, Propose, Verdict
from pipeline.sockets import make_socket
from tests.conftest import stack_overrides
from workers.drafter import DrafterService


async def _serve(sock: zmq.asyncio.Socket, answer: Callable[[Propose], Awaitable[Verdict]]) -> None:
    while True:
        identity, frame = (await sock.recv_multipart())[:2]
        msg = BROKER_FRONTEND_ACCEPTS.decode(frame)
        if isinstance(msg, Heartbeat):
            await sock.send_multipart([identity, Heartbeat().encode()])
        elif isinstance(msg, Propose):
            while True:  # the proposal's round, then the plain rounds it asked for, as the broker runs them
                verdict = await answer(msg)
                await sock.send_multipart([identity, verdict.encode()])
                if msg.plain_after <= 0 or verdict.error:
                    break
                msg = msg.follow(verdict)


async def run_drafter(name: str, drafter: dict, strategy, answer: Callable[[Propose], Awaitable[Verdict]],
                      prompt: list[int], new_tokens: int, requests: int = 1, **complete):
    """Serve one request of ``new_tokens`` through a DrafterService (``[drafters.NAME]`` settings
    ``drafter``, draft ``strategy``) whose proposals ``answer`` turns into verdicts; ``requests`` > 1:
    that many, one after another, through the same service (a list of their results)."""
    config = load_config(None, stack_overrides("unused", {name: drafter}))
    ctx = zmq.asyncio.Context()
    sock = make_socket(ctx, zmq.ROUTER, bind=config.broker.frontend, max_message_bytes=1 << 20)
    stop = asyncio.Event()
    service = DrafterService(config, name, strategy, ctx)
    tasks = [asyncio.create_task(service.run(stop)), asyncio.create_task(_serve(sock, answer))]
    client = DrafterClient(config.drafter(name).client, ctx)
    try:
        results = [await client.complete(prompt, new_tokens, timeout=60, **complete) for _ in range(requests)]
        return results[0] if requests == 1 else results
    finally:
        client.close()
        stop.set()
        tasks[1].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        sock.close(0)
        ctx.term()
