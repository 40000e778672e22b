"""Every message that crosses a socket in SLED, declared once.

A frame is one MessagePack array: ``[PROTOCOL_VERSION, kind, field1, field2, ...]`` with the
fields in declaration order (arrays, not maps: a proposal is a few dozen bytes, and edge links
are slow). New fields are only ever appended with defaults, so an older peer's shorter frame
still decodes. Every receiver calls :func:`decode`, which checks the version, the kind, the
field count and every field's type before any handler sees the message; a bad frame raises
:class:`ProtocolError` carrying the error code for the reply.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union, get_args, get_origin

import msgpack

PROTOCOL_VERSION = 1


class ErrorCode:
    """Codes carried by :class:`ErrorReply`. Retriable ones say: send the same thing again later."""

    BAD_FRAME = "bad_frame"  # not MessagePack, not an array, wrong field count or type
    BAD_VERSION = "bad_version"
    UNKNOWN_KIND = "unknown_kind"
    TOO_LARGE = "too_large"
    INVALID = "invalid"  # well-formed but out of range (token ids, lengths, limits)
    OVERLOADED = "overloaded"  # retriable: a bounded queue is full
    NO_VERIFIER = "no_verifier"  # retriable: none registered yet
    VERIFIER_LOST = "verifier_lost"  # retriable: the verifier died with the proposal
    UNKNOWN_SESSION = "unknown_session"  # resend with the full history
    OUT_OF_SYNC = "out_of_sync"  # resend with the full history
    NOT_OWNER = "not_owner"  # another peer's session
    INTERNAL = "internal"

    RETRIABLE = frozenset({OVERLOADED, NO_VERIFIER, VERIFIER_LOST})
    RESYNC = frozenset({UNKNOWN_SESSION, OUT_OF_SYNC})


class ProtocolError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class Message:
    """Base of every wire message; subclasses are frozen dataclasses with a unique KIND."""

    KIND: ClassVar[str]

    def encode(self) -> bytes:
        return msgpack.packb([PROTOCOL_VERSION, self.KIND, *_to_wire(self)], use_bin_type=True)


def _to_wire(obj: Any) -> list:
    out = []
    for name, maybe_nested in _wire_fields(type(obj)):
        value = getattr(obj, name)
        if maybe_nested and isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            value = [_to_wire(v) for v in value]
        out.append(value)
    return out


_WIRE_FIELDS: dict[type, tuple[tuple[str, bool], ...]] = {}


def _wire_fields(cls: type) -> tuple[tuple[str, bool], ...]:
    """(name, may hold messages) per field, looked up once per class: dataclasses.fields() builds
    its tuple on every call, and a broker encodes tens of thousands of messages a second. Only a
    field declared as a list can hold a list of nested messages (VerifyBatch.items, ...)."""
    spec = _WIRE_FIELDS.get(cls)
    if spec is None:
        hints = _hints(cls)
        spec = _WIRE_FIELDS[cls] = tuple(
            (f.name, get_origin(hints[f.name]) is list) for f in dataclasses.fields(cls)
        )
    return spec


# --- sampling settings -------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """temperature 0 means greedy. Sent with a session's opening proposal and kept by the verifier."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


# --- drafter <-> broker <-> verifier ------------------------------------------------------


@dataclass(frozen=True)
class Propose(Message):
    """A drafter's proposal for one session and round.

    ``position`` is how many tokens the drafter has committed (prompt + generated); the draft
    continues from there. ``history`` carries all committed tokens when the verifier must
    (re)build the session (first round, eviction, verifier restart), else it is None.
    ``q_ids``/``q_probs`` carry, per draft token, the drafter's truncated top-k distribution
    it sampled from (sampling mode only; empty when the drafter proposes deterministically).
    """

    KIND: ClassVar[str] = "propose"
    session_id: str
    round: int
    position: int
    draft: list[int]
    q_ids: list[list[int]] = field(default_factory=list)
    q_probs: list[list[float]] = field(default_factory=list)
    history: list[int] | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    drafter_kind: str = ""
    # Feature-conditioned drafters (workers/feature_drafter.py) ask for the target's hidden
    # states at these layers (transformers' output_hidden_states numbering; -1 = the final-norm
    # output). Empty: none, and the verdict carries none.
    feature_layers: list[int] = field(default_factory=list)

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.seed)

    @property
    def target_tokens(self) -> int:
        """Rows this proposal costs in the verify forward: the last committed token + the draft."""
        return 1 + len(self.draft)


