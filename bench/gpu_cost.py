"""Project a method's server time onto a GPU from the forwards it ran and a measured cost table.

A cost table (``bench/results/gpu_cost_<card>.json``, written by bench/gpu_cost_measure.py on a
GPU, or transcribed from earlier measurements with its source named) holds, per model shape and
verifier backend, the milliseconds of one forward of ``sessions`` sessions with
``tokens_per_session`` new tokens each over a cached prefix. ``sled bench`` records every
forward a method ran as (sessions, token rows) (workers/forward_log.py); the projection prices
each one and sums:

* cost(sessions, rows) interpolates in the table (workers/cost_table.py, which the verifier
  shares for ``verifier.cost_table``).
* The target's shape is the table's shape with the same layer count and hidden size. A server
  drafter (server-side SD) without its own shape in the table is priced as the target's forward
  scaled by its share of the target's layers: eager GPU forwards at these sizes are bound by
  per-layer launch overhead, so cost grows with depth; it is an estimate and says so.
* Prefill is left out (every method prefills the same prompts); its forwards are counted.

A CPU table (``bench/results/cpu_cost_<cpu>.json``, the same script with ``--device cpu``) prices
the same record on this machine's CPU with the verifier alone on it: every method's forwards at
one price list, measured once. The bench's measured CPU time differs from it in two ways the
methods do not share: the verifier's CPU time per forward rises when other processes run on the
machine (the emulated devices do, beside SLED's verifier; nothing does beside the in-process
baselines), and the machine's pace drifts between the runs of different methods (centralized AR
at one session measured 53.6 and 74.5 ms a token in two runs of the same day).
``python -m bench.gpu_cost RESULT.json --table FILE`` prints a recorded run's projection.
"""

from __future__ import annotations

import json
from pathlib import Path

from workers.cost_table import CostModel, match_shape

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_fields() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ("model name", "cpu family", ...); {} where
    there is none."""
    info = Path("/proc/cpuinfo")
    fields: dict[str, str] = {}
    for line in info.read_text().splitlines() if info.exists() else []:
        if not line.strip():
            break  # the first processor's block is enough
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_identity() -> str | None:
    """This machine's CPU as a CPU table records it (``cpu``): model name, family and model from
    /proc/cpuinfo, "AMD EPYC, family 26 model 2". Two machines sold under one model name can be
    different generations: the development machine's "AMD EPYC" ran a forward twice as fast from
    one session to the next, with another shape of cost over rows (docs/benchmarks-history.md,
    session 29)."""
    fields = cpu_fields()
    if "model name" not in fields:
        return None
    return f"{fields['model name']}, family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"


def default_table(kind: str = "gpu") -> Path | None:
    """The newest committed cost table of ``kind`` (gpu, cpu): the latest ``measured`` date, then
    the file name. For a CPU table, the newest of those measured on this machine's CPU
    (``cpu_identity``) comes first: a table prices forwards at the pace of the CPU it was measured
    on, and the bench's CPU figures are this machine's."""
    here = cpu_identity() if kind == "cpu" else None
    tables = []
    for path in RESULTS.glob(f"{kind}_cost_*.json"):
        with path.open() as fh:
            table = json.load(fh)
        tables.append((here is not None and table.get("cpu") == here, table.get("measured", ""), path.name, path))
    return max(tables)[3] if tables else None


def load_table(path: str | Path | None = None, kind: str = "gpu") -> tuple[dict, Path] | tuple[None, None]:
    path = Path(path) if path else default_table(kind)
    if path is None:
        return None, None
    return json.loads(path.read_text()), path


def cost_models(table: dict, target_config, drafter_config=None, backend: str | None = None) -> dict:
    """The target's (and the server drafter's) cost models, or ``{"error": why}``."""
    backend = backend or table.get("backend", "eager")
    shape = match_shape(table, target_config)
    if shape is None:
        return {"error": f"no shape with {target_config.num_hidden_layers} layers and hidden size "
                         f"{target_config.hidden_size} in the table ({', '.join(table.get('shapes', {}))})"}
    out = {"target": CostModel(table, shape, backend)}
    if drafter_config is not None:
        own = match_shape(table, drafter_config)
        if own is not None:
            out["draft"] = CostModel(table, own, backend)
            out["draft_basis"] = own
        else:
            share = drafter_config.num_hidden_layers / target_config.num_hidden_layers
            out["draft"] = CostModel(table, shape, backend, scale=share)
            out["draft_basis"] = f"{shape} x {share:.3f} ({drafter_config.num_hidden_layers} of {target_config.num_hidden_layers} layers)"
    return out


def project(forwards: dict | None, models: dict, generated: int, prefix: str = "gpu") -> dict | None:
    """Server ms per generated token for one method at one level (decode; prefill left out), on
    the table's device; ``prefix`` names the figures (gpu_server_ms, cpu_table_server_ms ...)."""
    if not forwards or "error" in models:
        return None
    total, outside, count = 0.0, 0, 0
    parts = {}
    for kind, model in (("verify", models["target"]), ("draft", models.get("draft"))):
        ms = 0.0
        for sessions, rows, n in forwards.get(kind, []):
            if model is None:
                raise ValueError(f"{kind} forwards recorded but no cost model for them")
            ms += n * model.ms(sessions, rows)
            outside += n * (not model.inside(sessions, rows))
            count += n
        parts[kind] = ms
        total += ms
    generated = max(1, generated)
    return {
        f"{prefix}_server_ms": round(total, 2),
        f"{prefix}_server_ms_per_token": round(total / generated, 4),
        f"{prefix}_verify_ms": round(parts["verify"], 2),
        f"{prefix}_draft_ms": round(parts["draft"], 2),
        "forwards": count,
        "forwards_outside_table": outside,
        "prefill_forwards_not_priced": forwards.get("prefill", {}).get("forwards", 0),
    }


