"""Record what a device's drafter proposes along each session, for the emulated fleet to replay.

Two cores cannot run thirty-two devices' draft models in parallel with a verifier, so the fleet
emulation splits drafting in two. Here, before the timed run and with nothing else running, each
device class's real drafter (workers/drafts.py, one thread) walks every session it will serve:
at each round it proposes from the committed context, the thread CPU time of that is measured,
and the round ends as the verifier would end it under greedy decoding -- the longest prefix
agreeing with the target's own continuation (transformers' ``generate``), then the target's
token. In the timed run the device's drafter process replays those drafts (workers/drafts.py
``ReplayDrafter``) and holds each one for its measured compute time times the device's slowdown
(``drafters.NAME.emulate_slowdown``). The verifier still checks every draft for real; a replayed
draft that the target would not make is simply rejected, so the output stays the target's.
"""

from __future__ import annotations

import time
from pathlib import Path

import msgpack
import torch

from pipeline.protocol import Sampling
from workers.drafts import context_key, draft_generator

GREEDY = Sampling(0.0, 1.0, 0)


def record_session(strategy, prompt: list[int], reference: list[int], gamma: int, max_new_tokens: int,
                   stop_ids: list[int], drafts: dict[str, list]) -> dict:
    """Walk one session as workers/drafter.py would, adding ``{context_key: [tokens, cpu_s]}``."""
    state = strategy.new_state()
    generator = draft_generator(0)
    committed = list(prompt)
    stops = set(stop_ids)
    generated = rounds = proposed = accepted_total = rejected_rounds = 0
    compute_s = 0.0
    while generated < max_new_tokens and generated < len(reference):
        budget = max_new_tokens - generated
        started = time.thread_time()
        draft = strategy.propose(state, committed, min(gamma, budget - 1), GREEDY, generator)
        spent = time.thread_time() - started
        drafts[context_key(committed)] = [draft.tokens, spent]
        ahead = reference[generated:]
        accepted = 0
        while accepted < len(draft.tokens) and accepted < len(ahead) - 1 and draft.tokens[accepted] == ahead[accepted]:
            accepted += 1
        strategy.commit(state, len(committed), accepted)
        new = ahead[: accepted + 1][:budget]
        for i, token in enumerate(new):
            if token in stops:
                new = new[: i + 1]
                break
        committed += new
        generated += len(new)
        rounds += 1
        proposed += len(draft.tokens)
        accepted_total += accepted
        rejected_rounds += accepted < len(draft.tokens)
        compute_s += spent
        if new and new[-1] in stops:
            break
    return {"rounds": rounds, "proposed": proposed, "accepted": accepted_total, "rejected_rounds": rejected_rounds,
            "compute_s": compute_s, "generated": generated}


@torch.inference_mode()
def record_trace(strategy, kind: str, prompts: list[list[int]], references: list[list[int]], gamma: int,
                 max_new_tokens: int, stop_ids: list[int], path: Path) -> dict:
    """Record every prompt for one device class into ``path``; returns the class's figures."""
    drafts: dict[str, list] = {}
    totals = {"rounds": 0, "proposed": 0, "accepted": 0, "rejected_rounds": 0, "compute_s": 0.0, "generated": 0}
    for prompt, reference in zip(prompts, references):
        figures = record_session(strategy, prompt, reference, gamma, max_new_tokens, stop_ids, drafts)
        for key in totals:
            totals[key] += figures[key]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(msgpack.packb({"kind": kind, "drafts": drafts}))
    totals["acceptance_rate"] = totals["accepted"] / totals["proposed"] if totals["proposed"] else 0.0
    reached = totals["accepted"] + totals["rejected_rounds"]  # draft positions the verifier decided on
    totals["alpha_per_position"] = totals["accepted"] / reached if reached else 0.0
    totals["draft_s_per_round"] = totals["compute_s"] / totals["rounds"] if totals["rounds"] else 0.0
    return totals
