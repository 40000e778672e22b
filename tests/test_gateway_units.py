"""The gateway's pure parts, without a stack: request validation, text deltas with stop strings,
figures from the differences between polls, the Prometheus exposition, the `sled status` table.
The tokenizer is the real target's."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from gateway.detokenize import TextAssembler
from gateway.metrics import GatewayMetrics
from gateway.openai_api import ApiError, Limits, parse_request
import msgspec

from gateway.pipeline_stats import PipelineState, Sample, _broker_totals, record_interval
from pipeline.figures import BrokerFigures, DrafterFigures, Histogram
from pipeline.status import render
from pipeline.config import load_config
from pipeline.models import load_tokenizer

LIMITS = Limits(max_prompt_tokens=64, max_new_tokens=100, max_history_tokens=120, vocab_size=49152)
MODELS = {"pi5", "ngram", "smollm2", "sled"}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2")


def parse(tok, endpoint: str, **body):
    return parse_request(endpoint, body, tok, LIMITS, MODELS)


def test_defaults_follow_openai(tok):
    req = parse(tok, "completions", prompt="Hello")
    assert (req.max_tokens, req.temperature, req.top_p, req.stream, req.stop) == (16, 1.0, 1.0, False, [])
    assert req.prompt_ids == tok("Hello")["input_ids"]
    assert 0 <= req.seed < 2**63 and req.seed != parse(tok, "completions", prompt="Hello").seed  # random when not given
    chat = parse(tok, "chat", messages=[{"role": "user", "content": "Hi"}])
    assert chat.max_tokens == min(LIMITS.max_new_tokens, LIMITS.max_history_tokens - len(chat.prompt_ids))


def test_chat_template_roles_parts_and_limits(tok):
    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    a = parse(tok, "chat", messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": parts}],
              max_completion_tokens=7, stop="x", seed=3, stream=True, stream_options={"include_usage": True})
    b = parse(tok, "chat", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}])
    assert a.prompt_ids == b.prompt_ids
    assert (a.max_tokens, a.stop, a.seed, a.stream, a.include_usage) == (7, ["x"], 3, True, True)
    assert parse(tok, "completions", prompt=[[5, 6, 7]], model="ngram").prompt_ids == [5, 6, 7]
    with pytest.raises(ApiError) as info:
        parse(tok, "completions", prompt="hi " * 40, max_tokens=100)  # fits the prompt, not prompt + output
    assert info.value.param == "max_tokens" and "[1, " in info.value.message
    with pytest.raises(ApiError) as info:
        parse(tok, "chat", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    assert info.value.param == "messages[0].content[0]"


def test_errors_are_openai_shaped(tok):
    with pytest.raises(ApiError) as info:
        parse(tok, "completions", prompt="hi", top_p=1.5)
    assert info.value.status == 400
    assert info.value.body() == {"error": {"message": info.value.message, "type": "invalid_request_error",
                                           "param": "top_p", "code": "invalid_value"}}


class CharTokenizer:
    """One token per character: lets hypothesis cut text anywhere."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="ab c\n", max_size=30), stops=st.lists(st.text(alphabet="ab c", min_size=1, max_size=3), max_size=3),
       cuts=st.lists(st.integers(0, 30), max_size=6))
def test_text_deltas_cut_at_the_first_stop_string_however_tokens_arrive(text, stops, cuts):
    ids = [ord(c) for c in text]
    rounds, start = [], 0
    for cut in sorted(set(cuts)) + [len(ids)]:
        rounds.append(ids[start:cut])
        start = max(start, cut)
    text_out = TextAssembler(CharTokenizer(), stops)
    out = ""
    for r in rounds:
        out += text_out.feed(r)
        if text_out.stopped:
            break
    out += text_out.finish()
    # generation stops when the first stop string is complete: the one ending first (of those
    # ending there, the longest), not the one starting first, which may never be completed
    ends = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    first = min(ends)[1] if ends else -1
    assert out == (text[:first] if first >= 0 else text)
    assert text_out.stopped == (first >= 0)


def test_real_tokens_hold_back_incomplete_characters_and_skip_eos(tok):
    ids = tok("naïve café ☃ done")["input_ids"]
    text = TextAssembler(tok, stop=["done"], skip_ids={tok.eos_token_id})
    deltas = [text.feed([t]) for t in ids] + [text.feed([tok.eos_token_id]), text.finish()]
    assert "".join(deltas) == "naïve café ☃ "
    assert all("\ufffd" not in d for d in deltas) and text.stopped


def broker_snapshot(batches: list[int], waits: dict[str, list[float]], verify: list[float], **counters) -> dict:
    """A broker's StatsReply payload, built by the broker's own figure type."""
    f = BrokerFigures(**counters)
    for n in batches:
        f.batches += 1
        f.batch_sessions.observe(n)
        f.batch_rows.observe(4 * n)
    for kind, values in waits.items():
        for w in values:
            f.observe_wait(kind, w)
    for t in verify:
        f.observe_verify("verifier-0", t)
    return {**msgspec.to_builtins(f), "sessions": 2, "verifiers": {}}


