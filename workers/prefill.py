"""Batched, chunked prefill: which slices of which new sessions' histories go in which forward.

A batch may open many sessions at once (a wave of arrivals, or every session of a lost verifier
resyncing). Prefilling them one forward each made the batch cost one forward per arrival; here
their histories share forwards instead, under a token budget per forward
(``verifier.prefill_chunk_tokens``). Both backends' forwards are rectangular (rows padded to the
widest; the static backend, uncompiled, computes the real tokens only but its attention keeps
that layout), so the budget counts padded tokens, ``rows x width``: a forward never computes more
than the budget however ragged the histories are. A history longer than the budget's share is
split into slices over several forwards; each slice attends to the earlier ones through the
session's cache, exactly as a verify row attends to its session's cache.

Every chunk of every session finishes inside the batch that opened it, so the round's verdict
is computed from a complete cache (correctness first; the verify forward follows the prefill
forwards). Pure functions: tested without a model.
"""

from __future__ import annotations

from typing import NamedTuple


class Slice(NamedTuple):
    index: int  # which pending history (the caller's numbering)
    start: int  # its tokens start:stop go in this forward
    stop: int


def plan_prefill(lengths: list[int], budget: int) -> list[list[Slice]]:
    """The prefill forwards for histories of ``lengths`` tokens (0: nothing to prefill), in order.

    ``budget`` <= 0 keeps one whole history per forward (the serial path). Otherwise each forward
    holds at most ``budget`` padded tokens: its width is the longest remaining history, cut to an
    equal share of the budget among the histories still pending, so a wave of short histories goes
    in one forward and long ones advance side by side; rows are taken longest first so that the
    rows of a forward have similar widths (little padding). A session's slices come in order, one
    per forward at most.
    """
    if budget <= 0:
        return [[Slice(i, 0, n)] for i, n in enumerate(lengths) if n > 0]
    done = [0] * len(lengths)
    forwards: list[list[Slice]] = []
    while True:
        pending = sorted((i for i, n in enumerate(lengths) if done[i] < n), key=lambda i: (done[i] - lengths[i], i))
        if not pending:
            return forwards
        longest = lengths[pending[0]] - done[pending[0]]
        width = max(1, min(longest, budget // len(pending)))
        rows = pending[: max(1, budget // width)]
        forward = []
        for i in sorted(rows):
            stop = min(lengths[i], done[i] + width)
            forward.append(Slice(i, done[i], stop))
            done[i] = stop
        forwards.append(forward)
