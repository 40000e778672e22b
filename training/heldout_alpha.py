"""Held-out acceptance: how often a drafter's greedy token equals the target's.

α (greedy, γ = 4) is measured teacher-forced on the target's own greedy continuation of each
held-out prompt: the fraction of continuation positions where the drafter's argmax equals the
target's token. Mean accepted length simulates rounds of γ drafts: from each position the run of
agreeing drafts (at most γ) is accepted, the target supplies one more token, and the next round
starts after it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import structlog
import torch

from training.distill_prompts import build_prompts
from workers.drafts import lookup_draft
from workers.lookup import stand_in

# The held-out prompts as committed text, so α is measured on the same prompts everywhere even
# without the corpus packages installed; rebuilt from the corpora when absent.
HELDOUT_FILE = Path(__file__).resolve().parent.parent / "drafters" / "heldout-prompts.json"

log = structlog.get_logger(__name__)

HELDOUT_CHAT = 24
HELDOUT_PROSE = 24
HELDOUT_NEW_TOKENS = 64


def heldout_sequences(target: str = "smollm2", *, n_chat: int = HELDOUT_CHAT, n_prose: int = HELDOUT_PROSE,
                      new_tokens: int = HELDOUT_NEW_TOKENS, model=None, tokenizer=None) -> list[tuple[list[int], int]]:
    """(prompt + target's greedy continuation, prompt length) per held-out prompt, cached on disk
    (generating them costs a minute of CPU and they never change for a given target)."""
    from pipeline.models import cache_root, load_causal_lm, load_tokenizer

    from training.distill_data import greedy_continuations

    tokenizer = tokenizer or load_tokenizer(target)
    prompts = heldout_prompts(tokenizer, n_chat=n_chat, n_prose=n_prose)
    key = hashlib.sha256(json.dumps([target, new_tokens, prompts]).encode()).hexdigest()[:16]
    path = cache_root() / "heldout" / f"{key}.pt"
    if path.is_file():
        return torch.load(path)
    model = model or load_causal_lm(target)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    sequences = []
    for first in range(0, len(prompts), 16):
        sequences += greedy_continuations(model, tokenizer, prompts[first : first + 16], new_tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sequences, path)
    log.info("heldout_generated", prompts=len(prompts), path=str(path))
    return sequences


def heldout_prompts(tokenizer, *, n_chat: int = HELDOUT_CHAT, n_prose: int = HELDOUT_PROSE) -> list[str]:
    if HELDOUT_FILE.is_file():
        stored = json.loads(HELDOUT_FILE.read_text())
        if stored["n_chat"] == n_chat and stored["n_prose"] == n_prose:
            return stored["prompts"]
    return build_prompts(tokenizer, held_out=True, n_chat=n_chat, n_prose=n_prose)


def accepted_lengths(agree: list[bool], gamma: int, lookup: Callable[[int], list[bool] | None] | None = None) -> list[int]:
    """Accepted drafts per round when rounds of `gamma` drafts walk through `agree`. ``lookup(pos)``:
    where a round starting at continuation position ``pos`` drafts by context lookup instead, the
    agreement of that draft's tokens (None where it drafts with the model)."""
    rounds, pos = [], 0
    while pos < len(agree):
        drafted = lookup(pos) if lookup is not None else None
        run = agree[pos:pos + gamma] if drafted is None else drafted
        n = 0
        while n < len(run) and run[n]:
            n += 1
        rounds.append(n)
        pos += n + 1  # the target's own token follows the accepted run
    return rounds


def lookup_agreement(ids: list[int], position: int, gamma: int, min_match: int, ngram_max: int = 4) -> list[bool] | None:
    """Agreement with ``ids`` of the context-lookup draft at ``position`` (workers/lookup.py), or
    None where the context offers none and the model drafts."""
    tokens, _ = lookup_draft(ids[:position], gamma, ngram_max, min_match)
    if not tokens:
        return None
    return [a == b for a, b in zip(tokens, ids[position:])]


def stand_in_agreement(ids: list[int], position: int, gamma: int, datastore, confidence: float) -> list[bool] | None:
    """Agreement with ``ids`` of the datastore's chain at ``position`` where it stands in for a
    drafter whose first token there has probability ``confidence`` (workers/lookup.py
    ``stand_in``), or None where the drafter drafts."""
    tokens = stand_in(datastore, ids[:position], gamma, confidence)
    if not tokens:
        return None
    return [a == b for a, b in zip(tokens, ids[position:])]


class KindTally:
    """α and tokens per round per prompt kind (training/distill_prompts.py ``prompt_kinds``): one
    sequence's first-draft hits, positions and accepted runs at a time."""

    def __init__(self) -> None:
        self.kinds: dict[str, list] = {}

    def add(self, kind: str, hits: int, positions: int, rounds: list[int]) -> None:
        tally = self.kinds.setdefault(kind, [0, 0, []])
        tally[0] += hits
        tally[1] += positions
        tally[2] += rounds

    def report(self) -> dict:
        return {kind: {"alpha": round(hits / max(1, n), 4), "tokens_per_round": round(sum(r) / max(1, len(r)) + 1, 3),
                       "positions": n}
                for kind, (hits, n, r) in sorted(self.kinds.items())}


@torch.no_grad()
def acceptance(logits_fn: Callable[[torch.Tensor], torch.Tensor], sequences: list[tuple[list[int], int]],
               gamma: int = 4, lookup_min_match: int = 0, datastore=None, kinds: list[str] | None = None) -> dict:
    """α and mean accepted length; ``logits_fn(ids [1, T]) -> [1, T, V]`` the drafter's next-token
    logits. With ``lookup_min_match``, rounds (and α's first drafts) come from context lookup
    wherever it finds a match, as a LookupDrafter drafts; with a ``datastore``, from the datastore
    where it stands in for the model, which turns on the model's top probability
    (workers/lookup.py ``stand_in``). ``kinds``: each sequence's prompt kind, for ``by_kind``."""
    matched, total, rounds = 0, 0, []
    tally = KindTally()
    for index, (ids, prompt_len) in enumerate(sequences):
        if len(ids) <= prompt_len:
            continue
        logits = logits_fn(torch.tensor([ids]))
        pred = logits[0].argmax(-1)
        agree = (pred[prompt_len - 1 : -1] == torch.tensor(ids[prompt_len:])).tolist()
        lookup, agree_first = None, agree
        if lookup_min_match or datastore is not None:  # each position's draft, once: α's first drafts and the rounds read it
            drafts = [lookup_agreement(ids, prompt_len + i, gamma, lookup_min_match) if lookup_min_match else None
                      for i in range(len(agree))]
            if datastore is not None:  # the softmax only here: over a 49k vocabulary it is not free
                confidence = torch.softmax(logits[0].float(), -1).max(-1).values.tolist()
                drafts = [d if d is not None else stand_in_agreement(ids, prompt_len + i, gamma, datastore,
                                                                      confidence[prompt_len - 1 + i])
                          for i, d in enumerate(drafts)]
            agree_first = [a if d is None else d[0] for a, d in zip(agree, drafts)]
            lookup = drafts.__getitem__
        runs = accepted_lengths(agree, gamma, lookup)
        matched += sum(agree_first)
        total += len(agree)
        rounds += runs
        if kinds is not None:
            tally.add(kinds[index], sum(agree_first), len(agree), runs)
    return {
        "alpha": matched / max(1, total),
        "mean_accepted": sum(rounds) / max(1, len(rounds)),
        "positions": total,
        **({"by_kind": tally.report()} if kinds is not None else {}),
    }
