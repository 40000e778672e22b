"""A general incremental trainer: partitions of a network join one at a time during training.

A network is an ordered list of partitions (sub-networks by depth) and one head per rung: rung k
is partitions 0..k followed by heads[k] (heads may be one shared module when shapes allow).
Training starts with rung 0; further partitions join on a schedule (fixed steps or a loss
plateau). A joining partition is initialised either randomly (it joins as constructed) or by
look-ahead: before joining, the new partition and its head are trained alone for a short window
on top of the frozen running network, so the running network's function is untouched by the
window and the new exit is already a useful predictor when gradients from it start to reach
the earlier partitions. Definitions and measurements: docs/incremental-training.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
import torch
from torch import nn
from tqdm import tqdm

log = structlog.get_logger(__name__)

Batch = tuple[Any, Any]  # (inputs, targets), opaque to the trainer


class IncrementalNet(nn.Module):
    """Partitions plus one head per rung; `rung_outputs` runs the shared prefix once."""

    def __init__(self, partitions: list[nn.Module], heads: list[nn.Module]):
        super().__init__()
        if len(partitions) != len(heads):
            raise ValueError("one head per partition (rung) is required; repeat a module to share it")
        self.partitions = nn.ModuleList(partitions)
        self.heads = nn.ModuleList(heads)

    def __len__(self) -> int:
        return len(self.partitions)

    def rung_outputs(self, x, rungs: list[int]) -> dict[int, Any]:
        """Outputs of the given rungs, computing each partition once."""
        out, h = {}, x
        for k in range(max(rungs) + 1):
            h = self.partitions[k](h)
            if k in rungs:
                out[k] = self.heads[k](h)
        return out

    def forward(self, x, rung: int | None = None):
        rung = len(self) - 1 if rung is None else rung
        return self.rung_outputs(x, [rung])[rung]

    def rung_parameters(self, rung: int) -> int:
        """Parameters used by rung `rung` (shared modules counted once)."""
        params = {id(p): p for k in range(rung + 1) for p in self.partitions[k].parameters()}
        params.update({id(p): p for p in self.heads[rung].parameters()})
        return sum(p.numel() for p in params.values())


@dataclass
class IncrementalConfig:
    total_steps: int
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    init: Literal["random", "lookahead"] = "lookahead"
    lookahead_steps: int = 50  # counted in total_steps: the window costs compute too
    schedule: Literal["steps", "plateau"] = "steps"
    stage_steps: int | list[int] = 100  # "steps": stage k lasts stage_steps (or stage_steps[k]) steps
    plateau_patience: int = 3  # "plateau": evaluations without min_delta improvement of train loss
    plateau_min_delta: float = 0.01
    min_stage_steps: int = 20
    exit_loss: Literal["all", "last"] = "all"  # "all" keeps every rung a valid predictor
    freeze_earlier: bool = False  # alternative way to keep earlier rungs valid
    start_partitions: int = 1  # len(net) = a baseline: the full network trained normally
    eval_every: int = 50
    grad_clip: float | None = 1.0
    seed: int = 0


@dataclass
class History:
    """What a run recorded: evaluations, joins and the per-rung parameter counts."""

    evals: list[dict] = field(default_factory=list)  # step, wall_s, flops, active, train_loss, rungs{k: {loss, acc}}
    joins: list[dict] = field(default_factory=list)  # rung, step, wall_s, flops, running_output_change
    rung_params: list[int] = field(default_factory=list)
    train_losses: list[tuple[int, float]] = field(default_factory=list)

    def final(self) -> dict[int, dict]:
        return self.evals[-1]["rungs"] if self.evals else {}

    def to_dict(self) -> dict:
        return {"evals": self.evals, "joins": self.joins, "rung_params": self.rung_params,
                "train_losses": self.train_losses}


def smallest_sufficient(rung_acc: list[float], reference: float, tolerance: float) -> int | None:
    """Index of the smallest rung whose accuracy is within `tolerance` of `reference`."""
    for k, acc in enumerate(rung_acc):
        if acc >= reference - tolerance:
            return k
    return None


def count_macs(module: nn.Module, example) -> tuple[int, Any]:
    """Multiply-accumulates of Linear/Conv layers in one forward of `example` (per batch), and
    the output. Counted with hooks so any partition built from those layers is covered."""
    total = 0

    def hook(mod, inputs, output):
        nonlocal total
        if isinstance(mod, nn.Linear):
            total += output.numel() * mod.in_features
        elif isinstance(mod, nn.Conv2d):
            per_out = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
            total += output.numel() * per_out

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        with torch.no_grad():
            out = module(example)
    finally:
        for h in handles:
            h.remove()
    return total, out


class IncrementalTrainer:
    """Trains an IncrementalNet stage by stage; see the module docstring for the method."""

    def __init__(
        self,
        net: IncrementalNet,
        config: IncrementalConfig,
        batches: Iterator[Batch],
        loss_fn: Callable[[Any, Any], torch.Tensor],
        evaluate: Callable[[Callable[[Any, int], dict[int, Any]], list[int]], dict[int, dict]],
        probe: Any | None = None,
        name: str = "run",
    ):
        """`evaluate(rung_outputs, rungs)` returns {rung: {"loss", "acc"}} on held-out data;
        `probe` is an input batch used to measure MACs and output changes at joins."""
        self.net, self.config, self.batches = net, config, batches
        self.loss_fn, self.evaluate, self.probe, self.name = loss_fn, evaluate, probe, name
        params = [p for p in net.parameters() if p.requires_grad]
        if config.optimizer == "adamw":
            self.opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        else:
            self.opt = torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay, nesterov=True)
        self.active = config.start_partitions
        self.step = 0
        self.flops = 0.0
        self.history = History(rung_params=[net.rung_parameters(k) for k in range(len(net))])
        self.stage_macs, self.head_macs = self._measure_macs()
        self._trainable = {id(p) for p in params}
        self._start = 0.0

    def _measure_macs(self) -> tuple[list[float], list[float]]:
        if self.probe is None:
            return [0.0] * len(self.net), [0.0] * len(self.net)
        part_macs, head_macs, h = [], [], self.probe
        self.net.eval()
        for k in range(len(self.net)):
            macs, h = count_macs(self.net.partitions[k], h)
            part_macs.append(float(macs))
            head_macs.append(float(count_macs(self.net.heads[k], h)[0]))
        self.net.train()
        per_sample = 1.0 / _batch_size(self.probe)  # the trainer multiplies by each batch's size
        return [m * per_sample for m in part_macs], [m * per_sample for m in head_macs]

    def _lr(self) -> float:
        c = self.config
        if c.lr_schedule == "constant":
            return c.lr
        return c.lr * 0.5 * (1 + math.cos(math.pi * min(self.step, c.total_steps) / c.total_steps))

    def _step_flops(self, trained_partitions: list[int], exits: list[int]) -> float:
        """2 FLOPs per MAC; forward everywhere, backward (2x forward) where gradients flow."""
        first_trained = min(trained_partitions) if trained_partitions else len(self.net)
        fwd = sum(self.stage_macs[: max(exits) + 1]) + sum(self.head_macs[k] for k in exits)
        bwd = sum(self.stage_macs[first_trained : max(exits) + 1]) + sum(self.head_macs[k] for k in exits)
        return 2.0 * (fwd + 2.0 * bwd)

    def _set_trainable(self, partitions: set[int], heads: set[int]) -> None:
        """requires_grad only where training happens now; modules outside it go to eval mode so
        frozen batch-norm statistics do not move (the running network stays exactly as it is)."""
        for k, part in enumerate(self.net.partitions):
            part.train(k in partitions)
            for p in part.parameters():
                p.requires_grad_(k in partitions and id(p) in self._trainable)
        for k, head in enumerate(self.net.heads):
            if k in heads:
                head.train(True)
                for p in head.parameters():
                    p.requires_grad_(id(p) in self._trainable)
        for k, head in enumerate(self.net.heads):  # a shared head may appear under several k
            if k not in heads and not any(head is self.net.heads[j] for j in heads):
                head.train(False)
                for p in head.parameters():
                    p.requires_grad_(False)

    def _train_step(self, exits: list[int], trained_partitions: list[int]) -> float:
        for group in self.opt.param_groups:
            group["lr"] = self._lr()
        x, y = next(self.batches)
        outputs = self.net.rung_outputs(x, exits)
        loss = sum(self.loss_fn(outputs[k], y) for k in exits) / len(exits)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        loss = loss.detach()
        if self.config.grad_clip:
            nn.utils.clip_grad_norm_([p for p in self.net.parameters() if p.grad is not None], self.config.grad_clip)
        self.opt.step()
        self.step += 1
        self.flops += self._step_flops(trained_partitions, exits) * _batch_size(x)
        self.history.train_losses.append((self.step, float(loss)))
        return float(loss)

    def _regular_step(self) -> float:
        c = self.config
        last = self.active - 1
        exits = list(range(self.active)) if c.exit_loss == "all" else [last]
        trained = [last] if c.freeze_earlier else list(range(self.active))
        if c.freeze_earlier:
            exits = [last]  # frozen rungs cannot change, so only the newest exit needs a loss
        self._set_trainable(set(trained), set(exits))
        return self._train_step(exits, trained)

    @torch.no_grad()
    def _probe_output(self, rung: int):
        if self.probe is None:
            return None
        was = [m.training for m in self.net.modules()]
        self.net.eval()
        out = self.net(self.probe, rung)
        for m, t in zip(self.net.modules(), was):
            m.training = t
        return out

    def _join(self, bar: tqdm) -> None:
        new = self.active
        before = self._probe_output(new - 1)
        if self.config.init == "lookahead":
            self._set_trainable({new}, {new})
            for _ in range(self.config.lookahead_steps):
                if self.step >= self.config.total_steps:
                    break
                loss = self._train_step([new], [new])
                bar.update(1)
                bar.set_postfix(stage=f"look-ahead {new}", loss=f"{loss:.3f}")
        after = self._probe_output(new - 1)
        change = None if before is None else float((_tensor(after) - _tensor(before)).abs().max())
        self.active += 1
        record = {"rung": new, "step": self.step, "wall_s": time.monotonic() - self._start,
                  "flops": self.flops, "running_output_change": change}
        self.history.joins.append(record)
        log.info("partition_joined", run=self.name, init=self.config.init, **record)

    def _should_join(self, stage_start: int) -> bool:
        c = self.config
        if self.active >= len(self.net):
            return False
        in_stage = self.step - stage_start
        if c.schedule == "steps":
            length = c.stage_steps if isinstance(c.stage_steps, int) else c.stage_steps[self.active - 1]
            return in_stage >= length
        if in_stage < c.min_stage_steps:
            return False
        losses = [l for s, l in self.history.train_losses if s > stage_start]
        window = max(1, c.eval_every)
        means = [sum(losses[i : i + window]) / len(losses[i : i + window]) for i in range(0, len(losses), window)]
        if len(means) <= c.plateau_patience:
            return False
        best_before = min(means[: -c.plateau_patience])
        return min(means[-c.plateau_patience :]) > best_before - c.plateau_min_delta

    def _record_eval(self) -> None:
        rungs = list(range(self.active))
        was = [m.training for m in self.net.modules()]
        self.net.eval()
        with torch.no_grad():
            metrics = self.evaluate(self.net.rung_outputs, rungs)
        for m, t in zip(self.net.modules(), was):
            m.training = t
        recent = [l for _, l in self.history.train_losses[-self.config.eval_every :]]
        self.history.evals.append({
            "step": self.step, "wall_s": time.monotonic() - self._start, "flops": self.flops,
            "active": self.active, "train_loss": sum(recent) / max(1, len(recent)),
            "rungs": metrics,
        })

    def _stage_summary(self, stage: int, stage_start: int) -> None:
        last = self.history.evals[-1] if self.history.evals else None
        accs = " ".join(f"r{k}={v['acc']:.3f}" for k, v in (last or {"rungs": {}})["rungs"].items())
        tqdm.write(f"[{self.name}] stage {stage}: steps {stage_start}-{self.step}, partitions {self.active}, {accs}")

    def run(self) -> History:
        torch.manual_seed(self.config.seed)
        self._start = time.monotonic()
        stage_start, stage = 0, self.active
        with tqdm(total=self.config.total_steps, desc=self.name, unit="step") as bar:
            while self.step < self.config.total_steps:
                if self._should_join(stage_start):
                    self._record_eval()
                    self._stage_summary(stage, stage_start)
                    self._join(bar)
                    stage_start, stage = self.step, self.active
                    continue
                loss = self._regular_step()
                bar.update(1)
                bar.set_postfix(stage=self.active, loss=f"{loss:.3f}")
                if self.step % self.config.eval_every == 0:
                    self._record_eval()
        if not self.history.evals or self.history.evals[-1]["step"] != self.step:
            self._record_eval()
        self._stage_summary(stage, stage_start)
        return self.history


def _tensor(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def _batch_size(x) -> int:
    t = x if isinstance(x, torch.Tensor) else x[0]
    return int(t.shape[0])
