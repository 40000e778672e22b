"""Every message that crosses a socket in SLED, declared once as a msgspec Struct.

A frame is ``[PROTOCOL_VERSION, [kind, field1, ...]]`` in MessagePack: a tagged, array-like Struct
(arrays, not maps: edge links are slow). New fields are only appended, with defaults, so an older
peer's shorter message still decodes. Each receiving socket role has one :class:`Inbox`, whose
Decoder checks size, version, kind and every field in C; a bad frame raises SledError."""

import contextlib
from typing import Union

import msgspec

from pipeline.errors import ErrorCode, SledError
from pipeline.figures import BrokerSnapshot, DrafterFigures, VerifierFigures

PROTOCOL_VERSION = 3  # 2: msgspec Structs, the message nested in [version, message]; 3: a typed StatsReply
_ENCODER = msgspec.msgpack.Encoder()


class Message(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True, gc=False, tag=True):
    """Base of every wire message; each subclass names its kind with ``tag=``."""

    def encode(self) -> bytes:
        return _ENCODER.encode((PROTOCOL_VERSION, self))


class Sampling(msgspec.Struct, frozen=True):
    """temperature 0 means greedy. Sent with a session's opening proposal and kept by the verifier."""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


class Propose(Message, tag="propose"):
    """``position``: tokens committed so far. ``history``: all of them when the verifier must
    (re)build the session, else None. ``q_ids``/``q_probs``: per draft token, the drafter's top-k
    distribution (sampling only). ``feature_layers``: hidden states a feature drafter asks for.
    ``parents``: a token tree instead of a chain (greedy only): draft token i continues draft
    token ``parents[i]`` (< i), or the last committed token when -1; empty: a chain.
    ``plain_after``: after this round, the broker queues that many more rounds of the session by
    itself, each with no draft (the target decoding alone, one token a round), and sends each
    verdict as it comes; the drafter proposes again after the last. A drafter whose policy drafts
    nothing asks for them, so that the session stays in the verifier's batches instead of paying a
    link round trip and a place in a later batch for every token (workers/speculation.py).
    ``if_accepted`` >= 0: a proposal sent *ahead*, while the session's round ``round - 1`` is
    still out. It holds only if that round's verdict accepts ``if_accepted`` draft tokens and then
    gives ``if_token`` (-1: any token). The broker keeps it until that verdict, queues it at once
    if it holds (the session keeps its place in the next batch, as in centralized decoding) and
    drops it if not: the drafter reads the same verdict and proposes anew.
    ``stop_ids``: the request's stop tokens. A verdict whose token is one of them ends the session,
    so the broker queues no plain round after it and drops a proposal held for it: the drafter
    closes the session instead of having the target decode past its end."""
    session_id: str
    round: int
    position: int
    draft: list[int]
    q_ids: list[list[int]] = []
    q_probs: list[list[float]] = []
    history: list[int] | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    drafter_kind: str = ""
    feature_layers: list[int] = []
    parents: list[int] = []
    plain_after: int = 0
    if_accepted: int = -1
    if_token: int = -1
    stop_ids: list[int] = []

    @property
    def ahead(self) -> bool:
        """Sent ahead of its predecessor's verdict, on a condition (``if_accepted``)."""
        return self.if_accepted >= 0

    def holds_after(self, round_: int, accepted: int, token: int) -> bool:
        """Whether a verdict (its round, accepted drafts and token) confirms what this proposal,
        sent ahead, was drafted on: the verdict of the round before it, as assumed."""
        return (round_ == self.round - 1 and accepted == self.if_accepted and self.if_token in (-1, token)
                and token not in self.stop_ids)

    def unconditional(self) -> "Propose":
        return msgspec.structs.replace(self, if_accepted=-1, if_token=-1)

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.seed)

    def ends(self, verdict: "Verdict") -> bool:
        """Whether this proposal's verdict ended its session (a stop token)."""
        return verdict.token in self.stop_ids

    def follow(self, verdict: "Verdict") -> "Propose":
        """The next of the plain rounds this proposal asked for (``plain_after``), given its verdict."""
        return self.plain_next(verdict.accepted, self.plain_after - 1)

    def plain_next(self, accepted: int, plain_after: int) -> "Propose":
        """The session's next round with no draft, after this one commits ``accepted`` draft
        tokens and the target's own, asking for ``plain_after`` more such rounds."""
        return Propose(self.session_id, self.round + 1, self.position + accepted + 1, [],
                       temperature=self.temperature, top_p=self.top_p, seed=self.seed, drafter_kind=self.drafter_kind,
                       feature_layers=self.feature_layers, plain_after=plain_after, stop_ids=self.stop_ids)

    @property
    def target_tokens(self) -> int:
        """Rows this proposal costs in the verify forward: the last committed token + the draft
        (every node of a tree is a row)."""
        return 1 + len(self.draft)

    @property
    def batch_tokens(self) -> int:
        """What this proposal puts through the target in its batch: its verify rows and, when it
        (re)opens its session, its history's prefill. The broker's batch budget counts these, so a
        wave of new sessions is spread over several batches: the first ones get their first token
        after their own prefill, not after everyone's, and the running sessions that share a
        batch with them wait for at most a budget's prefill."""
        return self.target_tokens + (len(self.history) - 1 if self.history else 0)


