"""`Engine`: batched generation with per-head KV storage, continuous batching and CUDA graphs.

    engine = rlkv.Engine(model, tok, method=rlkv.methods.HeadSplit(keep, sink=16, recent=64), kv_budget="20GiB")
    outs = engine.generate(prompts, temperature=0.6, top_p=0.95, max_new_tokens=8192, seed=0)

The loop, each iteration:
1. admit waiting requests while a slot is free and the pool has every page the request could
   need (prompt + max_new_tokens): admitted requests can never run out of memory;
2. decode: launch one step for every running request (forward, sampling and log-probs in one
   CUDA graph of the smallest captured batch size that fits; padding rows write to scratch page
   0 / slot 0). Its input tokens are the previous step's outputs, still on the device;
3. read back the steps before it, while it runs: append their tokens; finished requests (EOS,
   stop string, max tokens, degenerate repetition) leave, and their slot and pages go back to
   the pool;
4. prefill: admitted requests' whole prompts, packed into one row of up to `PROMPT_TOKENS`
   tokens padded to a power of two (a CUDA graph per length, so a prefill costs the host one
   launch); a prompt longer than that goes in chunks of at most `prefill_tokens` (so it never
   stalls decoding for long). A request whose prompt is done samples its first token on the
   device and joins the next decode step.
So the host's work for step k (Python bookkeeping, admission, launches) overlaps the device's
work for step k + 1, and nothing in the loop waits for the device except that read-back. A
request is known to be finished one step late: the step launched meanwhile computes one token
for it that is dropped (its position is still inside the pages it reserved). Sampling depends
only on (seed, token index, the request's own logits), so outputs do not change.
The model's own modules run the forward (embeddings, norms, projections, RoPE, MLP); only
attention is the engine's (`rlkv.engine.attention`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate

import torch
from tqdm.auto import tqdm

from rlkv.attention.plumbing import patched
from rlkv.engine.attention import EngineAttention, Prefill, Segment, attention
from rlkv.engine.kv import KVStore, parse_bytes, upload
from rlkv.engine.sampling import sample
from rlkv.engine.tokendrop import TokenDropAttention, TokenDropStore
from rlkv.methods.headsplit import HeadSplit
from rlkv.methods.tokendrop import TokenDrop
from rlkv.models import Layout, eos_ids


ENGINE_SETTINGS = ("auto", "on", "off")
PROMPT_TOKENS = 512  # longest row of whole new prompts prefilled in one packed forward (a CUDA graph per power of two)
PROMPT_ROWS = 32  # most prompts in that row


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


@dataclass
class Gated:
    """RL-rollout mode: every head keeps its full cache; output = alpha * full + (1 - alpha) * streaming.

    `alpha` [layers, kv_heads] is read in place at every step, so training can update it between calls.
    """

    alpha: torch.Tensor
    sink: int = 128
    recent: int = 256


@dataclass
class Completion:
    """One generated sequence."""

    prompt_tokens: int
    tokens: list[int]
    text: str
    finish: str  # eos | length | stop | repetition
    logprobs: list[float]  # log p of each generated token under the model's raw logits
    kv_bytes: int  # K/V this sequence held at its end: its kept heads' tokens and its ring
    kv_bytes_full: int  # what an uncompressed cache holds for the same tokens


@dataclass
class EngineStats:
    """Throughput and memory of the latest `generate` call."""

    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    decode_steps: int = 0
    prefill_forwards: int = 0
    max_running: int = 0
    pool_bytes: int = 0
    pages: int = 0
    peak_pages_used: int = 0
    peak_memory: int = 0  # bytes of GPU memory at the peak (CUDA only)
    loaded_seconds: float = 0.0  # spent while requests waited for room: the KV budget (or max_batch) was the limit
    loaded_tokens: int = 0  # generated in that time

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0

    @property
    def loaded_tokens_per_s(self) -> float | None:
        """Throughput under load (steady serving): free of the ramp-down once the queue is empty,
        whose length depends on how the request count divides into waves. None: nothing ever waited."""
        return self.loaded_tokens / self.loaded_seconds if self.loaded_seconds else None


def degenerate(tokens: list[int], window: int, min_distinct: int) -> bool:
    """The degenerate-repetition stop (the paper's): at every multiple of `window` generated tokens,
    true when the last `window` hold fewer than `min_distinct` distinct ids; `window` 0 turns it off.
    The engine and the transformers path (`rlkv.eval.run.RepetitionStop`) both stop by it."""
    return bool(window) and len(tokens) % window == 0 and len(set(tokens[-window:])) < min_distinct


@dataclass(eq=False)  # requests are compared by identity
class _Request:
    index: int
    prompt: list[int]
    max_new: int
    seed: int
    slot: int = -1
    pages: list[int] = field(default_factory=list)
    stored: int = 0  # prompt tokens whose K/V are stored
    sampled: int = 0  # tokens sampled on the device so far; `tokens` holds those read back
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: str | None = None
    completion: Completion | None = None


@dataclass
class _Step:
    """Tokens sampled on the device for `requests` (row order), on their way to the host."""

    requests: list[_Request]
    tokens: torch.Tensor  # device [n]: each row's next input
    host_tokens: torch.Tensor  # the same and the log-probs, copied to the host asynchronously
    host_logprobs: torch.Tensor
    ready: torch.cuda.Event | None  # recorded after the copies (None on a CPU: nothing is asynchronous)


class Engine:
    """Generation engine for a transformers Llama / Mistral / Qwen2 / Qwen3 model (see module doc)."""

    def __init__(self, model, tokenizer, method: HeadSplit | TokenDrop | Gated | None = None, kv_budget=None,
                 max_batch: int = 256, page_size: int = 16, max_seq_len: int | None = None,
                 prefill_tokens: int = 4096, cuda_graphs: bool | None = None, kernel: bool | None = None,
                 sequence_tokens: int | None = None):
        """`kv_budget`: bytes, a size string ("20GiB") or a share of free GPU memory (default 0.8 on CUDA).
        `sequence_tokens`: prompt + new tokens of a typical request. With a head-split method, each
        running sequence owns a sink + recent ring allocated up front; given this, there are only as
        many rings as the budget holds sequences of that length (at most `max_batch`), so the memory
        of rings that could never be used goes to pages."""
        self.model, self.tokenizer = model, tokenizer
        self.layout = Layout.of(model)
        self.device = next(model.parameters()).device
        cuda = self.device.type == "cuda"
        self.method = method
        for name, value, low in (("max_batch", max_batch, 1), ("page_size", page_size, 1),
                                 ("prefill_tokens", prefill_tokens, 1),
                                 *([("sequence_tokens", sequence_tokens, 1)] if sequence_tokens is not None else [])):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.max_seq_len = max_seq_len or max(32768, getattr(model.config, "max_position_embeddings", 0) or 0)
        budget = parse_bytes(kv_budget if kv_budget is not None else (0.8 if cuda else "1GiB"), self.device)
        dtype = next(model.parameters()).dtype
        self.kernel = cuda if kernel is None else kernel
        # token droppers: a fixed slot per sequence, each prompt prefilled in one piece
        self.whole_prompts = isinstance(method, TokenDrop)
        if self.whole_prompts:
            self.store = TokenDropStore(self.layout, method.policy, budget, max_batch, self.device, dtype)
            self.state = TokenDropAttention(self.store, self.kernel)
            graphs = cuda
        else:
            keep, sink, recent, alpha = self._plan(method)
            self.store = KVStore(self.layout, keep, sink, recent, page_size, budget, max_batch, self.max_seq_len,
                                 self.device, dtype, sequence_tokens)
            self.state = EngineAttention(self.store, self.layout.group_size, alpha, self.kernel)
            graphs = cuda and self.kernel  # the torch decode path reads the longest length on the host
        self.cuda_graphs = graphs if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not graphs:
            raise ValueError("cuda_graphs needs a CUDA model and, for head-split methods, the Triton kernel (kernel=True)")
        self.max_batch, self.prefill_tokens = max_batch, prefill_tokens
        self.stats = EngineStats()
        self._graphs: dict[tuple, tuple] = {}
        # decode batch sizes that get a CUDA graph; a step pads up to the smallest that fits
        self._buckets = sorted({s for s in [1, 2, 4, 8, 16, *range(32, max_batch, 32)] if s < max_batch} | {max_batch})
        self._static = torch.zeros(5, max_batch, dtype=torch.long, device=self.device)  # ids, pos, slots, seeds, steps
        # packed new prompts: per token ids, pos, slots, prompt lengths, seq; per prompt its last token, seed, step
        self._static_prompts = torch.zeros(5, PROMPT_TOKENS, dtype=torch.long, device=self.device)
        self._static_rows = torch.zeros(3, PROMPT_ROWS, dtype=torch.long, device=self.device)
        # one memory pool per kind of graph. Graphs of one pool may reuse each other's intermediate memory, so
        # a replay may overwrite the outputs of the pool's other graphs: a decode step's tokens are read (into
        # the next step's inputs) before the next decode replay, but a prefill replays in between
        self._pools = {kind: torch.cuda.graph_pool_handle() for kind in ("decode", "prompts")} if self.cuda_graphs else {}

    def _plan(self, method):
        shape = self.layout.shape
        if method is None:
            return torch.ones(shape, dtype=torch.bool), 0, 1, None
        if isinstance(method, HeadSplit):
            return method.keep, method.sink, method.recent, None
        if isinstance(method, Gated):
            alpha = method.alpha
            if not isinstance(alpha, torch.Tensor) or tuple(alpha.shape) != shape:
                raise ValueError(f"Gated alpha must be a tensor of shape {shape} (layers x kv_heads)")
            if alpha.device != self.device:
                raise ValueError(f"Gated alpha is on {alpha.device} but the model on {self.device}: the engine reads "
                                 "alpha in place, so keep it on the model's device")
            return torch.ones(shape, dtype=torch.bool), method.sink, method.recent, alpha.detach()
        raise ValueError(
            f"the engine runs head-split methods (HeadSplit: full, streaming, rlkv, duo, random), token-dropping "
            f"methods (TokenDrop: h2o, snapkv, rkv) and Gated rollouts; got {type(method).__name__}"
        )

    # ------------------------------------------------------------------ public API
    def generate(self, prompts, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | list[int] = 0, stop: list[str] | None = None,
                 eos_token_ids: list[int] | None = None, repetition_window: int = 0, repetition_min_distinct: int = 40,
                 progress: bool = False, on_complete: Callable[[int, Completion], None] | None = None,
                 ) -> list[Completion]:
        """Complete every prompt (strings, used as is with no special tokens added, or lists of token ids).

        Request i samples with seed `seed + i` (or `seed[i]`): its output does not depend on the
        other requests. `repetition_window` > 0 stops a request whose last `repetition_window`
        tokens hold fewer than `repetition_min_distinct` distinct ids (checked every window).
        `on_complete(i, completion)` is called as soon as request i finishes (e.g. to save it).
        """
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        requests = self._requests(prompts, max_new_tokens, seed)
        eos = set(eos_token_ids if eos_token_ids is not None else eos_ids(self.model, self.tokenizer))
        done: list[_Request] = []
        waiting, prefilling, running = deque(requests), [], []
        feed = None  # device [len(running)]: each running request's next input token
        pending: deque[_Step] = deque()  # launched, not read back yet
        admitted: set[_Request] = set()  # holding a slot and pages
        self.stats = EngineStats(requests=len(requests), prompt_tokens=sum(len(r.prompt) for r in requests),
                                 pool_bytes=self.store.nbytes(), pages=self.store.capacity_pages)
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        finish = dict(eos=eos, stop=stop or [], window=repetition_window, distinct=repetition_min_distinct,
                      on_complete=on_complete)
        bar = tqdm(total=len(requests), desc="generate", disable=not progress, dynamic_ncols=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            with torch.inference_mode(), patched(self.model, "rlkv_engine", attention, self.state):
                while waiting or prefilling or running or pending:
                    tick, generated = time.perf_counter(), self.stats.generated_tokens
                    while (waiting and len(admitted) < self.max_batch
                           and self.store.can_admit(len(waiting[0].prompt) + waiting[0].max_new)):
                        req = waiting.popleft()
                        req.slot, req.pages = self.store.admit(len(req.prompt) + req.max_new)
                        admitted.add(req)
                        prefilling.append(req)
                    loaded = bool(waiting)
                    if running:
                        self.stats.max_running = max(self.stats.max_running, len(running))
                        pending.append(self._decode(running, feed, sampling))
                        feed = pending[-1].tokens
                    while len(pending) > bool(running):  # read back all but the step just launched
                        self._collect(pending.popleft(), finish, admitted, done, bar)
                    keep = [i for i, r in enumerate(running) if r.finish is None]
                    if len(keep) < len(running):
                        running, feed = [running[i] for i in keep], feed[upload(keep, torch.long, self.device)]
                    if prefilling:
                        first = self._prefill(prefilling, sampling)
                        prefilling = [r for r in prefilling if r.stored < len(r.prompt)]
                        if first is not None:
                            pending.append(first)
                            running += first.requests
                            feed = first.tokens if feed is None or not len(feed) else torch.cat([feed, first.tokens])
                    if loaded:  # the read-back waited for the device, so the host clock includes its work
                        self.stats.loaded_seconds += time.perf_counter() - tick
                        self.stats.loaded_tokens += self.stats.generated_tokens - generated
        finally:  # an interrupted call gives its slots and pages back: the engine stays usable
            for req in admitted:
                self.store.release(req.slot, req.pages)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.stats.peak_memory = torch.cuda.max_memory_allocated(self.device)
        bar.close()
        self.stats.seconds = time.perf_counter() - start
        self.stats.peak_pages_used = self.store.peak_pages_used
        return [r.completion for r in sorted(done, key=lambda r: r.index)]

    # ------------------------------------------------------------------ requests
    def _requests(self, prompts, max_new: int, seed) -> list[_Request]:
        if isinstance(prompts, str) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings or of token-id lists")
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [int(seed) + i for i in range(len(prompts))]
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        requests = []
        for i, p in enumerate(prompts):
            ids = self.tokenizer(p, add_special_tokens=False).input_ids if isinstance(p, str) else [int(t) for t in p]
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            need = len(ids) + max_new
            if need > self.max_seq_len:
                raise ValueError(f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new} it needs "
                                 f"{need} > max_seq_len={self.max_seq_len}")
            if self.store.pages_for(need) > self.store.capacity_pages:
                raise ValueError(
                    f"prompt {i} needs {self.store.pages_for(need)} pages of {self.store.page_size} tokens but the "
                    f"KV pool holds {self.store.capacity_pages}: raise kv_budget or lower max_new_tokens"
                )
            requests.append(_Request(i, ids, max_new, seeds[i]))
        return requests

    def _finished(self, req: _Request, finish: dict) -> str | None:
        tokens = req.tokens
        if tokens[-1] in finish["eos"]:
            return "eos"
        if finish["stop"]:
            tail = self.tokenizer.decode(tokens[-64:])
            if any(s in tail for s in finish["stop"]):
                return "stop"
        if degenerate(tokens, finish["window"], finish["distinct"]):
            return "repetition"
        if len(tokens) >= req.max_new:
            return "length"
        return None

    def _collect(self, step: _Step, finish: dict, admitted: set, done: list, bar) -> None:
        """Read a step's tokens back (waiting for the device), append them, and retire finished requests."""
        if step.ready is not None:
            step.ready.synchronize()
        for req, token, lp in zip(step.requests, step.host_tokens.tolist(), step.host_logprobs.tolist()):
            if req.finish is not None:  # it finished a step earlier: this token was computed meanwhile, dropped
                continue
            req.tokens.append(token)
            req.logprobs.append(lp)
            self.stats.generated_tokens += 1
            req.finish = self._finished(req, finish)
            if req.finish is None:
                continue
            self.store.release(req.slot, req.pages)
            admitted.discard(req)
            req.completion = self._completion(req, finish["stop"])
            done.append(req)
            bar.update(1)
            if finish["on_complete"] is not None:
                finish["on_complete"](req.index, req.completion)

    def _completion(self, req: _Request, stop: list[str]) -> Completion:
        text = self.tokenizer.decode(req.tokens, skip_special_tokens=True)
        if req.finish == "stop":  # the text ends before the first stop string
            text = text[: min((text.find(s) for s in stop if s in text), default=len(text))]
        n = len(req.prompt) + len(req.tokens) - 1  # the last token is sampled, never stored
        return Completion(len(req.prompt), req.tokens, text, req.finish, req.logprobs,
                          kv_bytes=int(self.store.sequence_nbytes(n)), kv_bytes_full=n * self.layout.kv_bytes_per_token())

    # ------------------------------------------------------------------ forwards
    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T', V] of the model's own modules with the engine's attention."""
        decoder = self.model.model
        hidden = decoder.embed_tokens(ids)
        rope = decoder.rotary_emb(hidden, position_ids=pos)
        for layer in decoder.layers:
            hidden = layer(hidden, attention_mask=None, position_ids=pos, position_embeddings=rope)
        hidden = decoder.norm(hidden)
        if rows is not None:
            hidden = hidden[:, rows]
        return self.model.lm_head(hidden)

    def _prefill(self, prefilling: list[_Request], sampling: dict) -> _Step | None:
        """One packed prefill forward: the first tokens of the requests whose prompt it completes (None if none).

        Whole new prompts go together in a row of fixed shape (`_prefill_prompts`); otherwise the
        forward takes up to `prefill_tokens` prompt tokens in chunks (token droppers: whole prompts)."""
        new = [] if self.whole_prompts else self._new_prompts(prefilling)
        if new:
            return self._prefill_prompts(new, sampling)
        segments, ids, pos, owners = [], [], [], []
        used = 0
        for req in prefilling:
            n, room = len(req.prompt) - req.stored, self.prefill_tokens - used
            if self.whole_prompts and used and n > room:  # a whole prompt, alone if it is longer than prefill_tokens
                break
            n = n if self.whole_prompts else min(n, room)
            if n <= 0:
                break
            segments.append(Segment(req.slot, req.pages, req.stored, n, used))
            ids += req.prompt[req.stored : req.stored + n]
            pos += range(req.stored, req.stored + n)
            owners.append(req)
            used += n
        self.state.batch = Prefill(segments)
        complete = [(i, req) for i, (req, seg) in enumerate(zip(owners, segments)) if req.stored + seg.length == len(req.prompt)]
        rows = upload([segments[i].offset + segments[i].length - 1 for i, _ in complete], torch.long, self.device)
        logits = self._forward(upload([ids], torch.long, self.device), upload([pos], torch.long, self.device), rows)[0]
        self.stats.prefill_forwards += 1
        for req, seg in zip(owners, segments):
            req.stored += seg.length
        if not complete:
            return None
        requests = [req for _, req in complete]
        host = upload([[r.seed for r in requests], [r.sampled for r in requests]], torch.long, self.device)
        tokens, logprobs = _pick(logits, host[0], host[1], sampling)
        return self._launched(requests, tokens, logprobs)

    def _new_prompts(self, prefilling: list[_Request]) -> list[_Request]:
        """The leading requests whose whole prompts fit one packed row (none stored yet)."""
        limit, new, used = min(PROMPT_TOKENS, self.prefill_tokens), [], 0
        for req in prefilling:
            if req.stored or used + len(req.prompt) > limit or len(new) == PROMPT_ROWS:
                break
            new.append(req)
            used += len(req.prompt)
        return new

    def _prefill_prompts(self, requests: list[_Request], sampling: dict) -> _Step:
        """Prefill whole prompts packed into one row padded to a power of two (a CUDA graph's shape)."""
        lengths = [len(r.prompt) for r in requests]
        used, n = sum(lengths), len(requests)
        width = max(16, 1 << (used - 1).bit_length())
        rows, pad = min(PROMPT_ROWS, width), width - used
        ids = [t for r in requests for t in r.prompt] + [0] * pad
        pos = [p for m in lengths for p in range(m)] + [0] * pad
        slots = [r.slot for r, m in zip(requests, lengths) for _ in range(m)] + [0] * pad
        lens = [m for m in lengths for _ in range(m)] + [1] * pad
        seq = [i for i, m in enumerate(lengths) for _ in range(m)] + list(range(-1, -pad - 1, -1))
        last = [end - 1 for end in accumulate(lengths)]
        tokens_in = upload([ids, pos, slots, lens, seq], torch.long, self.device)
        rows_in = upload([last + [0] * (rows - n), [r.seed for r in requests] + [0] * (rows - n),
                          [r.sampled for r in requests] + [0] * (rows - n)], torch.long, self.device)
        if self.cuda_graphs:
            graph, (tokens, logprobs) = self._graph(("prompts", width, rows), sampling)
            self._static_prompts[:, :width].copy_(tokens_in)
            self._static_rows[:, :rows].copy_(rows_in)
            graph.replay()
        else:
            tokens, logprobs = self._prompts_step(tokens_in, rows_in, sampling)
        for req in requests:
            req.stored = len(req.prompt)
        self.stats.prefill_forwards += 1
        return self._launched(requests, tokens[:n], logprobs[:n])

    def _prompts_step(self, tokens_in: torch.Tensor, rows_in: torch.Tensor, sampling: dict):
        ids, pos, slots, lens, seq = tokens_in
        self.state.batch = self.state.prompts_batch(slots, pos, seq, lens)
        logits = self._forward(ids[None], pos[None], rows_in[0])[0]
        return _pick(logits, rows_in[1], rows_in[2], sampling)

    def _decode_step(self, inputs: torch.Tensor, sampling: dict, max_len: int | None = None):
        ids, pos, slots, seeds, steps = inputs
        self.state.batch = self.state.decode_batch(slots, pos, max_len)
        logits = self._forward(ids[:, None], pos[:, None])[:, 0]
        return _pick(logits, seeds, steps, sampling)

    def _decode(self, running: list[_Request], feed: torch.Tensor, sampling: dict) -> _Step:
        """Launch one decode step: feed every running request its latest token (`feed`, on the device)."""
        n = len(running)
        host = [[len(r.prompt) + r.sampled - 1 for r in running], [r.slot for r in running],
                [r.seed for r in running], [r.sampled for r in running]]  # position, slot, seed, token index
        if self.cuda_graphs:
            bucket = next(b for b in self._buckets if b >= n)
            graph, (tokens, logprobs) = self._graph(("decode", bucket), sampling)
            self._static[:, n:bucket].zero_()
            self._static[0, :n].copy_(feed)
            self._static[1:, :n].copy_(upload(host, torch.long, self.device))
            graph.replay()
            tokens, logprobs = tokens[:n], logprobs[:n]
        else:
            inputs = torch.cat([feed[None], upload(host, torch.long, self.device)])
            tokens, logprobs = self._decode_step(inputs, sampling, max_len=max(host[0]) + 1)
        self.stats.decode_steps += 1
        return self._launched(running, tokens, logprobs)

    def _launched(self, requests: list[_Request], tokens: torch.Tensor, logprobs: torch.Tensor) -> _Step:
        """The step that sampled `tokens` for `requests`, with their copy to the host started."""
        for req in requests:
            req.sampled += 1
        if self.device.type != "cuda":
            return _Step(requests, tokens, tokens, logprobs, None)
        step = _Step(requests, tokens, tokens.to("cpu", non_blocking=True), logprobs.to("cpu", non_blocking=True),
                     torch.cuda.Event())
        step.ready.record()
        return step

    # ------------------------------------------------------------------ CUDA graphs
    def _graph(self, shape: tuple, sampling: dict):
        """The CUDA graph of a forward with sampling and log-probs, captured on first use: a decode step of
        ("decode", rows) or a prefill of ("prompts", tokens, rows). It reads its inputs from the static
        buffers (`_static`, or `_static_prompts` and `_static_rows`), zeroed for the capture: zero slots
        and pages are scratch space."""
        key = (shape, *sorted(sampling.items()))
        if key not in self._graphs:
            if shape[0] == "decode":
                self._static.zero_()
                static = self._static[:, : shape[1]]

                def step():
                    return self._decode_step(static, sampling)
            else:
                self._static_prompts.zero_()
                self._static_rows.zero_()
                tokens_in, rows_in = self._static_prompts[:, : shape[1]], self._static_rows[:, : shape[2]]

                def step():
                    return self._prompts_step(tokens_in, rows_in, sampling)

            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: Triton compiles, allocators settle
                    step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pools[shape[0]]):
                outputs = step()
            self._graphs[key] = (graph, outputs)
        return self._graphs[key]


def _pick(logits: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor, sampling: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [B] from logits [B, V] (see `rlkv.engine.sampling`) and their log-probs under the raw logits."""
    tokens = sample(logits, seeds=seeds, steps=steps, **sampling)
    return tokens, torch.log_softmax(logits.float(), dim=-1).gather(1, tokens[:, None])[:, 0]