@dataclass(frozen=True)
class Verdict(Message):
    """The target's answer to one proposal: ``accepted`` draft tokens, then ``token`` (the
    correction, or the bonus token when the whole draft was accepted)."""

    KIND: ClassVar[str] = "verdict"
    session_id: str
    round: int
    accepted: int
    token: int
    error: str = ""  # set by a verifier for one item of a batch; the broker turns it into ErrorReply
    detail: str = ""
    # When the proposal asked for feature_layers: the target's hidden states, fp16 bytes,
    # row-major [rows, layers x hidden], for the committed positions features_start,
    # features_start + 1, ... that this round computed (the token fed first and each accepted
    # draft token; after a (re)build, the history's positions too). Verification is unchanged.
    features: bytes = b""
    features_start: int = 0


@dataclass(frozen=True)
class CloseSession(Message):
    KIND: ClassVar[str] = "close"
    session_id: str


@dataclass(frozen=True)
class ErrorReply(Message):
    KIND: ClassVar[str] = "error"
    code: str
    message: str
    retriable: bool = False
    session_id: str = ""
    round: int = -1
    request_id: str = ""


@dataclass(frozen=True)
class StatsRequest(Message):
    KIND: ClassVar[str] = "stats_req"


@dataclass(frozen=True)
class StatsReply(Message):
    KIND: ClassVar[str] = "stats"
    stats: dict


@dataclass(frozen=True)
class Ready(Message):
    """Verifier -> broker: idle, send the next batch. Carries the verifier's counters."""

    KIND: ClassVar[str] = "ready"
    stats: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Heartbeat(Message):
    """Both ways between broker and verifiers, and between broker and drafters. ``idle`` lets a
    restarted broker learn that a verifier is waiting for work without waiting for its Ready."""

    KIND: ClassVar[str] = "heartbeat"
    idle: bool = False
    stats: dict = field(default_factory=dict)


@dataclass(frozen=True)
class VerifyBatch(Message):
    KIND: ClassVar[str] = "batch"
    batch_id: int
    items: list[Propose]


@dataclass(frozen=True)
class BatchVerdicts(Message):
    KIND: ClassVar[str] = "verdicts"
    batch_id: int
    verdicts: list[Verdict]
    compute_ms: float = 0.0


# --- client <-> drafter (the device's local API) -----------------------------------------


@dataclass(frozen=True)
class Generate(Message):
    KIND: ClassVar[str] = "generate"
    request_id: str
    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Cancel(Message):
    KIND: ClassVar[str] = "cancel"
    request_id: str


@dataclass(frozen=True)
class Tokens(Message):
    """Drafter -> client: newly committed tokens of a request; the last one has ``done`` set
    and the session's figures in ``stats``."""

    KIND: ClassVar[str] = "tokens"
    request_id: str
    tokens: list[int]
    done: bool = False
    finish_reason: str = ""
    stats: dict = field(default_factory=dict)


MESSAGES: dict[str, type[Message]] = {
    cls.KIND: cls
    for cls in (
        Propose, Verdict, CloseSession, ErrorReply, StatsRequest, StatsReply, Ready, Heartbeat,
        VerifyBatch, BatchVerdicts, Generate, Cancel, Tokens,
    )
}

# What each receiver accepts; anything else is answered with UNKNOWN_KIND.
BROKER_FRONTEND_ACCEPTS = (Propose, CloseSession, StatsRequest, Heartbeat)
BROKER_BACKEND_ACCEPTS = (Ready, Heartbeat, BatchVerdicts)
VERIFIER_ACCEPTS = (VerifyBatch, CloseSession, Heartbeat)
DRAFTER_UPSTREAM_ACCEPTS = (Verdict, ErrorReply, Heartbeat)
DRAFTER_CLIENT_ACCEPTS = (Generate, Cancel, StatsRequest)
CLIENT_ACCEPTS = (Tokens, ErrorReply, StatsReply)


def decode(frame: bytes, accepts: tuple[type[Message], ...], max_bytes: int | None = None) -> Message:
    """Decode and validate one frame; raise ProtocolError with the reply's code otherwise."""
    if max_bytes is not None and len(frame) > max_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"frame of {len(frame)} bytes exceeds {max_bytes}")
    try:
        raw = msgpack.unpackb(frame, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(ErrorCode.BAD_FRAME, f"not MessagePack: {type(exc).__name__}") from None
    if not isinstance(raw, list) or len(raw) < 2:
        raise ProtocolError(ErrorCode.BAD_FRAME, "a frame is an array [version, kind, ...fields]")
    version, kind, *values = raw
    if version != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.BAD_VERSION, f"protocol version {version!r}, expected {PROTOCOL_VERSION}")
    cls = MESSAGES.get(kind) if isinstance(kind, str) else None
    if cls is None or cls not in accepts:
        raise ProtocolError(ErrorCode.UNKNOWN_KIND, f"unexpected message kind {kind!r}")
    return _build(cls, values, kind)


