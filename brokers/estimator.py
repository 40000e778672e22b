"""VerifyTimeEstimator: what a verify batch of (sessions, rows) costs one verifier, learned online.

Pure (no sockets, no clock of its own): the broker feeds it every dispatched batch it timed,
``observe(sessions, rows, seconds)``, and asks ``seconds(sessions, rows)`` when it forms a batch
and ``row_cost_ms(sessions, rows)`` when it answers a drafter.

The model is linear, t = a + b·sessions + c·rows (a: a forward's fixed cost -- weights read,
launch, Python; b: per session -- its cache gathered and cropped, its acceptance; c: per row --
the row's share of the matmuls and attention), fitted by recursive least squares with a
forgetting factor, so that it follows a verifier whose speed drifts (other load on the machine,
a cache that grows) without keeping every sample. Predictions clamp each coefficient at zero: a
noisy fit must never price a row or a session below nothing.

Two such fits are kept. The *time* fit learns the batch's round trip as the broker sees it
(dispatch to verdicts): when a verdict will come back, which the SLO-aware hold plans with
(brokers/slo.py). The *cost* fit learns what the verifier reports the batch cost its compute
(``BatchVerdicts.cost_ms``: the forward's CPU time on a CPU, its wall time on a GPU), and the
prices below come from it: a row's price is compute a draft spends, and a wait for a core shared
with other processes, the event loop or the messages are time the round trip adds but no row
saves or spends. A verifier that reports no cost leaves the time fit to price with. On the
2-core bench box the two split a forward alike (4 sessions, the emulated devices beside the
verifier: round trip a = 83 ms, c = 2.5 ms a row; CPU time a = 59 ms + 3 ms a session,
c = 1.8 ms a row), and both put a larger part in the fixed cost than the verifier alone on the
machine does (about 37 ms and 2.9 ms a row, bench/results/cpu_cost_epyc.json): there the
devices' load raises every forward's CPU time (docs/benchmarks-history.md, session 26).

``row_cost_ms`` -- the number every Verdict carries (``Verdict.row_cost_ms``) -- is the marginal
cost of one more verify row at the verifier's current load: the fitted slope c, scaled by the
verifier's recent utilisation ρ (the fraction of wall time it spent verifying, an EWMA over
batches). An idle verifier's spare time is free, so under light load a row costs a small part of
what it adds to the forward, and far less than the forward's fixed cost a + b; a saturated
verifier (ρ → 1, large batches) gives every row's time to someone else's wait, so it costs the
full slope. Until ``warmup`` batches have been seen there is no fit and it answers 0.0 ("unknown":
drafters then keep their fixed γ).

``round_cost_ms`` -- ``Verdict.round_cost_ms`` -- is the other half of a round's price: what a
session's round costs whatever its rows, its share of the forward's fixed cost plus its own,
a / sessions + b, at the same utilisation scaling. The broker takes ``sessions`` as the sessions
the verifier serves (at most a batch's): the share each would pay if all were in one forward.
The recent batches' mean size, the earlier divisor, fed back on itself: sessions that draft miss
batches, so batches shrink, each session's share of a forward grows, drafting looks cheaper
against it, and more sessions draft. With the ladder's better round-9 rungs, two quick benches
gave 1.33x and 1.20x AR's server time at 16 sessions with the mean batch, 1.13x and 1.02x with the
served sessions (docs/benchmarks-history.md, session 22). A drafter weighs a
draft's rows against it (workers/speculation.py): on a GPU, where a forward's fixed cost dwarfs
a row, it is worth many rows and drafts stay long; on a CPU, where a row costs about what a
session's share of the forward does, few.
"""

from __future__ import annotations

from dataclasses import dataclass, field


P_TRACE_CAP = 1e3


@dataclass
class LinearFit:
    """t = a + b·sessions + c·rows by recursive least squares with a forgetting factor."""

    forget: float = 0.98  # samples older than ~1/(1-forget) batches fade
    theta: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # a, b, c in seconds
    samples: int = 0
    _p: list[list[float]] = field(default_factory=lambda: [[1e2 if i == j else 0.0 for j in range(3)] for i in range(3)])

    def observe(self, sessions: int, rows: int, seconds: float) -> None:
        x = (1.0, float(sessions), float(rows))
        p = self._p
        px = [sum(p[i][j] * x[j] for j in range(3)) for i in range(3)]
        denom = self.forget + sum(x[i] * px[i] for i in range(3))
        gain = [v / denom for v in px]
        error = seconds - sum(self.theta[i] * x[i] for i in range(3))
        self.theta = [self.theta[i] + gain[i] * error for i in range(3)]
        p = [[p[i][j] - gain[i] * px[j] for j in range(3)] for i in range(3)]
        if sum(p[i][i] for i in range(3)) * (1 / self.forget) < P_TRACE_CAP:
            # forgetting inflates P in directions the batches do not vary (a steady load repeats
            # one shape): capped, so that the fit cannot wind up and jump on the next new shape
            p = [[v / self.forget for v in row] for row in p]
        self._p = p
        self.samples += 1

    def coefficients(self) -> tuple[float, float, float]:
        a, b, c = (max(0.0, v) for v in self.theta)
        return a, b, c


