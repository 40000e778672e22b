"""Every limit on what enters the pipeline, each checked once, where it first arrives from outside.

- ``propose_problem``: the broker, for a ``Propose`` from a drafter (a device: untrusted);
- ``generate_problem``: the drafter, for a ``Generate`` from its client;
- the gateway checks HTTP bodies itself (gateway/openai_api.py), naming the offending field.

msgspec has already checked every field's type and the frame's size and version; these are the
rules types cannot say. Past its checkpoint a message is trusted: the verifier checks only what
needs its model (token ids against the vocabulary, feature layers against the layer count).
Each function returns None, or a sentence for the ``ErrorReply(INVALID)`` sent back."""

from __future__ import annotations

from pipeline.config import LimitsConfig
from pipeline.protocol import Generate, Propose

MAX_ID_CHARS = 128  # session and request ids: keys in several maps, and in every log line
MAX_TOP_K = 64  # (id, probability) pairs per draft token in q_ids/q_probs
MAX_FEATURE_LAYERS = 4  # hidden-state layers a feature drafter may ask for
MAX_PLAIN_AFTER = 64  # plain rounds one proposal may ask the broker to run on its own (Propose.plain_after)
MAX_STOP_IDS = 64  # stop tokens per request (Generate.stop_ids, carried on as Propose.stop_ids)


def _sampling_problem(temperature: float, top_p: float) -> str | None:
    if not (temperature >= 0.0 and 0.0 < top_p <= 1.0):  # written so that NaN fails too
        return "temperature must be >= 0 and top_p in (0, 1]"
    return None


def propose_problem(item: Propose, limits: LimitsConfig) -> str | None:
    if not 1 <= len(item.session_id) <= MAX_ID_CHARS:
        return f"session_id must be 1..{MAX_ID_CHARS} characters"
    if len(item.draft) > limits.max_draft_tokens:
        return f"draft of {len(item.draft)} tokens exceeds {limits.max_draft_tokens}"
    if item.history is not None:
        if not 1 <= len(item.history) <= limits.max_history_tokens:
            return f"history must hold 1..{limits.max_history_tokens} tokens"
        if item.position != len(item.history):
            return "position must equal the history's length"
    if not 0 <= item.plain_after <= MAX_PLAIN_AFTER:
        return f"plain_after must be 0..{MAX_PLAIN_AFTER}"
    if item.ahead and (item.round < 1 or item.history is not None or item.if_token < -1):
        return "a proposal sent ahead follows an earlier round of a running session, with if_token >= -1"
    if item.position < 0 or item.position + len(item.draft) + 1 + item.plain_after > limits.max_history_tokens:
        return f"session would exceed {limits.max_history_tokens} tokens"
    if len(item.stop_ids) > MAX_STOP_IDS:
        return f"at most {MAX_STOP_IDS} stop_ids"
    # min() in C: this runs for every proposal the broker receives
    if ((item.draft and min(item.draft) < 0) or (item.history and min(item.history) < 0)
            or (item.stop_ids and min(item.stop_ids) < 0)):
        return "token ids must be non-negative"
    if item.feature_layers and (len(item.feature_layers) > MAX_FEATURE_LAYERS or min(item.feature_layers) < -1):
        return f"feature_layers: at most {MAX_FEATURE_LAYERS} indices, each >= -1"
    if problem := _sampling_problem(item.temperature, item.top_p):
        return problem
    if item.parents:
        return _tree_problem(item)
    if item.q_ids or item.q_probs:
        return _q_problem(item)
    return None


def _tree_problem(item: Propose) -> str | None:
    """A token tree: one parent per draft token, each an earlier token or -1 (the last committed
    one). Greedy only: the verifier walks the tree along the target's argmax; a sampled tree would
    need multi-draft rejection sampling (SpecInfer's), which SLED does not do."""
    if item.temperature > 0.0:
        return "a token tree (parents) needs greedy decoding (temperature 0)"
    if len(item.parents) != len(item.draft):
        return "parents needs one entry per draft token"
    if any(not -1 <= parent < i for i, parent in enumerate(item.parents)):
        return "each parent must be -1 or the index of an earlier draft token"
    return None


def _q_problem(item: Propose) -> str | None:
    """The drafter's distribution, which rejection sampling divides by: it must be one."""
    if len(item.q_ids) != len(item.draft) or len(item.q_probs) != len(item.draft):
        return "q_ids/q_probs need one row per draft token"
    for x, ids, probs in zip(item.draft, item.q_ids, item.q_probs):
        if not 1 <= len(ids) <= MAX_TOP_K or len(ids) != len(probs):
            return f"each q row holds 1..{MAX_TOP_K} (id, probability) pairs"
        if min(ids) < 0:
            return "token ids must be non-negative"
        if any(not 0.0 <= p <= 1.0 for p in probs) or sum(probs) > 1.0 + 1e-3:
            return "q_probs must be probabilities summing to at most 1"
        if x not in ids or probs[ids.index(x)] <= 0.0:
            return "each draft token must have positive draft probability"
    return None


def generate_problem(req: Generate, limits: LimitsConfig) -> str | None:
    if not 1 <= len(req.request_id) <= MAX_ID_CHARS:
        return f"request_id must be 1..{MAX_ID_CHARS} characters"
    if not req.prompt:
        return "prompt must hold at least one token"
    if not 1 <= req.max_new_tokens <= limits.max_new_tokens:
        return f"max_new_tokens must be in 1..{limits.max_new_tokens}"
    if len(req.prompt) + req.max_new_tokens > limits.max_history_tokens:
        return f"prompt + max_new_tokens exceeds {limits.max_history_tokens} tokens"
    if problem := _sampling_problem(req.temperature, req.top_p):
        return problem
    if len(req.stop_ids) > MAX_STOP_IDS:
        return f"at most {MAX_STOP_IDS} stop_ids"
    if min(req.prompt) < 0 or (req.stop_ids and min(req.stop_ids) < 0):
        return "token ids must be non-negative"
    return None
