"""SloHold: whether a free verifier should wait a little for proposals that are about to arrive.

Pure (no sockets, no clock of its own): the broker tells it what each session does
(``arrived``, ``answered``, ``forget``), the DeadlineBatcher asks ``hold_until`` when a batch
could leave and ``priority`` when it picks which queued proposals go first. One per verifier,
with that verifier's VerifyTimeEstimator (brokers/estimator.py).

Each session's pace, learned from what the broker sees of it:
* ``device_s``: an EWMA of the time from its verdict leaving the broker to its next proposal
  arriving (the device's drafting plus its link's round trip), so its next proposal is expected
  at ``last verdict + device_s``; and ``spread``, an EWMA of how far each interval fell from it
  (TCP's RTT deviation): a device whose drafts vary in length, or whose proactive guess
  sometimes hits, answers earlier or later than the mean, and one a little late is still
  expected, until ``last verdict + device_s + SPREADS × spread``;
* ``tokens_per_round``: an EWMA of accepted + 1 (tokens its rounds commit), and ``rows``: an
  EWMA of the rows its proposals cost;
* its objective: the time per output token it is promised (``broker.slo_tpot_ms``) is an
  average over its request, as TPOT is measured, so the verdict of the round must leave by
  ``first verdict + slo_tpot × (tokens committed since + tokens_per_round)``: a session that ran
  ahead of its objective has that much slack (at most ``SLACK_TOKENS`` tokens' worth, so that
  a long fast start cannot buy a long stall), and one that fell behind is late already. A first
  round, with no verdict yet: ``arrival + slo_tpot``.
  Why not each round on its own (``last verdict + slo_tpot × tokens_per_round``, as before): when
  the fleet's proposals reach the broker out of step, a small group that is on time this round
  was never held for the rest, so the verifier alternated between a small and a large batch for
  good (the quick bench at 16 sessions: 6.7 sessions a forward against AR's 14, every session
  late on average, each round "on time" for one group).

The rule (``hold_until``), asked once the batch's own deadline (``broker.max_wait_ms``) has
passed: take the sessions expected soonest, one at a time, and for each the batch it would make
(queued + those expected by then). Hold until the arrival that gives the lowest estimated server
cost per committed token, ``cost(sessions, rows) ÷ Σ tokens_per_round``, if that is lower than
dispatching now, and only if it keeps the objectives (``_keeps_objectives``; when batches end
comes from the estimator's round-trip fit, what they cost from its price fit, the compute the
verifier reports or a cost table's prices, ``verifier.cost_table``): compared with
dispatching now (the expected sessions then verified in a batch of their own after it), no
session of the merged batch that would get its verdict within its objective misses it.

A session that misses its objective under both plans (late already) has no say: it is late
whichever way, the hold delays it by at most the forward the verifier would have run for the late
arrivals (the bound below), and that forward, saved, frees the verifier sooner for its next round.
Until session 16 such a session's added lateness weighed against the hold (the lateness past the
objectives, summed over the batch, must not grow), so one chronically late session (a slow device
class) vetoed every hold: at 16 sessions the verifier alternated between two half-batches, 7.3
sessions a forward where a replay of the quick bench's adaptive pass now forms 10-11 (8.5-9.3 in
the whole quick bench, its ramp and tail included), at 8-10 % less server time per token and a
TPOT p50 still within the objective (171-178 against 159-167 ms; docs/benchmarks-history.md, session 16).

Past the moment the verifier could have finished the batch it has now (``held_since + t(now's
batch)``) the late arrivals would make the next batch anyway, and a longer hold only trades the
queued sessions' time for one forward less: it is taken only when every session of the merged
batch still meets its objective (they have slack: a verifier with room to spare, whose idle time
costs nobody), never when one is late, where an idle verifier is capacity lost. Why past it at
all: the fleet's device classes answer 30-90 ms apart, longer than a small batch's forward, so at
low load the old bound (no hold past that forward) kept batches at about 2 of 4 sessions.
Sessions overdue past their usual spread are not waited for. Queued proposals go out in order of
their objectives, closest first.
"""

from __future__ import annotations

from dataclasses import dataclass

from brokers.estimator import VerifyTimeEstimator


SLACK_TOKENS = 4.0  # the most slack (in objectives of one token) a session that ran ahead may spend on holds
SPREADS = 2.0  # an overdue session is still expected until device_s + SPREADS x its spread


@dataclass
class Pace:
    last_verdict: float | None = None  # when its last verdict left the broker
    first_verdict: float | None = None  # when its first verdict (its first token) left the broker
    committed: float = 0.0  # tokens its verdicts committed after the first one
    device_s: float | None = None  # EWMA: verdict out -> next proposal in
    spread: float = 0.0  # EWMA of |interval - device_s|
    tokens_per_round: float = 1.0  # EWMA of accepted + 1
    rows: float = 1.0  # EWMA of rows per proposal
    out: bool = False  # its verdict has left and its next proposal has not arrived yet
    arrived: float | None = None  # arrival of its queued or in-flight proposal


