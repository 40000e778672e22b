"""The benchmark harness on real sockets and tiny models: its pieces measure what they claim, and
a whole `sled bench` run finds every method's output identical to the target decoding alone."""

import asyncio
import json
import time

import pytest
import torch

from bench.central import BatchedDrafter, run_central
from bench.linkproxy import DelayProxy
from bench.netns import unavailable_reason
from bench.profiles import PROFILES, DrafterChoice, Setup, with_overrides
from bench.run import BenchOptions, capacity, run_setup
from bench.sessions import SessionRecord, acceptance_model, ideal_tokens_per_round
from pipeline.models import load_causal_lm
from pipeline.protocol import Sampling
from pipeline.reference import greedy_reference
from workers.drafts import ModelDrafter, draft_generator


async def test_delay_proxy_delays_each_chunk_once_and_counts_bytes():
    async def echo(reader, writer):
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
        writer.close()

    upstream = await asyncio.start_server(echo, "127.0.0.1", 0)
    proxy = DelayProxy(f"127.0.0.1:{upstream.sockets[0].getsockname()[1]}", 0.05)
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    started = time.perf_counter()
    for i in range(5):  # five chunks in flight at once: a real link overlaps them
        writer.write(b"x" * 100)
        await writer.drain()
        await asyncio.sleep(0.005)
    got = b""
    while len(got) < 500:
        got += await asyncio.wait_for(reader.read(1024), 2)
    elapsed = time.perf_counter() - started
    writer.close()
    server.close()
    upstream.close()
    assert 0.1 <= elapsed < 0.2, elapsed  # one round trip of 2 x 50 ms (+ the 20 ms of sending), not five
    assert proxy.counts["bytes_up"] == 500 and proxy.counts["bytes_down"] == 500


def test_capacity_interpolates_at_the_slo_and_flags_a_lower_bound():
    assert capacity({1: {"tpot_p50_ms": 50}, 4: {"tpot_p50_ms": 100}, 16: {"tpot_p50_ms": 300}}, 200) == {"sessions": 10.0, "lower_bound": False}
    assert capacity({1: {"tpot_p50_ms": 50}, 4: {"tpot_p50_ms": 100}}, 200) == {"sessions": 4.0, "lower_bound": True}
    assert capacity({1: {"tpot_p50_ms": 250}}, 200)["sessions"] == 0.0
    assert ideal_tokens_per_round(0.0, 4) == 1.0
    assert ideal_tokens_per_round(1.0, 4) == 5.0
    assert abs(ideal_tokens_per_round(0.5, 2) - 1.75) < 1e-9
    # two rounds of 2-token drafts: one all accepted (3 tokens), one rejected at once (1 token)
    record = SessionRecord(0, [1], tokens=[1, 2, 3, 4])
    record.count_round(2, 2)
    record.count_round(2, 0)
    model = acceptance_model([record])
    assert model["alpha_per_position"] == round(2 / 3, 4)  # 2 accepted, 1 rejection
    a = 2 / 3
    assert model["ideal_tokens_per_round"] == round(1 + a + a * a, 3)
    assert model["tokens_per_round_vs_ideal"] == round(2 / (1 + a + a * a), 3)


def test_profile_overrides_are_checked():
    changed = with_overrides(PROFILES, ["pi5.slowdown=3", "orin.rtt_ms=10"])
    assert changed["pi5"].slowdown == 3.0 and changed["orin"].rtt_ms == 10.0
    with pytest.raises(ValueError):
        with_overrides(PROFILES, ["tablet.slowdown=2"])


