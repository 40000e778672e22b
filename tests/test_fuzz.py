"""Hostile input for every receiver (hypothesis): garbage MessagePack, wrong types, unknown kinds,
wrong versions, huge or inconsistent fields, out-of-range tokens, replayed and out-of-order
verdicts. No process dies, each bad input is answered or dropped, and valid sessions running
alongside produce exactly the target's output."""

import asyncio
import random
import subprocess
import sys

import msgpack
import pytest
import pytest_asyncio
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.client import DrafterClient, broker_stats
from pipeline.config import LimitsConfig
from pipeline.models import load_causal_lm
from pipeline.protocol import (
    BROKER_FRONTEND_ACCEPTS,
    DRAFTER_CLIENT_ACCEPTS,
    DRAFTER_UPSTREAM_ACCEPTS,
    MESSAGES,
    PROTOCOL_VERSION,
    VERIFIER_ACCEPTS,
    ErrorReply,
    Heartbeat,
    Propose,
    SledError,
    Verdict,
)
from pipeline.reference import greedy_reference
from pipeline.rules import propose_problem
from tests.conftest import TINY_VOCAB, free_ports, make_stack, tiny_llama
from workers.target import TargetVerifier

TRIED = {"frames": 0}
PASSED_RULES = {"proposals": 0}  # hostile proposals that passed the broker's rules and reached the verifier (46 of them)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True),
                    st.text(max_size=20), st.binary(max_size=20))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
                      max_leaves=20)
kinds = st.sampled_from([*MESSAGES, "nope", ""])
versions = st.sampled_from([PROTOCOL_VERSION, PROTOCOL_VERSION, 0, 2, -1, "1", None])


@st.composite
def frames(draw):
    """Mostly near-valid arrays (right version, a real kind, random fields), some pure garbage."""
    shape = draw(st.integers(0, 3))
    if shape == 0:
        return draw(st.binary(max_size=200))
    if shape == 1:
        return msgpack.packb(draw(values), use_bin_type=True)
    body = [draw(kinds), *draw(st.lists(values, max_size=14))]
    return msgpack.packb([draw(versions), body], use_bin_type=True)


@given(frame=frames())
@settings(max_examples=400, deadline=None, derandomize=True)
def test_decode_raises_only_protocol_errors(frame):
    for accepts in (BROKER_FRONTEND_ACCEPTS, VERIFIER_ACCEPTS, DRAFTER_UPSTREAM_ACCEPTS, DRAFTER_CLIENT_ACCEPTS):
        TRIED["frames"] += 1
        try:
            accepts.decode(frame, max_bytes=1 << 20)
        except SledError:
            pass


hostile_ids = st.lists(st.integers(-5, TINY_VOCAB + 5), max_size=20)


@st.composite
def hostile_proposals(draw):
    n = draw(st.integers(0, 6))
    return Propose(
        session_id=draw(st.sampled_from(["h1", "h2", "", "x" * 200, "valid"])),
        round=draw(st.integers(-3, 5)),
        position=draw(st.integers(-3, 30)),
        draft=draw(hostile_ids),
        q_ids=draw(st.lists(st.lists(st.integers(-2, TINY_VOCAB + 2), max_size=4), max_size=n)),
        q_probs=draw(st.lists(st.lists(st.floats(-1, 2), max_size=4), max_size=n)),
        history=draw(st.none() | hostile_ids),
        temperature=draw(st.sampled_from([0.0, 0.7, -1.0, 1e9])),
        top_p=draw(st.sampled_from([1.0, 0.5, 0.0, 2.0])),
        seed=draw(st.integers(-(2**63), 2**63 - 1)),
    )


@pytest.fixture(scope="module")
def tiny_target():
    return tiny_llama(1)


@given(batch=st.lists(hostile_proposals(), max_size=5))
@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_verifier_survives_hostile_batches_and_valid_sessions_are_unaffected(batch, tiny_target):
    """What the broker lets through its one check (pipeline/rules.py) may still be hostile to the
    verifier: tokens outside the vocabulary, unknown or out-of-sync sessions, a session twice."""
    limits = LimitsConfig(max_draft_tokens=8, max_history_tokens=64)
    verifier = TargetVerifier(tiny_target, max_sessions=8, limits=limits)
    valid = Propose("valid-one", 0, 4, [1, 2, 3], history=[9, 8, 7, 6])
    batch = [p for p in batch if propose_problem(p, limits) is None]  # the broker answers the rest itself
    PASSED_RULES["proposals"] += len(batch)
    verdicts = verifier.verify_batch([*batch, valid])
    TRIED["frames"] += len(batch)
    assert len(verdicts) == len(batch) + 1
    alone = TargetVerifier(tiny_target, max_sessions=8, limits=LimitsConfig()).verify_batch([valid])[0]
    assert verdicts[-1] == alone


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory, tiny_models):
    tmp = tmp_path_factory.mktemp("fuzz")
    s = make_stack(tmp, tiny_models["target"], {"small": {"kind": "model", "model": str(tiny_models["small"])}},
                   **{"limits__max_message_bytes": 65536})
    async with s:
        yield s


