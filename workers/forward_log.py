"""What forwards a server ran: how many of each (sessions, token rows) shape, prefill kept apart.

The benchmark prices these with a GPU cost table (bench/gpu_cost.py). The order of forwards does
not change their cost, so a count per shape is the whole record, and it stays small enough to
ride in the verifier's heartbeat statistics. Either backend is observed from the outside
(``verify_recorded``): one ``verify_batch`` is one verify forward over the proposals it accepted
plus the prefill forwards that filled the sessions it (re)opened (several sessions share one).
"""

from __future__ import annotations

import time
from collections import Counter


MAX_SHAPES = 4096  # distinct shapes kept per kind; a long-running verifier's heartbeat stays small


class ForwardLog:
    def __init__(self) -> None:
        self.verify: Counter[tuple[int, int]] = Counter()  # (sessions, token rows) -> forwards
        self.draft: Counter[tuple[int, int]] = Counter()  # server-side drafting (baseline only)
        self.prefill_forwards = 0
        self.prefill_tokens = 0
        self.dropped = 0  # forwards of a new shape once MAX_SHAPES were held

    def add(self, kind: str, sessions: int, rows: int) -> None:
        counts = getattr(self, kind)
        if (sessions, rows) in counts or len(counts) < MAX_SHAPES:
            counts[(sessions, rows)] += 1
        else:
            self.dropped += 1

    def as_dict(self) -> dict:
        return {
            "verify": [[b, r, n] for (b, r), n in sorted(self.verify.items())],
            "draft": [[b, r, n] for (b, r), n in sorted(self.draft.items())],
            "prefill": {"forwards": self.prefill_forwards, "tokens": self.prefill_tokens},
            "dropped": self.dropped,
        }


def delta(before: dict | None, after: dict | None) -> dict:
    """``after - before`` of two ``as_dict`` snapshots (a level's share of a long-running verifier)."""
    after = after or {"verify": [], "draft": [], "prefill": {"forwards": 0, "tokens": 0}}
    before = before or {"verify": [], "draft": [], "prefill": {"forwards": 0, "tokens": 0}}
    out: dict = {}
    for kind in ("verify", "draft"):
        counts = Counter({(b, r): n for b, r, n in after[kind]})
        counts.subtract({(b, r): n for b, r, n in before[kind]})
        out[kind] = [[b, r, n] for (b, r), n in sorted(counts.items()) if n > 0]
    out["prefill"] = {k: after["prefill"][k] - before["prefill"][k] for k in ("forwards", "tokens")}
    return out


def verify_recorded(verifier, items: list, log: ForwardLog) -> list:
    """``verifier.verify_batch(items)``, with its forwards added to ``log`` (from its statistics) and
    the process's CPU time while it ran to the verifier's ``batch_cpu_s``
    (process time, as ``prefill_cpu_s``: a forward on several torch threads counts whole)."""
    s = verifier.stats
    items0, rows0, prefills0, prefill_tokens0 = s.items, s.verify_tokens, s.prefill_forwards, s.prefill_tokens
    cpu0 = time.process_time()
    verdicts = verifier.verify_batch(items)
    s.batch_cpu_s += time.process_time() - cpu0
    if s.items > items0:
        log.add("verify", s.items - items0, s.verify_tokens - rows0)
    log.prefill_forwards += s.prefill_forwards - prefills0
    log.prefill_tokens += s.prefill_tokens - prefill_tokens0
    return verdicts