class Verdict(Message, tag="verdict"):
    """``accepted`` draft tokens, then ``token``. ``error``: this item failed (-> ErrorReply).
    ``features``: fp16 hidden states [rows, layers x hidden] from position features_start on.
    ``row_cost_ms``: the broker's estimate of what one more verify row costs the server now (its
    marginal cost at the current batch); ``round_cost_ms``: what a session's round costs it
    whatever its rows (its share of the forward's fixed cost); a drafter weighs its next draft
    length against the two (brokers/estimator.py, workers/speculation.py). 0.0: unknown.
    ``path``: for a tree proposal, the accepted draft tokens' indices, root to leaf
    (``accepted`` of them); empty for a chain, whose accepted tokens are its first ones.
    ``batch_seq``: the number of this verdict's batch among its verifier's batches (1, 2, ...; 0:
    unknown): two verdicts of a session tell it how many batches ran without it in between, which
    prices its drafting time (workers/speculation.py)."""
    session_id: str
    round: int
    accepted: int
    token: int
    error: str = ""
    detail: str = ""
    features: bytes = b""
    features_start: int = 0
    row_cost_ms: float = 0.0
    round_cost_ms: float = 0.0
    path: list[int] = []
    batch_seq: int = 0

    def accepted_tokens(self, draft: list[int]) -> list[int]:
        """The draft tokens this verdict accepted, in order (chain or tree)."""
        return [draft[i] for i in self.path] if self.path else draft[: self.accepted]

class CloseSession(Message, tag="close"):
    session_id: str

class ErrorReply(Message, tag="error"):  # a SledError on the wire
    code: str
    detail: str
    retriable: bool = False
    session_id: str = ""
    round: int = -1
    request_id: str = ""

    @classmethod
    def of(cls, exc: SledError, **ids) -> "ErrorReply":
        return cls(exc.code, exc.detail, exc.retriable, **ids)

    def error(self) -> SledError:
        return SledError(self.code, self.detail, self.retriable)

class StatsRequest(Message, tag="stats_req"):
    pass

class StatsReply(Message, tag="stats"):  # one of the two, typed (pipeline/figures.py)
    broker: BrokerSnapshot | None = None
    drafter: DrafterFigures | None = None

    @property
    def stats(self) -> dict:
        """The figures as plain data, for tools and tests that read them by name."""
        return msgspec.to_builtins(self.broker or self.drafter)

class Ready(Message, tag="ready"):  # verifier -> broker: idle, send the next batch
    stats: VerifierFigures | None = None

class Heartbeat(Message, tag="heartbeat"):
    """Broker <-> verifiers and drafters. ``idle``: a restarted broker learns a verifier waits."""
    idle: bool = False
    stats: VerifierFigures | None = None

