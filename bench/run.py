"""`sled bench`: every method on the same target and prompts, at several concurrencies, in one run.

For one setup (bench/profiles.py): the target decoding alone (transformers ``generate``) gives
the reference outputs; every method's output is compared with them. Then, per concurrency
level: centralized autoregressive serving, server-side speculative decoding, SLED on the
emulated fleet twice -- ``sled_fixed`` (fixed γ, dispatch when free, no proactive drafting) and
``sled`` (the adaptive policy: γ from acceptance and row cost, proactive drafting for the model
and n-gram classes, the broker's SLO-aware batch hold at the setup's TPOT objective) -- and, as
a control, adaptive SLED over plain loopback, and transformers' assisted generation one session
at a time. Then the broker microbenchmark. Figures are derived the same
way for every method (``derive``); the result is one JSON document.
"""

from __future__ import annotations

import asyncio
import gc
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import torch

from bench.central import BatchedDrafter, run_assisted, run_central
from bench.fleet import DeviceClass, Fleet
from bench.gpu_cost import cost_models, load_table, project, table_summary
from bench.profiles import PROFILES, SERVER_WATTS_PER_CORE, DeviceProfile, Setup
from bench.sessions import SessionRecord, acceptance_model, latency_figures, plan
from bench.traces import record_trace
from pipeline.config import load_config
from pipeline.models import load_causal_lm, load_tokenizer
from pipeline.sample_prompts import SAMPLE_PROMPTS, chat_prompt_ids
from pipeline.reference import greedy_reference
from workers.drafts import ModelDrafter, ngram_drafter, target_datastore
from workers.lookup import with_lookup
from workers.packed_linear import prepack_linears, weight_bytes
from workers.static_verifier import make_verifier

log = structlog.get_logger("sled.bench")
METHODS = ("ar", "server_sd", "sled", "sled_fixed", "sled_loopback", "sled_gpu_priced", "assisted")
POLICIES = ("fixed", "adaptive")  # SLED's two passes: sled_fixed, then sled (and sled_loopback)


def policy_overrides(policy: str, classes: list[DeviceClass], slo_tpot_ms: float) -> list[str]:
    """The SLED processes' settings of one pass. ``fixed``: today's policy (fixed γ, dispatch as
    soon as the verifier is free, no proactive drafting); ``adaptive``: every class adapts γ, the
    model and n-gram classes draft proactively, and the broker holds batches against the TPOT
    objective the bench measures capacity with."""
    adaptive = policy == "adaptive"
    out = [f"broker.slo_tpot_ms={float(slo_tpot_ms) if adaptive else 0.0}"]
    for c in classes:
        out += [f"drafters.{c.name}.adaptive={str(adaptive).lower()}",
                f"drafters.{c.name}.proactive={str(adaptive and c.profile.kind in ('model', 'ngram')).lower()}"]
    return out


@dataclass
class BenchOptions:
    levels: list[int] = field(default_factory=lambda: [1, 4, 8, 16, 32])  # 8: capacity often crosses between 4 and 16
    max_new_tokens: int = 48
    min_sessions: int = 4  # sessions per level at least (level 1 runs them one after another)
    prompts: int = 12
    slo_tpot_ms: float | None = None  # None: the setup's own (bench/profiles.py)
    ratio_level: int = 16  # the concurrency the headline ratios compare at
    loopback_levels: list[int] = field(default_factory=lambda: [16])
    # adaptive SLED once more with the GPU cost table's prices in the verdicts (verifier.cost_table):
    # the drafts a GPU server's prices call for, projected onto that GPU (needs a GPU table).
    # None: every level of ``levels``; []: no such pass
    gpu_priced_levels: list[int] | None = None
    assisted_sessions: int = 4
    network: str = "netns"  # "netns" or "loopback" (no namespaces: the fleet's links are not emulated)
    profiles: dict[str, DeviceProfile] = field(default_factory=lambda: dict(PROFILES))
    threads: int = 1  # torch threads of every server (the bench process's baselines and the SLED verifier)
    broker_micro: bool = True
    gpu_cost: str | None = None  # GPU cost table for the projections; None: the newest bench/results/gpu_cost_*.json
    cpu_cost: str | None = None  # CPU cost table (the verifier alone on this CPU); None: the newest bench/results/cpu_cost_*.json
    quick: bool = False
    config_path: str | None = None
    overrides: list[str] = field(default_factory=list)  # `sled --set` items, passed to the fleet's processes
    workdir: Path | None = None


