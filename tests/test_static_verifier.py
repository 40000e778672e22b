"""The static backend (workers/static_verifier.py, compile off): its forward equals transformers'
at every layer count, its logits equal the eager backend's on a ragged batch (padded, and packed:
the real rows only), greedy SLED through it is token-identical to the target alone (Llama and
Qwen2), sampling keeps the target's distribution, and the page pool is reused, evicts and
refuses as documented."""

import asyncio
import random
import time

import pytest
import torch
from structlog.testing import capture_logs
from transformers import Qwen2Config, Qwen2ForCausalLM

import tests.test_target as target_tests
from pipeline.config import LimitsConfig, load_config
from pipeline.protocol import ErrorCode, Propose, Sampling
from pipeline.reference import greedy_reference
from tests.conftest import TINY_VOCAB, tiny_gpt2, tiny_llama
from workers.static_model import PagedKV, StaticModel
from workers.static_verifier import StaticVerifier, make_verifier
from workers.target import TargetVerifier, ragged_forward


def tiny_qwen2(seed: int, layers: int = 2) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=None, bos_token_id=None, pad_token_id=0)
    return Qwen2ForCausalLM(config).eval()


def static(model, max_sessions=64, kv_cache_mb=8.0, **limits):
    return StaticVerifier(model, max_sessions=max_sessions, limits=LimitsConfig(**limits), kv_cache_mb=kv_cache_mb)


BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2}


