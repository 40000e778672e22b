"""The pipeline's error codes and its one error type."""

from __future__ import annotations


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


class SledError(Exception):
    """The one error type of the pipeline: a code (ErrorCode), a detail for people, and whether
    retrying can help (by default: the code is one of ErrorCode.RETRIABLE). A bad frame, a failed
    verify item, a failed session and a failed generation all raise it; on the wire it travels as
    an ErrorReply (``ErrorReply.of(exc)``; or a Verdict's error/detail) with the same three, and the gateway maps it to
    HTTP in one place (gateway/routes.py ``http_error``)."""

    def __init__(self, code: str, detail: str, retriable: bool | None = None):
        super().__init__(f"{code}: {detail}")
        self.code, self.detail = code, detail
        self.retriable = code in ErrorCode.RETRIABLE if retriable is None else retriable
