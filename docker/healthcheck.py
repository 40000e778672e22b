"""Container health checks: ``python docker/healthcheck.py ROLE [ARG]``, exit 0 when healthy.

  broker            the broker answers a StatsRequest on its frontend
  verifier [PREFIX] the broker lists a verifier whose name starts with PREFIX (default:
                    verifier.name), i.e. this container's workers are registered
  drafter NAME      the drafter answers a StatsRequest on its client endpoint
  gateway           GET /health answers 200

Endpoints come from the same configuration as the role itself (config.toml, then the
container's SLED_* variables), so the check follows any override. A wildcard bind address
(0.0.0.0, *) is probed on 127.0.0.1, from inside the container. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project, from any directory

TIMEOUT_S = 3.0


def probe_endpoint(endpoint: str) -> str:
    """Where to connect to reach a socket bound at ``endpoint`` from the same host."""
    scheme, sep, rest = endpoint.partition("://")
    host, colon, port = rest.rpartition(":")
    if sep and colon and host in ("0.0.0.0", "*", "[::]", "::"):
        return f"{scheme}://127.0.0.1:{port}"
    return endpoint


def probe_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _operator_keys(config):
    """The operator's CURVE keys when the broker requires them (security.curve), else None."""
    security = getattr(config, "security", None)
    if not getattr(security, "curve", False):
        return None
    from pipeline.security import client_keys

    return client_keys(config, security.admin_key)


async def check(role: str, arg: str | None) -> str:
    """A one-line reason when unhealthy, "" when healthy."""
    from pipeline.client import DrafterClient, broker_stats
    from pipeline.config import load_config

    config = load_config()
    if role in ("broker", "verifier"):
        keys = _operator_keys(config)
        try:
            extra = {"curve": keys} if keys is not None else {}
            stats = await broker_stats(probe_endpoint(config.broker.frontend), timeout=TIMEOUT_S, **extra)
        except (TimeoutError, OSError):
            return f"broker at {config.broker.frontend} does not answer"
        if role == "verifier":
            prefix = arg or config.verifier.name
            if not any(name.startswith(prefix) for name in stats["verifiers"]):
                return f"no verifier named {prefix}* registered (have: {', '.join(stats['verifiers']) or 'none'})"
        return ""
    if role == "drafter":
        if not arg:
            return "drafter needs its name"
        from pipeline.security import drafter_keys_for_client

        # CURVE exactly when the drafter serves it: decided by its bind endpoint, not the probe's
        client = DrafterClient(probe_endpoint(config.drafter(arg).client), curve=drafter_keys_for_client(config, arg))
        try:
            await client.stats(timeout=TIMEOUT_S)
        except TimeoutError:
            return f"drafter {arg} at {config.drafter(arg).client} does not answer"
        finally:
            client.close()
        return ""
    if role == "gateway":
        import urllib.request

        url = f"http://{probe_host(config.gateway.host)}:{config.gateway.port}/health"
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:  # noqa: S310 - our own URL
                return "" if response.status == 200 else f"{url} answered {response.status}"
        except OSError as exc:
            return f"{url}: {exc}"
    return f"unknown role {role!r} (broker, verifier, drafter, gateway)"


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    reason = asyncio.run(check(argv[0], argv[1] if len(argv) > 1 else None))
    if reason:
        print(f"unhealthy: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