def table_summary(table: dict, path: Path, models: dict) -> dict:
    out = {"file": str(path.relative_to(RESULTS.parent.parent)) if path.is_relative_to(RESULTS.parent.parent) else str(path),
           "card": table.get("card"), "backend": table.get("backend"), "source": table.get("source"),
           "prefix_tokens": table.get("prefix_tokens"), "dtype": table.get("dtype")}
    if table.get("card", "").startswith("cpu"):  # does it price at this machine's pace?
        out["cpu"] = table.get("cpu")
        out["this_cpu"] = table.get("cpu") is not None and table.get("cpu") == cpu_identity()
    if "error" in models:
        out["error"] = models["error"]
    else:
        out["target_shape"] = models["target"].shape
        if "draft_basis" in models:
            out["server_drafter_shape"] = models["draft_basis"]
    return out


def by_level(result: dict, models: dict, prefix: str = "table") -> dict:
    """{method: {level: server ms per token}} of a recorded run priced by ``models`` (methods
    whose forwards the models can price: a server drafter needs its own)."""
    out: dict = {}
    for method, levels in result["methods"].items():
        for level, figures in levels.items():
            forwards = figures.get("forwards")
            if forwards and (not forwards.get("draft") or "draft" in models):
                p = project(forwards, models, figures["generated_tokens"], prefix)
                out.setdefault(method, {})[level] = p[f"{prefix}_server_ms_per_token"]
    return out


def main() -> int:
    import argparse

    from transformers import AutoConfig

    from pipeline.models import local_dir

    p = argparse.ArgumentParser(description="Price a recorded `sled bench` run's forwards with a cost table.")
    p.add_argument("result", help="a sled bench result JSON")
    p.add_argument("--table", help="a cost table (default: the newest committed CPU table)")
    args = p.parse_args()
    result = json.loads(Path(args.result).read_text())
    table, path = load_table(args.table, kind="cpu")
    if table is None:
        raise SystemExit("no cost table: pass --table")
    models = cost_models(table, AutoConfig.from_pretrained(local_dir(result["target"])))
    if "error" in models:
        raise SystemExit(models["error"])
    ms = by_level(result, models)
    print(f"{args.result} priced by {path} ({table.get('card')}): server ms per token")
    for level in sorted({lv for levels in ms.values() for lv in levels}, key=int):
        row = {m: ms[m][level] for m in ms if level in ms[m]}
        ratio = f"  sled / ar {row['sled'] / row['ar']:.3f}" if "sled" in row and "ar" in row else ""
        print(f"  {level:>3}: " + "  ".join(f"{m} {v:.2f}" for m, v in row.items()) + ratio)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