@dataclass
class VerifyTimeEstimator:
    forget: float = 0.98  # RLS forgetting factor: samples older than ~1/(1-forget) batches fade
    warmup: int = 4  # batches before a fit is trusted
    utilisation_weight: float = 0.2  # EWMA weight of the newest batch's busy fraction
    utilisation: float = 0.0
    batch_sessions: float = 0.0  # EWMA of sessions per fitted batch (same weight as utilisation)
    time: LinearFit = field(init=False)  # the batches' round trips: when a verdict comes back (seconds())
    cost: LinearFit = field(init=False)  # the verifier's own compute per batch: what a row and a round cost (prices)
    _last: tuple[float, float] | None = None  # (sent, seconds) of the previous batch

    def __post_init__(self) -> None:
        self.time, self.cost = LinearFit(self.forget), LinearFit(self.forget)

    @property
    def samples(self) -> int:
        return self.time.samples

    def observe(self, sessions: int, rows: int, seconds: float, sent: float | None = None, fit: bool = True,
                cost: float | None = None) -> None:
        """One timed batch: dispatched at ``sent`` (the broker's clock), answered ``seconds`` later.
        ``fit`` False: the batch counts for utilisation only (it prefilled a history, whose cost
        is not a verify row's). ``cost``: the seconds of compute the verifier reported for it
        (BatchVerdicts.cost_ms), which the prices are fitted on. Utilisation: the previous batch's
        time ÷ the time between the two dispatches (a verifier is handed one batch at a time, so
        the interval holds exactly one)."""
        if sessions < 1 or rows < sessions or seconds <= 0:
            raise ValueError(f"not a verify batch: sessions={sessions} rows={rows} seconds={seconds}")
        if sent is not None:
            if self._last is not None and sent > self._last[0]:
                busy = min(1.0, self._last[1] / (sent - self._last[0]))
                w = self.utilisation_weight
                self.utilisation = (1 - w) * self.utilisation + w * busy
            self._last = (sent, seconds)
        if not fit:
            return
        w = self.utilisation_weight
        self.batch_sessions = sessions if self.samples == 0 else (1 - w) * self.batch_sessions + w * sessions
        self.time.observe(sessions, rows, seconds)
        if cost is not None and cost > 0:
            self.cost.observe(sessions, rows, cost)

    @property
    def ready(self) -> bool:
        return self.samples >= self.warmup

    def coefficients(self) -> tuple[float, float, float]:
        """The round-trip fit's a, b, c (seconds)."""
        return self.time.coefficients()

    def cost_coefficients(self) -> tuple[float, float, float]:
        """The compute fit's a, b, c once warmed up; before (a verifier that reports none), the
        round trip's."""
        return (self.cost if self.cost.samples >= self.warmup else self.time).coefficients()

    def seconds(self, sessions: int, rows: int) -> float:
        """Predicted time of one forward over ``sessions`` proposals holding ``rows`` rows in all."""
        a, b, c = self.coefficients()
        return a + b * sessions + c * rows

    def cost_seconds(self, sessions: int, rows: int) -> float:
        """Predicted compute (the price, not the round trip) of one forward over ``sessions``
        proposals holding ``rows`` rows: the cost fit once warmed up, else the time fit."""
        a, b, c = self.cost_coefficients()
        return a + b * sessions + c * rows

    def row_cost_ms(self) -> float:
        """The marginal cost of one more row now (module docstring); 0.0 before the warm-up."""
        if not self.ready:
            return 0.0
        return 1000.0 * self.cost_coefficients()[2] * self.utilisation

    def round_cost_ms(self, sessions: int | None = None) -> float:
        """A session's share of a verify round's fixed cost now (module docstring); 0.0 before the
        warm-up. ``sessions``: the sessions the verifier serves (at most a batch's), whose full
        batch would share the forward; None: the recent batches' mean size."""
        if not self.ready:
            return 0.0
        a, b, _ = self.cost_coefficients()
        share = self.batch_sessions if sessions is None else sessions
        return 1000.0 * (a / max(1.0, share) + b) * self.utilisation