def prompt_ids(setup: Setup, tokenizer, count: int) -> list[list[int]]:
    if setup.prompts == "code":
        from bench.qwen import CODE_PROMPTS as texts
    else:
        texts = SAMPLE_PROMPTS
    return [chat_prompt_ids(tokenizer, texts[i % len(texts)]) for i in range(count)]


def load_drafter_model(choice, target):
    if choice.model.startswith("ladder:"):
        from training.ladder import load_rung

        model = load_rung(choice.model.removeprefix("ladder:"), target=target)
    else:
        model = load_causal_lm(choice.model)
    prepack_linears(model)  # as a device's drafter (drafters.NAME.prepack) and, for server-side SD, the server
    return model


def feature_strategy(choice, target):
    """The feature-conditioned drafter over the committed head (drafters/feature), which takes its
    embeddings and vocabulary rows from the target it was trained on: the default target only."""
    from workers.feature_drafter import FeatureDrafter
    from workers.feature_head import FEATURE_DIR, load_head

    head = load_head(target, FEATURE_DIR)
    head.prepack()  # as the device does (drafters.NAME.prepack)
    return FeatureDrafter(head, min_confidence=choice.min_confidence, tree_nodes=choice.tree_nodes, gamma=choice.gamma,
                          tree_depth=choice.tree_depth)


def model_strategy(choice, model, target_spec: str):
    """The drafter a device class runs: ModelDrafter, or TranslatingDrafter for a model of another
    family (its tokenizer differs from the target's)."""
    from types import SimpleNamespace

    from workers.translating_drafter import TranslatingDrafter, tokenizers_to_translate

    tokenizers = tokenizers_to_translate(SimpleNamespace(model=choice.model, translate=None), target_spec)
    if tokenizers:
        return TranslatingDrafter(model, *tokenizers, min_confidence=choice.min_confidence)
    return ModelDrafter(model, min_confidence=choice.min_confidence)


def client_links(records: list[SessionRecord], fleet: list[str], options: BenchOptions) -> dict[int, float]:
    """Each centralized session's client link round trip (s): the link of the device class SLED's
    fleet serves the same session on (``plan`` gives session i class i mod the fleet), since a
    server's users are on those links whoever drafts. Without emulated links (loopback), none."""
    if options.network != "netns" or not fleet:
        return {}
    return {r.index: options.profiles[fleet[r.index % len(fleet)]].rtt_ms / 1000 for r in records}


def cpu_cost_models(path: str | None, target_config, backend: str) -> tuple[dict | None, dict]:
    """The CPU table's cost model of the target under ``backend`` and the table's summary; None
    and a summary with its ``error`` when there is no table, or none of this target's shape and
    backend."""
    table, table_path = load_table(path, kind="cpu")
    if table is None:
        return None, {"error": "no bench/results/cpu_cost_*.json and no --cpu-cost"}
    try:
        models = cost_models(table, target_config, backend=backend)
    except KeyError as exc:
        models = {"error": str(exc)}
    summary = table_summary(table, table_path, models)
    if "error" in models:
        log.info("cpu_table_projection_unavailable", reason=models["error"])
        return None, summary
    return models, summary


