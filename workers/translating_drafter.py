"""TranslatingDrafter: a model drafter whose tokenizer is not the target's (another model family).

It drafts in its own tokens, turns the draft into bytes, re-encodes them with the target's
tokenizer and proposes target ids: the broker and the verifier never know. Both tokenizers must
be byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2 families), so every token has exact bytes and
a window of text can be cut and joined anywhere without loss.

Keeping the drafter in step with the committed target tokens (universal assisted generation's
idea, done on bytes). The state holds the committed bytes and the drafter ids in its KV cache
with their byte ends. Each round:

* the fed drafter tokens are compared, token by token, with the committed bytes: the prefix that
  matches stays; then ``LOOKBACK`` more tokens are given up, because the last matching token may
  be the start of a longer token now that more text is committed (" hel" before "lo" arrived);
* the committed bytes after that point are re-encoded with the drafter's tokenizer, and the KV
  cache is cropped to the common prefix of the old and new ids (a rejected draft rolls back
  here; an accepted one whose ids re-encode the same is kept without recomputing).

Translating a draft: the drafted bytes are appended to the bytes of the last few committed
target tokens, re-encoded with the target tokenizer, and the ids after the point where a token
boundary meets the end of the committed bytes are the proposal. The last of them is dropped
(the text may end inside a longer target token: " wor" before "ld"), as is a trailing
incomplete UTF-8 character; so the drafter keeps drafting until ``gamma`` stable target tokens
exist, up to ``max_steps`` of its own tokens.

Sampling. A translated draft carries no q over target tokens, so it is sent as ids only, which
the verifier treats as a point mass q = 1 on each drafted token (workers/rejection_sampling.py): accept
x with probability p(x), else sample from the normalised (p - q)+ = p without x. That is exact
for any proposal made independently of the verifier's draws, whatever distribution the drafter
sampled it from. The drafter's own q would be correct only for a target token that is exactly
one drafter token drafted alone (token-level intersection); after re-encoding, one target token
can join several drafter tokens or depend on the next one, so that q is not the probability of
the proposed target token. Rule: q = 1 everywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import structlog
import torch
from transformers import DynamicCache

from pipeline.protocol import Sampling
from workers.drafts import Draft, DraftStrategy, crop_cache, pick_token

log = structlog.get_logger("sled.translating_drafter")

LOOKBACK = 2  # fed drafter tokens re-encoded each round even when they still match
WINDOW = 4  # committed target tokens re-encoded with each draft, so its first token joins them correctly


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as one printable character (the table every
    byte-level BPE tokenizer writes its vocabulary in)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}


def is_byte_level(tokenizer) -> bool:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    decoder = spec.get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(part.get("type") == "ByteLevel" for part in parts)


def byte_table(tokenizer) -> list[bytes | None]:
    """Every id's exact bytes (special and added tokens: their text)."""
    if not is_byte_level(tokenizer):
        raise ValueError(f"{type(tokenizer).__name__} is not a byte-level BPE tokenizer: translated drafting "
                         "needs byte-level tokenizers on both sides (GPT-2, Llama 3, Qwen, SmolLM2 families)")
    size = len(tokenizer)
    added = {i: tok.content for i, tok in tokenizer.added_tokens_decoder.items()}
    table: list[bytes | None] = []
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(size)))):
        if i in added:
            table.append(added[i].encode())
        elif token is None or any(c not in BYTE_OF_CHAR for c in token):
            table.append(None)
        else:
            table.append(bytes(BYTE_OF_CHAR[c] for c in token))
    return table


def complete_utf8(data: bytes | bytearray) -> int:
    """Length of the longest prefix that does not end inside a UTF-8 character."""
    n = len(data)
    for back in range(1, min(4, n) + 1):
        byte = data[n - back]
        if byte & 0xC0 == 0x80:
            continue  # a continuation byte: look further back for the lead byte
        need = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4 if byte >> 3 == 0b11110 else 1
        return n if back >= need else n - back
    return n  # only continuation bytes: not UTF-8 either way (encoded byte by byte)


