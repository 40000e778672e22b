"""Prometheus metrics of the gateway and, collected over the pipeline, of broker, verifiers and
drafters (see pipeline_stats.py: those processes expose no HTTP endpoint of their own).

Names: ``sled_gateway_*`` are measured by the gateway on its own requests; ``sled_broker_*``,
``sled_verifier_*`` and ``sled_drafter_*`` mirror the processes' cumulative counters as of the
last poll; ``sled_batch_*``, ``sled_queue_wait_seconds`` and ``sled_verify_batch_seconds`` are
the broker's own histograms (pipeline/figures.py), exported bucket for bucket. Every metric
lives in one registry per app, so tests can build apps side by side.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from gateway.pipeline_stats import PipelineState
from pipeline import figures

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ROUND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

VERIFIER_COUNTERS = {  # key in the verifier's figures -> (metric name, help)
    "batches": ("sled_verifier_batches", "Batches verified."),
    "items": ("sled_verifier_items", "Proposals verified (verify rounds)."),
    "target_tokens": ("sled_verifier_target_tokens", "Target rows computed (prefill + verify)."),
    "draft_tokens": ("sled_verifier_draft_tokens", "Draft tokens checked."),
    "accepted_tokens": ("sled_verifier_accepted_tokens", "Draft tokens accepted."),
    "compute_s": ("sled_verifier_compute_seconds", "Seconds spent in target forwards."),
    "evictions": ("sled_verifier_evictions", "Session caches evicted (LRU)."),
    "item_errors": ("sled_verifier_item_errors", "Proposals answered with an error."),
}
DRAFTER_COUNTERS = {
    "requests": ("sled_drafter_requests", "Generate requests started on the drafter."),
    "rounds": ("sled_drafter_rounds", "Draft-verify rounds."),
    "proposed": ("sled_drafter_proposed_tokens", "Draft tokens proposed."),
    "accepted": ("sled_drafter_accepted_tokens", "Draft tokens the target accepted."),
    "generated": ("sled_drafter_generated_tokens", "Tokens delivered to clients."),
    "failed": ("sled_drafter_failed_sessions", "Sessions that ended in an error."),
}


class GatewayMetrics:
    def __init__(self, state: PipelineState):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("sled_gateway_requests", "HTTP requests answered.", ["endpoint", "status"], registry=r)
        self.errors = Counter("sled_gateway_errors", "Requests that failed, by kind.", ["kind"], registry=r)
        self.active = Gauge("sled_gateway_active_sessions", "Sessions the gateway has open.", ["drafter"], registry=r)
        self.prompt_tokens = Counter("sled_gateway_prompt_tokens", "Prompt tokens received.", ["drafter"], registry=r)
        self.completion_tokens = Counter("sled_gateway_completion_tokens", "Tokens generated for gateway requests.",
                                         ["drafter", "kind"], registry=r)
        self.request_seconds = Histogram("sled_gateway_request_seconds", "Time from request to last token.",
                                         ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_token_seconds = Histogram("sled_gateway_first_token_seconds", "Time from request to first token.",
                                             ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.round_seconds = Histogram(
            "sled_gateway_round_seconds",
            "Time between two verdicts of a session as the gateway sees them: one draft + verify round trip.",
            ["kind"], buckets=ROUND_BUCKETS, registry=r)
        r.register(PipelineCollector(state))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _histograms(name: str, doc: str, hists: dict[str, figures.Histogram], label: str = "") -> HistogramMetricFamily:
    """One family from the broker's histograms: unlabelled ({"": h}) or one per ``label`` value."""
    family = HistogramMetricFamily(name, doc, labels=[label] if label else None)
    for value, hist in sorted(hists.items()):
        family.add_metric([value] if label else [], hist.cumulative(), hist.sum)
    return family


