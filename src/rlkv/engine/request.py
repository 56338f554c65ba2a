"""A request's life in the engine: what it asks for, the state it carries, and when it is done.

`SamplingParams` is what a caller sets per request (validated up front, one line per mistake);
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


class RequestError(ValueError):
    """A request the engine can never run (empty, too long for the context or the KV pool, bad ids)."""


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
        bad = next((t for t in prompt_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"prompt token {bad!r} is not a token id: expected integers in [0, {vocab})")
        need = len(prompt_ids) + params.max_tokens
        if need > self.max_seq_len:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens; with max_tokens={params.max_tokens} it needs "
                f"{need} > max_seq_len={self.max_seq_len}"
            )
        pages = self.pages_for(need)
        if pages > self.capacity_pages:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens; with max_tokens={params.max_tokens} it needs "
                f"{pages} pages of {self.page_size} tokens but the KV pool holds {self.capacity_pages}: "
                "raise kv_budget or lower max_tokens"
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
        checks = (
            ("max_tokens", _is_int(self.max_tokens) and self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", _is_number(self.temperature) and self.temperature >= 0, "a number >= 0 (0 = greedy)"),
            ("top_p", _is_number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("top_k", _is_int(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 = off)"),
            ("seed", _is_int(self.seed), "an integer"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
            ("stop_token_ids", all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "integers >= 0"),
            ("repetition_window", _is_int(self.repetition_window) and self.repetition_window >= 0, "an integer >= 0"),
            (
                "repetition_min_distinct",
                _is_int(self.repetition_min_distinct) and self.repetition_min_distinct >= 1,
                "an integer >= 1",
            ),
        )
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")

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
    """What one engine step reports for one request: its new tokens, and its completion once finished."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    completion: Completion | None
    prompt_tokens: int


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
