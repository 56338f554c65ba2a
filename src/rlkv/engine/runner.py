"""The engine's forwards: a decode step, a packed prefill of whole prompts, a chunked prefill; each
with sampling and log-probs, and on CUDA replayed from a CUDA graph.

The model's own modules run the forward (embeddings, norms, projections, RoPE, MLP); only
attention is the engine's (`rlkv.engine.attention`), reading where to store and what to attend
from `state.batch`, which each forward sets first. With `compile`, the decode step's forward and
its sampling run compiled (`rlkv.engine.compiled`), compiled and captured before the first request
(`warm_up`). Sampling is per row (each request's own temperature, top-k, top-p, seed); a batch runs
in one of five modes, chosen on the host from its requests: all greedy (argmax), sampling without
a filter, with a top-k of at most `TOP_K_CANDIDATES` on every sampled row (and top-p within it: a
top-k selection), or with the general top-k / top-p filter (on CUDA a kernel that searches each
row's threshold: `rlkv.engine.nucleus`), so the common cases pay nothing for the general one; or
"logits", where some request asks for penalties, a minimum length or top log-probs: the forward
(compiled and captured like the others) returns the logits of its rows, padding sliced off, and
`rlkv.engine.logits` samples from them. A CUDA graph is captured per (shape, mode) and reads its
inputs from static buffers; zero slots and pages are scratch space for padding rows.
"""

from __future__ import annotations

import logging
from functools import partial
from itertools import accumulate

import torch
from tqdm.auto import tqdm

from rlkv.engine import logits as processed
from rlkv.engine.attention import Prefill, Segment, attending
from rlkv.engine.compiled import compiled, failure
from rlkv.engine.kv import upload
from rlkv.engine.request import Request
from rlkv.engine.sampling import TOP_K_CANDIDATES, sample, selects, vocab_keys

PROMPT_TOKENS = 512  # longest row of whole new prompts prefilled in one packed forward (a CUDA graph per power of two)
PROMPT_ROWS = 32  # most samplers of that row's prompts
SCORED_TOKENS = 512  # most prompt tokens whose log-probs one prefill forward computes per request (logits [T, V])
MODES = ("greedy", "sample", "top_k", "filter", "logits")
log = logging.getLogger("rlkv.engine")


def sampling_mode(requests: list[Request]) -> str:
    """The cheapest mode that serves every request of a batch; "logits": the forward returns the logits, which
    `rlkv.engine.logits` processes (penalties, min_tokens, top log-probs) and samples from."""
    if any(processed.needs_logits(r) for r in requests):
        return "logits"
    sampled = [r.params for r in requests if not r.params.greedy]
    if not sampled:
        return "greedy"
    if not any(p.filtered for p in sampled):
        return "sample"
    return "top_k" if selects(p.top_k for p in sampled) else "filter"


def sampling_rows(requests: list[Request]) -> tuple[list[list[int]], list[list[float]]]:
    """Per request: (seed, token index, top_k) and (temperature, top_p)."""
    longs = [[r.params.seed for r in requests], [r.sampled for r in requests], [r.params.top_k for r in requests]]
    floats = [[float(r.params.temperature) for r in requests], [float(r.params.top_p) for r in requests]]
    return longs, floats


def pick(logits, seeds, steps, top_k, temperature, top_p, mode: str, keys=None) -> tuple[torch.Tensor, ...]:
    """Next tokens [B] from logits [B, V] in `mode`, and their log-probs under the raw logits (the token's logit
    less the log-sum-exp: no [B, V] log-softmax is written); in "logits" mode, the logits themselves. `keys`: the
    sampling noise's `vocab_keys`."""
    if mode == "logits":
        return (logits,)
    if mode == "greedy":
        tokens = logits.argmax(-1)
    else:
        candidates = TOP_K_CANDIDATES if mode == "top_k" else None
        tokens = sample(logits, temperature, top_k, top_p, seeds, steps, mode == "filter", keys, candidates)
    logits = logits.float()
    return tokens, logits.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


