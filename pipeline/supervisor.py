"""The one process supervisor: every launcher of the project (`sled up`, `sled demo`, `sled
launch`, the tests, the benchmarks) starts, watches and stops its children through it.

* spawn: a child is an argv, usually ``python -m pipeline <shared --config/--set flags> ROLE``
  (:meth:`Supervisor.role`), with extra environment, stdin closed, output to
  ``log_dir/NAME.log`` (appended, so a restart keeps the earlier run) or inherited, in a session
  of its own (terminal signals reach the supervisor only), and PR_SET_PDEATHSIG so that the
  child gets SIGTERM when the supervisor dies, even by SIGKILL.
* readiness: :meth:`Supervisor.wait_ready` awaits a probe passed in (the stack's: the broker
  lists its verifiers, every drafter answers), failing at once when a child exits meanwhile.
* restart: a child spawned with ``restart=True`` is started again after it exits, after a capped
  exponential back-off (:class:`Backoff`, the Paranoid Pirate's), reset once it has stayed up
  ``Backoff.reset_after_s``; after more than ``max_restarts`` failures in a row it is given up.
  Any other child that exits on its own is a death: :meth:`Supervisor.run` returns its name.
* stop: SIGTERM to every live child in reverse start order (gateway and drafters before the
  verifiers, the broker last), one grace period for all of them together, then SIGKILL.
* exit code: :attr:`Supervisor.exit_code` is 1 when a child failed (see :meth:`failed`), else 0.

Children are plain ``subprocess.Popen`` objects awaited on their pidfd (the child's sentinel:
no thread, no polling), so one supervisor may be driven from any event loop, or from
synchronous code through ``asyncio.run`` (bench/broker_micro.py). Neither torch nor pyzmq is
imported here: `sled launch` runs on the standard library and structlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

log = structlog.get_logger("sled.supervisor")

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ChildDied(Exception):
    """A child that should be running has exited (or the stack did not get ready in time)."""


@dataclass(frozen=True)
class Backoff:
    """Capped exponential back-off between restarts of one child (the Paranoid Pirate's)."""

    base_s: float = 1.0
    cap_s: float = 30.0
    reset_after_s: float = 60.0  # a child up this long counts as healthy again

    def delay(self, failures: int) -> float:
        return min(self.cap_s, self.base_s * 2 ** min(failures, 30))


@dataclass(frozen=True)
class ChildSpec:
    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)  # on top of this process's environment
    restart: bool = False  # start it again after it exits; otherwise an exit is a death


@dataclass
class Child:
    spec: ChildSpec
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    failures: int = 0  # in a row, for the back-off and the restart limit
    restarts: int = 0
    unhealthy: bool = False  # exited on its own (non-zero, or at all when it is not restarted)
    gave_up: bool = False
    killed: bool = False  # by kill(): fault injection, not a failure

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _die_with_parent() -> None:
    """In the child before exec: receive SIGTERM when the supervisor dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


async def wait_exit(proc: subprocess.Popen) -> int:
    """The child's exit code, awaited on its pidfd (readable once it has exited)."""
    if proc.poll() is not None:
        return proc.returncode
    if not hasattr(os, "pidfd_open"):  # not Linux ≥ 5.3: poll
        while proc.poll() is None:
            await asyncio.sleep(0.05)
        return proc.returncode
    loop = asyncio.get_running_loop()
    fd = os.pidfd_open(proc.pid)  # still ours: only proc.poll()/wait() reap it
    exited = loop.create_future()
    loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
    try:
        await exited
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return proc.wait()  # exited already: this only reaps it


