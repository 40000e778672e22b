"""CurveZMQ: only allow-listed devices get in; a session belongs to the key that opened it."""

import asyncio
import contextlib
import json
import subprocess
import sys

import pytest
import zmq
import zmq.asyncio
import zmq.auth

from brokers.broker import Broker
from pipeline.config import load_config
from pipeline.protocol import (
    BatchVerdicts,
    CloseSession,
    ErrorCode,
    ErrorReply,
    Heartbeat,
    Propose,
    Ready,
    StatsReply,
    StatsRequest,
    Verdict,
    VerifyBatch,
    decode,
)
from pipeline.security import CurveKeys, client_keys
from tests.conftest import free_ports


@pytest.fixture
def secured(tmp_path):
    front, back = free_ports(2)
    overrides = [
        f'broker.frontend="tcp://127.0.0.1:{front}"', f'broker.backend="tcp://127.0.0.1:{back}"',
        "security.curve=true", f'security.keys_dir="{tmp_path / "keys"}"',
    ]
    base = [sys.executable, "-m", "pipeline"] + sum((["--set", o] for o in overrides), [])
    subprocess.run(base + ["keys", "generate", "broker", "verifier-0", "alice", "bob", "--authorize"], check=True)
    subprocess.run(base + ["keys", "generate", "mallory"], check=True)  # a key, but not on the list
    listed = json.loads(subprocess.run(base + ["keys", "list", "--json"], check=True, capture_output=True).stdout)
    assert {r["name"]: r["authorized"] for r in listed} == {
        "alice": True, "bob": True, "broker": True, "mallory": False, "verifier-0": True}
    return load_config(None, overrides)


def dealer(ctx, endpoint, keys: CurveKeys | None, identity=None):
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if identity:
        sock.identity = identity
    if keys:
        keys.apply(sock, server=False)
    sock.connect(endpoint)
    return sock


async def answer(sock, timeout=3.0):
    try:
        frame = await asyncio.wait_for(sock.recv(), timeout)
    except TimeoutError:
        return None
    return decode(frame, (ErrorReply, StatsReply, Verdict))


async def fake_verifier(sock):
    """Answers every batch: nothing accepted, token 7; heartbeats so the broker keeps it."""
    await sock.send(Ready().encode())
    while True:
        try:
            frame = await asyncio.wait_for(sock.recv(), 0.2)
        except TimeoutError:
            await sock.send(Heartbeat().encode())
            continue
        if not isinstance(batch := decode(frame, (VerifyBatch, Heartbeat)), VerifyBatch):
            continue
        verdicts = [Verdict(i.session_id, i.round, 0, 7) for i in batch.items]
        await sock.send(BatchVerdicts(batch.batch_id, verdicts).encode())
        await sock.send(Ready().encode())


async def test_only_allow_listed_keys_get_in_and_sessions_stay_with_their_key(secured):
    config = secured
    ctx = zmq.asyncio.Context()
    stop = asyncio.Event()
    broker_task = asyncio.create_task(Broker(config, ctx).run(stop))
    mallory_keys = CurveKeys(*zmq.auth.load_certificate(f"{config.security.keys_dir}/mallory.key_secret"),
                             client_keys(config, "alice").server_public)
    verifier = dealer(ctx, config.broker.backend, client_keys(config, "verifier-0"), b"verifier-0")
    alice = dealer(ctx, config.broker.frontend, client_keys(config, "alice"))
    bob = dealer(ctx, config.broker.frontend, client_keys(config, "bob"))
    mallory = dealer(ctx, config.broker.frontend, mallory_keys)
    plain = dealer(ctx, config.broker.frontend, None)
    verifying = asyncio.create_task(fake_verifier(verifier))
    try:
        for outsider in (mallory, plain):
            with contextlib.suppress(zmq.Again):  # a refused peer may not even get a pipe to queue on
                await outsider.send(StatsRequest().encode(), zmq.NOBLOCK)
            assert await answer(outsider, 1.0) is None  # refused at the handshake: never reaches the broker
        await alice.send(StatsRequest().encode())
        assert isinstance(await answer(alice), StatsReply)

        await alice.send(Propose("alice-1", 0, 1, [], history=[3]).encode())
        assert isinstance(await answer(alice), Verdict)
        # bob holds a valid key, but the session is alice's
        await bob.send(Propose("alice-1", 1, 2, [5]).encode())
        refused = await answer(bob)
        assert isinstance(refused, ErrorReply) and refused.code == ErrorCode.NOT_OWNER
        await bob.send(CloseSession("alice-1").encode())
        await alice.send(Propose("alice-1", 1, 2, [5]).encode())
        verdict = await answer(alice)
        assert isinstance(verdict, Verdict) and verdict.round == 1  # bob's close was ignored
        assert await answer(bob, 0.5) is None  # and bob never sees alice's verdicts
    finally:
        verifying.cancel()
        stop.set()
        await asyncio.wait_for(broker_task, 5)
        with contextlib.suppress(asyncio.CancelledError):
            await verifying
        for sock in (verifier, alice, bob, mallory, plain):
            sock.close(0)
        ctx.term()
