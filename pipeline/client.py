"""Clients of a running stack: generate through a drafter, read figures from broker or drafter.

Used by the demo, the tests and the gateway; it is also what an app on an edge device calls.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from pipeline.protocol import (
    CLIENT_ACCEPTS,
    ErrorCode,
    Cancel,
    ErrorReply,
    Generate,
    SledError,
    StatsReply,
    StatsRequest,
    Tokens,
)
from pipeline.sockets import make_socket, new_identity, send_now


@dataclass
class Completion:
    tokens: list[int]
    finish_reason: str
    stats: dict = field(default_factory=dict)


class DrafterClient:
    """One DEALER to one drafter; many concurrent requests, each with its own reply queue."""

    def __init__(self, endpoint: str, ctx: zmq.asyncio.Context | None = None, *, max_message_bytes: int = 1 << 20,
                 curve=None):
        """``curve``: CurveKeys for a drafter whose client socket is bound off loopback (it then serves
        CURVE to admin and client keys): pipeline.security.drafter_keys_for_client(config, name)."""
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.sock = make_socket(self.ctx, zmq.DEALER, connect=endpoint, identity=new_identity("client"),
                                max_message_bytes=max_message_bytes, curve=curve)
        self.max_bytes = max_message_bytes
        self.pending: dict[str, asyncio.Queue] = {}
        self.stats_waiters: list[asyncio.Future] = []
        self._reader: asyncio.Task | None = None

    def _ensure_reader(self) -> None:
        if self._reader is None:
            self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            frame = (await self.sock.recv_multipart())[-1]
            try:
                msg = CLIENT_ACCEPTS.decode(frame, self.max_bytes)
            except SledError:
                continue  # nothing to answer a drafter's garbage with; drop it
            if isinstance(msg, StatsReply):
                while self.stats_waiters:
                    fut = self.stats_waiters.pop(0)
                    if not fut.done():
                        fut.set_result(msg.stats)  # plain data, read by name
                        break
                continue
            queue = self.pending.get(msg.request_id)
            if queue is not None:
                queue.put_nowait(msg)

    async def stream(self, prompt: list[int], max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
                     seed: int = 0, stop_ids: list[int] | None = None, timeout: float = 600.0) -> AsyncIterator[Tokens]:
        """Yield Tokens messages as verdicts arrive; the last one has ``done`` set."""
        self._ensure_reader()
        request_id = uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        self.pending[request_id] = queue
        request = Generate(request_id, list(prompt), max_new_tokens, temperature, top_p, seed, list(stop_ids or []))
        send_now(self.sock, request.encode())
        finished = False
        try:
            async with asyncio.timeout(timeout):
                while True:
                    msg = await queue.get()
                    if isinstance(msg, ErrorReply):
                        finished = True
                        raise msg.error()
                    yield msg
                    if msg.done:
                        finished = True
                        return
        finally:
            self.pending.pop(request_id, None)
            if not finished:  # the caller went away: free the session on the device and the server
                send_now(self.sock, Cancel(request_id).encode())

    async def complete(self, prompt: list[int], max_new_tokens: int, **kwargs) -> Completion:
        tokens: list[int] = []
        async for msg in self.stream(prompt, max_new_tokens, **kwargs):
            tokens += msg.tokens
            if msg.done:
                return Completion(tokens, msg.finish_reason, msg.stats)
        raise SledError(ErrorCode.INTERNAL, "stream ended without a final message")

    async def stats(self, timeout: float = 5.0) -> dict:
        self._ensure_reader()
        fut = asyncio.get_running_loop().create_future()
        self.stats_waiters.append(fut)
        send_now(self.sock, StatsRequest().encode())
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            if fut in self.stats_waiters:  # timed out: do not leave a dead waiter in line
                self.stats_waiters.remove(fut)

    def close(self) -> None:
        if self._reader:
            self._reader.cancel()
        self.sock.close(0)


async def broker_stats(endpoint: str, timeout: float = 2.0, ctx: zmq.asyncio.Context | None = None, curve=None) -> dict:
    """Ask the broker's frontend for its figures (and the verifiers' it relays). ``curve``: the
    operator's CurveKeys (pipeline.security.client_keys(config, config.security.admin_key))
    when the broker requires CURVE."""
    ctx = ctx or zmq.asyncio.Context.instance()
    sock = make_socket(ctx, zmq.DEALER, connect=endpoint, identity=new_identity("stats"), max_message_bytes=1 << 22,
                       curve=curve)
    try:
        send_now(sock, StatsRequest().encode())
        frame = (await asyncio.wait_for(sock.recv_multipart(), timeout))[-1]
        msg = CLIENT_ACCEPTS.decode(frame)
        if not isinstance(msg, StatsReply):
            raise SledError(ErrorCode.UNKNOWN_KIND, f"expected stats, got {type(msg).__name__}")
        return msg.stats
    finally:
        sock.close(0)
