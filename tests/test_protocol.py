"""Wire messages: golden frames written by hand, and every kind of malformed frame rejected with an error reply
by a real broker on real sockets, which keeps serving afterwards."""

import asyncio
import contextlib

import msgpack
import pytest
import zmq
import zmq.asyncio

from brokers.broker import Broker
from pipeline.config import load_config
from pipeline.figures import BrokerSnapshot, DrafterFigures, Histogram, VerifierFigures, VerifierView
from pipeline.protocol import (
    BROKER_FRONTEND_ACCEPTS,
    DRAFTER_UPSTREAM_ACCEPTS,
    MESSAGES,
    PROTOCOL_VERSION,
    BatchVerdicts,
    Cancel,
    CloseSession,
    Dying,
    ErrorCode,
    ErrorReply,
    Generate,
    Heartbeat,
    Inbox,
    Message,
    Propose,
    SledError,
    Ready,
    StatsReply,
    StatsRequest,
    Tokens,
    Verdict,
    VerifyBatch,
)
from tests.conftest import free_ports

PV = PROTOCOL_VERSION
FIGURES = VerifierFigures(batches=3, items=5, errors={"invalid": 1})

# Golden frames: each message next to its layout on the wire, written out by hand and packed by the
# independent ``msgpack`` library, so that a change of field order, a renamed kind or a new
# required field fails here instead of between two hosts running different versions.
GOLDEN = [
    (Propose("s-1", 3, 17, [5, 6, 7], [[5, 9], [6], [7, 1]], [[0.7, 0.3], [1.0], [0.5, 0.5]], [1, 2, 3], 0.8, 0.9, 42,
             "model", [-1, 2]),
     [PV, ["propose", "s-1", 3, 17, [5, 6, 7], [[5, 9], [6], [7, 1]], [[0.7, 0.3], [1.0], [0.5, 0.5]], [1, 2, 3], 0.8,
           0.9, 42, "model", [-1, 2], [], 0, -1, -1, []]]),
    (Propose("s-2", 0, 1, [], history=[4]), [PV, ["propose", "s-2", 0, 1, [], [], [], [4], 0.0, 1.0, 0, "", [], [], 0, -1, -1, []]]),
    (Propose("s-2", 5, 9, [], plain_after=8, stop_ids=[2]),
     [PV, ["propose", "s-2", 5, 9, [], [], [], None, 0.0, 1.0, 0, "", [], [], 8, -1, -1, [2]]]),
    (Propose("s-2", 6, 12, [3, 4], if_accepted=2, if_token=7),
     [PV, ["propose", "s-2", 6, 12, [3, 4], [], [], None, 0.0, 1.0, 0, "", [], [], 0, 2, 7, []]]),
    (Propose("s-3", 2, 9, [4, 5, 6], parents=[-1, -1, 0]),
     [PV, ["propose", "s-3", 2, 9, [4, 5, 6], [], [], None, 0.0, 1.0, 0, "", [], [-1, -1, 0], 0, -1, -1, []]]),
    (Verdict("s-1", 3, 2, 11), [PV, ["verdict", "s-1", 3, 2, 11, "", "", b"", 0, 0.0, 0.0, [], 0]]),
    (Verdict("s-1", 3, 2, 11, batch_seq=42), [PV, ["verdict", "s-1", 3, 2, 11, "", "", b"", 0, 0.0, 0.0, [], 42]]),
    (Verdict("s-3", 2, 2, 8, path=[1, 2]), [PV, ["verdict", "s-3", 2, 2, 8, "", "", b"", 0, 0.0, 0.0, [1, 2], 0]]),
    (Verdict("s-1", 3, 2, 11, row_cost_ms=1.5), [PV, ["verdict", "s-1", 3, 2, 11, "", "", b"", 0, 1.5, 0.0, [], 0]]),
    (Verdict("s-1", 3, 2, 11, row_cost_ms=1.5, round_cost_ms=6.25),
     [PV, ["verdict", "s-1", 3, 2, 11, "", "", b"", 0, 1.5, 6.25, [], 0]]),
    (Verdict("s-1", 3, 0, 0, "unknown_session", "resend"), [PV, ["verdict", "s-1", 3, 0, 0, "unknown_session", "resend", b"", 0, 0.0, 0.0, [], 0]]),
    (Verdict("s-1", 4, 1, 9, features=b"\x01\x02", features_start=16), [PV, ["verdict", "s-1", 4, 1, 9, "", "", b"\x01\x02", 16, 0.0, 0.0, [], 0]]),
    (CloseSession("s-1"), [PV, ["close", "s-1"]]),
    (ErrorReply(ErrorCode.OVERLOADED, "full", True, "s-1", 3), [PV, ["error", "overloaded", "full", True, "s-1", 3, ""]]),
    (StatsRequest(), [PV, ["stats_req"]]),
    (StatsReply(drafter=DrafterFigures("pi5", "model", 4, requests=2, proposed=8, accepted=6, refused={"unauthorised": 1},
                                       acceptance_rate=0.75)),
     [PV, ["stats", None, {
         "drafter": "pi5", "kind": "model", "gamma": 4, "requests": 2, "active": 0, "rounds": 0, "proposed": 8,
         "accepted": 6, "generated": 0, "resyncs": 0, "retries": 0, "timeouts": 0, "stale_replies": 0, "failed": 0,
         "rejected_frames": 0, "reconnects": 0, "bytes_sent": 0, "bytes_received": 0, "draft_s": 0.0, "gamma_sum": 0,
         "proactive_hits": 0, "proactive_misses": 0, "proactive_wasted": 0, "proactive_wasted_s": 0.0, "plain_rounds": 0,
         "sent_ahead": 0, "sent_ahead_confirmed": 0,
         "refused": {"unauthorised": 1}, "acceptance_rate": 0.75, "mean_gamma": 0.0}]]),
    (Ready(), [PV, ["ready", None]]),
    (Ready(FIGURES), [PV, ["ready", {"batches": 3, "items": 5, "errors": {"invalid": 1}}]]),
    (Heartbeat(), [PV, ["heartbeat", False, None]]),
    (Heartbeat(True, FIGURES), [PV, ["heartbeat", True, {"batches": 3, "items": 5, "errors": {"invalid": 1}}]]),
    (Dying("CUDA out of memory"), [PV, ["dying", "CUDA out of memory"]]),
    (VerifyBatch(7, [Propose("a", 0, 1, [1], history=[2])]),
     [PV, ["batch", 7, [["propose", "a", 0, 1, [1], [], [], [2], 0.0, 1.0, 0, "", [], [], 0, -1, -1, []]]]]),
    (BatchVerdicts(7, [Verdict("a", 0, 1, 3), Verdict("b", 1, 0, 4)], 12.5, 9.25),
     [PV, ["verdicts", 7, [["verdict", "a", 0, 1, 3, "", "", b"", 0, 0.0, 0.0, [], 0], ["verdict", "b", 1, 0, 4, "", "", b"", 0, 0.0, 0.0, [], 0]], 12.5, 9.25]]),
    (Generate("r1", [1, 2, 3], 16, 0.7, 0.95, 1, [2]), [PV, ["generate", "r1", [1, 2, 3], 16, 0.7, 0.95, 1, [2]]]),
    (Cancel("r1"), [PV, ["cancel", "r1"]]),
    (Tokens("r1", [4, 5], True, "stop", {"rounds": 3}), [PV, ["tokens", "r1", [4, 5], True, "stop", {"rounds": 3}]]),
]
ANY = Inbox(*MESSAGES.values())


