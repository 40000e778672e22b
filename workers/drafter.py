"""The drafter process: the edge device's side of SLED.

Local clients (the demo, the gateway, an app on the device) send Generate on the drafter's
client socket. Each request becomes a session: draft up to gamma tokens (in a worker thread),
send the proposal to the broker through a DEALER, wait on the session's own reply queue for
the verdict, roll the draft cache back to the accepted prefix, append the target's token, and
stream the new tokens to the client (with ``proactive``, the next round is drafted while the
proposal is out, and a greedy session's first proposal leaves with no draft). A next proposal
that is ready before the verdict it builds on leaves at once, on the condition that the verdict
is as assumed (Propose.if_accepted; the broker holds it until then): a draft made ahead, or the
round after a burst of plain rounds. The drafter keeps every session's full committed history,
so whenever the verifier has lost the session (eviction, restart, another verifier) it resends
it and the session continues where it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import msgspec
import structlog
import torch
import zmq
import zmq.asyncio

from pipeline.config import Config, DrafterConfig
from pipeline.figures import DrafterFigures
from pipeline.protocol import (
    DRAFTER_CLIENT_ACCEPTS,
    DRAFTER_UPSTREAM_ACCEPTS,
    Cancel,
    CloseSession,
    ErrorCode,
    ErrorReply,
    Generate,
    Heartbeat,
    Propose,
    SledError,
    Sampling,
    StatsReply,
    StatsRequest,
    Tokens,
    Verdict,
)
from pipeline.security import CLIENT, HandshakeWatch, client_keys, drafter_client_curve, start_authenticator
from pipeline.roles import cancel_and_wait, supervise
from pipeline.rules import MAX_PLAIN_AFTER, generate_problem
from pipeline.sockets import BrokerLink, make_socket, new_identity, send_now
from workers.drafts import Draft, DraftStrategy, build_drafter, round_generator, settle
from workers.speculation import RowCostFloor, SpeculationPolicy

log = structlog.get_logger("sled.drafter")
MAX_BACKOFF_S = 2.0
RECONNECTED = object()  # put on every session's reply queue after a reconnect: resend now


@dataclass
class Ahead:
    """A draft made ahead of a verdict: when the (emulated) device has it, and what it cost."""
    draft: Draft
    gamma: int  # the length it was drafted for (its last token, when there is one more, is the guess)
    done_at: float  # time.perf_counter() when the device would have finished it
    device_s: float
    generator: torch.Generator  # its random stream, continued when it was cut short


def split_draft(drafted: Draft, length: int) -> tuple[Draft, int | None]:
    """The first ``length`` tokens as the proposal, and the next one, if drafted, as the guess of
    the target's token (what proactive drafting assumes). A draft is cut at any length without
    harm: each token's q was the distribution it was drawn from, given the tokens before it."""
    if drafted.parents:  # a token tree is drafted to its depth and never guesses past itself
        return drafted, None
    guess = drafted.tokens[length] if len(drafted.tokens) > length else None
    draft = Draft(drafted.tokens[:length], drafted.q_ids[:length], drafted.q_probs[:length], drafted.compute_s,
                  lookup=drafted.lookup, datastore=drafted.datastore)
    return draft, guess


def _first_ahead(made: Ahead, token: int) -> tuple[bool, Ahead]:
    """A first round's draft made ahead (no draft was proposed): confirmed when its first token is
    the verdict's, and then the rest of it is the next round's draft."""
    drafted = made.draft
    if not drafted.tokens or drafted.tokens[0] != token:
        return False, made
    rest = Draft(drafted.tokens[1:], drafted.q_ids[1:], drafted.q_probs[1:], drafted.compute_s, drafted.cut,
                 lookup=drafted.lookup, datastore=drafted.datastore)
    return True, replace(made, draft=rest, gamma=made.gamma - 1)


@dataclass
class SessionRun:
    session_id: str
    request: Generate
    client: bytes
    replies: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=8))
    wire_bytes: int = 0  # frames this session sent to and received from the broker
    task: asyncio.Task | None = None