def derive(method: str, records: list[SessionRecord], server: dict, *, weights_mb: float, profiles: dict,
           gpu: dict | None = None, cpu_models: dict | None = None) -> dict:
    """The figures of one method at one level, from its session records and server counters.
    ``gpu``: cost models (bench/gpu_cost.py) to project the recorded forwards onto a GPU server;
    ``cpu_models``: the same from a CPU table, the verifier alone on this machine's CPU (methods with
    server draft forwards are not priced: the table holds the target's shape only)."""
    figures = latency_figures(records, server["elapsed_s"])
    generated = max(1, figures["generated_tokens"])
    cpu = server["server_cpu_s"]
    figures.update({
        "server_cpu_s": round(cpu, 3),
        "server_cpu_ms_per_token": round(1000 * cpu / generated, 2),
        # the same without prefilling the prompts, which every method pays alike
        "decode_cpu_ms_per_token": round(1000 * (cpu - server["prefill_cpu_s"]) / generated, 2) if "prefill_cpu_s" in server else None,
        # the server's CPU time outside verify_batch: the verifier worker's messaging (SLED), the
        # baseline loop's bookkeeping (AR, server SD), per generated token
        "outside_batch_cpu_ms_per_token": round(1000 * server["outside_batch_cpu_s"] / generated, 2) if "outside_batch_cpu_s" in server else None,
        "target_forwards_per_token": round(server.get("target_forwards", 0) / generated, 3) if "target_forwards" in server else None,
        "draft_forwards_per_token": round(server.get("draft_forwards", 0) / generated, 3) if "draft_forwards" in server else None,
        "target_tokens_per_token": round(server["target_tokens"] / generated, 3) if "target_tokens" in server else None,
        "mean_batch_sessions": round(server["mean_batch_sessions"], 2) if "mean_batch_sessions" in server else None,
        "server_weights_mb": round(weights_mb, 1),
        "peak_kv_cache_mb": round(server["peak_kv_cache_mb"], 1) if server.get("peak_kv_cache_mb") is not None else None,
    })
    if "verifier_memory" in server:
        figures["verifier_peak_rss_mb"] = server["verifier_memory"]["peak_rss_mb"]
    server_j = cpu * SERVER_WATTS_PER_CORE
    device_j = sum(d["draft_s"] * profiles[name].power_w for name, d in server.get("devices", {}).items())
    figures["energy_j_per_token_estimate"] = {"server": round(server_j / generated, 4), "devices": round(device_j / generated, 4),
                                              "total": round((server_j + device_j) / generated, 4)}
    if server.get("link_bytes") is not None:
        figures["network_bytes_per_token"] = round(server["link_bytes"] / generated, 1)
    figures.update(acceptance_model(records))
    rounds, proposed = sum(r.rounds for r in records), sum(r.proposed for r in records)
    if proposed:
        # verify rows spent on draft tokens the target rejected, of all verify rows (each round
        # verifies its last committed token plus its draft)
        figures["wasted_verify_rows_fraction"] = round((proposed - sum(r.accepted for r in records)) / (rounds + proposed), 4)
    if rounds and any(r.device for r in records):
        # rounds the broker ran on its own, in bursts (drafters.NAME.burst), of all rounds
        figures["plain_rounds_fraction"] = round(sum(r.plain_rounds for r in records) / rounds, 4)
        # rounds sent ahead of their predecessor's verdict and queued at it, of all rounds
        figures["ahead_rounds_fraction"] = round(sum(r.ahead_rounds for r in records) / rounds, 4)
    if "broker_holds" in server:
        figures["broker_holds"] = server["broker_holds"]
        figures["broker_held_ms_per_batch"] = round(server["broker_held_ms"] / max(1, server.get("broker_batches", 0)), 3)
    if server.get("broker_estimator"):
        figures["broker_estimator"] = server["broker_estimator"]
    if server.get("forwards") is not None:
        figures["forwards"] = server["forwards"]
        projection = project(server["forwards"], gpu, generated) if gpu else None
        if projection:
            # the server's measured CPU time on the critical path replaced by the projected GPU time;
            # everything else (device drafting, links, broker) kept as measured
            elapsed = max(projection["gpu_server_ms"] / 1000, server["elapsed_s"] - cpu + projection["gpu_server_ms"] / 1000)
            projection["projected_throughput_tok_s"] = round(generated / elapsed, 2) if elapsed > 0 else None
            figures["gpu_projection"] = projection
        if cpu_models and not server["forwards"].get("draft"):
            figures["cpu_table_projection"] = project(server["forwards"], cpu_models, generated, prefix="cpu_table")
    return figures


def capacity(levels: dict[int, dict], slo_ms: float) -> dict:
    """The most concurrent sessions whose median time per output token stays within the SLO: the
    largest measured concurrency that meets it, interpolated linearly towards the next measured
    concurrency (which misses it). ``lower_bound``: even the largest measured one meets it."""
    points = sorted((n, f["tpot_p50_ms"]) for n, f in levels.items())
    passing = [i for i, (_, t) in enumerate(points) if t <= slo_ms]
    if not passing:
        return {"sessions": 0.0, "lower_bound": False}
    i = passing[-1]
    n0, t0 = points[i]
    if i + 1 == len(points):
        return {"sessions": float(n0), "lower_bound": True}
    n1, t1 = points[i + 1]
    return {"sessions": round(n0 + (n1 - n0) * (slo_ms - t0) / (t1 - t0), 1), "lower_bound": False}


