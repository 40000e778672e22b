"""The drafter service's adaptive draft length over real sockets, against a scripted broker that
rejects every draft at a dear row cost, then accepts every draft at a cheap one: the drafts
shorten, then lengthen again; with ``adaptive = false`` they stay at gamma."""

import asyncio
import contextlib

import pytest
import zmq
import zmq.asyncio

from pipeline.client import DrafterClient
from pipeline.config import load_config
from pipeline.protocol import BROKER_FRONTEND_ACCEPTS, Heartbeat, Propose, Verdict
from pipeline.sockets import make_socket
from tests.conftest import stack_overrides
from workers.drafter import DrafterService
from workers.drafts import NgramDrafter

PERIOD = 4
PROMPT = [i % PERIOD + 1 for i in range(12)]  # periodic: the n-gram drafter always has a continuation
REJECTING_ROUNDS = 20


VERIFY_FIXED_S = 0.02  # a verifier's round has a fixed part: with none, drafting could never save time


async def scripted_broker(sock: zmq.asyncio.Socket, lengths: list[int]) -> None:
    """Rounds < REJECTING_ROUNDS: nothing accepted, rows at 5 ms; after: all accepted, rows at 0.5 ms.
    Each verdict leaves after the round's fixed part and its rows' cost, like a verifier's."""
    while True:
        identity, frame = (await sock.recv_multipart())[:2]
        msg = BROKER_FRONTEND_ACCEPTS.decode(frame)
        if isinstance(msg, Heartbeat):
            await sock.send_multipart([identity, Heartbeat().encode()])
            continue
        if not isinstance(msg, Propose):
            continue
        lengths.append(len(msg.draft))
        rejecting = msg.round < REJECTING_ROUNDS
        accepted = 0 if rejecting else len(msg.draft)
        token = (msg.position + accepted) % PERIOD + 1  # the periodic text's next token
        row_cost_ms = 5.0 if rejecting else 0.5
        await asyncio.sleep(VERIFY_FIXED_S + row_cost_ms * (1 + len(msg.draft)) / 1000)
        verdict = Verdict(msg.session_id, msg.round, accepted, token, row_cost_ms=row_cost_ms)
        await sock.send_multipart([identity, verdict.encode()])


async def draft_lengths(adaptive: bool) -> list[int]:
    config = load_config(None, stack_overrides("unused", {"ng": {"kind": "ngram", "gamma": 4, "adaptive": adaptive}}))
    ctx = zmq.asyncio.Context()
    broker = make_socket(ctx, zmq.ROUTER, bind=config.broker.frontend, max_message_bytes=1 << 20)
    lengths: list[int] = []
    stop = asyncio.Event()
    service = DrafterService(config, "ng", NgramDrafter(ngram_max=4), ctx)
    tasks = [asyncio.create_task(service.run(stop)), asyncio.create_task(scripted_broker(broker, lengths))]
    client = DrafterClient(config.drafter("ng").client, ctx)
    try:
        result = await client.complete(PROMPT, 120, timeout=60)
        assert result.tokens == [(len(PROMPT) + i) % PERIOD + 1 for i in range(120)]
    finally:
        client.close()
        stop.set()
        tasks[1].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        broker.close(0)
        ctx.term()
    return lengths


@pytest.mark.asyncio
async def test_drafts_shorten_under_rejection_at_a_dear_row_and_lengthen_when_rows_are_cheap():
    lengths = await draft_lengths(adaptive=True)
    assert lengths[0] == 4  # no cost known yet: today's gamma
    rejecting = lengths[REJECTING_ROUNDS - 8:REJECTING_ROUNDS]
    assert sum(rejecting) / len(rejecting) <= 1.0, lengths  # at most a probing token now and then
    assert lengths[-4] == 4, lengths  # accepted again, at cheap rows: back to the whole gamma


@pytest.mark.asyncio
async def test_a_fixed_gamma_drafter_ignores_acceptance_and_cost():
    lengths = await draft_lengths(adaptive=False)
    assert lengths[:-1] == [4] * (len(lengths) - 1)  # the last round is cut by max_new_tokens
