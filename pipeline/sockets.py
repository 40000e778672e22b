"""The one place sockets are made: identity, linger, bounded queues and a size cap on every one.

High-water marks are bounded on purpose (unlike vLLM's unbounded ones): a broker that cannot
keep up must say "overloaded", not buffer without limit. ``max_message_bytes`` makes libzmq drop
a peer that sends an oversized frame before it is ever read into Python.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import zmq
import zmq.asyncio

DEFAULT_HWM = 10_000
_NOBLOCK = int(zmq.NOBLOCK)
_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)


def new_identity(prefix: str) -> bytes:
    # 128 random bits: a routing identity must not be guessable by another peer
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex}".encode()


def make_socket(
    ctx: zmq.asyncio.Context,
    kind: int,
    *,
    max_message_bytes: int,
    bind: str | None = None,
    connect: str | None = None,
    identity: bytes | None = None,
    hwm: int = DEFAULT_HWM,
    curve=None,
) -> zmq.asyncio.Socket:
    """``curve``: CurveKeys (pipeline/security.py); a bound socket serves CURVE, a connecting one
    authenticates with it."""
    sock = ctx.socket(kind)
    if curve is not None:
        curve.apply(sock, server=bind is not None)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if kind == zmq.ROUTER:
        # Fail loudly (EHOSTUNREACH) on a reply to a peer that is gone, instead of dropping it silently.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A peer that reconnects under the same identity (a restarted verifier) takes its name over.
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    if kind == zmq.DEALER:
        # Reconnect with capped exponential back-off when the peer (broker) goes away.
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5_000)
    if bind:
        sock.bind(bind)
    if connect:
        sock.connect(connect)
    return sock


def send_now(sock: zmq.asyncio.Socket, *parts: bytes) -> bool:
    """Send without ever waiting: a full or gone peer is reported (False), not waited on.

    pyzmq resolves a NOBLOCK send on an asyncio socket at once, so this is safe to call from
    callbacks; the caller counts the failure and the peer's own timeout covers the loss.
    """
    future = sock.send_multipart(list(parts), flags=zmq.NOBLOCK)
    if not future.done():  # only if a blocking send were pending, which SLED never does
        future.add_done_callback(lambda f: f.exception())
        return True
    return future.exception() is None


class LoopSocket:
    """Non-blocking sends and receives on a socket, driven by the event loop with no Future per message.

    pyzmq's asyncio socket builds a Future, timers and event bookkeeping for every send and
    receive: most of a broker's time at tens of thousands of messages a second. This drives the
    same socket (through a shadow, so the zmq.asyncio socket still owns and closes it) with plain
    NOBLOCK calls and one loop reader on its ZMQ_FD.

    ZMQ_FD is edge-triggered: it signals that the socket's state may have changed, and any call
    into the socket (a send included) may consume that signal. So after every send, a check of
    ZMQ_EVENTS is scheduled (once per loop iteration), and a receiver that found nothing checks
    ZMQ_EVENTS again before it sleeps: a message that arrives during a send is never left unread.
    """

    def __init__(self, sock: zmq.asyncio.Socket):
        self._sock = zmq.Socket.shadow(sock.underlying)
        self._loop = asyncio.get_running_loop()
        self._readable = asyncio.Event()
        self._fd = self._sock.getsockopt(zmq.FD)
        self._loop.add_reader(self._fd, self._readable.set)
        self._recheck_scheduled = False
        self._closed = False

    def send(self, *parts: bytes) -> bool:
        """Send now, never wait: False when the peer is gone or its queue is full (as send_now)."""
        send = self._sock.send
        try:
            # part by part with plain int flags: send_multipart's enum flag arithmetic costs more
            # than the sends. Only the first part can fail (gone peer, full queue); then none left.
            for part in parts[:-1]:
                send(part, _MORE)
            send(parts[-1], _NOBLOCK)
            ok = True
        except zmq.ZMQError:
            ok = False
        if not self._recheck_scheduled:
            self._recheck_scheduled = True
            self._loop.call_soon(self._recheck)
        return ok

    def _recheck(self) -> None:
        self._recheck_scheduled = False
        if not self._closed and self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._readable.set()

    async def recv_multipart(self, copy: bool = True) -> list:
        """The next message; returns at once (without yielding to the loop) when one is queued."""
        while True:
            try:
                return self._sock.recv_multipart(zmq.NOBLOCK, copy=copy)
            except zmq.Again:
                pass
            self._readable.clear()
            if not self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                await self._readable.wait()

    def close(self) -> None:
        """Stop watching the socket (before the owner closes it)."""
        if not self._closed:
            self._closed = True
            self._loop.remove_reader(self._fd)


class BrokerLink:
    """A DEALER to the broker that can be replaced when the broker falls silent (the ZeroMQ
    guide's Paranoid Pirate): same identity, fresh socket, and a receive that carries on across
    the swap. Used by verifiers (backend) and drafters (frontend)."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, identity: bytes, *, max_message_bytes: int,
                 curve=None):
        self.ctx = ctx
        self.endpoint = endpoint
        self.identity = identity
        self.max_message_bytes = max_message_bytes
        self.curve = curve
        self.sock: zmq.asyncio.Socket | None = None
        self.last_seen = 0.0
        self.reconnects = -1

    def connect(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
        self.sock = make_socket(self.ctx, zmq.DEALER, connect=self.endpoint, identity=self.identity,
                                max_message_bytes=self.max_message_bytes, curve=self.curve)
        self.last_seen = time.monotonic()
        self.reconnects += 1

    def silent_for(self) -> float:
        return time.monotonic() - self.last_seen

    def send(self, payload: bytes) -> bool:
        return send_now(self.sock, payload)

    async def recv(self) -> bytes:
        """The next frame from the broker, across reconnects."""
        while True:
            sock = self.sock
            try:
                frame = (await sock.recv_multipart())[-1]
            except (zmq.ZMQError, asyncio.CancelledError):
                # closing a socket cancels its pending receive: carry on with the new socket after
                # a reconnect, but never swallow a real cancellation of this task
                if sock is not self.sock and not asyncio.current_task().cancelling():
                    continue
                raise
            self.last_seen = time.monotonic()
            return frame

    def close(self, linger_ms: int = 0) -> None:
        """``linger_ms``: how long queued messages (a last Dying) may still take to leave."""
        if self.sock is not None:
            self.sock.close(linger_ms)
