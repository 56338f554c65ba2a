"""A request's life in the engine: what it asks for, the state it carries, and when it is done.

`SamplingParams` is what a caller sets per request (validated up front, one line per mistake, against
`BOUNDS` and the stop-string limits, which the HTTP server's schema declares too);
`Request` is the engine's record of it (slot, pages, how much of its context is stored, the
tokens read back so far); `RequestOutput` is what one engine step reports; `Completion` is the
finished result. A request preempted for memory keeps its tokens: its context to prefill again is
its prompt plus what it generated, and its next token is drawn with the same (seed, index) noise,
so its output equals an uninterrupted run's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

FINISH_REASONS = ("eos", "stop", "length", "repetition", "abort")


INT64_MAX = 2**63 - 1
MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_CHARS = 4096  # all of a request's stop strings together: what a stream may hold back
MAX_STOP_TOKEN_IDS = 64


@dataclass(frozen=True)
class Bound:
    """The allowed values of one numeric request field: checked by `SamplingParams`, declared by the HTTP schema."""

    low: float
    high: float | None = None
    low_open: bool = False  # `low` itself is excluded
    integer: bool = True
    note: str = ""

    def holds(self, value) -> bool:
        if not (_is_int(value) if self.integer else _is_number(value)):
            return False
        return (value > self.low if self.low_open else value >= self.low) and (self.high is None or value <= self.high)

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.high is None:
            text = f"{kind} {'>' if self.low_open else '>='} {self.low}"
        else:
            text = f"{kind} in {'(' if self.low_open else '['}{self.low}, {self.high}]"
        return f"{text} ({self.note})" if self.note else text

    def schema(self) -> dict:
        """pydantic's `Field` bounds."""
        return {"gt" if self.low_open else "ge": self.low, **({} if self.high is None else {"le": self.high})}


BOUNDS = {
    "max_tokens": Bound(1, INT64_MAX),
    "temperature": Bound(0, integer=False, note="0 = greedy"),
    "top_p": Bound(0, 1, low_open=True, integer=False),
    "top_k": Bound(0, INT64_MAX, note="0 = off; at most the vocabulary size"),
    "seed": Bound(0, INT64_MAX),
    "repetition_window": Bound(0, INT64_MAX),
    "repetition_min_distinct": Bound(1, INT64_MAX),
}
"""The numeric fields of `SamplingParams` (an engine's own limits, `RequestLimits`, are checked on top)."""
TOKEN_ID = Bound(0, INT64_MAX)


def stop_problem(stop) -> str | None:
    """What is wrong with a request's stop strings (None: nothing): at most `MAX_STOP_STRINGS` non-empty
    strings of `MAX_STOP_CHARS` characters in all, so matching them stays cheap."""
    if len(stop) > MAX_STOP_STRINGS:
        return f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stop)}"
    if not all(isinstance(s, str) and s for s in stop):
        return "stop strings must be non-empty strings"
    if sum(map(len, stop)) > MAX_STOP_CHARS:
        return f"the stop strings may hold {MAX_STOP_CHARS} characters in all, got {sum(map(len, stop))}"
    return None


