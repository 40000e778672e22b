"""CurveZMQ: only allow-listed devices get in; a session belongs to the key that opened it."""

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

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
    Inbox,
)
from pipeline.security import (
    CurveKeys,
    InsecureConfig,
    RoleAllowList,
    bundle,
    check_bind,
    check_gateway,
    client_keys,
    listing,
)
from tests.conftest import free_ports


@pytest.fixture
def secured(tmp_path):
    front, back = free_ports(2)
    overrides = [
        f'broker.frontend="tcp://127.0.0.1:{front}"', f'broker.backend="tcp://127.0.0.1:{back}"',
        "security.curve=true", f'security.keys_dir="{tmp_path / "keys"}"',
    ]
    base = [sys.executable, "-m", "pipeline"] + sum((["--set", o] for o in overrides), [])
    subprocess.run(base + ["keys", "generate", "broker"], check=True)  # the server: on no allow-list
    subprocess.run(base + ["keys", "generate", "verifier-0", "--authorize", "--role", "verifier"], check=True)
    subprocess.run(base + ["keys", "generate", "alice", "bob", "--authorize", "--role", "drafter"], check=True)
    subprocess.run(base + ["keys", "generate", "admin", "--authorize", "--role", "admin"], check=True)
    subprocess.run(base + ["keys", "generate", "mallory"], check=True)  # a key, but not on any list
    listed = json.loads(subprocess.run(base + ["keys", "list", "--json"], check=True, capture_output=True).stdout)
    assert {r["name"]: r["roles"] for r in listed} == {
        "admin": ["admin"], "alice": ["drafter"], "bob": ["drafter"], "broker": [], "mallory": [],
        "verifier-0": ["verifier"]}
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
    return Inbox(ErrorReply, StatsReply, Verdict).decode(frame)


async def fake_verifier(sock):
    """Answers every batch: nothing accepted, token 7; heartbeats so the broker keeps it."""
    await sock.send(Ready().encode())
    while True:
        try:
            frame = await asyncio.wait_for(sock.recv(), 0.2)
        except TimeoutError:
            await sock.send(Heartbeat().encode())
            continue
        if not isinstance(batch := Inbox(VerifyBatch, Heartbeat).decode(frame), VerifyBatch):
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


def curve_keys(config, name, server_public=None):
    public, secret = zmq.auth.load_certificate(f"{config.security.keys_dir}/{name}.key_secret")
    return CurveKeys(public, secret, server_public or client_keys(config, "admin").server_public)


async def test_each_socket_admits_only_its_roles_and_counts_refusals(secured):
    """The frontend admits drafter and admin keys, the backend verifier keys only; a key of the
    wrong role is refused at the handshake (wrong_role), a peer without CURVE too (unauthorised)."""
    config = secured
    ctx = zmq.asyncio.Context()
    stop = asyncio.Event()
    broker = Broker(config, ctx)
    broker_task = asyncio.create_task(broker.run(stop))
    drafter_as_verifier = dealer(ctx, config.broker.backend, curve_keys(config, "alice"), b"verifier-rogue")
    verifier_as_drafter = dealer(ctx, config.broker.frontend, curve_keys(config, "verifier-0"))
    plain_backend = dealer(ctx, config.broker.backend, None, b"verifier-plain")
    admin = dealer(ctx, config.broker.frontend, client_keys(config, "admin"))
    verifier = dealer(ctx, config.broker.backend, client_keys(config, "verifier-0"), b"verifier-0")
    socks = (drafter_as_verifier, verifier_as_drafter, plain_backend, admin, verifier)
    try:
        for rogue in (drafter_as_verifier, plain_backend):
            with contextlib.suppress(zmq.Again):
                await rogue.send(Ready().encode(), zmq.NOBLOCK)
        with contextlib.suppress(zmq.Again):
            await verifier_as_drafter.send(StatsRequest().encode(), zmq.NOBLOCK)
        await verifier.send(Ready().encode())
        for rogue in (drafter_as_verifier, plain_backend, verifier_as_drafter):
            assert await answer(rogue, 0.5) is None
        await admin.send(StatsRequest().encode())
        stats = (await answer(admin)).stats
        assert set(stats["verifiers"]) == {"verifier-0"}  # neither rogue registered
        assert stats["refused"]["wrong_role"] >= 2
        assert stats["refused"]["unauthorised"] >= 1  # the plain peer, seen by the handshake monitor
    finally:
        stop.set()
        await asyncio.wait_for(broker_task, 5)
        for sock in socks:
            sock.close(0)
        ctx.term()


