"""Multi-host on one machine: broker, two verifier servers, two edge devices and an app host,
each in its own network namespace with its own address, configured exactly as the compose stack
configures its containers (the services' SLED_* environment from docker/compose.yaml, hosts
reached by service name), with CURVE on and each host holding only the keys the compose keys
service gives its service. Sessions finish and equal the target decoding alone; the compose
health checks pass in every namespace; every process stops cleanly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.models import load_causal_lm
from pipeline.reference import greedy_reference
from tests import netns
from tests.compose_keys import provision

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker" / "compose.yaml"
HOSTS = ["broker", "verifier-a", "verifier-b", "drafter-pi5", "drafter-ngram", "gateway"]

CLIENT = """
import asyncio, json, sys
from pipeline.client import DrafterClient, broker_stats
from pipeline.config import load_config
from pipeline.security import client_keys, drafter_keys_for_client

async def main():
    config = load_config()  # the gateway container's configuration: drafters reached by name
    jobs = json.loads(sys.argv[1])
    clients = {name: DrafterClient(config.drafter(name).client, curve=drafter_keys_for_client(config, name))
               for name, _, _ in jobs}
    try:
        results = await asyncio.gather(*[clients[d].complete(p, n, stop_ids=[], timeout=120) for d, p, n in jobs])
        await asyncio.sleep(0.5)  # CloseSession reaches the verifiers
        stats = await broker_stats(config.broker.frontend, curve=client_keys(config, config.security.admin_key))
    finally:
        for client in clients.values():
            client.close()
    print(json.dumps({"tokens": [r.tokens for r in results], "reasons": [r.finish_reason for r in results],
                      "broker": stats}))

asyncio.run(main())
"""


@pytest.fixture
def network():
    with netns.network(HOSTS) as net:
        yield net


def service(name: str) -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"][name]


def service_env(name: str, tmp_path: Path) -> dict[str, str]:
    """This machine's environment without SLED_* settings, plus the compose service's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLED_")}
    env.update({k: str(v) for k, v in service(name)["environment"].items()})
    env["SLED_CACHE"] = str(tmp_path / "cache")  # the compose volume's place
    env["SLED_SECURITY__KEYS_DIR"] = str(tmp_path / "volumes" / f"keys-{name}")  # its keys volume
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_stack_across_namespaces_is_lossless(network, tiny_models, tmp_path):
    flags = []  # only what the tiny models and a quick test need; endpoints stay the compose ones
    for item in ["broker.heartbeat_ms=200", "broker.max_wait_ms=20", "verifier.threads=1",
                 'verifier.device="cpu"', f"verifier.target={json.dumps(str(tiny_models['target']))}",
                 f"drafters.pi5.model={json.dumps(str(tiny_models['small']))}"]:
        flags += ["--set", item]
    logs = tmp_path / "logs"
    logs.mkdir()
    provision(tmp_path / "volumes")  # the compose keys service: one keys folder per service
    procs: dict[str, subprocess.Popen] = {}

    def start(host: str, svc: str, command: list[str]) -> None:
        with open(logs / f"{host}.log", "wb") as out:
            procs[host] = subprocess.Popen(
                network.command(host, [sys.executable, "-m", "pipeline", *flags, *command]),
                env=service_env(svc, tmp_path), cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=out)

    def healthy(host: str, svc: str, *check: str) -> bool:
        done = subprocess.run(network.command(host, [sys.executable, "docker/healthcheck.py", *check]),
                              env=service_env(svc, tmp_path), cwd=ROOT, capture_output=True, timeout=30)
        return done.returncode == 0

    def log_tail(host: str) -> str:
        return (logs / f"{host}.log").read_text()[-2000:]

    try:
        start("broker", "broker", service("broker")["command"])
        for host in ("verifier-a", "verifier-b"):  # the compose command, CPU workers for GPUs
            command = service("verifier")["command"]
            command = [{"all": "cpu:1", "verifier": host}.get(a, a) for a in command]
            start(host, "verifier", command)
        start("drafter-pi5", "drafter-pi5", service("drafter-pi5")["command"])
        start("drafter-ngram", "drafter-ngram", service("drafter-ngram")["command"])

        # the compose health checks, each run where its service runs
        pending = {
            ("broker", "broker", "broker"),
            ("verifier-a", "verifier", "verifier", "verifier-a"),
            ("verifier-b", "verifier", "verifier", "verifier-b"),
            ("drafter-pi5", "drafter-pi5", "drafter", "pi5"),
            ("drafter-ngram", "drafter-ngram", "drafter", "ngram"),
        }
        deadline = time.monotonic() + 150
        while pending:
            for host, proc in procs.items():
                assert proc.poll() is None, f"{host} exited with {proc.returncode}:\n{log_tail(host)}"
            pending = {c for c in pending if not healthy(*c)}
            assert time.monotonic() < deadline, f"not healthy: {sorted(pending)}"
            if pending:
                time.sleep(0.5)
        # a check probes its own host only: where no drafter runs, the drafter's check fails
        assert not healthy("gateway", "drafter-pi5", "drafter", "pi5")

        prompts = [[(7 * i + 3 * j) % 251 + 1 for j in range(4 + i)] for i in range(6)]
        jobs = [["pi5" if i % 2 == 0 else "ngram", p, 24] for i, p in enumerate(prompts)]
        client = subprocess.run(network.command("gateway", [sys.executable, "-c", CLIENT, json.dumps(jobs)]),
                                env=service_env("gateway", tmp_path), cwd=ROOT, capture_output=True, text=True,
                                timeout=180)
        assert client.returncode == 0, client.stderr[-3000:]
        result = json.loads(client.stdout.strip().splitlines()[-1])

        target = load_causal_lm(str(tiny_models["target"]))
        assert result["tokens"] == [greedy_reference(target, p, 24) for p in prompts]
        assert result["reasons"] == ["length"] * len(prompts)
        verifiers = result["broker"]["verifiers"]
        assert set(verifiers) == {"verifier-a-cpu0", "verifier-b-cpu0"}
        assert all(v["items"] > 0 for v in verifiers.values()), verifiers  # both servers verified
        assert result["broker"]["sessions"] == 0
    finally:
        order = ["drafter-pi5", "drafter-ngram", "verifier-a", "verifier-b", "broker"]
        for host in order:
            if host in procs and procs[host].poll() is None:
                procs[host].send_signal(signal.SIGTERM)
        codes = {}
        for host in order:
            if host in procs:
                try:
                    codes[host] = procs[host].wait(20)
                except subprocess.TimeoutExpired:
                    procs[host].kill()
                    codes[host] = procs[host].wait()
    assert codes == dict.fromkeys(order, 0), codes