def test_batched_server_drafts_equal_one_session_drafting(tiny_models):
    """The server-SD baseline drafts for many sessions in one ragged forward: the drafts must be
    the ones the drafter would make for each session alone, across rounds with rollbacks."""
    model = load_causal_lm(str(tiny_models["small"]))
    batched = BatchedDrafter(model, gamma=4)
    sessions = [SessionRecord(i, [(7 * i + 3 * j) % 250 + 1 for j in range(3 + 2 * i)]) for i in range(3)]
    single = [ModelDrafter(model) for _ in sessions]
    states = [d.new_state() for d in single]
    rng = torch.Generator().manual_seed(0)
    for round_ in range(5):
        budgets = [10 - round_] * len(sessions)
        drafts = batched.propose(sessions, budgets)
        for s, d, drafter, state, budget in zip(sessions, drafts, single, states, budgets):
            committed = s.prompt + s.tokens
            alone = drafter.propose(state, committed, min(4, budget - 1), Sampling(0.0, 1.0, 0), draft_generator(0))
            assert d == alone.tokens
            accepted = int(torch.randint(0, len(d) + 1, (1,), generator=rng))  # any verdict
            batched.commit(s, len(committed), accepted)
            drafter.commit(state, len(committed), accepted)
            s.tokens += [*d[:accepted], 5]


def test_centralized_ar_admits_a_wave_under_the_brokers_token_budget(tiny_models):
    """The AR baseline admits new sessions as SLED's broker does (broker.max_batch_tokens): the
    running rows first, then prompts while their prefill fits. Six 10-token prompts under a
    25-token budget enter two a step; with no budget all six share the first step. Either way
    the output is the target's own, and a session's TTFT counts from its arrival, not from its
    admission."""
    target = load_causal_lm(str(tiny_models["target"]))
    prompts = [[(5 * i + 7 * j) % 250 + 1 for j in range(10)] for i in range(6)]
    firsts = {}
    for budget in (0, 25):
        records = [SessionRecord(i, p) for i, p in enumerate(prompts)]
        server = run_central(target, records, 6, 4, [], max_batch_tokens=budget)
        for r, p in zip(records, prompts):
            assert r.tokens == greedy_reference(target, p, 4)
        sizes = sorted(sessions for sessions, _, _ in server["forwards"]["verify"])
        firsts[budget] = sizes[0], max(r.ttft_s for r in records) > min(r.ttft_s for r in records)
        assert all(r.start == records[0].start for r in records)  # all six arrived at once
    assert firsts[0][0] == 6
    # steps of 2, 4 and 6 sessions: each admits two prompts (20 tokens) beside the running rows
    assert firsts[25] == (2, True)


def test_centralized_clients_cross_the_same_links_as_sleds(tiny_models):
    """With each session's client link (the round trip of the device class SLED serves it on), a
    closed loop's next session reaches the server a round trip after its predecessor's last step:
    its request starts when the last token reaches the client, and its TTFT, counted there,
    includes the round trip. The output is still the target's own."""
    target = load_causal_lm(str(tiny_models["target"]))
    prompts = [[(5 * i + 7 * j) % 250 + 1 for j in range(6)] for i in range(4)]
    rtt = {0: 0.2, 1: 0.2, 2: 0.1, 3: 0.1}
    records = [SessionRecord(i, p) for i, p in enumerate(prompts)]
    run_central(target, records, 2, 3, [], link_rtt_s=rtt)
    for r, p in zip(records, prompts):
        assert r.tokens == greedy_reference(target, p, 3)
        assert r.ttft_s >= rtt[r.index]  # the request's half a round trip and the first token's
    # sessions 2 and 3 take the slots of 0 and 1: each starts as its predecessor's last token arrives
    assert sorted(r.start for r in records[2:]) == pytest.approx(sorted(r.end for r in records[:2]))
    bare = [SessionRecord(i, p) for i, p in enumerate(prompts)]
    run_central(target, bare, 2, 3, [])
    assert max(r.ttft_s for r in bare[:2]) < min(r.ttft_s for r in records[:2])


