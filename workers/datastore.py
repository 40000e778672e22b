"""A datastore of the target's own continuations, for the model-free n-gram drafter.

A device without a model drafts by context lookup (`lookup_draft`): what followed the latest
earlier occurrence of the context's end. Where the context has not repeated yet, which is most of
a short chat answer, it has nothing to propose. The datastore fills that gap the way REST
(retrieval-based speculative decoding) does, from text the target produced before: for every
n-gram (n = 1 .. max_order) that preceded a token the target generated in the distillation data,
the token that followed it most often. A draft walks it greedily, each step backing off from the
longest order that matched. The target's greedy text is formulaic enough that this is right about
as often as the smallest ladder rung (docs/incremental-training.md, "The n-gram class's datastore").

Stored as one ``.npz`` beside a ``.json`` of metadata (`DATASTORE_DIR`): per order n, the sorted
n-gram keys (the n token ids packed into one 64-bit integer, ``bits`` bits each, so lookups are a
binary search with no hashing and no collisions) and the token that followed. Entries whose token
is the one the next lower order predicts anyway are dropped at build time: the back-off finds
them, and the tables shrink by two thirds (402,078 entries to 130,476 on one topic list). The
drafts are deterministic functions of the context, so the drafter stays lossless under greedy and
sampling alike (sent with q = 1 per token).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATASTORE_DIR = Path(__file__).resolve().parent.parent / "drafters" / "ngram"
BUILTIN = "builtin"  # DrafterConfig.datastore naming the committed one in DATASTORE_DIR


def key_bits(vocab_size: int) -> int:
    return max(1, int(vocab_size - 1).bit_length())


def pack_keys(windows: np.ndarray, bits: int) -> np.ndarray:
    """[rows, n] token ids -> [rows] uint64 keys, the first token in the highest bits."""
    keys = np.zeros(len(windows), dtype=np.uint64)
    for column in range(windows.shape[1]):
        keys = (keys << np.uint64(bits)) | windows[:, column].astype(np.uint64)
    return keys


@dataclass
class Datastore:
    """n-gram -> next token tables, one per order (index 0 is order 1)."""

    keys: list[np.ndarray]
    tokens: list[np.ndarray]
    bits: int
    meta: dict

    @property
    def max_order(self) -> int:
        return len(self.keys)

    def next_token(self, context: list[int]) -> int | None:
        """The token that most often followed the longest suffix of ``context`` (of up to
        max_order tokens) in the data; None where not even its last token was seen."""
        return self._longest(context)[0]

    def match(self, context: list[int]) -> int:
        """The length of the longest suffix of ``context`` the tables hold (0: none). A pruned
        entry (one that predicted what its suffix does) counts as its suffix's length."""
        return self._longest(context)[1]

    def _longest(self, context: list[int]) -> tuple[int | None, int]:
        for n in range(min(self.max_order, len(context)), 0, -1):
            key = 0
            for token in context[-n:]:
                if token >> self.bits:
                    return None, 0  # an id outside the vocabulary the datastore was built for
                key = (key << self.bits) | token
            table = self.keys[n - 1]
            at = int(np.searchsorted(table, np.uint64(key)))
            if at < len(table) and int(table[at]) == key:
                return int(self.tokens[n - 1][at]), n
        return None, 0

    def draft(self, context: list[int], gamma: int) -> list[int]:
        """Up to ``gamma`` tokens, each the datastore's next token after the context so far."""
        context, out = list(context), []
        while len(out) < gamma:
            token = self.next_token(context)
            if token is None:
                break
            out.append(token)
            context.append(token)
        return out

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for n, (keys, tokens) in enumerate(zip(self.keys, self.tokens), start=1):
            arrays[f"keys_{n}"] = keys
            arrays[f"tokens_{n}"] = tokens
        np.savez_compressed(folder / "datastore.npz", **arrays)
        (folder / "datastore.json").write_text(json.dumps({**self.meta, "bits": self.bits,
                                                           "max_order": self.max_order}, indent=1) + "\n")


