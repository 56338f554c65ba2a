"""Reasoning content: a chat answer's `<think> ... </think>` part as `reasoning_content`, the rest as `content`.

`rlkv serve --reasoning-parser deepseek-r1` (or `qwen3`) splits each chat choice's text as vLLM's parsers
of those names do: a leading `<think>` is dropped (R1-style templates put it in the prompt, so the model may
never write it), everything before `</think>` is reasoning, everything after it is the answer; an answer
cut before `</think>` is all reasoning. `qwen3` differs where the prompt already closed the thinking (Qwen3
with `enable_thinking=False` templates `<think>\n\n</think>` into it): the whole answer is content.
Text is split as it streams, holding back only a tail that could still become a tag. Both tags must be
tokens of the model's vocabulary (as vLLM requires); the reasoning tokens of a choice are those up to and
including `</think>` (all of them if it never came), what `usage.completion_tokens_details` reports.
"""

from __future__ import annotations

from collections.abc import Sequence

START, END = "<think>", "</think>"
PARSERS = ("deepseek-r1", "qwen3")


class ReasoningParser:
    """One server's parser: the tags' token ids; `split(prompt_ids)` starts a choice's `ReasoningSplit`."""

    def __init__(self, name: str, tokenizer):
        if name not in PARSERS:
            raise ValueError(f"reasoning parser must be one of {', '.join(PARSERS)}, got {name!r}")
        vocab = tokenizer.get_vocab()
        missing = [tag for tag in (START, END) if tag not in vocab]
        if missing:
            raise ValueError(f"the {name} reasoning parser needs {' and '.join(missing)} in the tokenizer's vocabulary")
        self.name, self.start_id, self.end_id = name, vocab[START], vocab[END]

    def split(self, prompt_ids: list[int]) -> ReasoningSplit:
        """A choice's splitter: it starts in the answer (content) if the parser is qwen3 and the prompt closed the
        thinking, else in the reasoning."""
        closed = self.name == "qwen3" and _last(prompt_ids, self.end_id) > _last(prompt_ids, self.start_id)
        return ReasoningSplit(self.end_id, reasoning=not closed)


class ReasoningSplit:
    """One choice's text, delta by delta, split into reasoning and content."""

    def __init__(self, end_id: int, reasoning: bool = True):
        self.end_id, self.reasoning = end_id, reasoning
        self.started = not reasoning  # a leading <think> was dropped (or cannot come)
        self.held = ""  # the tail that could still become a tag
        self.tokens = 0  # generated tokens seen
        self.reasoning_tokens = 0

    def add(self, text: str, token_ids: Sequence[int] = ()) -> tuple[str, str]:
        """(reasoning, content) released by the next text delta and the tokens it came from."""
        if self.reasoning:
            end = token_ids.index(self.end_id) + 1 if self.end_id in token_ids else len(token_ids)
            self.reasoning_tokens = self.tokens + end
        self.tokens += len(token_ids)
        if not self.reasoning:
            return "", text
        text, self.held = self.held + text, ""
        if not self.started:
            stripped = text.lstrip()
            if stripped.startswith(START):
                text, self.started = stripped[len(START) :], True
            elif START.startswith(stripped):  # maybe the start of <think>: wait for more
                self.held = text
                return "", ""
            else:
                self.started = True
        at = text.find(END)
        if at >= 0:
            self.reasoning = False
            return text[:at], text[at + len(END) :]
        keep = next((n for n in range(min(len(END) - 1, len(text)), 0, -1) if END.startswith(text[-n:])), 0)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep], ""

    def finish(self) -> tuple[str, str]:
        """(reasoning, content) still held back at the end of the answer."""
        held, self.held = self.held, ""
        return (held, "") if self.reasoning else ("", held)


def _last(ids: list[int], token: int) -> int:
    """Where `token` last occurs in `ids` (-1: nowhere)."""
    return max((i for i, t in enumerate(ids) if t == token), default=-1)