class SloHold:
    def __init__(self, slo_tpot_s: float, estimator: VerifyTimeEstimator, weight: float = 0.3,
                 max_sessions: int = 128, max_tokens: int = 256):
        if slo_tpot_s <= 0:
            raise ValueError("SloHold needs a positive TPOT objective")
        self.slo = slo_tpot_s
        self.estimator = estimator
        self.weight = weight
        self.max_sessions, self.max_tokens = max_sessions, max_tokens
        self.sessions: dict[str, Pace] = {}

    def _ewma(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.weight) * old + self.weight * new

    # --- what the broker sees ------------------------------------------------------------------

    def arrived(self, session: str, now: float, rows: int, followed: bool = False) -> None:
        """``followed``: a plain round the broker queued itself (Propose.plain_after): it never
        went out to the device, so it says nothing of the device's pace."""
        pace = self.sessions.setdefault(session, Pace())
        if pace.out and pace.last_verdict is not None and not followed:
            interval = now - pace.last_verdict
            if pace.device_s is not None:
                pace.spread = self._ewma(pace.spread, abs(interval - pace.device_s))
            pace.device_s = self._ewma(pace.device_s, interval)
        pace.out = False
        pace.arrived = now
        pace.rows = self._ewma(pace.rows if pace.last_verdict is not None else None, float(rows))

    def answered(self, session: str, now: float, accepted: int) -> None:
        pace = self.sessions.get(session)
        if pace is None:
            return
        # the first round's 1.0 is a prior; it fades as the EWMA goes
        pace.tokens_per_round = self._ewma(pace.tokens_per_round if pace.last_verdict is not None else None, accepted + 1.0)
        if pace.first_verdict is None:
            pace.first_verdict = now  # TTFT ends here; TPOT counts the tokens after it
        else:
            pace.committed += accepted + 1
        pace.last_verdict, pace.out = now, True

    def forget(self, session: str) -> None:
        self.sessions.pop(session, None)

    # --- what the batcher asks -----------------------------------------------------------------

    def objective(self, session: str, arrived: float) -> float:
        """When the verdict of ``session``'s current round must leave the broker."""
        pace = self.sessions.get(session)
        if pace is None or pace.last_verdict is None or pace.first_verdict is None:
            return arrived + self.slo
        this_round = pace.last_verdict + self.slo * pace.tokens_per_round
        average = pace.first_verdict + self.slo * (pace.committed + pace.tokens_per_round)
        return min(average, this_round + self.slo * SLACK_TOKENS)

    def priority(self, item) -> float:
        """Sort key of a queued batcher Item (key = session id): its objective, closest first."""
        return self.objective(item.key, item.arrived)

    def _tokens(self, session: str) -> float:
        pace = self.sessions.get(session)
        return pace.tokens_per_round if pace is not None else 1.0

    def expected(self, now: float, queued: set) -> list[tuple[float, str, int]]:
        """(expected arrival, session, rows) of the sessions out on their devices, soonest first."""
        out = []
        for session, pace in self.sessions.items():
            if not pace.out or pace.device_s is None or session in queued:
                continue
            when = pace.last_verdict + pace.device_s
            if when < now:  # overdue: still expected within its usual spread, then not waited for
                when += SPREADS * pace.spread
            if when >= now:
                out.append((when, session, max(1, round(pace.rows))))
        out.sort()
        return out

    def hold_until(self, now: float, items: list, held_since: float) -> float | None:
        """The time to hold the batch of ``items`` (batcher Items) until, or None: dispatch now."""
        if not items or not self.estimator.ready:
            return None
        est = self.estimator
        sessions, rows = len(items), sum(item.tokens for item in items)
        tokens = sum(self._tokens(item.key) for item in items)
        queued = [self.objective(item.key, item.arrived) for item in items]
        # when a batch ends comes from the round-trip fit, what it costs from the price fit (the
        # compute the verifier reports: a GPU's forward costs about the same whatever its rows,
        # so a bigger batch is cheaper per token there even where its round trip is not)
        now_s = est.seconds(sessions, rows)
        finish_now = now + now_s
        best_cost, best_until = est.cost_seconds(sessions, rows) / tokens, None
        limit = held_since + now_s
        joining: list[tuple[float, int]] = []  # (objective, rows) of the expected sessions taken so far
        for when, session, session_rows in self.expected(now, {item.key for item in items}):
            if sessions + 1 > self.max_sessions or rows + session_rows > self.max_tokens:
                break
            sessions, rows = sessions + 1, rows + session_rows
            tokens += self._tokens(session)
            joining.append((self.objective(session, when), session_rows))
            seconds = est.seconds(sessions, rows)
            cost = est.cost_seconds(sessions, rows) / tokens
            if when > limit:
                # past the time the batch at hand would take, a hold only spends slack: every session
                # of the merged batch must still meet its objective. Later arrivals only finish later,
                # so once one misses, none further can do better.
                if min([*queued, *(o for o, _ in joining)]) < when + seconds:
                    break
                if cost < best_cost:
                    best_cost, best_until = cost, when
                continue
            if cost >= best_cost:
                continue
            if self._keeps_objectives(queued, joining, finish_now, when, when + seconds):
                best_cost, best_until = cost, when
        return best_until

    def _keeps_objectives(self, queued: list[float], joining: list[tuple[float, int]], finish_now: float,
                          last_arrival: float, finish_held: float) -> bool:
        """Whether holding until ``last_arrival`` (the merged batch done at ``finish_held``) keeps
        every objective that dispatching now would keep (the queued sessions done at
        ``finish_now``, the joining ones in a batch of their own after it): no session that would
        meet its objective misses it. Sessions late under both plans have no say (module
        docstring); a joining session that only the hold brings within its objective is a gain,
        which the cost per token (``hold_until``) already counts as a forward saved."""
        rows = sum(r for _, r in joining)
        finish_apart = max(finish_now, last_arrival) + self.estimator.seconds(len(joining), rows)
        return not any(finish <= objective < finish_held
                       for objective, finish in [*((o, finish_now) for o in queued), *((o, finish_apart) for o, _ in joining)])
