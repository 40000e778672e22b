"""Record what a device's drafter proposes along each session, for the emulated fleet to replay.

Two cores cannot run thirty-two devices' draft models in parallel with a verifier, so the fleet
emulation splits drafting in two. Here, before the timed run and with nothing else running, each
device class's real drafter (workers/drafts.py, one thread) walks every session it will serve:
at each round it proposes from the committed context, the thread CPU time of that is measured,
and the round ends as the verifier would end it under greedy decoding -- the longest prefix
agreeing with the target's own continuation (transformers' ``generate``), then the target's
token. In the timed run the device's drafter process replays those drafts (workers/drafts.py
``ReplayDrafter``) and holds each one for its measured compute time times the device's slowdown
(``drafters.NAME.emulate_slowdown``); a shorter draft than the recorded one (an adaptive length)
is held for its share of that time. The verifier still checks every draft for real; a replayed
draft that the target would not make is simply rejected, so the output stays the target's.

A feature-conditioned class (workers/feature_drafter.py) is walked the same way, and each round
hands it what the verifier's verdict would carry: the target's features of the newly committed
positions (the whole prompt on the first round), read off one teacher-forced forward of the
target over prompt + reference. Its replay asks the verifier for the same features, so the
features cross the emulated link as they would from a real device. Its device drafts ahead of a
verdict on features it predicted itself, which gives other drafts than the true ones would; so
at each context the walk also records the drafts made ahead from each of the earlier contexts a
proposal of up to γ tokens and a guess could have left, and the replay picks the one its
session's features call for (ReplayDrafter).
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import msgpack
import torch

from pipeline.protocol import Sampling
from workers.drafts import context_key, draft_generator
from workers.target import pick_hidden
from workers.token_tree import accepted_along

GREEDY = Sampling(0.0, 1.0, 0)


@torch.inference_mode()
def target_features(target, tokens: list[int], layers: list[int]) -> torch.Tensor:
    """The target's features at ``layers`` for every position of ``tokens``: fp16
    ``[len(tokens), layers x hidden]``, as a verdict carries them."""
    out = target(input_ids=torch.tensor([tokens]), output_hidden_states=True)
    return pick_hidden(out.hidden_states, layers)[0].to(torch.float16)


def record_session(strategy, prompt: list[int], reference: list[int], gamma: int, max_new_tokens: int,
                   stop_ids: list[int], drafts: dict[str, list], features: torch.Tensor | None = None,
                   made_ahead: dict[str, list] | None = None) -> dict:
    """Walk one session, adding ``{context_key: [tokens, cpu_s, match]}`` (a drafter of token
    trees: ``+ [parents, tree tokens, tree cpu_s]``) for *every* context along the reference, not
    only where a round of this walk begins: a replaying session whose rounds end elsewhere (an
    adaptive length, a tree accepted further than a chain) still finds its draft. The figures
    returned are those of the rounds workers/drafter.py would make at fixed γ (trees where the
    drafter has them). ``features`` (a feature-conditioned strategy): the target's, over prompt +
    reference. ``made_ahead`` (with ``features``): also the drafts it makes ahead of a verdict, on the
    contexts further along the reference that a draft of up to γ tokens and a guess assume,
    ``{context_key: [[tokens, cpu_s] for 1 .. γ + 1 positions chained on predicted features]}``."""
    state = strategy.new_state()
    match = strategy.match
    trees = bool(strategy.tree_nodes)
    generator = draft_generator(0)
    committed = list(prompt)
    stops = set(stop_ids)
    generated = rounds = proposed = accepted_total = rejected_rounds = 0
    compute_s = 0.0
    round_at = 0  # where this walk's next round begins (generated tokens)
    while generated < max_new_tokens and generated < len(reference):
        budget = max_new_tokens - generated
        started = time.thread_time()
        draft = strategy.propose(state, committed, min(gamma, budget - 1), GREEDY, generator)
        spent = time.thread_time() - started
        # with context lookup in front (workers/lookup.py): the repeat length it drafted from, which
        # keys the replaying session's acceptance figures as it keys the live drafter's
        entry = drafts[context_key(committed)] = [draft.tokens, spent, match(committed)]
        if trees and budget > 1:  # a drafter of token trees: its tree too, which the walk's rounds take
            started = time.thread_time()
            draft = strategy.propose(state, committed, min(gamma, budget - 1), GREEDY, generator, tree=True)
            spent = time.thread_time() - started
            entry += [draft.parents, draft.tokens, spent]
        if made_ahead is not None and features is not None and generated > 0:
            # the head holds true features up to the one before the last committed token; a
            # draft made ahead on committed + m more tokens (a draft of m - 1 and the guess)
            # chains over m predicted ones
            for m in range(1, gamma + 2):
                if generated + m >= min(len(reference), max_new_tokens) or reference[generated + m - 1] in stops:
                    break
                assumed = committed + reference[generated : generated + m]
                started = time.thread_time()
                made = strategy.propose(state, assumed, min(gamma + 1, max_new_tokens - generated - m), GREEDY,
                                        generator)
                slots = made_ahead.setdefault(context_key(assumed), [None] * (gamma + 1))
                slots[m - 1] = [made.tokens, time.thread_time() - started]
        ahead = reference[generated:]
        if generated == round_at:
            accepted = accepted_along(draft.tokens, draft.parents, ahead[:-1])
            round_at += accepted + 1
            rounds += 1
            proposed += len(draft.tokens)
            accepted_total += accepted
            rejected_rounds += accepted < draft.depth
            compute_s += spent
        strategy.commit(state, len(committed), 0)  # one token at a time: every context is recorded
        if features is not None:  # the verifier's: the token fed first (and the prompt, at the start)
            start = 0 if generated == 0 else len(committed) - 1
            strategy.take_features(state, SimpleNamespace(features=features[start : len(committed)].numpy().tobytes(),
                                                          features_start=start))
        committed.append(ahead[0])
        generated += 1
        if ahead[0] in stops:
            break
    return {"rounds": rounds, "proposed": proposed, "accepted": accepted_total, "rejected_rounds": rejected_rounds,
            "compute_s": compute_s, "generated": generated}


@torch.inference_mode()
def record_trace(strategy, kind: str, prompts: list[list[int]], references: list[list[int]], gamma: int,
                 max_new_tokens: int, stop_ids: list[int], path: Path, target=None) -> dict:
    """Record every prompt for one device class into ``path``; returns the class's figures.
    A strategy with ``feature_layers`` needs the ``target`` that computes them; one that can
    draft ahead also gets its drafts made on predicted features recorded (record_session)."""
    drafts: dict[str, list] = {}
    layers = list(strategy.feature_layers)
    if layers and target is None:
        raise ValueError(f"a {kind} drafter needs the target's features: pass target=")
    made_ahead = {} if layers and strategy.supports_proactive else None
    extra = {"ahead": made_ahead, "feature_width": target.config.hidden_size * len(layers)} if layers else {}
    totals = {"rounds": 0, "proposed": 0, "accepted": 0, "rejected_rounds": 0, "compute_s": 0.0, "generated": 0}
    for prompt, reference in zip(prompts, references):
        features = target_features(target, prompt + reference, layers) if layers else None
        figures = record_session(strategy, prompt, reference, gamma, max_new_tokens, stop_ids, drafts, features,
                                 made_ahead)
        for key in totals:
            totals[key] += figures[key]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(msgpack.packb({"kind": kind, "feature_layers": layers, "drafts": drafts,
                                    "tree_nodes": strategy.tree_nodes, "tree_rows": strategy.tree_rows, **extra}))
    totals["acceptance_rate"] = totals["accepted"] / totals["proposed"] if totals["proposed"] else 0.0
    reached = totals["accepted"] + totals["rejected_rounds"]  # draft positions the verifier decided on
    totals["alpha_per_position"] = totals["accepted"] / reached if reached else 0.0
    totals["draft_s_per_round"] = totals["compute_s"] / totals["rounds"] if totals["rounds"] else 0.0
    return totals
