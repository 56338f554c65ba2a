"""`rlkv.generate`: complete prompts under a compression method on either runtime, with one result type.

    method = rlkv.methods.build("rlkv", rlkv.Layout.of(model), 0.5, heads="heads.json")
    outs = rlkv.generate(model, tok, prompts, method, max_new_tokens=512, temperature=0.6, top_p=0.95)
    outs[0].text, outs[0].finish, outs[0].kv_bytes / outs[0].kv_bytes_full

The runtimes give the same `rlkv.engine.Completion`s:
- `rlkv.Engine` (continuous batching, per-head paged KV, CUDA graphs): `engine="on"`, or "auto"
  with the model on a GPU, or an Engine of your own (it runs the method it was built with);
- transformers `generate` inside the method's cache (`method.apply(model)`, `Gated` rollouts too;
  the model's own cache without a method): `engine="off"`, or "auto" on a CPU;
  prompts go in batches of `batch_size`, left-padded.
Both stop by the same rules (EOS ids, stop strings, the degenerate-repetition stop, the token
limit) with the same finish reasons, and report the log-prob of every token under the raw logits
and the KV bytes the sequence held at its end (its cache's own `sequence_nbytes`).

Seeds: the engine draws request i with `seed + i` (or `seed[i]`), whatever runs beside it;
transformers `generate` draws from the torch RNG, seeded with `seed` when it is one number and
left as it is with a list (per-request seeds are the engine's).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from rlkv.engine import Completion, Engine, SamplingParams, degenerate, engine_for
from rlkv.engine.engine import STOP_TAIL
from rlkv.engine.request import before_stop
from rlkv.models import Layout, eos_ids, generated_end

FINISH_ORDER = ("eos", "stop", "repetition")  # which reason a token that meets several is given (the engine's)


def generate(
    model,
    tokenizer,
    prompts,
    method=None,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | list[int] = 0,
    stop: list[str] | None = None,
    eos_token_ids: list[int] | None = None,
    repetition_window: int = 0,
    repetition_min_distinct: int = 40,
    engine="auto",
    kv_budget=None,
    max_batch: int | None = None,
    batch_size: int = 32,
    progress: bool = False,
    on_complete=None,
) -> list[Completion]:
    """Complete every prompt (strings, used as is with no special tokens added, or lists of token ids).

    `method`: a HeadSplit, TokenDrop or Gated (None: a full cache). `engine`: "auto", "on", "off" or
    an `rlkv.Engine`; `kv_budget` and `max_batch` size a new engine, `batch_size` is the prompts per
    transformers `generate` call. `eos_token_ids` replaces the model's EOS ids; `repetition_window` > 0
    stops a sequence whose last window holds fewer than `repetition_min_distinct` distinct ids.
    `on_complete(i, completion)` is called as soon as prompt i is done (e.g. to save it).
    """
    runner = generator(
        model, tokenizer, method, engine=engine, kv_budget=kv_budget, max_batch=max_batch, batch_size=batch_size
    )
    return runner.generate(
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=stop,
        eos_token_ids=eos_token_ids,
        repetition_window=repetition_window,
        repetition_min_distinct=repetition_min_distinct,
        progress=progress,
        on_complete=on_complete,
    )


def generator(
    model, tokenizer, method=None, *, engine="auto", kv_budget=None, max_batch: int | None = None, batch_size: int = 32
) -> Engine | Transformers:
    """What `generate` runs on: `engine` itself when it is an Engine, a new Engine when the setting asks for
    one ("on", or "auto" with the model on CUDA), else transformers `generate` (`Transformers`)."""
    if isinstance(engine, Engine):
        if method is not None and method is not engine.method:
            raise ValueError(
                "an Engine runs the method it was built with: pass method=None (or that very method) "
                "with engine=Engine(...), or an engine setting ('auto', 'on', 'off') with the method"
            )
        return engine
    if not isinstance(engine, str):
        raise ValueError(f"engine must be 'auto', 'on', 'off' or an rlkv.Engine, got {engine!r}")
    sizes = {} if max_batch is None else {"max_batch": max_batch}
    runner = engine_for(engine, model, tokenizer, method, kv_budget=kv_budget, **sizes)
    return runner if runner is not None else Transformers(model, tokenizer, method, batch_size)


@runtime_checkable
class HeldBytes(Protocol):
    """What a cache tells of its bytes: those one sequence of `num_tokens` tokens holds (per sequence)."""

    def sequence_nbytes(self, num_tokens: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Uncompressed:
    """The bytes law of transformers' own cache, which holds every token of every head."""

    per_token: int

    def sequence_nbytes(self, num_tokens: torch.Tensor) -> torch.Tensor:
        return num_tokens * self.per_token


