"""The broker: drafters on a ROUTER frontend, verifiers on a ROUTER backend, batches in between.

* Sessions are sticky: a session's proposals go to the verifier that holds its KV cache; a new
  session goes to the verifier with the fewest sessions.
* Proposals queue per verifier in a DeadlineBatcher. Verifiers pull: a batch leaves only after
  the verifier said Ready, so while it computes the next batch accumulates.
* Every proposal's verdict goes back to the drafter that sent it (the session's reply queue on
  the drafter side). A full queue answers "overloaded" at once; a dead verifier fails its
  batches with a retriable "verifier_lost"; a bad frame is answered with an error reply.
* A proposal with ``plain_after`` = n is followed by n rounds the broker queues itself, each with
  no draft, as soon as the previous verdict is out (``_follow``): the session stays in the
  verifier's batches, as in centralized decoding, while its drafter only streams the tokens.
* A proposal sent *ahead* (``Propose.if_accepted`` >= 0: drafted while its predecessor was out,
  on an assumption about that round's verdict) waits here for that verdict (``_hold_ahead``). If
  the verdict confirms it, it is queued at once, so the session misses no batch for its drafter's
  link round trip; if not, it is dropped, and the drafter, which reads the same verdict, proposes
  anew.
* Each verifier's batches are timed into a VerifyTimeEstimator (brokers/estimator.py); every
  verdict carries its ``row_cost_ms`` and ``round_cost_ms``. With ``broker.slo_tpot_ms`` > 0 a free verifier's batch may
  be held for proposals expected soon (brokers/slo.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from dataclasses import dataclass, field

import msgspec
import structlog
import zmq
import zmq.asyncio

from brokers.batcher import Batch, BatchPolicy, DeadlineBatcher, QueueFull
from brokers.clock import MonotonicClock, PreciseClock
from brokers.estimator import VerifyTimeEstimator
from brokers.slo import SloHold
from pipeline.config import Config
from pipeline.figures import BrokerFigures, BrokerSnapshot, VerifierFigures, VerifierView
from pipeline.protocol import (
    BROKER_BACKEND_ACCEPTS,
    BROKER_FRONTEND_ACCEPTS,
    BatchVerdicts,
    CloseSession,
    Dying,
    ErrorCode,
    ErrorReply,
    Heartbeat,
    Message,
    Propose,
    SledError,
    Ready,
    StatsReply,
    StatsRequest,
    Verdict,
    VerifyBatch,
)
from pipeline.roles import cancel_and_wait, supervise
from pipeline.rules import propose_problem
from pipeline.security import BACKEND, FRONTEND, HandshakeWatch, check_bind, server_keys, start_authenticator, with_domain
from pipeline.sockets import LoopSocket, make_socket

log = structlog.get_logger("sled.broker")
FAIR_SHARE = 64  # frontend messages handled before the receive loop yields to the other tasks


class VerifierLost(Exception):
    retriable = True


@dataclass(frozen=True)
class Owner:
    principal: bytes  # who may use the session: its CURVE public key, else the socket identity
    drafter: bytes  # the socket its proposals come from; its sessions close when it falls silent


@dataclass
class VerifierHandle:
    identity: bytes
    batcher: DeadlineBatcher[Propose]
    last_seen: float
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    sessions: set[str] = field(default_factory=set)  # the sessions whose KV cache it holds (the only record)
    inflight: dict[int, Batch[Propose]] = field(default_factory=dict)
    stats: VerifierFigures = field(default_factory=VerifierFigures)
    dispatcher: asyncio.Task | None = None
    estimator: VerifyTimeEstimator = field(default_factory=VerifyTimeEstimator)
    slo: SloHold | None = None  # with broker.slo_tpot_ms > 0: the batcher's hold policy
    # the round cost the last verdicts carried: the status snapshot reports it, since one computed
    # when the figures are read (after a level's sessions closed) would be a lone session's share
    round_cost_ms: float = 0.0
    dispatched: int = 0  # its batches so far: each verdict carries its batch's number (Verdict.batch_seq)

    @property
    def name(self) -> str:
        return self.identity.decode(errors="replace")


class Broker:
    def __init__(self, config: Config, ctx: zmq.asyncio.Context, clock=None):
        self.config = config
        self.ctx = ctx
        self.clock = clock or MonotonicClock()
        self._injected_clock = clock is not None  # a test's clock drives the batchers too
        b = config.broker
        self.policy = BatchPolicy(
            max_sessions=b.max_batch_sessions,
            max_tokens=b.max_batch_tokens,
            max_wait_s=b.max_wait_ms / 1000,
            max_queue=b.max_queue,
        )
        self.max_bytes = config.limits.max_message_bytes
        self.verifiers: dict[bytes, VerifierHandle] = {}
        self.session_owner: dict[str, Owner] = {}
        # per session: the proposal sent ahead of the next verdict (at most one), and what the last
        # verdict said (round, accepted, token), against which a late one is checked
        self.held: dict[str, tuple[bytes, bytes, Propose]] = {}
        self.last_verdict: dict[str, tuple[int, int, int]] = {}
        self.drafter_seen: dict[bytes, float] = {}
        self.stats = BrokerFigures()
        self._batch_ids = itertools.count(1)
        self.curve = config.security.curve
        self.allow = None  # RoleAllowList with CURVE on: its refusal counts are figures
        self.frontend: zmq.asyncio.Socket | None = None
        self.backend: zmq.asyncio.Socket | None = None
        # every send and receive goes through these (no Future per message; pipeline/sockets.py)
        self._front: LoopSocket | None = None
        self._back: LoopSocket | None = None

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        b = self.config.broker
        keys = server_keys(self.config)
        check_bind(self.config, b.frontend, "broker.frontend", curve=keys is not None)
        check_bind(self.config, b.backend, "broker.backend", curve=keys is not None)
        # each socket its own ZAP domain: the frontend admits drafter and admin keys, the backend verifier keys only
        auth, self.allow = start_authenticator(self.ctx, self.config) if keys else (None, None)
        self.frontend = make_socket(self.ctx, zmq.ROUTER, bind=b.frontend, max_message_bytes=self.max_bytes,
                                    curve=with_domain(keys, FRONTEND))
        self.backend = make_socket(self.ctx, zmq.ROUTER, bind=b.backend, max_message_bytes=self.max_bytes,
                                   curve=with_domain(keys, BACKEND))
        watches = [HandshakeWatch(self.frontend, FRONTEND, self.allow),
                   HandshakeWatch(self.backend, BACKEND, self.allow)] if keys else []
        self._front, self._back = LoopSocket(self.frontend), LoopSocket(self.backend)
        log.info("broker_started", frontend=b.frontend, backend=b.backend, curve=bool(keys))
        try:
            await supervise(stop, self._frontend_loop(), self._backend_loop(), self._liveness_loop(),
                            *(w.run() for w in watches))
        finally:
            for watch in watches:
                watch.close()
            await cancel_and_wait([v.dispatcher for v in self.verifiers.values()])
            for handle in self.verifiers.values():
                handle.batcher.close()
            self._front.close()
            self._back.close()
            self.frontend.close(0)
            self.backend.close(0)
            if auth is not None:
                auth.stop()

    # --- frontend: drafters --------------------------------------------------------------

    async def _frontend_loop(self) -> None:
        received = 0
        while True:
            received += 1
            if received % FAIR_SHARE == 0:
                await asyncio.sleep(0)  # a steady stream of proposals must not starve the dispatchers
            if self.curve:  # a session belongs to the authenticated public key (zero-copy frames carry it)
                frames = await self._front.recv_multipart(copy=False)
                identity, frame = frames[0].bytes, frames[-1].bytes
                principal = frames[-1].get("User-Id").encode()
            else:  # else to the socket identity; small frames are cheaper copied
                frames = await self._front.recv_multipart()
                identity, frame = frames[0], frames[-1]
                principal = identity
            parts = frames
            if len(parts) != 2:
                self._reply(identity, ErrorReply(ErrorCode.BAD_FRAME, "expected exactly one frame per message"))
                continue
            try:
                msg = BROKER_FRONTEND_ACCEPTS.decode(frame, self.max_bytes)
            except SledError as exc:
                self.stats.count_rejection(exc.code)
                log.warning("frame_rejected", peer=identity.decode(errors="replace"), code=exc.code, reason=exc.detail)
                self._reply(identity, ErrorReply.of(exc))
                continue
            match msg:
                case Propose():
                    self.drafter_seen[identity] = self.clock.now()
                    self._on_propose(identity, principal, msg)
                case CloseSession():
                    self._on_close(identity, principal, msg.session_id)
                case Heartbeat():
                    self.drafter_seen[identity] = self.clock.now()
                    self._reply(identity, Heartbeat())
                case StatsRequest():
                    self._reply(identity, StatsReply(broker=self.snapshot()))

    def _reply(self, identity: bytes, msg: Message) -> None:
        if not self._front.send(identity, msg.encode()):
            self.stats.undeliverable += 1

    def _reject(self, identity: bytes, item: Propose, code: str, detail: str) -> None:
        self.stats.count_rejection(code)
        self._reply(identity, ErrorReply.of(SledError(code, detail), session_id=item.session_id, round=item.round))

    def _on_propose(self, identity: bytes, principal: bytes, item: Propose, followed: bool = False) -> None:
        """``followed``: a round the broker queued itself (``_follow``, or one sent ahead and
        confirmed at its predecessor's verdict), not the drafter."""
        if not item.ahead:  # one sent ahead counts once it is queued, as an unconditional one
            self.stats.proposals += 1
        owner = self.session_owner.get(item.session_id)
        if owner is not None and owner.principal != principal:
            return self._reject(identity, item, ErrorCode.NOT_OWNER, "session belongs to another peer")
        if problem := propose_problem(item, self.config.limits):  # the one check of a drafter's proposal
            return self._reject(identity, item, ErrorCode.INVALID, problem)
        if item.ahead:
            return self._hold_ahead(identity, principal, item)
        held = self.held.get(item.session_id)
        if held is not None and held[2].round <= item.round:  # the drafter proposed that round (or a later one) anew
            del self.held[item.session_id]
        handle = self._verifier_for(item.session_id)
        if handle is None:
            return self._reject(identity, item, ErrorCode.NO_VERIFIER, "no verifier is registered yet")
        cap = self.config.broker.max_sessions
        if item.session_id not in handle.sessions and cap and len(handle.sessions) >= cap:
            # admission control: refuse new work at once so that running sessions keep their pace
            return self._reject(identity, item, ErrorCode.OVERLOADED, f"verifier at its {cap}-session capacity")
        try:
            # one queued proposal per session: a resent or newer one replaces it (batcher.submit)
            future = handle.batcher.submit(item, item.batch_tokens, key=item.session_id, prefill=item.history is not None)
        except QueueFull as exc:
            return self._reject(identity, item, ErrorCode.OVERLOADED, str(exc))
        if owner is None:
            self.session_owner[item.session_id] = Owner(principal, identity)
        handle.sessions.add(item.session_id)
        if handle.slo is not None:
            handle.slo.arrived(item.session_id, self.clock.now(), item.target_tokens, followed=followed)
        future.add_done_callback(lambda f: self._deliver(identity, item, f))

    def _deliver(self, identity: bytes, item: Propose, future: asyncio.Future) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            code = ErrorCode.VERIFIER_LOST if isinstance(exc, VerifierLost) else ErrorCode.INTERNAL
            return self._reject(identity, item, code, str(exc) or code)
        verdict: Verdict = future.result()
        if verdict.error:
            return self._reject(identity, item, verdict.error, verdict.detail)
        self.stats.verdicts += 1
        self._reply(identity, verdict)
        self.last_verdict[item.session_id] = (verdict.round, verdict.accepted, verdict.token)
        held = self.held.get(item.session_id)
        if held is not None and held[2].round <= verdict.round + 1:
            # a proposal sent ahead for the next round takes the place of any plain round this one asked for
            del self.held[item.session_id]
            if held[2].round == verdict.round + 1:
                return self._release_ahead(*held, followed=True)
        if item.plain_after > 0 and not item.ends(verdict):
            self._follow(identity, item, verdict)

    def _hold_ahead(self, identity: bytes, principal: bytes, item: Propose) -> None:
        """A proposal sent ahead (Propose.if_accepted): held until the verdict of the round before
        it, or checked at once when that verdict is already out (the draft took longer than the
        verify). Of a session closed meanwhile: dropped."""
        if item.session_id not in self.session_owner:
            self.stats.ahead_void += 1
            return
        last_round = self.last_verdict.get(item.session_id, (-1,))[0]
        if last_round >= item.round:  # its round was already proposed anew
            self.stats.ahead_void += 1
            return
        if last_round == item.round - 1:
            return self._release_ahead(identity, principal, item, followed=False)
        self.held[item.session_id] = (identity, principal, item)  # a newer one replaces an older one

    def _release_ahead(self, identity: bytes, principal: bytes, item: Propose, followed: bool) -> None:
        """Queue a proposal sent ahead if the last verdict confirms it, else drop it. ``followed``:
        queued at that verdict, without crossing the link (the SLO hold's pace, brokers/slo.py)."""
        if item.holds_after(*self.last_verdict[item.session_id]):
            self.stats.ahead_queued += 1
            self._on_propose(identity, principal, item.unconditional(), followed=followed)
        else:
            self.stats.ahead_void += 1

    def _follow(self, identity: bytes, item: Propose, verdict: Verdict) -> None:
        """The next of the plain rounds ``item`` asked for (Propose.plain_after), queued as if its
        drafter had proposed it with no draft: same checks, same queue, its verdict to the same
        drafter. Not after a stop token (the caller checks Propose.ends), nor for a session closed
        meanwhile (a cancel, its drafter lost), nor
        for one whose drafter already proposed again itself (it resent a round it gave up waiting
        for, asking for the rest of the burst): one chain of rounds per session."""
        owner = self.session_owner.get(item.session_id)
        holder = self._holder(item.session_id)
        if owner is None or (holder is not None and holder.batcher.has(item.session_id)):
            return
        self.stats.plain_rounds += 1
        self._on_propose(identity, owner.principal, item.follow(verdict), followed=True)

    def _on_close(self, identity: bytes, principal: bytes | None, session_id: str) -> None:
        """principal None: the broker itself closes (the owner is gone)."""
        owner = self.session_owner.get(session_id)
        if principal is not None and owner is not None and owner.principal != principal:
            self.stats.count_rejection(ErrorCode.NOT_OWNER)
            return
        self.session_owner.pop(session_id, None)
        self.held.pop(session_id, None)
        self.last_verdict.pop(session_id, None)
        handle = self._holder(session_id)
        if handle is not None:
            handle.sessions.discard(session_id)
            handle.batcher.withdraw(session_id)  # a queued proposal must not rebuild the cache after the close
            if handle.slo is not None:
                handle.slo.forget(session_id)
            self._back.send(handle.identity, CloseSession(session_id).encode())

    def _holder(self, session_id: str) -> VerifierHandle | None:
        """The verifier holding the session's cache (a few verifiers: a scan beats a second index)."""
        for handle in self.verifiers.values():
            if session_id in handle.sessions:
                return handle
        return None

    def _verifier_for(self, session_id: str) -> VerifierHandle | None:
        holder = self._holder(session_id)
        if holder is not None or not self.verifiers:
            return holder
        return min(self.verifiers.values(), key=lambda v: (len(v.sessions), len(v.batcher)))

    # --- backend: verifiers --------------------------------------------------------------

    async def _backend_loop(self) -> None:
        while True:
            parts = await self._back.recv_multipart()
            identity, frame = parts[0], parts[-1]
            try:
                msg = BROKER_BACKEND_ACCEPTS.decode(frame, self.max_bytes)
            except SledError as exc:
                self.stats.count_rejection(exc.code)
                log.warning("verifier_frame_rejected", verifier=identity.decode(errors="replace"), code=exc.code)
                continue
            handle = self.verifiers.get(identity) or self._register(identity)
            handle.last_seen = self.clock.now()
            match msg:
                case Ready():
                    handle.stats = msg.stats or handle.stats
                    handle.ready.set()
                case Heartbeat():
                    handle.stats = msg.stats or handle.stats
                    if msg.idle and not handle.inflight:
                        handle.ready.set()  # a verifier idle since before we (re)started
                case BatchVerdicts():
                    self._on_verdicts(handle, msg)
                case Dying():
                    log.warning("verifier_dying", verifier=handle.name, reason=msg.reason)
                    self._drop_verifier(handle, f"verifier {handle.name} died: {msg.reason}")

    def _register(self, identity: bytes) -> VerifierHandle:
        # each batcher gets its own PreciseClock: deadlines on time, not up to 1 ms late (clock.py)
        batch_clock = self.clock if self._injected_clock else PreciseClock()
        estimator = VerifyTimeEstimator()
        slo_ms = self.config.broker.slo_tpot_ms
        hold = SloHold(slo_ms / 1000, estimator, max_sessions=self.policy.max_sessions,
                       max_tokens=self.policy.max_tokens) if slo_ms > 0 else None
        handle = VerifierHandle(identity, DeadlineBatcher(self.policy, batch_clock, hold), self.clock.now(),
                                estimator=estimator, slo=hold)
        handle.dispatcher = asyncio.create_task(self._dispatch_loop(handle), name=f"dispatch-{handle.name}")
        self.verifiers[identity] = handle
        log.info("verifier_registered", verifier=handle.name, verifiers=len(self.verifiers))
        return handle

    async def _dispatch_loop(self, handle: VerifierHandle) -> None:
        while True:
            await handle.ready.wait()
            batch = await handle.batcher.next_batch()
            handle.ready.clear()
            batch.sent = self.clock.now()
            handle.inflight[batch.batch_id] = batch
            handle.dispatched += 1
            batch.meta["seq"] = handle.dispatched
            payload = VerifyBatch(batch.batch_id, batch.payloads).encode()
            self.stats.batches += 1
            self.stats.batch_sessions.observe(len(batch.items))
            self.stats.batch_rows.observe(batch.tokens)
            for item in batch.items:
                self.stats.observe_wait(item.payload.drafter_kind, batch.sent - item.arrived)
            log.debug("batch_dispatched", batch_id=batch.batch_id, verifier=handle.name, size=len(batch.items), reason=batch.reason)
            if not self._back.send(handle.identity, payload):
                handle.inflight.pop(batch.batch_id, None)
                batch.fail(VerifierLost(f"verifier {handle.name} unreachable"))

    def _on_verdicts(self, handle: VerifierHandle, msg: BatchVerdicts) -> None:
        batch = handle.inflight.pop(msg.batch_id, None)
        if batch is None:
            self.stats.count_rejection("unknown_batch")
            return
        if len(msg.verdicts) != len(batch.items):
            batch.fail(Exception(f"verifier returned {len(msg.verdicts)} verdicts for {len(batch.items)} proposals"))
            return
        now = self.clock.now()
        self.stats.observe_verify(handle.name, now - batch.sent)
        # a batch that (re)built a session's cache also prefilled its history: its time is not
        # the verify rows' and stays out of the fit (it still counts as busy time)
        fit = all(item.payload.history is None for item in batch.items)
        handle.estimator.observe(len(batch.items), max(batch.tokens, len(batch.items)), max(now - batch.sent, 1e-6),
                                 sent=batch.sent, fit=fit, cost=msg.cost_ms / 1000 if msg.cost_ms > 0 else None)
        cost = round(handle.estimator.row_cost_ms(), 4)
        round_cost = handle.round_cost_ms = round(self._round_cost_ms(handle), 4)
        # what the verifier's costs are now, and which of its batches this was: with the number of
        # the session's last verdict, the drafter counts the batches that ran without it
        fields = {"batch_seq": batch.meta["seq"]}
        if cost > 0:
            fields.update(row_cost_ms=cost, round_cost_ms=round_cost)
        verdicts = [v if v.error else msgspec.structs.replace(v, **fields) for v in msg.verdicts]
        if handle.slo is not None:
            for v in verdicts:
                if not v.error:
                    handle.slo.answered(v.session_id, now, v.accepted)
        batch.resolve(verdicts)

    def _round_cost_ms(self, handle: VerifierHandle) -> float:
        """A session's share of a forward that all of this verifier's sessions (at most a batch)
        would split (brokers/estimator.py)."""
        return handle.estimator.round_cost_ms(max(1, min(len(handle.sessions), self.policy.max_sessions)))

    # --- liveness ------------------------------------------------------------------------

    async def _liveness_loop(self) -> None:
        interval = self.config.broker.heartbeat_ms / 1000
        while True:
            await asyncio.sleep(interval)
            deadline = self.clock.now() - interval * self.config.broker.liveness
            for handle in list(self.verifiers.values()):
                if handle.last_seen < deadline:
                    self._drop_verifier(handle)
                else:
                    self._back.send(handle.identity, Heartbeat().encode())
            for identity, seen in list(self.drafter_seen.items()):
                if seen < deadline:
                    self._drop_drafter(identity)

    def _drop_drafter(self, identity: bytes) -> None:
        """A drafter fell silent: free its sessions' caches on the verifiers."""
        del self.drafter_seen[identity]
        sessions = [sid for sid, owner in self.session_owner.items() if owner.drafter == identity]
        for session_id in sessions:
            self._on_close(identity, None, session_id)
        self.stats.drafters_lost += 1
        if sessions:
            log.warning("drafter_lost", drafter=identity.decode(errors="replace"), sessions=len(sessions))

    def _drop_verifier(self, handle: VerifierHandle, reason: str = "") -> None:
        self.verifiers.pop(handle.identity, None)
        self.stats.verifiers_lost += 1
        if handle.dispatcher:
            handle.dispatcher.cancel()
        lost = VerifierLost(reason or f"verifier {handle.name} stopped answering")
        for batch in handle.inflight.values():
            batch.fail(lost)
        queued = handle.batcher.fail_all(lost)
        handle.batcher.close()
        log.warning("verifier_lost", verifier=handle.name, sessions=len(handle.sessions), queued=queued)

    # --- figures -------------------------------------------------------------------------

    def snapshot(self) -> BrokerSnapshot:
        """The figures as they are (counters and histograms), and the routing state now."""
        return BrokerSnapshot(
            **msgspec.structs.asdict(self.stats),
            refused=dict(self.allow.refused) if self.allow else {},
            drafters=len(self.drafter_seen),
            sessions=sum(len(v.sessions) for v in self.verifiers.values()),
            verifiers={v.name: VerifierView(
                **msgspec.structs.asdict(v.stats), queued=len(v.batcher), superseded=v.batcher.superseded,
                busy=bool(v.inflight), holds=v.batcher.holds, held_ms=round(1000 * v.batcher.held_s, 3),
                verify_time_fit_ms=[round(1000 * c, 4) for c in v.estimator.coefficients()],
                verify_cost_fit_ms=[round(1000 * c, 4) for c in v.estimator.cost_coefficients()],
                utilisation=round(v.estimator.utilisation, 4), row_cost_ms=round(v.estimator.row_cost_ms(), 4),
                round_cost_ms=v.round_cost_ms)
                for v in self.verifiers.values()},
        )


async def serve(config: Config, stop: asyncio.Event) -> None:
    ctx = zmq.asyncio.Context()
    try:
        await Broker(config, ctx).run(stop)
    finally:
        with contextlib.suppress(Exception):
            ctx.term()
