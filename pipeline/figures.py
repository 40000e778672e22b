"""Figures that cross the wire as typed data (carried by pipeline/protocol.py messages)."""

from __future__ import annotations

import msgspec


class VerifierFigures(msgspec.Struct, omit_defaults=True):
    """A verifier's counters, kept by workers/target.py and carried by Ready and Heartbeat."""

    batches: int = 0
    items: int = 0  # proposals verified = verify rounds
    item_errors: int = 0
    prefills: int = 0  # sessions (re)built from a history
    prefill_tokens: int = 0
    prefill_cpu_s: float = 0.0  # process CPU time spent prefilling (to tell prefill from decode work)
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
