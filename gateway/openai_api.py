"""The OpenAI-style request and response shapes: validate a request body into a
:class:`GenerationRequest`, and build completion, chat and chunk bodies and error bodies.

Validation is pure (no sockets, no model): it takes the body, the tokenizer and the limits, and
raises :class:`ApiError` naming the offending parameter, so every bad-input case is a 400 with
an OpenAI-style body (``{"error": {"message", "type", "param", "code"}}``).

SLED's own figures ride in an extension field ``"sled"`` of the final response or chunk:
``drafter``, ``drafter_kind``, ``session_id``, ``rounds``, ``proposed``, ``accepted``,
``acceptance_rate`` (see docs/gateway.md).
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

CHAT_ROLES = {"system", "user", "assistant", "developer"}
MAX_STOP_STRINGS = 4
MAX_SEED = 2**63 - 1
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default; 0 asks for greedy decoding


class ApiError(Exception):
    """A request that fails as data: an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_
        self.retry_after = retry_after

    def body(self) -> dict:
        return error_body(self.message, param=self.param, code=self.code, type_=self.type)


def error_body(message: str, *, param: str | None = None, code: str | None = None,
               type_: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def bad_request(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Limits:
    """What a request may ask for; taken from GatewayConfig and LimitsConfig."""

    max_prompt_tokens: int
    max_new_tokens: int
    max_history_tokens: int
    vocab_size: int


@dataclass
class GenerationRequest:
    endpoint: str  # "chat" or "completions"
    model: str  # as the client named it ("" = the default drafter)
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


# --- field checks --------------------------------------------------------------------------


def _number(body: dict, name: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(f"'{name}' must be a number, got {type(value).__name__}", name, "invalid_type")
    if value < low or (low_open and value == low) or value > high:
        left = "(" if low_open else "["
        raise bad_request(f"'{name}' must be in {left}{low}, {high}], got {value}", name)
    return float(value)


def _integer(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{name}' must be an integer, got {type(value).__name__}", name, "invalid_type")
    return value


def _bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be a boolean, got {type(value).__name__}", name, "invalid_type")
    return value


def _stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"'stop' holds at most {MAX_STOP_STRINGS} strings", "stop")
    if any(not s for s in stops):
        raise bad_request("'stop' strings must not be empty", "stop")
    return list(stops)


def _unsupported(body: dict) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise bad_request("only 'n' = 1 is supported", "n")
    for name in ("logprobs", "echo", "tools", "functions"):
        if body.get(name):
            raise bad_request(f"'{name}' is not supported by this server", name, "unsupported_parameter")
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise bad_request("only 'best_of' = 1 is supported", "best_of", "unsupported_parameter")


def _check_ids(ids: list, param: str, limits: Limits) -> list[int]:
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int):
            raise bad_request(f"'{param}' token ids must be integers (item {i})", param, "invalid_type")
        if not 0 <= t < limits.vocab_size:
            raise bad_request(f"'{param}' token id {t} is outside the vocabulary (0..{limits.vocab_size - 1})", param)
    return list(ids)


def _completion_prompt(body: dict, tokenizer, limits: Limits) -> list[int]:
    if "prompt" not in body or body["prompt"] is None:
        raise bad_request("you must provide a 'prompt'", "prompt", "missing_required_parameter")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("'prompt' must not be empty", "prompt")
        return list(tokenizer(prompt)["input_ids"])
    if isinstance(prompt, list):
        if not prompt:
            raise bad_request("'prompt' must not be empty", "prompt")
        if any(isinstance(p, (str, list)) for p in prompt):
            raise bad_request("only one prompt per request is supported", "prompt", "unsupported_parameter")
        return _check_ids(prompt, "prompt", limits)
    raise bad_request(f"'prompt' must be a string or a list of token ids, got {type(prompt).__name__}",
                      "prompt", "invalid_type")


def _message_text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text parts make sense for a text model
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad_request(f"'{param}[{j}]' must be a text part", f"{param}[{j}]", "invalid_type")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"'{param}' must be a string or a list of text parts", param, "invalid_type")


def _chat_prompt(body: dict, tokenizer) -> list[int]:
    messages = body.get("messages")
    if messages is None:
        raise bad_request("you must provide 'messages'", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages", "invalid_type")
    clean = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"'{where}' must be an object", where, "invalid_type")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise bad_request(f"'{where}.role' must be one of {sorted(CHAT_ROLES)}, got {role!r}", f"{where}.role")
        if "content" not in message or message["content"] is None:
            raise bad_request(f"'{where}.content' is required", f"{where}.content", "missing_required_parameter")
        role = "system" if role == "developer" else role
        clean.append({"role": role, "content": _message_text(message["content"], f"{where}.content")})
    ids = tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def parse_request(endpoint: str, body: Any, tokenizer, limits: Limits, models: set[str]) -> GenerationRequest:
    """Validate one request body; ``models`` are the names a request may give as ``model``."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", None, "invalid_json")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string", "model", "invalid_type")
    model = model or ""
    if model and model not in models:
        raise ApiError(400, f"the model {model!r} does not exist; GET /v1/models lists them",
                       param="model", code="model_not_found")
    _unsupported(body)
    temperature = _number(body, "temperature", DEFAULT_TEMPERATURE, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    seed = _integer(body, "seed")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise bad_request(f"'seed' must be in [0, {MAX_SEED}]", "seed")
    stop = _stop(body)
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = bool(options and options.get("include_usage"))

    if endpoint == "chat":
        prompt_ids, prompt_param = _chat_prompt(body, tokenizer), "messages"
    else:
        prompt_ids, prompt_param = _completion_prompt(body, tokenizer, limits), "prompt"
    if len(prompt_ids) > limits.max_prompt_tokens:
        raise ApiError(400, f"the prompt is {len(prompt_ids)} tokens, more than the {limits.max_prompt_tokens} allowed",
                       param=prompt_param, code="context_length_exceeded")
    room = min(limits.max_new_tokens, limits.max_history_tokens - len(prompt_ids))

    name = "max_tokens"
    max_tokens = _integer(body, "max_tokens")
    if endpoint == "chat" and body.get("max_completion_tokens") is not None:
        name, max_tokens = "max_completion_tokens", _integer(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if endpoint == "completions" else room
        max_tokens = min(max_tokens, room)
    if not 1 <= max_tokens <= room:
        raise bad_request(f"'{name}' must be in [1, {room}] for this prompt of {len(prompt_ids)} tokens, got {max_tokens}",
                          name)
    if seed is None:  # the drafter and the verifier seed their sampling from it
        seed = random.getrandbits(62)
    return GenerationRequest(endpoint, model, prompt_ids, max_tokens, temperature, top_p, seed, stop, stream,
                             include_usage)


# --- response shapes -----------------------------------------------------------------------


def new_id(endpoint: str) -> str:
    return ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(endpoint: str, rid: str, model: str, text: str, finish_reason: str, use: dict, sled: dict) -> dict:
    created = int(time.time())
    if endpoint == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], "usage": use,
            "sled": sled}


def chunk(endpoint: str, rid: str, model: str, text: str | None, finish_reason: str | None = None, *,
          first: bool = False, use: dict | None = None, sled: dict | None = None, no_choices: bool = False) -> dict:
    """One streamed chunk. ``first`` (chat) carries the assistant role; ``no_choices`` is the
    trailing usage-only chunk OpenAI sends when ``stream_options.include_usage`` is set."""
    if endpoint == "chat":
        delta: dict = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    out = {"id": rid, "object": obj, "created": int(time.time()), "model": model,
           "choices": [] if no_choices else [choice]}
    if use is not None:
        out["usage"] = use
    if sled is not None:
        out["sled"] = sled
    return out
