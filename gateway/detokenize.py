"""Token ids to text deltas, with OpenAI's text stop sequences.

The drafter only knows stop token ids; ``stop`` strings are the gateway's job. Each round's new
tokens are decoded with everything before them (byte-level BPE pieces only make sense
together), and a delta is released only when it cannot change any more: an incomplete UTF-8
character at the end is held back, and so is any tail that could still grow into a stop string.
When a stop string appears the text is cut just before it and :attr:`stopped` is set; if
several appear, the one that ends first is the one generated first.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what decode() makes of an incomplete UTF-8 sequence


class TextAssembler:
    def __init__(self, tokenizer, stop: list[str] = (), skip_ids: set[int] = frozenset()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.skip_ids = set(skip_ids)
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far (may run past a stop string)
        self.emitted = 0  # characters of self.text handed out
        self.stopped = False

    def feed(self, tokens: list[int]) -> str:
        """Add one round's tokens; return the text that is now final."""
        if self.stopped:
            return ""
        self.ids += [t for t in tokens if t not in self.skip_ids]
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        cut = self._find_stop()
        if cut is not None:
            self.stopped = True
            return self._release(cut)
        return self._release(len(self.text) - self._held_back())

    def finish(self) -> str:
        """The rest, when the session has ended without a stop string."""
        return "" if self.stopped else self._release(len(self.text))

    @property
    def output(self) -> str:
        return self.text[: self.emitted]

    def _release(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta

    def _find_stop(self) -> int | None:
        """Where to cut: generation stops as soon as some stop string is complete, so the stop
        that *ends* first wins (of those ending there, the longest: its start is earliest). A
        longer stop that began earlier but would end later never gets generated. Deciding by
        the earliest start instead would make the answer depend on how tokens were grouped
        into rounds."""
        found = None  # (end, start)
        for s in self.stop:
            # a stop string may straddle what was already released and what is new
            at = self.text.find(s, max(0, self.emitted - len(s) + 1))
            if at != -1 and (found is None or (at + len(s), at) < found):
                found = (at + len(s), at)
        return None if found is None else found[1]

    def _held_back(self) -> int:
        text = self.text
        hold = len(text) - len(text.rstrip(REPLACEMENT))
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return hold
