"""`Engine`: online generation with per-head KV storage, pages on demand, preemption and CUDA graphs.

    engine = rlkv.Engine(model, tok, method=rlkv.methods.HeadSplit(keep, sink=16, recent=64), kv_budget="20GiB")
    outs = engine.generate(prompts, temperature=0.6, top_p=0.95, max_new_tokens=8192, seed=0)   # batch
    engine.add_request("r1", prompt_ids, SamplingParams(max_tokens=512)); outputs = engine.step()  # online

Requests are added at any time (`add_request`) and aborted at any time (`abort_request`: its slot
and pages go back at once); each `step()` is one iteration of the loop and reports the tokens read
back for every request, finished ones with their `Completion`:
1. make room: every running sequence gets the page its next token needs; if the pool is short, the
   steps in flight are read back first (finished sequences give pages back), then the most recently
   admitted requests are preempted (`rlkv.engine.scheduler`);
2. admit waiting requests while the pool keeps a watermark free (not in a step that preempted);
3. decode: launch one step for every running request (forward, sampling and log-probs, on CUDA one
   graph replay of the step compiled when the engine was built: `rlkv.engine.compiled`); its input
   tokens are the previous step's outputs, still on the device;
4. read back the steps before it, while it runs: append their tokens; finished requests (EOS, stop
   string or id, max tokens, degenerate repetition) leave, and their slot and pages go back;
5. prefill: admitted requests' contexts, packed whole in one row or in chunks (`rlkv.engine.runner`);
   a request whose context is done samples its first token and joins the next decode step. A request
   for n samples is prefilled once: the other n - 1 are forked from it there (each shares its full
   pages, copies its last page and ring: `Store.share` / `Store.fork`) and sample their first tokens
   from the same logits, each with its own seed.
So the host's work for step k overlaps the device's for step k + 1, and nothing waits for the device
but that read-back. A request is known to be finished one step late: the step launched meanwhile
computes one token for it that is dropped. Sampling depends only on (seed, token index, the
request's own logits), so a request's tokens do not depend on what runs beside it, nor on being
preempted and prefilled again. The engine keeps the model's attention only while it has work.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial

import torch
from tqdm.auto import tqdm

from rlkv.engine.attention import attention
from rlkv.engine.compiled import compile_by_default, failure
from rlkv.engine.kv import parse_bytes, upload
from rlkv.engine.logits import Top
from rlkv.engine.request import (
    Completion,
    Request,
    RequestError,
    RequestLimits,
    RequestOutput,
    SamplingParams,
    TokenLogprobs,
    before_stop,
)
from rlkv.engine.runner import Runner
from rlkv.engine.runtime import Gated, Setup, runtime_for
from rlkv.engine.scheduler import Scheduler
from rlkv.engine.stats import EngineMetrics, EngineStats
from rlkv.hf.plumbing import patched
from rlkv.methods.headsplit import HeadSplit
from rlkv.methods.tokendrop import TokenDrop
from rlkv.models import Layout, eos_ids
from rlkv.precision import check_kv_dtype, precisions

ENGINE_SETTINGS = ("auto", "on", "off")
STOP_TAIL = 64  # tokens decoded to look for stop strings
log = logging.getLogger("rlkv.engine")


def check_setting(setting: str) -> str:
    """`setting` if it is one of ENGINE_SETTINGS, else a one-line error."""
    if setting not in ENGINE_SETTINGS:
        raise ValueError(f"engine must be 'auto', 'on' or 'off', got {setting!r}")
    return setting


def engine_for(setting: str, model, tokenizer, method=None, **engine_kwargs) -> Engine | None:
    """An Engine when `setting` asks for one ("on", or "auto" with the model on CUDA); None means the
    transformers path ("off", or "auto" on a CPU)."""
    if check_setting(setting) == "off" or (setting == "auto" and next(model.parameters()).device.type != "cuda"):
        return None
    return Engine(model, tokenizer, method, **engine_kwargs)


def engine_kv_dtype(method, kv_dtype: str | None) -> str:
    """The engine's KV precision policy: `kv_dtype`, the method's, or bf16; refused where the two differ."""
    own = getattr(method, "kv_dtype", None)
    if kv_dtype is not None and own is not None and check_kv_dtype(kv_dtype) != own:
        raise ValueError(
            f"the method stores K/V at kv_dtype {own!r} but the engine was given {kv_dtype!r}: give it in one place"
        )
    return check_kv_dtype(kv_dtype or own or "bf16")


@dataclass
class _Step:
    """Tokens sampled on the device for `requests` (row order), on their way to the host."""

    requests: list[Request]
    tokens: torch.Tensor  # device [n]: each row's next input
    host_tokens: torch.Tensor  # the same and the log-probs, copied to the host asynchronously
    host_logprobs: torch.Tensor
    host_top: Top  # the top log-probs' ids and values [n, k], if asked for
    ready: torch.cuda.Event | None  # recorded after the copies (None on a CPU: nothing is asynchronous)


class Engine:
    """Generation engine for a transformers Llama / Mistral / Qwen2 / Qwen3 model (see module doc)."""

    def __init__(
        self,
        model,
        tokenizer,
        method: HeadSplit | TokenDrop | Gated | None = None,
        kv_budget=None,
        max_batch: int = 256,
        page_size: int = 16,
        max_seq_len: int | None = None,
        prefill_tokens: int = 4096,
        cuda_graphs: bool | None = None,
        kernel: bool | None = None,
        compile: bool | None = None,
        sequence_tokens: int | None = None,
        admission: str = "demand",
        watermark: float = 0.01,
        kv_dtype: str | None = None,
    ):
        """`kv_budget`: bytes, a size string ("20GiB") or a share of free GPU memory (default 0.8 on CUDA).
        `sequence_tokens`: prompt + new tokens of a typical request. With a head-split method, each
        running sequence owns a sink + recent ring allocated up front; given this, there are only as
        many rings as the budget holds sequences of that length (at most `max_batch`), so the memory
        of rings that could never be used goes to pages. `admission`: "demand" (pages as sequences
        grow, preemption when the pool runs dry; admitted while `watermark` of the pool stays free) or
        "reserve" (every page a request could need, up front: the former policy, for comparison).
        `compile` (default: on CUDA unless RLKV_COMPILE=0): the decode step's forward and sampling compiled
        with torch.compile around the engine's attention (`rlkv.engine.compiled`), here, once, with a progress
        bar; the CUDA graphs then replay the compiled step (should the compiler fail, the engine says why and runs
        eagerly: `Engine.compile` is then False; or, if only a sampling mode's graph failed, that mode samples
        eagerly: `Engine.runner.eager_modes`). `cuda_graphs` and `kernel` default to on CUDA too.
        `kv_dtype`: how K/V are stored ("bf16": the model's dtype, "fp8", "fp8-kept": `rlkv.precision`);
        None: the method's (`HeadSplit.kv_dtype`, `TokenDrop.kv_dtype`), else bf16. FP8 halves a token's
        bytes, so the same `kv_budget` holds twice the tokens."""
        self.model, self.tokenizer = model, tokenizer
        self.layout = Layout.of(model)
        self.device = next(model.parameters()).device
        cuda = self.device.type == "cuda"
        self.method = method
        for name, value, low in (
            ("max_batch", max_batch, 1),
            ("page_size", page_size, 1),
            ("prefill_tokens", prefill_tokens, 1),
            *([("sequence_tokens", sequence_tokens, 1)] if sequence_tokens is not None else []),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.max_seq_len = max_seq_len or max(32768, getattr(model.config, "max_position_embeddings", 0) or 0)
        budget = parse_bytes(kv_budget if kv_budget is not None else (0.8 if cuda else "1GiB"), self.device)
        dtype = next(model.parameters()).dtype
        self.kv_dtype = engine_kv_dtype(method, kv_dtype)
        self.kernel = cuda if kernel is None else kernel
        runtime = runtime_for(
            method,
            Setup(
                self.layout,
                budget,
                max_batch,
                page_size,
                self.max_seq_len,
                sequence_tokens,
                self.device,
                dtype,
                self.kernel,
                precisions(model, self.kv_dtype),
            ),
        )
        self.store, self.state = runtime.store, runtime.state
        self.cuda_graphs = runtime.graphs if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not runtime.graphs:
            raise ValueError(
                "cuda_graphs needs a CUDA model and, for head-split methods, the Triton kernel (kernel=True)"
            )
        self.max_batch = max_batch
        self.compile = (cuda and compile_by_default()) if compile is None else compile
        paged = self.store.pages_for(1) > 0
        self.limits = RequestLimits(
            model.config.get_text_config().vocab_size,
            self.max_seq_len,
            self.store.page_size if paged else 0,
            self.store.capacity_pages,
            min(max_batch, self.store.num_slots - 1),
        )
        self.scheduler = Scheduler(self.store, max_batch, admission, watermark)
        args = (model, self.state, self.store, self.device, max_batch, prefill_tokens, self.cuda_graphs)
        self._new_runner = partial(Runner, *args, runtime.whole_prompts)
        self.runner = self._new_runner(compile=self.compile)
        self.stats = EngineStats()
        self._model_eos: frozenset[int] | None = None
        self._requests: dict[str, list[Request]] = {}  # unfinished samples, by request id
        self._arrivals = 0
        self._prefilling: list[Request] = []
        self._running: list[Request] = []  # the rows of the next decode step, in the order of `_feed`
        self._feed: torch.Tensor | None = None  # device [len(_running)]: each row's next input token
        self._pending: deque[_Step] = deque()  # launched, not read back yet
        self._outputs: list[RequestOutput] = []
        self._totals = {"generated": 0, "prompt": 0, "finished": 0}
        self._session: ExitStack | None = None  # the model's attention is the engine's while it has work
        if self.compile:
            self._compile_step()

    def _compile_step(self) -> None:
        """Compile the decode step (and capture its graphs) now. Should the compiler fail, say why (the whole
        traceback, to stderr) and run eagerly, as RLKV_COMPILE=0 would: a long job goes on at the eager step's
        speed rather than dying before its first request."""
        self._open()
        try:
            with torch.inference_mode():
                self.runner.warm_up()
        except Exception as err:  # inductor, Triton and dynamo raise many types
            log.warning(
                "rlkv: compiling the decode step failed (%s); running it eagerly (RLKV_COMPILE=0 skips compiling)",
                failure(err),
                exc_info=err,
            )
            self.compile = False
            self.runner = self._new_runner(compile=False)
        finally:
            self._close()

    # ------------------------------------------------------------------ requests
    @property
    def model_eos(self) -> frozenset[int]:
        if self._model_eos is None:
            self._model_eos = frozenset(eos_ids(self.model, self.tokenizer))
        return self._model_eos

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise `RequestError` if the request could never run here (`limits`: reads only what never changes)."""
        self.limits.check(prompt_ids, params)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request (its `params.n` samples); `step()` reports their tokens. Raises `RequestError` if it
        could never run."""
        if request_id in self._requests:
            raise RequestError(f"a request with id {request_id!r} is already running")
        prompt_ids = [int(t) if hasattr(t, "__index__") and not isinstance(t, bool) else t for t in prompt_ids]
        self.check_request(prompt_ids, params)
        eos = (frozenset() if params.ignore_eos else self.model_eos) | frozenset(params.stop_token_ids)
        samples = [Request(request_id, prompt_ids, params.sample(i), eos, self._arrivals, i) for i in range(params.n)]
        first = samples[0]
        first.forks = samples[1:]
        for fork in first.forks:
            fork.parent = first
        self._arrivals += 1
        self._requests[request_id] = samples
        self._totals["prompt"] += len(prompt_ids)
        self.scheduler.add(first)

    def abort_request(self, request_id: str, index: int | None = None) -> bool:
        """Stop a request (every sample, or sample `index`) now: slots and pages go back at once; False if it is
        unknown or finished. A sample whose forks wait for its prefill gives its slot back once they are forked."""
        samples = [r for r in self._requests.get(request_id, []) if index is None or r.index == index]
        for req in reversed(samples):  # forks before the sample they wait for
            if req.parent is not None:  # waiting to be forked: it holds a slot and pages, nothing stored
                parent, req.parent = req.parent, None
                parent.forks.remove(req)
                self.scheduler.release(req)
                if parent.finish is not None and not parent.forks:  # aborted before, kept for its forks alone
                    self._drop(parent)
            elif not req.forks:
                self._drop(req)
            self._finish(req, "abort")  # a running row leaves at the next step; its token in flight is dropped
        if not self._requests:
            self._close()
        return bool(samples)

    def _drop(self, req: Request) -> None:
        """An aborted sequence gives back its slot and pages, wherever it is."""
        if not self.scheduler.remove_waiting(req):
            self.scheduler.release(req)
        if req in self._prefilling:
            self._prefilling.remove(req)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def metrics(self) -> EngineMetrics:
        s = self.store
        total = s.capacity_pages if s.capacity_pages else s.num_slots - 1
        free = s.free_pages if s.capacity_pages else s.free_slots
        return EngineMetrics(
            running=len(self.scheduler.admitted),
            waiting=len(self.scheduler.waiting),
            pages_total=total,
            pages_used=total - free,
            preemptions=self.scheduler.preemptions,
            generated_tokens=self._totals["generated"],
            prompt_tokens=self._totals["prompt"],
            finished_requests=self._totals["finished"],
            recomputed_tokens=self.scheduler.recomputed_tokens,
            kv_pool_bytes=s.nbytes(),
            kv_bytes_used=int(
                sum(
                    int(s.sequence_nbytes(r.length if r.prefilled else r.stored)) for r in list(self.scheduler.admitted)
                )
            ),
        )

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[RequestOutput]:
        """One iteration of the loop (see the module docstring); the outputs of the tokens it read back."""
        if not self._requests:
            return self._take_outputs()
        self._open()
        tick, generated = time.perf_counter(), self.stats.generated_tokens
        with torch.inference_mode():
            self._prune()
            preempted = self._make_room()
            if not preempted:
                self._prefilling += self.scheduler.admit()
            loaded = bool(self.scheduler.waiting)
            if self._running:
                self.stats.max_running = max(self.stats.max_running, len(self._running))
                self.store.flush()
                assert self._feed is not None, "running requests have their next inputs"
                self._pending.append(self._launched(self._running, *self.runner.decode(self._running, self._feed)))
                self._feed = self._pending[-1].tokens
            while len(self._pending) > bool(self._running):  # read back all but the step just launched
                self._collect(self._pending.popleft())
            if self._prefilling:
                self._prefill()
        if loaded:  # the read-back waited for the device, so the host clock includes its work
            self.stats.loaded_seconds += time.perf_counter() - tick
            self.stats.loaded_tokens += self.stats.generated_tokens - generated
        if not self._requests:
            self._close()
        return self._take_outputs()

    def _prune(self) -> None:
        """Rows that need no more decode steps (finished, aborted, or every token sampled) leave the batch."""
        keep = [i for i, r in enumerate(self._running) if r.finish is None and not r.exhausted]
        if len(keep) < len(self._running):
            self._running = [self._running[i] for i in keep]
            assert self._feed is not None, "running requests have their next inputs"
            self._feed = self._feed[upload(keep, torch.long, self.device)] if keep else None

    def _make_room(self) -> bool:
        """Pages for every running request's next token; True if requests had to be preempted for them."""
        before, recomputed = self.scheduler.preemptions, self.scheduler.recomputed_tokens
        if self.scheduler.shortfall(self._running):
            while self._pending:  # read back what is in flight: finished requests give their pages back
                self._collect(self._pending.popleft())
            self._prune()
            if self.scheduler.preempt_for(self._running):
                self._prefilling = [r for r in self._prefilling if r.slot >= 0]
                self._running = [r for r in self._running if r.slot >= 0]
            # everything is read back: the next inputs are on the host
            self._feed = (
                upload([r.tokens[-1] for r in self._running], torch.long, self.device) if self._running else None
            )
        self.scheduler.grow(self._running)
        self.stats.preemptions += self.scheduler.preemptions - before
        self.stats.recomputed_tokens += self.scheduler.recomputed_tokens - recomputed
        return self.scheduler.preemptions > before

    def _prefill(self) -> None:
        self.store.flush()
        done = self.runner.prefill(self._prefilling)
        self._prefilling = [r for r in self._prefilling if not r.prefilled]
        if done is None:
            return
        samplers, tokens, logprobs, top = done
        for req in [r for r in samplers if r.parent is None]:  # the prefilled contexts (forks wait for them)
            self.store.name_pages(req.pages, req.context)
            self._fork(req)
        going = [i for i, req in enumerate(samplers) if req.finish is None and req.params.max_tokens]
        for req in samplers:
            if req.finish is not None:  # aborted while its forks waited for this prefill
                self.scheduler.release(req)
            elif not req.params.max_tokens:  # it asked for its prompt's log-probs alone
                self.scheduler.release(req)
                self._finish(req, "length")
        if len(going) < len(samplers):
            rows = upload(going, torch.long, self.device)
            samplers, tokens, logprobs = [samplers[i] for i in going], tokens[rows], logprobs[rows]
            top = None if top is None else (top[0][rows], top[1][rows])
        if samplers:
            self._pending.append(self._launched(samplers, tokens, logprobs, top))
            self._running += samplers
            self._feed = tokens if self._feed is None or not len(self._feed) else torch.cat([self._feed, tokens])

    def _fork(self, req: Request) -> None:
        """Its forks (if any) take copies of what they do not share of its prefilled prompt, and its prompt's
        log-probs."""
        for fork in req.forks:
            self.store.fork(req.slot, req.pages, fork.slot, fork.pages, len(req.context))
            fork.stored, fork.parent = len(fork.context), None
            fork.scored, fork.prompt_parts = req.scored, req.prompt_parts
        req.forks = []

    def _launched(
        self, requests: list[Request], tokens: torch.Tensor, logprobs: torch.Tensor, top: Top = None
    ) -> _Step:
        """The step that sampled `tokens` for `requests`, with their copy to the host started."""
        for req in requests:
            req.sampled += 1
        if self.device.type != "cuda":
            return _Step(requests, tokens, tokens, logprobs, top, None)
        ready = torch.cuda.Event()
        step = _Step(
            requests,
            tokens,
            tokens.to("cpu", non_blocking=True),
            logprobs.to("cpu", non_blocking=True),
            None if top is None else (top[0].to("cpu", non_blocking=True), top[1].to("cpu", non_blocking=True)),
            ready,
        )
        ready.record()
        return step

    def _collect(self, step: _Step) -> None:
        """Read a step's tokens back (waiting for the device), append them, and retire finished requests."""
        if step.ready is not None:
            step.ready.synchronize()
        tops = zip(*(t.tolist() for t in step.host_top)) if step.host_top is not None else None
        for req, token, lp in zip(step.requests, step.host_tokens.tolist(), step.host_logprobs.tolist()):
            top = next(tops) if tops is not None else None
            if req.finish is not None:  # finished a step earlier (or aborted): computed meanwhile, dropped
                continue
            req.tokens.append(token)
            req.logprobs.append(lp)
            if req.params.top_logprobs:
                assert top is not None, "a step with a request asking for top log-probs computed them"
                req.top_logprobs.append(list(zip(*(row[: req.params.top_logprobs] for row in top))))
            self.stats.generated_tokens += 1
            self._totals["generated"] += 1
            finish = req.finished_by(lambda: self.tokenizer.decode(req.tokens[-STOP_TAIL:]))  # noqa: B023 (called at once)
            if finish is not None:
                self.scheduler.release(req)
                self._finish(req, finish)
            else:
                self._report(req)

    def _report(self, req: Request, completion: Completion | None = None) -> None:
        start, req.reported = req.reported, len(req.tokens)
        top = req.top_logprobs[start:] if req.params.top_logprobs else None
        self._outputs.append(
            RequestOutput(
                req.id,
                req.tokens[start:],
                completion is not None,
                req.finish,
                completion,
                len(req.prompt),
                index=req.index,
                logprobs=TokenLogprobs([*req.logprobs[start:]], top),
                prompt_logprobs=self._prompt_logprobs(req) if not start else None,
                request_finished=req.id not in self._requests,
            )
        )

    def _prompt_logprobs(self, req: Request) -> TokenLogprobs | None:
        """The log-probs of its prompt, read back from where its prefill left them (once)."""
        k = req.params.prompt_logprobs
        if k is None or req.prompt_logprobs is not None:
            return req.prompt_logprobs
        req.prompt_logprobs = TokenLogprobs([None], [[]] if k else None)
        for values, top in req.prompt_parts:
            top = [list(zip(*pair)) for pair in zip(*(t.tolist() for t in top))] if k else None
            req.prompt_logprobs += TokenLogprobs(values.tolist(), top)
        return req.prompt_logprobs

    def _finish(self, req: Request, reason: str) -> None:
        req.finish = reason
        samples = self._requests.get(req.id, [])
        if req in samples:
            samples.remove(req)
        if not samples and self._requests.pop(req.id, None) is not None:
            self._totals["finished"] += 1
        self._report(req, self._completion(req))

    def _completion(self, req: Request) -> Completion:
        assert req.finish is not None, "a completion is made once its request finished"
        text = self.tokenizer.decode(req.tokens, skip_special_tokens=True)
        if req.finish == "stop":
            text = before_stop(text, req.params.stop)
        n = max(len(req.prompt) + len(req.tokens) - 1, 0)  # the last token is sampled, never stored
        return Completion(
            len(req.prompt),
            list(req.tokens),
            text,
            req.finish,
            list(req.logprobs),
            kv_bytes=int(self.store.sequence_nbytes(n)),
            kv_bytes_full=n * self.layout.kv_bytes_per_token(),
            top_logprobs=list(req.top_logprobs) if req.params.top_logprobs else None,
            prompt_logprobs=self._prompt_logprobs(req),
        )

    def _take_outputs(self) -> list[RequestOutput]:
        outputs, self._outputs = self._outputs, []
        return outputs

    def _open(self) -> None:
        if self._session is None:
            self._session = ExitStack()
            self._session.enter_context(patched(self.model, "rlkv_engine", attention, self.state))

    def _close(self) -> None:
        """No work left: drain the steps in flight and give the model its own attention back."""
        for step in self._pending:
            if step.ready is not None:
                step.ready.synchronize()
        self._pending.clear()
        self._running, self._feed, self._prefilling = [], None, []
        if self._session is not None:
            session, self._session = self._session, None
            session.close()

    # ------------------------------------------------------------------ batch convenience
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
        """Complete every prompt (strings, used as is with no special tokens added, or lists of token ids).

        Request i samples with seed `seed + i` (or `seed[i]`): its output does not depend on the
        other requests. `eos_token_ids` replaces the model's EOS ids ([] never stops early).
        `repetition_window` > 0 stops a request whose last `repetition_window` tokens hold fewer
        than `repetition_min_distinct` distinct ids (checked every window). `on_complete(i,
        completion)` is called as soon as request i finishes (e.g. to save it).
        """
        if isinstance(prompts, str) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings or of token-id lists")
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [int(seed) + i for i in range(len(prompts))]
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        params = [
            SamplingParams(
                max_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                seed=s,
                stop=tuple(stop or ()),
                ignore_eos=eos_token_ids is not None,
                stop_token_ids=tuple(eos_token_ids or ()),
                repetition_window=repetition_window,
                repetition_min_distinct=repetition_min_distinct,
            )
            for s in seeds
        ]
        ids = self._checked_prompts(prompts, params)
        keys = [f"generate-{self._arrivals}-{i}" for i in range(len(ids))]
        index = {key: i for i, key in enumerate(keys)}
        bar = tqdm(total=len(ids), desc="generate", disable=not progress, dynamic_ncols=True)
        start = self._begin_stats(ids)
        done: dict[str, Completion] = {}
        try:
            for key, p, sp in zip(keys, ids, params):
                self.add_request(key, p, sp)
            while len(done) < len(keys):
                for out in self.step():
                    if out.finished and out.request_id in index:
                        assert out.completion is not None, "a finished request's output carries its completion"
                        done[out.request_id] = out.completion
                        bar.update(1)
                        if on_complete is not None:
                            on_complete(index[out.request_id], out.completion)
        finally:  # an interrupted call gives its slots and pages back: the engine stays usable
            for key in keys:
                self.abort_request(key)
            self._take_outputs()
        bar.close()
        self._end_stats(start)
        return [done[key] for key in keys]

    def _checked_prompts(self, prompts, params: list[SamplingParams]) -> list[list[int]]:
        """Every prompt's token ids, each checked (`check_request`) before any is queued."""
        ids = [
            self.tokenizer(p, add_special_tokens=False).input_ids if isinstance(p, str) else [int(t) for t in p]
            for p in prompts
        ]
        for i, (p, sp) in enumerate(zip(ids, params)):
            if not p:
                raise RequestError(f"prompt {i} is empty")
            try:
                self.check_request(p, sp)
            except RequestError as err:
                raise RequestError(f"prompt {i}: {err}") from None
        return ids

    def _begin_stats(self, ids: list[list[int]]) -> float:
        """Fresh `stats` for a generate call over `ids`; returns its start time."""
        self.stats = EngineStats(
            requests=len(ids),
            prompt_tokens=sum(map(len, ids)),
            pool_bytes=self.store.nbytes(),
            pages=self.store.capacity_pages,
        )
        self.runner.decode_steps = self.runner.prefill_forwards = 0
        self.store.peak_pages_used = 0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return time.perf_counter()

    def _end_stats(self, start: float) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.stats.peak_memory = torch.cuda.max_memory_allocated(self.device)
        self.stats.seconds = time.perf_counter() - start
        self.stats.peak_pages_used = self.store.peak_pages_used
        self.stats.decode_steps, self.stats.prefill_forwards = self.runner.decode_steps, self.runner.prefill_forwards
