"""Incremental detokenization for streaming: text deltas that concatenate exactly to the final text.

Each call decodes only a short window of tokens (the ones since the last emitted text, plus the
token before them for context), in the manner of vLLM's and TGI's incremental detokenizers, so a
long generation costs O(tokens) in total. Text is held back while it

- ends in an incomplete UTF-8 sequence (the tokenizer decodes it as U+FFFD until the rest arrives),
- or could be the start of a stop string (the output must end before the first stop string).

`finish()` releases what is held back; once a stop string is seen, nothing after it is ever emitted.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


class Detokenizer:
    """Text of one request's generated tokens, delta by delta."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.tokens: list[int] = []
        self.text = ""  # decoded so far: emitted + held back (cut at a stop string once one is seen)
        self.emitted = 0  # characters of `text` already returned
        self.stopped = False  # a stop string was found; `text` ends before it
        self._prefix = 0  # tokens[_prefix:_read] decode to the end of `text` (context for the next window)
        self._read = 0

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; return the newly releasable text (maybe empty)."""
        if self.stopped:
            return ""
        self.tokens += token_ids
        self._decode()
        self._cut_at_stop()
        end = len(self.text) if self.stopped else len(self.text) - self._held()
        return self._release(end)

    def finish(self) -> str:
        """The rest of the text: what was held back, with any incomplete UTF-8 decoded as U+FFFD."""
        if not self.stopped and self._read < len(self.tokens):
            self.text += self._window_text(self._prefix, len(self.tokens))
            self._read = len(self.tokens)
            self._cut_at_stop()
        return self._release(len(self.text))

    def _window_text(self, start: int, end: int) -> str:
        """Text that tokens[_read:end] add after the text of tokens[start:_read]."""
        decode = self.tokenizer.decode
        before = decode(self.tokens[start : self._read], skip_special_tokens=True)
        after = decode(self.tokens[start:end], skip_special_tokens=True)
        return after[len(before) :]

    def _decode(self) -> None:
        new = self._window_text(self._prefix, len(self.tokens))
        if new and not new.endswith(REPLACEMENT):  # an incomplete character waits for its remaining bytes
            self.text += new
            self._prefix, self._read = self._read, len(self.tokens)

    def _cut_at_stop(self) -> None:
        if not self.stop:
            return
        hits = [i for i in (self.text.find(s, self.emitted) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True

    def _held(self) -> int:
        """Length of the longest unemitted tail of `text` that is a proper prefix of a stop string."""
        tail = self.text[self.emitted :]
        return max(
            (k for s in self.stop for k in range(min(len(s) - 1, len(tail)), 0, -1) if tail.endswith(s[:k])), default=0
        )

    def _release(self, end: int) -> str:
        delta = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return delta