def test_rates_and_history_from_the_difference_of_two_polls():
    config = load_config(None, [])
    state = PipelineState.for_config(config)
    broker0 = broker_snapshot([1, 2, 2, 3, 2], {"pi5": [0.001] * 10}, [0.1] * 5, proposals=10, verdicts=10)
    broker1 = broker_snapshot([1, 2, 2, 3, 2, 8, 4, 4, 2, 2], {"pi5": [0.001] * 10 + [0.004] * 15, "ngram": [0.002] * 5},
                              [0.1] * 10, proposals=30, verdicts=28)
    v0 = {"verifier-0": {"batches": 5, "compute_s": 1.0}}
    v1 = {"verifier-0": {"batches": 10, "compute_s": 1.5}}
    d0 = {"pi5": {"kind": "model", "requests": 1, "generated": 10, "proposed": 8, "accepted": 8, "active": 1}}
    d1 = {"pi5": {"kind": "model", "requests": 2, "generated": 30, "proposed": 24, "accepted": 20, "active": 2}}
    state.broker = broker1
    record_interval(state, Sample(0.0, _broker_totals(broker0), d0, v0), Sample(2.0, _broker_totals(broker1), d1, v1))
    point = state.history[-1]
    assert state.proposals_per_s == 10 and state.tokens_per_s == 10
    assert point["batch_sessions"] == pytest.approx((8 + 4 + 4 + 2 + 2) / 5)  # this interval's 5 batches only
    assert point["queue_wait_ms"] == pytest.approx((15 * 4 + 5 * 2) / 20)  # both classes' 20 new waits
    assert point["kinds"] == {"model": [16, 12]} and point["verifiers"]["verifier-0"]["utilization"] == 0.25
    restarted = broker_snapshot([1], {}, [], proposals=1)
    record_interval(state, Sample(2.0, _broker_totals(broker1), d1, v1), Sample(3.0, _broker_totals(restarted), d1, v1))
    assert len(state.history) == 1  # a broker restart records nothing


def test_histogram_buckets_are_prometheus_le_buckets():
    h = Histogram([1.0, 2.0, 4.0])
    for x in (1, 1, 1, 3, 3, 9):
        h.observe(x)
    assert h.cumulative() == [("1.0", 3), ("2.0", 3), ("4.0", 5), ("+Inf", 6)]  # le: a value on a bound counts in it
    assert (h.count, h.sum, h.mean) == (6, 18, 3)


def test_exposition_parses_before_and_after_figures_arrive():
    config = load_config(None, [])
    state = PipelineState.for_config(config)
    metrics = GatewayMetrics(state)
    names = {f.name for f in text_string_to_metric_families(metrics.exposition().decode())}
    assert {"sled_broker_up", "sled_gateway_requests", "sled_batch_sessions", "sled_drafter_up"} <= names
    state.broker_up = True
    state.broker = {**broker_snapshot([1, 3, 3], {"pi5": [0.0007, 0.002], "feature": [0.03]}, [0.05, 0.05, 0.2],
                                      proposals=3, rejected={"overloaded": 2}),
                    "verifiers": {"verifier-0": {"sessions": 1, "batches": 2, "compute_s": 0.1}}}
    state.drafters["pi5"].up = True
    state.drafters["pi5"].stats = {"active": 1, "proposed": 4, "accepted": 3, "acceptance_rate": 0.75, "generated": 5}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(metrics.exposition().decode()) for s in f.samples}
    assert samples[("sled_broker_rejected_total", (("code", "overloaded"),))] == 2
    assert samples[("sled_acceptance_rate", (("kind", "model"),))] == 0.75
    assert samples[("sled_verifier_sessions", (("verifier", "verifier-0"),))] == 1
    # the broker's histograms bucket for bucket: not a poll's mean counted n times
    assert samples[("sled_batch_sessions_bucket", (("le", "1.0"),))] == 1
    assert samples[("sled_batch_sessions_bucket", (("le", "2.0"),))] == 1
    assert samples[("sled_batch_sessions_bucket", (("le", "4.0"),))] == 3
    assert samples[("sled_batch_sessions_sum", ())] == 7
    assert samples[("sled_queue_wait_seconds_bucket", (("drafter_kind", "pi5"), ("le", "0.001")))] == 1
    assert samples[("sled_queue_wait_seconds_count", (("drafter_kind", "feature"),))] == 1
    assert samples[("sled_verify_batch_seconds_bucket", (("le", "0.05"), ("verifier", "verifier-0")))] == 2
    assert samples[("sled_verify_batch_seconds_count", (("verifier", "verifier-0"),))] == 3