class Dying(Message, tag="dying"):  # verifier -> broker as a fatal error ends it (vLLM's "dead")
    reason: str = ""

class VerifyBatch(Message, tag="batch"):
    batch_id: int
    items: list[Propose]

class BatchVerdicts(Message, tag="verdicts"):
    """``compute_ms``: the batch's wall time in the verifier. ``cost_ms``: what it cost the
    server's compute, which the broker prices rows with (brokers/estimator.py): the forward's CPU
    time on a CPU (time spent waiting for a core shared with other processes is not the forward's
    cost), its wall time on a GPU; 0.0: not measured (the broker prices from round trips)."""
    batch_id: int
    verdicts: list[Verdict]
    compute_ms: float = 0.0
    cost_ms: float = 0.0

class Generate(Message, tag="generate"):  # client -> drafter (the device's local API)
    request_id: str
    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: list[int] = []

class Cancel(Message, tag="cancel"):
    request_id: str

class Tokens(Message, tag="tokens"):  # drafter -> client; the last has ``done`` and the figures
    request_id: str
    tokens: list[int]
    done: bool = False
    finish_reason: str = ""
    stats: dict = {}


MESSAGES: dict[str, type[Message]] = {cls.__struct_config__.tag: cls for cls in Message.__subclasses__()}


class Inbox:
    """The kinds one receiving socket role accepts, and its one Decoder."""

    def __init__(self, *accepts: type[Message]):
        self.kinds = frozenset(cls.__struct_config__.tag for cls in accepts)
        self._decoder = msgspec.msgpack.Decoder(tuple[int, Union[accepts]])  # type: ignore[valid-type]

    def decode(self, frame: bytes, max_bytes: int | None = None) -> Message:
        """Decode and validate one frame; raise SledError with the reply's code otherwise."""
        if max_bytes is not None and len(frame) > max_bytes:
            raise SledError(ErrorCode.TOO_LARGE, f"frame of {len(frame)} bytes exceeds {max_bytes}")
        try:
            version, msg = self._decoder.decode(frame)
        except msgspec.DecodeError as exc:  # msgspec.ValidationError included
            raise self._refusal(frame, exc) from None
        if version != PROTOCOL_VERSION:
            raise SledError(ErrorCode.BAD_VERSION, f"protocol version {version!r}, expected {PROTOCOL_VERSION}")
        return msg

    def _refusal(self, frame: bytes, exc: msgspec.DecodeError) -> SledError:
        """The code for a refused frame (the error path only: it reads the frame once more)."""
        with contextlib.suppress(msgspec.DecodeError):
            head = msgspec.msgpack.decode(frame)
            if isinstance(head, list) and head and head[0] != PROTOCOL_VERSION:
                return SledError(ErrorCode.BAD_VERSION, f"protocol version {head[0]!r}, expected {PROTOCOL_VERSION}")
            body = head[1] if isinstance(head, list) and len(head) == 2 and isinstance(head[1], list) else [""]
            if body and isinstance(body[0], str) and body[0] and body[0] not in self.kinds:
                return SledError(ErrorCode.UNKNOWN_KIND, f"unexpected message kind {body[0]!r}")
        return SledError(ErrorCode.BAD_FRAME, str(exc))


BROKER_FRONTEND_ACCEPTS = Inbox(Propose, CloseSession, StatsRequest, Heartbeat)
BROKER_BACKEND_ACCEPTS = Inbox(Ready, Heartbeat, BatchVerdicts, Dying)
VERIFIER_ACCEPTS = Inbox(VerifyBatch, CloseSession, Heartbeat)
DRAFTER_UPSTREAM_ACCEPTS = Inbox(Verdict, ErrorReply, Heartbeat)
DRAFTER_CLIENT_ACCEPTS = Inbox(Generate, Cancel, StatsRequest)
CLIENT_ACCEPTS = Inbox(Tokens, ErrorReply, StatsReply)

