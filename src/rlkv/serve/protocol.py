"""The OpenAI-compatible wire format: request, response and stream-chunk models (pydantic v2).

Requests are strict (JSON types are not coerced: "5" is not a number) and closed (an unknown field
is an error, as with OpenAI's API), so a client never gets a silently ignored option. Fields the
server accepts but cannot honour except at their neutral value (`best_of` other than n, `suffix`)
are refused with a message naming them. Extensions beyond OpenAI's fields, as vLLM's: `top_k`,
`min_tokens`, `repetition_penalty`, `stop_token_ids`, `ignore_eos`, `skip_special_tokens`,
`stream_options.continuous_usage_stats`. Every bound comes from `rlkv.engine.request` (`BOUNDS`, the
stop-string, prompt and log-prob limits), the one place `SamplingParams` checks them too; what
depends on the served engine (top_k and token ids against the vocabulary, lengths against the
context, n against its sequences) is its `RequestLimits`' to check, after tokenizing.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal, Optional, Union, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from rlkv.engine.request import BOUNDS, MAX_CHOICES, MAX_LOGPROBS, MAX_STOP_TOKEN_IDS, TOKEN_ID, stop_problem


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


def _without(*names: str):
    """A serializer that leaves out the fields `names` while they are None (fields OpenAI sends only when set)."""

    def serialize(self, handler):
        return {k: v for k, v in handler(self).items() if not (k in names and v is None)}

    return model_serializer(mode="wrap")(serialize)


class FieldError(ValueError):
    """A request error found across fields, blamed on `param` (`rlkv.serve.errors` names it)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


def _bounded(name: str, default, **extra):
    """A request field bounded as `SamplingParams` bounds `name` (`rlkv.engine.request.BOUNDS`)."""
    bound = BOUNDS[name]
    return Field(default, **bound.schema(), **({} if bound.integer else {"allow_inf_nan": False}), **extra)


class StreamOptions(_Request):
    include_usage: bool = False  # a last chunk (no choices) with the request's usage
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every chunk carries the usage so far