@pytest.mark.timeout(360)
def test_bench_run_on_tiny_models_is_lossless_for_every_method(tiny_models, tmp_path):
    small, copy = str(tiny_models["small"]), str(tiny_models["copy"])
    setup = Setup("tiny", str(tiny_models["target"]),
                  drafters={"pi5": DrafterChoice(small, 3), "orin": DrafterChoice(copy, 4), "ngram": DrafterChoice("ngram", 4)},
                  server_drafter=DrafterChoice(copy, 4), prompts="chat")
    network = "loopback" if unavailable_reason() else "netns"
    table = tmp_path / "gpu_cost_test.json"  # a synthetic table for the tiny target's shape (and twice as deep)
    table.write_text(json.dumps(_synthetic_table()))
    cpu_table = tmp_path / "cpu_cost_test.json"  # the same prices under the verifier's backend, as a CPU table
    cpu_table.write_text(json.dumps(_synthetic_table(backend="static", card="cpu (test)")))
    options = BenchOptions(levels=[1, 3], max_new_tokens=12, min_sessions=3, assisted_sessions=2, ratio_level=3,
                           loopback_levels=[3], gpu_priced_levels=[3], network=network, workdir=tmp_path,
                           gpu_cost=str(table), cpu_cost=str(cpu_table))
    prompts = [[(5 * i + 7 * j) % 250 + 1 for j in range(4 + i)] for i in range(6)]
    result = run_setup(setup, options, prompts=prompts, stop_ids=[])
    assert result["all_identical"], result["identical_outputs"]
    methods = result["methods"]
    assert set(methods) == {"ar", "server_sd", "sled", "sled_fixed", "sled_loopback", "sled_gpu_priced", "assisted"}
    sled = methods["sled"]["3"]
    # the replayed drafts are the real ones: the target's copy is accepted every time
    assert sled["by_device"]["orin"]["acceptance_rate"] == 1.0
    # at fixed gamma that is gamma + 1 tokens a round but for the budget's tail; adaptive SLED may
    # draft shorter when its verdicts say rows are dear (timing-dependent), so only fixed is pinned
    fixed = methods["sled_fixed"]["3"]["by_device"]["orin"]
    assert fixed["acceptance_rate"] == 1.0 and fixed["tokens_per_round"] > 2
    assert methods["server_sd"]["3"]["acceptance_rate"] == 1.0
    assert methods["ar"]["3"]["tokens_per_round"] == 1.0
    assert "alpha_per_position" in sled
    assert 0 < sled["tokens_per_round_vs_ideal"]
    for figures in (sled, methods["ar"]["3"], methods["server_sd"]["3"]):
        assert figures["server_cpu_ms_per_token"] > 0 and figures["generated_tokens"] == 3 * 12
    if network == "netns":
        assert sled["network_bytes_per_token"] > 0
    assert result["headline"]["all_outputs_identical"] is True
    assert "server_cost_ratio_vs_ar" in result["headline"]
    # every forward was recorded, prefill apart, and priced with the table
    for method in ("ar", "server_sd", "sled"):
        figures = methods[method]["3"]
        verify = figures["forwards"]["verify"]
        forwards = sum(n for _, _, n in verify) + figures["forwards"]["prefill"]["forwards"]
        assert abs(forwards - figures["target_forwards_per_token"] * 36) < 0.5
        assert 1 <= figures["forwards"]["prefill"]["forwards"] <= 3  # three histories, batched when they arrive together
        assert all(rows >= sessions for sessions, rows, _ in verify)
        assert figures["gpu_projection"]["gpu_server_ms_per_token"] > 0
    assert all(rows == sessions for sessions, rows, _ in methods["ar"]["3"]["forwards"]["verify"])
    assert methods["server_sd"]["3"]["forwards"]["draft"] and methods["server_sd"]["3"]["gpu_projection"]["gpu_draft_ms"] > 0
    head = result["headline"]
    assert head["gpu_cost_table"] == str(table) and "gpu-test-card" in head["gpu_cost_basis"]
    for key in ("gpu_server_cost_ratio_vs_ar", "gpu_server_cost_ratio_vs_server_sd", "gpu_throughput_ratio_vs_ar",
                "gpu_priced_server_cost_ratio_vs_ar", "gpu_priced_server_cost_ratio_vs_server_sd"):
        assert head[key] > 0, key
    # SLED once more, its verifier reporting the table's prices: a row at 0.5 ms against a forward's
    # 10 ms is cheap, so the class whose drafts are always accepted drafts long, whatever this CPU's
    # prices; its forwards are projected like the others'
    priced = methods["sled_gpu_priced"]["3"]
    assert priced["by_device"]["orin"]["tokens_per_round"] > 2
    assert head["gpu_priced_server_cost_vs_ar_by_level"] == {"3": head["gpu_priced_server_cost_ratio_vs_ar"]}
    assert head["gpu_priced_tokens_per_round"] == priced["tokens_per_round"]
    # SLED ran twice: the fixed policy and the adaptive one, each with its own settings
    assert "broker.slo_tpot_ms=0.0" in result["policies"]["sled_fixed"]
    assert "drafters.bench-orin.adaptive=false" in result["policies"]["sled_fixed"]
    assert f"broker.slo_tpot_ms={result['slo_tpot_ms']}" in result["policies"]["sled"]
    assert "drafters.bench-ngram.proactive=true" in result["policies"]["sled"]
    assert set(result["capacity"]) >= {"sled", "sled_fixed"} and "capacity_ratio_adaptive_vs_fixed" in head
    assert head["capacity_lower_bound"] == sorted(m for m, c in result["capacity"].items() if c["lower_bound"])
    by_device = sled["by_device"].values()
    proposed, accepted = sum(d["proposed"] for d in by_device), sum(d["accepted"] for d in by_device)
    rounds = sum(d["rounds"] for d in by_device)
    assert head["wasted_verify_rows_fraction"] == round((proposed - accepted) / (rounds + proposed), 4)
    assert head["plain_rounds_fraction"] == round(sum(d["plain_rounds"] for d in by_device) / rounds, 4)
    assert head["ahead_rounds_fraction"] == round(sum(d["ahead_rounds"] for d in by_device) / rounds, 4)
    # every round has a draft length (0 for a plain one); these tiny drafters draft chains only
    assert all(sum(d["draft_lengths"]) == d["rounds"] and d["tree_rounds"] == 0 for d in by_device)
    assert head["sled_ttft_p99_ms"] == sled["ttft_p99_ms"] and head["sled_ttft_single_session_ms"] > 0
    ar = methods["ar"]
    assert head["ar_ttft_p99_vs_single_session"] == round(ar["3"]["ttft_p99_ms"] / ar["1"]["ttft_p50_ms"], 3)
    # the server's CPU outside its forwards (messaging, bookkeeping) is a part of its CPU time
    for figures in (sled, ar["3"]):
        assert 0 <= figures["outside_batch_cpu_ms_per_token"] < figures["server_cpu_ms_per_token"]
    assert set(head["server_cost_vs_ar_by_level"]) == set(head["gpu_server_cost_vs_ar_by_level"]) == {"1", "3"}
    assert head["sled_worse_than_ar_at"]["cpu"] == [int(n) for n, r in head["server_cost_vs_ar_by_level"].items() if r > 1]
    # the CPU table prices SLED's and AR's forwards alike (server-side SD's draft forwards it cannot)
    priced = {n: methods["sled"][n]["cpu_table_projection"]["cpu_table_server_ms_per_token"]
              / ar[n]["cpu_table_projection"]["cpu_table_server_ms_per_token"] for n in ("1", "3")}
    assert head["cpu_table_server_cost_vs_ar_by_level"] == {n: round(r, 3) for n, r in priced.items()}
    assert head["cpu_cost_table"] == str(cpu_table) and "cpu_table_projection" not in methods["server_sd"]["3"]
    assert head["sled_worse_than_ar_at"]["cpu_table"] == [int(n) for n, r in priced.items() if round(r, 3) > 1]


