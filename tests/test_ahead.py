"""Proposals sent ahead (Propose.if_accepted): a drafter whose next draft is done before the
verdict it assumes sends it at once, and the broker queues it the moment that verdict confirms
it, so the session keeps its place in the next batch instead of paying a link round trip.

The broker's half with a hand-driven verifier and drafter on real sockets (held until the
verdict, queued if it holds, dropped if not, checked at once when it comes late); the drafter's
half through a delaying link proxy, where every draft made ahead is done long before its verdict:
greedy output token-identical to the target alone, sampled output the target's distribution, and
a burst of plain rounds that goes on without a gap."""

import asyncio
import random
import time

import pytest
import pytest_asyncio

from bench.linkproxy import DelayProxy
from pipeline.client import DrafterClient, broker_stats
from pipeline.models import load_causal_lm
from pipeline.protocol import (
    CLIENT_ACCEPTS,
    DRAFTER_UPSTREAM_ACCEPTS,
    VERIFIER_ACCEPTS,
    BatchVerdicts,
    Propose,
    Ready,
    StatsRequest,
    Verdict,
)
from pipeline.reference import greedy_reference
from tests.conftest import make_stack
from tests.test_broker_supersede import HISTORY, hand_driven_broker, recv
from tests.test_proactive import PROMPT, assert_target_pair_distribution, vocab8_models  # noqa: F401 - a fixture

MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")
LINK_S = 0.04  # one way: a verdict takes at least 80 ms, a tiny model's draft a few
WAVE = 20  # sampled sessions at once: more would queue their drafts made ahead behind each other past the verdict


def silent(sock, accepts, seconds: float = 0.3) -> bool:
    """Nothing but heartbeats arrives for ``seconds``."""
    try:
        recv(sock, accepts, seconds)
    except AssertionError:
        return True
    return False


def replies(drafter, n: int) -> set[tuple[str, int]]:
    return {(r.session_id, r.round) for r in (recv(drafter, DRAFTER_UPSTREAM_ACCEPTS) for _ in range(n))}


def test_the_broker_holds_a_proposal_sent_ahead_until_its_verdict():
    with hand_driven_broker(1.0) as (verifier, drafter):
        drafter.send(Propose("s", 0, 3, [9], history=HISTORY).encode())
        first = recv(verifier, VERIFIER_ACCEPTS)
        # while round 0 of s is verified: s's next round, assuming 1 accepted and then token 4;
        # t opens, and sends its next round ahead too, assuming token 99
        drafter.send(Propose("s", 1, 5, [10, 11], if_accepted=1, if_token=4).encode())
        drafter.send(Propose("t", 0, 3, [], history=HISTORY).encode())
        drafter.send(Propose("t", 1, 4, [12], if_accepted=0, if_token=99).encode())
        time.sleep(0.2)
        verifier.send(BatchVerdicts(first.batch_id, [Verdict("s", 0, 1, 4)]).encode())
        time.sleep(0.2)  # the verdict confirmed s's round 1: queued, next to t's round 0
        verifier.send(Ready().encode())
        second = recv(verifier, VERIFIER_ACCEPTS)
        assert {(p.session_id, p.round) for p in second.items} == {("s", 1), ("t", 0)}
        s1 = next(p for p in second.items if p.session_id == "s")
        assert s1.draft == [10, 11] and s1.position == 5 and not s1.ahead  # the verifier sees a plain proposal
        verdicts = [Verdict(p.session_id, p.round, 0, 5) for p in second.items]
        verifier.send(BatchVerdicts(second.batch_id, verdicts).encode())
        verifier.send(Ready().encode())
        assert replies(drafter, 3) == {("s", 0), ("s", 1), ("t", 0)}
        assert silent(verifier, VERIFIER_ACCEPTS)  # t's round 1 assumed token 99, the verdict said 5: dropped
        # a proposal sent ahead that arrives after its verdict (the draft took longer) is checked at once
        drafter.send(Propose("t", 1, 4, [12], if_accepted=0, if_token=5).encode())
        third = recv(verifier, VERIFIER_ACCEPTS)
        assert [(p.session_id, p.round) for p in third.items] == [("t", 1)]
        verifier.send(BatchVerdicts(third.batch_id, [Verdict("t", 1, 1, 6)]).encode())
        assert replies(drafter, 1) == {("t", 1)}
        drafter.send(StatsRequest().encode())
        figures = recv(drafter, CLIENT_ACCEPTS).broker
        assert figures.ahead_queued == 2 and figures.ahead_void == 1