class RequestError(ValueError):
    """A request the engine can never run (empty, too long for the context or the KV pool, bad ids);
    `param`: the request field to blame, if one is."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class RequestLimits:
    """What decides whether a request could ever run on an engine; none of it changes while the engine runs,
    so a server in another process checks requests with it before it sends them."""

    vocab_size: int
    max_seq_len: int
    page_size: int  # tokens per KV page (0: sequences hold no pages)
    capacity_pages: int  # pages the pool holds for sequences

    def pages_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.page_size) if self.page_size else 0

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise `RequestError` if the request could never run."""
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be a SamplingParams, got {type(params).__name__}")
        if not prompt_ids:
            raise RequestError("the prompt is empty: expected at least one token")
        vocab = self.vocab_size
        if not all(type(t) is int for t in prompt_ids) or min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            bad = next(t for t in prompt_ids if type(t) is not int or not 0 <= t < vocab)
            raise RequestError(
                f"prompt token {bad!r} is not a token id: expected integers in [0, {vocab})", param="prompt"
            )
        if params.top_k > vocab:
            raise RequestError(
                f"top_k must be in [0, {vocab}] (0 = off; {vocab}: the vocabulary), got {params.top_k}", "top_k"
            )
        bad = next((t for t in params.stop_token_ids if t >= vocab), None)
        if bad is not None:
            raise RequestError(
                f"stop token {bad} is not a token id: expected integers in [0, {vocab})", "stop_token_ids"
            )
        if len(prompt_ids) >= self.max_seq_len:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens: at most max_seq_len - 1 = {self.max_seq_len - 1} fit",
                param="prompt",
            )
        need = len(prompt_ids) + params.max_tokens
        if need > self.max_seq_len:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens; with max_tokens={params.max_tokens} it needs "
                f"{need} > max_seq_len={self.max_seq_len}: at most max_tokens={self.max_seq_len - len(prompt_ids)}",
                param="max_tokens",
            )
        pages = self.pages_for(need)
        if pages > self.capacity_pages:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens; with max_tokens={params.max_tokens} it needs "
                f"{pages} pages of {self.page_size} tokens but the KV pool holds {self.capacity_pages}: "
                "raise kv_budget or lower max_tokens",
                param="max_tokens" if self.pages_for(len(prompt_ids) + 1) <= self.capacity_pages else "prompt",
            )


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops; the defaults are greedy with the model's EOS ids.

    `seed` is the request's own: its k-th token is drawn with noise that depends only on (seed, k),
    so its tokens never depend on the requests beside it. `repetition_window` > 0 turns on the
    paper's degenerate-repetition stop: at every multiple of that many tokens, fewer than
    `repetition_min_distinct` distinct ids among the last window end the request.
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    repetition_window: int = 0
    repetition_min_distinct: int = 40

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        for name, bound in BOUNDS.items():
            if not bound.holds(getattr(self, name)):
                raise ValueError(f"{name} must be {bound.describe()}, got {getattr(self, name)!r}")
        if (problem := stop_problem(self.stop)) is not None:
            raise ValueError(f"stop: {problem}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS or not all(map(TOKEN_ID.holds, self.stop_token_ids)):
            raise ValueError(
                f"stop_token_ids must be at most {MAX_STOP_TOKEN_IDS} token ids ({TOKEN_ID.describe()}), "
                f"got {self.stop_token_ids!r}"[:300]
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filtered(self) -> bool:
        """Whether sampling needs the top-k / top-p filter (a sort of the vocabulary)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Completion:
    """One generated sequence.

    `kv_bytes` is the K/V it held at its end under its method: a kept head holds every token, a
    compressed head a ring of sink + recent slots allocated whole from the first token (plus the
    ring's positions), a token dropper at most its budget per head. `kv_bytes_full` is what an
    uncompressed cache holds for the same tokens. So a sequence shorter than sink + recent tokens
    (80 by default) holds more than a full cache, `kv_bytes > kv_bytes_full`: its rings are not full
    yet. The savings start past that length and approach the sparsity as the sequence grows.
    """

    prompt_tokens: int
    tokens: list[int]
    text: str
    finish: str  # eos | stop | length | repetition | abort
    logprobs: list[float]  # log p of each generated token under the model's raw logits
    kv_bytes: int  # K/V this sequence held at its end: its kept heads' tokens and its ring
    kv_bytes_full: int  # what an uncompressed cache holds for the same tokens


@dataclass
class RequestOutput:
    """What one engine step reports for one request: its new tokens, and its completion once finished.
    `text`: the new text, where a server's stream decoded it (`rlkv.serve`); the engine leaves it empty."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    completion: Completion | None
    prompt_tokens: int
    text: str = ""


def before_stop(text: str, stop) -> str:
    """`text` up to the first of the `stop` strings it holds (all of it if none): a stopped answer's text."""
    return text[: min((text.find(s) for s in stop if s in text), default=len(text))]


def degenerate(tokens: list[int], window: int, min_distinct: int) -> bool:
    """The degenerate-repetition stop (the paper's): at every multiple of `window` generated tokens,
    true when the last `window` hold fewer than `min_distinct` distinct ids; `window` 0 turns it off.
    The engine and the transformers path (`rlkv.generation.RepetitionStop`) both stop by it."""
    return bool(window) and len(tokens) % window == 0 and len(set(tokens[-window:])) < min_distinct


@dataclass(eq=False)  # requests are compared by identity
class Request:
    """The engine's record of one request (see the module docstring)."""

    id: str
    prompt: list[int]
    params: SamplingParams
    eos: frozenset[int]  # ids that end it (the model's unless ignore_eos, plus params.stop_token_ids)
    order: int  # arrival order: preempted requests resume in it
    context: list[int] = field(default_factory=list)  # what to prefill: the prompt, + its tokens after a preemption
    slot: int = -1
    pages: list[int] = field(default_factory=list)
    stored: int = 0  # tokens of `context` whose K/V are stored
    sampled: int = 0  # tokens sampled on the device so far; `tokens` holds those read back
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    reported: int = 0  # tokens already handed out in a RequestOutput
    preemptions: int = 0
    finish: str | None = None

    def __post_init__(self):
        self.context = list(self.prompt)

    @property
    def prefilled(self) -> bool:
        return self.stored == len(self.context)

    @property
    def length(self) -> int:
        """Tokens whose K/V the next decode step needs stored: the prompt and every sampled token but the newest."""
        return len(self.prompt) + self.sampled

    @property
    def exhausted(self) -> bool:
        """Every token it may generate is sampled: no decode step needs it again (its last one may be in flight)."""
        return self.sampled >= self.params.max_tokens

    def finished_by(self, tail_text) -> str | None:
        """Its finish reason after its latest token, or None; `tail_text()` decodes its last tokens (stop strings)."""
        p, tokens = self.params, self.tokens
        if tokens[-1] in self.eos:
            return "eos"
        if p.stop and any(s in tail_text() for s in p.stop):
            return "stop"
        if degenerate(tokens, p.repetition_window, p.repetition_min_distinct):
            return "repetition"
        if len(tokens) >= p.max_tokens:
            return "length"
        return None

    def preempted(self) -> None:
        """Back to waiting: its context is prompt + tokens, prefilled again from scratch."""
        self.context = self.prompt + self.tokens
        self.stored, self.sampled, self.slot, self.pages = 0, len(self.tokens), -1, []
        self.preemptions += 1