def identical(records: list[SessionRecord], references: list[list[int]]) -> dict:
    wrong = [r.index for r in records if r.tokens != references[r.index % len(references)]]
    return {"sessions": len(records), "mismatched": len(wrong)}


async def _sled_levels(setup: Setup, options: BenchOptions, classes: list[DeviceClass], mode: str, levels: list[int],
                       prompts, references, stop_ids, workdir: Path, weights_mb: float, out: dict, check: dict,
                       gpu: dict | None = None, policy: str = "adaptive", cpu_models: dict | None = None,
                       priced_by: Path | None = None) -> None:
    """One SLED pass over ``levels``. ``priced_by``: a cost table the verifier reports its batches'
    costs from (verifier.cost_table), the ``sled_gpu_priced`` pass."""
    slo = options.slo_tpot_ms or setup.slo_tpot_ms
    # the user's own --set items come last: they may change either pass
    overrides = [f"verifier.threads={options.threads}", *setup.sled_overrides, *policy_overrides(policy, classes, slo),
                 *([f"verifier.cost_table={priced_by}"] if priced_by else []), *options.overrides]
    folder = f"{mode}-{policy}" + ("-priced" if priced_by else "")
    async with Fleet(setup.target, classes, workdir / folder, mode=mode, config_path=options.config_path,
                     extra_overrides=overrides) as fleet:
        for n in levels:
            records = plan(n, options.min_sessions, prompts, setup.fleet)
            server = await fleet.run_level(records, n, options.max_new_tokens, stop_ids)
            name = ("sled_gpu_priced" if priced_by else "sled" if policy == "adaptive" else "sled_fixed"
                    ) if mode == options.network else "sled_loopback"
            out[name][n] = derive(name, records, server, weights_mb=weights_mb, profiles=options.profiles, gpu=gpu, cpu_models=cpu_models)
            out[name][n]["by_device"] = _by_device(records)
            check[f"{name}@{n}"] = identical(records, references)
            log.info("level_done", method=name, concurrency=n, **{k: out[name][n][k] for k in ("throughput_tok_s", "tpot_p50_ms")})


def _by_device(records: list[SessionRecord]) -> dict:
    out: dict[str, dict] = {}
    for r in records:
        d = out.setdefault(r.device, {"sessions": 0, "proposed": 0, "accepted": 0, "rounds": 0, "tokens": 0,
                                      "plain_rounds": 0, "tree_rounds": 0, "ahead_rounds": 0, "draft_lengths": []})
        d["sessions"] += 1
        d["plain_rounds"] += r.plain_rounds
        d["ahead_rounds"] += r.ahead_rounds
        d["tree_rounds"] += r.tree_rounds
        lengths = d["draft_lengths"]  # rounds per draft length (a tree's: its depth), all sessions
        lengths += [0] * (len(r.draft_lengths) - len(lengths))
        for k, n in enumerate(r.draft_lengths):
            lengths[k] += n
        d["proposed"] += r.proposed
        d["accepted"] += r.accepted
        d["rounds"] += r.rounds
        d["tokens"] += len(r.tokens)
    for d in out.values():
        d["acceptance_rate"] = round(d["accepted"] / d["proposed"], 4) if d["proposed"] else None
        d["tokens_per_round"] = round(d["tokens"] / d["rounds"], 3) if d["rounds"] else None
    return out