async def blast(endpoint, frames_to_send, expect):
    """Send frames as a rogue peer; count answers until ``expect`` came or 1 s of silence
    (10 s at most: a loaded machine answers late, not never)."""
    ctx = zmq.asyncio.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    answered = 0
    try:
        for frame in frames_to_send:
            await sock.send(frame)
        async with asyncio.timeout(10):
            while answered < expect or expect == 0:
                try:
                    await asyncio.wait_for(sock.recv(), 1.0)
                    answered += 1
                except TimeoutError:
                    break
    finally:
        sock.close(0)
    return answered


@pytest.mark.asyncio(loop_scope="module")
async def test_broker_and_drafter_survive_fuzzing_while_a_session_runs(stack, tiny_models):
    examples = []
    collect = given(frame=frames())(settings(max_examples=500, deadline=None, derandomize=True)(lambda frame: examples.append(frame)))
    collect()
    # beyond max_message_bytes libzmq drops the sending peer: sent from a socket of their own
    oversized = [b"\x00" * 70000, msgpack.packb([PROTOCOL_VERSION, ["propose", "s", 0, 1, list(range(40000))]])]  # both > 64 KiB
    client = DrafterClient(stack.config.drafter("small").client)
    try:
        prompt = [5, 4, 3, 2, 1]
        running = asyncio.create_task(client.complete(prompt, 60))
        answers = await asyncio.gather(
            blast(stack.config.broker.frontend, examples, len(examples)),
            blast(stack.config.drafter("small").client, examples, len(examples)),
            blast(stack.config.broker.frontend, oversized, 0),
            blast(stack.config.drafter("small").client, oversized, 0),
        )
        result = await asyncio.wait_for(running, 60)
        stack.check_alive()  # no process died
        after = await client.complete([1, 2, 3], 10)
        figures = await broker_stats(stack.config.broker.frontend)
    finally:
        client.close()
    TRIED["frames"] += 2 * (len(examples) + len(oversized))
    target = load_causal_lm(str(tiny_models["target"]))
    assert result.tokens == greedy_reference(target, prompt, 60)
    assert after.tokens == greedy_reference(target, [1, 2, 3], 10)
    assert min(answers[:2]) >= len(examples)  # every frame answered (a valid Generate may stream several)
    assert answers[2] == answers[3] == 0  # oversized: dropped by the socket before Python sees them
    assert sum(figures["rejected"].values()) > 0
    print(f"fuzzing: {TRIED['frames']} hostile inputs in this module, "
          f"{PASSED_RULES['proposals']} through the broker's rules to the verifier")


async def test_drafter_ignores_replayed_and_out_of_order_verdicts(tmp_path, tiny_models):
    """Play the broker for a real drafter process: verify with the real TargetVerifier, but before
    every true verdict send garbage, replays of earlier verdicts and verdicts from the future."""
    front, client_port = free_ports(2)
    args = [sys.executable, "-m", "pipeline", "--set", f'broker.frontend="tcp://127.0.0.1:{front}"',
            "--set", f'drafters.fz.client="tcp://127.0.0.1:{client_port}"', "--set", 'drafters.fz.kind="model"',
            "--set", f'drafters.fz.model="{tiny_models["small"]}"', "--set", "drafters.fz.gamma=3",
            "--set", "broker.heartbeat_ms=200", "drafter", "fz"]
    ctx = zmq.asyncio.Context.instance()
    broker = ctx.socket(zmq.ROUTER)
    broker.linger = 0
    broker.bind(f"tcp://127.0.0.1:{front}")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = load_causal_lm(str(tiny_models["target"]))
    verifier = TargetVerifier(target, max_sessions=4, limits=LimitsConfig())
    rng = random.Random(3)
    sent_history: list[Verdict] = []

    async def play_broker():
        while True:
            identity, frame = await broker.recv_multipart()
            try:
                msg = BROKER_FRONTEND_ACCEPTS.decode(frame)
            except SledError:
                continue
            if isinstance(msg, Heartbeat):
                # answered, as the broker does: a drafter that hears nothing for heartbeat_ms x liveness
                # (1.2 s here; a loaded machine's slow round) reconnects and resends its proposal, and
                # this broker would verify that round twice (a full-suite run failed so: 40 verdicts, 39 rounds)
                await broker.send_multipart([identity, Heartbeat().encode()])
                continue
            if not isinstance(msg, Propose):
                continue
            verdict = verifier.verify_batch([msg])[0]
            assert not verdict.error, verdict
            noise = [b"junk", msgpack.packb([PROTOCOL_VERSION, ["verdict", msg.session_id, "x", 0, 0]])]
            noise += [v.encode() for v in rng.sample(sent_history, min(3, len(sent_history)))]  # replays
            noise.append(Verdict(msg.session_id, msg.round + 5, 2, 1).encode())  # from the future
            noise.append(ErrorReply("overloaded", "stale", True, msg.session_id, msg.round - 1).encode())
            for bad in noise:
                await broker.send_multipart([identity, bad])
            await broker.send_multipart([identity, verdict.encode()])
            sent_history.append(verdict)

    server = asyncio.create_task(play_broker())
    client = DrafterClient(f"tcp://127.0.0.1:{client_port}")
    try:
        result = await asyncio.wait_for(client.complete([7, 7, 1, 2], 40), 60)
    finally:
        client.close()
        server.cancel()
        proc.terminate()
        proc.wait(10)
        broker.close(0)
    assert result.tokens == greedy_reference(target, [7, 7, 1, 2], 40)
    assert len(sent_history) == result.stats["rounds"]
