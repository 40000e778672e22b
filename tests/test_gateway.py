"""The REST gateway against a running stack (broker, verifier, two drafters, gateway: separate
processes) on the real SmolLM2 target: the official `openai` client, curl-like raw HTTP, bad
input, overload, a client that disconnects, /metrics, `sled status`; greedy output compared
with the target decoding alone (transformers' own generate)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time

import aiohttp
import openai
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from pipeline.client import DrafterClient, broker_stats
from pipeline.config import load_config
from pipeline.stack import Stack
from pipeline.models import load_causal_lm, load_tokenizer
from pipeline.sample_prompts import chat_prompt_ids
from pipeline.reference import greedy_reference
from tests.conftest import free_ports, stack_overrides

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_PROMPT_TOKENS = 96  # small, so "prompt too long" is cheap to provoke
QUESTION = "What is the capital of France?"
TEXT_PROMPT = "The three primary colors are"


def gateway_overrides() -> list[str]:
    ghost_port, gateway_port = free_ports(2)
    return stack_overrides(
        "smollm2",
        # adaptive off: a seed reproduces a sampled text only under the same draft lengths
        # (docs/configuration.md, drafters.NAME.adaptive), and the test below asks for that
        {"pi5": {"kind": "model", "model": "smollm2", "gamma": 4, "proactive": True, "adaptive": False},
         "ngram": {"kind": "ngram", "gamma": 4, "max_sessions": 1}},
        broker__max_wait_ms=10.0,
        gateway__port=gateway_port,
        gateway__max_prompt_tokens=MAX_PROMPT_TOKENS,
        gateway__stats_interval_s=0.5,
        gateway__default_model="pi5",
    ) + [
        # configured but never started: requests naming it get 503 + Retry-After
        'drafters.ghost.kind="ngram"', f'drafters.ghost.client="tcp://127.0.0.1:{ghost_port}"',
    ]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory):
    overrides = gateway_overrides()
    config = load_config(None, overrides)
    s = Stack(config, None, overrides, ["pi5", "ngram"], gateway=True, log_dir=tmp_path_factory.mktemp("gateway") / "logs")
    s.overrides = overrides
    async with s:
        yield s


@pytest.fixture(scope="module")
def target():
    return load_causal_lm("smollm2"), load_tokenizer("smollm2")


def base_url(stack) -> str:
    g = stack.config.gateway
    return f"http://{g.host}:{g.port}"


_REFERENCE: dict[tuple, list[int]] = {}


def expected_text(target, prompt_ids: list[int], max_tokens: int) -> tuple[str, str]:
    """The target decoding alone (transformers' generate), as text, and its finish reason."""
    model, tok = target
    key = (tuple(prompt_ids), max_tokens)
    if key not in _REFERENCE:
        _REFERENCE[key] = greedy_reference(model, prompt_ids, max_tokens, [tok.eos_token_id])
    ids = _REFERENCE[key]
    finish = "stop" if ids and ids[-1] == tok.eos_token_id else "length"
    if finish == "stop":
        ids = ids[:-1]
    return tok.decode(ids), finish


async def metrics_snapshot(http: aiohttp.ClientSession, url: str) -> dict[tuple, float]:
    async with http.get(f"{url}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(snapshot: dict, name: str, **labels) -> float:
    want = tuple(sorted(labels.items()))
    return sum(v for (n, ls), v in snapshot.items() if n == name and set(want) <= set(ls))


async def wait_for(predicate, timeout: float = 15.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(interval)


async def test_openai_client_streams_and_not_equal_to_the_target_alone(stack, target):
    _, tok = target
    client = openai.AsyncOpenAI(base_url=base_url(stack) + "/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": QUESTION}]
    text_ids = tok(TEXT_PROMPT)["input_ids"]

    async def chat_stream():
        stream = await client.chat.completions.create(model="pi5", messages=messages, max_tokens=12, temperature=0,
                                                      stream=True, stream_options={"include_usage": True})
        return [c async for c in stream]

    async def texts():  # one after the other: the ngram drafter here takes one session at a time
        text = await client.completions.create(model="ngram", prompt=TEXT_PROMPT, max_tokens=10, temperature=0)
        stream = await client.completions.create(model="ngram", prompt=TEXT_PROMPT, max_tokens=10, temperature=0,
                                                 stream=True)
        return text, [c async for c in stream]

    try:
        chat, chunks, (text, text_chunks) = await asyncio.gather(
            client.chat.completions.create(model="pi5", messages=messages, max_tokens=12, temperature=0),
            chat_stream(),
            texts(),
        )
    finally:
        await client.close()

    want_chat, chat_finish = expected_text(target, chat_prompt_ids(tok, QUESTION), 12)
    want_text, text_finish = expected_text(target, text_ids, 10)
    assert chat.choices[0].message.content == want_chat
    assert chat.choices[0].finish_reason == chat_finish
    assert chat.usage.prompt_tokens == len(chat_prompt_ids(tok, QUESTION))
    assert chat.model_extra["sled"]["drafter"] == "pi5"
    assert chat.model_extra["sled"]["acceptance_rate"] == 1.0  # pi5 drafts with the target itself for now
    sled = chat.model_extra["sled"]  # the per-request speculation figures
    assert sled["drafted"] == sled["proposed"] == sled["accepted"] > 0
    assert sled["rounds"] >= 1 and 0 < sled["mean_gamma"] <= 4
    assert sled["proactive_wasted"] == 0  # its guesses are the target's own tokens
    assert sled["lookup_rounds"] == 0 and sled["datastore_rounds"] == 0  # a class without lookup_min_match or datastore
    assert sled["tree_rounds"] == 0  # nor token trees
    assert sled["plain_rounds"] == 0  # every draft accepted: it never stops drafting
    assert sled["proactive_hits"] >= (1 if chat.usage.completion_tokens >= 11 else 0)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want_chat
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == chat_finish
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

    assert text.choices[0].text == want_text
    assert text.usage.completion_tokens == 10 and text.choices[0].finish_reason == "length"
    assert text.model_extra["sled"]["drafter_kind"] == "ngram"
    assert text.model_extra["sled"]["rounds"] >= 1
    assert "".join(c.choices[0].text for c in text_chunks) == want_text
    assert text_chunks[-1].choices[0].finish_reason == text_finish
    assert text_chunks[-1].model_extra["sled"]["accepted"] is not None


async def test_raw_http_stop_strings_and_seeded_sampling(stack, target):
    _, tok = target
    url = base_url(stack)
    want, _ = expected_text(target, tok(TEXT_PROMPT)["input_ids"], 10)
    stop = want.strip().split()[1]  # the second word of the greedy continuation
    cut = want.index(stop)
    body = {"prompt": TEXT_PROMPT, "max_tokens": 10, "temperature": 0, "stop": [stop, "\u2603never"]}
    sampled = {"prompt": TEXT_PROMPT, "max_tokens": 8, "temperature": 0.9, "top_p": 0.9, "seed": 5}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        async with http.post(f"{url}/v1/completions", json=body) as r:
            assert r.status == 200, await r.text()
            out = await r.json()
        runs = []
        for _ in range(2):
            async with http.post(f"{url}/v1/completions", json=sampled) as r:
                runs.append((await r.json())["choices"][0]["text"])
    assert out["object"] == "text_completion"
    assert out["choices"][0]["text"] == want[:cut]
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["sled"]["session_cancelled"] is True
    assert runs[0] == runs[1]  # a given seed samples the same text
    figures = await wait_for(lambda: _sessions_closed(stack))
    assert figures, "the stop string's session was not closed"


async def _sessions_closed(stack):
    figures = await broker_stats(stack.config.broker.frontend)
    verifiers = figures["verifiers"].values()
    done = figures["sessions"] == 0 and all(v["sessions"] == 0 and v["cache_bytes"] == 0 for v in verifiers)
    return figures if done else None


BAD_INPUTS = [  # (path, body, status, param, code)
    ("/v1/completions", {"max_tokens": 5}, 400, "prompt", "missing_required_parameter"),
    ("/v1/completions", {"prompt": 42}, 400, "prompt", "invalid_type"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"prompt": [1, 2, 10**9]}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt", "unsupported_parameter"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**6}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens", "invalid_type"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-9"}, 400, "model", "model_not_found"),
    ("/v1/completions", {"prompt": "hi " * 200}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"prompt": "hi", "temperature": 3}, 400, "temperature", "invalid_value"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature", "invalid_type"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p", "invalid_value"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
    ("/v1/completions", {"prompt": "hi", "stop": 7}, 400, "stop", "invalid_type"),
    ("/v1/completions", {"prompt": "hi", "seed": -1}, 400, "seed", "invalid_value"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream", "invalid_type"),
    ("/v1/completions", {"prompt": "hi", "n": 3}, 400, "n", "invalid_value"),
    ("/v1/completions", [1, 2], 400, None, "invalid_json"),
    ("/v1/chat/completions", {"model": "pi5"}, 400, "messages", "missing_required_parameter"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "invalid_type"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages[0].content", "missing_required_parameter"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 200}]}, 400, "messages",
     "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -2}, 400,
     "max_completion_tokens", "invalid_value"),
]


async def test_bad_input_gets_400_naming_the_parameter_and_the_stack_keeps_serving(stack):
    url = base_url(stack)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        for path, body, status, param, code in BAD_INPUTS:
            async with http.post(url + path, json=body) as r:
                got = await r.json()
                assert r.status == status, (body, got)
            assert got["error"]["param"] == param, (body, got)
            assert got["error"]["code"] == code, (body, got)
            assert got["error"]["type"] == "invalid_request_error" and got["error"]["message"]
        async with http.post(url + "/v1/completions", data=b"{not json", headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_json"
        async with http.get(url + "/v1/nothing-here") as r:
            assert r.status == 404 and "error" in await r.json()
        # a configured drafter that is not running: 503 with Retry-After, at once
        async with http.post(url + "/v1/completions", json={"prompt": "hi", "model": "ghost", "max_tokens": 2}) as r:
            assert r.status == 503 and int(r.headers["Retry-After"]) >= 1
            assert (await r.json())["error"]["code"] == "drafter_unavailable"
        async with http.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3, "temperature": 0}) as r:
            assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 3


async def test_overload_is_429_with_retry_after(stack):
    """The ngram drafter takes one session at a time here: a second request while one streams is refused."""
    url = base_url(stack)
    body = {"prompt": TEXT_PROMPT, "model": "ngram", "max_tokens": 400, "temperature": 0, "stream": True}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        async with http.post(url + "/v1/completions", json=body) as long:
            assert long.status == 200
            await long.content.readline()  # the session is open
            async with http.post(url + "/v1/completions", json={**body, "stream": False, "max_tokens": 2}) as r:
                assert r.status == 429, await r.text()
                assert int(r.headers["Retry-After"]) >= 1
                assert (await r.json())["error"]["code"] == "overloaded"
    assert await wait_for(lambda: _sessions_closed(stack))


async def test_client_disconnect_mid_stream_frees_the_session_on_the_verifier(stack):
    url = base_url(stack)
    body = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 1500, "temperature": 0, "stream": True}  # counts on
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        async with http.post(url + "/v1/completions", json=body) as r:
            assert r.status == 200
            seen = 0
            async for line in r.content:  # a few chunks, then hang up
                seen += line.startswith(b"data: ")
                if seen >= 3:
                    break
            busy = await broker_stats(stack.config.broker.frontend)
            assert busy["sessions"] >= 1  # the long session is still running
        # leaving the response unread closes the connection: the gateway sees the client go
    assert await wait_for(lambda: _sessions_closed(stack)), "the verifier still holds the session"
    drafter = DrafterClient(stack.config.drafter("pi5").client)
    try:
        assert (await drafter.stats())["active"] == 0
    finally:
        drafter.close()
    async with aiohttp.ClientSession() as http:
        snap = await metrics_snapshot(http, url)
    assert metric(snap, "sled_gateway_active_sessions") == 0
    assert metric(snap, "sled_gateway_errors_total", kind="client_disconnected") >= 1


async def test_metrics_parse_and_move_after_a_request(stack):
    url = base_url(stack)
    interval = stack.config.gateway.stats_interval_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        before = await metrics_snapshot(http, url)
        bodies = [{"prompt": f"{TEXT_PROMPT} {i}", "max_tokens": 6, "temperature": 0} for i in range(3)]
        replies = await asyncio.gather(*[http.post(url + "/v1/completions", json=b) for b in bodies])
        for r in replies:
            assert r.status == 200
            r.release()
        await asyncio.sleep(3 * interval)  # the poller has seen the broker and drafters since
        after = await metrics_snapshot(http, url)
    grew = lambda name, **ls: metric(after, name, **ls) > metric(before, name, **ls)  # noqa: E731
    assert grew("sled_gateway_requests_total", endpoint="/v1/completions", status="200")
    assert grew("sled_gateway_completion_tokens_total", drafter="pi5")
    assert grew("sled_gateway_round_seconds_count", kind="model")
    assert grew("sled_broker_proposals_total") and grew("sled_broker_verdicts_total")
    assert grew("sled_drafter_generated_tokens_total", drafter="pi5")
    assert grew("sled_batch_sessions_count") and grew("sled_queue_wait_seconds_count")
    assert grew("sled_verifier_batches_total", verifier="verifier-0")
    assert metric(after, "sled_verify_batch_seconds_count", verifier="verifier-0") > 0
    assert 0.5 < metric(after, "sled_acceptance_rate", kind="model") <= 1.0  # < 1 after the sampled requests
    assert metric(after, "sled_broker_up") == 1 and metric(after, "sled_drafter_up", drafter="ghost") == 0


async def test_health_ready_models_and_status_page_data(stack):
    url = base_url(stack)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        async with http.get(url + "/health") as r:
            assert r.status == 200
        async with http.get(url + "/ready") as r:
            ready = await r.json()
            assert r.status == 200 and ready["verifiers"] == ["verifier-0"]
        async with http.get(url + "/v1/models") as r:
            listed = {m["id"]: m for m in (await r.json())["data"]}
        async with http.get(url + "/status.json") as r:
            status = await r.json()
        async with http.get(url + "/") as r:
            assert r.status == 200 and "SLED" in await r.text()
    assert listed["smollm2"]["sled"]["role"] == "target"
    assert listed["pi5"]["sled"] == {"role": "drafter", "kind": "model", "gamma": 4, "available": True, "default": True}
    assert listed["ghost"]["sled"]["available"] is False
    assert status["verifiers"][0]["name"] == "verifier-0" and status["history"]
    pi5 = [d for d in status["drafters"] if d["name"] == "pi5"][0]
    assert pi5["requests"] == 0 or (0 < pi5["mean_gamma"] <= 4 and pi5["tokens_per_round"] >= 1)
    # the twin's greedy guesses never miss, but a sampled request earlier in the module may waste one
    assert all(isinstance(pi5[k], int) and pi5[k] >= 0 for k in ("proactive_hits", "proactive_wasted", "plain_rounds"))


async def sled(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "pipeline", *args, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode()


async def test_sled_status_prints_the_running_stack(stack):
    args = [a for item in stack.overrides for a in ("--set", item)]
    rc, out = await sled(*args, "status")
    assert rc == 0, out
    assert "verifier-0" in out and "QUEUED" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert rows["pi5"][3] == "up" and rows["ghost"][3] == "down"
    assert "acceptance by kind" in out
    rc, out = await sled(*args, "status", "--json")
    assert rc == 0 and json.loads(out)["broker"]["verifiers"]["verifier-0"]["batches"] > 0


# --- the status page in headless Chromium ---------------------------------------------------

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, as CI gets it: found on PATH, else installed with apt-get (root, as on CI)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True, timeout=600, env=env)
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True, capture_output=True, timeout=900,
                       env=env)
        found = shutil.which("chromium")
    if not found:
        pytest.fail("the status page test needs Debian's chromium: apt-get update && apt-get install -y chromium")
    return found


