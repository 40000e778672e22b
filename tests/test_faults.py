"""Faults while sessions run: a verifier killed, the broker killed and restarted, drafters that
vanish. Every session must finish with output token-identical to the target alone, and what
the departed left behind must be freed."""

import asyncio
import random
import time

import pytest
import zmq
import zmq.asyncio

from pipeline.client import DrafterClient, broker_stats
from pipeline.models import load_causal_lm
from pipeline.protocol import DRAFTER_UPSTREAM_ACCEPTS, Propose
from pipeline.reference import greedy_reference
from tests.conftest import TINY_VOCAB, make_stack

FAST_LIVENESS = {
    "broker__heartbeat_ms": 100,
    "broker__liveness": 5,  # dead after 0.5 s of silence
    "broker__max_wait_ms": 40.0,  # slow rounds down so that faults land mid-generation
    "limits__verdict_timeout_s": 2.0,
}


def prompts(n, seed):
    rng = random.Random(seed)
    return [[rng.randrange(TINY_VOCAB) for _ in range(rng.randint(2, 16))] for _ in range(n)]


def drafters(tiny_models):
    return {"small": {"kind": "model", "model": str(tiny_models["small"]), "gamma": 3},
            "ngram": {"kind": "ngram", "gamma": 4}}


async def generate_all(stack, batch, new_tokens):
    names = stack.drafters
    clients = {n: DrafterClient(stack.config.drafter(n).client) for n in names}
    try:
        return await asyncio.gather(*[
            clients[names[i % len(names)]].complete(p, new_tokens, timeout=60) for i, p in enumerate(batch)
        ])
    finally:
        for c in clients.values():
            c.close()


async def test_a_killed_verifier_hands_its_sessions_over(tmp_path, tiny_models):
    batch = prompts(10, 1)
    stack = make_stack(tmp_path, tiny_models["target"], drafters(tiny_models), verifiers=2, **FAST_LIVENESS)
    async with stack:
        run = asyncio.create_task(generate_all(stack, batch, 80))
        await asyncio.sleep(1.0)
        assert not run.done(), "generation finished before the fault; slow it down"
        killed_at = time.monotonic()
        await stack.kill("verifier-1")
        results = await asyncio.wait_for(run, 60)
        recovered_s = time.monotonic() - killed_at
        figures = await broker_stats(stack.config.broker.frontend)
    target = load_causal_lm(str(tiny_models["target"]))
    assert [r.tokens for r in results] == [greedy_reference(target, p, 80) for p in batch]
    assert figures["verifiers_lost"] == 1 and list(figures["verifiers"]) == ["verifier-0"]
    assert figures["verifiers"]["verifier-0"]["prefills"] >= 1  # sessions rebuilt from drafters' histories
    print(f"verifier loss: all sessions finished {recovered_s:.2f} s after SIGKILL")


async def test_broker_restart_mid_generation(tmp_path, tiny_models):
    batch = prompts(8, 2)
    stack = make_stack(tmp_path, tiny_models["target"], drafters(tiny_models), **FAST_LIVENESS)
    async with stack:
        run = asyncio.create_task(generate_all(stack, batch, 80))
        await asyncio.sleep(1.0)
        assert not run.done()
        await stack.kill("broker")
        await asyncio.sleep(0.5)
        await stack.restart("broker")
        results = await asyncio.wait_for(run, 60)
    target = load_causal_lm(str(tiny_models["target"]))
    assert [r.tokens for r in results] == [greedy_reference(target, p, 80) for p in batch]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def abandon_sessions(endpoint, count, prompt_len, seed):
    """A device that opens sessions and vanishes without closing them."""
    rng = random.Random(seed)
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    try:
        for i in range(count):
            history = [rng.randrange(TINY_VOCAB) for _ in range(prompt_len)]
            await sock.send(Propose(f"gone-{seed}-{i}", 0, len(history), [1, 2], history=history).encode())
        for _ in range(count):
            reply = DRAFTER_UPSTREAM_ACCEPTS.decode(await asyncio.wait_for(sock.recv(), 30))
            assert reply.accepted >= 0
    finally:
        sock.close(0)
        ctx.term()


@pytest.mark.timeout(240)
async def test_abandoned_sessions_are_freed(tmp_path, tiny_models):
    stack = make_stack(tmp_path, tiny_models["target"], {"ngram": {"kind": "ngram"}},
                       **{**FAST_LIVENESS, "broker__max_sessions": 2000, "verifier__max_sessions": 2000,
                          "broker__max_queue": 2000})
    async with stack:
        frontend = stack.config.broker.frontend
        pid = stack.procs["verifier-0"].pid
        await abandon_sessions(frontend, 50, 64, seed=0)  # warm the allocator up once
        await asyncio.sleep(1.5)
        start = rss_bytes(pid)
        peak_sessions = 0
        for wave in range(10):  # 1,000 sessions from 10 devices that vanish
            await abandon_sessions(frontend, 100, 64, seed=wave + 1)
            peak_sessions = max(peak_sessions, (await broker_stats(frontend))["sessions"])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            figures = await broker_stats(frontend)
            held = sum(v.get("sessions", 0) for v in figures["verifiers"].values())
            if figures["sessions"] == 0 and held == 0:
                break
            await asyncio.sleep(0.25)
        end = rss_bytes(pid)
    assert peak_sessions >= 100
    assert figures["sessions"] == 0 and held == 0, figures
    assert figures["drafters_lost"] >= 10
    assert end <= start * 1.10, f"verifier RSS {start/2**20:.1f} MiB -> {end/2**20:.1f} MiB"
    print(f"soak: 1000 abandoned sessions, verifier RSS {start/2**20:.1f} -> {end/2**20:.1f} MiB")