def _synthetic_table(backend: str = "eager", card: str = "gpu-test-card") -> dict:
    # test data, not a measurement: cost = 10 ms + 1 ms per session + 0.5 ms per row
    rows = [{"shape": shape, "backend": backend, "sessions": b, "tokens_per_session": t, "ms": k * (10 + b + 0.5 * b * t)}
            for shape, k in (("tiny", 1.0), ("tiny-deep", 2.0)) for b in (1, 4) for t in (1, 5)]
    return {"card": card, "measured": "test", "backend": backend, "dtype": "float32", "prefix_tokens": 0,
            "source": "synthetic", "rows": rows,
            "shapes": {"tiny": {"num_hidden_layers": 2, "hidden_size": 64}, "tiny-deep": {"num_hidden_layers": 4, "hidden_size": 64}}}


def test_a_cost_table_prices_every_methods_recorded_forwards_alike():
    """`python -m bench.gpu_cost RESULT --table FILE`: a recorded run's forwards at one price list;
    a method with server draft forwards is left out when the table cannot price its drafter."""
    from transformers import LlamaConfig

    from bench.gpu_cost import by_level, cost_models

    models = cost_models(_synthetic_table(), LlamaConfig(num_hidden_layers=2, hidden_size=64))
    result = {"methods": {
        "ar": {"4": {"generated_tokens": 40, "forwards": {"verify": [[4, 4, 10]], "draft": []}}},
        "sled": {"4": {"generated_tokens": 40, "forwards": {"verify": [[4, 8, 6], [3, 3, 2]], "draft": []}}},
        "server_sd": {"4": {"generated_tokens": 40, "forwards": {"verify": [[4, 20, 3]], "draft": [[4, 4, 12]]}}},
    }}
    ms = by_level(result, models)
    assert set(ms) == {"ar", "sled"}
    assert ms["ar"]["4"] == 10 * (10 + 4 + 2) / 40
    assert ms["sled"]["4"] == (6 * (10 + 4 + 4) + 2 * (10 + 3 + 1.5)) / 40


