"""The incremental trainer on tiny networks: schedules, look-ahead, freezing, the sufficiency rule."""

import itertools

import pytest
import torch
from torch import nn

from training.incremental import IncrementalConfig, IncrementalNet, IncrementalTrainer, count_macs, smallest_sufficient


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_net(seed: int = 0, width: int = 16, n: int = 3) -> IncrementalNet:
    torch.manual_seed(seed)
    parts = [nn.Sequential(nn.Linear(8 if k == 0 else width, width), nn.BatchNorm1d(width), nn.ReLU()) for k in range(n)]
    return IncrementalNet(parts, [nn.Linear(width, 2) for _ in range(n)])


def blobs(seed: int = 0, n: int = 512):
    """A learnable two-class problem (sign of a fixed projection)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x @ torch.linspace(-1, 1, 8) > 0).long()
    return x, y


def batches(x, y, size: int = 64):
    for first in itertools.cycle(range(0, len(y), size)):
        yield x[first : first + size], y[first : first + size]


def evaluator(x, y):
    def evaluate(rung_outputs, rungs):
        out = rung_outputs(x, rungs)
        return {k: {"acc": float((out[k].argmax(-1) == y).float().mean()),
                    "loss": float(nn.functional.cross_entropy(out[k], y))} for k in rungs}
    return evaluate


def make_trainer(net, x, y, **overrides):
    config = IncrementalConfig(**{"total_steps": 90, "lr": 1e-2, "stage_steps": 20, "lookahead_steps": 10,
                                  "eval_every": 10, **overrides})
    return IncrementalTrainer(net, config, batches(x, y), nn.functional.cross_entropy, evaluator(x, y), probe=x[:32])


def test_partitions_join_on_fixed_schedule():
    x, y = blobs()
    history = make_trainer(tiny_net(), x, y, init="random").run()
    assert [j["rung"] for j in history.joins] == [1, 2]
    assert [j["step"] for j in history.joins] == [20, 40]
    assert history.evals[-1]["active"] == 3 and history.evals[-1]["step"] == 90


def test_lookahead_window_counts_as_steps_and_precedes_the_join():
    x, y = blobs()
    history = make_trainer(tiny_net(), x, y, init="lookahead").run()
    # stage of 20 steps, then a 10-step window, then the join
    assert [j["step"] for j in history.joins] == [30, 60]


def test_lookahead_leaves_running_network_unchanged_and_trains_new_exit():
    x, y = blobs()
    trainer = make_trainer(tiny_net(), x, y, init="lookahead", lookahead_steps=40, total_steps=61)
    history = trainer.run()
    join = history.joins[0]
    assert join["step"] == 60
    assert join["running_output_change"] == 0.0  # batch-norm statistics included
    # the window trained the new partition and exit: its loss fell while the rest stood still
    window = [loss for step, loss in history.train_losses if 20 < step <= 60]
    assert sum(window[-10:]) / 10 < sum(window[:10]) / 10 - 0.05


def test_regular_training_after_join_moves_earlier_partitions_unless_frozen():
    x, y = blobs()
    for freeze, should_move in ((False, True), (True, False)):
        net = tiny_net()
        trainer = make_trainer(net, x, y, init="random", total_steps=20, freeze_earlier=freeze)
        trainer.run()  # the first stage only: the loop stops before partition 1 joins
        before = [p.detach().clone() for p in net.partitions[0].parameters()]
        trainer.config.total_steps = 40
        trainer.run()  # resumes: partition 1 joins, then 20 more steps
        assert len(trainer.history.joins) == 1
        moved = any(not torch.equal(b, p) for b, p in zip(before, net.partitions[0].parameters()))
        assert moved == should_move


def test_plateau_schedule_joins_when_loss_stops_improving():
    x, y = blobs()
    # lr = 0: the loss cannot improve, so each stage ends right after min_stage_steps + patience
    history = make_trainer(tiny_net(), x, y, init="random", schedule="plateau", lr=0.0, lr_schedule="constant",
                           min_stage_steps=10, plateau_patience=2, total_steps=120).run()
    assert len(history.joins) == 2
    assert all(10 <= j["step"] - prev <= 40 for j, prev in zip(history.joins, [0, history.joins[0]["step"]]))


def test_plateau_schedule_waits_while_loss_improves():
    """The same schedule joins later while the loss still falls than when it cannot fall, and
    it does join once learning levels off (a run without joins fails here)."""
    x, y = blobs()
    settings = dict(init="random", schedule="plateau", min_stage_steps=10, plateau_patience=3,
                    plateau_min_delta=0.0, lr_schedule="constant", total_steps=400)
    flat = make_trainer(tiny_net(), x, y, lr=0.0, **settings).run()
    learning = make_trainer(tiny_net(), x, y, lr=3e-2, **settings).run()
    assert flat.joins and learning.joins
    assert learning.joins[0]["step"] > flat.joins[0]["step"]


def test_baseline_trains_full_network_without_joins():
    x, y = blobs()
    history = make_trainer(tiny_net(), x, y, start_partitions=3, exit_loss="last", total_steps=60).run()
    assert history.joins == []
    assert history.evals[0]["active"] == 3
    assert history.evals[-1]["rungs"][2]["acc"] > 0.8


def test_flops_grow_with_depth_and_backward_costs_twice_forward():
    lin = nn.Linear(4, 3)
    macs, _ = count_macs(lin, torch.zeros(2, 4))
    assert macs == 2 * 4 * 3
    x, y = blobs()
    trainer = make_trainer(tiny_net(), x, y, init="random", total_steps=1)
    per_step = trainer._step_flops([0], [0])
    part0, head0 = trainer.stage_macs[0], trainer.head_macs[0]
    assert per_step == pytest.approx(2 * 3 * (part0 + head0))
    assert trainer.stage_macs[0] == pytest.approx(8 * 16)  # per sample: one Linear(8, 16)


def test_rung_parameters_count_shared_modules_once():
    shared = nn.Linear(16, 2)
    net = IncrementalNet([nn.Linear(8, 16), nn.Linear(16, 16)], [shared, shared])
    assert net.rung_parameters(0) == 8 * 16 + 16 + 16 * 2 + 2
    assert net.rung_parameters(1) == net.rung_parameters(0) + 16 * 16 + 16


@pytest.mark.parametrize(
    ("accs", "reference", "tol", "expected"),
    [
        ([0.70, 0.85, 0.90, 0.91], 0.91, 0.005, 3),
        ([0.70, 0.85, 0.907, 0.91], 0.91, 0.005, 2),
        ([0.70, 0.92, 0.90, 0.91], 0.91, 0.005, 1),  # a smaller rung may beat the full network
        ([0.50, 0.60], 0.91, 0.005, None),
    ],
)
def test_smallest_sufficient_partition(accs, reference, tol, expected):
    assert smallest_sufficient(accs, reference, tol) == expected


def test_stage_lengths_may_differ_per_stage():
    from training.train_cnn import stage_lengths

    assert stage_lengths(100, 4, None) == [25, 25, 25, 25]
    assert stage_lengths(100, 3, 0.6) == [20, 20, 60]
    x, y = blobs()
    history = make_trainer(tiny_net(), x, y, init="random", stage_steps=[5, 15, 0], total_steps=30).run()
    assert [j["step"] for j in history.joins] == [5, 20]