@pytest.mark.parametrize("msg, layout", GOLDEN, ids=lambda m: type(m).__name__ if isinstance(m, Message) else "")
def test_golden_frames(msg, layout):
    assert msgpack.unpackb(msg.encode()) == layout  # what we send is the layout written here
    assert ANY.decode(msgpack.packb(layout)) == msg  # and the layout written here is what we read


def test_golden_bytes_of_a_proposal():
    """One frame spelled out byte by byte: [3, ["close", "s"]]."""
    assert CloseSession("s").encode() == bytes.fromhex("92 03 92 a5 636c6f7365 a1 73")
    assert PROTOCOL_VERSION == 3


def test_a_broker_stats_reply_is_typed_and_missing_figures_take_their_defaults():
    layout = [PV, ["stats", {"proposals": 5, "rejected": {"invalid": 2},
                             "batch_sessions": {"bounds": [1.0, 2.0], "counts": [1, 1, 0], "sum": 3.0, "count": 2},
                             "verifiers": {"verifier-0": {"sessions": 1, "busy": True, "queued": 2}}}, None]]
    reply = ANY.decode(msgpack.packb(layout))
    assert reply.broker == BrokerSnapshot(proposals=5, rejected={"invalid": 2},
                                          batch_sessions=Histogram([1.0, 2.0], [1, 1, 0], 3.0, 2),
                                          verifiers={"verifier-0": VerifierView(sessions=1, busy=True, queued=2)})
    assert reply.stats["batch_rows"]["count"] == 0 and reply.stats["verifiers"]["verifier-0"]["queued"] == 2
    bad = [PV, ["stats", {"batch_sessions": {"bounds": "many"}}, None]]
    with pytest.raises(SledError) as info:  # a figure of the wrong type is refused like any other field
        ANY.decode(msgpack.packb(bad))
    assert info.value.code == ErrorCode.BAD_FRAME


