"""The one supervisor (pipeline/supervisor.py) on real child processes: small `python -c` children
for its rules (restart with back-off, give up, healthy again, stop order and SIGKILL after the
grace, exit codes), and a whole `sled up` for the command's flags and exit code."""

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp

from pipeline.supervisor import Backoff, ChildDied, ChildSpec, Supervisor
from tests.conftest import free_ports, stack_overrides

FAST = Backoff(base_s=0.05, cap_s=0.2, reset_after_s=0.5)


def py(name: str, code: str, *args: str, restart: bool = False) -> ChildSpec:
    return ChildSpec(name, (sys.executable, "-c", code, *args), restart=restart)


SLEEP = "import time; time.sleep(60)"
# first run exits 3 (and leaves a mark), later runs stay up
FLAKY = "import os, sys, time; p = sys.argv[1]; os.path.exists(p) and time.sleep(60); open(p, 'w').close(); sys.exit(3)"


async def test_a_crash_looping_child_is_given_up_and_the_code_says_so():
    sup = Supervisor(backoff=FAST, max_restarts=2, quiet=True)
    sup.start([py("loop", "import sys; sys.exit(3)", restart=True)])
    died = await asyncio.wait_for(sup.run(asyncio.Event()), 30)  # nothing else runs: returns
    await sup.stop()
    assert died == "loop"
    assert sup.children["loop"].restarts == 2 and sup.children["loop"].gave_up
    assert sup.exit_code == 1


async def test_a_restarted_child_counts_healthy_only_after_its_healthy_spell(tmp_path):
    for settle_s, expected in ((1.2, 0), (0.0, 1)):
        mark = tmp_path / f"mark-{settle_s}"
        sup = Supervisor(backoff=FAST, quiet=True)
        sup.start([py("flaky", FLAKY, str(mark), restart=True)])
        stop = asyncio.Event()
        runner = asyncio.create_task(sup.run(stop))
        deadline = time.monotonic() + 30
        while sup.children["flaky"].restarts < 1 or not sup.children["flaky"].running():
            assert time.monotonic() < deadline, "the child was not restarted"
            await asyncio.sleep(0.02)
        await asyncio.sleep(settle_s)  # reset_after_s is 0.5 s
        stop.set()
        assert await runner is None
        await sup.stop()
        assert sup.exit_code == expected, settle_s


async def test_stop_terms_every_child_then_kills_the_stubborn_after_one_grace(tmp_path):
    # each child writes its name to a shared file on SIGTERM; "stubborn" ignores SIGTERM
    record = tmp_path / "order"
    polite = ("import signal, sys, time\n"
              "def bye(*_):\n    open(sys.argv[1], 'a').write(sys.argv[2] + '\\n'); sys.exit(0)\n"
              "signal.signal(signal.SIGTERM, bye); open(sys.argv[1] + '.' + sys.argv[2], 'w').close(); time.sleep(60)")
    stubborn = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "open(sys.argv[1] + '.stubborn', 'w').close(); time.sleep(60)")
    sup = Supervisor(grace_s=0.5, quiet=True)
    sup.start([py("broker", polite, str(record), "broker"), py("stubborn", stubborn, str(record)),
               py("drafter", polite, str(record), "drafter")])
    deadline = time.monotonic() + 30
    while not all(Path(f"{record}.{n}").exists() for n in ("broker", "stubborn", "drafter")):
        assert time.monotonic() < deadline, "children did not start"
        await asyncio.sleep(0.02)
    started = time.monotonic()
    await sup.stop()
    assert time.monotonic() - started < 5
    codes = {n: p.returncode for n, p in sup.procs.items()}
    assert codes == {"broker": 0, "stubborn": -signal.SIGKILL, "drafter": 0}
    assert sorted(record.read_text().split()) == ["broker", "drafter"]  # both ran their SIGTERM handler
    assert sup.exit_code == 0  # every child was up and healthy when the stop began


async def test_a_child_that_dies_ends_run_and_fails_check_alive():
    sup = Supervisor(quiet=True)
    sup.start([py("steady", SLEEP), py("short", "import time; time.sleep(0.3)")])
    died = await asyncio.wait_for(sup.run(asyncio.Event()), 30)
    assert died == "short"
    try:
        sup.check_alive()
        raise AssertionError("check_alive let a dead child pass")
    except ChildDied as exc:
        assert "short exited with code 0" in str(exc)
    await sup.stop()
    assert sup.exit_code == 1


async def test_a_killed_child_is_fault_injection_not_a_failure():
    sup = Supervisor(quiet=True)
    sup.start([py("a", SLEEP), py("b", SLEEP)])
    await sup.kill("b")
    sup.check_alive()  # b is down on purpose
    sup.spawn(py("b", SLEEP))
    await sup.stop()
    assert sup.exit_code == 0


def _children(pid: int) -> dict[int, str]:
    out = {}
    with contextlib.suppress(FileNotFoundError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            with contextlib.suppress(FileNotFoundError):
                out[int(child)] = Path(f"/proc/{child}/cmdline").read_text().replace("\0", " ")
    return out


async def test_sled_up_takes_the_gateway_port_and_exits_1_when_a_child_dies(tmp_path):
    """`sled up --port P` serves the gateway on P (as `sled gateway --port` does); a child that
    dies stops the stack and `sled up` exits 1."""
    (port,) = free_ports(1)
    overrides = stack_overrides("smollm2", {"ngram": {"kind": "ngram", "gamma": 4}}, gateway__default_model="ngram")
    flags = [a for item in overrides for a in ("--set", item)]
    with open(tmp_path / "up.log", "wb") as out:
        up = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pipeline", *flags, "up", "--drafters", "ngram", "--port", str(port),
            stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 240
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while True:
                assert up.returncode is None, (tmp_path / "up.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the gateway never answered on --port"
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(f"http://127.0.0.1:{port}/health") as response:
                        # the gateway on --port, and the whole stack ready
                        if response.status == 200 and "SLED is up" in (tmp_path / "up.log").read_text():
                            break
                await asyncio.sleep(0.5)
        children = _children(up.pid)
        assert len(children) == 4, children  # broker, verifier, drafter, gateway
        drafter = next(pid for pid, cmd in children.items() if cmd.rstrip().endswith("drafter ngram"))
        os.kill(drafter, signal.SIGKILL)
        assert await asyncio.wait_for(up.wait(), 60) == 1
        for pid in children:  # the rest were stopped
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    finally:
        if up.returncode is None:
            up.kill()
            await up.wait()
    assert "drafter-ngram exited; stopping the stack" in (tmp_path / "up.log").read_text()


def test_up_and_gateway_share_the_http_flags():
    from pipeline.cli import build_parser

    for command in (["up"], ["gateway"]):
        args = build_parser().parse_args([*command, "--host", "0.0.0.0", "--port", "18431"])
        assert (args.host, args.port) == ("0.0.0.0", 18431), command
