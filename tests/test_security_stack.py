"""A rogue verifier against the whole stack over real processes and sockets (issue 16), and the
gateway serving a whole stack with CURVE on.

With CURVE on and keys bound to roles, a peer holding a *drafter* key that says Ready on the
broker's verifier socket is refused at the handshake and never sees a batch, a peer without a
key gets nothing on any socket, the verifier's key works as before, and every completion equals
the target decoding alone (transformers' generate). With CURVE off and everything on loopback,
the same rogue is served: the trust boundary is the machine, which docs/reliability.md states.
"""

import asyncio
import contextlib
import subprocess
import sys

import aiohttp
import zmq
import zmq.asyncio
import zmq.auth

from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import GatewayMetrics
from gateway.pipeline_stats import PipelineState
from pipeline.status import collect, render
from pipeline.client import DrafterClient
from pipeline.config import load_config
from pipeline.models import load_causal_lm, load_tokenizer
from pipeline.protocol import BatchVerdicts, CloseSession, Heartbeat, Inbox, Ready, StatsRequest, Verdict, VerifyBatch
from pipeline.reference import greedy_reference
from pipeline.security import CurveKeys, client_keys, drafter_keys_for_client, fingerprint
from pipeline.stack import Stack
from tests.conftest import free_ports, make_stack, stack_overrides

PROMPTS = [[(11 * i + 5 * j) % 250 + 1 for j in range(3 + i)] for i in range(6)]
NEW_TOKENS = 16


class RogueVerifier:
    """Connects to the backend, says Ready, heartbeats, and answers every batch with a wrong token."""

    def __init__(self, ctx, endpoint: str, keys: CurveKeys | None):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.identity = b"verifier-rogue"
        if keys:
            keys.apply(self.sock, server=False)
        self.sock.connect(endpoint)
        self.batches: list[VerifyBatch] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        with contextlib.suppress(zmq.Again):
            self.sock.send(Ready().encode(), zmq.NOBLOCK)
        while True:
            try:
                frame = await asyncio.wait_for(self.sock.recv(), 0.1)
            except TimeoutError:
                with contextlib.suppress(zmq.Again):
                    self.sock.send(Heartbeat().encode(), zmq.NOBLOCK)
                continue
            msg = Inbox(VerifyBatch, Heartbeat, CloseSession).decode(frame)
            if isinstance(msg, VerifyBatch):
                self.batches.append(msg)
                verdicts = [Verdict(i.session_id, i.round, 0, 7) for i in msg.items]
                self.sock.send(BatchVerdicts(msg.batch_id, verdicts).encode(), zmq.NOBLOCK)
                self.sock.send(Ready().encode(), zmq.NOBLOCK)

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.sock.close(0)


