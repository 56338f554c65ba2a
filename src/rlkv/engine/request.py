"""A request's life in the engine: what it asks for, the state it carries, and when it is done.

`SamplingParams` is what a caller sets per request (validated up front, one line per mistake, against
`BOUNDS` and the stop-string limits, which the HTTP server's schema declares too);
`Request` is the engine's record of one sequence (slot, pages, how much of its context is stored, the
tokens read back so far): a request for `n` samples is n of them, sample i drawn with seed `seed + i`;
the first is prefilled and the others are forked from it (`forks`). `RequestOutput` is what one engine
step reports for one sample; `Completion` is a finished sample; `TokenLogprobs` the log-probs of a run
of tokens. A request preempted for memory keeps its tokens: its context to prefill again is its prompt
plus what it generated, and its next token is drawn with the same (seed, index) noise, so its output
equals an uninterrupted run's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

FINISH_REASONS = ("eos", "stop", "length", "repetition", "abort")


INT64_MAX = 2**63 - 1
MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_CHARS = 4096  # all of a request's stop strings together: what a stream may hold back
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20  # OpenAI's limit on top log-probs per token
MAX_SAMPLES = 128  # OpenAI's limit on n
MAX_CHOICES = 256  # prompts x n of one request to the HTTP server (each prompt is an engine request)


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
    "max_tokens": Bound(0, INT64_MAX, note="0: only the prompt's log-probs"),
    "n": Bound(1, MAX_SAMPLES),
    "temperature": Bound(0, integer=False, note="0 = greedy"),
    "top_p": Bound(0, 1, low_open=True, integer=False),
    "top_k": Bound(0, INT64_MAX, note="0 = off; at most the vocabulary size"),
    "seed": Bound(0, INT64_MAX),
    "min_tokens": Bound(0, INT64_MAX, note="at most max_tokens"),
    "repetition_penalty": Bound(0, 100, low_open=True, integer=False, note="1 = off"),
    "frequency_penalty": Bound(-2, 2, integer=False),
    "presence_penalty": Bound(-2, 2, integer=False),
    "top_logprobs": Bound(0, MAX_LOGPROBS),
    "repetition_window": Bound(0, INT64_MAX),
    "repetition_min_distinct": Bound(1, INT64_MAX),
}
"""The numeric fields of `SamplingParams` (an engine's own limits, `RequestLimits`, are checked on top)."""
PROMPT_LOGPROBS = Bound(0, MAX_LOGPROBS, note="None = off")
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
    max_sequences: int = INT64_MAX  # sequences that run at once (slots and max_batch): a request's n samples do

    def pages_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.page_size) if self.page_size else 0

    def fork_pages(self, prompt_tokens: int) -> int:
        """Pages a sample forked from a prompt of `prompt_tokens` tokens needs of its own to start: all but the
        prompt's full pages, which it shares."""
        return self.pages_for(prompt_tokens + 1) - (prompt_tokens // self.page_size if self.page_size else 0)

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
        if params.n > self.max_sequences:
            raise RequestError(
                f"n={params.n} samples run at once, but at most {self.max_sequences} sequences do here", "n"
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
        start = self.pages_for(len(prompt_ids) + 1) + (params.n - 1) * self.fork_pages(len(prompt_ids))
        if start > self.capacity_pages:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens; its n={params.n} samples need {start} pages of "
                f"{self.page_size} tokens to start but the KV pool holds {self.capacity_pages}: raise kv_budget or "
                "lower n",
                param="n",
            )


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops; the defaults are greedy with the model's EOS ids.

    `seed` is the request's own: its k-th token is drawn with noise that depends only on (seed, k),
    so its tokens never depend on the requests beside it. `n` samples share the prompt (one prefill);
    sample i draws with seed `seed + i` (mod 2**63), so it equals a request of that seed alone.
    Before sampling, as vLLM orders them: `min_tokens` keeps EOS and `stop_token_ids` out until that
    many tokens are generated; `repetition_penalty` (> 1 penalises) scales the logits of every token
    of the prompt and the output so far (divides a positive logit, multiplies a negative one), then
    `frequency_penalty` and `presence_penalty` subtract per occurrence / once per output token.
    Log-probs are the model's, before all of that and before temperature, top-k and top-p (vLLM's
    default, `raw_logprobs`): every generated token's own, plus its `top_logprobs` most likely
    alternatives; `prompt_logprobs` (None: off) asks the same of every prompt token, from the prefill.
    `max_tokens` 0 computes only the prompt's log-probs. `repetition_window` > 0 turns on the paper's
    degenerate-repetition stop: at every multiple of that many tokens, fewer than
    `repetition_min_distinct` distinct ids among the last window end the request.
    """

    max_tokens: int = 256
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    top_logprobs: int = 0
    prompt_logprobs: int | None = None
    repetition_window: int = 0
    repetition_min_distinct: int = 40

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        for name, bound in BOUNDS.items():
            if not bound.holds(getattr(self, name)):
                raise ValueError(f"{name} must be {bound.describe()}, got {getattr(self, name)!r}")
        if self.prompt_logprobs is not None and not PROMPT_LOGPROBS.holds(self.prompt_logprobs):
            raise ValueError(f"prompt_logprobs must be {PROMPT_LOGPROBS.describe()}, got {self.prompt_logprobs!r}")
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            raise ValueError("max_tokens must be >= 1 (0 only with prompt_logprobs: the prompt's log-probs alone)")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be at most max_tokens={self.max_tokens}, got {self.min_tokens}")
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
        """Whether sampling needs the top-k / top-p filter (a top-k selection, or a sort of the vocabulary)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1)

    @property
    def penalized(self) -> bool:
        """Whether the logits are penalised for the tokens seen so far."""
        return self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0

    def sample(self, index: int) -> SamplingParams:
        """The parameters of sample `index` of the request: one sample, drawn with seed `seed + index`."""
        return replace(self, n=1, seed=(self.seed + index) % 2**63)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class TokenLogprobs:
    """Log-probs of a run of tokens under the model's raw logits: each token's own (None for a prompt's first
    token, which nothing predicts) and, where asked for, the most likely tokens at its position as
    (id, log-prob), best first."""

    values: list[float | None] = field(default_factory=list)
    top: list[list[tuple[int, float]]] | None = None

    def __add__(self, other: TokenLogprobs) -> TokenLogprobs:
        top = None if self.top is None or other.top is None else self.top + other.top
        return TokenLogprobs(self.values + other.values, top)

    def __len__(self) -> int:
        return len(self.values)


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
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token, if SamplingParams.top_logprobs
    prompt_logprobs: TokenLogprobs | None = None  # if SamplingParams.prompt_logprobs is set