def load_datastore(where: str | Path) -> Datastore:
    """``where``: a folder holding datastore.npz and datastore.json, or ``BUILTIN`` (the committed one)."""
    folder = DATASTORE_DIR if str(where) == BUILTIN else Path(where)
    meta = json.loads((folder / "datastore.json").read_text())
    with np.load(folder / "datastore.npz") as arrays:
        keys = [arrays[f"keys_{n}"] for n in range(1, meta["max_order"] + 1)]
        tokens = [arrays[f"tokens_{n}"] for n in range(1, meta["max_order"] + 1)]
    return Datastore(keys, tokens, meta["bits"], meta)


def build_datastore(sequences, vocab_size: int, max_order: int = 4, meta: dict | None = None) -> Datastore:
    """From (ids, prompt_len) pairs: every n-gram before a position at or past prompt_len (a token
    the target generated) -> the token that followed it most often (ties: the smaller id). An
    order's entry is kept only where it predicts another token than the next lower order does."""
    bits = key_bits(vocab_size)
    max_order = min(max_order, 64 // bits)
    windows: list[list[np.ndarray]] = [[] for _ in range(max_order)]
    following: list[list[np.ndarray]] = [[] for _ in range(max_order)]
    generated = 0
    for ids, prompt_len in sequences:
        ids = np.asarray(ids, dtype=np.int64)
        positions = np.arange(max(int(prompt_len), 1), len(ids))
        generated += len(positions)
        for n in range(1, max_order + 1):
            at = positions[positions >= n]  # an order-n key needs n real tokens before it
            windows[n - 1].append(ids[at[:, None] + np.arange(-n, 0)[None, :]])
            following[n - 1].append(ids[at])
    keys, tokens = [], []
    lower: tuple[np.ndarray, np.ndarray] | None = None
    for n in range(1, max_order + 1):
        packed = pack_keys(np.concatenate(windows[n - 1]), bits) if generated else np.zeros(0, np.uint64)
        table_keys, table_tokens = _most_frequent(packed, np.concatenate(following[n - 1]) if generated
                                                  else np.zeros(0, np.int64))
        kept = np.ones(len(table_keys), dtype=bool)
        if lower is not None and len(lower[0]):  # drop what the back-off to the order below predicts anyway
            below_keys, below_tokens = lower
            suffix = table_keys & np.uint64((1 << (bits * (n - 1))) - 1)
            at = np.clip(np.searchsorted(below_keys, suffix), 0, len(below_keys) - 1)
            kept = ~((below_keys[at] == suffix) & (below_tokens[at] == table_tokens))
        lower = (table_keys, table_tokens)  # the full order: what a back-off to it finds, stored or not
        keys.append(table_keys[kept])
        tokens.append(table_tokens[kept].astype(np.uint16 if vocab_size <= 1 << 16 else np.uint32))
    info = {"generated_tokens": int(generated), "vocab_size": int(vocab_size),
            "entries": [int(len(k)) for k in keys], **(meta or {})}
    return Datastore(keys, tokens, bits, info)


def _most_frequent(keys: np.ndarray, following: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per distinct key (sorted), the following token seen most often (ties: the smaller id)."""
    if len(keys) == 0:
        return keys, following
    order = np.lexsort((following, keys))
    k, f = keys[order], following[order]
    pair_start = np.flatnonzero(np.r_[True, (k[1:] != k[:-1]) | (f[1:] != f[:-1])])
    pair_keys, pair_tokens = k[pair_start], f[pair_start]
    counts = np.diff(np.r_[pair_start, len(k)])
    best = np.lexsort((pair_tokens, -counts, pair_keys))  # per key: the highest count, then the smaller id
    pair_keys, pair_tokens = pair_keys[best], pair_tokens[best]
    first = np.flatnonzero(np.r_[True, pair_keys[1:] != pair_keys[:-1]])
    return pair_keys[first], pair_tokens[first]