async def run_chromium(chromium: str, tmp_path, *args: str, timeout: float = 90.0) -> bytes:
    profile = tmp_path / f"profile-{time.monotonic_ns()}"  # a fresh profile each run
    proc = await asyncio.create_subprocess_exec(
        chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0
    return out


@pytest.mark.timeout(1200)  # the first run on a fresh CI machine may install chromium
async def test_status_page_renders_live_numbers_in_headless_chromium(stack, chromium, tmp_path):
    url = base_url(stack)

    async def load():  # traffic while the page watches, so its plots and numbers move
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            bodies = [{"prompt": f"{i}, {i + 1}, {i + 2},", "max_tokens": 24, "temperature": 0} for i in range(3)]
            for r in await asyncio.gather(*[http.post(url + "/v1/completions", json=b) for b in bodies]):
                assert r.status == 200
                r.release()

    async def seen_by_the_gateway():
        async with aiohttp.ClientSession() as http, http.get(url + "/status.json") as r:
            status = await r.json()
        return [d for d in status["drafters"] if d["name"] == "pi5" and d["generated"] > 0]

    await load()
    assert await wait_for(seen_by_the_gateway)
    traffic = asyncio.create_task(load())
    dom = (await run_chromium(chromium, tmp_path, "--virtual-time-budget=5000", "--dump-dom", url + "/")).decode()
    shot = tmp_path / "status-page.png"
    await run_chromium(chromium, tmp_path, "--virtual-time-budget=5000", "--window-size=1280,900",
                       f"--screenshot={shot}", url + "/")
    await traffic
    async with aiohttp.ClientSession() as http, http.get(url + "/status.json") as r:
        status = await r.json()

    assert int(re.search(r'<body[^>]*data-polls="(\d+)"', dom).group(1)) >= 2  # it kept updating
    assert 'id="conn" class="pill up">live<' in dom
    assert re.search(r'<tr data-verifier="verifier-0">', dom)
    generated = int(re.search(r'<tr data-drafter="pi5">.*?data-field="generated">(\d+)<', dom).group(1))
    assert 0 < generated <= [d for d in status["drafters"] if d["name"] == "pi5"][0]["generated"]
    assert re.search(r'id="tokens-per-s">\d+\.\d<', dom)
    # proactive hits / wasted as the page showed them, at most what the drafter counted afterwards
    # (a sampled request earlier in this module may waste a guess: its token is the target's draw)
    row = re.search(r'<tr data-drafter="pi5">.*?data-field="mean_gamma">\d\.\d<.*?data-field="proactive">(\d+) / (\d+)<', dom)
    assert row, dom
    pi5 = [d for d in status["drafters"] if d["name"] == "pi5"][0]
    assert 0 < int(row.group(1)) <= pi5["proactive_hits"] and int(row.group(2)) <= pi5["proactive_wasted"]
    assert re.search(r'<tr data-drafter="pi5">.*?data-field="plain_rounds">\d+<', dom)
    assert dom.count('class="series"') >= 4  # the plots have lines
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("SLED_STATUS_SCREENSHOT"):  # e.g. docs/img/status-page.png
        shutil.copy(shot, os.environ["SLED_STATUS_SCREENSHOT"])
