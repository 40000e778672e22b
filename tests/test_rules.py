"""Each limit, at its one checkpoint (pipeline/rules.py): a good message passes, and every bad
variant of it is refused with the sentence that names the broken rule."""

import math

import pytest

from pipeline.config import LimitsConfig
from pipeline.protocol import Generate, Propose
from pipeline.rules import MAX_ID_CHARS, MAX_PLAIN_AFTER, MAX_STOP_IDS, MAX_TOP_K, generate_problem, propose_problem

LIMITS = LimitsConfig(max_draft_tokens=4, max_history_tokens=64, max_new_tokens=32)
GOOD_PROPOSE = dict(session_id="s", round=0, position=3, draft=[4, 5], history=[1, 2, 3])
GOOD_SAMPLED = dict(GOOD_PROPOSE, q_ids=[[4, 9], [5]], q_probs=[[0.7, 0.2], [1.0]], temperature=0.8, top_p=0.9)
GOOD_GENERATE = dict(request_id="r", prompt=[1, 2, 3], max_new_tokens=8, stop_ids=[0])


def test_good_messages_pass():
    assert propose_problem(Propose(**GOOD_PROPOSE), LIMITS) is None
    assert propose_problem(Propose(**GOOD_SAMPLED), LIMITS) is None
    assert propose_problem(Propose("s", 5, 10, [1]), LIMITS) is None  # no history: the verifier holds it
    assert propose_problem(Propose(**dict(GOOD_PROPOSE, feature_layers=[-1, 0, 29, 30])), LIMITS) is None
    assert propose_problem(Propose("s", 5, 10, [], plain_after=8), LIMITS) is None  # then 8 plain rounds
    assert generate_problem(Generate(**GOOD_GENERATE), LIMITS) is None
    assert generate_problem(Generate(**dict(GOOD_GENERATE, prompt=[1] * 56)), LIMITS) is None  # 56 + 8 = 64


@pytest.mark.parametrize("change, words", [
    (dict(session_id=""), "session_id"),
    (dict(session_id="x" * (MAX_ID_CHARS + 1)), "session_id"),
    (dict(draft=[1] * 5), "draft of 5 tokens"),
    (dict(history=[], position=0), "history must hold"),
    (dict(history=[1] * 65, position=65), "history must hold"),
    (dict(position=4), "position must equal"),
    (dict(history=None, position=62), "session would exceed"),
    (dict(history=None, position=-1), "session would exceed"),
    (dict(history=None, position=40, draft=[], plain_after=30), "session would exceed"),  # 40 + 1 + 30 > 64
    (dict(plain_after=-1), "plain_after"),
    (dict(plain_after=MAX_PLAIN_AFTER + 1), "plain_after"),
    (dict(draft=[4, -5]), "non-negative"),
    (dict(history=[1, -2, 3]), "non-negative"),
    (dict(stop_ids=[2, -1]), "non-negative"),
    (dict(stop_ids=[2] * (MAX_STOP_IDS + 1)), "stop_ids"),
    (dict(feature_layers=[0, 1, 2, 3, 4]), "feature_layers"),
    (dict(feature_layers=[-2]), "feature_layers"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"),
])
def test_each_proposal_rule_is_checked(change, words):
    problem = propose_problem(Propose(**dict(GOOD_PROPOSE, **change)), LIMITS)
    assert problem is not None and words in problem


@pytest.mark.parametrize("change, words", [
    (dict(q_ids=[[4, 9]], q_probs=[[0.7, 0.2]]), "one row per draft token"),
    (dict(q_ids=[[4, 9], [5]], q_probs=[[0.7], [1.0]]), "(id, probability) pairs"),
    (dict(q_ids=[[4, 9], list(range(5, 6 + MAX_TOP_K))], q_probs=[[0.7, 0.2], [0.01] * (MAX_TOP_K + 1)]),
     "(id, probability) pairs"),
    (dict(q_ids=[[4, -9], [5]]), "non-negative"),
    (dict(q_probs=[[0.7, 0.4], [1.0]]), "summing to at most 1"),
    (dict(q_probs=[[1.2, 0.0], [1.0]]), "summing to at most 1"),
    (dict(q_ids=[[8, 9], [5]]), "positive draft probability"),
    (dict(q_probs=[[0.0, 0.2], [1.0]]), "positive draft probability"),
])
def test_each_draft_distribution_rule_is_checked(change, words):
    problem = propose_problem(Propose(**dict(GOOD_SAMPLED, **change)), LIMITS)
    assert problem is not None and words in problem


@pytest.mark.parametrize("change, words", [
    (dict(request_id=""), "request_id"),
    (dict(request_id="r" * (MAX_ID_CHARS + 1)), "request_id"),
    (dict(prompt=[]), "at least one token"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=33), "max_new_tokens"),
    (dict(prompt=[1] * 57), "prompt + max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(prompt=[1, -1]), "non-negative"),
    (dict(stop_ids=[-3]), "non-negative"),
    (dict(stop_ids=[0] * (MAX_STOP_IDS + 1)), "stop_ids"),
])
def test_each_request_rule_is_checked(change, words):
    problem = generate_problem(Generate(**dict(GOOD_GENERATE, **change)), LIMITS)
    assert problem is not None and words in problem