def test_every_message_kind_has_a_golden_frame():
    assert {type(m) for m, _ in GOLDEN} == set(MESSAGES.values())


def test_older_peer_shorter_frame_decodes_with_defaults():
    frame = msgpack.packb([PV, ["propose", "s", 0, 1, [3]]])
    assert BROKER_FRONTEND_ACCEPTS.decode(frame) == Propose("s", 0, 1, [3])
    frame = msgpack.packb([PV, ["verdict", "s", 0, 1, 3, "", ""]])  # before features were added
    assert DRAFTER_UPSTREAM_ACCEPTS.decode(frame) == Verdict("s", 0, 1, 3)


def pack(*items):
    return msgpack.packb(list(items))


MALFORMED = {
    "not msgpack": (b"\xc1\xc1garbage", ErrorCode.BAD_FRAME),
    "not an array": (msgpack.packb({"kind": "propose"}), ErrorCode.BAD_FRAME),
    "empty array": (pack(), ErrorCode.BAD_FRAME),
    "wrong version": (pack(99, ["propose", "s", 0, 1, []]), ErrorCode.BAD_VERSION),
    "version 1 frame": (pack(1, "propose", "s", 0, 1, []), ErrorCode.BAD_VERSION),
    "unknown kind": (pack(PV, ["launch_missiles"]), ErrorCode.UNKNOWN_KIND),
    "kind not for this socket": (Verdict("s", 0, 0, 1).encode(), ErrorCode.UNKNOWN_KIND),
    "message not an array": (pack(PV, "propose"), ErrorCode.BAD_FRAME),
    "too few fields": (pack(PV, ["propose", "s"]), ErrorCode.BAD_FRAME),
    "too many fields": (pack(PV, ["propose", "s", 0, 1, [], [], [], None, 0.0, 1.0, 0, "", [], "x"]), ErrorCode.BAD_FRAME),
    "wrong type": (pack(PV, ["propose", "s", "zero", 1, []]), ErrorCode.BAD_FRAME),
    "bool for int": (pack(PV, ["propose", "s", True, 1, []]), ErrorCode.BAD_FRAME),
    "wrong element type": (pack(PV, ["propose", "s", 0, 1, [1, "x"]]), ErrorCode.BAD_FRAME),
    "wrong nested type": (pack(PV, ["heartbeat", False, {"batches": "many"}]), ErrorCode.BAD_FRAME),
    "map with int keys": (msgpack.packb({1: 2}), ErrorCode.BAD_FRAME),
    "oversized": (pack(PV, ["propose", "s", 0, 1, list(range(300_000))]), ErrorCode.TOO_LARGE),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_frames_raise_with_code(name):
    frame, code = MALFORMED[name]
    with pytest.raises(SledError) as info:
        BROKER_FRONTEND_ACCEPTS.decode(frame, max_bytes=1 << 20)
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
    return ANY.decode(reply)


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
