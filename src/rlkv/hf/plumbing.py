"""How rlkv plugs an attention rule into a transformers model, written once.

Every runtime of rlkv on transformers (the head-split cache, the token-dropping caches, the
gated training attention) needs the same four things, all undone when its `with` block ends:
1. an attention function registered through `AttentionInterface` under a new name, with the
   base implementation's mask builder registered under the same name (`AttentionMaskInterface`),
   and the model switched to it with `set_attn_implementation`;
2. its per-block state reachable from the attention function: `module._rlkv_state` on every
   attention module;
3. each forward's token positions in their own sequences (`Step`, read by a forward pre-hook on
   the decoder from the 2-D padding mask: padding does not count);
4. optionally, `generate` building the runtime's own cache instead of a `DynamicCache` (`own_cache`);
   its layers share `CompressedLayer`: a logical length apart from what is stored (transformers 5.x
   takes positions from `get_seq_length()`), byte accounting and the batch-row operations.
A runtime that changes no attention (`compress` keeping every head) uses only 4, with `recorded_cache`.
"""

from __future__ import annotations

import inspect
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, GenerationMixin
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from rlkv.attention.reference import token_positions

BASE_IMPLEMENTATIONS = ("sdpa", "eager")
# The cache's keyword in model forwards, `generate` and its model_kwargs: `past_key_values` up to
# transformers 5.2x, `cache` since its rename (where the old name still works, with a warning).
CACHE_KWARGS = ("cache", "past_key_values")
CACHE_KWARG = (
    "cache"
    if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    else "past_key_values"
)


def output_cache(output) -> Cache | None:
    """The cache a forward or `generate(return_dict_in_generate=True)` returned, under either name."""
    return getattr(output, CACHE_KWARG)


@dataclass
class Step:
    """One forward: positions of its new tokens [b, q] and of every key so far [b, past + q]."""

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    cache: Cache | None


def forward_cache(kwargs) -> Cache | None:
    """The cache a decoder forward was called with (under either keyword), or None."""
    return next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)


def read_step(args, kwargs) -> Step:
    """The `Step` of a decoder forward, from its input ids (or embeddings), cache and padding mask."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    ref = ids if ids is not None else kwargs.get("inputs_embeds")
    batch, q_len = ref.shape[0], ref.shape[1]
    cache = forward_cache(kwargs)
    past = cache.get_seq_length() if cache is not None else 0
    mask = kwargs.get("attention_mask")
    if mask is not None and (mask.ndim != 2 or mask.shape[1] != past + q_len):
        raise ValueError(
            f"rlkv needs the 2-D padding attention_mask of the whole sequence so far, shape [batch, {past + q_len}] "
            f"({past} cached + {q_len} new tokens), got shape {tuple(mask.shape)}"
        )
    k_pos, _ = token_positions(mask, batch, past + q_len, ref.device)
    return Step(q_pos=k_pos[:, past:], k_pos=k_pos, cache=cache)


class CompressedLayer:
    """Mixin for a cache layer that stores fewer tokens than it has seen.

    Subclasses keep `cumulative_length` (tokens seen, the logical length), list their tensors in
    `tensors()` and apply a function to each of them in `_map(fn)`.
    """

    is_initialized: bool
    cumulative_length: int

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def _map(self, fn) -> None:
        raise NotImplementedError

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes of every tensor this layer holds right now."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._map(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._map(lambda t: t.repeat_interleave(repeats, dim=0))


def base_attention(base: str):
    """The model's own attention function for implementation `base` (sdpa or eager)."""
    if base == "eager":
        from transformers.models.llama.modeling_llama import eager_attention_forward

        return eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


def state_of(module, who: str):
    """The runtime state `patched` attached to an attention module."""
    state = getattr(module, "_rlkv_state", None)
    if state is None:
        raise RuntimeError(f"{who} attention was called outside its rlkv context manager")
    return state


@contextmanager
def own_cache(model, state, make_cache):
    """Inside the block, `generate` builds `make_cache()` wherever it would have built a fresh DynamicCache.

    Once `generate` has prepared its inputs it calls `state.before_generate(generation_config, model_kwargs,
    max_cache_length)` (if the state has it; `max_cache_length`: the most tokens `generate` will store).
    """
    original = model._prepare_cache_for_generation

    def prepare_cache(generation_config, model_kwargs, *args, **kwargs):
        result = original(generation_config, model_kwargs, *args, **kwargs)
        if hasattr(state, "before_generate"):
            columns = args[2] if len(args) > 2 else kwargs.get("max_cache_length")
            state.before_generate(generation_config, model_kwargs, columns)
        for key in CACHE_KWARGS:
            cache = model_kwargs.get(key)
            if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False):
                model_kwargs[key] = make_cache()
        return result

    model._prepare_cache_for_generation = prepare_cache
    try:
        yield state
    finally:
        del model._prepare_cache_for_generation


@contextmanager
def recorded_cache(model, state):
    """Inside the block, `state.cache` is the cache of the decoder's latest forward (None without one)."""

    def record(_, args, kwargs):
        state.cache = forward_cache(kwargs)

    hook = getattr(model, "model", model).register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield state
    finally:
        hook.remove()


@contextmanager
def patched(model, name: str, attention, state, make_cache=None, bases=BASE_IMPLEMENTATIONS):
    """Run `model` with `attention` (registered as f"{name}_{base}") and `state` inside the block.

    `state.before_forward(step: Step)` is called before every decoder forward. With `make_cache`,
    `generate` builds the runtime's own cache (`own_cache`).
    """
    base = model.config._attn_implementation
    if base not in bases:
        raise ValueError(f"{name} works on models loaded with attn_implementation in {bases}, got {base!r}")
    registered = f"{name}_{base}"
    if registered not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(registered, attention)
        AttentionMaskInterface.register(registered, ALL_MASK_ATTENTION_FUNCTIONS[base])
    decoder = getattr(model, "model", model)
    modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]
    hook = decoder.register_forward_pre_hook(
        lambda _, args, kwargs: state.before_forward(read_step(args, kwargs)), with_kwargs=True
    )
    for module in modules:
        module._rlkv_state = state
    with ExitStack() as stack:
        if make_cache is not None:
            stack.enter_context(own_cache(model, state, make_cache))
        model.set_attn_implementation(registered)
        try:
            yield state
        finally:
            model.set_attn_implementation(base)
            for module in modules:
                del module._rlkv_state
            hook.remove()
