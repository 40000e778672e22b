"""Figures that cross the wire as typed data (carried by pipeline/protocol.py messages)."""

from __future__ import annotations

import bisect

import msgspec


class VerifierFigures(msgspec.Struct, omit_defaults=True):
    """A verifier's counters, kept by workers/target.py and carried by Ready and Heartbeat."""

    batches: int = 0
    items: int = 0  # proposals verified = verify rounds
    item_errors: int = 0
    prefills: int = 0  # sessions (re)built from a history
    prefill_tokens: int = 0
    prefill_cpu_s: float = 0.0  # process CPU time spent prefilling (to tell prefill from decode work)
    # process CPU time while verify_batch ran (workers/forward_log.py): the rest of a verifier
    # process's CPU time is its messaging between batches (decode, encode, sockets, heartbeats)
    batch_cpu_s: float = 0.0
    # the verifier process's CPU time when these figures were taken (set by the worker), so that a
    # reader subtracts batch_cpu_s from a total of the same instant
    process_cpu_s: float = 0.0
    verify_tokens: int = 0  # real (unpadded) rows of verify forwards
    padded_tokens: int = 0  # rows including padding
    target_tokens: int = 0  # prefill + verify
    draft_tokens: int = 0
    accepted_tokens: int = 0
    compute_s: float = 0.0
    evictions: int = 0
    closed: int = 0
    sessions: int = 0
    cache_bytes: int = 0
    errors: dict[str, int] = {}  # item errors by code
    rejected_frames: int = 0  # set by the worker (workers/verifier.py)
    backend: str = "eager"  # verifier.backend in use (set by the worker)
    # (sessions, rows) of every forward (workers/forward_log.py), for `sled bench`'s GPU projection
    forwards: dict = {}
    prefill_forwards: int = 0  # forwards that prefilled histories (several sessions share one)

    def as_dict(self) -> dict:
        return msgspec.structs.asdict(self)


class Histogram(msgspec.Struct):
    """Bucket counts as Prometheus keeps them (one per upper bound, then +Inf), kept by the process
    that observes the values and exported as they are (gateway/metrics.py)."""

    bounds: list[float]
    counts: list[int] = []
    sum: float = 0.0
    count: int = 0

    def __post_init__(self):
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, count) pairs as prometheus_client's HistogramMetricFamily takes them."""
        out, total = [], 0
        for bound, n in zip([*map(repr, self.bounds), "+Inf"], self.counts):
            total += n
            out.append((bound, total))
        return out

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else 0.0


BATCH_SESSION_BOUNDS = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]
BATCH_ROW_BOUNDS = [4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0]
WAIT_BOUNDS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]
VERIFY_BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]


class BrokerFigures(msgspec.Struct):
    """The broker's counters and histograms, observed where they happen (brokers/broker.py) and
    carried as they are in its StatsReply: sums and bucket counts, never means."""

    proposals: int = 0  # plain_rounds included
    verdicts: int = 0
    batches: int = 0
    plain_rounds: int = 0  # rounds the broker queued itself after a proposal's (Propose.plain_after)
    ahead_queued: int = 0  # proposals sent ahead whose condition held (Propose.if_accepted): queued at once
    ahead_void: int = 0  # proposals sent ahead that their predecessor's verdict refuted: dropped
    undeliverable: int = 0
    verifiers_lost: int = 0
    drafters_lost: int = 0
    rejected: dict[str, int] = {}  # by error code
    batch_sessions: Histogram = msgspec.field(default_factory=lambda: Histogram(list(BATCH_SESSION_BOUNDS)))
    batch_rows: Histogram = msgspec.field(default_factory=lambda: Histogram(list(BATCH_ROW_BOUNDS)))
    queue_wait_s: dict[str, Histogram] = {}  # arrival to dispatch, by drafter class (Propose.drafter_kind)
    verify_s: dict[str, Histogram] = {}  # dispatch to verdicts, by verifier

    def count_rejection(self, code: str) -> None:
        self.rejected[code] = self.rejected.get(code, 0) + 1

    def observe_wait(self, drafter_kind: str, wait_s: float) -> None:
        _keyed(self.queue_wait_s, drafter_kind or "?", WAIT_BOUNDS).observe(wait_s)

    def observe_verify(self, verifier: str, seconds: float) -> None:
        _keyed(self.verify_s, verifier, VERIFY_BOUNDS).observe(seconds)

    @property
    def queue_wait(self) -> Histogram:
        """Queue wait over every drafter class."""
        return merged(self.queue_wait_s.values()) or Histogram(list(WAIT_BOUNDS))

    @classmethod
    def of(cls, snapshot: dict) -> "BrokerFigures":
        """Typed, from a broker's StatsReply (the routing state it also carries is left out)."""
        return msgspec.convert(snapshot, cls)


