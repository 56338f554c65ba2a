"""`generate`'s decoding steps under `rlkv.compress`, replayed from a CUDA graph.

A decoding step of transformers' `generate` costs much more host time (Python and kernel launches
over every layer) than GPU time at the batch sizes people run, so a cache that reads half the K/V
bytes is no faster than the full one (RESULTS.md, the transformers path). Inside `compress` on a
GPU, `model.forward` is wrapped: the first decoding step into a HeadSplitCache is captured in a CUDA
graph, its inputs in fixed tensors (token ids, RoPE positions, the `DecodeStep`'s row positions and
column), and every later step refills them and replays the graph, as gpt-fast and SGLang run their
decode steps. The shapes stay fixed because the cache first makes room for every column `generate`
will store (its `max_cache_length`) and a `DecodeStep` always reads whole buffers.

A forward is replayed only when it is such a step: called by keyword with nothing but the inputs
`generate` passes, one new token per row and none of it padding, the prompt done, into a cache that
`generate` built with one beam, on a model without a sliding window shorter than that cache.
Everything else runs the forward as it is. The graph belongs to its cache: it is dropped when the
cache's buffers move (growth, beam or batch reordering) and freed with it.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch

from rlkv.hf.plumbing import CACHE_KWARG, CACHE_KWARGS, read_step
from rlkv.hf.splitcache import DecodeStep, HeadSplitCache

# What `generate` passes to a decoding forward; anything else (outputs asked for, embeddings) runs eagerly.
GENERATE_INPUTS = {"input_ids", "attention_mask", "position_ids", "use_cache", "logits_to_keep", "return_dict",
                   "output_attentions", "output_hidden_states", *CACHE_KWARGS}


class CapturedStep:
    """One decoding step of `forward` over `cache`, with every input in a fixed tensor.

    `capture=False` runs the step eagerly where a replay would go (how the tests check the rules a
    graph relies on, on a CPU): the first run stands for the warm-up, each `run` for a replay."""

    def __init__(self, forward, cache: HeadSplitCache, input_ids, position_ids, q_pos, logits_to_keep, capture: bool):
        self.forward, self.logits_to_keep = forward, logits_to_keep
        self._cache = weakref.ref(cache)  # the cache holds this step: no reference cycle
        self.ids, self.position_ids, self.q_pos = input_ids.clone(), position_ids.clone(), q_pos.clone()
        self.column = torch.full((1,), cache.length, dtype=torch.long, device=q_pos.device)
        self.graph = None
        if not capture:
            self._step()
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: the step runs for real; its replay will redo it to the same effect
            self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            output = self._step()
        self.output_type, self.logits = type(output), output.logits  # (not the output: it holds the cache)

    @property
    def cache(self) -> HeadSplitCache:
        return self._cache()

    def _step(self):
        cache = self.cache
        cache.plan = cache.graph_step = DecodeStep(cache, self.q_pos, self.column, counts=False)
        try:
            kwargs = {} if self.logits_to_keep is None else {"logits_to_keep": self.logits_to_keep}
            return self.forward(input_ids=self.ids, position_ids=self.position_ids, attention_mask=None,
                                use_cache=True, return_dict=True, **{CACHE_KWARG: cache}, **kwargs)
        finally:
            cache.graph_step = None

    def matches(self, input_ids, logits_to_keep) -> bool:
        return input_ids.shape == self.ids.shape and logits_to_keep == self.logits_to_keep

    def run(self, input_ids, position_ids, q_pos):
        """The step's output for these inputs (logits copied out of the graph's memory); counts the step."""
        self.ids.copy_(input_ids)
        self.position_ids.copy_(position_ids)
        self.q_pos.copy_(q_pos)
        self.column.fill_(self.cache.length)
        if self.graph is None:
            output = self._step()
        else:
            self.graph.replay()
            output = self.output_type(logits=self.logits.clone(), **{CACHE_KWARG: self.cache})
        self.cache.advance()
        return output


class DecodeGraphs:
    """`model.forward` inside `compress`: decoding steps replayed from their cache's `CapturedStep`."""

    def __init__(self, forward, session, capture: bool = True):
        self.forward, self.session, self.capture = forward, session, capture

    def __call__(self, *args, **kwargs):
        cache = self._replayable(args, kwargs)
        step = read_step((), kwargs) if cache is not None else None
        if step is None or not bool((step.q_pos >= 0).all()):
            return self.forward(*args, **kwargs)
        ids = kwargs["input_ids"]
        position_ids = kwargs.get("position_ids")
        if position_ids is None:  # what the model itself would take
            position_ids = torch.full_like(ids, cache.get_seq_length())
        keep_logits = kwargs.get("logits_to_keep")
        cache.reserve(cache.planned)
        if cache.graph is None or not cache.graph.matches(ids, keep_logits):
            cache.graph = CapturedStep(self.forward, cache, ids, position_ids.expand_as(ids), step.q_pos, keep_logits,
                                       self.capture)
        self.session.step, self.session.cache = step, cache
        return cache.graph.run(ids, position_ids.expand_as(ids), step.q_pos)

    def _replayable(self, args, kwargs) -> HeadSplitCache | None:
        """The cache of a forward that is a replayable decoding step (module docstring), else None."""
        cache = next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
        ids = kwargs.get("input_ids")
        if (args or not isinstance(cache, HeadSplitCache) or not set(kwargs) <= GENERATE_INPUTS
                or kwargs.get("output_attentions") or kwargs.get("output_hidden_states")
                or kwargs.get("return_dict") is False or kwargs.get("use_cache") is False):
            return None
        if ids is None or ids.ndim != 2 or ids.shape[1] != 1 or not cache.decoding() or ids.shape[0] != cache.batch:
            return None
        window = self.session.window
        if cache.planned is None or cache.length >= cache.planned or (window is not None and cache.planned > window):
            return None
        return cache


@contextmanager
def decode_graphs(model, session, capture: bool = True):
    """Inside the block, `model`'s decoding steps into a HeadSplitCache run from CUDA graphs (module docstring)."""
    wrapped = model.__dict__.get("forward")  # an instance's own forward (another library's hook), if any
    model.forward = DecodeGraphs(model.forward, session, capture)
    try:
        yield model.forward
    finally:
        if wrapped is None:
            del model.forward
        else:
            model.forward = wrapped
