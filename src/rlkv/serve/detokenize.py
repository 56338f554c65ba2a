"""Incremental detokenization for streaming: text deltas that concatenate exactly to the final text.

Each call decodes only a short window of tokens (the ones since the last emitted text, plus the
token before them for context), in the manner of vLLM's and TGI's incremental detokenizers, so a
long generation costs O(tokens) in total. Text is held back while it

- ends in an incomplete UTF-8 sequence (the tokenizer decodes it as U+FFFD until the rest arrives),
- or could be the start of a stop string (the output must end before the first stop string).

Stop strings are matched by a Knuth-Morris-Pratt automaton each, fed only the new text: the work
per delta is linear in the new text whatever the stop strings and however much text is held back,
and what is held is exactly the longest tail that could still grow into a stop string.
`finish()` releases what is held back; once a stop string is seen, nothing after it is ever emitted.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


class StopMatcher:
    """One stop string's automaton: `state` is the length of the longest prefix of it that the text fed so
    far ends with; `feed` advances over new text in amortized O(1) per character."""

    def __init__(self, stop: str):
        self.stop, self.state = stop, 0
        self._fallback = [0] * len(stop)  # the longest proper prefix of stop[:i + 1] that is also its suffix
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self._fallback[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self._fallback[i] = k

    def feed(self, text: str) -> int | None:
        """Advance over `text`; where the first whole stop string starts, relative to `text` (negative: in text
        fed before), or None."""
        stop, fallback, k = self.stop, self._fallback, self.state
        for i, char in enumerate(text):
            while k and stop[k] != char:
                k = fallback[k - 1]
            if stop[k] == char:
                k += 1
                if k == len(stop):
                    self.state = k
                    return i + 1 - k
        self.state = k
        return None


class Detokenizer:
    """Text of one request's generated tokens, delta by delta."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.matchers = [StopMatcher(s) for s in stop]
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
        held = max((m.state for m in self.matchers), default=0)
        return self._release(len(self.text) if self.stopped else len(self.text) - held)

    def finish(self) -> str:
        """The rest of the text: what was held back, with any incomplete UTF-8 decoded as U+FFFD."""
        if not self.stopped and self._read < len(self.tokens):
            self._append(self._window_text(self._prefix, len(self.tokens)))
            self._read = len(self.tokens)
        return self._release(len(self.text))

    def _window_text(self, start: int, end: int) -> str:
        """Text that tokens[_read:end] add after the text of tokens[start:_read]."""
        decode, skip = self.tokenizer.decode, self.skip_special_tokens
        before = decode(self.tokens[start : self._read], skip_special_tokens=skip)
        after = decode(self.tokens[start:end], skip_special_tokens=skip)
        return after[len(before) :]

    def _decode(self) -> None:
        new = self._window_text(self._prefix, len(self.tokens))
        if new and not new.endswith(REPLACEMENT):  # an incomplete character waits for its remaining bytes
            self._append(new)
            self._prefix, self._read = self._read, len(self.tokens)

    def _append(self, new: str) -> None:
        """Add decoded text, cut before the first stop string it completes."""
        hits = [at for at in (m.feed(new) for m in self.matchers) if at is not None]
        self.text += new
        if hits:
            self.text, self.stopped = self.text[: len(self.text) - len(new) + min(hits)], True

    def _release(self, end: int) -> str:
        delta = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return delta
