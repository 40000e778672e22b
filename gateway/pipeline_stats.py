"""Figures collected over the pipeline by the gateway.

Broker, verifiers and drafters keep cumulative counters and answer StatsRequest; they expose
no HTTP endpoint of their own. The gateway polls them every ``gateway.stats_interval_s``
(broker: its own figures plus the verifiers' it relays; each configured drafter: its own) and
turns the differences between two polls into rates (proposals/s, tokens/s), recent acceptance
per drafter kind, and histograms of batch size, queue wait and verify time.

The broker reports only means and totals, so the histograms are approximations: the batches of
one poll interval are all counted at that interval's mean (a broker-side histogram would make
them exact; see docs/gateway.md).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import time
from collections import deque
from dataclasses import dataclass, field

import structlog
import zmq.asyncio

from pipeline.client import DrafterClient, broker_stats
from pipeline.config import Config
from pipeline.security import client_keys, drafter_keys_for_client

log = structlog.get_logger("sled.gateway.stats")

BATCH_SESSION_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
BATCH_TOKEN_BUCKETS = (4, 8, 16, 32, 64, 128, 256, 512)
WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
COMPUTE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
HISTORY_POINTS = 600  # ten minutes at the default one-second interval


class WeightedHistogram:
    """Bucket counts that accept ``n`` observations of one value at once (a poll's mean × its batches)."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = [float(b) for b in bounds]
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def add(self, value: float, n: int = 1) -> None:
        if n <= 0 or math.isnan(value):
            return
        self.counts[bisect.bisect_left(self.bounds, value)] += n
        self.sum += value * n
        self.count += n

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, n in zip([*self.bounds, math.inf], self.counts):
            total += n
            out.append(("+Inf" if bound == math.inf else repr(bound), total))
        return out


@dataclass
class DrafterFigures:
    name: str
    kind: str
    gamma: int
    up: bool = False
    stats: dict = field(default_factory=dict)


@dataclass
class PipelineState:
    """The latest figures and the recent history, as the metrics and the status page read them."""

    broker_up: bool = False
    broker: dict = field(default_factory=dict)
    drafters: dict[str, DrafterFigures] = field(default_factory=dict)
    proposals_per_s: float = 0.0
    verdicts_per_s: float = 0.0
    tokens_per_s: float = 0.0
    updated: float = 0.0  # wall clock of the last poll, for the page
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY_POINTS))
    batch_sessions: WeightedHistogram = field(default_factory=lambda: WeightedHistogram(BATCH_SESSION_BUCKETS))
    batch_tokens: WeightedHistogram = field(default_factory=lambda: WeightedHistogram(BATCH_TOKEN_BUCKETS))
    queue_wait: WeightedHistogram = field(default_factory=lambda: WeightedHistogram(WAIT_BUCKETS))
    verify_batch: dict[str, WeightedHistogram] = field(default_factory=dict)

    @classmethod
    def for_config(cls, config: Config) -> "PipelineState":
        return cls(drafters={name: DrafterFigures(name, d.kind, d.gamma) for name, d in config.drafters.items()})

    def acceptance_by_kind(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for d in self.drafters.values():
            if not d.stats:
                continue
            k = out.setdefault(d.kind, {"proposed": 0, "accepted": 0, "generated": 0})
            for key in k:
                k[key] += int(d.stats.get(key, 0))
        for k in out.values():
            k["acceptance_rate"] = k["accepted"] / k["proposed"] if k["proposed"] else 0.0
        return out


@dataclass
class Sample:
    """One poll: when (monotonic), the broker's sums, each drafter's and each verifier's figures."""

    t: float
    totals: dict
    drafters: dict
    verifiers: dict


def _broker_totals(b: dict) -> dict:
    """Recover the broker's sums from its means (it reports mean per batch and per proposal)."""
    batches = b.get("batches", 0)
    sessions = b.get("mean_batch_sessions", 0.0) * batches
    return {
        "proposals": b.get("proposals", 0),
        "verdicts": b.get("verdicts", 0),
        "batches": batches,
        "batch_sessions": sessions,
        "batch_tokens": b.get("mean_batch_tokens", 0.0) * batches,
        "queue_wait_ms": b.get("mean_queue_wait_ms", 0.0) * sessions,
    }


def record_interval(st: PipelineState, before: Sample, after: Sample) -> None:
    """Rates, histograms and one history point from two polls (pure: no sockets)."""
    dt = after.t - before.t
    d = {k: after.totals[k] - before.totals[k] for k in after.totals}
    if dt <= 0 or d["batches"] < 0 or d["proposals"] < 0:  # the broker restarted: start over from here
        return
    st.proposals_per_s = d["proposals"] / dt
    st.verdicts_per_s = d["verdicts"] / dt
    point: dict = {"t": round(time.time(), 3), "proposals_per_s": st.proposals_per_s,
                   "verdicts_per_s": st.verdicts_per_s, "sessions": st.broker.get("sessions", 0),
                   "batches": d["batches"], "batch_sessions": None, "batch_tokens": None, "queue_wait_ms": None}
    batches = int(d["batches"])
    sessions = max(0, round(d["batch_sessions"]))
    if batches > 0:
        point["batch_sessions"] = d["batch_sessions"] / batches
        point["batch_tokens"] = d["batch_tokens"] / batches
        st.batch_sessions.add(point["batch_sessions"], batches)
        st.batch_tokens.add(point["batch_tokens"], batches)
    if sessions > 0:
        point["queue_wait_ms"] = d["queue_wait_ms"] / sessions
        st.queue_wait.add(point["queue_wait_ms"] / 1000, sessions)

    generated, active, kinds = 0, 0, {}
    for name, now in after.drafters.items():
        active += int(now.get("active", 0))
        prev = before.drafters.get(name)
        if prev is None or now.get("requests", 0) < prev.get("requests", 0):  # new or restarted
            continue
        generated += now.get("generated", 0) - prev.get("generated", 0)
        k = kinds.setdefault(now.get("kind", "?"), [0, 0])  # [proposed, accepted] this interval
        k[0] += now.get("proposed", 0) - prev.get("proposed", 0)
        k[1] += now.get("accepted", 0) - prev.get("accepted", 0)
    st.tokens_per_s = generated / dt
    point.update(tokens_per_s=st.tokens_per_s, active=active, kinds=kinds)

    verifiers = {}
    for name, v in after.verifiers.items():
        prev = before.verifiers.get(name)
        util = None
        if prev is not None and v.get("batches", 0) >= prev.get("batches", 0):
            dbatches = v.get("batches", 0) - prev.get("batches", 0)
            dcompute = v.get("compute_s", 0.0) - prev.get("compute_s", 0.0)
            util = min(1.0, max(0.0, dcompute / dt))
            if dbatches > 0:
                hist = st.verify_batch.setdefault(name, WeightedHistogram(COMPUTE_BUCKETS))
                hist.add(dcompute / dbatches, dbatches)
        verifiers[name] = {"sessions": v.get("sessions", 0), "queued": v.get("queued", 0), "utilization": util}
    point["verifiers"] = verifiers
    st.history.append(point)


class StatsPoller:
    def __init__(self, config: Config, ctx: zmq.asyncio.Context, state: PipelineState):
        self.config = config
        self.ctx = ctx
        self.interval = max(0.1, config.gateway.stats_interval_s)
        self.timeout = min(2.0, max(0.5, self.interval))
        self.state = state
        self.clients = {name: DrafterClient(d.client, ctx, max_message_bytes=config.limits.max_message_bytes,
                                            curve=drafter_keys_for_client(config, name))
                        for name, d in config.drafters.items()}
        self._last: Sample | None = None

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.poll_once()
            except Exception:  # a figure we did not expect must not stop the collection
                log.exception("stats_poll_failed")
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    async def poll_once(self) -> None:
        broker, *drafters = await asyncio.gather(self._broker(), *(self._drafter(n) for n in self.clients))
        st = self.state
        st.broker_up = broker is not None
        for name, stats in zip(self.clients, drafters):
            fig = st.drafters[name]
            fig.up = stats is not None
            if stats is not None:
                fig.stats = stats
                fig.kind = stats.get("kind", fig.kind)
                fig.gamma = stats.get("gamma", fig.gamma)
        st.updated = time.time()
        if broker is None:
            return
        st.broker = broker
        sample = Sample(time.monotonic(), _broker_totals(broker),
                        {n: dict(f.stats) for n, f in st.drafters.items() if f.up},
                        {n: dict(v) for n, v in broker.get("verifiers", {}).items()})
        if self._last is not None:
            record_interval(st, self._last, sample)
            sample.drafters = {**self._last.drafters, **sample.drafters}  # keep a baseline for drafters that missed a poll
        self._last = sample

    async def probe_drafter(self, name: str) -> bool:
        """A fresh look at one drafter (when the last poll missed it), for request admission."""
        stats = await self._drafter(name)
        fig = self.state.drafters[name]
        fig.up = stats is not None
        if stats is not None:
            fig.stats = stats
        return fig.up

    async def _broker(self) -> dict | None:
        try:
            return await broker_stats(self.config.broker.frontend, timeout=self.timeout, ctx=self.ctx,
                                      curve=client_keys(self.config, self.config.security.admin_key))
        except (TimeoutError, OSError):
            return None

    async def _drafter(self, name: str) -> dict | None:
        client = self.clients[name]
        try:
            return await client.stats(timeout=self.timeout)
        except TimeoutError:  # a drafter that is down never answers
            return None

    def close(self) -> None:
        for client in self.clients.values():
            with contextlib.suppress(Exception):
                client.close()
