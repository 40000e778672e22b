"""Ragged verify rounds on the static backend: one forward over sessions whose drafts differ in
length, computed padded (every session to the longest row) and packed (the real rows only,
``StaticModel``'s ``packed``), on the same inputs. Runs in-process on the verifier's model side, no
sockets. The repeats of the two ways are interleaved, so the machine's load drifts over both
alike; the median is reported, in ms.

    OMP_NUM_THREADS=1 python -m bench.ragged_forward --widths 1x13+9 1x8+9 1x14 9x8

``--prepack`` measures every width twice: with ``nn.Linear`` as loaded, then with the weights
reordered for oneDNN (workers/packed_linear.py, ``verifier.prepack``); the ``linears`` field says which.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pipeline.config import LimitsConfig
from pipeline.models import load_causal_lm
from pipeline.protocol import Propose
from workers.packed_linear import prepack_linears
from workers.static_verifier import StaticVerifier


def parse_widths(spec: str) -> list[int]:
    """``1x13+9`` -> thirteen rows of 1 token and one of 9 (1 + its draft)."""
    widths = []
    for part in spec.split("+"):
        width, _, count = part.partition("x")
        widths += [int(width)] * int(count or 1)
    return widths


@torch.inference_mode()
def measure(verifier: StaticVerifier, widths: list[int], history: int, repeats: int) -> dict:
    """Median ms of one verify forward over rows of ``widths`` tokens, padded and packed."""
    vocab = verifier.model.config.vocab_size
    sessions = [Propose(f"r{i}", 0, history, [], history=[1 + (31 * i + j) % (vocab - 1) for j in range(history)])
                for i in range(len(widths))]
    verifier.verify_batch(sessions)  # open and prefill them
    states = [verifier.sessions[p.session_id] for p in sessions]
    items = [Propose(p.session_id, 1, state.length, [7] * (w - 1)) for p, state, w in zip(sessions, states, widths)]
    for state, width in zip(states, widths):
        verifier._reserve(state, state.length + width)
    x = verifier._inputs(states, items)
    times: dict[str, list[float]] = {"padded": [], "packed": []}
    for _ in range(repeats):
        for way, packed in (("padded", None), ("packed", x.get("packed"))):
            started = time.perf_counter()
            verifier.net(x["ids"], x["lengths"], x["table"], packed=packed)
            times[way].append(1000 * (time.perf_counter() - started))
    for p in sessions:
        verifier.close(p.session_id)
    return {way: round(statistics.median(t), 1) for way, t in times.items()} | {
        "rows": sum(widths), "rows_padded": len(widths) * max(widths)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ragged_forward", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--widths", nargs="+", default=["1x13+9", "1x8+9", "1x14", "2x14", "9x8"])
    parser.add_argument("--history", type=int, default=40, help="tokens each session holds before the round")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prepack", action="store_true", help="also measure with oneDNN-reordered linear weights")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_causal_lm(args.target)
    for linears in ("dense", "prepacked") if args.prepack else ("dense",):
        if linears == "prepacked":
            prepack_linears(model)
        verifier = StaticVerifier(model, max_sessions=64, limits=LimitsConfig(), kv_cache_mb=256)
        for spec in args.widths:
            print(json.dumps({"widths": spec, "linears": linears,
                              **measure(verifier, parse_widths(spec), args.history, args.repeats)}), flush=True)
        del verifier


if __name__ == "__main__":
    main()