async def silent(ctx, endpoint: str, first: bytes, keys: CurveKeys | None = None, wait_s: float = 1.0) -> bool:
    """True when a peer that sends ``first`` gets nothing back."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if keys:
        keys.apply(sock, server=False)
    sock.connect(endpoint)
    try:
        with contextlib.suppress(zmq.Again):
            sock.send(first, zmq.NOBLOCK)
        try:
            await asyncio.wait_for(sock.recv(), wait_s)
            return False
        except TimeoutError:
            return True
    finally:
        sock.close(0)


def keys_for(tmp_path) -> str:
    folder = tmp_path / "keys"
    base = [sys.executable, "-m", "pipeline", "--set", f'security.keys_dir="{folder}"', "keys", "generate"]
    for names, role in ((["broker"], None), (["verifier-0"], "verifier"), (["ngram", "pi5"], "drafter"),
                        (["admin"], "admin")):
        subprocess.run(base + names + (["--authorize", "--role", role] if role else []), check=True,
                       capture_output=True)
    return str(folder)


async def run_sessions(stack, curve) -> list[list[int]]:
    client = DrafterClient(stack.config.drafter("ngram").client, curve=curve)
    try:
        results = await asyncio.gather(*[client.complete(p, NEW_TOKENS, stop_ids=[], timeout=120) for p in PROMPTS])
    finally:
        client.close()
    return [r.tokens for r in results]


async def test_with_curve_a_drafter_key_never_becomes_a_verifier(tmp_path, tiny_models):
    keys_dir = keys_for(tmp_path)
    client_port, = free_ports(1)
    stack = make_stack(tmp_path, tiny_models["target"],
                       # the client socket off loopback: CURVE, admin and client keys only
                       {"ngram": {"kind": "ngram", "gamma": 4, "client": f"tcp://0.0.0.0:{client_port}"}},
                       security__curve=True, security__keys_dir=keys_dir, broker__max_wait_ms=20.0)
    config = stack.config
    ctx = zmq.asyncio.Context()
    async with stack:
        server = client_keys(config, "admin").server_public
        drafter_pair = zmq.auth.load_certificate(f"{keys_dir}/pi5.key_secret")
        rogue = RogueVerifier(ctx, config.broker.backend, CurveKeys(*drafter_pair, server))
        try:
            await asyncio.sleep(0.5)  # Ready and a few heartbeats, before any session starts
            tokens = await run_sessions(stack, drafter_keys_for_client(config, "ngram"))
            # a peer without a key: nothing on either broker socket, nor on the drafter's client socket
            assert await silent(ctx, config.broker.backend, Ready().encode())
            assert await silent(ctx, config.broker.frontend, StatsRequest().encode())
            assert await silent(ctx, f"tcp://127.0.0.1:{client_port}", StatsRequest().encode())
            # a drafter key on the drafter's client socket (admin and client keys only)
            ngram_public = zmq.auth.load_certificate(f"{keys_dir}/ngram.key")[0]
            assert await silent(ctx, f"tcp://127.0.0.1:{client_port}", StatsRequest().encode(),
                                CurveKeys(*drafter_pair, ngram_public))
            collected = await collect(config, 2.0)  # what `sled status` reads, with the admin key
            figures, drafter_figures = collected["broker"], collected["drafters"]["ngram"]
        finally:
            await rogue.close()
            ctx.term()
    assert rogue.batches == []
    target = load_causal_lm(str(tiny_models["target"]))
    assert tokens == [greedy_reference(target, p, NEW_TOKENS) for p in PROMPTS]
    assert set(figures["verifiers"]) == {"verifier-0"}  # the verifier key works as before
    assert figures["refused"]["wrong_role"] >= 1 and figures["refused"]["unauthorised"] >= 1
    assert drafter_figures["refused"]["wrong_role"] >= 1 and drafter_figures["refused"]["unauthorised"] >= 1
    status = render(config, collected)  # `sled status`
    assert "refused handshakes: unauthorised" in status and "wrong_role" in status
    state = PipelineState.for_config(config)  # the gateway's /metrics
    state.broker_up, state.broker = True, figures
    state.drafters["ngram"].up, state.drafters["ngram"].stats = True, drafter_figures
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(GatewayMetrics(state).exposition().decode()) for s in f.samples}
    assert samples[("sled_broker_refused_total", (("reason", "wrong_role"),))] == figures["refused"]["wrong_role"]
    assert samples[("sled_drafter_refused_total", (("drafter", "ngram"), ("kind", "ngram"), ("reason", "wrong_role")))] >= 1
    log = (tmp_path / "logs" / "broker.log").read_text()
    refusals = [line for line in log.splitlines() if "peer_refused" in line and "socket=backend" in line]
    assert any("key=pi5" in line and "reason=wrong_role" in line for line in refusals), log[-3000:]
    assert any(f"fingerprint={fingerprint(drafter_pair[0])}" in line for line in refusals)


async def test_without_curve_on_loopback_local_processes_are_trusted(tmp_path, tiny_models):
    """The documented trust boundary (docs/reliability.md): with CURVE off every socket is on
    loopback, and any local process may register as a verifier and read the prompts."""
    stack = make_stack(tmp_path, tiny_models["target"], {"ngram": {"kind": "ngram", "gamma": 4}},
                       broker__max_wait_ms=20.0)
    ctx = zmq.asyncio.Context()
    async with stack:
        rogue = RogueVerifier(ctx, stack.config.broker.backend, None)
        try:
            await asyncio.sleep(0.5)
            await run_sessions(stack, None)
        finally:
            await rogue.close()
            ctx.term()
    seen = [item.history for batch in rogue.batches for item in batch.items if item.history]
    assert seen, "a local process is served as a verifier when CURVE is off"
    assert any(history[:len(p)] == p for history in seen for p in PROMPTS)  # it reads users' prompts


async def test_with_curve_the_gateway_serves_a_whole_stack(tmp_path):
    """`sled up`'s shape with CURVE on: gateway, broker, verifier and a drafter, each on its own
    key. The gateway reaches the drafter and reads the broker's figures with the admin key, and
    its completions equal the target decoding alone."""
    keys_dir = keys_for(tmp_path)
    gateway_port, = free_ports(1)
    overrides = stack_overrides("smollm2", {"ngram": {"kind": "ngram", "gamma": 4}}, security__curve=True,
                                security__keys_dir=keys_dir, broker__max_wait_ms=10.0, gateway__port=gateway_port,
                                gateway__stats_interval_s=0.5, gateway__default_model="ngram")
    config = load_config(None, overrides)
    stack = Stack(config, None, overrides, ["ngram"], gateway=True, log_dir=tmp_path / "logs")
    url = f"http://127.0.0.1:{gateway_port}"
    async with stack, aiohttp.ClientSession() as http:
        async with http.get(f"{url}/ready") as r:
            assert r.status == 200
        body = {"model": "ngram", "prompt": "The three primary colors are", "max_tokens": 12, "temperature": 0}
        async with http.post(f"{url}/v1/completions", json=body) as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
        for _ in range(40):  # the gateway's poller reads the broker over CURVE with the admin key
            async with http.get(f"{url}/metrics") as r:
                metrics = {s.name: s.value for f in text_string_to_metric_families(await r.text()) for s in f.samples
                           if not s.labels}
            if metrics.get("sled_broker_up") == 1 and metrics.get("sled_broker_verdicts_total", 0) > 0:
                break
            await asyncio.sleep(0.25)
    assert metrics["sled_broker_up"] == 1 and metrics["sled_broker_verdicts_total"] > 0
    model, tok = load_causal_lm("smollm2"), load_tokenizer("smollm2")
    prompt = tok("The three primary colors are")["input_ids"]
    expected = greedy_reference(model, prompt, 12, [tok.eos_token_id])
    assert answer["choices"][0]["text"] == tok.decode([t for t in expected if t != tok.eos_token_id])
