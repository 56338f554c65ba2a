"""The OpenAI-compatible wire format: request, response and stream-chunk models (pydantic v2).

Requests are strict (JSON types are not coerced: "5" is not a number) and closed (an unknown field
is an error, as with OpenAI's API), so a client never gets a silently ignored option. Fields the
server accepts but cannot honour except at their neutral value (`n`, `logprobs`, penalties, `echo`,
`best_of`, `suffix`) are refused with a message naming them. Extensions beyond OpenAI's fields,
as in vLLM: `top_k`, `stop_token_ids`, `ignore_eos`. Every bound comes from `rlkv.engine.request`
(`BOUNDS`, the stop-string limits), the one place `SamplingParams` checks them too; what depends on
the served engine (top_k and token ids against the vocabulary, lengths against the context) is its
`RequestLimits`' to check, after tokenizing.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

from rlkv.engine.request import BOUNDS, MAX_STOP_TOKEN_IDS, TOKEN_ID, stop_problem


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Request):
    include_usage: bool = False  # a last chunk (no choices) with the request's usage


class _Sampling(_Request):
    """The fields chat and plain completions share."""

    model: Optional[str] = None  # None: the served model
    max_tokens: Optional[int] = Field(None, **BOUNDS["max_tokens"].schema())  # None: the default, cut to the context
    temperature: float = Field(1.0, allow_inf_nan=False, **BOUNDS["temperature"].schema())  # OpenAI's; 0 = greedy
    top_p: float = Field(1.0, allow_inf_nan=False, **BOUNDS["top_p"].schema())
    top_k: int = Field(0, **BOUNDS["top_k"].schema())  # extension; 0 = off
    seed: Optional[int] = Field(None, **BOUNDS["seed"].schema())  # None: a random seed
    stop: Union[str, list[str], None] = Field(None, validate_default=True)  # validated into a list
    stop_token_ids: list[Annotated[int, Field(**TOKEN_ID.schema())]] = Field(
        default_factory=list, max_length=MAX_STOP_TOKEN_IDS
    )  # extension
    ignore_eos: bool = False  # extension: generate max_tokens tokens
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    user: Optional[str] = None  # metadata, unused

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError(f"n must be 1 (one choice per request; send n requests instead), got {v}")
        return v

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, v: float) -> float:
        if v != 0:
            raise ValueError(f"penalties are not supported (only 0), got {v}")
        return v

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
    max_completion_tokens: Optional[int] = Field(None, **BOUNDS["max_tokens"].schema())  # OpenAI's newer max_tokens
    logprobs: bool = False
    top_logprobs: Optional[int] = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool) -> bool:
        if v:
            raise ValueError("logprobs are not supported")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, v):
        if v:
            raise ValueError("top_logprobs are not supported")
        return v

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    logprobs: Optional[int] = None
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        """A string or a list of token ids; a batch of one is unwrapped, a larger batch refused."""
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) > 1:
                raise ValueError(f"a batch of {len(v)} prompts is not supported: send one request per prompt")
            v = v[0]
        if not v:
            raise ValueError("the prompt is empty")
        return v

    @field_validator("logprobs", "suffix", "best_of")
    @classmethod
    def _unsupported(cls, v, info):
        if v is not None and not (info.field_name == "best_of" and v == 1):
            raise ValueError(f"{info.field_name} is not supported")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


# ---------------------------------------------------------------------- responses
def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class UsageInfo(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


FinishReason = Optional[Literal["stop", "length"]]


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(_Response):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


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

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(_Response):
    index: int = 0
    delta: DeltaMessage
    finish_reason: FinishReason = None
    logprobs: None = None


class ChatCompletionChunk(_Response):
    """One server-sent event of a streamed chat completion; the usage chunk has no choices."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[UsageInfo] = None


class CompletionChoice(_Response):
    index: int = 0
    text: str
    finish_reason: FinishReason
    logprobs: None = None


class CompletionResponse(_Response):
    """A plain completion; streamed chunks have the same shape (OpenAI's `text_completion` both ways)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


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
