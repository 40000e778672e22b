"""Run a whole stack on this machine: broker, verifier and drafters as separate processes.

Children are ordinary ``python -m pipeline ROLE`` processes (the same entry a user runs), given
the same configuration file and overrides. The launcher watches them: a child that exits
while the stack should be running is reported at once (StackDied), not discovered by a hang.
On stop each child gets SIGTERM, a bounded grace period, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import structlog

from pipeline.client import DrafterClient, broker_stats
from pipeline.config import Config
from pipeline.security import client_keys, drafter_keys_for_client

log = structlog.get_logger("sled.launcher")


class StackDied(Exception):
    pass


class Stack:
    def __init__(self, config: Config, config_path: str | None, overrides: list[str], drafters: list[str],
                 *, verifiers: int = 1, gateway: bool = False, log_dir: str | Path | None = None):
        self.config = config
        self.base_args = ["--config", str(config_path)] if config_path else []
        for item in overrides:
            self.base_args += ["--set", item]
        self.drafters = drafters
        self.verifiers = verifiers
        self.gateway = gateway
        self.log_dir = Path(log_dir) if log_dir else None
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self._logs: list = []

    async def _spawn(self, name: str, *role_args: str) -> None:
        out = None
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
            self._logs.append(out)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.procs[name] = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pipeline", *self.base_args, *role_args,
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, env=env,
        )
        log.info("process_started", process=name, pid=self.procs[name].pid)

    def _role_args(self) -> dict[str, tuple[str, ...]]:
        roles = {"broker": ("broker",)}
        for i in range(self.verifiers):
            roles[f"verifier-{i}"] = ("--set", f'verifier.name="verifier-{i}"', "verifier")
        for name in self.drafters:
            roles[f"drafter-{name}"] = ("drafter", name)
        if self.gateway:
            roles["gateway"] = ("gateway",)
        return roles

    async def start(self, timeout: float = 180.0) -> None:
        for name, args in self._role_args().items():
            await self._spawn(name, *args)
        await self.wait_ready(timeout)

    async def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill one child (fault injection); it stays down until restart()."""
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        await proc.wait()

    async def restart(self, name: str) -> None:
        await self._spawn(name, *self._role_args()[name])

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.returncode is not None:
                raise StackDied(f"{name} exited with code {proc.returncode}" + self._log_hint(name))

    def _log_hint(self, name: str) -> str:
        return f" (log: {self.log_dir / (name + '.log')})" if self.log_dir else ""

    async def wait_ready(self, timeout: float) -> None:
        """Until the broker has every verifier registered and every drafter answers."""
        deadline = time.monotonic() + timeout
        pending = set(self.drafters)
        while True:
            self.check_alive()
            if time.monotonic() > deadline:
                raise StackDied(f"stack not ready after {timeout:.0f} s (waiting for drafters {sorted(pending)} or verifiers)")
            with contextlib.suppress(TimeoutError, OSError):
                admin = client_keys(self.config, self.config.security.admin_key)
                stats = await broker_stats(self.config.broker.frontend, timeout=1.0, curve=admin)
                for name in list(pending):
                    client = DrafterClient(self.config.drafter(name).client,
                                           curve=drafter_keys_for_client(self.config, name))
                    try:
                        await client.stats(timeout=1.0)
                        pending.discard(name)
                    except TimeoutError:
                        pass
                    finally:
                        client.close()
                if len(stats["verifiers"]) >= self.verifiers and not pending and await self._gateway_up():
                    log.info("stack_ready", verifiers=len(stats["verifiers"]), drafters=self.drafters)
                    return
            await asyncio.sleep(0.3)

    async def _gateway_up(self) -> bool:
        if not self.gateway:
            return True
        import aiohttp

        url = f"http://{self.config.gateway.host}:{self.config.gateway.port}/health"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as http:
                async with http.get(url) as response:
                    return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def wait_any_exit(self) -> str:
        """Return the name of the first child to exit (for `sled up`)."""
        waits = {asyncio.create_task(proc.wait()): name for name, proc in self.procs.items()}
        done, rest = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in rest:
            task.cancel()
        return waits[next(iter(done))]

    async def stop(self, grace: float = 10.0) -> None:
        # drafters first, so they can close their sessions while the broker still listens
        order = sorted(self.procs, key=lambda n: (n != "gateway", not n.startswith("drafter"), n == "broker"))
        for name in order:
            proc = self.procs[name]
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for name in order:
            proc = self.procs[name]
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                log.warning("process_killed", process=name)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for fh in self._logs:
            fh.close()

    async def __aenter__(self) -> "Stack":
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()