class Runner:
    """Forwards of one model with the engine's attention `state` over its KV `store`."""

    def __init__(
        self,
        model,
        state,
        store,
        device,
        max_batch: int,
        prefill_tokens: int,
        cuda_graphs: bool,
        whole_prompts: bool,
        compile: bool = False,
    ):
        self.model, self.state, self.store, self.device = model, state, store, device
        self.prefill_tokens = prefill_tokens
        self.cuda_graphs, self.whole_prompts = cuda_graphs, whole_prompts
        # the decode step's forward and sampling (the prefills run the model as it is); the forward unbound, so that
        # the runner holds no reference to itself: its KV store is freed as soon as the engine is dropped, not at
        # Python's next cycle collection (a GPU's pool of tens of GiB would outlive its engine until then)
        self._decode_forward = compiled(Runner.forward) if compile else Runner.forward
        # the sampling noise's vocabulary keys: a constant of the compiled graph, computed eagerly (see vocab_keys)
        self.vocab_keys = vocab_keys(model.lm_head.weight.shape[0], device)
        keyed = partial(pick, keys=self.vocab_keys)
        self._pick, self._eager_pick = (compiled(keyed) if compile else keyed), keyed
        self.eager_modes: set[str] = set()  # sampling modes whose compiled graph failed to build (`warm_up`)
        self.min_rows = 2 if compile else 1  # a compiled step's batch is symbolic from 2 rows on: 1 row is padded
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]] = {}
        # decode batch sizes that get a CUDA graph; a step pads up to the smallest that fits
        sizes = [s for s in [1, 2, 4, 8, 16, *range(32, max_batch, 32)] if s < max_batch] + [max_batch]
        self.buckets = sorted({max(s, self.min_rows) for s in sizes})
        # the graphs' input buffers are inference tensors, as every input of an eager step is (the engine runs in
        # inference mode): a compiled step guards on that, and would compile the model twice otherwise
        with torch.inference_mode():
            # a decode step's ids, pos, slots, seeds, steps, top_k; and its temperatures, top_p
            self._static = torch.zeros(6, self.buckets[-1], dtype=torch.long, device=device)
            self._static_f = torch.ones(2, self.buckets[-1], device=device)
            # packed new contexts: per token ids, pos, slots, context lengths, seq, prompt lengths; per context its
            # last token, seed, step, top_k; and its temperature, top_p
            self._static_prompts = torch.zeros(6, PROMPT_TOKENS, dtype=torch.long, device=device)
            self._static_rows = torch.zeros(4, PROMPT_ROWS, dtype=torch.long, device=device)
            self._static_rows_f = torch.ones(2, PROMPT_ROWS, device=device)
        # one memory pool per kind of graph. Graphs of one pool may reuse each other's intermediate memory, so
        # a replay may overwrite the outputs of the pool's other graphs: a decode step's tokens are read (into
        # the next step's inputs) before the next decode replay, but a prefill replays in between
        self._pools = {kind: torch.cuda.graph_pool_handle() for kind in ("decode", "prompts")} if cuda_graphs else {}
        self.decode_steps = self.prefill_forwards = 0

    def _finish_pick(
        self,
        outputs: tuple[torch.Tensor, ...],
        requests: list[Request],
        feed: torch.Tensor | None,
        longs: torch.Tensor,
        floats: torch.Tensor,
    ) -> processed.Picked:
        """(tokens, log-probs, top log-probs or None) from what `pick` returned: in "logits" mode, sampled here."""
        if len(outputs) == 2:
            return outputs[0], outputs[1], None
        return processed.pick(outputs[0], requests, feed, *longs, *floats, keys=self.vocab_keys)

    # ------------------------------------------------------------------ the model
    def forward(self, ids: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
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

    # ------------------------------------------------------------------ decode
    def decode(self, requests: list[Request], feed: torch.Tensor) -> processed.Picked:
        """One decode step: feed every request its latest token (`feed`, on the device) -> (tokens, log-probs,
        top log-probs or None)."""
        n, mode = len(requests), sampling_mode(requests)
        longs, floats = sampling_rows(requests)
        host = [[r.length - 1 for r in requests], [r.slot for r in requests], *longs]  # position, slot, ...
        if self.cuda_graphs:
            bucket = next(b for b in self.buckets if b >= n)
            graph, outputs = self._graph(("decode", bucket), mode)
            self._static[:, n:bucket].zero_()
            self._static[0, :n].copy_(feed)
            self._static[1:, :n].copy_(upload(host, torch.long, self.device))
            self._static_f[:, :n].copy_(upload(floats, torch.float32, self.device))
            graph.replay()
            outputs, longs, floats = [o[:n] for o in outputs], self._static[3:, :n], self._static_f[:, :n]
        else:
            inputs = torch.cat([feed[None], upload(host, torch.long, self.device)])
            floats = upload(floats, torch.float32, self.device)
            if n < self.min_rows:  # padding rows: scratch slot 0 at position 0, as a graph's
                inputs = torch.cat([inputs, inputs.new_zeros(6, self.min_rows - n)], 1)
                floats = torch.cat([floats, floats.new_ones(2, self.min_rows - n)], 1)
            outputs = self._decode_step(inputs, floats, mode, max_len=max(host[0]) + 1)
            outputs, longs, floats = [o[:n] for o in outputs], inputs[3:, :n], floats[:, :n]
        self.decode_steps += 1
        return self._finish_pick(tuple(outputs), requests, feed, longs, floats)

    def _decode_step(
        self, inputs: torch.Tensor, floats: torch.Tensor, mode: str, max_len: int | None = None
    ) -> tuple[torch.Tensor, ...]:
        ids, pos, slots, seeds, steps, top_k = inputs
        self.state.batch = self.state.decode_batch(slots, pos, max_len)
        with attending(self.state):
            logits = self._decode_forward(self, ids[:, None], pos[:, None])[:, 0]
        pick_ = self._eager_pick if mode in self.eager_modes else self._pick
        return pick_(logits, seeds, steps, top_k, floats[0], floats[1], mode)

    def warm_up(self) -> None:
        """Compile the decode step (a step of scratch rows in each sampling mode) and, with CUDA graphs, capture it
        for every greedy batch size, with a progress bar: before the first request, not in the middle of
        serving. Needs the engine's attention installed. Should the compiler fail on the forward or on greedy
        sampling (the first mode), this raises; on another mode's sampling, that mode samples eagerly (logged
        with the traceback) and the rest stays compiled."""
        shapes = [(mode, None) for mode in MODES] + [("greedy", b) for b in self.buckets if self.cuda_graphs]
        scratch = torch.zeros(6, self.min_rows, dtype=torch.long, device=self.device)  # slot 0, position 0
        for mode, bucket in tqdm(shapes, desc="rlkv: compiling the decode step", dynamic_ncols=True):
            if bucket is not None:
                self._graph(("decode", bucket), mode)
                continue
            try:
                self._decode_step(scratch, torch.ones(2, self.min_rows, device=self.device), mode, max_len=1)
            except Exception as err:  # inductor, Triton and dynamo raise many types
                if mode == MODES[0]:
                    raise
                why = failure(err)
                log.warning("rlkv: compiling %r sampling failed (%s); it runs eagerly", mode, why, exc_info=err)
                self.eager_modes.add(mode)

    # ------------------------------------------------------------------ prefill
    def prefill(
        self, prefilling: list[Request]
    ) -> tuple[list[Request], torch.Tensor, torch.Tensor, processed.Top] | None:
        """One prefill forward; returns (the samplers of the contexts it completes: each request and its forks,
        their first tokens, log-probs, top log-probs or None), or None if it completes none.

        Whole new contexts go together in a row of fixed shape (`prefill_prompts`); otherwise the
        forward takes up to `prefill_tokens` context tokens in chunks (token droppers: whole contexts),
        and computes the log-probs of the prompt tokens it covers for requests asking for them."""
        new = [] if self.whole_prompts else self._new_prompts(prefilling)
        if new:
            samplers = [s for req in new for s in req.samplers]
            return samplers, *self.prefill_prompts(new)
        segments, ids, pos, owners, used = [], [], [], [], 0
        for req in prefilling:
            n, room = len(req.context) - req.stored, self.prefill_tokens - used
            if self.whole_prompts and used and n > room:  # a whole context, alone if longer than prefill_tokens
                break
            n = n if self.whole_prompts else min(n, room, SCORED_TOKENS if req.unscored(0, len(req.prompt)) else n)
            if n <= 0:
                break
            segments.append(Segment(req.slot, req.pages, req.stored, n, used, len(req.prompt)))
            ids += req.context[req.stored : req.stored + n]
            pos += range(req.stored, req.stored + n)
            owners.append(req)
            used += n
        self.state.batch = Prefill(segments)
        complete = [(req, seg) for req, seg in zip(owners, segments) if req.stored + seg.length == len(req.context)]
        scored = [(req, req.unscored(seg.start, seg.end), seg) for req, seg in zip(owners, segments)]
        rows = [seg.offset + seg.length - 1 for _, seg in complete]
        rows += [seg.offset + p - seg.start for _, positions, seg in scored for p in positions]
        with attending(self.state):
            logits = self.forward(
                upload([ids], torch.long, self.device),
                upload([pos], torch.long, self.device),
                upload(rows, torch.long, self.device),
            )[0]
        self.prefill_forwards += 1
        self._score_prompts(logits[len(complete) :], scored)
        for req, seg in zip(owners, segments):
            req.stored += seg.length
        if not complete:
            return None
        samplers = [s for req, _ in complete for s in req.samplers]
        logits = logits[
            upload([i for i, (req, _) in enumerate(complete) for _ in req.samplers], torch.long, self.device)
        ]
        longs, floats = sampling_rows(samplers)
        longs, floats = upload(longs, torch.long, self.device), upload(floats, torch.float32, self.device)
        outputs = self._eager_pick(logits, longs[0], longs[1], longs[2], floats[0], floats[1], sampling_mode(samplers))
        return samplers, *self._finish_pick(outputs, samplers, None, longs, floats)

    def _score_prompts(self, logits: torch.Tensor, scored: list[tuple[Request, range, Segment]]) -> None:
        """Log-probs of prompt tokens from the logits of the positions before them (the rows after the complete
        contexts'), kept on the device in each request's `prompt_parts` until they are reported."""
        start = 0
        for req, positions, _ in scored:
            if positions:
                targets = upload(req.prompt[positions.start + 1 : positions.stop + 1], torch.long, self.device)
                rows = logits[start : start + len(positions)]
                req.prompt_parts.append(processed.score(rows, targets, req.params.prompt_logprobs))
                req.scored += len(positions)
                start += len(positions)

    def _new_prompts(self, prefilling: list[Request]) -> list[Request]:
        """The leading requests whose whole contexts fit one packed row (none stored yet, their samplers within
        the row's, no prompt log-probs asked)."""
        limit, new, used, samplers = min(PROMPT_TOKENS, self.prefill_tokens), [], 0, 0
        for req in prefilling:
            if req.stored or used + len(req.context) > limit or samplers + len(req.samplers) > PROMPT_ROWS:
                break
            if req.unscored(0, len(req.prompt)):
                break
            new.append(req)
            used += len(req.context)
            samplers += len(req.samplers)
        return new

    def prefill_prompts(self, requests: list[Request]) -> processed.Picked:
        """Prefill whole contexts packed into one row padded to a power of two (a CUDA graph's shape); the
        samplers of each context (itself and its forks) sample from its last token's logits."""
        lengths = [len(r.context) for r in requests]
        samplers = [s for r in requests for s in r.samplers]
        used, n = sum(lengths), len(samplers)
        width = max(16, 1 << (used - 1).bit_length())
        rows, pad = min(PROMPT_ROWS, max(width, 1 << (n - 1).bit_length())), width - used
        ids = [t for r in requests for t in r.context] + [0] * pad
        pos = [p for m in lengths for p in range(m)] + [0] * pad
        slots = [r.slot for r, m in zip(requests, lengths) for _ in range(m)] + [0] * pad
        lens = [m for m in lengths for _ in range(m)] + [1] * pad
        seq = [i for i, m in enumerate(lengths) for _ in range(m)] + list(range(-1, -pad - 1, -1))
        prompt = [len(r.prompt) for r, m in zip(requests, lengths) for _ in range(m)] + [0] * pad
        last = [end - 1 for r, end in zip(requests, accumulate(lengths)) for _ in r.samplers]
        longs, floats = sampling_rows(samplers)
        tokens_in = upload([ids, pos, slots, lens, seq, prompt], torch.long, self.device)
        rows_in = upload([row + [0] * (rows - n) for row in [last, *longs]], torch.long, self.device)
        floats_in = upload([row + [1.0] * (rows - n) for row in floats], torch.float32, self.device)
        mode = sampling_mode(samplers)
        if self.cuda_graphs:
            graph, outputs = self._graph(("prompts", width, rows), mode)
            self._static_prompts[:, :width].copy_(tokens_in)
            self._static_rows[:, :rows].copy_(rows_in)
            self._static_rows_f[:, :rows].copy_(floats_in)
            graph.replay()
        else:
            outputs = self._prompts_step(tokens_in, rows_in, floats_in, mode)
        for req in requests:
            req.stored = len(req.context)
        self.prefill_forwards += 1
        outputs = tuple(o[:n] for o in outputs)
        return self._finish_pick(outputs, samplers, None, rows_in[1:, :n], floats_in[:, :n])

    def _prompts_step(
        self, tokens_in: torch.Tensor, rows_in: torch.Tensor, floats_in: torch.Tensor, mode: str
    ) -> tuple[torch.Tensor, ...]:
        ids, pos, slots, lens, seq, prompt = tokens_in
        self.state.batch = self.state.prompts_batch(slots, pos, seq, lens, prompt)
        with attending(self.state):
            logits = self.forward(ids[None], pos[None], rows_in[0])[0]
        return self._eager_pick(logits, rows_in[1], rows_in[2], rows_in[3], floats_in[0], floats_in[1], mode)

    # ------------------------------------------------------------------ CUDA graphs
    def _graph(self, shape: tuple, mode: str) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]:
        """The CUDA graph of a forward with sampling and log-probs in `mode`, captured on first use: a decode
        step of ("decode", rows) or a prefill of ("prompts", tokens, rows). It reads its inputs from the static
        buffers, zeroed for the capture: zero slots and pages are scratch space."""
        key = (shape, mode)
        if key not in self._graphs:
            if not any(getattr(m, "_rlkv_state", None) is self.state for m in self.model.modules()):
                # outside `Engine.step` the model has its own attention: the graph would store and read no K/V
                raise RuntimeError(
                    "a step's CUDA graph must be captured with the engine's attention installed (inside Engine.step)"
                )
            if shape[0] == "decode":
                self._static.zero_()
                static, static_f = self._static[:, : shape[1]], self._static_f[:, : shape[1]]

                def step() -> tuple[torch.Tensor, ...]:
                    return self._decode_step(static, static_f, mode)
            else:
                self._static_prompts.zero_()
                self._static_rows.zero_()
                tokens_in, rows_in = self._static_prompts[:, : shape[1]], self._static_rows[:, : shape[2]]
                floats_in = self._static_rows_f[:, : shape[2]]

                def step() -> tuple[torch.Tensor, ...]:
                    return self._prompts_step(tokens_in, rows_in, floats_in, mode)

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
