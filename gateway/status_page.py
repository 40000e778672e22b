"""The live status page's data: one JSON snapshot of the pipeline with the history points newer
than ``since``. The page itself is static HTML + JS (gateway/static/) that polls this once a
second and draws its plots as inline SVG: no front-end build step."""

from __future__ import annotations

import time
from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"


def _gauge_total(gauge) -> float:
    return sum(s.value for family in gauge.collect() for s in family.samples)


def status_snapshot(gateway, since: float = 0.0) -> dict:
    st = gateway.state
    b = st.broker
    figures = st.figures
    last = st.history[-1] if st.history else {}
    verifiers = []
    for name, v in sorted(b.get("verifiers", {}).items()):
        drafted = v.get("draft_tokens", 0)
        verifiers.append({
            "name": name,
            "sessions": v.get("sessions", 0),
            "queued": v.get("queued", 0),
            "busy": bool(v.get("busy")),
            "batches": v.get("batches", 0),
            "cache_mb": v.get("cache_bytes", 0) / 2**20,
            "acceptance_rate": v.get("accepted_tokens", 0) / drafted if drafted else None,
            "utilization": last.get("verifiers", {}).get(name, {}).get("utilization"),
        })
    drafters = []
    for name, fig in sorted(st.drafters.items()):
        s = fig.stats
        drafters.append({
            "name": name, "kind": fig.kind, "gamma": fig.gamma, "up": fig.up,
            "default": name == gateway.default_drafter,
            "active": s.get("active", 0), "requests": s.get("requests", 0), "generated": s.get("generated", 0),
            "acceptance_rate": s.get("acceptance_rate") if s.get("proposed") else None,
            # the speculation policy's figures since the drafter started
            "mean_gamma": s.get("mean_gamma") if s.get("rounds") else None,
            "tokens_per_round": s.get("generated", 0) / s["rounds"] if s.get("rounds") else None,
            "proactive_hits": s.get("proactive_hits", 0),
            "proactive_wasted": s.get("proactive_wasted", 0),
            "plain_rounds": s.get("plain_rounds", 0),  # rounds the server decoded on its own (burst)
            "sent_ahead_confirmed": s.get("sent_ahead_confirmed", 0),  # rounds queued at the verdict they assumed
        })
    return {
        "now": time.time(),
        "updated": st.updated,
        "interval_s": gateway.config.gateway.stats_interval_s,
        "target": gateway.target,
        "broker": {
            "up": st.broker_up,
            "sessions": b.get("sessions", 0),
            "proposals": b.get("proposals", 0),
            "verdicts": b.get("verdicts", 0),
            "batches": b.get("batches", 0),
            "mean_batch_sessions": figures.batch_sessions.mean,
            "mean_queue_wait_ms": 1000 * figures.queue_wait.mean,
            "rejected": b.get("rejected", {}),
        },
        "rates": {"proposals_per_s": st.proposals_per_s, "verdicts_per_s": st.verdicts_per_s,
                  "tokens_per_s": st.tokens_per_s},
        "gateway": {"active_sessions": _gauge_total(gateway.metrics.active)},
        "kinds": st.acceptance_by_kind(),
        "verifiers": verifiers,
        "drafters": drafters,
        "history": [p for p in st.history if p["t"] > since],
    }