class Transformers:
    """`Engine.generate` over transformers `generate`: `batch_size` prompts at a time, left-padded, inside
    the method's runtime. `store` is the cache of the latest batch: its `sequence_nbytes(tokens)` is the
    bytes one sequence of that many tokens holds there (as `Engine.store`'s is in the engine)."""

    def __init__(self, model, tokenizer, method=None, batch_size: int = 32):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.model, self.tokenizer, self.method, self.batch_size = model, tokenizer, method, batch_size
        self.layout = Layout.of(model)
        self.store: HeldBytes = Uncompressed(self.layout.kv_bytes_per_token())

    def generate(
        self,
        prompts,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | list[int] = 0,
        stop: list[str] | None = None,
        eos_token_ids: list[int] | None = None,
        repetition_window: int = 0,
        repetition_min_distinct: int = 40,
        progress: bool = False,
        on_complete=None,
    ) -> list[Completion]:
        """As `Engine.generate` (see the module docstring for seeds)."""
        ids = prompt_ids(self.tokenizer, prompts)
        params = SamplingParams(
            max_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stop=tuple(stop or ()),
            repetition_window=repetition_window,
            repetition_min_distinct=repetition_min_distinct,
        )  # checked as the engine checks them
        eos = list(eos_token_ids) if eos_token_ids is not None else eos_ids(self.model, self.tokenizer)
        if isinstance(seed, (list, tuple)):
            if len(seed) != len(ids):
                raise ValueError(f"got {len(seed)} seeds for {len(ids)} prompts")
        else:
            SamplingParams(seed=seed)  # an integer
            torch.manual_seed(seed)
        out: list[Completion] = []
        bar = tqdm(total=len(ids), desc="generate", disable=not progress, dynamic_ncols=True)
        for start in range(0, len(ids), self.batch_size):
            for completion in self._batch(ids[start : start + self.batch_size], params, eos):
                if on_complete is not None:
                    on_complete(len(out), completion)
                out.append(completion)
            bar.update(min(self.batch_size, len(ids) - start))
        bar.close()
        return out

    def _batch(self, ids: list[list[int]], params: SamplingParams, eos: list[int]) -> list[Completion]:
        """One `generate` call over `ids`, read back as completions."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (eos or [0])[0]
        width = max(map(len, ids))
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(ids):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        device = next(self.model.parameters()).device
        stops = Stops(width, params, self.tokenizer, eos)
        sampling = (
            {"do_sample": False}
            if params.greedy
            else {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k}
        )
        with self._runtime() as runtime, _raw_logits(self.model) as logits:
            stops.logits = logits
            seqs = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=params.max_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
                stopping_criteria=StoppingCriteriaList([stops]),
                **sampling,
            )
        cache = getattr(runtime, "cache", None)
        if isinstance(cache, HeldBytes):
            self.store = cache
        generated = seqs[:, width:].cpu()
        ends = [stops.end(row, generated[row], eos) for row in range(len(ids))]
        held = torch.tensor([max(len(p) + n - 1, 0) for p, (n, _) in zip(ids, ends)])  # the last token is never stored
        kv = self.store.sequence_nbytes(held).tolist()
        logprobs = torch.stack(stops.logprobs, dim=1).cpu() if stops.logprobs else torch.zeros(len(ids), 0)
        return [
            self._completion(
                prompt,
                generated[row, :n].tolist(),
                finish,
                logprobs[row, :n].tolist(),
                int(kv[row]),
                int(held[row]) * self.layout.kv_bytes_per_token(),
                params,
            )
            for row, (prompt, (n, finish)) in enumerate(zip(ids, ends))
        ]

    def _completion(self, prompt, tokens, finish, logprobs, kv_bytes, kv_bytes_full, params) -> Completion:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if finish == "stop":  # as the engine's
            text = before_stop(text, params.stop)
        return Completion(len(prompt), tokens, text, finish, logprobs, kv_bytes=kv_bytes, kv_bytes_full=kv_bytes_full)

    def _runtime(self):
        """The block `generate` runs in: the method's cache and attention (none for a full cache)."""
        if self.method is None:
            return nullcontext()
        return self.method.apply(self.model)


