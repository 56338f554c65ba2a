"""`generate`'s decoding steps replayed from a CUDA graph, under `compress` and `token_drop`.

A decoding step of transformers' `generate` costs much more host time (Python and kernel launches
over every layer) than GPU time at the batch sizes people run, so a cache that reads half the K/V
bytes is no faster than the full one (RESULTS.md, the transformers path). Inside `compress` on a GPU
(and `token_drop(cuda_graphs=True)`), `model.forward` is wrapped: the first decoding step into a
`ReplayableCache` runs for real and is recorded in a CUDA graph with its inputs in fixed tensors
(token ids, RoPE positions, the rows' new positions and column), and every later step refills them
and replays the graph, as gpt-fast and SGLang run their decode steps. The shapes stay fixed between
growths: a head split reads whole buffers and makes room `GRAPH_GROW` columns at a time (up to
`generate`'s `max_cache_length`; each growth records the step again), and a token dropper's slots
are fixed; both update their state in place, so a replay finds it where the recording did.

A forward is replayed only when it is such a step: called by keyword with nothing but the inputs
`generate` passes, one new token per row and none of it padding, the prompt done, into a cache that
`generate` built with one beam (for a head split, on a model without a sliding window shorter than
that cache). Everything else runs the forward as it is. The graph belongs to its cache: it is
dropped when the cache's buffers move (growth, beam or batch reordering) and freed with it.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from contextlib import contextmanager

import torch
from transformers.cache_utils import Cache

from rlkv.hf.plumbing import CACHE_KWARG, CACHE_KWARGS, forward_cache, read_step


class ReplayableCache(Cache):
    """A Cache whose decoding steps `DecodeGraphs` can replay (HeadSplitCache, TokenDropCache).

    Subclasses give `batch`, `replayable()` and `fixed_step()`. The captured step lives in `graph`: it is
    dropped when the rows are reordered, selected or repeated (the buffers move) and left behind by a deep
    copy (it replays into this cache's buffers), as is every attribute named in `FRESH`."""

    FRESH: tuple[str, ...] = ("graph",)
    graph: CapturedStep | None = None

    @property
    def batch(self) -> int | None:
        """Rows of the cache (None before its first forward)."""
        raise NotImplementedError

    def replayable(self) -> bool:
        """Whether the next single-token forward can be a fixed step: the prompt done, built by a one-beam
        `generate` (`planned_columns`)."""
        raise NotImplementedError

    def fixed_step(self, q_pos: torch.Tensor, column: torch.Tensor):
        """Context: forwards inside take the new tokens' positions `q_pos` [b, 1] and column `column` [1]
        from these tensors, keep their buffers where they are, and count nothing."""
        raise NotImplementedError

    def prepare_step(self) -> None:
        """Make room for the next fixed step (dropping `graph` if that moves the buffers); nothing by default."""

    def advance(self) -> None:
        """Count one fixed step."""
        for layer in self.layers:
            layer.cumulative_length += 1

    def __deepcopy__(self, memo):
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        for name, value in self.__dict__.items():
            setattr(clone, name, None if name in self.FRESH else copy.deepcopy(value, memo))
        return clone

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.graph = None
        super().reorder_cache(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.graph = None
        super().batch_select_indices(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.graph = None
        super().batch_repeat_interleave(repeats)


def planned_columns(generation_config, max_cache_length: int | None) -> int | None:
    """What a cache `generate` builds is told it will store: its `max_cache_length`, or None (never replayed)
    with beams, whose reordering would move the buffers every step."""
    return max_cache_length if generation_config.num_beams == 1 else None


# What `generate` passes to a decoding forward; anything else (outputs asked for, embeddings) runs eagerly.
GENERATE_INPUTS = {
    "input_ids",
    "attention_mask",
    "position_ids",
    "use_cache",
    "logits_to_keep",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
    *CACHE_KWARGS,
}


class CapturedStep:
    """One decoding step of `forward` over `cache`, with every input in a fixed tensor.

    `record` runs the step for real (the warm-up a capture needs; its output is that step's), `capture`
    records it in a CUDA graph and `run` refills the inputs and replays it. Without a capture, `run`
    runs the step eagerly: how the tests check, on a CPU, what a replay relies on (fixed inputs
    refilled, state kept in place, the counting done outside the step)."""

    def __init__(self, forward, cache, input_ids, position_ids, q_pos, logits_to_keep):
        self.forward, self.logits_to_keep = forward, logits_to_keep
        self._cache = weakref.ref(cache)  # the cache holds this step: no reference cycle
        self.ids, self.position_ids, self.q_pos = input_ids.clone(), position_ids.clone(), q_pos.clone()
        self.column = torch.full((1,), cache.get_seq_length(), dtype=torch.long, device=q_pos.device)
        self.graph = None

    @property
    def cache(self):
        return self._cache()

    def _step(self):
        kwargs = {} if self.logits_to_keep is None else {"logits_to_keep": self.logits_to_keep}
        with self.cache.fixed_step(self.q_pos, self.column):
            return self.forward(
                input_ids=self.ids,
                position_ids=self.position_ids,
                attention_mask=None,
                use_cache=True,
                return_dict=True,
                **{CACHE_KWARG: self.cache},
                **kwargs,
            )

    def record(self, warm_up: bool):
        """This step's output, run for real (with `warm_up`, on a side stream, as a capture after it needs:
        lazy initializations and kernel compiles happen outside the capture); counts the step."""
        output = self._warm_up() if warm_up else self._step()
        self.cache.advance()
        return output

    def _warm_up(self):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            output = self._step()
        torch.cuda.current_stream().wait_stream(stream)
        return output

    def capture(self) -> None:
        """Record the step (after `record`) in a CUDA graph for `run` to replay."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # recorded, not run: the cache stays as the real run left it
            recorded = self._step()
        self.graph, self.output_type, self.logits = (
            graph,
            type(recorded),
            recorded.logits,
        )  # (not the output: it holds the cache)

    def matches(self, input_ids, logits_to_keep) -> bool:
        return input_ids.shape == self.ids.shape and logits_to_keep == self.logits_to_keep

    def run(self, input_ids, position_ids, q_pos):
        """The step's output for these inputs (logits copied out of the graph's memory); counts the step."""
        self.ids.copy_(input_ids)
        self.position_ids.copy_(position_ids)
        self.q_pos.copy_(q_pos)
        self.column.fill_(self.cache.get_seq_length())
        if self.graph is None:
            output = self._step()
        else:
            self.graph.replay()
            output = self.output_type(logits=self.logits.clone(), **{CACHE_KWARG: self.cache})
        self.cache.advance()
        return output


class DecodeGraphs:
    """`model.forward` inside a runtime's block: decoding steps replayed from their cache's `CapturedStep`."""

    def __init__(self, forward, session, capture: bool = True):
        self.forward, self.session, self.capture = forward, session, capture
        self.failed = weakref.WeakSet()  # caches whose step could not be captured: they decode eagerly

    def __call__(self, *args, **kwargs):
        cache = self._replayable(args, kwargs)
        step = read_step((), kwargs) if cache is not None else None
        if step is None or not bool((step.q_pos >= 0).all()):
            return self.forward(*args, **kwargs)
        ids = kwargs["input_ids"]
        position_ids = kwargs.get("position_ids")
        if position_ids is None:  # what the model itself would take
            position_ids = torch.full_like(ids, cache.get_seq_length())
        position_ids, keep_logits = position_ids.expand_as(ids), kwargs.get("logits_to_keep")
        self.session.cache = cache
        cache.prepare_step()
        if cache.graph is not None and cache.graph.matches(ids, keep_logits):
            return cache.graph.run(ids, position_ids, step.q_pos)
        captured = CapturedStep(self.forward, cache, ids, position_ids, step.q_pos, keep_logits)
        output = captured.record(warm_up=self.capture)
        if self.capture:
            try:
                captured.capture()
            except RuntimeError as error:  # e.g. a host synchronization in the model's own code (a dynamic RoPE)
                warnings.warn(
                    f"rlkv: this model's decoding step cannot be captured in a CUDA graph ({error}); "
                    "it decodes eagerly",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self.failed.add(cache)
                return output
        cache.graph = captured
        return output

    def _replayable(self, args, kwargs):
        """The cache of a forward that is a replayable decoding step (module docstring), else None."""
        cache = forward_cache(kwargs)
        ids = kwargs.get("input_ids")
        if (
            args
            or not isinstance(cache, ReplayableCache)
            or cache in self.failed
            or not set(kwargs) <= GENERATE_INPUTS
            or kwargs.get("output_attentions")
            or kwargs.get("output_hidden_states")
            or kwargs.get("return_dict") is False
            or kwargs.get("use_cache") is False
        ):
            return None
        if ids is None or ids.ndim != 2 or ids.shape[1] != 1 or not cache.replayable() or ids.shape[0] != cache.batch:
            return None
        return cache


@contextmanager
def decode_graphs(model, session, capture: bool = True):
    """Inside the block, `model`'s decoding steps into a `ReplayableCache` run from CUDA graphs (module docstring);
    `capture=False` runs them eagerly through the same fixed steps (the CPU tests)."""
    wrapped = model.__dict__.get("forward")  # an instance's own forward (another library's hook), if any
    model.forward = DecodeGraphs(model.forward, session, capture)
    try:
        yield model.forward
    finally:
        if wrapped is None:
            del model.forward
        else:
            model.forward = wrapped


def check_cuda_graphs(cuda_graphs, cuda: bool) -> bool:
    """Whether a runtime replays decoding steps: `cuda_graphs` True, False or None (on a GPU); `cuda`: the model is."""
    if cuda_graphs not in (None, True, False):
        raise ValueError(f"cuda_graphs must be True, False or None (on a GPU), got {cuda_graphs!r}")
    if cuda_graphs and not cuda:
        raise ValueError("cuda_graphs=True needs the model on a CUDA device")
    return cuda if cuda_graphs is None else cuda_graphs


@contextmanager
def with_graphs(model, session, block, graphs: bool):
    """`block` (a runtime's context manager, yielding `session`), with decoding steps replayed if `graphs`."""
    with block:
        if not graphs:
            yield session
            return
        with decode_graphs(model, session):
            yield session
