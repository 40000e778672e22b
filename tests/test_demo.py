"""`sled demo` end to end on the real default target (SmolLM2-135M-Instruct from the packaged
GGUF): separate processes, real sockets, every output checked against transformers' own greedy
decoding of the target alone."""

import json
import subprocess
import sys

from pipeline.config import load_config
from tests.conftest import free_ports


def test_demo_is_lossless_and_batches_sessions():
    config = load_config(None, environ={})
    drafters = config.demo.drafters  # the ladder's rungs and the n-gram device class
    ports = free_ports(2 + len(drafters))
    overrides = [f'broker.frontend="tcp://127.0.0.1:{ports[0]}"', f'broker.backend="tcp://127.0.0.1:{ports[1]}"']
    overrides += [f'drafters.{name}.client="tcp://127.0.0.1:{port}"' for name, port in zip(drafters, ports[2:])]
    args = [sys.executable, "-m", "pipeline"]
    for item in overrides:
        args += ["--set", item]
    args += ["demo", "--sessions", "8", "--max-new-tokens", "24", "--json", "--verify"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["lossless"] is True and summary["mismatched_sessions"] == 0
    assert summary["sessions"] == 8
    assert summary["mean_batch_sessions"] > 1.5
    assert set(summary["acceptance_by_drafter"]) == set(drafters)
    trained = [d for d in summary["drafters"].values() if d["kind"] in ("model", "feature")]
    # the trained drafters' drafts are really accepted (per rung: tests/test_ladder_lossless.py;
    # adaptive draft length may leave a weak rung at no drafts in a short demo)
    assert sum(d["accepted"] for d in trained) > 0
    assert all(0 <= d["plain_rounds"] < d["rounds"] for d in summary["drafters"].values())  # bursts counted per class
    assert set(summary["tokens_per_round_by_drafter"]) == set(summary["wire_bytes_per_token_by_drafter"]) == set(drafters)
    for name, d in summary["drafters"].items():
        assert d["drafted_rounds"] <= d["rounds"] - d["plain_rounds"]  # a burst's rounds carry no draft
        # a round's draft came from lookup, the datastore or the model (a tree may hold a lookup branch)
        assert d["lookup_rounds"] + d["datastore_rounds"] <= d["rounds"] - d["plain_rounds"]
        assert d["tree_rounds"] <= d["rounds"] - d["plain_rounds"]
        if d["drafted_rounds"]:  # a drafted round commits at least one token, any other at most one
            assert summary["tokens_per_drafted_round_by_drafter"][name] >= summary["tokens_per_round_by_drafter"][name]
    # KV reuse: the target processes about (1 + draft) tokens per round, never the history again
    assert summary["target_tokens_per_generated"] < 6