def run_setup(setup: Setup, options: BenchOptions, prompts: list[list[int]] | None = None,
              stop_ids: list[int] | None = None) -> dict:
    """Every method on ``setup``. ``prompts``/``stop_ids`` default to the setup's prompt set through
    the target's chat template (tests pass token ids for models without a tokenizer)."""
    started = time.perf_counter()
    torch.set_num_threads(options.threads)  # the verifier's budget: the same for every method
    target = load_causal_lm(setup.target)
    weights_mb = weight_bytes(target) / 2**20
    if prompts is None:
        tokenizer = load_tokenizer(setup.target)
        prompts = prompt_ids(setup, tokenizer, options.prompts)
        stop_ids = [tokenizer.eos_token_id]
    stop_ids = list(stop_ids or [])
    log.info("references", setup=setup.name, prompts=len(prompts))
    references = [greedy_reference(target, p, options.max_new_tokens, stop_ids) for p in prompts]
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="sled-bench-"))

    # --- record each device class's drafts on the sessions it will serve ------------------------
    top = max([*options.levels, options.min_sessions])
    drafter_models: dict[str, object] = {}
    classes, recorded = [], {}
    for k, name in enumerate(setup.fleet):
        choice = setup.drafters[name]
        mine = sorted({i % len(prompts) for i in range(top) if i % len(setup.fleet) == k})
        if choice.model == "ngram":  # its context lookup is the drafter itself, not put in front of it
            strategy, kind = ngram_drafter(setup.target, 4, choice.datastore, choice.lookup_min_match), "ngram"
        elif choice.model == "feature":
            strategy, kind = feature_strategy(choice, target), "feature"
        else:
            if choice.model not in drafter_models:
                drafter_models[choice.model] = load_drafter_model(choice, target)
            strategy, kind = model_strategy(choice, drafter_models[choice.model], setup.target), "model"
        if kind != "ngram":  # lookup in front, the datastore behind (workers/lookup.py)
            store = target_datastore(choice.datastore, setup.target)
            strategy = with_lookup(strategy, min_match=choice.lookup_min_match, datastore=store)
        path = workdir / "traces" / f"{name}.msgpack"
        recorded[name] = record_trace(strategy, kind, [prompts[i] for i in mine], [references[i] for i in mine],
                                      choice.gamma, options.max_new_tokens, stop_ids, path, target=target)
        recorded[name].update(drafter=choice.model, gamma=choice.gamma, min_confidence=choice.min_confidence,
                              lookup_min_match=choice.lookup_min_match, tree_nodes=choice.tree_nodes,
                              tree_depth=choice.tree_depth, datastore=choice.datastore)
        classes.append(DeviceClass(options.profiles[name], path, choice.gamma))
        log.info("trace_recorded", device=name, **{k: round(v, 3) if isinstance(v, float) else v for k, v in recorded[name].items()})

    out: dict[str, dict] = {m: {} for m in METHODS}
    check: dict[str, dict] = {}
    sd_choice = setup.server_drafter
    if sd_choice.model not in drafter_models:
        drafter_models[sd_choice.model] = load_drafter_model(sd_choice, target)
    sd_model = drafter_models[sd_choice.model]
    sd_weights = weight_bytes(sd_model) / 2**20
    table, table_path = load_table(options.gpu_cost)
    gpu = cost_models(table, target.config, sd_model.config) if table else {"error": "no GPU cost table"}
    gpu_table = table_summary(table, table_path, gpu) if table else {"error": "no bench/results/gpu_cost_*.json and no --gpu-cost"}
    if "error" in gpu:
        log.warning("gpu_projection_unavailable", reason=gpu["error"])
        gpu = None
    # the baselines serve with the backend the fleet's verifier runs (verifier.backend, the same
    # --set items), so AR, server-side SD and SLED differ in their drafts and batching, not their
    # forward; and they admit new sessions under the same token budget (broker.max_batch_tokens)
    server_config = load_config(options.config_path, [*setup.sled_overrides, *options.overrides])
    cpu_models, cpu_table = cpu_cost_models(options.cpu_cost, target.config, server_config.verifier.backend)
    backend = None
    for n in options.levels:
        for method in ("ar", "server_sd"):
            records = plan(n, options.min_sessions, prompts, [])
            drafter = BatchedDrafter(sd_model, sd_choice.gamma, sd_choice.min_confidence) if method == "server_sd" else None
            verifier = make_verifier(target, server_config)
            backend = verifier.backend
            server = run_central(target, records, n, options.max_new_tokens, stop_ids, drafter, verifier=verifier,
                                 max_batch_tokens=server_config.broker.max_batch_tokens,
                                 link_rtt_s=client_links(records, setup.fleet, options))
            del verifier
            out[method][n] = derive(method, records, server, weights_mb=weights_mb + (sd_weights if drafter else 0.0),
                                    profiles=options.profiles, gpu=gpu, cpu_models=cpu_models)
            check[f"{method}@{n}"] = identical(records, references)
            log.info("level_done", method=method, concurrency=n, throughput=out[method][n]["throughput_tok_s"],
                     tpot_p50_ms=out[method][n]["tpot_p50_ms"])
    records = plan(1, options.assisted_sessions, prompts, [])
    server = run_assisted(target, sd_model, records, options.max_new_tokens, stop_ids)
    out["assisted"][1] = derive("assisted", records, server, weights_mb=weights_mb + sd_weights, profiles=options.profiles)
    check["assisted@1"] = identical(records, references)
    del target, drafter_models, sd_model, strategy, drafter  # the fleet's verifier loads its own copy
    gc.collect()

    timings = {"before_sled": round(time.perf_counter() - started, 1)}
    for policy in POLICIES:
        begun = time.perf_counter()
        asyncio.run(_sled_levels(setup, options, classes, options.network, options.levels, prompts, references, stop_ids,
                                 workdir, weights_mb, out, check, gpu, policy=policy, cpu_models=cpu_models))
        timings[f"sled_{policy}"] = round(time.perf_counter() - begun, 1)
    if options.loopback_levels and options.network != "loopback":
        begun = time.perf_counter()
        asyncio.run(_sled_levels(setup, options, classes, "loopback", options.loopback_levels, prompts, references,
                                 stop_ids, workdir, weights_mb, out, check, gpu, policy="adaptive", cpu_models=cpu_models))
        timings["sled_loopback"] = round(time.perf_counter() - begun, 1)
    priced_levels = options.levels if options.gpu_priced_levels is None else options.gpu_priced_levels
    if gpu is not None and priced_levels:
        begun = time.perf_counter()
        asyncio.run(_sled_levels(setup, options, classes, options.network, priced_levels, prompts, references,
                                 stop_ids, workdir, weights_mb, out, check, gpu, policy="adaptive", cpu_models=cpu_models,
                                 priced_by=table_path))
        timings["sled_gpu_priced"] = round(time.perf_counter() - begun, 1)

    slo = options.slo_tpot_ms or setup.slo_tpot_ms
    result = {
        "setup": setup.name, "slo_tpot_ms": slo, "target": setup.target,
        "drafters": {name: recorded[name] for name in setup.fleet},
        "server_drafter": {"model": sd_choice.model, "gamma": sd_choice.gamma, "min_confidence": sd_choice.min_confidence},
        "profiles": {name: options.profiles[name].__dict__ for name in setup.fleet},
        "options": {k: v for k, v in options.__dict__.items() if k not in ("profiles", "workdir")},
        "machine": {"cpus": len(__import__("os").sched_getaffinity(0)), "platform": platform.platform(),
                    "torch": torch.__version__, "torch_threads": options.threads},
        "methods": {m: {str(n): f for n, f in levels.items()} for m, levels in out.items() if levels},
        "capacity": {m: capacity(out[m], slo) for m in ("ar", "server_sd", "sled", "sled_fixed") if out[m]},
        "policies": {"sled_fixed": policy_overrides("fixed", classes, slo), "sled": policy_overrides("adaptive", classes, slo)},
        "timings_s": timings,
        "identical_outputs": check,
        "all_identical": all(c["mismatched"] == 0 for c in check.values()),
        "weights_mb": {"target": round(weights_mb, 1), "server_drafter": round(sd_weights, 1)},
        "verifier_backend": backend,
        "gpu_cost_table": gpu_table,
        "cpu_cost_table": cpu_table,
        "elapsed_s": None,
    }
    result["headline"] = headline(result, options)
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    return result


