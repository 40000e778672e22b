"""The verifier worker process: one per GPU (one CPU worker on a machine without one).

The event loop only moves messages: batches are verified in a single worker thread (torch
releases the GIL in its kernels), so heartbeats keep flowing during a forward pass. The worker
pulls: it says Ready, receives one batch, answers it, and says Ready again. When the broker
falls silent for ``heartbeat_ms * liveness`` the worker makes a new socket and announces itself
again (the ZeroMQ guide's Paranoid Pirate worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor

import msgspec
import structlog
import torch
import zmq
import zmq.asyncio

from pipeline.config import Config
from pipeline.figures import VerifierFigures
from pipeline.models import load_causal_lm
from pipeline.protocol import (
    VERIFIER_ACCEPTS,
    BatchVerdicts,
    CloseSession,
    Dying,
    Heartbeat,
    SledError,
    Ready,
    VerifyBatch,
)
from pipeline.security import client_keys
from pipeline.roles import supervise
from pipeline.sockets import BrokerLink
from workers.cost_table import CostModel, target_prices
from workers.forward_log import ForwardLog, verify_recorded
from workers.static_verifier import make_verifier
from workers.target import TargetVerifier

log = structlog.get_logger("sled.verifier")


class VerifierWorker:
    def __init__(self, config: Config, verifier: TargetVerifier, ctx: zmq.asyncio.Context,
                 prices: CostModel | None = None):
        self.config = config
        self.prices = prices  # verifier.cost_table: the batches' costs are a table's prices, not measured
        self.verifier = verifier
        self.ctx = ctx
        self.identity = config.verifier.name.encode()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify")
        self.batches: asyncio.Queue[VerifyBatch] = asyncio.Queue(maxsize=4)
        self.busy = False
        self.rejected_frames = 0
        self.forwards = ForwardLog()  # (sessions, rows) of every forward, for `sled bench`'s GPU projection
        self.cpu = verifier.device.type == "cpu"  # a batch's cost is its CPU time here, its wall time on a GPU
        # sessions closed while a batch holding them was queued or computing here: the forward
        # rebuilds their caches, so they are closed again once it is done
        self.closing: set[str] = set()
        self.pending: set[str] = set()  # sessions of the batches received and not answered yet
        self.broker = BrokerLink(
            ctx, config.broker.backend, self.identity, max_message_bytes=config.limits.max_message_bytes,
            curve=client_keys(config, config.verifier.key or config.verifier.name),
        )

    def _connect(self) -> None:
        self.broker.connect()
        self.broker.send(Ready(self._stats()).encode())
        log.info("verifier_connected", broker=self.config.broker.backend, verifier=self.config.verifier.name)

    def _stats(self) -> VerifierFigures:
        return msgspec.structs.replace(self.verifier.stats, rejected_frames=self.rejected_frames,
                                       forwards=self.forwards.as_dict(), process_cpu_s=time.process_time(),
                                       backend=getattr(self.verifier, "backend", "eager"))

    async def run(self, stop: asyncio.Event) -> None:
        self._connect()
        linger_ms = 0
        try:
            await supervise(stop, self._receive_loop(), self._compute_loop(), self._heartbeat_loop())
        except Exception as exc:
            # a fatal error (out of memory in the forward, say): tell the broker before we go, so
            # that it fails our batches over now instead of after heartbeat_ms * liveness
            self.broker.send(Dying(f"{type(exc).__name__}: {exc}"[:500]).encode())
            log.error("verifier_dying", reason=repr(exc))
            linger_ms = 1000
            raise
        finally:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.broker.close(linger_ms)

    async def _receive_loop(self) -> None:
        while True:
            frame = await self.broker.recv()
            try:
                msg = VERIFIER_ACCEPTS.decode(frame, self.config.limits.max_message_bytes)
            except SledError as exc:
                self.rejected_frames += 1
                log.warning("frame_rejected", code=exc.code, reason=exc.detail)
                continue
            match msg:
                case VerifyBatch():
                    try:
                        self.batches.put_nowait(msg)
                        self.pending.update(item.session_id for item in msg.items)
                    except asyncio.QueueFull:  # the broker sends only after Ready; never expected
                        log.error("batch_dropped", batch_id=msg.batch_id)
                case CloseSession():
                    if msg.session_id in self.pending:
                        self.closing.add(msg.session_id)
                    # through the executor so it never races a forward pass over the same sessions
                    asyncio.get_running_loop().run_in_executor(self.executor, self.verifier.close, msg.session_id)
                case Heartbeat():
                    pass

    async def _compute_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self.batches.get()
            self.busy = True
            stats = self.verifier.stats
            started, cpu, items, rows = time.perf_counter(), stats.batch_cpu_s, stats.items, stats.verify_tokens
            with structlog.contextvars.bound_contextvars(batch_id=batch.batch_id):
                verdicts = await loop.run_in_executor(self.executor, verify_recorded, self.verifier, batch.items, self.forwards)
                compute_ms = 1000 * (time.perf_counter() - started)
                # what the batch cost: on a CPU its forward's CPU time (verify_recorded counts it),
                # on a GPU its wall time (the round ends in one transfer, so the host waited for it);
                # with a cost table, the table's price of its verify forward
                cost_ms = 1000 * (stats.batch_cpu_s - cpu) if self.cpu else compute_ms
                if self.prices is not None and stats.items > items:
                    cost_ms = self.prices.ms(stats.items - items, stats.verify_tokens - rows)
                for item in batch.items:
                    self.pending.discard(item.session_id)
                    if item.session_id in self.closing:  # closed meanwhile: drop what the forward rebuilt
                        self.closing.discard(item.session_id)
                        await loop.run_in_executor(self.executor, self.verifier.close, item.session_id)
                log.debug("batch_verified", size=len(batch.items), compute_ms=round(compute_ms, 2))
            self.busy = False
            self.broker.send(BatchVerdicts(batch.batch_id, verdicts, compute_ms, cost_ms).encode())
            self.broker.send(Ready(self._stats()).encode())

    async def _heartbeat_loop(self) -> None:
        interval = self.config.broker.heartbeat_ms / 1000
        while True:
            await asyncio.sleep(interval)
            if self.broker.silent_for() > interval * self.config.broker.liveness:
                log.warning("broker_silent", seconds=round(self.broker.silent_for(), 2))
                self._connect()
                continue
            idle = not self.busy and self.batches.empty()
            self.broker.send(Heartbeat(idle=idle, stats=self._stats()).encode())
            if idle and self.verifier.sessions:
                asyncio.get_running_loop().run_in_executor(
                    self.executor, self.verifier.evict_idle, self.config.verifier.session_idle_s
                )


async def serve(config: Config, stop: asyncio.Event) -> None:
    if config.verifier.threads > 0:
        torch.set_num_threads(config.verifier.threads)
    loop = asyncio.get_running_loop()
    log.info("target_loading", target=config.verifier.target)
    v = config.verifier
    model = await loop.run_in_executor(
        None, lambda: load_causal_lm(v.target, dtype=v.dtype, device=v.device, device_map=v.device_map, max_memory=v.max_memory)
    )
    verifier = make_verifier(model, config)
    prices = None
    if v.cost_table:  # a table without the target's shape is a configuration error: stop here, say why
        prices = target_prices(v.cost_table, model.config)
        log.info("costs_from_table", table=v.cost_table, shape=prices.shape, backend=prices.backend)
    ctx = zmq.asyncio.Context()
    try:
        await VerifierWorker(config, verifier, ctx, prices).run(stop)
    finally:
        with contextlib.suppress(Exception):
            ctx.term()