class ByteEncoder:
    """Encode bytes exactly with a byte-level tokenizer: valid UTF-8 runs through the tokenizer,
    bytes that are not valid UTF-8 (a model may emit any byte token) as single-byte tokens, so
    that no replacement character ever changes the text."""

    def __init__(self, tokenizer, table: list[bytes | None]):
        self.tokenizer = tokenizer
        self.single = {piece[0]: i for i, piece in enumerate(table) if piece is not None and len(piece) == 1
                       and i not in tokenizer.added_tokens_decoder}

    def __call__(self, data: bytes) -> list[int]:
        ids: list[int] = []
        while data:
            try:
                text, bad, rest = data.decode("utf-8"), b"", b""
            except UnicodeDecodeError as exc:
                text, bad, rest = data[:exc.start].decode("utf-8"), data[exc.start:exc.end], data[exc.end:]
            if text:
                ids += self.tokenizer.encode(text, add_special_tokens=False)
            # a byte no token holds (0xFF in a vocabulary learnt from UTF-8 text) cannot be
            # represented: skipped, so the caller's byte comparison sees the difference
            ids += [self.single[b] for b in bad if b in self.single]
            data = rest
        return ids


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class TranslateState:
    cache: DynamicCache = field(default_factory=DynamicCache)
    fed: list[int] = field(default_factory=list)  # drafter ids whose keys/values are in the cache
    ends: list[int] = field(default_factory=list)  # byte end of each fed token
    text: bytearray = field(default_factory=bytearray)  # bytes of the committed target tokens seen
    seen: int = 0  # committed target tokens whose bytes are in ``text``
    synced: int = 0  # fed tokens already checked against ``text``