def _build(cls: type, values: list, path: str):
    fast = _fast_build(cls, values)
    if fast is not _BAD:
        return fast
    return _build_checked(cls, values, path)  # raises the precise error (or agrees after all)


def _build_checked(cls: type, values: list, path: str):
    fields = dataclasses.fields(cls)
    required = sum(1 for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if not required <= len(values) <= len(fields):
        raise ProtocolError(ErrorCode.BAD_FRAME, f"{path}: {len(values)} fields, expected {required}..{len(fields)}")
    hints = _hints(cls)
    kwargs = {f.name: _check(v, hints[f.name], f"{path}.{f.name}") for f, v in zip(fields, values)}
    return cls(**kwargs)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _check(value: Any, tp: Any, path: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _check(value, inner, path)
    if origin is list:
        if not isinstance(value, list):
            raise ProtocolError(ErrorCode.BAD_FRAME, f"{path}: expected an array")
        (inner,) = get_args(tp)
        return [_check(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    elif tp is bytes:
        ok = isinstance(value, bytes)
    elif tp is dict or origin is dict:
        ok = isinstance(value, dict)
    elif dataclasses.is_dataclass(tp):
        if not isinstance(value, list):
            raise ProtocolError(ErrorCode.BAD_FRAME, f"{path}: expected an array")
        return _build(tp, value, path)
    else:  # pragma: no cover - a declaration error, not a peer's
        raise TypeError(f"unsupported field type {tp!r} at {path}")
    if not ok:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"{path}: expected {tp.__name__}, got {type(value).__name__}")
    return value


# --- the fast path of decode ---------------------------------------------------------------------
# ``_check`` reads the type hints again for every value: fine for an error message, slow for a
# broker that decodes tens of thousands of proposals a second. Each message class gets validators
# compiled once from the same hints. They only ever accept what ``_check`` accepts and return the
# same values (ints of float fields become floats); anything else returns ``_BAD`` and the frame
# goes through ``_check``, which raises the error with its exact path and message. Frames come
# from msgpack, so exact-type tests (``type(v) is int``) lose nothing: msgpack makes no subclasses.

_BAD = object()
_INT_MIN, _INT_MAX = -(2**63), 2**63


def _fast_int(v: Any) -> Any:
    return v if type(v) is int and _INT_MIN <= v < _INT_MAX else _BAD


def _fast_float(v: Any) -> Any:
    t = type(v)
    if t is float:
        return v
    return float(v) if t is int else _BAD


def _fast_ints(v: Any) -> Any:
    if type(v) is not list:
        return _BAD
    for x in v:
        if type(x) is not int or not _INT_MIN <= x < _INT_MAX:
            return _BAD
    return v


def _exact(t: type):
    return lambda v: v if type(v) is t else _BAD


def _fast_list(inner):
    def check(v: Any) -> Any:
        if type(v) is not list:
            return _BAD
        out = [inner(x) for x in v]
        for x in out:
            if x is _BAD:
                return _BAD
        return out

    return check


def _fast_optional(inner):
    return lambda v: None if v is None else inner(v)


def _fast_nested(cls: type):
    return lambda v: _fast_build(cls, v) if type(v) is list else _BAD


def _compile(tp: Any):
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        (inner,) = [o for o in options if o is not type(None)]
        return _fast_optional(_compile(inner)) if type(None) in options else _compile(inner)
    if origin is list:
        (inner,) = get_args(tp)
        return _fast_ints if inner is int else _fast_list(_compile(inner))
    if tp is int:
        return _fast_int
    if tp is float:
        return _fast_float
    if tp in (bool, str, bytes):
        return _exact(tp)
    if tp is dict or origin is dict:
        return _exact(dict)
    if dataclasses.is_dataclass(tp):
        return _fast_nested(tp)
    raise TypeError(f"unsupported field type {tp!r}")  # pragma: no cover - a declaration error


_VALIDATORS: dict[type, tuple[int, tuple]] = {}


def _validators(cls: type) -> tuple[int, tuple]:
    """(required field count, one validator per field in order), compiled on first use."""
    spec = _VALIDATORS.get(cls)
    if spec is None:
        fields = dataclasses.fields(cls)
        required = sum(1 for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        hints = _hints(cls)
        spec = _VALIDATORS[cls] = (required, tuple(_compile(hints[f.name]) for f in fields))
    return spec


def _fast_build(cls: type, values: list):
    required, validators = _validators(cls)
    if not required <= len(values) <= len(validators):
        return _BAD
    args = []
    for check, value in zip(validators, values):
        value = check(value)
        if value is _BAD:
            return _BAD
        args.append(value)
    return cls(*args)


def error_for(exc: ProtocolError, **ids: Any) -> ErrorReply:
    return ErrorReply(code=exc.code, message=exc.message, retriable=exc.code in ErrorCode.RETRIABLE, **ids)
