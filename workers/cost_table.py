"""A cost table's prices: what one verify forward of (sessions, token rows) costs on the device
the table was measured on (``bench/results/gpu_cost_<card>.json``, bench/gpu_cost_measure.py).

The benchmark prices the forwards a run recorded with it (bench/gpu_cost.py). The verifier can
also report it instead of its own compute (``verifier.cost_table``): the broker then fits its row
and round prices (brokers/estimator.py) to the table's device, and every drafter's adaptive policy
(workers/speculation.py) chooses its drafts as it would against that server. A CPU verifier that
reports a GPU's prices serves at the CPU's pace but drafts as on the GPU, which is what a GPU
projection of SLED has to replay: the drafts a CPU's prices call for (short ones: a row costs a
good part of a forward here) are not the drafts a GPU server would get.

cost(sessions, rows) interpolates linearly in tokens per session (rows / sessions) between the
measured token counts of each measured session count, then linearly in sessions; outside the
measured range it extrapolates from the two nearest points (never below 0).
"""

from __future__ import annotations

import json
from bisect import bisect_left
from pathlib import Path


def line(points: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear through sorted points, extended linearly past both ends."""
    if len(points) == 1:
        return points[0][1]
    i = min(max(bisect_left([p[0] for p in points], x), 1), len(points) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


class CostModel:
    """ms per forward of one shape under one backend."""

    def __init__(self, table: dict, shape: str, backend: str, scale: float = 1.0):
        rows = [r for r in table["rows"] if r["shape"] == shape and r["backend"] == backend and not r.get("tree")]
        if not rows:
            raise KeyError(f"the cost table has no {shape!r} rows for backend {backend!r}")
        self.shape, self.backend, self.scale = shape, backend, scale
        self.grid: dict[int, list[tuple[float, float]]] = {}
        for r in rows:
            self.grid.setdefault(r["sessions"], []).append((r["tokens_per_session"], r["ms"]))
        for points in self.grid.values():
            points.sort()
        self.sessions = sorted(self.grid)

    def ms(self, sessions: int, rows: int) -> float:
        per_session = rows / sessions
        across = [(s, line(self.grid[s], per_session)) for s in self.sessions]
        return max(0.0, self.scale * line(across, sessions))

    def inside(self, sessions: int, rows: int) -> bool:
        tokens = [t for points in self.grid.values() for t, _ in points]
        return self.sessions[0] <= sessions <= self.sessions[-1] and min(tokens) <= rows / sessions <= max(tokens)


def match_shape(table: dict, config) -> str | None:
    """The table's shape with ``config``'s layer count and hidden size (a transformers config)."""
    for name, shape in table.get("shapes", {}).items():
        if (shape["num_hidden_layers"], shape["hidden_size"]) == (config.num_hidden_layers, config.hidden_size):
            return name
    return None


def target_prices(path: str | Path, config) -> CostModel:
    """The verify prices of the target (``config``) in the cost table at ``path``, under the
    table's own backend. Raises ValueError when the table holds no such shape."""
    table = json.loads(Path(path).read_text())
    shape = match_shape(table, config)
    if shape is None:
        raise ValueError(f"{path} has no shape with {config.num_hidden_layers} layers and hidden size "
                         f"{config.hidden_size} ({', '.join(table.get('shapes', {}))})")
    return CostModel(table, shape, table.get("backend", "eager"))