class TranslatingDrafter(DraftStrategy):
    kind = "model"  # a model drafter like any other on the wire and in the figures
    # drafting ahead would need its byte-level sync to follow assumed tokens: not built
    supports_proactive = False

    def __init__(self, model, draft_tokenizer, target_tokenizer, *, min_confidence: float = 0.0, top_k: int = 8,
                 max_steps: int = 0):
        self.model = model
        self.min_confidence = min_confidence
        self.top_k = top_k
        self.max_steps = max_steps  # drafter tokens per round; 0 = 2 * gamma + 2
        self.device = next(model.parameters()).device
        self.draft_tok, self.target_tok = draft_tokenizer, target_tokenizer
        self.draft_bytes = byte_table(draft_tokenizer)
        self.target_bytes = byte_table(target_tokenizer)
        # ends a draft: after it no text can follow (its bytes are the token's text, not content)
        self.draft_stops = set(draft_tokenizer.all_special_ids)
        self.encode_draft = ByteEncoder(draft_tokenizer, self.draft_bytes)
        self.encode_target = ByteEncoder(target_tokenizer, self.target_bytes)

    def new_state(self) -> TranslateState:
        return TranslateState()

    # --- keeping the drafter's ids in step with the committed target tokens ----------------

    def _sync(self, state: TranslateState, committed: list[int]) -> list[int]:
        """Bring the cache to the drafter's encoding of the committed bytes; returns the ids
        still to feed (at least one, so that the next logits exist), or [] when no text yet."""
        for token in committed[state.seen:]:
            state.text += self.target_bytes[token] if token < len(self.target_bytes) and self.target_bytes[token] else b""
        state.seen = len(committed)
        usable = complete_utf8(state.text)
        k = state.synced
        while k < len(state.fed):
            start = state.ends[k - 1] if k else 0
            if state.ends[k] > usable or state.text[start:state.ends[k]] != self.draft_bytes[state.fed[k]]:
                break
            k += 1
        keep = max(0, k - LOOKBACK)
        while keep and state.text[state.ends[keep - 1]:state.ends[keep - 1] + 1] and state.text[state.ends[keep - 1]] & 0xC0 == 0x80:
            keep -= 1  # re-encode from a character boundary
        offset = state.ends[keep - 1] if keep else 0
        tail = self.encode_draft(bytes(state.text[offset:usable]))
        wanted = state.fed[:keep] + tail
        common = keep + _common_prefix(state.fed[keep:], tail)
        if common == len(wanted):
            common -= 1  # refeed the last token: its logits are not kept
        if common < 0:
            return []
        crop_cache(state.cache, common)
        state.fed, state.ends = state.fed[:common], state.ends[:common]
        state.synced = min(keep, common)  # these were compared with the committed bytes above
        return wanted[common:]

    def _feed(self, state: TranslateState, ids: list[int]) -> torch.Tensor:
        out = self.model(input_ids=torch.tensor([ids], dtype=torch.long, device=self.device),
                         cache=state.cache, use_cache=True)
        state.cache = out.cache
        for token in ids:
            state.ends.append((state.ends[-1] if state.ends else 0) + len(self.draft_bytes[token] or b""))
            state.fed.append(token)
        return out.logits[0, -1].float()

    # --- translating a draft ----------------------------------------------------------------

    def _window(self, committed: list[int]) -> tuple[bytes, list[int]]:
        size = min(WINDOW, len(committed))
        while True:
            window = b"".join(self.target_bytes[t] or b"" for t in committed[len(committed) - size:])
            if size >= len(committed) or size >= 4 * WINDOW or not window or window[0] & 0xC0 != 0x80:
                return window, committed[len(committed) - size:]
            size += 1  # the window must start on a character boundary to decode

    def to_target(self, committed: list[int], continuation: bytes) -> list[int] | None:
        """Target ids that continue ``committed`` with ``continuation`` (bytes after the committed
        ones; a trailing incomplete character is dropped), or None when no target token boundary
        falls at the end of the committed bytes."""
        window, _ = self._window(committed)
        full = window + continuation
        full = full[:complete_utf8(full)]
        if len(full) <= len(window):
            return []
        ids = self.encode_target(full)
        at = 0
        for j, token in enumerate(ids):
            if at == len(window):
                return ids[j:]
            if at > len(window):
                break
            at += len(self.target_bytes[token] or b"") if token < len(self.target_bytes) else 0
        # a target token straddles the committed end (" hel" + "lo" canonically " hello"): the
        # target must go on with tokens of the continuation alone, so encode that by itself
        if continuation[:1] and continuation[0] & 0xC0 == 0x80:
            return None
        cont = continuation[:complete_utf8(continuation)]
        return self.encode_target(cont)

    # --- the strategy interface --------------------------------------------------------------

    @torch.inference_mode()
    def propose(self, state: TranslateState, committed: list[int], gamma: int, sampling: Sampling,
                generator: torch.Generator, interrupt=None) -> Draft:
        """``interrupt`` is unused: this kind does not draft ahead (supports_proactive)."""
        if gamma <= 0:
            return Draft([])
        ids = self._sync(state, committed)
        if not ids:
            return Draft([])
        logits = self._feed(state, ids)
        pending = bytes(state.text[complete_utf8(state.text):])  # the committed end's incomplete character
        drafted, stable = bytearray(), []
        for step in range(self.max_steps or 2 * gamma + 2):
            token, confidence, _, _ = pick_token(logits, sampling, self.top_k, generator)  # sent as ids only (q = 1)
            piece = self.draft_bytes[token] if token < len(self.draft_bytes) else None
            if confidence < self.min_confidence or piece is None:
                break
            drafted += piece
            final = token in self.draft_stops
            if len(drafted) >= len(pending):
                if not drafted.startswith(pending):
                    break  # the draft does not continue the committed character
                translated = self.to_target(committed, bytes(drafted[len(pending):]))
                if translated is None:
                    break
                stable = translated if final else translated[:-1]
            if final or len(stable) >= gamma:
                break
            logits = self._feed(state, [token])
        return Draft(stable[:gamma])

    def commit(self, state: TranslateState, position: int, accepted: int) -> None:
        """Nothing to do here: the next ``propose`` compares the cache's ids with the committed
        bytes and rolls back whatever the verdict rejected."""


def tokenizers_to_translate(cfg, target_spec: str):
    """(drafter tokenizer, target tokenizer) when a model drafter must translate, else None.

    ``cfg.translate`` True forces it (also for a drafter sharing the target's tokenizer: a check
    of the translation itself), False forbids it; None compares the two vocabularies, and a
    model without a loadable tokenizer (tests' bare model folders) is taken to share the target's."""
    if cfg.translate is False:
        return None
    from pipeline.models import load_tokenizer

    try:
        target = load_tokenizer(target_spec)
        # a ladder rung is built on the target's own embeddings and vocabulary
        draft = target if cfg.model.startswith("ladder:") else load_tokenizer(cfg.model)
    except Exception as exc:  # noqa: BLE001 - any loader failure means "no tokenizer to compare"
        if cfg.translate:
            raise ValueError(f"translate = true needs both tokenizers: {exc}") from exc
        log.info("tokenizer_check_skipped", model=cfg.model, reason=repr(exc)[:200])
        return None
    if cfg.translate or draft.get_vocab() != target.get_vocab():
        log.info("drafter_translates", model=cfg.model, draft_vocab=len(draft), target_vocab=len(target))
        return draft, target
    return None