def prompt_ids(tokenizer, prompts) -> list[list[int]]:
    """Token ids of every prompt, as the engine reads them: a string with no special tokens added, a list as is."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings or of token-id lists")
    ids = [
        tokenizer(p, add_special_tokens=False).input_ids if isinstance(p, str) else [int(t) for t in p] for p in prompts
    ]
    empty = next((i for i, p in enumerate(ids) if not p), None)
    if empty is not None:
        raise ValueError(f"prompt {empty} is empty")
    return ids


@contextmanager
def _raw_logits(model):
    """Inside the block, `box["logits"]` holds the last position's raw logits [b, vocab] of the latest forward."""
    box = {}
    hook = model.register_forward_hook(lambda module, args, output: box.__setitem__("logits", output.logits[:, -1]))
    try:
        yield box
    finally:
        hook.remove()


class RepetitionStop(StoppingCriteria):
    """`rlkv.engine.degenerate` for transformers `generate`: rows it flags stop, and `flagged` maps
    each to the tokens it had generated then (the first time: a finished row's padding can look degenerate too)."""

    def __init__(self, prompt_len: int, window: int, min_distinct: int):
        self.prompt_len, self.window, self.min_distinct = prompt_len, window, min_distinct
        self.flagged: dict[int, int] = {}

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.Tensor:
        generated = input_ids.shape[1] - self.prompt_len
        if not self.window or generated == 0 or generated % self.window:  # between checks: no copy to the host
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        done = [
            degenerate(tokens, self.window, self.min_distinct) for tokens in input_ids[:, self.prompt_len :].tolist()
        ]
        for row in (row for row, stop in enumerate(done) if stop):
            self.flagged.setdefault(row, generated)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class Stops(StoppingCriteria):
    """The engine's stop rules beyond EOS (transformers' own) for one `generate` call: stop strings in the
    decoded last `STOP_TAIL` tokens and the repetition stop, each row's first hit kept; and the log-prob
    of every sampled token under the raw logits (`logits`, filled by `_raw_logits`)."""

    def __init__(self, prompt_len: int, params: SamplingParams, tokenizer, eos: list[int]):
        self.prompt_len, self.stop, self.tokenizer, self.eos = prompt_len, params.stop, tokenizer, set(eos)
        self.repetition = RepetitionStop(prompt_len, params.repetition_window, params.repetition_min_distinct)
        self.stopped: dict[int, int] = {}  # row -> tokens generated when a stop string appeared
        self.ended: set[int] = set()  # rows past their EOS
        self.logits: dict = {}
        self.logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.Tensor:
        logits = self.logits["logits"].float()
        token = input_ids[:, -1:]
        self.logprobs.append((logits.gather(-1, token) - logits.logsumexp(-1, keepdim=True))[:, 0])
        done = self.repetition(input_ids, scores)
        if self.stop:
            done = done | self._stop_strings(input_ids)
        return done

    def _stop_strings(self, input_ids: torch.LongTensor) -> torch.Tensor:
        generated = input_ids.shape[1] - self.prompt_len
        tails = input_ids[:, max(self.prompt_len, input_ids.shape[1] - STOP_TAIL) :].tolist()
        for row, tail in enumerate(tails):
            if tail[-1] in self.eos:
                self.ended.add(row)  # what follows is padding
            elif (
                row not in self.stopped
                and row not in self.ended
                and any(s in self.tokenizer.decode(tail) for s in self.stop)
            ):
                self.stopped[row] = generated
        return torch.tensor([row in self.stopped for row in range(len(tails))], device=input_ids.device)

    def end(self, row: int, tokens: torch.Tensor, eos: list[int]) -> tuple[int, str]:
        """(tokens generated, finish reason) of `row`: its first stop of any kind, ties going as in the engine."""
        flags = [
            (at, reason)
            for reason, at in (("stop", self.stopped.get(row)), ("repetition", self.repetition.flagged.get(row)))
            if at is not None
        ]
        first = min(flags, key=lambda f: (f[0], FINISH_ORDER.index(f[1])), default=None)
        n, finish = generated_end(tokens, torch.tensor(eos, dtype=torch.long), first[0] if first else None)
        return n, first[1] if first is not None and finish == "repetition" else finish
