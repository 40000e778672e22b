"""Microbenchmark of the broker's own overhead: throughput and the latency it adds.

The broker under test is the real one, started as its own process through the entry users run
(``python -m pipeline --set ... broker``, the project's ``config.toml`` plus free loopback ports),
pinned to ONE core. Everything else runs in this process, pinned to ANOTHER core, as one
synchronous ZeroMQ poll loop (cheaper than asyncio, so the load side is not the bottleneck):

* a no-op verifier on the backend: a DEALER that says ``Ready``, answers every ``VerifyBatch`` at
  once with ``BatchVerdicts`` (each proposal: 0 tokens accepted, token 7), says ``Ready`` again,
  and heartbeats every ``broker.heartbeat_ms`` (``idle=True``: it never computes) so that the
  broker keeps it alive;
* drafters on the frontend: DEALERs with their own identities, each holding many sessions, each
  session closed-loop (its next ``Propose`` leaves when its ``Verdict`` is back), the first
  round carrying the history as the real drafter does, and a ``Heartbeat`` every interval.

Frames are built and read with the Structs of ``pipeline/protocol.py`` (msgspec, as the broker
itself does), each load-side socket with its role's Decoder.

Figures
-------
``broker_proposals_per_s``
    Verdicts received by the drafters per second over a steady window after a warm-up, with
    enough sessions in flight (``throughput_sessions``) that the queue always fills a batch. The
    broker's CPU over the same window (``broker_cpu_utilisation``: utime + stime of every thread
    of the broker process, from ``/proc/PID/stat``, over one core) says whether the broker was the
    bottleneck (~1.0); ``load_cpu_utilisation`` is the same for this process on its core.
``broker_added_latency_p50_ms`` / ``_p99_ms``
    Light load: one session, one proposal in flight, so every batch holds one proposal and
    closes on its deadline ``broker.max_wait_ms`` (``deadline_ms``). Per proposal: the drafter's
    round trip minus the deadline. That includes two loopback round trips over TCP
    (drafter -> broker -> verifier -> broker -> drafter: four ZeroMQ hops, both processes' ZeroMQ
    I/O threads), the no-op verifier's poll loop, the broker's decode/queue/encode work and the
    lateness of its deadline timer, and the cost of waking idle processes after each deadline.
``zero_deadline_rtt_p50_ms`` / ``_p99_ms``
    The same round trip with ``broker.max_wait_ms=0`` (a second broker process): transport and
    broker work alone, no timer, nobody idle long. ``deadline_vs_zero_p50_ms`` is the difference
    of the medians (timer lateness plus waking from idle).
``broker_deadline_lateness_mean_ms``
    The broker's own figure (StatsReply ``mean_queue_wait_ms``, arrival to dispatch) minus the
    deadline, over the deadline run: the timer's lateness as the broker sees it.
``broker_proposals_per_cpu_s``
    Proposals per second of broker CPU time: the throughput figure that holds when another
    process shares the broker's core (``loadavg_1min_before`` says whether one might).

Usage: ``python -m bench.broker_micro [--quick] [--json]``; the last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import zmq

from bench.fleet import free_ports
from pipeline.config import load_config
from pipeline.figures import BrokerFigures
from pipeline.logs import configure_logging
from pipeline.protocol import (
    CLIENT_ACCEPTS,
    DRAFTER_UPSTREAM_ACCEPTS,
    VERIFIER_ACCEPTS,
    BatchVerdicts,
    CloseSession,
    ErrorReply,
    Heartbeat,
    Propose,
    Ready,
    StatsReply,
    StatsRequest,
    Verdict,
    VerifyBatch,
)
from pipeline.sockets import make_socket, new_identity
from pipeline.supervisor import ChildDied, Supervisor

log = structlog.get_logger("sled.bench.broker_micro")

ROOT = Path(__file__).resolve().parent.parent
HISTORY = list(range(1, 33))  # a 32-token prompt, sent with each session's first round
DRAFT = [11, 12, 13, 14]  # gamma = 4
VERDICT_TOKEN = 7
MAX_BYTES = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    pass


# --- frames: the protocol's own Structs --------------------------------------------------------


def propose_frame(session_id: str, round_: int, position: int, history: list[int] | None) -> bytes:
    return Propose(session_id, round_, position, DRAFT, history=history, drafter_kind="ngram").encode()


def verdicts_frame(batch: VerifyBatch) -> bytes:
    """Each proposal: 0 tokens accepted, then VERDICT_TOKEN."""
    verdicts = [Verdict(item.session_id, item.round, 0, VERDICT_TOKEN) for item in batch.items]
    return BatchVerdicts(batch.batch_id, verdicts).encode()


READY = Ready().encode()
IDLE_HEARTBEAT = Heartbeat(idle=True).encode()
HEARTBEAT = Heartbeat().encode()
STATS_REQUEST = StatsRequest().encode()


def close_frame(session_id: str) -> bytes:
    return CloseSession(session_id).encode()


# --- processes -----------------------------------------------------------------------------------


def pick_cores() -> tuple[int | None, int | None]:
    """(broker core, load core): two distinct cores of our affinity set, or (None, None)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None, None
    return cores[0], cores[1]