@dataclass
class RequestOutput:
    """What one engine step reports for one sample of a request: its new tokens with their log-probs, and its
    completion once finished; the prompt's log-probs (if asked for) come with its first output.
    `request_finished`: every sample of the request has finished. `text`: the new text, where a server's
    stream decoded it (`rlkv.serve`); the engine leaves it empty."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    completion: Completion | None
    prompt_tokens: int
    text: str = ""
    index: int = 0  # which of the request's n samples
    logprobs: TokenLogprobs = field(default_factory=TokenLogprobs)
    prompt_logprobs: TokenLogprobs | None = None
    request_finished: bool = True


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
    """The engine's record of one sequence: one sample of a request (see the module docstring)."""

    id: str
    prompt: list[int]
    params: SamplingParams  # this sample's: `SamplingParams.sample(index)`
    eos: frozenset[int]  # ids that end it (the model's unless ignore_eos, plus params.stop_token_ids)
    order: int  # arrival order: preempted requests resume in it
    index: int = 0  # which of the request's samples
    context: list[int] = field(default_factory=list)  # what to prefill: the prompt, + its tokens after a preemption
    slot: int = -1
    pages: list[int] = field(default_factory=list)
    stored: int = 0  # tokens of `context` whose K/V are stored
    sampled: int = 0  # tokens sampled on the device so far; `tokens` holds those read back
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    scored: int = 0  # prompt tokens whose log-probs its prefill computed (the first, which has none, included)
    prompt_parts: list = field(default_factory=list)  # those log-probs on the device: (values, top or None) runs
    prompt_logprobs: TokenLogprobs | None = None  # the same on the host, once reported
    forks: list[Request] = field(default_factory=list)  # samples to fork from it once its prefill is done
    parent: Request | None = None  # the sample it waits to be forked from
    reported: int = 0  # tokens already handed out in a RequestOutput
    preemptions: int = 0
    finish: str | None = None

    def __post_init__(self):
        self.context = list(self.prompt)
        self.scored = int(self.params.prompt_logprobs is not None)

    @property
    def samplers(self) -> list[Request]:
        """The sequences that sample from the logits of its context's last token: itself and its forks."""
        return [self, *self.forks]

    def unscored(self, start: int, end: int) -> range:
        """Positions in [start, end) whose logits give prompt tokens' log-probs not computed yet."""
        if self.params.prompt_logprobs is None:
            return range(0)
        return range(max(start, self.scored - 1), min(end, len(self.prompt) - 1))

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
        """Back to waiting: its context is prompt + tokens, prefilled again from scratch (a sample waiting to be
        forked is then prefilled on its own)."""
        if self.parent is not None:
            self.parent.forks.remove(self)
            self.parent = None
        self.context = self.prompt + self.tokens
        self.stored, self.sampled, self.slot, self.pages = 0, len(self.tokens), -1, []
        self.preemptions += 1
