"""OpenAI response bodies and stream chunks from the engine's outputs.

A request's outputs arrive as (prompt index, `RequestOutput`) pairs, the samples of its prompts
interleaved; choice `p * n + i` is sample i of prompt p, as OpenAI and vLLM number them. Each `Choice`
turns its outputs into pieces: its text delta (a chat answer split into reasoning and content by a
`rlkv.serve.reasoning` parser; a completion's prompt first when it echoes), the new tokens' log-probs
(`rlkv.serve.logprobs`; an echo's prompt ones too) and its finish reason. Streamed and whole answers are
made of the same pieces, so the deltas concatenate to exactly the whole text. `Usage` counts the prompts
once each and every choice's tokens (and, with a reasoning parser, its reasoning tokens).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

from rlkv.engine.request import RequestOutput, TokenLogprobs
from rlkv.serve import protocol as p
from rlkv.serve.logprobs import LogprobTexts
from rlkv.serve.reasoning import ReasoningParser, ReasoningSplit

FINISH: dict[str, p.FinishReason] = {"eos": "stop", "stop": "stop", "repetition": "stop", "length": "length"}


@dataclass
class Piece:
    """What one output adds to its choice."""

    text: str = ""  # a completion's text, a chat answer's content
    reasoning: str = ""
    token_ids: list[int] = field(default_factory=list)  # the tokens the log-probs are of
    logprobs: TokenLogprobs = field(default_factory=TokenLogprobs)
    finish_reason: p.FinishReason = None


class Choice:
    """One choice, as its outputs arrive (see module doc); it keeps the pieces a whole answer is made of."""

    def __init__(self, index: int, prompt_ids: list[int], echo: str | None, split: ReasoningSplit | None):
        self.index, self.prompt_ids, self.echo, self.split = index, prompt_ids, echo, split
        self.pieces: list[Piece] = []
        self.offset = 0  # characters of token text so far: the legacy log-probs' text offsets

    def add(self, out: RequestOutput) -> Piece:
        piece = Piece(out.text, "", list(out.new_token_ids), out.logprobs)
        if self.split is not None:
            piece.reasoning, piece.text = self.split.add(out.text, out.new_token_ids)
            if out.finished:
                reasoning, content = self.split.finish()
                piece.reasoning, piece.text = piece.reasoning + reasoning, piece.text + content
        if self.echo is not None and not self.pieces:  # an echo: the prompt comes first
            piece.text = self.echo + piece.text
            if out.prompt_logprobs is not None:
                piece.token_ids = self.prompt_ids + piece.token_ids
                piece.logprobs = out.prompt_logprobs + piece.logprobs
        if out.finished:
            assert out.finish_reason is not None, "a finished output says why"
            piece.finish_reason = FINISH.get(out.finish_reason, "stop")
        self.pieces.append(piece)
        return piece

    @property
    def text(self) -> str:
        return "".join(piece.text for piece in self.pieces)

    @property
    def reasoning(self) -> str | None:
        return "".join(piece.reasoning for piece in self.pieces) if self.split is not None else None

    @property
    def finish_reason(self) -> p.FinishReason:
        return self.pieces[-1].finish_reason if self.pieces else None


class Usage:
    """Token counts of one request's choices, filled in as their outputs arrive."""

    def __init__(self, prompt_tokens: int, choices: list[Choice], reasoning: bool):
        self.prompt_tokens, self.completion_tokens = prompt_tokens, 0
        self.choices, self.reasoning = choices, reasoning

    @property
    def info(self) -> p.UsageInfo:
        splits = [c.split for c in self.choices if c.split is not None]  # every choice's, with a parser
        reasoning = sum(s.reasoning_tokens for s in splits) if self.reasoning else None
        return p.UsageInfo.of(self.prompt_tokens, self.completion_tokens, reasoning)