def sled(*args, timeout=20):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("setting, role, within_s", [
    ('broker.backend="tcp://0.0.0.0:{port}"', ["broker"], 5),
    ('broker.frontend="tcp://0.0.0.0:{port}"', ["broker"], 5),
    ('drafters.ngram.client="tcp://0.0.0.0:{port}"', ["drafter", "ngram"], 15),  # imports torch first
])
def test_an_unauthenticated_bind_off_loopback_is_refused_at_once(setting, role, within_s):
    port, = free_ports(1)
    started = time.monotonic()
    done = sled("--set", setting.format(port=port), *role)
    assert time.monotonic() - started < within_s
    assert done.returncode != 0
    assert "security.allow_insecure" in done.stderr and "role_refused" in done.stderr


def test_allow_insecure_overrides_with_a_warning_and_ipc_needs_no_keys(tmp_path):
    config = load_config(None, ['broker.frontend="tcp://0.0.0.0:1"', "security.allow_insecure=true"])
    check_bind(config, config.broker.frontend, "broker.frontend", curve=False)  # warned, not refused
    strict = load_config(None, [])
    for endpoint in (f"ipc://{tmp_path}/s", "tcp://127.0.0.1:5", "tcp://[::1]:5", "tcp://localhost:5"):
        check_bind(strict, endpoint, "x", curve=False)
    for endpoint in ("tcp://0.0.0.0:5", "tcp://*:5", "tcp://10.1.2.3:5", "tcp://broker:5"):
        with pytest.raises(InsecureConfig, match="security.allow_insecure"):
            check_bind(strict, endpoint, "x", curve=False)
        check_bind(strict, endpoint, "x", curve=True)  # CURVE on: authenticated, allowed


def test_the_gateway_listens_off_loopback_only_with_api_keys():
    check_gateway(load_config(None, []))
    with pytest.raises(InsecureConfig, match="gateway.api_keys"):
        check_gateway(load_config(None, ['gateway.host="0.0.0.0"']))
    check_gateway(load_config(None, ['gateway.host="0.0.0.0"', 'gateway.api_keys=["k"]']))
    check_gateway(load_config(None, ['gateway.host="0.0.0.0"', "security.allow_insecure=true"]))


def test_role_less_keys_of_the_old_layout_are_refused_until_filed(secured, tmp_path):
    config = secured
    folder = Path(config.security.keys_dir) / "authorized"
    shutil.copy(folder / "drafter" / "bob.key", folder / "carol.key")  # the pre-role layout: authorized/NAME.key
    with pytest.raises(InsecureConfig, match="sled keys authorize"):
        RoleAllowList(config)
    listed = {r["name"]: r for r in listing(config)}
    assert listed["bob"]["roles"] == ["drafter"]
    done = sled("--set", f'security.keys_dir="{config.security.keys_dir}"', "keys", "authorize", "carol",
                "--role", "verifier")
    assert done.returncode == 0, done.stderr
    assert not (folder / "carol.key").exists() and (folder / "verifier" / "carol.key").is_file()
    RoleAllowList(config)  # migrated: starts


def test_bundles_hold_what_each_host_needs_and_no_other_secret(secured, tmp_path):
    config = secured
    names = lambda paths: sorted(str(p.relative_to(tmp_path / "b")) for p in paths)  # noqa: E731
    broker = names(bundle(config, "broker", "", tmp_path / "b"))
    assert [p for p in broker if p.endswith("_secret")] == ["broker.key_secret"]
    assert "authorized/verifier/verifier-0.key" in broker and "authorized/drafter/alice.key" in broker
    shutil.rmtree(tmp_path / "b")
    assert names(bundle(config, "drafter", "alice", tmp_path / "b")) == [
        "alice.key", "alice.key_secret", "authorized/admin/admin.key", "broker.key"]
    shutil.rmtree(tmp_path / "b")
    assert names(bundle(config, "verifier", "verifier-0", tmp_path / "b")) == [
        "broker.key", "verifier-0.key", "verifier-0.key_secret"]


def test_allow_insecure_starts_the_broker_and_warns_at_every_start():
    front, back = free_ports(2)
    argv = [sys.executable, "-m", "pipeline", "--set", f'broker.frontend="tcp://0.0.0.0:{front}"',
            "--set", f'broker.backend="tcp://127.0.0.1:{back}"', "--set", "security.allow_insecure=true", "broker"]
    for _ in range(2):
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            lines = []
            while not any("broker_started" in line for line in lines):
                line = proc.stderr.readline()
                assert line, "".join(lines)
                lines.append(line)
        finally:
            proc.terminate()
            rest = proc.communicate(timeout=10)[1]
        assert proc.returncode == 0, rest
        warned = [line for line in lines if "insecure_bind" in line]
        assert len(warned) == 1 and "broker.frontend" in warned[0]
