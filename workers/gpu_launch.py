"""One verifier process per GPU: plan the workers, start them, restart a crashed one, stop them all.

``sled launch --gpus all`` runs one ordinary ``python -m pipeline verifier`` child per visible
GPU, each pinned with ``CUDA_VISIBLE_DEVICES`` so that inside it the GPU is ``cuda:0``. A child
that exits while the supervisor runs is started again after a capped exponential back-off
(reset once it has stayed up for a while); the broker meanwhile fails that worker's batches
with ``verifier_lost`` and the drafters resend their histories to whichever worker takes the
sessions, so nothing is lost. SIGINT/SIGTERM stop every child: SIGTERM, one bounded grace
period for all, then SIGKILL. The supervision is the project's one supervisor
(pipeline/supervisor.py); this module plans the slots and says what each child is.

Exit code: 0 when every worker that ever exited on its own is healthy again at stop time
(running and up ``Backoff.reset_after_s``, ``--healthy-after``); 1 when one is not, or when one
was given up after more than ``--max-restarts`` failures in a row (the launch ends by itself
with 1 once every worker is given up, e.g. a target that cannot load).

On a machine without GPUs ``--gpus cpu:N`` starts N CPU workers standing in for GPUs (the
tests do that). This module imports no torch at load time.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from dataclasses import dataclass

import structlog

from pipeline.supervisor import Backoff, ChildSpec, Supervisor

__all__ = ["Backoff", "LaunchError", "Slot", "plan_slots", "serve_workers", "visible_gpus", "worker_overrides",
           "worker_spec"]

log = structlog.get_logger("sled.launch")


class LaunchError(Exception):
    """The requested GPUs cannot be served (none visible, an unknown id, a bad --gpus value)."""


@dataclass(frozen=True)
class Slot:
    """One worker: the name it registers under at the broker and the devices it may see."""

    name: str
    devices: str  # the child's CUDA_VISIBLE_DEVICES; "" hides every GPU (a CPU stand-in)
    cuda: bool


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


def worker_spec(supervisor: Supervisor, slot: Slot, *, per_worker: int, device_map: str) -> ChildSpec:
    """One slot's child: ``python -m pipeline <shared flags> --set <its settings> verifier``,
    pinned to its GPUs, restarted after it exits."""
    settings = [a for item in worker_overrides(slot, per_worker=per_worker, device_map=device_map) for a in ("--set", item)]
    return supervisor.role(slot.name, *settings, "verifier", env={"CUDA_VISIBLE_DEVICES": slot.devices}, restart=True)


async def serve_workers(config, stop: asyncio.Event, *, slots: list[Slot], supervisor: Supervisor,
                        per_worker: int = 1) -> int:
    """`sled launch` until ``stop`` is set: 1 when a worker failed (see Supervisor.failed), else 0."""
    supervisor.start([worker_spec(supervisor, s, per_worker=per_worker, device_map=config.verifier.device_map)
                      for s in slots])
    try:
        given_up = await supervisor.run(stop)  # returns early only when every worker was given up
        if given_up is not None:
            log.error("launch_failed", reason="every worker was given up", workers=[s.name for s in slots])
    finally:
        await supervisor.stop()
    return supervisor.exit_code
