"""How long a session's next draft should be: a pure policy, no sockets, no torch.

Each session keeps its own acceptance per draft position, ``alpha[i]`` = P(the target accepts
draft token i | it accepted tokens 0..i-1), as an exponentially weighted estimate. Only the
positions a verdict really tested are observed: every position up to the first rejection
(accepted ones as 1, the rejected one as 0); later positions were never compared. A position
not observed for a while drifts back towards the prior, so a session pushed down to short
drafts probes longer ones again instead of staying there for good.

The draft length k in [0, gamma] minimises the expected server cost per committed token:

    cost(k)   = fixed + row_cost * (1 + k)            (the round's rows: last token + k drafts)
    tokens(k) = 1 + sum_{i<=k} prod_{j<=i} alpha[j]    (accepted drafts + the target's own token)

``row_cost`` is the verdict's ``row_cost_ms``: the broker's marginal cost of one more verify
row at the current batch. ``fixed`` is what a round costs the server whatever its rows
(reading the weights once per forward, the session's slot in the batch, acceptance, messages):
the verdict's ``round_cost_ms``, the broker's fit of a session's share of a forward's fixed cost
among the sessions the verifier serves (brokers/estimator.py). It depends on load through that
number: the more sessions share a forward, the smaller each one's share, so drafts shorten as load grows;
on a GPU a forward's fixed cost is worth hundreds of rows and drafts stay long, on a CPU a few.
A broker that sends none (0.0, an older one) leaves the earlier rule, kept as the fallback. It
must not scale with the current row cost, or the choice would not depend on load at all
(multiply both terms by the same number and the best k stays):
``fixed = ROUND_COST_ROWS * floor``, where ``floor`` is the cheapest row cost the
drafter has been told (a lightly loaded verifier's; one floor per drafter process, shared by
its sessions, since it describes the server), let back up by ``FLOOR_RISE_PER_S`` per second
so that a noisy low first estimate or a verifier that became slower for good is learnt
(slowly: a load that lasts minutes still shortens drafts for minutes). So when the verifier is idle a round's
fixed part weighs ROUND_COST_ROWS rows and drafts are long; as the batch grows the marginal
row gets dearer, the fixed part weighs fewer rows, and drafts shorten. ROUND_COST_ROWS = 8:
on the CPU eager verifier (docs/architecture.md: 1 session x 1 token 74.7 ms, 8 x 1 207 ms,
8 x 5 485 ms) a round's fixed part is worth ~27 rows at batch 1 and ~2 rows at 8 sessions,
where the row costs ~3x its idle cost; 8 / 3 ~ 2.7 meets the loaded end.

A drafter of token trees (workers/token_tree.py; greedy sessions of a feature class with
``tree_nodes``) has a second way to draft each round: the whole tree, ``tree_rows`` rows, which
commits ``tree_tokens`` tokens a round (an exponentially weighted reading of its tree rounds,
starting as hopeful as the chain's prior, drifting back to it while chains are drafted so that
the tree is tried again). The round drafts the tree when its cost per committed token,
``(fixed + row_cost * (1 + tree_rows)) / tree_tokens``, is below the best chain's: on a GPU the
tree's extra rows cost almost nothing and it wins, on a CPU a row costs a good part of a forward
and the chain does.

A row cost of 0.0 means unknown (an older broker, the first round of a drafter's first session):
k = gamma, as a fixed-gamma drafter. A later session starts from the readings of the drafter's
last finished one (``fork``): same device, same target, so its acceptance, drafting time and the
server's costs are a far better first guess than the hopeful prior. ``adaptive = false`` never
calls this policy.

A choice of k = 0 hands the session to the server for a while: the drafter asks the broker for
``burst`` plain rounds (Propose.plain_after; workers/drafter.py), each observed here as a round
without a draft (the unobserved positions drift back to the prior, the costs are the newest),
and chooses again after them. So a session that stops drafting stays in every verify batch, as
centralized decoding would keep it, instead of paying a link round trip and a place in a later
batch for each token (docs/benchmarks-history.md, session 19). A context lookup (workers/lookup.py) that
would have drafted during the burst does not: taking the session back for it was tried, and
cut the bursts of the default fleet (whose repeats are frequent) to a few, for no saving.

A draft also keeps its session out of the batches that leave while the device drafts it (and
while the proposal crosses the link): each of them runs anyway, its fixed cost split over one
session fewer, so the drafting session has paid its share of it for no token. So a round of k
draft tokens is priced at ``fixed * (1 + absent(k))``, where ``absent(k)`` is counted, not
modelled (``Absence``): two verdicts' batch numbers (Verdict.batch_seq) tell the session how many
batches left without it. Proactive drafting and proposals sent ahead hide some of it; on an idle
verifier no batch leaves at all, so a lone session pays nothing (a price from the drafting time
over the interval between batches, tried in session 23, charged it for batches that never ran).

The server's rows are not the only price of a draft: the device pays its drafting time, and the
session waits for it. A Pi 5 running a ladder rung spends ~80 ms per draft token; at α 0.36
that token earns 0.36 tokens, while the round it delays (link, queue, verify) commits one token
in ~100 ms without it. So the policy also takes the k with the least expected *time* per
committed token of the session itself:

    time(k) = k * draft_ms + wait_ms + row_cost * (1 + k)

``draft_ms`` is the device's measured drafting time per token; ``wait_ms`` the measured wait from
sending a proposal to its verdict, less its rows' cost (the link's round trip, the queue, the
verifier's fixed part). Both are the session's own exponentially weighted readings; until both
are measured the time rule stays out. The time rule may shorten the server's choice, never
lengthen it: a draft token must pay for itself at the server, and must not cost the session's clock
(a fast drafter is held back by dear rows, a slow one by its own drafting time, which drafting less
frees at once). It shortens it only to the longest draft whose time per token is within
TIME_SLACK (10 %) of the best: where α is high, time(k) is nearly flat in k, while the server's
cost per token falls steeply with k. Taking the exact minimum of a flat curve cut the Qwen pair's
drafts (α 0.91, a 0.5B drafter at ~190 ms a token on an emulated Pi 5) to 2-3 tokens. That gave
2.9 tokens a round against the fixed policy's 3.8, and 1.4x the fixed policy's server time per
token at 1 session, for no gain in TPOT. With the slack, replays gave 3.4 tokens a round and 0.85x
the server time, at the same TPOT (docs/benchmarks-history.md, session 18). Where α is low the curve is
steep (a Pi 5 ladder rung's first draft token costs ~30 % more time per token) and the rule cuts
as before. Proactive drafting, which hides part of the drafting behind the verify wait, is not in
time(k): one more reason not to trust its small differences. A session that
stopped drafting cannot measure its device again, and the device may have got faster (its model
thread was shared with sessions that have ended): each round without a draft lowers ``draft_ms``
by RELAX, as an unobserved acceptance drifts to its prior, so it probes again now and then.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

PRIOR_ALPHA = 0.8  # before any verdict: a decent drafter (the first rounds then draft like today)
EWMA = 0.25  # weight of the newest observation of a position
RELAX = 0.01  # per round, an unobserved position moves this far back towards the prior
ROUND_COST_ROWS = 8.0
FLOOR_RISE_PER_S = 0.01
TIMING_EWMA = 0.2  # weight of the newest reading of draft time per token and of the round's wait
MAX_MISSED = 16  # batches one round may be counted as sitting out (Absence)
TIME_SLACK = 0.1  # the session clock shortens the server's choice only past this much of its best time per token


def expected_tokens(alphas: list[float], k: int) -> float:
    """Tokens a round with a k-token draft commits on average (the target's own token included)."""
    total, reach = 1.0, 1.0
    for a in alphas[:k]:
        reach *= a
        total += reach
    return total


def round_price(rows: int, row_cost: float, fixed: float, absent: float = 0.0) -> float:
    """What a round of ``rows`` verify rows costs the server: its rows, its fixed share, and the
    fixed share of each of the ``absent`` batches the session sat out while its draft was made."""
    return fixed * (1.0 + absent) + row_cost * rows


def per_token(alphas: list[float], k: int, row_cost: float, fixed: float, per_draft_token: float = 0.0,
              absent: float = 0.0) -> float:
    """Expected cost per committed token of a k-token draft, a round costing
    ``round_price(1 + k, ...) + per_draft_token * k``."""
    return (round_price(1 + k, row_cost, fixed, absent) + per_draft_token * k) / expected_tokens(alphas, k)


def _costs(alphas: list[float], gamma: int, row_cost: float, fixed: float, per_draft_token: float,
           absent=lambda k: 0.0) -> list[float]:
    """Expected cost per committed token of every k in [0, gamma]."""
    return [per_token(alphas, k, row_cost, fixed, per_draft_token, absent(k))
            for k in range(max(0, min(gamma, len(alphas))) + 1)]


def best_length(alphas: list[float], gamma: int, row_cost: float, fixed: float, per_draft_token: float = 0.0,
                absent=lambda k: 0.0) -> int:
    """The k in [0, gamma] with the least expected cost per committed token; ties go to the shorter
    draft (fewer rows at risk). ``absent(k)``: the batches a k-token draft keeps the session out
    of. row_cost <= 0 (unknown): gamma."""
    if row_cost <= 0.0:
        return max(0, min(gamma, len(alphas)))
    costs = _costs(alphas, gamma, row_cost, fixed, per_draft_token, absent)
    return min(k for k, cost in enumerate(costs) if cost <= min(costs) + 1e-12)


def longest_within(alphas: list[float], gamma: int, row_cost: float, fixed: float, per_draft_token: float,
                   slack: float) -> int:
    """The longest k in [0, gamma] whose cost per committed token is within ``slack`` (a fraction)
    of the least one's. row_cost <= 0 (unknown): gamma."""
    if row_cost <= 0.0:
        return max(0, min(gamma, len(alphas)))
    costs = _costs(alphas, gamma, row_cost, fixed, per_draft_token)
    return max(k for k, cost in enumerate(costs) if cost <= min(costs) * (1.0 + slack) + 1e-12)


def ewma(old: float | None, new: float) -> float:
    return new if old is None else old + TIMING_EWMA * (new - old)


@dataclass
class RowCostFloor:
    """The cheapest row cost seen, rising slowly back towards newer readings."""

    value: float = 0.0  # ms; 0 = none yet
    at: float = 0.0  # when value was last set or lowered (seconds, any monotonic clock)

    def observe(self, row_cost_ms: float, now: float) -> None:
        if row_cost_ms <= 0.0:
            return
        if self.value <= 0.0:
            self.value, self.at = row_cost_ms, now
            return
        risen = self.value * (1.0 + FLOOR_RISE_PER_S) ** max(0.0, now - self.at)
        if row_cost_ms <= risen:
            self.value, self.at = row_cost_ms, now
        else:
            self.value, self.at = risen, now


@dataclass
class Absence:
    """How many of the verifier's batches a session sits out when it drafts k tokens, k in
    1..gamma (EWMA per k; None: not seen). A draft's device time, and the link's round trip it
    brings with it, keep the session out of the batches that leave meanwhile; proactive drafting
    and proposals sent ahead hide some of it, and on an idle verifier no batch leaves at all. So
    it is counted, not modelled: two verdicts' batch numbers (Verdict.batch_seq) less one. A
    length not seen is scaled from the nearest one seen (per draft token); each round that
    sees none lets every reading drift towards none (RELAX), as acceptance drifts to its prior,
    so that a load that has gone does not keep a session from drafting."""

    gamma: int
    missed: list[float | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.missed:
            self.missed = [None] * (self.gamma + 1)

    def observe(self, k: int, missed: int | None) -> None:
        """One round: ``k`` draft tokens, ``missed`` batches left without the session (None: a round
        that drafted nothing, or whose count is unknown)."""
        for j in range(1, self.gamma + 1):
            if self.missed[j] is not None and (j != k or missed is None):
                self.missed[j] *= 1.0 - RELAX
        if 1 <= k <= self.gamma and missed is not None:
            missed = min(missed, MAX_MISSED)  # a session moved to another verifier, a lost verdict resent
            old = self.missed[k]
            self.missed[k] = float(missed) if old is None else old + EWMA * (missed - old)

    def of(self, k: int) -> float:
        if k <= 0:
            return 0.0  # a plain round is queued by the broker at its last verdict (a burst)
        k = min(k, self.gamma)
        if self.missed[k] is not None:
            return self.missed[k]
        seen = [j for j in range(1, self.gamma + 1) if self.missed[j] is not None]
        if not seen:
            return 0.0
        j = min(seen, key=lambda j: (abs(j - k), j))
        return self.missed[j] * k / j


@dataclass
class SpeculationPolicy:
    """One session's acceptance estimates and its choice of draft length."""

    gamma: int
    floor: RowCostFloor = field(default_factory=RowCostFloor)  # the drafter's, shared by its sessions
    alphas: list[float] = field(default_factory=list)
    row_cost: float = 0.0  # the latest verdict's row cost (ms); 0 = unknown
    round_cost: float = 0.0  # the latest verdict's round cost (ms); 0 = unknown: the floor rule
    draft_ms: float | None = None  # the device's drafting time per draft token; None = not measured yet
    wait_ms: float | None = None  # proposal sent -> verdict back, less its rows' cost; None = not measured yet
    # a drafter of token trees (workers/token_tree.py): the rows of its full tree (0: chains only),
    # the tokens a tree round commits (EWMA), and whether the last choice was the tree
    tree_rows: int = 0
    tree_tokens: float = 0.0
    tree: bool = False
    absence: Absence | None = None  # the batches each draft length sits out (Verdict.batch_seq)

    def __post_init__(self) -> None:
        if not self.alphas:
            self.alphas = [PRIOR_ALPHA] * self.gamma
        if self.absence is None:
            self.absence = Absence(self.gamma)
        self.tree_prior = expected_tokens([PRIOR_ALPHA] * self.gamma, self.gamma)  # as hopeful as the chain's prior
        if self.tree_rows and not self.tree_tokens:
            self.tree_tokens = self.tree_prior

    def fork(self) -> SpeculationPolicy:
        """A new session's policy that starts from this one's readings (a finished session of the
        same drafter) instead of the hopeful prior: its acceptance per position, its tree's tokens,
        the device's drafting time and wait, and the server's last costs. Without them every
        session began drafting γ tokens (or its whole tree) and unlearnt it over its first rounds:
        a 32-token chat is ~25 rounds, and at 16 sessions a fifth of the quick bench's verify rows
        were rejected drafts, against about a tenth since (docs/benchmarks-history.md, session 17)."""
        return replace(self, alphas=list(self.alphas), tree=False,
                       absence=Absence(self.gamma, list(self.absence.missed)))

    def observe(self, proposed: int, accepted: int, row_cost_ms: float = 0.0, now: float = 0.0,
                round_cost_ms: float = 0.0, tree: bool = False, wanted: int = 0) -> None:
        """One verdict: ``accepted`` of ``proposed`` draft tokens (``tree``: of a token tree), and
        the server's row and round costs. A tree round teaches the tree's figure only, a chain
        round the chain's; the figure not observed drifts back towards its prior.

        ``wanted``: the chain's length this policy chose. A chain that came back shorter (the
        drafter was unconfident at the next position, ``min_confidence``, or a repeat ran out),
        all of it accepted, observes that position as a miss: a position the device will not
        draft earns no token, whatever the target would have said. Unobserved, it drifted back to
        the hopeful prior, and the policy went on asking for drafts that came back empty, each
        one a link round trip out of the batches for the target's one token (the Pi 5 class at
        32 sessions: 87 of its 129 rounds, docs/benchmarks-history.md, session 24)."""
        tested = 0 if tree else min(proposed, accepted + 1, self.gamma)  # positions the target really compared
        if not tree and accepted >= proposed and proposed < min(wanted, self.gamma):
            tested = proposed + 1  # the drafter's own stop: a miss at the position it did not draft
        if tree:
            self.tree_tokens += EWMA * (accepted + 1 - self.tree_tokens)
        elif self.tree_rows:
            self.tree_tokens += RELAX * (self.tree_prior - self.tree_tokens)
        for i in range(self.gamma):
            if i < tested:
                hit = 1.0 if i < accepted else 0.0
                self.alphas[i] += EWMA * (hit - self.alphas[i])
            else:
                self.alphas[i] += RELAX * (PRIOR_ALPHA - self.alphas[i])
        if row_cost_ms > 0.0:
            self.row_cost = row_cost_ms
            self.round_cost = max(0.0, round_cost_ms)
            self.floor.observe(row_cost_ms, now)
        if proposed == 0 and self.draft_ms is not None:
            self.draft_ms *= 1.0 - RELAX  # not measured this round: let a stopped session probe again

    def observe_draft(self, tokens: int, device_s: float) -> None:
        """A draft of ``tokens`` tokens took the device ``device_s`` seconds (one that stopped at
        its first token, unconfident, still cost that token: counted as one)."""
        if device_s > 0.0:
            self.draft_ms = ewma(self.draft_ms, 1000.0 * device_s / max(1, tokens))

    def observe_wait(self, proposed: int, wait_s: float) -> None:
        """A proposal of ``proposed`` draft tokens waited ``wait_s`` seconds for its verdict (call
        after ``observe``, so that the row cost is the verdict's). Not for a session's first round,
        whose wait is the prompt's prefill."""
        self.wait_ms = ewma(self.wait_ms, max(0.0, 1000.0 * wait_s - self.row_cost * (1 + proposed)))

    @property
    def fixed_cost(self) -> float:
        if self.round_cost > 0.0:
            return self.round_cost
        return ROUND_COST_ROWS * self.floor.value

    def choose(self, cap: int | None = None) -> int:
        """The next draft's length, at most ``cap`` (the tokens the request still allows): the
        shorter of the server's choice and the session clock's."""
        gamma = self.gamma if cap is None else max(0, min(self.gamma, cap))
        k = best_length(self.alphas, gamma, self.row_cost, self.fixed_cost, absent=self.absence.of)
        if self.draft_ms is not None and self.wait_ms is not None:
            k = longest_within(self.alphas, k, self.row_cost, self.wait_ms, self.draft_ms, TIME_SLACK)
        self.tree = bool(self.tree_rows) and gamma > 0 and self._tree_pays(k)
        return k

    def _tree_pays(self, k: int) -> bool:
        """The full token tree instead of the k-token chain: when its expected cost per committed
        token is lower. Its rows are priced like a chain's; where a forward's fixed cost dwarfs a
        row (a GPU) the tree's extra tokens pay for them, where a row costs a good part of a
        forward (this CPU) the chain wins. Unknown costs: the tree, as gamma for a chain."""
        if self.row_cost <= 0.0:
            return True
        chain = per_token(self.alphas, k, self.row_cost, self.fixed_cost, absent=self.absence.of(k))
        # a tree is drafted level by level, γ of them: it sits out what a γ-token chain does
        tree = (round_price(1 + self.tree_rows, self.row_cost, self.fixed_cost, self.absence.of(self.gamma))
                / max(1.0, self.tree_tokens))
        return tree < chain