def test_the_default_cpu_table_is_the_newest_of_this_cpu(tmp_path, monkeypatch):
    """A CPU table prices forwards at the pace of the CPU it was measured on: the bench takes the
    newest table measured on this machine's CPU, and the newest of any CPU only when none was."""
    import bench.gpu_cost as gpu_cost

    monkeypatch.setattr(gpu_cost, "RESULTS", tmp_path)
    monkeypatch.setattr(gpu_cost, "cpu_identity", lambda: "Some CPU, family 26 model 2")
    for name, cpu, measured in (("cpu_cost_old.json", "Some CPU, family 26 model 2", "2026-11-01"),
                                ("cpu_cost_new.json", "Some CPU, family 25 model 17", "2026-12-01"),
                                ("cpu_cost_unnamed.json", None, "2026-12-02")):
        (tmp_path / name).write_text(json.dumps({"card": "cpu (Some CPU, 1 thread)", "cpu": cpu, "measured": measured}))
    assert gpu_cost.default_table("cpu") == tmp_path / "cpu_cost_old.json"
    table, path = gpu_cost.load_table(kind="cpu")
    assert gpu_cost.table_summary(table, path, {"error": "-"})["this_cpu"] is True
    monkeypatch.setattr(gpu_cost, "cpu_identity", lambda: "Another CPU, family 6 model 143")
    assert gpu_cost.default_table("cpu") == tmp_path / "cpu_cost_unnamed.json"
    table, path = gpu_cost.load_table(kind="cpu")
    assert gpu_cost.table_summary(table, path, {"error": "-"})["this_cpu"] is False


