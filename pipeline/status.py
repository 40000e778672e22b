"""`sled status`: one look at the running stack, read over the pipeline itself (the broker's
figures with its verifiers', and each configured drafter's), so it works with or without the
gateway. Exit code 1 when the broker does not answer. `pipeline.cli` finds this module and calls
:func:`register`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import zmq.asyncio

from pipeline.client import DrafterClient, broker_stats
from pipeline.security import client_keys, drafter_keys_for_client
from pipeline.config import Config
from pipeline.figures import BrokerFigures


async def collect(config: Config, timeout: float) -> dict:
    ctx = zmq.asyncio.Context()
    clients = {n: DrafterClient(d.client, ctx, curve=drafter_keys_for_client(config, n)) for n, d in config.drafters.items()}

    async def broker() -> dict | None:
        try:
            return await broker_stats(config.broker.frontend, timeout=timeout, ctx=ctx,
                                      curve=client_keys(config, config.security.admin_key))
        except (TimeoutError, OSError):
            return None

    async def drafter(client: DrafterClient) -> dict | None:
        try:
            return await client.stats(timeout=timeout)
        except TimeoutError:
            return None

    try:
        b, *ds = await asyncio.gather(broker(), *(drafter(c) for c in clients.values()))
    finally:
        for c in clients.values():
            c.close()
        ctx.term()
    return {"broker": b, "drafters": dict(zip(clients, ds))}


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def _pct(num: float, den: float) -> str:
    return f"{100 * num / den:.1f}%" if den else "-"


def _refused(counts: dict | None) -> str:
    """Handshakes refused by reason (unauthorised, wrong_role); "CURVE off" when none are checked."""
    if not counts:
        return "CURVE off (local processes are trusted)"
    return "  ".join(f"{reason} {n}" for reason, n in sorted(counts.items()))


def render(config: Config, figures: dict) -> str:
    b = figures["broker"]
    out = []
    if b is None:
        out.append(f"broker {config.broker.frontend}: NOT ANSWERING")
    else:
        rejected = sum(b.get("rejected", {}).values())
        f = BrokerFigures.of(b)
        out.append(f"broker {config.broker.frontend}: up  sessions {b['sessions']}  proposals {b['proposals']}  "
                   f"verdicts {b['verdicts']}  batches {b['batches']}  mean batch {f.batch_sessions.mean:.2f} sessions"
                   f"  queue wait {1000 * f.queue_wait.mean:.2f} ms  rejected {rejected}")
        out.append("refused handshakes: " + _refused(b.get("refused")))
        rows = [[name, v.get("sessions", 0), v.get("queued", 0), "yes" if v.get("busy") else "no", v.get("batches", 0),
                 _pct(v.get("accepted_tokens", 0), v.get("draft_tokens", 0)), f"{v.get('cache_bytes', 0) / 2**20:.1f} MB"]
                for name, v in sorted(b.get("verifiers", {}).items())]
        out += ["", _table(["VERIFIER", "SESSIONS", "QUEUED", "BUSY", "BATCHES", "ACCEPTED", "CACHE"], rows)
                if rows else "no verifier registered"]
    rows, kinds = [], {}
    for name, d in figures["drafters"].items():
        cfg = config.drafters[name]
        if d is None:
            rows.append([name, cfg.kind, cfg.gamma, "down", "-", "-", "-", "-"])
            continue
        k = kinds.setdefault(d.get("kind", cfg.kind), [0, 0])
        k[0] += d.get("proposed", 0)
        k[1] += d.get("accepted", 0)
        rows.append([name, d.get("kind", cfg.kind), d.get("gamma", cfg.gamma), "up", d.get("active", 0),
                     d.get("requests", 0), d.get("generated", 0), _pct(d.get("accepted", 0), d.get("proposed", 0))])
    out += ["", _table(["DRAFTER", "KIND", "GAMMA", "STATE", "ACTIVE", "REQUESTS", "GENERATED", "ACCEPTED"], rows)]
    refused = {n: d["refused"] for n, d in figures["drafters"].items() if d and d.get("refused")}
    if refused:
        out += ["", "client sockets, refused handshakes: " + "; ".join(f"{n} {_refused(r)}" for n, r in sorted(refused.items()))]
    if kinds:
        out += ["", "acceptance by kind: " + "  ".join(f"{k} {_pct(a, p)}" for k, (p, a) in sorted(kinds.items()))]
    return "\n".join(out)


def status(config: Config, *, as_json: bool = False, timeout: float = 2.0, stream=None) -> int:
    stream = stream or sys.stdout
    figures = asyncio.run(collect(config, timeout))
    if as_json:
        print(json.dumps(figures, sort_keys=True), file=stream)
    else:
        print(render(config, figures), file=stream)
    return 0 if figures["broker"] is not None else 1


def register(subparsers) -> None:
    p = subparsers.add_parser("status", help="print verifiers, sessions, queue depth and acceptance of the running stack")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object instead")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for each process (default 2)")
    p.set_defaults(handler=run_status)


def run_status(args: argparse.Namespace) -> int:
    return status(args.sled_config, as_json=args.json, timeout=args.timeout)
