"""Edge devices behind a bad link: drafters in their own network namespace reach the broker
through a fault-injecting TCP proxy (50 ms jitter, stalls, connection resets every few
seconds). Every session finishes, token-identical to the target alone."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.models import load_causal_lm
from pipeline.reference import greedy_reference
from tests import netns

ROOT = Path(__file__).resolve().parent.parent

CLIENT = r"""
import asyncio, json, sys
from pipeline.client import DrafterClient
jobs = json.loads(sys.argv[1])
async def main():
    clients = {}
    for name, endpoint, prompt, n in jobs:
        clients.setdefault(endpoint, DrafterClient(endpoint))
    results = await asyncio.gather(*[clients[e].complete(p, n, timeout=150) for _, e, p, n in jobs])
    print(json.dumps([[r.tokens, r.stats] for r in results]))
    for c in clients.values():
        c.close()
asyncio.run(main())
"""


@pytest.fixture
def network():
    with netns.network(["server", "edge"]) as net:
        yield net


@pytest.mark.timeout(300)
def test_sessions_survive_jitter_stalls_and_resets(network, tiny_models, tmp_path):
    server = network.hosts["server"].address
    common = ["--set", "broker.heartbeat_ms=250", "--set", "broker.liveness=8", "--set", "limits.verdict_timeout_s=3.0",
              "--set", f"verifier.target={json.dumps(str(tiny_models['target']))}", "--set", "verifier.threads=1",
              "--set", 'broker.frontend="tcp://0.0.0.0:5555"', "--set", 'broker.backend="tcp://127.0.0.1:5556"',
              # a test of links, not of keys (tests/test_multihost.py runs with the compose keys):
              # a plain frontend off loopback needs the explicit override
              "--set", "security.allow_insecure=true"]
    edge = ["--set", 'broker.frontend="tcp://127.0.0.1:7000"',  # through the proxy
            "--set", 'drafters.pi5.client="tcp://127.0.0.1:5601"', "--set", 'drafters.ngram.client="tcp://127.0.0.1:5602"',
            "--set", f"drafters.pi5.model={json.dumps(str(tiny_models['small']))}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    procs = {}

    def start(name, host, argv):
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115
        procs[name] = subprocess.Popen(network.command(host, argv), env=env, cwd=ROOT, stdout=log, stderr=log,
                                       stdin=subprocess.DEVNULL)

    py = [sys.executable, "-m", "pipeline", *common]
    try:
        start("broker", "server", [*py, "broker"])
        start("verifier", "server", [*py, "verifier"])
        start("proxy", "edge", [sys.executable, "tests/faultproxy.py", "--listen", "127.0.0.1:7000",
                                "--upstream", f"{server}:5555", "--jitter-ms", "50", "--stall-p", "0.01",
                                "--stall-ms", "800", "--reset-every-s", "2.5", "--seconds", "200"])
        start("pi5", "edge", [*py, *edge, "drafter", "pi5"])
        start("ngram", "edge", [*py, *edge, "drafter", "ngram"])
        prompts = [[(5 * i + 7 * j) % 250 + 1 for j in range(3 + i)] for i in range(6)]
        jobs = [[n, f"tcp://127.0.0.1:{5601 if n == 'pi5' else 5602}", p, 40]
                for n, p in zip(["pi5", "ngram"] * 3, prompts)]
        started = time.monotonic()
        client = subprocess.run(network.command("edge", [sys.executable, "-c", CLIENT, json.dumps(jobs)]), env=env,
                                cwd=ROOT, capture_output=True, text=True, timeout=240)
        elapsed = time.monotonic() - started
        for name, proc in procs.items():
            assert proc.poll() is None, f"{name} died:\n{(tmp_path / f'{name}.log').read_text()[-2000:]}"
        assert client.returncode == 0, client.stderr[-3000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    # the proxy prints its counts as it stops; interpreter-exit warnings may follow on the same log
    proxy_log = (tmp_path / "proxy.log").read_text()
    printed = [line for line in proxy_log.splitlines() if line.startswith("{")]
    assert printed, f"the proxy printed no counts:\n{proxy_log[-2000:]}"
    counts = json.loads(printed[-1])
    results = json.loads(client.stdout.strip().splitlines()[-1])
    target = load_causal_lm(str(tiny_models["target"]))
    assert [tokens for tokens, _ in results] == [greedy_reference(target, p, 40) for p in prompts]
    assert counts["resets"] >= 1 and counts["connections"] >= 2, counts  # the faults really happened
    print(f"bad links: {len(prompts)} sessions lossless in {elapsed:.1f} s through {counts}")
