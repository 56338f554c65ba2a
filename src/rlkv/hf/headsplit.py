"""Per-head compressed KV cache for transformers (`model.generate` and plain forwards).

Design, in the order a forward pass meets it:

1. `compress(...)` switches the model to an attention function registered through
   transformers' `AttentionInterface` ("rlkv_headsplit_sdpa" for an sdpa model), and makes
   `generate` build a `HeadSplitCache` (`rlkv.hf.splitcache`) instead of a `DynamicCache`
   (`rlkv.hf.plumbing`). Everything is undone when the `with` block exits; nothing is
   patched globally.
2. Before every forward, each new token's position in its own sequence is read from the 2-D
   padding mask (`plumbing.Step`): padding does not count, so a left-padded row is compressed
   exactly like the same prompt alone. The cache then plans the forward once for all layers.
3. A decoding step runs `HeadSplitLayer.decode` (one attention call per layer; on a GPU, `generate`'s
   decoding steps are replayed from a CUDA graph, `rlkv.hf.graphs`); other forwards
   run the model's own attention on layers whose heads are all kept and `HeadSplitLayer.attend`
   on the others: kept heads over every token, compressed heads over the first `sink` and the
   last `recent` by the rule of `rlkv.attention.reference.keep_keys_mask`. Memory for a
   compressed head is constant in sequence length. With every head kept nothing is switched: the
   model's own attention runs over a `FullCache` (a DynamicCache that counts its bytes), as plain `generate`.

`prefill="full"` (the RLKV authors' rule) lets every head attend over the whole prompt, then
cuts the compressed heads to sink + recent; the prompt is what `generate` was given (its real
tokens per row), else the first forward into an empty cache. `prefill="compressed"` applies the
compressed heads' rule inside the prompt too.

With a cache that is not a `HeadSplitCache` (a `DynamicCache` the caller passed, or none), the
attention function falls back to the masked reference on the full keys: same outputs, no
savings. That path is what tests compare the cache against.

`kv_dtype` ("bf16", "fp8", "fp8-kept": `rlkv.precision`) stores the kept heads' columns and the rings at
their precisions inside the `HeadSplitCache` (every head kept at FP8 too: no DynamicCache then); the
reference path rounds keys and values the same way before it attends.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from transformers.cache_utils import Cache, DynamicCache

from rlkv.attention.reference import keep_keys_mask, masked_attention
from rlkv.heads import HeadScores
from rlkv.hf.graphs import check_cuda_graphs, planned_columns, with_graphs
from rlkv.hf.plumbing import Step, base_attention, own_cache, patched, recorded_cache, state_of
from rlkv.hf.splitcache import PREFILL_MODES, DecodeStep, HeadSplitCache, HeadSplitLayer
from rlkv.models import Layout
from rlkv.precision import KVPrecisions, centred, check_kv_dtype, precisions

__all__ = ["FullCache", "HeadSplitCache", "HeadSplitLayer", "cache_nbytes", "compress", "resolve_keep"]


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by any transformers cache (HeadSplitCache or DynamicCache ...)."""
    if isinstance(cache, HeadSplitCache):
        return cache.nbytes()
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if t is not None
    )


class FullCache(DynamicCache):
    """The cache of `compress` when every head is kept: transformers' DynamicCache, with a HeadSplitCache's
    byte accounting (`nbytes`, `sequence_nbytes`)."""

    def nbytes(self) -> int:
        return cache_nbytes(self)

    def sequence_nbytes(self, num_tokens: torch.Tensor) -> torch.Tensor:
        """Bytes one sequence of `num_tokens` holds: every head's K/V per token (a sliding layer: its window)."""
        total = torch.zeros_like(num_tokens)
        for layer in self.layers:
            if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
                continue
            per_token = (
                layer.keys.shape[1] * (layer.keys.shape[-1] + layer.values.shape[-1]) * layer.keys.element_size()
            )
            window = getattr(layer, "sliding_window", None)
            total = total + (num_tokens if window is None else num_tokens.clamp(max=window)) * per_token
        return total