class _Sampling(_Request):
    """The fields chat and plain completions share."""

    model: Optional[str] = None  # None: the served model
    max_tokens: Optional[int] = _bounded("max_tokens", None)  # None: the default, cut to the context
    temperature: float = _bounded("temperature", 1.0)  # OpenAI's default; 0 = greedy
    top_p: float = _bounded("top_p", 1.0)
    top_k: int = _bounded("top_k", 0)  # extension; 0 = off
    seed: Optional[int] = _bounded("seed", None)  # None: a random seed; sample i draws with seed + i
    stop: Union[str, list[str], None] = Field(None, validate_default=True)  # validated into a list
    stop_token_ids: list[Annotated[int, Field(**TOKEN_ID.schema())]] = Field(
        default_factory=list, max_length=MAX_STOP_TOKEN_IDS
    )  # extension
    ignore_eos: bool = False  # extension: generate max_tokens tokens
    min_tokens: int = _bounded("min_tokens", 0)  # extension: no EOS or stop id before this many tokens
    repetition_penalty: float = _bounded("repetition_penalty", 1.0)  # extension (vLLM's); 1 = off
    skip_special_tokens: bool = True  # extension: special tokens left out of the text
    n: int = _bounded("n", 1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    frequency_penalty: float = _bounded("frequency_penalty", 0.0)
    presence_penalty: float = _bounded("presence_penalty", 0.0)
    user: Optional[str] = None  # metadata, unused

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if (problem := stop_problem(stops)) is not None:
            raise ValueError(problem)
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and bool(self.stream_options and self.stream_options.continuous_usage_stats)

    @property
    def stops(self) -> list[str]:
        """The stop strings (`stop` as validated: a list)."""
        return [self.stop] if isinstance(self.stop, str) else self.stop or []

    @model_validator(mode="after")
    def _lengths(self):
        limit = self.token_limit
        if limit == 0 and not self.scores_prompt:
            raise FieldError(self.limit_field, "must be at least 1 (0 only with echo: the prompt's log-probs)")
        if limit is not None and self.min_tokens > limit:
            raise FieldError("min_tokens", f"must be at most {self.limit_field}={limit}, got {self.min_tokens}")
        return self

    @property
    def scores_prompt(self) -> bool:
        """Whether the request's prompt is scored (its log-probs), which max_tokens 0 may ask for alone."""
        return False

    @property
    def limit_field(self) -> str:
        return "max_tokens"

    @property
    def token_limit(self) -> int | None:
        """The most tokens to generate, as the request asks (None: the server's default)."""
        return self.max_tokens


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = _bounded("max_tokens", None)  # OpenAI's newer max_tokens
    logprobs: bool = False  # each generated token's log-prob
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)  # and its most likely alternatives

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise FieldError("top_logprobs", "needs logprobs set to true")
        return self

    @property
    def limit_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str], list[list[int]]]  # one prompt, or a batch of them
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)  # each token's log-prob and the top ones
    echo: bool = False  # the prompt before the completion (with its log-probs)
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        batch = isinstance(v, list) and bool(v) and isinstance(v[0], (str, list))
        if batch and len(v) > MAX_CHOICES:
            raise ValueError(f"at most {MAX_CHOICES} prompts in a batch, got {len(v)}")
        if not v or (batch and not all(v)):
            raise ValueError("the prompt is empty" if not batch else "a prompt of the batch is empty")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v is not None:
            raise ValueError("suffix is not supported")
        return v

    @model_validator(mode="after")
    def _choices(self):
        if len(self.prompts) * self.n > MAX_CHOICES:
            raise FieldError("n", f"{len(self.prompts)} prompts x n={self.n} exceed {MAX_CHOICES} choices")
        if self.best_of is not None and self.best_of != self.n:
            raise FieldError("best_of", f"only best_of = n ({self.n}) is supported, got {self.best_of}")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """The batch: one prompt (a string or token ids) each."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt[0], int):
            # the validated lists are of one kind: ints here (pyright cannot narrow a union of lists by an item)
            return [cast("list[int]", prompt)]
        return [*cast("list[str] | list[list[int]]", prompt)]

    @property
    def scores_prompt(self) -> bool:
        return self.echo


# ---------------------------------------------------------------------- responses
def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class CompletionTokensDetails(_Response):
    reasoning_tokens: int  # generated inside <think> ... </think> (with a reasoning parser)


class UsageInfo(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: Optional[CompletionTokensDetails] = None

    _serialize = _without("completion_tokens_details")

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None = None) -> UsageInfo:
        details = None if reasoning_tokens is None else CompletionTokensDetails(reasoning_tokens=reasoning_tokens)
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            completion_tokens_details=details,
        )


FinishReason = Optional[Literal["stop", "length"]]


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprob(TopLogprob):
    """A chat token's log-prob and its most likely alternatives (OpenAI's `logprobs.content` entries)."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Response):
    content: Optional[list[TokenLogprob]] = None


class CompletionLogprobs(_Response):
    """OpenAI's legacy completion log-probs: per token, its text offset, text, log-prob (None: a prompt's first
    token) and the most likely tokens with it as {text: log-prob}."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: Optional[str]
    reasoning_content: Optional[str] = None  # with a reasoning parser: the text inside <think> ... </think>

    _serialize = _without("reasoning_content")


class ChatCompletionChoice(_Response):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: Optional[ChatLogprobs] = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(_Response):
    """What a chunk adds to the message; only the fields it carries are sent (the last chunk's is {})."""

    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    reasoning_content: Optional[str] = None

    _serialize = _without("role", "content", "reasoning_content")


class ChatChunkChoice(_Response):
    index: int = 0
    delta: DeltaMessage
    finish_reason: FinishReason = None
    logprobs: Optional[ChatLogprobs] = None


class ChatCompletionChunk(_Response):
    """One server-sent event of a streamed chat completion; the usage chunk has no choices."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[UsageInfo] = None

    _serialize = _without("usage")


class CompletionChoice(_Response):
    index: int = 0
    text: str
    finish_reason: FinishReason
    logprobs: Optional[CompletionLogprobs] = None


class CompletionResponse(_Response):
    """A plain completion; streamed chunks have the same shape (OpenAI's `text_completion` both ways)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None

    _serialize = _without("usage")


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rlkv"
    max_model_len: int


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(_Response):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(_Response):
    error: ErrorInfo