def headline(result: dict, options: BenchOptions) -> dict:
    level = str(options.ratio_level)
    methods = result["methods"]
    ar, sd, sled = (methods.get(m, {}).get(level) for m in ("ar", "server_sd", "sled"))
    out: dict = {"setup": result["setup"], "ratio_sessions": options.ratio_level, "slo_tpot_ms": result["slo_tpot_ms"]}
    if ar and sled:
        out["server_cost_ratio_vs_ar"] = round(sled["server_cpu_ms_per_token"] / ar["server_cpu_ms_per_token"], 3)
        out["throughput_ratio_vs_ar"] = round(sled["throughput_tok_s"] / ar["throughput_tok_s"], 3)
    if ar and sled:
        out["decode_cost_ratio_vs_ar"] = round(sled["decode_cpu_ms_per_token"] / ar["decode_cpu_ms_per_token"], 3)
    if sd and sled:
        out["server_cost_ratio_vs_server_sd"] = round(sled["server_cpu_ms_per_token"] / sd["server_cpu_ms_per_token"], 3)
        out["decode_cost_ratio_vs_server_sd"] = round(sled["decode_cpu_ms_per_token"] / sd["decode_cpu_ms_per_token"], 3)
    gpu = {m: (f or {}).get("gpu_projection") for m, f in (("ar", ar), ("server_sd", sd), ("sled", sled))}
    if gpu["sled"]:
        # projections for a GPU server (bench/gpu_cost.py), not measurements
        table = result.get("gpu_cost_table", {})
        out["gpu_cost_table"] = table.get("file")
        out["gpu_cost_basis"] = (f"projection from {table.get('card')} {table.get('backend')}-backend timings of "
                                 f"{table.get('target_shape')} ({table.get('dtype')}, {table.get('prefix_tokens')}-token prefix)")
        if gpu["ar"]:
            out["gpu_server_cost_ratio_vs_ar"] = round(gpu["sled"]["gpu_server_ms_per_token"] / gpu["ar"]["gpu_server_ms_per_token"], 3)
            out["gpu_throughput_ratio_vs_ar"] = round(gpu["sled"]["projected_throughput_tok_s"] / gpu["ar"]["projected_throughput_tok_s"], 3)
        if gpu["server_sd"]:
            out["gpu_server_cost_ratio_vs_server_sd"] = round(
                gpu["sled"]["gpu_server_ms_per_token"] / gpu["server_sd"]["gpu_server_ms_per_token"], 3)
        # the same projection of the pass whose drafters were told the table's prices, not this CPU's
        priced = methods.get("sled_gpu_priced", {}).get(level)
        if priced and priced.get("gpu_projection"):
            projected = priced["gpu_projection"]
            if gpu["ar"]:
                out["gpu_priced_server_cost_ratio_vs_ar"] = round(
                    projected["gpu_server_ms_per_token"] / gpu["ar"]["gpu_server_ms_per_token"], 3)
                out["gpu_priced_throughput_ratio_vs_ar"] = round(
                    projected["projected_throughput_tok_s"] / gpu["ar"]["projected_throughput_tok_s"], 3)
            if gpu["server_sd"]:
                out["gpu_priced_server_cost_ratio_vs_server_sd"] = round(
                    projected["gpu_server_ms_per_token"] / gpu["server_sd"]["gpu_server_ms_per_token"], 3)
            out["gpu_priced_tokens_per_round"] = priced["tokens_per_round"]
            out["gpu_priced_plain_rounds_fraction"] = priced.get("plain_rounds_fraction")
            devices = priced.get("by_device", {}).values()
            rounds = sum(d["rounds"] for d in devices)
            out["gpu_priced_tree_rounds_fraction"] = round(sum(d["tree_rounds"] for d in devices) / rounds, 4) if rounds else None
    elif result.get("gpu_cost_table", {}).get("error"):
        out["gpu_projection_error"] = result["gpu_cost_table"]["error"]
    caps = result["capacity"]
    if caps.get("ar", {}).get("sessions") and "sled" in caps:
        out["capacity_ratio_vs_ar"] = round(caps["sled"]["sessions"] / caps["ar"]["sessions"], 3)
    if sled:
        out["sled_tokens_per_round"] = sled["tokens_per_round"]
        out["sled_acceptance_rate"] = sled["acceptance_rate"]
        out["sled_alpha_per_position"] = sled.get("alpha_per_position")
        out["sled_tokens_per_round_vs_ideal"] = sled.get("tokens_per_round_vs_ideal")
    out.update(adaptive_headline(result, options))
    out["all_outputs_identical"] = result["all_identical"]
    return out