def test_status_table_names_a_broker_that_does_not_answer():
    config = load_config(None, [])
    text = render(config, {"broker": None, "drafters": {"pi5": {"kind": "model", "gamma": 4, "active": 2, "requests": 3,
                                                                 "generated": 40, "proposed": 10, "accepted": 5},
                                                         "ngram": None}})
    assert "NOT ANSWERING" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
    assert rows["pi5"][-1] == "50.0%" and rows["ngram"][3] == "down"


async def test_app_without_a_pipeline_answers_health_auth_and_not_ready(tok):
    """The app in-process, its broker and drafters absent: alive, not ready, keys enforced, 503 for a
    drafter that does not answer, and the Prometheus page still parses."""
    from aiohttp.test_utils import TestClient, TestServer

    from gateway.routes import create_app
    from tests.conftest import free_ports

    ports = free_ports(3)
    config = load_config(None, [f'broker.frontend="tcp://127.0.0.1:{ports[0]}"',
                                f'drafters.pi5.client="tcp://127.0.0.1:{ports[1]}"',
                                f'drafters.ngram.client="tcp://127.0.0.1:{ports[2]}"',
                                'gateway.api_keys=["sekrit"]', "gateway.stats_interval_s=0.5"])
    async with TestClient(TestServer(create_app(config, tok))) as client:
        assert (await client.get("/health")).status == 200
        r = await client.get("/ready")
        assert r.status == 503 and r.headers["Retry-After"] and (await r.json())["broker"] is False
        r = await client.post("/v1/completions", json={"prompt": "hi"})
        assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_api_key"
        auth = {"Authorization": "Bearer sekrit"}
        r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=auth)
        assert r.status == 503 and int(r.headers["Retry-After"]) >= 1
        assert (await r.json())["error"]["code"] == "drafter_unavailable"
        r = await client.post("/v1/chat/completions", json={"messages": "hi"}, headers=auth)
        assert r.status == 400 and (await r.json())["error"]["param"] == "messages"
        models = (await (await client.get("/v1/models", headers=auth)).json())["data"]
        assert {m["id"] for m in models} >= {"smollm2", "pi5", "ngram"}
        text = await (await client.get("/metrics")).text()
        samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}
        assert samples["sled_broker_up"] == 0
        page = await client.get("/")
        assert page.status == 200 and "status.js" in await page.text()
        assert (await client.get("/static/status.js")).status == 200


async def test_ready_means_a_request_without_model_would_be_served(tok):
    """/ready turns 200 only once the default drafter answers too, not as soon as a verifier is
    registered: on a fresh `sled up` the first request after /ready used to get 503
    drafter_unavailable while the default drafter was still loading its model."""
    from aiohttp.test_utils import TestClient, TestServer

    import asyncio

    import zmq
    import zmq.asyncio

    from brokers.broker import Broker
    from gateway.routes import GATEWAY, create_app
    from pipeline.protocol import Ready, StatsReply
    from tests.conftest import free_ports

    ports = free_ports(4)
    config = load_config(None, [f'broker.frontend="tcp://127.0.0.1:{ports[0]}"',
                                f'broker.backend="tcp://127.0.0.1:{ports[1]}"',
                                f'drafters.pi5.client="tcp://127.0.0.1:{ports[2]}"',
                                f'drafters.ngram.client="tcp://127.0.0.1:{ports[3]}"', "gateway.stats_interval_s=0.2"])
    ctx = zmq.asyncio.Context()
    stop = asyncio.Event()
    broker = asyncio.create_task(Broker(config, ctx).run(stop))
    verifier = ctx.socket(zmq.DEALER)
    verifier.linger = 0
    verifier.connect(config.broker.backend)
    await verifier.send(Ready().encode())  # a verifier is registered from here on
    drafter = None
    try:
        async with TestClient(TestServer(create_app(config, tok))) as client:
            default = client.server.app[GATEWAY].default_drafter
            await asyncio.sleep(0.5)
            r = await client.get("/ready")
            body = await r.json()
            assert body["verifiers"], body  # the broker and a verifier are there ...
            assert r.status == 503 and r.headers["Retry-After"], body  # ... but the default drafter is not
            # the default drafter comes up (a stand-in that answers its stats requests)
            drafter = ctx.socket(zmq.ROUTER)
            drafter.linger = 0
            drafter.bind(config.drafter(default).client)

            async def answer_stats():
                while True:
                    identity, *_ = await drafter.recv_multipart()
                    await drafter.send_multipart([identity, StatsReply(drafter=DrafterFigures(kind="model", gamma=4)).encode()])

            answering = asyncio.create_task(answer_stats())
            try:
                for _ in range(50):
                    r = await client.get("/ready")
                    if r.status == 200:
                        break
                    await asyncio.sleep(0.1)
                assert r.status == 200, await r.json()
            finally:
                answering.cancel()
    finally:
        stop.set()
        await asyncio.wait_for(broker, 5)
        verifier.close(0)
        if drafter is not None:
            drafter.close(0)
        ctx.term()
