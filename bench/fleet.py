"""SLED on an emulated edge fleet: the real broker and verifier processes, one drafter process per
device class, and (mode "netns") every device class in its own network namespace behind a
delayed, bandwidth-capped link.

    root namespace                     "edge-gw" namespace            device namespaces
    broker  <-ipc- linkproxy (delay) <-TCP, veth-  drafter pi5   (tbf-capped eth0)
    verifier -tcp 127.0.0.1-> broker                drafter orin  ...
    bench clients -ipc-> each drafter's client socket

Server processes run where a user runs them; only the link is emulated. The broker's frontend
is a Unix socket so that the per-class delay proxies (in the gateway namespace, reached by the
devices across their veths) and the bench's own clients can both reach it; each drafter's client
socket is a Unix socket too, which crosses namespaces. Mode "loopback" is the control: the same
processes, drafters connecting straight to the broker over 127.0.0.1, no delay, no cap.

One drafter process stands for every device of its class: each session is one device, whose
drafting time is emulated on its own (asyncio sleeps overlap), see bench/traces.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from bench import netns
from bench.linkproxy import read_stats
from bench.profiles import DeviceProfile
from bench.sessions import SessionRecord
from pipeline.client import DrafterClient, broker_stats
from pipeline.config import load_config
from pipeline.figures import BrokerFigures
from pipeline.stack import Stack
from pipeline.supervisor import ChildSpec
from workers.forward_log import delta as forwards_delta

log = structlog.get_logger("sled.bench.fleet")
ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def process_memory_mb(pid: int) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return {"rss_mb": round(out.get("VmRSS", 0.0), 1), "peak_rss_mb": round(out.get("VmHWM", 0.0), 1)}


@dataclass
class DeviceClass:
    profile: DeviceProfile
    trace: Path  # recorded drafts (bench/traces.py)
    gamma: int

    @property
    def name(self) -> str:
        return f"bench-{self.profile.name}"


@dataclass
class Fleet:
    """Start with ``async with``; ``run_level`` serves sessions and returns the figures."""

    target: str
    classes: list[DeviceClass]
    workdir: Path
    mode: str = "netns"  # or "loopback"
    config_path: str | None = None
    extra_overrides: list[str] = field(default_factory=list)

    def _overrides(self) -> list[str]:
        backend, front_port = free_ports(2)
        self.frontend = (f"ipc://{self.workdir}/front.sock" if self.mode == "netns"
                         else f"tcp://127.0.0.1:{front_port}")
        out = [f'broker.frontend="{self.frontend}"', f'broker.backend="tcp://127.0.0.1:{backend}"',
               f"verifier.target={json.dumps(self.target)}", "verifier.threads=1", 'log.level="warning"']
        for c in self.classes:
            out += [f'drafters.{c.name}.kind="{c.profile.kind}"', f"drafters.{c.name}.replay={json.dumps(str(c.trace))}",
                    f"drafters.{c.name}.gamma={c.gamma}", f"drafters.{c.name}.emulate_slowdown={c.profile.slowdown}",
                    f'drafters.{c.name}.client="ipc://{self.workdir}/{c.name}.sock"', f"drafters.{c.name}.max_sessions=256"]
        return out + self.extra_overrides

    async def __aenter__(self) -> Fleet:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.overrides = self._overrides()
        self.config = load_config(self.config_path, self.overrides)
        self.stack = Stack(self.config, self.config_path, self.overrides, [], log_dir=self.workdir / "logs")
        self.net = None
        try:
            await self.stack.start()
            if self.mode == "netns":
                self._network_up()
            await self._start_drafters()
        except BaseException:
            await self.__aexit__()
            raise
        return self

    def _network_up(self) -> None:
        self.net = netns.Network()
        self.net.add_host("edge-gw")
        for c in self.classes:
            self.net.add_host(c.profile.name)
        self.net.up()
        for c in self.classes:
            netns.shape_link(self.net, c.profile.name, c.profile.rate_mbit)

    def _spawn(self, name: str, argv: list[str], host: str | None) -> None:
        """One more child of the stack's supervisor (stopped before the broker and verifier)."""
        if host is not None:
            argv = self.net.command(host, argv)
        self.stack.supervisor.spawn(ChildSpec(name, tuple(argv)))

    async def _start_drafters(self) -> None:
        base = list(self.stack.supervisor.role_argv())
        gateway = self.net.hosts["edge-gw"].address if self.net else None
        for index, c in enumerate(self.classes):
            extra = []
            if self.net:
                port = 7001 + index
                self._spawn(f"proxy-{c.profile.name}", [
                    sys.executable, "-m", "bench.linkproxy", "--listen", f"{gateway}:{port}",
                    "--upstream", "unix:" + self.frontend.removeprefix("ipc://"),
                    "--delay-ms", str(c.profile.rtt_ms / 2), "--stats-file", str(self.workdir / f"link-{c.profile.name}.json"),
                ], "edge-gw")
                extra = ["--set", f'broker.frontend="tcp://{gateway}:{port}"']
            self._spawn(c.name, [*base, *extra, "drafter", c.name], c.profile.name if self.net else None)
        deadline = time.monotonic() + 120
        for c in self.classes:
            client = DrafterClient(f"ipc://{self.workdir}/{c.name}.sock")
            try:
                while True:
                    self.stack.check_alive()
                    with contextlib.suppress(TimeoutError):
                        await client.stats(timeout=1.0)
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"drafter {c.name} not ready (log: {self.workdir / 'logs'})")
            finally:
                client.close()

    async def __aexit__(self, *exc) -> None:
        await self.stack.stop()  # drafters and proxies first: reverse start order
        if self.net is not None:
            left = self.net.down()
            if left:
                log.warning("namespaces_left", names=left)

    # --- one concurrency level -----------------------------------------------------------------

    async def _figures(self) -> dict:
        verifier = self.stack.procs["verifier-0"].pid
        broker = await broker_stats(self.frontend, timeout=5.0)
        drafters = {}
        for c in self.classes:
            client = DrafterClient(f"ipc://{self.workdir}/{c.name}.sock")
            try:
                drafters[c.profile.name] = await client.stats(timeout=5.0)
            finally:
                client.close()
        links = {c.profile.name: read_stats(self.workdir / f"link-{c.profile.name}.json") for c in self.classes} if self.net else {}
        return {"verifier_cpu_s": process_cpu_s(verifier), "broker": broker, "drafters": drafters, "links": links,
                "verifier_memory": process_memory_mb(verifier)}

    async def run_level(self, sessions: list[SessionRecord], concurrency: int, max_new_tokens: int,
                        stop_ids: list[int]) -> dict:
        clients = {c.profile.name: DrafterClient(f"ipc://{self.workdir}/{c.name}.sock") for c in self.classes}
        gate = asyncio.Semaphore(concurrency)

        async def one(s: SessionRecord) -> None:
            async with gate:
                s.start = time.perf_counter()
                async for msg in clients[s.device].stream(s.prompt, max_new_tokens, stop_ids=stop_ids, timeout=600):
                    now = time.perf_counter()
                    if msg.tokens and s.first is None:
                        s.first = now
                    s.tokens += msg.tokens
                    if msg.done:
                        s.end = now
                        st = msg.stats
                        s.rounds, s.proposed, s.accepted = st["rounds"], st["proposed"], st["accepted"]
                        s.rejected_rounds, s.draft_lengths = st["rejected_rounds"], list(st["draft_lengths"])
                        s.plain_rounds, s.tree_rounds = st.get("plain_rounds", 0), st.get("tree_rounds", 0)
                        s.ahead_rounds = st.get("sent_ahead_confirmed", 0)

        before = await self._figures()
        started = time.perf_counter()
        try:
            await asyncio.gather(*(one(s) for s in sessions))
        finally:
            for client in clients.values():
                client.close()
        elapsed = time.perf_counter() - started
        await asyncio.sleep(0.3)  # the last CloseSession and stats reach the broker
        self.stack.check_alive()
        after = await self._figures()
        return _level_delta(before, after, elapsed)