@dataclass
class Answer:
    """One request's answer, built from its outputs: its head (id, created, model), its prompts, what it asks for
    (`logprobs`: chat's top count or the completions field, None for none; echoed prompt texts), its choices."""

    head: dict
    prompts: list[list[int]]
    n: int
    texts: LogprobTexts
    logprobs: int | None = None
    echo: list[str] | None = None
    reasoning: ReasoningParser | None = None
    include_usage: bool = False
    continuous_usage: bool = False

    def __post_init__(self):
        self.choices = [
            Choice(
                i * self.n + j,
                prompt,
                None if self.echo is None else self.echo[i],
                None if self.reasoning is None else self.reasoning.split(prompt),
            )
            for i, prompt in enumerate(self.prompts)
            for j in range(self.n)
        ]
        self.usage = Usage(sum(map(len, self.prompts)), self.choices, self.reasoning is not None)

    def _add(self, prompt: int, out: RequestOutput) -> tuple[Choice, Piece]:
        choice = self.choices[prompt * self.n + out.index]
        self.usage.completion_tokens += len(out.new_token_ids)
        return choice, choice.add(out)

    # ------------------------------------------------------------------ chat
    def _chat_logprobs(self, pieces: list[Piece]) -> p.ChatLogprobs | None:
        if self.logprobs is None:
            return None
        return p.ChatLogprobs(content=[e for piece in pieces for e in self.texts.chat(piece.token_ids, piece.logprobs)])

    async def chat_chunks(self, outputs: AsyncIterator) -> AsyncGenerator[p.ChatCompletionChunk, None]:
        def chunk(choice: Choice, delta: p.DeltaMessage, finish=None, logprobs=None) -> p.ChatCompletionChunk:
            choices = [p.ChatChunkChoice(index=choice.index, delta=delta, finish_reason=finish, logprobs=logprobs)]
            usage = self.usage.info if self.continuous_usage else None
            return p.ChatCompletionChunk(**self.head, choices=choices, usage=usage)

        for choice in self.choices:
            yield chunk(choice, p.DeltaMessage(role="assistant", content=""))
        async for prompt, out in outputs:
            choice, piece = self._add(prompt, out)
            logprobs = self._chat_logprobs([piece]) if piece.token_ids else None
            if piece.text or piece.reasoning or logprobs:
                delta = p.DeltaMessage(content=piece.text or None, reasoning_content=piece.reasoning or None)
                yield chunk(choice, delta, logprobs=logprobs)
            if piece.finish_reason:
                yield chunk(choice, p.DeltaMessage(), piece.finish_reason)
        if self.include_usage:
            yield p.ChatCompletionChunk(**self.head, choices=[], usage=self.usage.info)

    async def chat_response(self, outputs: AsyncIterator) -> p.ChatCompletionResponse:
        async for prompt, out in outputs:
            self._add(prompt, out)
        choices = [
            p.ChatCompletionChoice(
                index=c.index,
                message=p.AssistantMessage(
                    content=c.text if c.split is None else c.text or None, reasoning_content=c.reasoning or None
                ),
                finish_reason=c.finish_reason,
                logprobs=self._chat_logprobs(c.pieces),
            )
            for c in self.choices
        ]
        return p.ChatCompletionResponse(**self.head, choices=choices, usage=self.usage.info)

    # ------------------------------------------------------------------ completions
    def _completion_logprobs(self, choice: Choice, pieces: list[Piece]) -> p.CompletionLogprobs | None:
        if self.logprobs is None:
            return None
        merged = p.CompletionLogprobs()
        for piece in pieces:
            part = self.texts.completion(piece.token_ids, piece.logprobs, choice.offset)
            choice.offset += sum(map(len, part.tokens))
            for name in ("text_offset", "token_logprobs", "tokens", "top_logprobs"):
                getattr(merged, name).extend(getattr(part, name))
        return merged

    async def completion_chunks(self, outputs: AsyncIterator) -> AsyncGenerator[p.CompletionResponse, None]:
        def chunk(choice: Choice, text: str, finish=None, logprobs=None) -> p.CompletionResponse:
            choices = [p.CompletionChoice(index=choice.index, text=text, finish_reason=finish, logprobs=logprobs)]
            usage = self.usage.info if self.continuous_usage else None
            return p.CompletionResponse(**self.head, choices=choices, usage=usage)

        async for prompt, out in outputs:
            choice, piece = self._add(prompt, out)
            logprobs = self._completion_logprobs(choice, [piece]) if piece.token_ids else None
            if piece.text or logprobs:
                yield chunk(choice, piece.text, logprobs=logprobs)
            if piece.finish_reason:
                yield chunk(choice, "", piece.finish_reason)
        if self.include_usage:
            yield p.CompletionResponse(**self.head, choices=[], usage=self.usage.info)

    async def completion_response(self, outputs: AsyncIterator) -> p.CompletionResponse:
        async for prompt, out in outputs:
            self._add(prompt, out)
        choices = [
            p.CompletionChoice(
                index=c.index,
                text=c.text,
                finish_reason=c.finish_reason,
                logprobs=self._completion_logprobs(c, c.pieces),
            )
            for c in self.choices
        ]
        return p.CompletionResponse(**self.head, choices=choices, usage=self.usage.info)