@pytest.mark.parametrize("arch", list(BUILDERS))
@pytest.mark.parametrize("layers", [1, 2, 3])
@torch.inference_mode()
def test_forward_equals_transformers_at_every_layer_count(arch, layers):
    model = BUILDERS[arch](5, layers=layers)
    ids = torch.randint(0, TINY_VOCAB, (1, 41), generator=torch.Generator().manual_seed(layers))
    ref = model(ids, output_hidden_states=True)
    kv = PagedKV(model.config, pages=8, page_size=16, dtype=torch.float32, device="cpu")
    net = StaticModel(model, kv)
    table = torch.tensor([[6, 2, 4, kv.spare]])  # pages out of order: the block table decides
    first, _ = net(ids[:, :30], torch.tensor([0]), table)
    layers_asked = tuple(range(layers + 1)) + (-1,)
    rest, hidden = net(ids[:, 30:], torch.tensor([30]), table, hidden_layers=layers_asked)
    torch.testing.assert_close(torch.cat([first, rest], 1), ref.logits, atol=1e-5, rtol=1e-4)
    for row, index in enumerate(layers_asked):
        torch.testing.assert_close(hidden[row, 0], ref.hidden_states[index][0, 30:], atol=1e-5, rtol=1e-4)
    kv.keys.zero_(), kv.values.zero_()
    net(ids[:, :30], torch.tensor([0]), table, logits=False)
    _, picked = net(ids[:, 30:], torch.tensor([30]), table, hidden_layers=(-1,), hidden_rows=torch.tensor([0, 4]))
    torch.testing.assert_close(picked[0], ref.hidden_states[-1][0, [30, 34]], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", list(BUILDERS))
@torch.inference_mode()
def test_logits_equal_the_eager_backends_on_a_ragged_batch(arch):
    model = BUILDERS[arch](6)
    rng = random.Random(0)
    histories = [[rng.randrange(TINY_VOCAB) for _ in range(n)] for n in (1, 7, 23, 40)]
    drafts = [[rng.randrange(TINY_VOCAB) for _ in range(g)] for g in (4, 0, 2, 4)]
    eager = TargetVerifier(model, max_sessions=8, limits=LimitsConfig())
    fast = static(model)
    eager_states, fast_states = ([ver._open(Propose(f"s{i}", 0, len(h), [], history=h)) for i, h in enumerate(histories)]
                                 for ver in (eager, fast))
    for state, h in zip(fast_states, histories):
        fast._reserve(state, len(h) + 4)
    for ver, states in ((eager, eager_states), (fast, fast_states)):
        ver._prefill([(state, h[:-1], []) for state, h in zip(states, histories)])
    rows = [[h[-1], *d] for h, d in zip(histories, drafts)]
    want = ragged_forward(model, "cpu", [s.kv for s in eager_states], rows)[0]
    x = fast._inputs(fast_states, [Propose(f"s{i}", 0, len(h), d) for i, (h, d) in enumerate(zip(histories, drafts))])
    got, _ = fast.net(x["ids"], x["lengths"], x["table"])
    # uncompiled, the verifier computes the real rows only (14 of the 20 padded places here)
    assert x["packed"].tolist() == [0, 1, 2, 3, 4, 5, 10, 11, 12, 15, 16, 17, 18, 19]
    packed, hidden = fast.net(x["ids"], x["lengths"], x["table"], packed=x["packed"], hidden_layers=(-1,))
    for i, row in enumerate(rows):
        torch.testing.assert_close(got[i, : len(row)], want[i, : len(row)], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(packed[i, : len(row)], want[i, : len(row)], atol=1e-5, rtol=1e-4)
        assert not packed[i, len(row):].any() and not hidden[0, i, len(row):].any()


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_greedy_through_the_static_backend_equals_the_target_alone(arch):
    model = BUILDERS[arch](1)
    rng = random.Random(0)
    prompts = [[rng.randrange(TINY_VOCAB) for _ in range(rng.randint(1, 20))] for _ in range(10)]
    refs = [greedy_reference(model, p, 40) for p in prompts]
    ver = static(model)
    outputs, rounds = target_tests.run_greedy(ver, prompts, refs, 40, rng)
    assert outputs == refs
    assert ver.stats.verify_tokens == ver.stats.items + ver.stats.draft_tokens
    assert ver.stats.target_tokens == ver.stats.prefill_tokens + ver.stats.verify_tokens > ver.stats.verify_tokens
    # every committed token is in the pool exactly once, in as few pages as it needs
    for state in ver.sessions.values():
        assert len(state.pages) == ver.kv.pages_for(state.length) and state.length == state.committed - 1


@pytest.mark.parametrize("kind", ["model", "ngram", "feature"])
def test_sampling_through_the_static_backend_keeps_the_sequence_distribution(monkeypatch, kind):
    monkeypatch.setattr(target_tests, "verifier", lambda model, max_sessions=64: static(model, max_sessions, 2.0))
    target_tests.test_sampling_through_drafters_keeps_the_sequence_distribution(kind)


def test_pages_are_reused_and_a_full_pool_evicts_idle_sessions_first():
    model = tiny_llama(1)
    per_token = 2 * 2 * 2 * 16 * 4  # layers x (k, v) x kv heads x head dim x fp32
    ver = static(model, kv_cache_mb=4 * 16 * per_token / 2**20, max_history_tokens=40,  # 4 pages of 16 tokens
                 max_draft_tokens=16)
    assert ver.kv.pages == 4
    ver.verify_batch([Propose("a", 0, 30, [], history=list(range(1, 31)))])  # 29 cached -> 2 pages, then 30
    assert len(ver.sessions["a"].pages) == 2 and len(ver.kv.free) == 2
    ver.verify_batch([Propose("b", 0, 20, [], history=list(range(1, 21)))])
    assert len(ver.kv.free) == 0
    # c needs 2 pages: a (least recently used, not in this round) is evicted
    verdict = ver.verify_batch([Propose("c", 0, 20, [], history=list(range(1, 21)))])[0]
    assert not verdict.error and set(ver.sessions) == {"b", "c"} and ver.stats.evictions == 1
    # both pool-holders in one round with a third needing pages: the third is refused, retriably
    out = ver.verify_batch([Propose("b", 1, 21, []), Propose("c", 1, 21, []), Propose("d", 0, 20, [], history=[1] * 20)])
    assert [v.error for v in out] == ["", "", ErrorCode.OVERLOADED]
    assert ver.close("b") and len(ver.kv.free) == 2 and ver.stats.cache_bytes == 2 * ver.kv.page_bytes()


def test_a_full_session_table_never_evicts_a_session_of_the_same_round():
    model = tiny_llama(1)
    ver = static(model, max_sessions=2)
    ver.verify_batch([Propose("a", 0, 3, [], history=[1, 2, 3]), Propose("b", 0, 3, [], history=[4, 5, 6])])
    out = ver.verify_batch([Propose("a", 1, 4, [7]), Propose("b", 1, 4, [8]), Propose("c", 0, 3, [1], history=[3, 2, 1])])
    assert [v.error for v in out] == ["", "", ErrorCode.OVERLOADED] and set(ver.sessions) == {"a", "b"}
    assert ver.verify_batch([Propose("c", 0, 3, [1], history=[3, 2, 1])])[0].error == ""  # later: a is evicted
    assert set(ver.sessions) == {"b", "c"}


def test_errors_and_resync_match_the_eager_backend():
    model = tiny_llama(1)
    ver = static(model)
    items = [Propose("good", 0, 3, [1, 2], history=[5, 6, 7]), Propose("ghost", 0, 4, [1]),
             Propose("bad-token", 0, 2, [TINY_VOCAB + 5], history=[1, 2])]
    verdicts = ver.verify_batch(items)
    assert [v.error for v in verdicts] == ["", ErrorCode.UNKNOWN_SESSION, ErrorCode.INVALID]
    position = 3 + verdicts[0].accepted + 1
    assert ver.verify_batch([Propose("good", 1, position - 1, [])])[0].error == ErrorCode.OUT_OF_SYNC
    history = [5, 6, 7, *items[0].draft[: verdicts[0].accepted], verdicts[0].token]
    again = ver.verify_batch([Propose("good", 1, position, [], history=history)])[0]
    assert again.error == "" and again.token == greedy_reference(model, history, 1)[0]


def test_factory_picks_the_backend_and_falls_back_with_a_log_line():
    config = load_config(None, ['verifier.backend="static"', "verifier.kv_cache_mb=8.0"])
    assert type(make_verifier(tiny_llama(1), config)) is StaticVerifier
    assert type(make_verifier(tiny_qwen2(1), config)) is StaticVerifier
    with capture_logs() as logs:
        fallback = make_verifier(tiny_gpt2(1), config)
    assert type(fallback) is TargetVerifier
    assert any(e["event"] == "static_backend_unavailable" and "gpt2" in e["reason"] for e in logs)
    assert type(make_verifier(tiny_llama(1), load_config(None, ['verifier.backend="eager"']))) is TargetVerifier
    # the default backend is the static one
    assert type(make_verifier(tiny_llama(1), load_config(None, ["verifier.kv_cache_mb=8.0"]))) is StaticVerifier


def test_uncompiled_rounds_run_the_batchs_own_shape_and_compiled_ones_a_bucket():
    model = tiny_llama(1)
    ver = static(model)
    ver.verify_batch([Propose(f"s{i}", 0, 3, [], history=[1, 2, 3]) for i in range(3)])
    states = [ver.sessions[f"s{i}"] for i in range(3)]
    items = [Propose(f"s{i}", 1, 4, [5] * i) for i in range(3)]  # 1, 2 and 3 rows
    for state, item in zip(states, items):
        ver._reserve(state, state.length + 1 + len(item.draft))
    x = ver._inputs(states, items)
    assert x["ids"].shape == (3, 3) and x["table"].shape == (3, 1)  # no padding rows on a CPU
    ver.compiled = True  # a compiled forward replays one graph per bucket: 4 sessions x 3 tokens
    x = ver._inputs(states, items)
    assert x["ids"].shape == (4, 3)


def test_a_compiler_failure_falls_back_to_the_uncompiled_forward_once():
    model = tiny_llama(1)
    ver = static(model)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("backend compiler failed")

    ver.step, ver.compiled = broken, True
    history = [3, 1, 4, 1, 5]
    with capture_logs() as logs:
        verdict = ver.verify_batch([Propose("s", 0, len(history), [], history=history)])[0]
    assert verdict.error == "" and verdict.token == greedy_reference(model, history, 1)[0]
    assert ver.step is ver.net and not ver.compiled and calls == [1]
    assert [e["event"] for e in logs].count("static_compile_failed") == 1


def test_sampling_and_greedy_sessions_share_a_round():
    model = tiny_llama(3)
    ver = static(model)
    prompt = [3, 4, 5, 6]
    ref = greedy_reference(model, prompt, 6)
    items = [Propose("g", 0, 4, ref[:4], history=prompt),
             Propose("s", 0, 4, [7, 8], [[7, 9], [8]], [[0.5, 0.5], [1.0]], history=prompt, temperature=0.8, top_p=0.9, seed=3)]
    out = ver.verify_batch(items)
    assert out[0].accepted == 4 and out[0].token == ref[4] and not out[1].error
    assert 0 <= out[1].accepted <= 2 and 0 <= out[1].token < TINY_VOCAB
    assert ver.sessions["s"].sampling == Sampling(0.8, 0.9, 3)


def test_forward_log_records_each_backends_forwards_the_same():
    from workers.forward_log import ForwardLog, delta, verify_recorded

    model = tiny_llama(2)
    logs = []
    for ver in (static(model), TargetVerifier(model, max_sessions=8, limits=LimitsConfig())):
        log = ForwardLog()
        verify_recorded(ver, [Propose("a", 0, 3, [1, 2], history=[4, 5, 6]), Propose("b", 0, 1, [], history=[9]),
                              Propose("ghost", 0, 2, [1])], log)
        first = log.as_dict()
        verify_recorded(ver, [Propose("b", 1, 2, [7, 7, 7])], log)
        logs.append(log.as_dict())
        # two sessions with 3 + 1 rows (the failed one is in no forward); one prefill (b had nothing to cache)
        assert first == {"verify": [[2, 4, 1]], "draft": [], "prefill": {"forwards": 1, "tokens": 2}, "dropped": 0}
        assert delta(first, log.as_dict())["verify"] == [[1, 4, 1]]
        # the CPU time inside verify_batch, which tells the bench a worker's messaging from its forwards
        assert 0.0 < ver.stats.batch_cpu_s <= time.process_time()
    assert logs[0] == logs[1]


@torch.inference_mode()
def test_forward_traces_as_one_graph_for_compile():
    """torch.compile (CUDA graphs on a GPU) needs the forward without graph breaks; dynamo's
    eager backend checks the trace here without a C++ compiler or a GPU."""
    model = tiny_qwen2(4)
    kv = PagedKV(model.config, pages=8, page_size=16, dtype=torch.float32, device="cpu")
    net = StaticModel(model, kv)
    compiled = torch.compile(net, backend="eager", fullgraph=True, dynamic=False)
    ids, lengths, table = torch.randint(0, TINY_VOCAB, (2, 5)), torch.tensor([3, 17]), torch.tensor([[0, kv.spare], [2, 5]])
    got, _ = compiled(ids, lengths, table)
    kv.keys.zero_(), kv.values.zero_()
    want, _ = net(ids, lengths, table)
    torch.testing.assert_close(got, want)


def test_features_equal_the_eager_backends():
    """Proposals asking for the target's hidden states get the same rows from either backend:
    the history's on a (re)build, then the token fed first and each accepted draft token."""
    import numpy as np

    model = tiny_llama(7)
    ref = greedy_reference(model, [3, 1, 4, 1, 5], 8)
    rounds = [
        [Propose("a", 0, 5, ref[:3], history=[3, 1, 4, 1, 5], feature_layers=[-1]),
         Propose("b", 0, 2, [9, 9], history=[2, 7], feature_layers=[0, 2, -1]),
         Propose("c", 0, 3, [5], history=[1, 2, 3])],
    ]
    out = {}
    for name, ver in (("eager", TargetVerifier(model, max_sessions=8, limits=LimitsConfig())), ("static", static(model))):
        first = ver.verify_batch(rounds[0])
        pos = {v.session_id: it.position + v.accepted + 1 for v, it in zip(first, rounds[0])}
        second = ver.verify_batch([Propose("a", 1, pos["a"], ref[4:6], feature_layers=[-1]),
                                   Propose("b", 1, pos["b"], [1], feature_layers=[0, 2, -1])])
        out[name] = first + second
    for e, s in zip(out["eager"], out["static"]):
        assert (e.accepted, e.token, e.features_start, len(e.features)) == (s.accepted, s.token, s.features_start, len(s.features))
        np.testing.assert_allclose(np.frombuffer(s.features, np.float16), np.frombuffer(e.features, np.float16), atol=2e-3, rtol=2e-3)
    assert out["static"][0].features and out["static"][1].features and not out["static"][2].features
    assert out["static"][0].accepted == 3  # a's draft is the target's own: accepted rows carry features too


async def test_a_stack_with_the_static_backend_is_token_identical(tmp_path, tiny_models):
    """Real processes: the verifier process builds the static backend from the configuration,
    and its heartbeat statistics carry the forwards it ran."""
    from pipeline.client import DrafterClient, broker_stats
    from pipeline.models import load_causal_lm
    from tests.conftest import make_stack

    drafters = {"twin": {"kind": "model", "gamma": 4, "model": str(tiny_models["copy"])}, "ngram": {"kind": "ngram", "gamma": 3}}
    stack = make_stack(tmp_path, tiny_models["target"], drafters, verifier__backend="static", verifier__kv_cache_mb=8.0)
    rng = random.Random(3)
    prompts = [[rng.randrange(TINY_VOCAB) for _ in range(rng.randint(2, 16))] for _ in range(6)]
    async with stack:
        clients = {n: DrafterClient(stack.config.drafter(n).client) for n in drafters}
        try:
            results = await asyncio.gather(*[clients[("twin", "ngram")[i % 2]].complete(p, 24, stop_ids=[])
                                             for i, p in enumerate(prompts)])
            figures = await broker_stats(stack.config.broker.frontend)
        finally:
            for c in clients.values():
                c.close()
    target = load_causal_lm(str(tiny_models["target"]))
    assert [r.tokens for r in results] == [greedy_reference(target, p, 24) for p in prompts]
    verifier_stats = next(iter(figures["verifiers"].values()))
    assert verifier_stats["backend"] == "static"
    prefill = verifier_stats["forwards"]["prefill"]
    # six histories, prefilled together when they arrive in one batch (workers/prefill.py)
    assert verifier_stats["forwards"]["verify"] and 1 <= prefill["forwards"] <= 6
    assert prefill["tokens"] == sum(len(p) - 1 for p in prompts) and verifier_stats["prefills"] == 6