class _Session:
    """What the attention function needs for one `compress` block."""

    def __init__(
        self,
        keep: torch.Tensor,
        sink: int,
        recent: int,
        base: str,
        prefill: str,
        window: int | None,
        kv: KVPrecisions | None = None,
    ):
        self.keep, self.sink, self.recent, self.prefill, self.window = keep, sink, recent, prefill, window
        self.kv = kv  # None: the model's dtype
        self.base = base_attention(base)
        self.all_full = keep.all(dim=1).tolist()
        self.step: Step | None = None
        self.cache: Cache | None = None  # the cache of the latest forward
        self.prompt_len = None  # prefill="full": real prompt tokens per row of the current cache
        self._generate_prompt = None  # the prompt `generate` is about to feed
        self._prompt_cache = None
        self._planned = (
            None  # the most columns the cache `generate` is about to build will store (None: not replayable)
        )

    def before_generate(self, generation_config, model_kwargs: dict, max_cache_length: int | None) -> None:
        mask = model_kwargs.get("attention_mask")
        self._generate_prompt = (
            mask.sum(dim=-1) if mask is not None else getattr(generation_config, "_mask_length", None)
        )
        fits_window = self.window is None or (max_cache_length or 0) <= self.window
        self._planned = planned_columns(generation_config, max_cache_length) if fits_window else None

    def new_cache(self) -> HeadSplitCache:
        """The cache of a `generate` call, told how many columns it will store."""
        return HeadSplitCache(
            self.keep, self.sink, self.recent, self.prefill, planned=self._planned, precisions=self.kv
        )

    def before_forward(self, step: Step) -> None:
        self.step, self.cache = step, step.cache
        if self.prefill == "full":
            self.prompt_len = self._prompt_len(step)
        if isinstance(step.cache, HeadSplitCache) and step.cache.graph_step is None:
            window_in_force = self.window is not None and step.k_pos.shape[1] > self.window
            step.cache.begin(step, self.prompt_len, window_in_force)

    def _prompt_len(self, step: Step):
        """The prompt of this forward's cache: set by `generate`, else the first forward into the empty cache."""
        fresh = step.k_pos.shape[1] == step.q_pos.shape[1]
        if fresh or step.cache is not self._prompt_cache:
            given = self._generate_prompt
            self._prompt_cache, self._generate_prompt = step.cache, None
            self.prompt_len = given if given is not None else (step.q_pos >= 0).sum(dim=-1)
        return self.prompt_len


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    session: _Session = state_of(module, "rlkv.compress")
    layer = module.layer_idx
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    step, cache = session.step, session.cache
    window = kwargs.get("sliding_window")
    if window is not None and step.k_pos.shape[1] <= window:
        window = None  # no token is old enough to leave the model's sliding window yet
    if isinstance(cache, HeadSplitCache) and isinstance(cache.plan, DecodeStep):
        return cache.layers[layer].decode(query, key, value, scaling), None
    if session.all_full[layer] and (isinstance(cache, HeadSplitCache) or session.kv is None):
        return session.base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if not isinstance(cache, HeadSplitCache):
        key, value = rounded(session.kv, layer, session.keep[layer], key, value)
        mask = keep_keys_mask(
            step.q_pos,
            step.k_pos[:, -key.shape[2] :],
            session.keep[layer],
            session.sink,
            session.recent,
            window,
            session.prompt_len,
        )
        return masked_attention(query, key, value, mask, scaling), None
    out = cache.layers[layer].attend(
        module, query, key, value, attention_mask, scaling, window, session.base, dict(kwargs, dropout=dropout)
    )
    return out, None


def rounded(kv: KVPrecisions | None, layer: int, keep: torch.Tensor, key, value) -> tuple:
    """Keys and values [b, h, k, d] of `layer` as its stored precisions give them back (kept heads at `kv.kept`,
    the others at `kv.compressed`, keys centred first): what the masked reference attends over."""
    if kv is None:
        return key, value
    kept, compressed = (torch.nonzero(k).flatten().to(key.device) for k in (keep, ~keep))
    key = centred(key, kv.key_centres(layer, kept, compressed))
    return kv.round_trip(layer, kept, compressed, key, value, dim=1)


