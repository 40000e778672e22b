"""`train cnn` end to end through register() on a generated Fashion-MNIST folder."""

import argparse
import json

import numpy as np
import pytest

from tests.test_training_data import write_idx
from training.cli import register


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def parse(argv):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_register_adds_train_and_eval_commands():
    assert parse(["eval", "drafters", "--json"]).json
    args = parse(["train", "drafters", "--partition-layers", "1", "2", "--steps", "7"])
    assert args.partition_layers == [1, 2] and args.steps == 7
    with pytest.raises(SystemExit):
        parse(["train", "gpt5"])


def test_train_cnn_runs_all_three_methods_and_writes_results(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "fmnist"
    data.mkdir()
    for split, n in (("train", 256), ("t10k", 64)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28)) + labels[:, None, None] * 19  # brightness encodes the class
        write_idx(data / f"{split}-images-idx3-ubyte", images, compress=True)
        write_idx(data / f"{split}-labels-idx1-ubyte", labels, compress=True)
    args = parse(["train", "cnn", "--fashion-dir", str(data), "--networks", "resnet20", "--steps", "12",
                  "--lookahead-steps", "2", "--width", "0.25", "--batch-size", "32", "--out", str(tmp_path / "out"),
                  "--img-dir", str(tmp_path / "img"), "--test-samples", "64"])
    assert args.handler(args) == 0
    rows = json.loads((tmp_path / "out" / "summary-fashion-mnist.json").read_text())
    assert [r["method"] for r in rows] == ["baseline", "incremental-random", "incremental-lookahead"]
    assert all(len(r["rung_acc"]) == 3 and 0 <= r["final_acc"] <= 1 for r in rows)
    assert (tmp_path / "img" / "cnn-resnet20-fashion-mnist.png").stat().st_size > 1000