class DrafterService:
    def __init__(self, config: Config, name: str, strategy: DraftStrategy, ctx: zmq.asyncio.Context):
        self.config = config
        self.name = name
        self.cfg: DrafterConfig = config.drafter(name)
        self.strategy = strategy
        self.ctx = ctx
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="draft")  # the device's one model
        self.sessions: dict[str, SessionRun] = {}
        self.by_request: dict[tuple[bytes, str], SessionRun] = {}
        self.stats = DrafterFigures()
        self.row_floor = RowCostFloor()  # the server's cheapest row cost seen: one per drafter (workers/speculation.py)
        # the adaptive figures of lookup drafts, per repeat length (workers/lookup.py): one per drafter,
        # shared by its sessions, since how often a repeat is right is the target's habit, not the
        # session's; a session is too short to learn them alone (a 32-token chat has ~25 rounds)
        self.lookup_policies: dict[int, SpeculationPolicy] = {}
        # the policy of the drafter's last finished session, per tree size: the next session starts
        # from its readings (SpeculationPolicy.fork), the device and the target being the same
        self.session_priors: dict[int, SpeculationPolicy] = {}
        self.drafts_waiting = 0  # drafts submitted to the model thread and not back yet
        self.proactive = int(self.cfg.proactive and strategy.supports_proactive)
        if self.cfg.proactive and not self.proactive:
            log.info("proactive_unsupported", drafter=name, kind=strategy.kind,
                     reason="this kind cannot draft past a proposal; drafts after each verdict instead")
        max_bytes = config.limits.max_message_bytes
        # one identity for the process's life: the broker binds sessions to it, across reconnects
        self.broker = BrokerLink(ctx, self.cfg.broker or config.broker.frontend, new_identity(name),
                                 max_message_bytes=max_bytes, curve=client_keys(config, self.cfg.key or name))
        self.broker.connect()
        # local by design: plain on loopback or ipc; elsewhere CURVE admitting admin and client keys only
        client_curve = drafter_client_curve(config, name)
        self.auth, self.allow = start_authenticator(ctx, config, (CLIENT,)) if client_curve else (None, None)
        self.clients = make_socket(ctx, zmq.ROUTER, bind=self.cfg.client, max_message_bytes=max_bytes, curve=client_curve)
        self.watch = HandshakeWatch(self.clients, CLIENT, self.allow) if client_curve else None

    async def run(self, stop: asyncio.Event) -> None:
        log.info("drafter_started", drafter=self.name, kind=self.strategy.kind, client=self.cfg.client, gamma=self.cfg.gamma,
                 adaptive=self.cfg.adaptive, proactive=bool(self.proactive))
        try:
            await supervise(stop, self._client_loop(), self._upstream_loop(), self._heartbeat_loop(),
                            *([self.watch.run()] if self.watch else []))
        finally:
            if self.watch:
                self.watch.close()
            if self.auth:
                self.auth.stop()
            await cancel_and_wait([run.task for run in self.sessions.values()])
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.broker.close()
            self.clients.close(0)

    # --- clients -------------------------------------------------------------------------

    def _to_client(self, client: bytes, msg) -> None:
        send_now(self.clients, client, msg.encode())

    async def _client_loop(self) -> None:
        while True:
            parts = await self.clients.recv_multipart()
            client, frame = parts[0], parts[-1]
            try:
                msg = DRAFTER_CLIENT_ACCEPTS.decode(frame, self.config.limits.max_message_bytes)
            except SledError as exc:
                self.stats.rejected_frames += 1
                self._to_client(client, ErrorReply.of(exc))
                continue
            match msg:
                case Generate():
                    self._start(client, msg)
                case Cancel():
                    run = self.by_request.get((client, msg.request_id))
                    if run and run.task:
                        run.task.cancel()
                case StatsRequest():
                    self._to_client(client, StatsReply(drafter=self.snapshot()))

    def _start(self, client: bytes, req: Generate) -> None:
        problem = generate_problem(req, self.config.limits)
        if problem:
            return self._to_client(client, ErrorReply(ErrorCode.INVALID, problem, request_id=req.request_id))
        if (client, req.request_id) in self.by_request:
            return self._to_client(client, ErrorReply(ErrorCode.INVALID, "request_id already running", request_id=req.request_id))
        if len(self.sessions) >= self.cfg.max_sessions:
            return self._to_client(
                client, ErrorReply(ErrorCode.OVERLOADED, "drafter at its session limit", True, request_id=req.request_id)
            )
        run = SessionRun(f"{self.name}-{uuid.uuid4().hex[:12]}", req, client)
        self.sessions[run.session_id] = run
        self.by_request[(client, req.request_id)] = run
        run.task = asyncio.create_task(self._run_session(run), name=run.session_id)

    # --- upstream: the broker ------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        """Paranoid Pirate, client side: heartbeat the broker; when it falls silent, make a new
        socket (same identity) and have every session resend at once with its history."""
        interval = self.config.broker.heartbeat_ms / 1000
        while True:
            await asyncio.sleep(interval)
            if self.broker.silent_for() > interval * self.config.broker.liveness:
                log.warning("broker_silent", seconds=round(self.broker.silent_for(), 2))
                self.stats.reconnects += 1
                self.broker.connect()
                for run in self.sessions.values():
                    with contextlib.suppress(asyncio.QueueFull):
                        run.replies.put_nowait(RECONNECTED)
            self.broker.send(Heartbeat().encode())

    async def _upstream_loop(self) -> None:
        while True:
            frame = await self.broker.recv()
            try:
                msg = DRAFTER_UPSTREAM_ACCEPTS.decode(frame, self.config.limits.max_message_bytes)
            except SledError as exc:
                self.stats.rejected_frames += 1
                log.warning("frame_rejected", code=exc.code, reason=exc.detail)
                continue
            if isinstance(msg, Heartbeat):
                continue
            self.stats.bytes_received += len(frame)
            run = self.sessions.get(msg.session_id)
            if run is not None:
                run.wire_bytes += len(frame)
            if run is None:
                self.stats.stale_replies += 1
                if isinstance(msg, ErrorReply) and not msg.session_id:
                    log.warning("broker_error", code=msg.code, reason=msg.detail)
                continue
            try:
                run.replies.put_nowait(msg)
            except asyncio.QueueFull:
                self.stats.stale_replies += 1

    async def _exchange(self, run: SessionRun, proposal: Propose, committed: list[int]) -> Verdict:
        """Send a proposal until a verdict for it comes back; resend the history when the
        verifier lost the session, back off when the server is overloaded."""
        backoff = 0.02
        timeout = self.config.limits.verdict_timeout_s
        while True:
            frame = proposal.encode()
            self.stats.bytes_sent += len(frame)
            run.wire_bytes += len(frame)
            self.broker.send(frame)
            try:
                reply = await self._reply_for(run, proposal.round, timeout)
            except TimeoutError:
                self.stats.timeouts += 1
                proposal = msgspec.structs.replace(proposal, history=list(committed))
                continue
            if reply is RECONNECTED:
                proposal = msgspec.structs.replace(proposal, history=list(committed))
                continue
            if isinstance(reply, Verdict):
                return reply
            if reply.code == ErrorCode.OVERLOADED and proposal.round == 0:
                # admission refused: tell the client now (gateway: 429) rather than queue new work
                raise SledError(reply.code, reply.detail, retriable=True)
            if reply.code in ErrorCode.RESYNC or reply.code == ErrorCode.VERIFIER_LOST:
                self.stats.resyncs += 1
                proposal = msgspec.structs.replace(proposal, history=list(committed))
            if reply.code in ErrorCode.RESYNC:
                continue
            if not reply.retriable:
                raise SledError(reply.code, reply.detail, retriable=False)
            self.stats.retries += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _followed(self, run: SessionRun, proposal: Propose, committed: list[int]) -> Verdict:
        """The verdict of a plain round the broker runs on its own (Propose.plain_after), or of a
        proposal sent ahead that its predecessor's verdict confirmed (the broker queued it). When it
        does not come (the broker failed it with its verifier, a reconnect, a timeout), the drafter
        proposes that round itself, like any other (_exchange)."""
        try:
            reply = await self._reply_for(run, proposal.round, self.config.limits.verdict_timeout_s)
        except TimeoutError:
            self.stats.timeouts += 1
            reply = None
        if isinstance(reply, Verdict):
            return reply
        proposal = proposal.unconditional()  # one sent ahead and lost: its predecessor's verdict is in
        if reply is None or reply is RECONNECTED or reply.code in ErrorCode.RESYNC or reply.code == ErrorCode.VERIFIER_LOST:
            proposal = msgspec.structs.replace(proposal, history=list(committed))
        return await self._exchange(run, proposal, committed)

    async def _reply_for(self, run: SessionRun, round_: int, timeout: float):
        async with asyncio.timeout(timeout):
            while True:
                reply = await run.replies.get()
                if reply is RECONNECTED or reply.round == round_:
                    return reply
                self.stats.stale_replies += 1  # a verdict of an earlier, already retried round

    async def _verdict_sending_ahead(self, run: SessionRun, waiting, ahead: asyncio.Task | None,
                                     present) -> tuple[Verdict, tuple | None]:
        """Await ``waiting`` (a round's verdict). Meanwhile, when the draft made ahead (``ahead``)
        is done before the verdict, send the next round's proposal at once, ahead of the verdict it
        assumes (``present(made)`` builds it, or None): the broker queues it the moment that
        verdict confirms it. Returns the verdict, and (proposal, made) when one was sent."""
        if ahead is None:
            return await waiting, None
        task = asyncio.ensure_future(waiting)
        sent = None
        try:
            await asyncio.wait({task, ahead}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done() and not ahead.cancelled() and ahead.exception() is None:
                made = ahead.result()
                delay = made.done_at - time.perf_counter()  # an emulated device is still drafting
                if delay > 0:
                    await asyncio.wait({task}, timeout=delay)
                if not task.done() and (proposal := present(made)) is not None:
                    self._send_ahead(run, proposal)
                    sent = (proposal, made)
            return await task, sent
        except BaseException:
            task.cancel()
            raise

    def _send_ahead(self, run: SessionRun, proposal: Propose) -> None:
        frame = proposal.encode()
        self.stats.bytes_sent += len(frame)
        run.wire_bytes += len(frame)
        self.stats.sent_ahead += 1
        self.broker.send(frame)

    def _plain_ahead(self, run: SessionRun, last: Propose, budget: int) -> Propose:
        """Sent while a burst's last plain round (``last``) is out, when the policy would draft
        nothing again: the next round, asking for another burst, on no condition but that round's
        verdict. Without it the session left the batches for a link round trip at every burst's
        end (docs/benchmarks-history.md, session 22)."""
        proposal = msgspec.structs.replace(
            last.plain_next(0, max(0, min(self.cfg.burst, MAX_PLAIN_AFTER, budget - 2))), if_accepted=0)
        self._send_ahead(run, proposal)
        return proposal

    def _timed_propose(self, state, committed: list[int], gamma: int, sampling: Sampling, keep: int | None = None,
                       abort: threading.Event | None = None, generator: torch.Generator | None = None,
                       tree: bool = False):
        """Draft up to ``gamma`` tokens after ``committed`` (in the worker thread). ``keep``: first
        cut the strategy's cache back to that many tokens (a draft made ahead of its verdict, or
        the rest of one). ``abort``: stop between tokens once it is set or another session's draft
        waits for the model. ``generator``: continue that stream (the rest of a cut draft). ``tree``:
        the strategy's token tree instead of a chain."""
        started = time.thread_time()  # CPU time of this thread: robust when the host's cores are shared
        if keep is not None:
            self.strategy.rewind(state, keep)
        interrupt = None
        if abort is not None:
            interrupt = lambda: self.drafts_waiting > 0 or abort.is_set()  # noqa: E731 - read in the thread
        if generator is None:
            generator = round_generator(sampling.seed, len(committed))
        as_tree = {"tree": True} if tree else {}  # only a drafter of token trees takes it
        draft = self.strategy.propose(state, committed, gamma, sampling, generator, interrupt=interrupt, **as_tree)
        if not draft.compute_s:
            draft.compute_s = time.thread_time() - started
        return draft

    async def _draft(self, state, committed: list[int], gamma: int, sampling: Sampling, keep: int | None = None,
                     generator: torch.Generator | None = None, tree: bool = False):
        """Draft in the worker thread. With ``emulate_slowdown`` (benchmarks), hold the draft until
        the emulated device would have finished it: its compute time times the slowdown. The wait
        is an asyncio sleep, so sessions (each one emulated device) wait in parallel."""
        started = time.perf_counter()
        self.drafts_waiting += 1
        try:
            draft = await asyncio.get_running_loop().run_in_executor(
                self.executor, self._timed_propose, state, committed, gamma, sampling, keep, None, generator, tree
            )
        finally:
            self.drafts_waiting -= 1
        slowdown = self.cfg.emulate_slowdown
        if slowdown > 0:
            draft.device_s = draft.compute_s * slowdown
            await asyncio.sleep(max(0.0, draft.device_s - (time.perf_counter() - started)))
        else:
            draft.device_s = time.perf_counter() - started
        self.stats.draft_s += draft.device_s
        return draft

    async def _draft_ahead(self, state, keep: int, assumed: list[int], gamma: int, sampling: Sampling,
                           abort: threading.Event) -> Ahead:
        """Proactive drafting: the next round's draft (one more token: its guess), made while the
        current proposal is out, from the context the proposal assumes. It shares the device's
        one model thread, and stops between tokens whenever another session's draft waits for it
        or the verdict has refuted the assumption: a draft needed now always goes first, and a
        confirmed draft that was cut short is completed later (_finish_ahead)."""
        started = time.perf_counter()
        generator = round_generator(sampling.seed, len(assumed))
        draft = await asyncio.get_running_loop().run_in_executor(
            self.executor, self._timed_propose, state, assumed, gamma + 1, sampling, keep, abort, generator
        )
        slowdown = self.cfg.emulate_slowdown
        device_s = draft.compute_s * slowdown if slowdown > 0 else time.perf_counter() - started
        self.stats.draft_s += device_s
        return Ahead(draft, gamma, started + device_s, device_s, generator)

    async def _finish_ahead(self, state, committed: list[int], ready: Ahead, sampling: Sampling) -> Draft:
        """A confirmed draft made ahead, completed when it was cut short (another session needed
        the model): the rest continues the same random stream, so it is the draft an uncut run
        would have made."""
        await asyncio.sleep(max(0.0, ready.done_at - time.perf_counter()))  # an emulated device's drafting time
        made = ready.draft
        rest = ready.gamma + 1 - len(made.tokens)
        if not made.cut or rest <= 0:
            return made
        more = await self._draft(state, [*committed, *made.tokens], rest, sampling, len(committed) + len(made.tokens),
                                 ready.generator)
        return Draft(made.tokens + more.tokens, made.q_ids + more.q_ids, made.q_probs + more.q_probs,
                     made.compute_s + more.compute_s, more.cut)

    def _length(self, policy: SpeculationPolicy | None, budget: int) -> int:
        """The next draft's length: a verdict always adds one token of its own, so at most budget - 1."""
        if policy is None:
            return max(0, min(self.cfg.gamma, budget - 1))
        k = policy.choose(cap=budget - 1)
        # why a session drafts what it drafts (or nothing: a burst follows), at debug level
        log.debug("draft_length", k=k, tree=policy.tree, alphas=[round(a, 2) for a in policy.alphas],
                  row_ms=round(policy.row_cost, 2), fixed_ms=round(policy.fixed_cost, 2),
                  absent=[round(policy.absence.of(j), 2) for j in range(1, policy.gamma + 1)],
                  draft_ms=None if policy.draft_ms is None else round(policy.draft_ms, 1),
                  wait_ms=None if policy.wait_ms is None else round(policy.wait_ms, 1),
                  tree_tokens=round(policy.tree_tokens, 2))
        return k

    async def _run_session(self, run: SessionRun) -> None:
        req = run.request
        loop = asyncio.get_running_loop()
        sampling = Sampling(req.temperature, req.top_p, req.seed)
        state = self.strategy.new_state()
        committed = list(req.prompt)
        stops = set(req.stop_ids)
        # one acceptance estimate per way of drafting, chosen from the context each round: the
        # model's, this session's own, and with context lookup in front of it each repeat length's,
        # the drafter's (workers/lookup.py)
        # a drafter of token trees may draft one in a greedy session; the policy weighs the tree's
        # rows and tokens against the chain's each round (workers/speculation.py)
        tree_rows = self.strategy.tree_rows if sampling.greedy else 0
        own = None
        if self.cfg.adaptive:
            prior = self.session_priors.get(tree_rows)
            own = prior.fork() if prior is not None else self._new_policy(tree_rows)

        def policy_for(tokens: list[int]) -> SpeculationPolicy | None:
            key = self.strategy.match(tokens) if own is not None else 0
            if key == 0:
                return own
            key = (key, tree_rows)
            if key not in self.lookup_policies:
                self.lookup_policies[key] = self._new_policy(tree_rows)
            return self.lookup_policies[key]

        # per session: rounds with a rejected draft token and rounds per draft length, from which
        # the per-position acceptance probability and the expected tokens per round follow
        figures = {"rounds": 0, "proposed": 0, "accepted": 0, "rejected_rounds": 0,
                   "draft_lengths": [0] * (self.cfg.gamma + 1), "gamma_sum": 0,
                   "proactive_hits": 0, "proactive_wasted": 0, "proactive_wasted_s": 0.0, "lookup_rounds": 0,
                   "datastore_rounds": 0, "tree_rounds": 0, "plain_rounds": 0, "sent_ahead_confirmed": 0}
        feature_layers = list(self.strategy.feature_layers)
        generated, round_, finish = 0, 0, "length"
        plain_left = 0  # plain rounds the broker still runs for this session on its own (Propose.plain_after)
        ready: Ahead | None = None  # the next round's draft, made ahead and confirmed by the verdict
        ahead: asyncio.Task | None = None
        # this round's proposal, sent ahead of the last verdict, which confirmed it: the broker queued it
        presented: Propose | None = None
        last_seq = 0  # the batch number of the last verdict (Verdict.batch_seq)
        self.stats.requests += 1
        self.stats.active += 1
        log.debug("session_opened", session_id=run.session_id, prompt_tokens=len(committed))
        try:
            while generated < req.max_new_tokens:
                budget = req.max_new_tokens - generated
                policy = policy_for(committed)
                if presented is not None:  # already out: the broker queued it at the last verdict
                    burst, gamma, tree, early = presented.plain_after, len(presented.draft), False, False
                    drafted = Draft([])
                    if ready is not None:  # complete (only such a draft is sent ahead): returns at once
                        drafted = await self._finish_ahead(state, committed, ready, sampling)
                        ready = None
                else:
                    gamma = 0 if plain_left else self._length(policy, budget)
                    tree = (not plain_left and bool(tree_rows) and budget > 1
                            and (policy.tree if policy is not None else True))
                    if tree:  # the whole tree, γ levels deep (its last level may pass the request's end: cut below)
                        gamma = self.cfg.gamma
                    # a device that drafts ahead sends its first proposal at once, with no draft: the
                    # server prefills the prompt while the device reads it too and drafts the next round
                    # ahead (below), so its prompt's drafting time leaves the time to the first token.
                    # Greedy only: a sampled session's output for a seed stays the same whether its
                    # device drafts ahead or not (a draft made ahead is the very draft its round would
                    # have made after the verdict), which a first round without a draft would change.
                    # Only when the policy would draft: a session it would not draft for starts with a
                    # burst (below), so that it is in the batches from its first verdict on, not out of
                    # them for a link round trip after its prefill (docs/benchmarks-history.md, session 24)
                    early = (round_ == 0 and ready is None and bool(self.proactive) and budget > 1 and sampling.greedy
                             and not plain_left and gamma > 0)
                    # the policy drafts nothing: the server decodes this round and the next ``burst`` ones
                    # by itself, as a centralized server would, and the device proposes again after them
                    # (drafters.NAME.burst). A draft is worth its rows again once the load falls or the
                    # acceptance estimates drift back up, which the policy reads again after the burst.
                    burst = 0
                    if (policy is not None and gamma == 0 and not tree and not early and ready is None
                            and not plain_left):
                        burst = max(0, min(self.cfg.burst, MAX_PLAIN_AFTER, budget - 1))
                    if early:
                        drafted, gamma = Draft([]), 0
                    elif plain_left or burst:
                        drafted = Draft([])
                    elif ready is not None:  # the proposal leaves at once
                        drafted = await self._finish_ahead(state, committed, ready, sampling)
                        gamma, ready = min(gamma, ready.gamma), None  # a draft made ahead is never lengthened
                    else:
                        # one token more when a next round may follow and would draft: the guess of the
                        # target's token (a device that will not draft next round has no use for it)
                        guess_too = (self.proactive and budget - gamma - 1 >= 2
                                     and self._length(policy, budget - gamma - 1) > 0)
                        drafted = await self._draft(state, committed, gamma + guess_too, sampling, tree=tree)
                        # a chain's time per token
                        if policy is not None and gamma + guess_too > 0 and not drafted.parents:
                            policy.observe_draft(len(drafted.tokens), drafted.device_s)
                draft, guess = split_draft(drafted, gamma)
                length = draft.depth
                proposal = presented or Propose(
                    run.session_id, round_, len(committed), draft.tokens, draft.q_ids, draft.q_probs,
                    list(committed) if round_ == 0 else None, req.temperature, req.top_p, req.seed, self.strategy.kind,
                    feature_layers, draft.parents,
                    # a plain round's own proposal leaves only when its verdict did not come
                    # (_followed): it then asks for the rest of the burst
                    plain_left - 1 if plain_left else burst, stop_ids=req.stop_ids,
                )
                # the next round's draft, made while this proposal is out (proactive). ``guessing``:
                # its first token guesses this round's verdict (a round without a draft: the first
                # one, or a burst's last), which confirms it or not (_first_ahead)
                assumed = [*committed, *draft.tokens] if guess is not None else []
                guessing = False
                sent_ahead = None  # the next round's proposal, sent before this round's verdict
                last_plain = plain_left == 1 and presented is None  # a burst's last round is out
                if early or (last_plain and budget > 1):
                    next_policy = policy_for(committed)
                    next_gamma = self._length(next_policy, budget - 1)
                    if last_plain and next_gamma == 0 and not (tree_rows and next_policy.tree):
                        # the burst goes on: its next round is queued the moment this one's verdict
                        # is out, so the session keeps its place in the batches
                        sent_ahead = (self._plain_ahead(run, proposal, budget), None)
                    elif next_gamma > 0 and self.proactive and sampling.greedy and (early or budget > 2):
                        abort, guessing = threading.Event(), True
                        ahead = asyncio.create_task(self._draft_ahead(state, None, committed, next_gamma + 1,
                                                                      sampling, abort))
                elif assumed and not stops.intersection([*draft.tokens, guess]):
                    assumed.append(guess)
                    next_gamma = self._length(policy_for(assumed), budget - len(draft.tokens) - 1)
                    if next_gamma > 0:
                        abort = threading.Event()
                        ahead = asyncio.create_task(self._draft_ahead(state, len(committed) + len(draft.tokens),
                                                                      assumed, next_gamma, sampling, abort))

                def present(made: Ahead) -> Propose | None:
                    """The next round's proposal from the draft made ahead, unless it was cut short:
                    sent before this round's verdict, on the condition that the verdict is as assumed."""
                    first = int(guessing)  # a guessed verdict token leads the draft
                    tokens = made.draft.tokens
                    n = min(made.gamma, len(tokens)) - first  # an unconfident draft stops early
                    if made.draft.cut or n < 1 or (guessing and tokens[0] in stops):
                        return None
                    return Propose(run.session_id, round_ + 1, len(committed) + len(draft.tokens) + 1,
                                   tokens[first : first + n], made.draft.q_ids[first : first + n],
                                   made.draft.q_probs[first : first + n], None, req.temperature, req.top_p, req.seed,
                                   self.strategy.kind, feature_layers, if_accepted=len(draft.tokens),
                                   if_token=tokens[0] if guessing else guess, stop_ids=req.stop_ids)

                sent = time.perf_counter()
                plain = bool(plain_left) and presented is None  # a round the broker ran on its own
                followed = plain or presented is not None  # queued by the broker: no link round trip
                if followed:
                    waiting = self._followed(run, proposal, committed)
                else:
                    waiting = self._exchange(run, proposal, committed)
                verdict, sent_by_race = await self._verdict_sending_ahead(run, waiting, ahead, present)
                sent_ahead = sent_ahead or sent_by_race
                plain_left = burst if presented is not None or not plain_left else plain_left - 1
                presented = None
                if sent_ahead is not None and sent_ahead[0].holds_after(verdict.round, verdict.accepted, verdict.token):
                    presented = sent_ahead[0]  # the broker queued it at this verdict
                    self.stats.sent_ahead_confirmed += 1
                    figures["sent_ahead_confirmed"] += 1
                waited = time.perf_counter() - sent
                if ahead is not None:
                    confirmed = verdict.accepted == len(draft.tokens) and verdict.token == guess
                    if not confirmed and not guessing:
                        abort.set()  # stop drafting on a context that is now known to be wrong
                    async with asyncio.timeout(self.config.limits.verdict_timeout_s):  # a bounded draft; never hang here
                        made = await ahead
                    ahead = None
                    if guessing:
                        confirmed, made = _first_ahead(made, verdict.token)
                    if confirmed:
                        ready = made  # the strategy's state is already the next round's
                        figures["proactive_hits"] += 1
                        self.stats.proactive_hits += 1
                    else:
                        wasted = len(made.draft.tokens)
                        figures["proactive_wasted"] += wasted
                        figures["proactive_wasted_s"] += made.device_s
                        self.stats.proactive_misses += 1
                        self.stats.proactive_wasted += wasted
                        self.stats.proactive_wasted_s += made.device_s
                        await loop.run_in_executor(self.executor, self.strategy.rewind, state,
                                                   len(committed) + verdict.accepted)
                    if verdict.features:  # the target's features stand whichever draft followed them
                        await loop.run_in_executor(self.executor, self.strategy.take_features, state, verdict)
                else:
                    await loop.run_in_executor(self.executor, settle, self.strategy, state, len(committed), verdict)
                if policy is not None:
                    policy.observe(length, verdict.accepted, verdict.row_cost_ms, time.monotonic(),
                                   verdict.round_cost_ms, tree=bool(draft.parents),
                                   wanted=0 if draft.parents or drafted.cut else gamma)
                    if round_ > 0 and not followed:  # the first round's wait is the prompt's prefill; a
                        # followed round never crossed the link
                        policy.observe_wait(len(draft.tokens), waited)
                    # the batches that left without the session while this round was drafted and
                    # sent (a tree is drafted γ levels deep; an empty chain still cost one token)
                    seq = verdict.batch_seq
                    policy.absence.observe(self.cfg.gamma if draft.parents else max(length, int(gamma > 0)),
                                           seq - last_seq - 1 if 0 < last_seq < seq else None)
                last_seq = verdict.batch_seq
                new = [*verdict.accepted_tokens(draft.tokens), verdict.token][:budget]
                for i, token in enumerate(new):
                    if token in stops:
                        new, finish = new[: i + 1], "stop"
                        break
                committed += new
                generated += len(new)
                round_ += 1
                figures["rounds"] += 1
                figures["proposed"] += len(draft.tokens)
                figures["accepted"] += verdict.accepted
                figures["rejected_rounds"] += verdict.accepted < length  # a tree's: short of its depth
                figures["draft_lengths"][min(length, self.cfg.gamma)] += 1
                figures["gamma_sum"] += gamma
                figures["lookup_rounds"] += draft.lookup
                figures["datastore_rounds"] += draft.datastore
                figures["tree_rounds"] += bool(draft.parents)
                figures["plain_rounds"] += plain
                self.stats.plain_rounds += plain
                self.stats.rounds += 1
                self.stats.proposed += len(draft.tokens)
                self.stats.accepted += verdict.accepted
                self.stats.gamma_sum += gamma
                self.stats.generated += len(new)
                self._to_client(run.client, Tokens(req.request_id, new))
                if finish == "stop":
                    break
            if own is not None and figures["rounds"] > 1:
                self.session_priors[tree_rows] = own
            figures.update(wire_bytes=run.wire_bytes, generated=generated, drafter=self.name, drafter_kind=self.strategy.kind,
                           session_id=run.session_id, drafted=figures["proposed"],
                           mean_gamma=figures["gamma_sum"] / figures["rounds"] if figures["rounds"] else 0.0)
            self._to_client(run.client, Tokens(req.request_id, [], True, finish, figures))
        except SledError as exc:
            self.stats.failed += 1
            log.warning("session_failed", session_id=run.session_id, code=exc.code, reason=exc.detail)
            self._to_client(run.client, ErrorReply.of(exc, request_id=req.request_id))
        except asyncio.CancelledError:
            log.info("session_cancelled", session_id=run.session_id)
        except Exception as exc:  # a bug must fail this session only, visibly
            self.stats.failed += 1
            log.exception("session_crashed", session_id=run.session_id)
            self._to_client(run.client, ErrorReply(ErrorCode.INTERNAL, repr(exc), request_id=req.request_id))
        finally:
            if ahead is not None:
                ahead.cancel()  # the thread finishes its draft on its own; nobody reads the state again
            self.stats.active -= 1
            self.broker.send(CloseSession(run.session_id).encode())  # free the verifier's cache
            self.sessions.pop(run.session_id, None)
            self.by_request.pop((run.client, req.request_id), None)

    def _new_policy(self, tree_rows: int) -> SpeculationPolicy:
        """A policy with no readings yet (the hopeful prior), sharing the drafter's row-cost floor."""
        return SpeculationPolicy(self.cfg.gamma, floor=self.row_floor, tree_rows=tree_rows)

    def snapshot(self) -> DrafterFigures:
        return self.stats.reply(drafter=self.name, kind=self.strategy.kind, gamma=self.cfg.gamma,
                                refused=dict(self.allow.refused) if self.allow else {})


async def serve(config: Config, stop: asyncio.Event, name: str) -> None:
    cfg = config.drafter(name)
    drafter_client_curve(config, name, warn=False)  # refuse an unauthenticated client socket before loading a model
    torch.set_num_threads(max(1, cfg.threads))
    structlog.contextvars.bind_contextvars(drafter=name)
    strategy = await asyncio.get_running_loop().run_in_executor(None, build_drafter, cfg, config.verifier.target)
    ctx = zmq.asyncio.Context()
    try:
        await DrafterService(config, name, strategy, ctx).run(stop)
    finally:
        with contextlib.suppress(Exception):
            ctx.term()