@contextmanager
def _every_head_kept(model, session: _Session):
    """Nothing to compress: the model's own attention over a FullCache, so sparsity 0 is the DynamicCache."""
    with own_cache(model, session, lambda: FullCache(config=model.config)), recorded_cache(model, session):
        yield session


def sliding_window(config) -> int | None:
    """The sliding window some layer of a model with `config` attends within, or None."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    return None if types is not None and "sliding_attention" not in types else window


def resolve_keep(layout: Layout, heads, sparsity: float | None) -> torch.Tensor:
    """The (layers x kv_heads) keep-mask from a HeadScores (or file path) and a sparsity, or a bool mask."""
    if not isinstance(heads, (HeadScores, str, os.PathLike, type(None))) and not (
        isinstance(heads, torch.Tensor) and heads.dtype == torch.bool
    ):
        got = (
            f"a {str(heads.dtype).removeprefix('torch.')} tensor"
            if isinstance(heads, torch.Tensor)
            else type(heads).__name__
        )
        raise TypeError(
            f"heads must be a HeadScores, a head-score file path, a bool torch tensor keep-mask "
            f"(layers x kv_heads) or None, got {got} (a mask: torch.tensor(mask, dtype=torch.bool); "
            "scores: rlkv.HeadScores(scores) with sparsity=)"
        )
    if isinstance(heads, torch.Tensor):
        if sparsity is not None:
            raise ValueError("pass either a boolean keep-mask or head scores with a sparsity, not both")
        keep = heads.cpu()
        if tuple(keep.shape) != layout.shape:
            raise ValueError(f"keep-mask is {tuple(keep.shape)} but the model has {layout.shape} (layers x kv_heads)")
        return keep
    if sparsity is None:
        raise ValueError("compress needs sparsity= (fraction of KV heads compressed, in [0, 1])")
    if heads is None:
        if sparsity not in (0, 1):
            raise ValueError(f"without head scores only sparsity 0 or 1 is defined, got {sparsity}")
        heads = HeadScores.uniform(layout)
    elif not isinstance(heads, HeadScores):
        heads = HeadScores.load(heads)
    heads.check_layout(layout)
    return heads.keep_mask(sparsity)


def compress(
    model,
    heads=None,
    sparsity: float | None = None,
    sink: int = 16,
    recent: int = 64,
    prefill: str = "full",
    cuda_graphs: bool | None = None,
    kv_dtype: str = "bf16",
):
    """Make `model`'s KV cache per head inside a `with` block.

    Kept heads (the top `1 - sparsity` fraction by `heads` scores) store every token; the
    others store only the first `sink` and the last `recent` tokens. `heads` is a HeadScores,
    a path to one, a boolean (layers x kv_heads) keep-mask, or None with sparsity 0 or 1.
    `prefill`: "compressed" (compressed heads keep their rule inside the prompt) or "full"
    (every head attends over the whole prompt; compressed heads are cut to sink + recent after it).
    `cuda_graphs`: replay `generate`'s decoding steps from a CUDA graph (`rlkv.hf.graphs`); None: on a GPU.
    `kv_dtype`: how K/V are stored (`rlkv.precision`): "bf16" (the model's dtype), "fp8" (every head, e4m3 at
    per-KV-head scales calibrated once per model), "fp8-kept" (kept heads in FP8, rings in the model's dtype).
    Yields a handle whose `.cache` is the cache of the latest forward (`.cache.nbytes()`).
    """
    layout = Layout.of(model)
    for name, value, low in (("sink", sink, 0), ("recent", recent, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if prefill not in PREFILL_MODES:
        raise ValueError(f"prefill must be one of {PREFILL_MODES}, got {prefill!r}")
    graphs = check_cuda_graphs(cuda_graphs, model.device.type == "cuda")
    keep = resolve_keep(layout, heads, sparsity)
    kv = precisions(model, kv_dtype) if check_kv_dtype(kv_dtype) != "bf16" else None
    session = _Session(keep, sink, recent, model.config._attn_implementation, prefill, sliding_window(model.config), kv)
    if keep.all() and kv is None:
        return _every_head_kept(model, session)
    return with_graphs(
        model, session, patched(model, "rlkv_headsplit", _attention, session, make_cache=session.new_cache), graphs
    )
