"""OpenAI's log-prob shapes from the engine's `TokenLogprobs`: chat's `logprobs.content` entries (token, log-prob,
UTF-8 bytes, top alternatives) and the legacy completions object (text offsets, tokens, log-probs, and the most
likely tokens with the chosen one as {text: log-prob}, None for a prompt's first token).

Each token's text is the token decoded alone, as vLLM's are (cached: at most one entry per vocabulary id). The
log-probs are the engine's: under the model's raw logits, before penalties and temperature
(`rlkv.engine.logits`); -inf is sent as -9999.0 (vLLM's floor: JSON has no infinity).
"""

from __future__ import annotations

from functools import lru_cache

from rlkv.engine.request import TokenLogprobs
from rlkv.serve.protocol import CompletionLogprobs, TokenLogprob, TopLogprob

FLOOR = -9999.0


def _finite(value: float) -> float:
    return max(value, FLOOR)


class LogprobTexts:
    """Token texts for log-probs (one tokenizer's), and the OpenAI objects made of them."""

    def __init__(self, tokenizer):
        self.text = lru_cache(maxsize=None)(lambda token: tokenizer.decode([token]))

    def _top(self, token: int, value: float) -> TopLogprob:
        text = self.text(token)
        return TopLogprob(token=text, logprob=_finite(value), bytes=list(text.encode()))

    def chat(self, ids: list[int], logprobs: TokenLogprobs) -> list[TokenLogprob]:
        """Chat's entries for the tokens `ids` (generated tokens: none is a prompt's first)."""
        tops = logprobs.top or [[]] * len(ids)
        entries = []
        for token, value, top in zip(ids, logprobs.values, tops):
            assert value is not None, "a generated token has a log-prob (only a prompt's first has none)"
            entries.append(
                TokenLogprob(**dict(self._top(token, value)), top_logprobs=[self._top(t, v) for t, v in top])
            )
        return entries

    def completion(self, ids: list[int], logprobs: TokenLogprobs, offset: int) -> CompletionLogprobs:
        """The legacy object for the tokens `ids` whose text starts `offset` characters into the choice's text."""
        out = CompletionLogprobs()
        tops = logprobs.top or [[]] * len(ids)
        for token, value, top in zip(ids, logprobs.values, tops):
            text = self.text(token)
            out.tokens.append(text)
            out.text_offset.append(offset)
            offset += len(text)
            if value is None:  # a prompt's first token: nothing predicts it
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(_finite(value))
            out.top_logprobs.append({**{self.text(t): _finite(v) for t, v in top}, text: _finite(value)})
        return out