class PipelineCollector(Collector):
    """Reads the poller's latest figures at scrape time (custom collector: the counters are the
    processes' own cumulative values, mirrored, not incremented here)."""

    def __init__(self, state: PipelineState):
        self.state = state

    def describe(self):
        return []  # families depend on which verifiers and drafters answered

    def collect(self):
        st = self.state
        b = st.broker
        yield GaugeMetricFamily("sled_broker_up", "1 when the broker answered the last poll.", value=int(st.broker_up))
        yield CounterMetricFamily("sled_broker_proposals", "Proposals received by the broker.", value=b.get("proposals", 0))
        yield CounterMetricFamily("sled_broker_verdicts", "Verdicts sent by the broker.", value=b.get("verdicts", 0))
        yield CounterMetricFamily("sled_broker_batches", "Batches dispatched to verifiers.", value=b.get("batches", 0))
        yield GaugeMetricFamily("sled_broker_sessions", "Sessions the broker routes now.", value=b.get("sessions", 0))
        yield GaugeMetricFamily("sled_broker_proposals_per_second", "Proposals per second over the last poll interval.",
                                value=st.proposals_per_s)
        yield GaugeMetricFamily("sled_broker_verdicts_per_second", "Verdicts per second over the last poll interval.",
                                value=st.verdicts_per_s)
        yield GaugeMetricFamily("sled_tokens_per_second", "Tokens generated per second by all drafters, last interval.",
                                value=st.tokens_per_s)
        rejected = CounterMetricFamily("sled_broker_rejected", "Proposals and frames the broker rejected, by code.",
                                       labels=["code"])
        for code, n in sorted(b.get("rejected", {}).items()):
            rejected.add_metric([code], n)
        yield rejected
        refused = CounterMetricFamily("sled_broker_refused", "CURVE handshakes the broker refused, by reason "
                                      "(unauthorised: no valid key; wrong_role: a key allowed on the other socket).",
                                      labels=["reason"])
        for reason, n in sorted(b.get("refused", {}).items()):
            refused.add_metric([reason], n)
        yield refused
        f = st.figures  # the broker's own histograms as of its last answer (empty before one)
        yield _histograms("sled_batch_sessions", "Sessions per verify batch.", {"": f.batch_sessions})
        yield _histograms("sled_batch_tokens", "Target rows per verify batch.", {"": f.batch_rows})
        yield _histograms("sled_queue_wait_seconds", "Broker queue wait per proposal, arrival to dispatch, "
                          "by drafter class.", f.queue_wait_s, "drafter_kind")
        yield _histograms("sled_verify_batch_seconds", "Verify batch time as the broker sees it, dispatch "
                          "to verdicts, by verifier.", f.verify_s, "verifier")
        yield from self._verifiers()
        yield from self._drafters()

    def _verifiers(self):
        verifiers = self.state.broker.get("verifiers", {})
        gauges = {
            "sessions": GaugeMetricFamily("sled_verifier_sessions", "Sessions held by a verifier.", labels=["verifier"]),
            "queued": GaugeMetricFamily("sled_verifier_queued", "Proposals queued for a verifier.", labels=["verifier"]),
            "busy": GaugeMetricFamily("sled_verifier_busy", "1 while a batch is in flight.", labels=["verifier"]),
            "cache_bytes": GaugeMetricFamily("sled_verifier_cache_bytes", "KV cache bytes held.", labels=["verifier"]),
        }
        counters = {key: CounterMetricFamily(name, doc, labels=["verifier"]) for key, (name, doc) in VERIFIER_COUNTERS.items()}
        for name, v in sorted(verifiers.items()):
            for key, family in gauges.items():
                family.add_metric([name], float(v.get(key, 0)))
            for key, family in counters.items():
                family.add_metric([name], float(v.get(key, 0)))
        yield from gauges.values()
        yield from counters.values()

    def _drafters(self):
        labels = ["drafter", "kind"]
        up = GaugeMetricFamily("sled_drafter_up", "1 when the drafter answered the last poll.", labels=labels)
        active = GaugeMetricFamily("sled_drafter_active_sessions", "Sessions running on the drafter.", labels=labels)
        rate = GaugeMetricFamily("sled_drafter_acceptance_rate", "Accepted / proposed draft tokens, since start.",
                                 labels=labels)
        counters = {key: CounterMetricFamily(name, doc, labels=labels) for key, (name, doc) in DRAFTER_COUNTERS.items()}
        refused = CounterMetricFamily("sled_drafter_refused", "CURVE handshakes a drafter's client socket refused, by "
                                      "reason.", labels=[*labels, "reason"])
        for name, fig in sorted(self.state.drafters.items()):
            up.add_metric([name, fig.kind], int(fig.up))
            if not fig.stats:
                continue
            active.add_metric([name, fig.kind], fig.stats.get("active", 0))
            rate.add_metric([name, fig.kind], fig.stats.get("acceptance_rate", 0.0))
            for key, family in counters.items():
                family.add_metric([name, fig.kind], fig.stats.get(key, 0))
            for reason, n in sorted(fig.stats.get("refused", {}).items()):
                refused.add_metric([name, fig.kind, reason], n)
        yield from (up, active, rate, *counters.values(), refused)
        by_kind = GaugeMetricFamily("sled_acceptance_rate", "Accepted / proposed draft tokens per drafter kind.",
                                    labels=["kind"])
        for kind, k in sorted(self.state.acceptance_by_kind().items()):
            by_kind.add_metric([kind], k["acceptance_rate"])
        yield by_kind
