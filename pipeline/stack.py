"""Run a whole stack on this machine: broker, verifier and drafters as separate processes.

Children are ordinary ``python -m pipeline ROLE`` processes (the same entry a user runs), given
the same configuration file and overrides, started and stopped by the one supervisor
(pipeline/supervisor.py). A child that exits while the stack should be running is reported at
once (ChildDied), not discovered by a hang. On stop each child gets SIGTERM in reverse start
order, one bounded grace period, then SIGKILL. ``serve_up`` is `sled up`.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from pathlib import Path

import structlog

from pipeline.client import DrafterClient, broker_stats
from pipeline.config import Config
from pipeline.security import client_keys, drafter_keys_for_client
from pipeline.supervisor import Supervisor

log = structlog.get_logger("sled.stack")


class Stack:
    def __init__(self, config: Config, config_path: str | None, overrides: list[str], drafters: list[str],
                 *, verifiers: int = 1, gateway: bool = False, log_dir: str | Path | None = None):
        self.config = config
        base_args = ["--config", str(config_path)] if config_path else []
        for item in overrides:
            base_args += ["--set", item]
        self.drafters = drafters
        self.verifiers = verifiers
        self.gateway = gateway
        self.log_dir = Path(log_dir) if log_dir else None
        self.supervisor = Supervisor(base_args, log_dir=self.log_dir)

    @property
    def procs(self):
        return self.supervisor.procs

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
        self.supervisor.start([self.supervisor.role(name, *args) for name, args in self._role_args().items()])
        await self.wait_ready(timeout)

    async def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill one child (fault injection); it stays down until restart()."""
        await self.supervisor.kill(name, sig)

    async def restart(self, name: str) -> None:
        self.supervisor.spawn(self.supervisor.role(name, *self._role_args()[name]))

    def check_alive(self) -> None:
        self.supervisor.check_alive()

    async def wait_ready(self, timeout: float) -> None:
        """Until the broker has every verifier registered and every drafter answers."""
        pending = set(self.drafters)

        async def ready() -> bool:
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
                    return True
            return False

        what = f"drafters {sorted(pending)} or verifiers" + (" (or the gateway's view of the drafters)" if self.gateway else "")
        await self.supervisor.wait_ready(ready, timeout, what=what)

    async def _gateway_up(self) -> bool:
        """The gateway answers and has itself seen every started drafter answer (``/v1/models``
        lists it available, from its poll every ``gateway.stats_interval_s``). Its own client
        sockets connected before the drafters bound, and ZeroMQ's reconnect backs off (up to 5 s),
        so a request sent as soon as the drafters answer us could still find the gateway's view of
        one down: a 503 in a test that started at once."""
        if not self.gateway:
            return True
        import aiohttp

        url = f"http://{self.config.gateway.host}:{self.config.gateway.port}/v1/models"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as http:
                async with http.get(url, headers=self._gateway_auth()) as response:
                    if response.status != 200:
                        return False
                    models = (await response.json())["data"]
        except (aiohttp.ClientError, TimeoutError, KeyError, ValueError):
            return False
        available = {m["id"] for m in models if m.get("sled", {}).get("available")}
        return set(self.drafters) <= available

    def _gateway_auth(self) -> dict:
        g = self.config.gateway
        keys = list(g.api_keys)
        if not keys and g.api_keys_file:
            from gateway.serve import read_api_keys

            with contextlib.suppress(OSError):
                keys = read_api_keys(g.api_keys_file)
        return {"Authorization": f"Bearer {keys[0]}"} if keys else {}

    async def wait_any_exit(self, stop: asyncio.Event | None = None) -> str | None:
        """The name of the first child to exit (for `sled up`); None once ``stop`` is set."""
        return await self.supervisor.run(stop or asyncio.Event())

    async def stop(self, grace: float = 10.0) -> None:
        self.supervisor.grace_s = grace
        await self.supervisor.stop()

    @property
    def exit_code(self) -> int:
        return self.supervisor.exit_code

    async def __aenter__(self) -> "Stack":
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()


async def serve_up(config: Config, stop: asyncio.Event, *, config_path: str | None, overrides: list[str],
                   drafters: list[str], gateway: bool) -> int:
    """`sled up`: the stack until ``stop`` is set (exit 0) or a child dies (exit 1)."""
    stack = Stack(config, config_path, overrides, drafters, gateway=gateway)
    try:
        await stack.start()
        print("SLED is up: broker", config.broker.frontend, "| drafters:",
              ", ".join(f"{n} at {config.drafter(n).client}" for n in drafters), file=sys.stderr)
        if gateway:
            print(f"gateway: http://{config.gateway.host}:{config.gateway.port}/", file=sys.stderr)
        died = await stack.wait_any_exit(stop)
        if died is not None:
            print(f"{died} exited; stopping the stack", file=sys.stderr)
    finally:
        await stack.stop()
    return stack.exit_code
