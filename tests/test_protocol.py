"""Wire messages: round trips, and every kind of malformed frame rejected with an error reply
by a real broker on real sockets, which keeps serving afterwards."""

import asyncio
import contextlib

import msgpack
import pytest
import zmq
import zmq.asyncio

from brokers.broker import Broker
from pipeline.config import load_config
from pipeline.protocol import (
    BROKER_FRONTEND_ACCEPTS,
    MESSAGES,
    PROTOCOL_VERSION,
    BatchVerdicts,
    Cancel,
    CloseSession,
    ErrorCode,
    ErrorReply,
    Generate,
    Heartbeat,
    Propose,
    ProtocolError,
    Ready,
    StatsReply,
    StatsRequest,
    Tokens,
    Verdict,
    VerifyBatch,
    decode,
)
from tests.conftest import free_ports

SAMPLES = [
    Propose("s-1", 3, 17, [5, 6, 7], [[5, 9], [6], [7, 1]], [[0.7, 0.3], [1.0], [0.5, 0.5]], [1, 2, 3], 0.8, 0.9, 42, "model"),
    Propose("s-2", 0, 1, [], history=[4]),
    Verdict("s-1", 3, 2, 11),
    Verdict("s-1", 3, 0, 0, "unknown_session", "resend"),
    ErrorReply(ErrorCode.OVERLOADED, "full", True, "s-1", 3),
    VerifyBatch(7, [Propose("a", 0, 1, [1], history=[2]), Propose("b", 1, 5, [])]),
    BatchVerdicts(7, [Verdict("a", 0, 1, 3), Verdict("b", 1, 0, 4)], 12.5),
    Generate("r1", [1, 2, 3], 16, 0.7, 0.95, 1, [2]),
    Tokens("r1", [4, 5], True, "stop", {"rounds": 3}),
    StatsRequest(),
    StatsReply({"batches": 1, "nested": {"x": [1, 2]}}),
    CloseSession("s-1"),
    Cancel("r1"),
    Ready({"batches": 3}),
    Heartbeat(True, {"sessions": 2}),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    assert decode(msg.encode(), tuple(MESSAGES.values())) == msg


def test_every_message_kind_has_a_sample():
    assert {type(m) for m in SAMPLES} == set(MESSAGES.values())


def test_older_peer_shorter_frame_decodes_with_defaults():
    frame = msgpack.packb([PROTOCOL_VERSION, "propose", "s", 0, 1, [3]])
    assert decode(frame, (Propose,)) == Propose("s", 0, 1, [3])


def pack(*items):
    return msgpack.packb(list(items))


MALFORMED = {
    "not msgpack": (b"\xc1\xc1garbage", ErrorCode.BAD_FRAME),
    "not an array": (msgpack.packb({"kind": "propose"}), ErrorCode.BAD_FRAME),
    "empty array": (pack(), ErrorCode.BAD_FRAME),
    "wrong version": (pack(99, "propose", "s", 0, 1, []), ErrorCode.BAD_VERSION),
    "unknown kind": (pack(PROTOCOL_VERSION, "launch_missiles"), ErrorCode.UNKNOWN_KIND),
    "kind not for this socket": (Verdict("s", 0, 0, 1).encode(), ErrorCode.UNKNOWN_KIND),
    "too few fields": (pack(PROTOCOL_VERSION, "propose", "s"), ErrorCode.BAD_FRAME),
    "too many fields": (pack(PROTOCOL_VERSION, "propose", "s", 0, 1, [], [], [], None, 0.0, 1.0, 0, "", "x"), ErrorCode.BAD_FRAME),
    "wrong type": (pack(PROTOCOL_VERSION, "propose", "s", "zero", 1, []), ErrorCode.BAD_FRAME),
    "bool for int": (pack(PROTOCOL_VERSION, "propose", "s", True, 1, []), ErrorCode.BAD_FRAME),
    "wrong element type": (pack(PROTOCOL_VERSION, "propose", "s", 0, 1, [1, "x"]), ErrorCode.BAD_FRAME),
    "map with int keys": (msgpack.packb({1: 2}), ErrorCode.BAD_FRAME),
    "oversized": (pack(PROTOCOL_VERSION, "propose", "s", 0, 1, list(range(300_000))), ErrorCode.TOO_LARGE),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_frames_raise_with_code(name):
    frame, code = MALFORMED[name]
    with pytest.raises(ProtocolError) as info:
        decode(frame, BROKER_FRONTEND_ACCEPTS, max_bytes=1 << 20)
    assert info.value.code == code


@contextlib.asynccontextmanager
async def running_broker(**settings):
    front, back = free_ports(2)
    overrides = [f'broker.frontend="tcp://127.0.0.1:{front}"', f'broker.backend="tcp://127.0.0.1:{back}"']
    overrides += [f"{k}={v}" for k, v in settings.items()]
    config = load_config(None, overrides)
    ctx = zmq.asyncio.Context()
    stop = asyncio.Event()
    broker = Broker(config, ctx)
    task = asyncio.create_task(broker.run(stop))
    drafter = ctx.socket(zmq.DEALER)
    drafter.linger = 0
    drafter.connect(config.broker.frontend)
    try:
        yield broker, drafter
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        drafter.close(0)
        ctx.term()


async def ask(sock, frame: bytes):
    await sock.send(frame)
    reply = await asyncio.wait_for(sock.recv(), 5)
    return decode(reply, (ErrorReply, StatsReply, Verdict))


async def test_broker_answers_every_malformed_frame_and_keeps_serving():
    async with running_broker(**{"limits.max_message_bytes": 2_000_000}) as (broker, drafter):
        for name, (frame, code) in MALFORMED.items():
            if code == ErrorCode.TOO_LARGE:
                continue  # beyond the socket's cap libzmq drops the peer instead; tested below
            reply = await ask(drafter, frame)
            assert isinstance(reply, ErrorReply), name
            assert reply.code == code, name
        # invalid but well-formed: a draft longer than allowed, and no verifier yet (retriable)
        reply = await ask(drafter, Propose("s", 0, 1, list(range(50)), history=[1]).encode())
        assert reply.code == ErrorCode.INVALID and not reply.retriable
        reply = await ask(drafter, Propose("s", 0, 1, [1], history=[1]).encode())
        assert reply.code == ErrorCode.NO_VERIFIER and reply.retriable
        stats = await ask(drafter, StatsRequest().encode())
        assert isinstance(stats, StatsReply)
        assert sum(stats.stats["rejected"].values()) == len(MALFORMED) - 1 + 2


async def test_oversized_frame_is_dropped_by_the_socket_cap():
    async with running_broker(**{"limits.max_message_bytes": 4096}) as (broker, drafter):
        await drafter.send(b"x" * 10_000)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(drafter.recv(), 0.5)
        assert broker.stats.proposals == 0