@dataclass
class BrokerProcess:
    """``python -m pipeline --set ... broker`` on free ports, pinned to ``core``; started and
    stopped by the project's supervisor (pipeline/supervisor.py)."""

    deadline_ms: float
    core: int | None
    frontend: str = ""
    backend: str = ""
    heartbeat_ms: int = 500
    max_history_tokens: int = 4096
    proc: subprocess.Popen | None = None
    extra: list[str] = field(default_factory=list)
    supervisor: Supervisor | None = None

    def start(self) -> None:
        if not self.frontend:  # run() picks both brokers' ports at once (below)
            front, back = free_ports(2)
            self.frontend, self.backend = f"tcp://127.0.0.1:{front}", f"tcp://127.0.0.1:{back}"
        overrides = [
            f'broker.frontend="{self.frontend}"',
            f'broker.backend="{self.backend}"',
            f"broker.max_wait_ms={float(self.deadline_ms)}",
            'log.level="warning"',
            *self.extra,
        ]
        self.supervisor = Supervisor([a for item in overrides for a in ("--set", item)], cwd=ROOT, grace_s=5.0, quiet=True)
        self.proc = self.supervisor.spawn(self.supervisor.role("broker", "broker"))
        self.pin()  # still importing: its threads (ZeroMQ's I/O thread) start later and inherit this
        # the same file and overrides the child reads, so the heartbeat interval and the limits match it
        config = load_config(None, overrides)
        self.heartbeat_ms, self.max_history_tokens = config.broker.heartbeat_ms, config.limits.max_history_tokens
        log.info("broker_started", pid=self.proc.pid, deadline_ms=self.deadline_ms, core=self.core, frontend=self.frontend)

    def pin(self) -> None:
        """Every thread of the broker on its one core."""
        if self.core is None:
            return
        for task in os.listdir(f"/proc/{self.proc.pid}/task"):
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(int(task), {self.core})

    def cpu_seconds(self) -> float:
        """utime + stime of every thread of the broker process."""
        with open(f"/proc/{self.proc.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)

    def check_alive(self) -> None:
        if self.supervisor is not None:
            try:
                self.supervisor.check_alive()
            except ChildDied as exc:
                raise BenchError(str(exc)) from None

    def stop(self) -> None:
        if self.supervisor is not None:
            asyncio.run(self.supervisor.stop())  # SIGTERM, its grace, then SIGKILL


# --- the load side: a no-op verifier and closed-loop drafters in one poll loop -------------------


@dataclass
class Session:
    session_id: str
    drafter: Drafter
    round: int = 0
    position: int = len(HISTORY)
    sent_at: float = 0.0
    restarts: int = 0

    def send(self) -> None:
        if self.position + len(DRAFT) + 1 > self.drafter.max_tokens:  # the broker would refuse it (pipeline/rules.py)
            self.restart()
        history = HISTORY if self.round == 0 else None
        self.sent_at = time.perf_counter()
        self.drafter.sent += 1
        self.drafter.sock.send(propose_frame(self.session_id, self.round, self.position, history), zmq.NOBLOCK)

    def restart(self) -> None:
        """Close this session and go on as a new one: a long window would take a closed-loop
        session past the broker's history limit, which refuses its next proposal."""
        sessions = self.drafter.sessions
        self.drafter.sock.send(close_frame(self.session_id), zmq.NOBLOCK)
        del sessions[self.session_id]
        self.restarts += 1
        self.drafter.restarts += 1
        self.session_id = f"{self.session_id.split('~')[0]}~{self.restarts}"
        self.round, self.position = 0, len(HISTORY)
        sessions[self.session_id] = self


@dataclass
class Drafter:
    sock: zmq.Socket
    max_tokens: int  # the broker's limits.max_history_tokens
    sessions: dict[str, Session] = field(default_factory=dict)
    sent: int = 0
    restarts: int = 0  # sessions closed at the history limit and begun again (Session.restart)


class Rig:
    """A no-op verifier and any number of drafters, driven by one ``zmq.Poller``."""

    def __init__(self, ctx: zmq.Context, broker: BrokerProcess):
        self.ctx = ctx
        self.broker = broker
        self.verifier = make_socket(ctx, zmq.DEALER, connect=broker.backend, identity=new_identity("bench-verifier"),
                                    max_message_bytes=MAX_BYTES)
        self.drafters: list[Drafter] = []
        self.poller = zmq.Poller()
        self.poller.register(self.verifier, zmq.POLLIN)
        self.by_sock: dict[zmq.Socket, Drafter] = {}
        self.on_verdict = None  # callback(session, now)
        self.verdicts = 0
        self.proposals = 0  # sent by drafters already removed
        self.restarts = 0  # by drafters already removed
        self.errors: dict[str, int] = {}
        self.batches = 0
        self.batch_items = 0
        self.next_heartbeat = 0.0
        self.verifier.send(READY)

    def add_drafter(self, sessions: int, tag: str) -> Drafter:
        sock = make_socket(self.ctx, zmq.DEALER, connect=self.broker.frontend, identity=new_identity("bench-drafter"),
                           max_message_bytes=MAX_BYTES)
        drafter = Drafter(sock, self.broker.max_history_tokens)
        for i in range(sessions):
            sid = f"{tag}-{len(self.drafters)}-{i}"
            drafter.sessions[sid] = Session(sid, drafter)
        self.drafters.append(drafter)
        self.by_sock[sock] = drafter
        self.poller.register(sock, zmq.POLLIN)
        return drafter

    def remove_drafter(self, drafter: Drafter) -> None:
        for sid in drafter.sessions:
            drafter.sock.send(close_frame(sid), zmq.NOBLOCK)
        self.proposals += drafter.sent
        self.restarts += drafter.restarts
        self.poller.unregister(drafter.sock)
        del self.by_sock[drafter.sock]
        self.drafters.remove(drafter)
        drafter.sock.close(0)

    def close(self) -> None:
        for drafter in list(self.drafters):
            drafter.sock.close(0)
        self.verifier.close(0)

    def _heartbeats(self, now: float) -> None:
        if now < self.next_heartbeat:
            return
        self.next_heartbeat = now + self.broker.heartbeat_ms / 1000
        self.verifier.send(IDLE_HEARTBEAT, zmq.NOBLOCK)
        for drafter in self.drafters:
            drafter.sock.send(HEARTBEAT, zmq.NOBLOCK)

    def _verifier_frames(self) -> None:
        sock = self.verifier
        while True:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            msg = VERIFIER_ACCEPTS.decode(frame)
            if type(msg) is VerifyBatch:
                self.batches += 1
                self.batch_items += len(msg.items)
                sock.send(verdicts_frame(msg), zmq.NOBLOCK)
                sock.send(READY, zmq.NOBLOCK)
            # "heartbeat" from the broker, "close": nothing to do

    def _drafter_frames(self, drafter: Drafter) -> None:
        sock = drafter.sock
        on_verdict = self.on_verdict
        while True:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            now = time.perf_counter()
            msg = DRAFTER_UPSTREAM_ACCEPTS.decode(frame)
            if type(msg) is Verdict:
                session = drafter.sessions.get(msg.session_id)
                if session is None or msg.round != session.round:
                    self.errors["stray_verdict"] = self.errors.get("stray_verdict", 0) + 1
                    continue
                self.verdicts += 1
                session.round += 1
                session.position += msg.accepted + 1
                if on_verdict is not None:
                    on_verdict(session, now)
            elif type(msg) is ErrorReply:
                self.errors[msg.code] = self.errors.get(msg.code, 0) + 1
                raise BenchError(f"broker answered an error: {msg}")
            # "heartbeat": nothing to do

    def pump(self, timeout_ms: int = 50) -> None:
        """One poll round: serve the verifier, deliver verdicts, send heartbeats when due."""
        for sock, _ in self.poller.poll(timeout_ms):
            if sock is self.verifier:
                self._verifier_frames()
            else:
                self._drafter_frames(self.by_sock[sock])
        self._heartbeats(time.perf_counter())

    def broker_stats(self, timeout: float = 5.0) -> dict:
        sock = make_socket(self.ctx, zmq.DEALER, connect=self.broker.frontend, identity=new_identity("bench-stats"),
                           max_message_bytes=1 << 22)
        try:
            sock.send(STATS_REQUEST)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                self.pump(0)  # keep the verifier answering while we wait
                if sock.poll(10):
                    msg = CLIENT_ACCEPTS.decode(sock.recv())
                    if type(msg) is StatsReply:
                        return msg.stats
                self.broker.check_alive()
            raise BenchError(f"no StatsReply from the broker within {timeout} s")
        finally:
            sock.close(0)

    def wait_registered(self, timeout: float = 15.0) -> None:
        """Until the broker answers and lists our verifier."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.broker.check_alive()
            with contextlib.suppress(BenchError):
                if self.broker_stats(timeout=1.0)["verifiers"]:
                    return
            self.verifier.send(READY, zmq.NOBLOCK)
        raise BenchError(f"broker not ready (verifier unregistered) after {timeout} s")


# --- phases --------------------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def measure_latency(rig: Rig, samples: int, warmup: int, timeout: float) -> list[float]:
    """One session, one proposal in flight: round trips in seconds (after ``warmup`` rounds)."""
    drafter = rig.add_drafter(1, f"lat{len(rig.drafters)}")
    (session,) = drafter.sessions.values()
    rtts: list[float] = []

    def on_verdict(s: Session, now: float) -> None:
        rtts.append(now - s.sent_at)
        if len(rtts) < warmup + samples:
            s.send()

    rig.on_verdict = on_verdict
    deadline = time.monotonic() + timeout
    try:
        session.send()
        while len(rtts) < warmup + samples:
            if time.monotonic() > deadline:
                raise BenchError(f"latency run: {len(rtts)} of {warmup + samples} verdicts after {timeout} s")
            rig.pump(50)
            rig.broker.check_alive()
    finally:
        rig.on_verdict = None
        rig.remove_drafter(drafter)
    return rtts[warmup:]


def measure_throughput(rig: Rig, drafters: int, sessions: int, warmup_s: float, window_s: float) -> dict:
    """``sessions`` closed-loop sessions over ``drafters`` sockets; verdicts/s in the window."""
    added = [rig.add_drafter(sessions // drafters + (i < sessions % drafters), f"tp{i}") for i in range(drafters)]
    total = sum(len(d.sessions) for d in added)
    rig.on_verdict = lambda s, now: s.send()
    try:
        for drafter in added:
            for session in drafter.sessions.values():
                session.send()
        started = time.perf_counter()
        while time.perf_counter() - started < warmup_s:
            rig.pump(50)
        rig.broker.check_alive()
        v0, b0, i0 = rig.verdicts, rig.batches, rig.batch_items
        cpu0, load0, t0 = rig.broker.cpu_seconds(), time.process_time(), time.perf_counter()
        while time.perf_counter() - t0 < window_s:
            rig.pump(50)
        t1 = time.perf_counter()
        cpu1, load1, v1 = rig.broker.cpu_seconds(), time.process_time(), rig.verdicts
        rig.broker.check_alive()
        wall = t1 - t0
        batches, items = rig.batches - b0, rig.batch_items - i0
        # stop resending and let every session's last proposal come back: none may be lost
        rig.on_verdict = lambda s, now: None
        drained, drain_deadline = rig.verdicts, time.monotonic() + 10
        while rig.verdicts - drained < total:  # each session has exactly one proposal in flight
            if time.monotonic() > drain_deadline:
                raise BenchError(f"throughput run: {total - (rig.verdicts - drained)} proposals without a verdict")
            rig.pump(50)
    finally:
        rig.on_verdict = None
        for drafter in added:
            rig.remove_drafter(drafter)
    return {
        "broker_proposals_per_s": (v1 - v0) / wall,
        "broker_cpu_utilisation": (cpu1 - cpu0) / wall,
        # per second of broker CPU: the figure that holds when another process shares the core
        "broker_proposals_per_cpu_s": (v1 - v0) / (cpu1 - cpu0) if cpu1 > cpu0 else 0.0,
        "load_cpu_utilisation": (load1 - load0) / wall,
        "throughput_sessions": total,
        "throughput_drafters": drafters,
        "throughput_window_s": wall,
        "throughput_mean_batch": items / batches if batches else 0.0,  # the window's, not the drain's
    }


# --- the benchmark -------------------------------------------------------------------------------


def run(quick: bool = False, *, latency_samples: int | None = None, sessions: int = 128, drafters: int = 4,
        warmup_s: float | None = None, window_s: float | None = None, broker_settings: tuple[str, ...] = ()) -> dict:
    """Start the brokers, measure, stop them; returns the figures (see the module docstring).
    ``broker_settings``: more ``--set`` items for both brokers."""
    samples = latency_samples or (1000 if quick else 3000)
    warmup_s = warmup_s if warmup_s is not None else (1.0 if quick else 2.0)
    window_s = window_s if window_s is not None else (3.0 if quick else 10.0)
    deadline_ms = load_config().broker.max_wait_ms
    load_before = os.getloadavg()[0]  # other work on this machine skews every figure: say so
    broker_core, load_core = pick_cores()
    before = os.sched_getaffinity(0)
    # all four ports at once: picked one broker at a time, the second could get a port the first
    # had not bound yet (and its bind then failed: "Address already in use")
    ports = [f"tcp://127.0.0.1:{port}" for port in free_ports(4)]
    timed = BrokerProcess(deadline_ms, broker_core, *ports[:2], extra=list(broker_settings))
    instant = BrokerProcess(0.0, broker_core, *ports[2:], extra=list(broker_settings))
    ctx = zmq.Context()
    rigs: list[Rig] = []
    started = time.perf_counter()
    try:
        if load_core is not None:
            os.sched_setaffinity(0, {load_core})
        timed.start()
        instant.start()
        rig = Rig(ctx, timed)
        rigs.append(rig)
        rig.wait_registered()
        timed.pin()  # belt and braces: every thread it has now
        rtts = measure_latency(rig, samples, warmup=max(20, samples // 20), timeout=60 + samples * deadline_ms / 100)
        queue_wait_ms = 1000 * BrokerFigures.of(rig.broker_stats()).queue_wait.mean
        figures = measure_throughput(rig, drafters, sessions, warmup_s, window_s)
        stats = rig.broker_stats()
        rig0 = Rig(ctx, instant)
        rigs.append(rig0)
        rig0.wait_registered()
        instant.pin()
        rtts0 = measure_latency(rig0, samples, warmup=max(20, samples // 20), timeout=60)
        stats0 = rig0.broker_stats()
        errors = {**rig.errors, **rig0.errors}
        if errors:
            raise BenchError(f"errors during the run: {errors}")
    finally:
        for r in rigs:
            r.close()
        ctx.term()
        timed.stop()
        instant.stop()
        os.sched_setaffinity(0, before)
    added = [1000 * rtt - deadline_ms for rtt in rtts]
    ms0 = [1000 * rtt for rtt in rtts0]
    figures.update(
        broker_added_latency_p50_ms=_percentile(added, 50),
        broker_added_latency_p99_ms=_percentile(added, 99),
        broker_added_latency_max_ms=max(added),
        broker_queue_wait_ms=queue_wait_ms,
        zero_deadline_rtt_p50_ms=_percentile(ms0, 50),
        zero_deadline_rtt_p99_ms=_percentile(ms0, 99),
        deadline_vs_zero_p50_ms=_percentile(added, 50) - _percentile(ms0, 50),
        broker_deadline_lateness_mean_ms=queue_wait_ms - deadline_ms,
        deadline_ms=deadline_ms,
        latency_samples=len(added),
        proposals_sent=rig.proposals + rig0.proposals,
        verdicts_received=rig.verdicts + rig0.verdicts,
        sessions_restarted=rig.restarts + rig0.restarts,
        broker_proposals=stats["proposals"] + stats0["proposals"],
        broker_verdicts=stats["verdicts"] + stats0["verdicts"],
        broker_rejected={**stats["rejected"], **stats0["rejected"]},
        loadavg_1min_before=load_before,
        broker_core=broker_core,
        load_core=load_core,
        pinned=broker_core is not None,
        quick=quick,
        wall_s=time.perf_counter() - started,
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.broker_micro", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (under 30 s)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line on stdout")
    args = parser.parse_args(argv)
    configure_logging("console", "warning" if args.json else "info")
    figures = run(quick=args.quick)
    if not args.json:
        log.info("broker_micro", **{k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()})
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