def adaptive_headline(result: dict, options: BenchOptions) -> dict:
    """The adaptive policy against the fixed one and against centralized AR (docs/benchmarks.md,
    "Fixed against adaptive")."""
    methods, caps, level = result["methods"], result["capacity"], str(options.ratio_level)
    sled, fixed, ar = (methods.get(m, {}) for m in ("sled", "sled_fixed", "ar"))
    out: dict = {}
    if caps.get("sled_fixed") and caps.get("sled"):
        out["capacity_adaptive_sessions"] = caps["sled"]["sessions"]
        out["capacity_fixed_sessions"] = caps["sled_fixed"]["sessions"]
        # capacity = sessions sustained within the TPOT objective (capacity() above); none for fixed: no ratio
        out["capacity_ratio_adaptive_vs_fixed"] = (round(caps["sled"]["sessions"] / caps["sled_fixed"]["sessions"], 3)
                                                   if caps["sled_fixed"]["sessions"] else None)
        # methods that met the objective even at the largest level: their capacity is a lower
        # bound, and so is a ratio with one above the line (add larger --levels to measure it)
        out["capacity_lower_bound"] = sorted(m for m, c in caps.items() if c.get("lower_bound"))
    if level in sled:
        out["wasted_verify_rows_fraction"] = sled[level].get("wasted_verify_rows_fraction")
        if level in fixed:
            out["wasted_verify_rows_fraction_fixed"] = fixed[level].get("wasted_verify_rows_fraction")
            out["server_cost_ratio_adaptive_vs_fixed"] = round(
                sled[level]["server_cpu_ms_per_token"] / fixed[level]["server_cpu_ms_per_token"], 3)
        out["plain_rounds_fraction"] = sled[level].get("plain_rounds_fraction")
        out["ahead_rounds_fraction"] = sled[level].get("ahead_rounds_fraction")
        out["sled_ttft_p99_ms"] = sled[level]["ttft_p99_ms"]
        if "1" in sled and sled["1"]["ttft_p50_ms"]:
            out["sled_ttft_single_session_ms"] = sled["1"]["ttft_p50_ms"]
            out["sled_ttft_p99_vs_single_session"] = round(sled[level]["ttft_p99_ms"] / sled["1"]["ttft_p50_ms"], 3)
        # the same ratio for centralized AR: what the server's prefill of a wave of prompts costs
        # on this machine whoever drafts (on this CPU the 16 prompts' prefill alone is ~1.5 s)
        if level in ar and "1" in ar and ar["1"]["ttft_p50_ms"]:
            out["ar_ttft_p99_vs_single_session"] = round(ar[level]["ttft_p99_ms"] / ar["1"]["ttft_p50_ms"], 3)
    # server compute per token, adaptive SLED ÷ centralized AR, at every measured level (> 1: SLED is worse)
    common = sorted((n for n in sled if n in ar), key=int)
    cpu = {n: round(sled[n]["server_cpu_ms_per_token"] / ar[n]["server_cpu_ms_per_token"], 3) for n in common}
    out["server_cost_vs_ar_by_level"] = cpu
    worse = {"cpu": [int(n) for n, r in cpu.items() if r > 1.0]}
    gpu = {n: round(sled[n]["gpu_projection"]["gpu_server_ms_per_token"] / ar[n]["gpu_projection"]["gpu_server_ms_per_token"], 3)
           for n in common if sled[n].get("gpu_projection") and ar[n].get("gpu_projection")}
    if gpu:
        out["gpu_server_cost_vs_ar_by_level"] = gpu  # projections (bench/gpu_cost.py), not measurements
        worse["gpu_projected"] = [int(n) for n, r in gpu.items() if r > 1.0]
    # the same, of the pass that drafted at the GPU table's prices (sled_gpu_priced)
    priced = methods.get("sled_gpu_priced", {})
    gpu_priced = {n: round(priced[n]["gpu_projection"]["gpu_server_ms_per_token"]
                           / ar[n]["gpu_projection"]["gpu_server_ms_per_token"], 3)
                  for n in sorted(priced, key=int) if n in ar and priced[n].get("gpu_projection") and ar[n].get("gpu_projection")}
    if gpu_priced:
        out["gpu_priced_server_cost_vs_ar_by_level"] = gpu_priced
        worse["gpu_priced"] = [int(n) for n, r in gpu_priced.items() if r > 1.0]
    # the same forwards priced by the CPU table: every method at one price list, the verifier alone
    # on this CPU (the measured figures carry the emulated devices' load and the machine's drift)
    table = {n: round(sled[n]["cpu_table_projection"]["cpu_table_server_ms_per_token"]
                      / ar[n]["cpu_table_projection"]["cpu_table_server_ms_per_token"], 3)
             for n in common if sled[n].get("cpu_table_projection") and ar[n].get("cpu_table_projection")}
    if table:
        out["cpu_table_server_cost_vs_ar_by_level"] = table
        out["cpu_cost_table"] = (result.get("cpu_cost_table") or {}).get("file")
        worse["cpu_table"] = [int(n) for n, r in table.items() if r > 1.0]
    out["sled_worse_than_ar_at"] = worse
    return out