def _verifier(stats: dict) -> dict:
    return next(iter(stats["broker"]["verifiers"].values()), {})


def _level_delta(before: dict, after: dict, elapsed: float) -> dict:
    v0, v1 = _verifier(before), _verifier(after)
    b0, b1 = before["broker"], after["broker"]
    batches = b1["batches"] - b0["batches"]
    f0, f1 = BrokerFigures.of(b0), BrokerFigures.of(b1)
    sessions_in_batches = f1.batch_sessions.sum - f0.batch_sessions.sum
    waits = f1.queue_wait.count - f0.queue_wait.count
    devices = {}
    for name, d1 in after["drafters"].items():
        d0 = before["drafters"][name]
        devices[name] = {"draft_s": d1["draft_s"] - d0["draft_s"], "rounds": d1["rounds"] - d0["rounds"],
                         "generated": d1["generated"] - d0["generated"]}
    link_bytes = sum(l1["bytes_up"] + l1["bytes_down"] - before["links"][n]["bytes_up"] - before["links"][n]["bytes_down"]
                     for n, l1 in after["links"].items())
    return {
        "server_cpu_s": after["verifier_cpu_s"] - before["verifier_cpu_s"],
        "elapsed_s": elapsed,
        "target_forwards": (v1["batches"] - v0["batches"]) + (v1["prefill_forwards"] - v0["prefill_forwards"]),
        "verify_forwards": v1["batches"] - v0["batches"],
        "draft_forwards": 0,  # on the devices
        "target_tokens": v1["target_tokens"] - v0["target_tokens"],
        "prefill_cpu_s": v1["prefill_cpu_s"] - v0["prefill_cpu_s"],
        # both from the same two snapshots of the verifier's figures (its CPU total beside the part
        # inside verify_batch), not from /proc read at another instant
        "outside_batch_cpu_s": ((v1.get("process_cpu_s", 0.0) - v0.get("process_cpu_s", 0.0))
                                - (v1.get("batch_cpu_s", 0.0) - v0.get("batch_cpu_s", 0.0))),
        "mean_batch_sessions": sessions_in_batches / batches if batches else 0.0,
        "broker_batches": batches,
        "mean_queue_wait_ms": 1000 * (f1.queue_wait.sum - f0.queue_wait.sum) / waits if waits else 0.0,
        # batches the SLO-aware policy held past their deadline (brokers/slo.py), and for how long
        "broker_holds": v1.get("holds", 0) - v0.get("holds", 0),
        "broker_held_ms": v1.get("held_ms", 0.0) - v0.get("held_ms", 0.0),
        # the broker's fits at the level's end: [a, b, c] ms of t = a + b·sessions + c·rows, of the
        # round trips and of the compute the verifier reported (which prices rows), the verifier's
        # busy fraction and the row cost verdicts carried (brokers/estimator.py)
        "broker_estimator": {k: v1[k] for k in ("verify_time_fit_ms", "verify_cost_fit_ms", "utilisation", "row_cost_ms",
                                                "round_cost_ms") if k in v1},
        "verifier_memory": after["verifier_memory"],
        "peak_kv_cache_mb": None,
        "devices": devices,
        "link_bytes": link_bytes if after["links"] else None,
        "forwards": forwards_delta(v0.get("forwards"), v1.get("forwards")),
    }
