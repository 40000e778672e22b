"""One verifier process per GPU: plan the workers, start them, restart a crashed one, stop them all.

``sled launch --gpus all`` runs one ordinary ``python -m pipeline verifier`` child per visible
GPU, each pinned with ``CUDA_VISIBLE_DEVICES`` so that inside it the GPU is ``cuda:0``. A child
that exits while the supervisor runs is started again after a capped exponential back-off
(reset once it has stayed up for a while); the broker meanwhile fails that worker's batches
with ``verifier_lost`` and the drafters resend their histories to whichever worker takes the
sessions, so nothing is lost. SIGINT/SIGTERM stop every child: SIGTERM, one bounded grace
period for all, then SIGKILL.

On a machine without GPUs ``--gpus cpu:N`` starts N CPU workers standing in for GPUs (the
tests do that). This module imports neither torch nor pyzmq at load time: the supervisor only
needs the standard library and structlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

log = structlog.get_logger("sled.launch")

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class LaunchError(Exception):
    """The requested GPUs cannot be served (none visible, an unknown id, a bad --gpus value)."""


@dataclass(frozen=True)
class Slot:
    """One worker: the name it registers under at the broker and the devices it may see."""

    name: str
    devices: str  # the child's CUDA_VISIBLE_DEVICES; "" hides every GPU (a CPU stand-in)
    cuda: bool


@dataclass(frozen=True)
class Backoff:
    """Capped exponential back-off between restarts of one worker (the Paranoid Pirate's)."""

    base_s: float = 1.0
    cap_s: float = 30.0
    reset_after_s: float = 60.0  # a worker up this long counts as healthy again

    def delay(self, failures: int) -> float:
        return min(self.cap_s, self.base_s * 2 ** min(failures, 30))


def visible_gpus(environ: dict[str, str] | None = None) -> list[str]:
    """GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` when set, else every GPU CUDA sees."""
    env = os.environ if environ is None else environ
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        ids = []
        for part in listed.split(","):
            part = part.strip()
            if not part or part.startswith("-"):  # CUDA stops at the first invalid entry ("-1" hides all)
                break
            ids.append(part)
        return ids
    return [str(i) for i in range(_cuda_device_count())]


def _cuda_device_count() -> int:
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        return torch.cuda.device_count()
    if shutil.which("nvidia-smi") is None:
        return 0
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    return sum(line.startswith("GPU ") for line in listing.stdout.splitlines()) if listing.returncode == 0 else 0


def plan_slots(gpus: str, *, per_worker: int = 1, prefix: str = "verifier",
               environ: dict[str, str] | None = None) -> list[Slot]:
    """Turn ``--gpus`` into workers.

    ``all``: every visible GPU; ``N``: the first N of them; ``0,2`` or ``device=1``: those ids;
    ``cpu:N``: N CPU workers standing in for GPUs. ``per_worker`` GPUs go to each worker (a
    target larger than one GPU, its layers spread with ``verifier.device_map``).
    """
    gpus = gpus.strip()
    if per_worker < 1:
        raise LaunchError("--per-worker must be at least 1")
    if gpus.startswith("cpu:"):
        count = _count(gpus[4:], gpus)
        return [Slot(f"{prefix}-cpu{i}", "", cuda=False) for i in range(count)]
    visible = visible_gpus(environ)
    if gpus == "all":
        chosen = visible
    elif gpus.startswith("device=") or "," in gpus:
        chosen = [g.strip() for g in gpus.removeprefix("device=").split(",") if g.strip()]
        unknown = [g for g in chosen if g not in visible]
        if unknown:
            raise LaunchError(f"GPU {', '.join(unknown)} not visible (visible: {', '.join(visible) or 'none'})")
    else:
        count = _count(gpus, gpus)
        if count > len(visible):
            raise LaunchError(f"{count} GPUs asked for, {len(visible)} visible")
        chosen = visible[:count]
    if not chosen:
        raise LaunchError("no GPU visible (CUDA_VISIBLE_DEVICES, torch.cuda); use --gpus cpu:N for CPU workers")
    if len(chosen) % per_worker:
        raise LaunchError(f"{len(chosen)} GPUs do not split into workers of {per_worker}")
    slots = []
    for start in range(0, len(chosen), per_worker):
        group = chosen[start : start + per_worker]
        # UUIDs (GPU-…) make poor names: fall back to the position among the chosen GPUs
        label = "-".join(g if g.isdigit() else str(start + i) for i, g in enumerate(group))
        slots.append(Slot(f"{prefix}-gpu{label}", ",".join(group), cuda=True))
    return slots


def _count(text: str, whole: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise LaunchError(f"--gpus {whole!r}: expected all, N, 0,1, device=ID or cpu:N")
    return int(text)


def worker_overrides(slot: Slot, *, per_worker: int, device_map: str) -> list[str]:
    """The settings that make one child the worker of its slot (``--set`` values, TOML-quoted)."""
    out = [f'verifier.name="{slot.name}"']
    if slot.cuda:
        out.append('verifier.device="cuda"')  # cuda:0 is the slot's first GPU inside the child
        if per_worker > 1 and not device_map:
            out.append('verifier.device_map="auto"')  # several GPUs per worker: spread the layers
    else:
        out.append('verifier.device="cpu"')
    return out


def _die_with_parent() -> None:
    """In the child before exec: receive SIGTERM when the supervisor dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Supervisor:
    """Starts one child per slot, restarts each after it exits, stops all on ``stop``."""

    slots: list[Slot]
    base_args: Sequence[str] = ()  # --config/--set flags every child gets before its role
    per_worker: int = 1
    device_map: str = ""
    backoff: Backoff = field(default_factory=Backoff)
    grace_s: float = 10.0
    log_dir: Path | None = None
    procs: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)

    def command(self, slot: Slot) -> list[str]:
        args = [sys.executable, "-m", "pipeline", *self.base_args]
        for item in worker_overrides(slot, per_worker=self.per_worker, device_map=self.device_map):
            args += ["--set", item]
        return [*args, "verifier"]

    def environment(self, slot: Slot) -> dict[str, str]:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=slot.devices, PYTHONUNBUFFERED="1")
        # `python -m pipeline` must resolve from any working directory (an uninstalled checkout)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
        return env

    async def _spawn(self, slot: Slot) -> asyncio.subprocess.Process:
        out = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{slot.name}.log", "ab")  # noqa: SIM115 - the child holds it
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command(slot), stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                env=self.environment(slot), preexec_fn=_die_with_parent,
            )
        finally:
            if out is not None:
                out.close()  # the child has its own descriptor now
        self.procs[slot.name] = proc
        log.info("worker_started", worker=slot.name, pid=proc.pid, devices=slot.devices or "cpu")
        return proc

    async def _keep_running(self, slot: Slot, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            proc = await self._spawn(slot)
            started = time.monotonic()
            exited = asyncio.create_task(proc.wait())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not exited.done():  # shutting down: stop_all() ends the child
                exited.cancel()
                return
            if time.monotonic() - started >= self.backoff.reset_after_s:
                failures = 0
            delay = self.backoff.delay(failures)
            failures += 1
            self.restarts[slot.name] = self.restarts.get(slot.name, 0) + 1
            log.warning("worker_exited", worker=slot.name, pid=proc.pid, code=proc.returncode,
                        restart_in_s=round(delay, 2), restarts=self.restarts[slot.name])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def stop_all(self) -> None:
        """SIGTERM every child, one grace period for all of them together, then SIGKILL."""
        live = {name: p for name, p in self.procs.items() if p.returncode is None}
        for proc in live.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        waits = {asyncio.create_task(p.wait()): name for name, p in live.items()}
        if waits:
            _, late = await asyncio.wait(waits, timeout=self.grace_s)
            for task in late:
                name = waits[task]
                log.warning("worker_killed", worker=name, grace_s=self.grace_s)
                with contextlib.suppress(ProcessLookupError):
                    live[name].kill()
            if late:
                await asyncio.wait(late)
        log.info("workers_stopped", workers=len(self.procs),
                 codes={name: p.returncode for name, p in self.procs.items()})

    async def run(self, stop: asyncio.Event) -> None:
        keepers = [asyncio.create_task(self._keep_running(slot, stop)) for slot in self.slots]
        try:
            await stop.wait()
            await asyncio.gather(*keepers)  # each returns at once; none spawns after this
        finally:
            for task in keepers:
                task.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
            await self.stop_all()