def test_gpu_cost_model_interpolates_in_sessions_and_rows():
    from transformers import LlamaConfig

    from bench.gpu_cost import cost_models, project

    models = cost_models(_synthetic_table(), LlamaConfig(num_hidden_layers=2, hidden_size=64),
                         LlamaConfig(num_hidden_layers=1, hidden_size=64))
    target, draft = models["target"], models["draft"]
    for sessions, rows in ((1, 1), (4, 20), (2, 6), (3, 3), (4, 12)):  # the synthetic cost is linear: exact everywhere
        assert abs(target.ms(sessions, rows) - (10 + sessions + 0.5 * rows)) < 1e-9
    assert abs(target.ms(8, 8) - 22) < 1e-9 and not target.inside(8, 8) and target.inside(2, 6)  # extrapolated
    assert draft.ms(4, 4) == target.ms(4, 4) / 2 and "1 of 2 layers" in models["draft_basis"]
    deeper = cost_models(_synthetic_table(), LlamaConfig(num_hidden_layers=2, hidden_size=64), LlamaConfig(num_hidden_layers=4, hidden_size=64))
    assert deeper["draft_basis"] == "tiny-deep"
    figures = project({"verify": [[4, 20, 2]], "draft": [[4, 4, 3]], "prefill": {"forwards": 4, "tokens": 80}}, models, 10)
    assert figures["gpu_server_ms"] == 2 * 24 + 3 * 8 and figures["prefill_forwards_not_priced"] == 4


def test_the_gpu_cost_script_times_token_trees_beside_chains_and_projects_chains_only(tmp_path):
    """bench/gpu.sh's step 0c, as its CPU smoke test: rows of the same size as chains and as trees
    (marked), and a projection that prices the chains' rows only."""
    import json
    import subprocess
    import sys

    from transformers import LlamaConfig

    from bench.gpu_cost import cost_models

    out = tmp_path / "trees.json"
    subprocess.run([sys.executable, "-m", "bench.gpu_cost_measure", "--device", "cpu", "--shapes", "tiny",
                    "--backends", "static", "--sessions", "1", "2", "--tokens", "1", "5", "--trees", "--rounds", "1",
                    "--warmup", "0", "--prefix", "16", "--threads", "1", "--no-compile", "--out", str(out)],
                   check=True, capture_output=True, timeout=120)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["sessions"], r["tokens_per_session"], r.get("tree", False)) for r in rows] == [
        (1, 1, False), (1, 5, False), (1, 5, True), (2, 1, False), (2, 5, False), (2, 5, True)]
    table = json.loads(out.read_text())
    model = cost_models(table, LlamaConfig(num_hidden_layers=2, hidden_size=64), None, backend="static")["target"]
    chain = {(r["sessions"], r["tokens_per_session"]): r["ms"] for r in rows if not r.get("tree")}
    assert abs(model.ms(2, 10) - chain[(2, 5)]) < 1e-9  # the tree row at the same point is not what it prices


def test_the_ragged_forward_benchmark_times_padded_and_packed_on_the_same_round():
    """bench/ragged_forward.py, as its CPU smoke test on a tiny model: the widths spec, both ways
    timed, and the rows each way computes."""
    from bench.ragged_forward import measure, parse_widths
    from pipeline.config import LimitsConfig
    from tests.conftest import tiny_llama
    from workers.static_verifier import StaticVerifier

    assert parse_widths("1x3+9") == [1, 1, 1, 9] and parse_widths("2x2") == [2, 2]
    verifier = StaticVerifier(tiny_llama(3), max_sessions=8, limits=LimitsConfig(), kv_cache_mb=4)
    out = measure(verifier, [1, 1, 1, 9], history=20, repeats=1)
    assert out["rows"] == 12 and out["rows_padded"] == 36 and out["padded"] > 0 and out["packed"] > 0
    assert not verifier.sessions  # the benchmark's sessions are closed again