class Supervisor:
    """Children by name, in start order; see the module docstring for the rules."""

    def __init__(self, base_args: Sequence[str] = (), *, log_dir: str | Path | None = None, grace_s: float = 10.0,
                 backoff: Backoff | None = None, max_restarts: int = 10, cwd: str | Path | None = None,
                 quiet: bool = False):
        self.base_args = list(base_args)  # --config/--set flags every `python -m pipeline` child gets
        self.log_dir = Path(log_dir) if log_dir else None
        self.grace_s = grace_s
        self.backoff = backoff or Backoff()
        self.max_restarts = max_restarts
        self.cwd = cwd
        self.quiet = quiet  # without a log_dir: drop the children's stdout (ours may carry --json); stderr is ours
        self.children: dict[str, Child] = {}
        self.failures_at_stop: list[str] | None = None

    # --- spawn -----------------------------------------------------------------------------------

    def role(self, name: str, *role_args: str, env: Mapping[str, str] | None = None,
             restart: bool = False) -> ChildSpec:
        """``python -m pipeline <base_args> *role_args`` under ``name``."""
        return ChildSpec(name, self.role_argv(*role_args), dict(env or {}), restart)

    def role_argv(self, *role_args: str) -> tuple[str, ...]:
        return (sys.executable, "-m", "pipeline", *self.base_args, *role_args)

    @staticmethod
    def environment(spec: ChildSpec) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # `python -m pipeline` must resolve from any working directory (an uninstalled checkout)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
        env.update(spec.env)
        return env

    def log_path(self, name: str) -> Path | None:
        return self.log_dir / f"{name}.log" if self.log_dir else None

    def spawn(self, spec: ChildSpec) -> subprocess.Popen:
        """Start ``spec`` now (again, under the same name, if it ran before)."""
        child = self.children.setdefault(spec.name, Child(spec))
        child.spec = spec
        out, err = (subprocess.DEVNULL if self.quiet else None), None
        path = self.log_path(spec.name)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            out = err = open(path, "ab")  # noqa: SIM115 - the child holds its own descriptor; closed below
        try:
            # a session of its own: a Ctrl-C in the terminal reaches the supervisor only, which then
            # stops the children in order (and does not mistake their exits for deaths)
            child.proc = subprocess.Popen(spec.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                          env=self.environment(spec), cwd=self.cwd, start_new_session=True,
                                          preexec_fn=_die_with_parent)
        finally:
            if path is not None:
                out.close()
        child.started_at = time.monotonic()
        child.killed = False
        log.info("child_started", child=spec.name, pid=child.proc.pid)
        return child.proc

    def start(self, specs: Sequence[ChildSpec]) -> None:
        for spec in specs:
            self.spawn(spec)

    @property
    def procs(self) -> dict[str, subprocess.Popen]:
        return {name: c.proc for name, c in self.children.items() if c.proc is not None}

    # --- watch -----------------------------------------------------------------------------------

    def _hint(self, name: str) -> str:
        path = self.log_path(name)
        return f" (log: {path})" if path else ""

    def check_alive(self) -> None:
        """Raise ChildDied for a child that exited on its own and is not being restarted."""
        for name, child in self.children.items():
            if child.killed or (child.spec.restart and not child.gave_up):
                continue
            if child.proc is not None and child.proc.poll() is not None:
                child.unhealthy = True
                raise ChildDied(f"{name} exited with code {child.proc.returncode}" + self._hint(name))

    async def wait_ready(self, probe: Callable[[], Awaitable[bool]], timeout: float, what: str = "children") -> None:
        """Until ``probe()`` says yes (it bounds its own waits); a child's exit fails it at once."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            if await probe():
                return
            if time.monotonic() > deadline:
                raise ChildDied(f"not ready after {timeout:.0f} s (waiting for {what})")
            await asyncio.sleep(0.3)

    async def run(self, stop: asyncio.Event) -> str | None:
        """Until ``stop`` is set: restart the children that restart. Returns early with the name of
        a child that died for good (a child that is not restarted exited, or one was given up
        after too many restarts while nothing else runs); None when ``stop`` was set."""
        watchers = {asyncio.create_task(self._watch(c, stop)): name for name, c in self.children.items()
                    if not c.killed}
        stopping = asyncio.create_task(stop.wait())
        pending = set(watchers)
        try:
            while pending:
                done, pending = await asyncio.wait({stopping, *pending}, return_when=asyncio.FIRST_COMPLETED)
                if stopping in done:
                    return None
                pending.discard(stopping)
                for task in done:
                    child = self.children[watchers[task]]
                    if not child.spec.restart and not child.killed:
                        return watchers[task]
                # a given-up child: carry on while any other runs
            return next((n for n, c in self.children.items() if c.gave_up), None)
        finally:
            stopping.cancel()
            for task in watchers:
                task.cancel()
            await asyncio.gather(stopping, *watchers, return_exceptions=True)

    async def _watch(self, child: Child, stop: asyncio.Event) -> None:
        """Returns when ``child`` is down for good; restarts it meanwhile when it restarts."""
        name = child.spec.name
        while True:
            code = await wait_exit(child.proc)
            if child.killed or stop.is_set():
                return
            up_s = time.monotonic() - child.started_at
            if not child.spec.restart:
                child.unhealthy = True
                log.error("child_died", child=name, pid=child.proc.pid, code=code, up_s=round(up_s, 2))
                return
            if up_s >= self.backoff.reset_after_s:
                child.failures = 0
            child.unhealthy = child.unhealthy or code != 0
            if child.failures >= self.max_restarts:
                child.gave_up = True
                log.error("child_given_up", child=name, pid=child.proc.pid, code=code, restarts=child.restarts)
                return
            delay = self.backoff.delay(child.failures)
            child.failures += 1
            child.restarts += 1
            log.warning("child_exited", child=name, pid=child.proc.pid, code=code, restart_in_s=round(delay, 2),
                        restarts=child.restarts)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return
            self.spawn(child.spec)

    def failed(self) -> list[str]:
        """Children that failed: given up after too many restarts, or exited on their own and not
        healthy again now (running and up ``backoff.reset_after_s`` since the last start)."""
        now = time.monotonic()
        out = []
        for name, child in self.children.items():
            if child.killed:
                continue
            if not child.running() and not child.spec.restart and child.proc is not None:
                child.unhealthy = True  # exited while nobody watched
            healthy_again = child.running() and now - child.started_at >= self.backoff.reset_after_s
            if child.gave_up or (child.unhealthy and not healthy_again):
                out.append(name)
        return out

    @property
    def exit_code(self) -> int:
        failed = self.failures_at_stop if self.failures_at_stop is not None else self.failed()
        return 1 if failed else 0

    # --- stop ------------------------------------------------------------------------------------

    async def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal one child and wait for it (fault injection: not a failure); restart() brings it back."""
        child = self.children[name]
        child.killed = True
        with contextlib.suppress(ProcessLookupError):
            child.proc.send_signal(sig)
        await wait_exit(child.proc)

    async def stop(self) -> None:
        """SIGTERM every live child in reverse start order, one grace for all, then SIGKILL."""
        if self.failures_at_stop is None:
            self.failures_at_stop = self.failed()  # judged before our own SIGTERMs end them
        live = {name: c.proc for name, c in reversed(self.children.items()) if c.running()}
        for proc in live.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        waits = {asyncio.create_task(wait_exit(p)): name for name, p in live.items()}
        if waits:
            _, late = await asyncio.wait(waits, timeout=self.grace_s)
            for task in late:
                log.warning("child_killed", child=waits[task], grace_s=self.grace_s)
                with contextlib.suppress(ProcessLookupError):
                    live[waits[task]].kill()
            if late:
                await asyncio.wait(late)
        log.info("children_stopped", codes={n: c.proc.returncode for n, c in self.children.items() if c.proc},
                 failed=self.failures_at_stop)
