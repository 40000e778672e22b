"""Figures collected over the pipeline by the gateway.

Broker, verifiers and drafters keep cumulative counters and answer StatsRequest; they expose
no HTTP endpoint of their own. The gateway polls them every ``gateway.stats_interval_s``
(broker: its own figures plus the verifiers' it relays; each configured drafter: its own) and
turns the differences between two polls into rates (proposals/s, tokens/s), recent acceptance
per drafter kind, and the status page's history. The broker's histograms (batch sessions and
rows, queue wait by drafter class, verify time by verifier) are its own bucket counts
(pipeline/figures.py BrokerFigures), exported as they are by gateway/metrics.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass, field

import structlog
import zmq.asyncio

from pipeline.client import DrafterClient, broker_stats
from pipeline.config import Config
from pipeline.figures import BrokerFigures
from pipeline.security import client_keys, drafter_keys_for_client

log = structlog.get_logger("sled.gateway.stats")

HISTORY_POINTS = 600  # ten minutes at the default one-second interval


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

    @property
    def figures(self) -> BrokerFigures:
        return BrokerFigures.of(self.broker)

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
    """The sums two polls are compared by (the broker keeps sums: no mean is turned back into one)."""
    f = BrokerFigures.of(b)
    wait = f.queue_wait
    return {
        "proposals": f.proposals,
        "verdicts": f.verdicts,
        "batches": f.batch_sessions.count,
        "batch_sessions": f.batch_sessions.sum,
        "batch_tokens": f.batch_rows.sum,
        "waits": wait.count,
        "queue_wait_s": wait.sum,
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
    if d["batches"] > 0:
        point["batch_sessions"] = d["batch_sessions"] / d["batches"]
        point["batch_tokens"] = d["batch_tokens"] / d["batches"]
    if d["waits"] > 0:
        point["queue_wait_ms"] = 1000 * d["queue_wait_s"] / d["waits"]

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
            dcompute = v.get("compute_s", 0.0) - prev.get("compute_s", 0.0)
            util = min(1.0, max(0.0, dcompute / dt))
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