def _keyed(hists: dict[str, Histogram], key: str, bounds: list[float]) -> Histogram:
    hist = hists.get(key)
    if hist is None:
        hist = hists[key] = Histogram(list(bounds))
    return hist


def merged(hists) -> Histogram | None:
    """One histogram of several with the same bounds (queue wait over all drafter classes)."""
    hists = list(hists)
    if not hists:
        return None
    out = Histogram(list(hists[0].bounds))
    for h in hists:
        out.counts = [a + b for a, b in zip(out.counts, h.counts)]
        out.sum += h.sum
        out.count += h.count
    return out


class VerifierView(VerifierFigures, omit_defaults=False):
    """One verifier as the broker reports it: the verifier's own figures (its last Ready or
    Heartbeat) and the broker's routing state for it."""

    queued: int = 0
    superseded: int = 0
    busy: bool = False
    holds: int = 0
    held_ms: float = 0.0
    verify_time_fit_ms: list[float] = []  # [a, b, c] of the round trips' fit (brokers/estimator.py)
    verify_cost_fit_ms: list[float] = []  # [a, b, c] of the compute the verifier reported, which prices rows
    utilisation: float = 0.0
    row_cost_ms: float = 0.0
    round_cost_ms: float = 0.0


class BrokerSnapshot(BrokerFigures):
    """The broker's StatsReply: its figures and what it routes now."""

    refused: dict[str, int] = {}  # CURVE handshakes refused, by reason; none are checked with CURVE off
    drafters: int = 0
    sessions: int = 0
    verifiers: dict[str, VerifierView] = {}


class DrafterFigures(msgspec.Struct):
    """A drafter's counters (workers/drafter.py), and its StatsReply."""

    drafter: str = ""
    kind: str = ""
    gamma: int = 0
    requests: int = 0
    active: int = 0
    rounds: int = 0
    proposed: int = 0  # draft tokens sent
    accepted: int = 0  # draft tokens the target accepted
    generated: int = 0  # tokens delivered to clients
    resyncs: int = 0
    retries: int = 0
    timeouts: int = 0
    stale_replies: int = 0
    failed: int = 0
    rejected_frames: int = 0
    reconnects: int = 0
    bytes_sent: int = 0  # proposal frames to the broker (resends included)
    bytes_received: int = 0  # verdict frames from the broker (features included)
    draft_s: float = 0.0  # device time spent drafting (emulated device time when emulate_slowdown is set)
    gamma_sum: int = 0  # draft lengths asked for, summed over rounds (the adaptive policy's or the fixed gamma)
    proactive_hits: int = 0  # drafts made ahead that the verdict confirmed: the next proposal left at once
    proactive_misses: int = 0
    proactive_wasted: int = 0  # tokens drafted ahead and dropped
    proactive_wasted_s: float = 0.0  # device seconds those took
    plain_rounds: int = 0  # rounds the broker ran on its own after a proposal without a draft (drafters.NAME.burst)
    sent_ahead: int = 0  # proposals sent before the verdict they assume (Propose.if_accepted)
    sent_ahead_confirmed: int = 0  # of them, those the verdict confirmed: queued at the verdict, no link round trip
    refused: dict[str, int] = {}  # client-socket handshakes refused, by reason
    acceptance_rate: float = 0.0  # accepted / proposed, set in each reply
    mean_gamma: float = 0.0  # gamma_sum / rounds, set in each reply

    def reply(self, **identity) -> "DrafterFigures":
        """A copy to send, with the ratios filled in."""
        return msgspec.structs.replace(
            self, **identity, acceptance_rate=self.accepted / self.proposed if self.proposed else 0.0,
            mean_gamma=self.gamma_sum / self.rounds if self.rounds else 0.0)