def test_a_stop_token_ends_what_the_broker_would_queue_on_its_own():
    """A verdict that gives one of the request's stop tokens (Propose.stop_ids) ends the session:
    the broker queues no plain round after it and drops a plain round sent ahead for it, which
    the target would otherwise decode past the session's end."""
    with hand_driven_broker(1.0) as (verifier, drafter):
        drafter.send(Propose("s", 0, 3, [], history=HISTORY, plain_after=5, stop_ids=[4]).encode())
        drafter.send(Propose("t", 0, 3, [9], history=HISTORY, stop_ids=[4]).encode())
        first = recv(verifier, VERIFIER_ACCEPTS)
        assert {p.session_id for p in first.items} == {"s", "t"}
        drafter.send(Propose("t", 1, 5, [], if_accepted=1, plain_after=5, stop_ids=[4]).encode())  # any token
        time.sleep(0.2)
        stopped = [Verdict(p.session_id, 0, len(p.draft), 4) for p in first.items]
        verifier.send(BatchVerdicts(first.batch_id, stopped).encode())
        verifier.send(Ready().encode())
        assert replies(drafter, 2) == {("s", 0), ("t", 0)}
        assert silent(verifier, VERIFIER_ACCEPTS)  # neither s's plain round 1 nor t's round 1 sent ahead
        drafter.send(StatsRequest().encode())
        figures = recv(drafter, CLIENT_ACCEPTS).broker
        assert figures.plain_rounds == 0 and figures.ahead_queued == 0 and figures.ahead_void == 1


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def linked(tmp_path_factory, vocab8_models):  # noqa: F811 - the fixture imported above
    """Drafters that reach the broker across a link of LINK_S each way (drafters.NAME.broker)."""
    proxy = DelayProxy("", LINK_S)
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    via = f"tcp://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    common = {"kind": "model", "proactive": True, "adaptive": False, "max_sessions": 128, "broker": via}
    drafters = {
        "twin": {**common, "model": str(vocab8_models["target"]), "gamma": 3},  # every guess right
        "ahead": {**common, "model": str(vocab8_models["drafter"]), "gamma": 1, "top_k": 4},
        "plain": {"kind": "ngram", "gamma": 0, "burst": 5, "broker": via},  # drafts nothing: bursts only
    }
    s = make_stack(tmp_path_factory.mktemp("ahead"), vocab8_models["target"], drafters, broker__max_wait_ms=5.0)
    proxy.upstream = s.config.broker.frontend.removeprefix("tcp://")
    try:
        async with s:
            yield s
    finally:
        server.close()


@MODULE_LOOP
async def test_greedy_sessions_sending_ahead_are_token_identical_to_the_target_alone(linked, vocab8_models):  # noqa: F811
    rng = random.Random(4)
    prompts = [[rng.randrange(8) for _ in range(rng.randint(2, 12))] for _ in range(6)]
    client = DrafterClient(linked.config.drafter("twin").client)
    try:
        results = await asyncio.gather(*[client.complete(p, 30, stop_ids=[], timeout=120) for p in prompts])
    finally:
        client.close()
    target = load_causal_lm(str(vocab8_models["target"]))
    assert [r.tokens for r in results] == [greedy_reference(target, p, 30) for p in prompts]
    for r in results:  # the first round has no draft, and each later one was sent ahead of its predecessor's verdict
        assert r.stats["sent_ahead_confirmed"] >= r.stats["rounds"] // 2, r.stats


@MODULE_LOOP
@pytest.mark.timeout(900)
async def test_sampled_sessions_sending_ahead_keep_the_target_distribution(linked, vocab8_models):  # noqa: F811
    """Four sampled tokens per session: round 0 drafts token 1 and guesses token 2, and the round
    for tokens 3 and 4 is sent ahead on that guess. The joint distribution of tokens 3 and 4 must
    be the target's (chi-square against the exact one, from the logits)."""
    sessions, temperature, top_p = 1200, 1.0, 0.9
    client = DrafterClient(linked.config.drafter("ahead").client)
    try:
        results = []
        for start in range(0, sessions, WAVE):
            results += await asyncio.gather(*[
                client.complete(PROMPT, 4, temperature=temperature, top_p=top_p, seed=seed, timeout=120)
                for seed in range(start, start + WAVE)
            ])
    finally:
        client.close()
    assert_target_pair_distribution(results, vocab8_models["target"], temperature, top_p)
    assert sum(r.stats["sent_ahead_confirmed"] for r in results) > sessions // 10  # the path was really taken


@MODULE_LOOP
async def test_a_burst_goes_on_without_leaving_the_batches(linked, vocab8_models):  # noqa: F811
    """A session whose policy drafts nothing sends the round after each burst while the burst's
    last round is out: the broker queues it at that verdict, and the burst goes on."""
    prompts = [[1, 2, 3], [4, 5, 6, 7], [0, 7, 1, 6, 2]]
    client = DrafterClient(linked.config.drafter("plain").client)
    try:
        before = await broker_stats(linked.config.broker.frontend)
        results = await asyncio.gather(*[client.complete(p, 30, stop_ids=[], timeout=120) for p in prompts])
        after = await broker_stats(linked.config.broker.frontend)
    finally:
        client.close()
    target = load_causal_lm(str(vocab8_models["target"]))
    assert [r.tokens for r in results] == [greedy_reference(target, p, 30) for p in prompts]
    for r in results:  # proposed at round 0, then sent ahead at rounds 6, 12, 18 and 24: 5 plain rounds after each
        assert r.stats["rounds"] == 30 and r.stats["plain_rounds"] == 25 and r.stats["sent_ahead_confirmed"] == 4
    assert after["ahead_queued"] - before["ahead_queued"] == 3 * 4
