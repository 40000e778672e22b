"""`sled launch`: one verifier per GPU, here CPU workers standing in for GPUs. Real processes:
a broker, the supervisor and its workers; a worker killed with SIGKILL is started again and
registers at the broker again; SIGTERM stops everything with exit 0; workers that cannot start
are given up and the launch exits 1."""

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from pipeline.client import broker_stats
from pipeline.config import load_config
from tests.conftest import stack_overrides
from pipeline.supervisor import Supervisor
from workers.gpu_launch import Backoff, LaunchError, Slot, plan_slots, visible_gpus, worker_overrides, worker_spec


HEALTHCHECK = Path(__file__).resolve().parent.parent / "docker" / "healthcheck.py"


def test_gpus_come_from_cuda_visible_devices():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1,-1,2"}) == ["1"]  # CUDA stops at an invalid id


def test_plans_one_worker_per_gpu():
    env = {"CUDA_VISIBLE_DEVICES": "2,3,5,7"}
    assert plan_slots("all", environ=env) == [Slot(f"verifier-gpu{g}", g, True) for g in "2357"]
    assert [s.devices for s in plan_slots("2", environ=env)] == ["2", "3"]
    assert [s.name for s in plan_slots("5,2", environ=env, prefix="hostA")] == ["hostA-gpu5", "hostA-gpu2"]
    assert [s.devices for s in plan_slots("device=3", environ=env)] == ["3"]
    assert plan_slots("all", per_worker=2, environ=env) == [Slot("verifier-gpu2-3", "2,3", True),
                                                            Slot("verifier-gpu5-7", "5,7", True)]
    assert plan_slots("cpu:2") == [Slot("verifier-cpu0", "", False), Slot("verifier-cpu1", "", False)]


@pytest.mark.parametrize("gpus, env", [("all", ""), ("3", "0,1"), ("4", "0,1"), ("x", "0"), ("cpu:0", "0"),
                                       ("all@2", "0,1,2")])
def test_impossible_plans_are_refused(gpus, env):
    gpus, _, per = gpus.partition("@")
    with pytest.raises(LaunchError):
        plan_slots(gpus, per_worker=int(per or 1), environ={"CUDA_VISIBLE_DEVICES": env})


def test_each_worker_is_pinned_and_named():
    gpu = Slot("verifier-gpu1", "1", True)
    assert worker_overrides(gpu, per_worker=1, device_map="") == ['verifier.name="verifier-gpu1"', 'verifier.device="cuda"']
    assert 'verifier.device_map="auto"' in worker_overrides(Slot("v", "0,1", True), per_worker=2, device_map="")
    supervisor = Supervisor(["--set", "x.y=1"])
    spec = worker_spec(supervisor, gpu, per_worker=1, device_map="")
    assert supervisor.environment(spec)["CUDA_VISIBLE_DEVICES"] == "1"
    assert spec.argv[-1] == "verifier" and "x.y=1" in spec.argv and spec.restart
    cpu = worker_spec(supervisor, Slot("c", "", False), per_worker=1, device_map="")
    assert supervisor.environment(cpu)["CUDA_VISIBLE_DEVICES"] == ""  # CPU stand-ins see no GPU


def test_backoff_doubles_up_to_its_cap():
    assert [Backoff(base_s=1, cap_s=10).delay(n) for n in range(6)] == [1, 2, 4, 8, 10, 10]


def _events(path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


async def _until(what, check, timeout: float, procs=()):
    deadline = time.monotonic() + timeout
    while True:
        for proc in procs:
            assert proc.returncode is None, f"a process exited early ({proc.returncode}) while waiting for {what}"
        with contextlib.suppress(TimeoutError, OSError):
            result = await check()
            if result:
                return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.3)


async def test_workers_restart_after_a_crash_and_stop_on_sigterm(tmp_path, tiny_models):
    overrides = stack_overrides(tiny_models["target"], {}, broker__liveness=4)  # dead after 0.8 s
    frontend = load_config(None, overrides).broker.frontend
    flags = [a for item in overrides for a in ("--set", item)]
    sup_log = tmp_path / "launch.log"
    procs = []
    try:
        with open(tmp_path / "broker.log", "wb") as out:
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pipeline", *flags, "broker", stdout=out, stderr=out))
        with open(sup_log, "wb") as out:
            launcher = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pipeline", "--log-format", "json", *flags,
                "launch", "--gpus", "cpu:2", "--grace", "10", "--healthy-after", "1",
                "--log-dir", str(tmp_path / "workers"),
                stdout=out, stderr=out)
        procs.append(launcher)
        names = {"verifier-cpu0", "verifier-cpu1"}

        async def registered():
            stats = await broker_stats(frontend, timeout=1.0)
            return stats if names <= set(stats["verifiers"]) else None

        await _until("both workers registered", registered, 120, procs)
        started = {e["child"]: e["pid"] for e in _events(sup_log) if e.get("event") == "child_started"}
        assert set(started) == names
        # the compose stack's health checks, here against this broker
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLED_")} | {"SLED_BROKER__FRONTEND": frontend}
        for check, code in ((["broker"], 0), (["verifier", "verifier-cpu"], 0), (["verifier", "verifier-gpu"], 1)):
            done = await asyncio.create_subprocess_exec(sys.executable, str(HEALTHCHECK), *check, env=env,
                                                        stderr=asyncio.subprocess.DEVNULL)
            assert await asyncio.wait_for(done.wait(), 30) == code, check

        os.kill(started["verifier-cpu0"], signal.SIGKILL)

        async def restarted():
            again = [e for e in _events(sup_log) if e.get("event") == "child_started" and e["child"] == "verifier-cpu0"]
            return again[-1]["pid"] if len(again) == 2 else None

        new_pid = await _until("the killed worker started again", restarted, 30, procs)
        assert new_pid != started["verifier-cpu0"]
        exited = [e for e in _events(sup_log) if e.get("event") == "child_exited"]
        assert [(e["child"], e["code"]) for e in exited] == [("verifier-cpu0", -signal.SIGKILL)]

        async def registered_again():  # the broker dropped the dead worker and took the new one
            stats = await registered()
            return stats if stats and stats["verifiers_lost"] >= 1 else None

        await _until("the restarted worker registered again", registered_again, 120, procs)

        launcher.send_signal(signal.SIGTERM)  # the killed worker is healthy again: a clean stop
        assert await asyncio.wait_for(launcher.wait(), 30) == 0
        stopped = [e for e in _events(sup_log) if e.get("event") == "children_stopped"]
        assert stopped and set(stopped[0]["codes"]) == names and stopped[0]["failed"] == []
        assert all(code is not None for code in stopped[0]["codes"].values())
        for pid in (new_pid, started["verifier-cpu1"]):
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def test_launch_exits_1_when_its_workers_cannot_start(tmp_path):
    """A target that does not exist: each worker dies at load, is restarted once, is given up, and
    the launch ends by itself with exit 1 (no broker needed: the worker dies before connecting)."""
    overrides = stack_overrides(tmp_path / "no-such-model", {})
    flags = [a for item in overrides for a in ("--set", item)]
    sup_log = tmp_path / "launch.log"
    with open(sup_log, "wb") as out:
        launcher = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pipeline", "--log-format", "json", *flags,
            "launch", "--gpus", "cpu:1", "--max-restarts", "1", "--backoff-max", "0.1",
            "--log-dir", str(tmp_path / "workers"), stdout=out, stderr=out)
    try:
        assert await asyncio.wait_for(launcher.wait(), 180) == 1
    finally:
        if launcher.returncode is None:
            launcher.kill()
            await launcher.wait()
    events = [e.get("event") for e in _events(sup_log)]
    assert events.count("child_started") == 2 and events.count("child_exited") == 1
    assert "child_given_up" in events
