"""Per-head compressed KV cache for transformers (`model.generate` and plain forwards).

Design, in the order a forward pass meets it:

1. `compress(...)` switches the model to an attention function registered through
   transformers' `AttentionInterface` ("rlkv_headsplit_sdpa" for an sdpa model), and makes
   `generate` build a `HeadSplitCache` instead of a `DynamicCache` (`rlkv.attention.plumbing`).
   Everything is undone when the `with` block exits; nothing is patched globally.
2. Before every forward, each new token's position in its own sequence is read from the 2-D
   padding mask (`plumbing.Step`): padding does not count, so a left-padded row is compressed
   exactly like the same prompt alone. In plain decoding the ring slot of the new token is
   worked out once per step for all layers.
3. `HeadSplitLayer.update` appends the kept heads' K/V to an ordinary growing tensor (as
   `DynamicLayer` does) and holds the compressed heads' new K/V aside.
4. The attention function runs the base attention (sdpa/eager with transformers' own mask) on
   the kept heads, and attends the compressed heads over their ring plus the new tokens with
   the rule of `rlkv.attention.reference.keep_keys_mask`; then the new tokens are written into
   the ring: the first `sink` tokens stay forever, the last `recent` cycle through
   `recent` slots. Memory for a compressed head is constant in sequence length.

With a cache that is not a `HeadSplitCache` (a `DynamicCache` the caller passed, or none), the
attention function falls back to the masked reference on the full keys: same outputs, no
savings. That path is what tests compare the cache against.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from rlkv.attention.plumbing import CompressedLayer, Step, base_attention, patched, state_of
from rlkv.attention.reference import keep_keys_mask, masked_attention
from rlkv.heads import HeadScores
from rlkv.models import Layout


def ring_slot(pos: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """Ring slot of a token position: sinks have their own slots, the rest cycle through `recent`."""
    return torch.where(pos < sink, pos, sink + (pos - sink).remainder(recent))


def query_heads(keep: torch.Tensor, group: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the query heads of a layer's kept and of its compressed KV heads (`keep` [kv_heads])."""
    q_keep = keep.repeat_interleave(group).to(device)
    return torch.nonzero(q_keep).flatten(), torch.nonzero(~q_keep).flatten()


class HeadSplitLayer(CompressedLayer, CacheLayerMixin):
    """One layer's cache: full K/V for kept heads, a sink + recent ring for compressed heads."""

    is_sliding = False

    def __init__(self, keep: torch.Tensor, sink: int, recent: int):
        super().__init__()
        self.keep = keep.bool().cpu()
        self.sink, self.recent = sink, recent
        self.cumulative_length = 0
        self.full_idx = torch.nonzero(self.keep).flatten()
        self.comp_idx = torch.nonzero(~self.keep).flatten()
        self.ring_keys = self.ring_values = self.ring_pos = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def ring_size(self) -> int:
        return self.sink + self.recent

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, _, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.full_idx, self.comp_idx = self.full_idx.to(self.device), self.comp_idx.to(self.device)
        nf, nc = len(self.full_idx), len(self.comp_idx)
        self.keys = key_states.new_empty(b, nf, 0, d)
        self.values = value_states.new_empty(b, nf, 0, value_states.shape[-1])
        if nc:
            self.ring_keys = key_states.new_zeros(b, nc, self.ring_size, d)
            self.ring_values = value_states.new_zeros(b, nc, self.ring_size, value_states.shape[-1])
            self.ring_pos = torch.full((b, self.ring_size), -1, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        if len(self.full_idx):
            if len(self.comp_idx):
                key_states, value_states, new_k, new_v = (
                    key_states[:, self.full_idx], value_states[:, self.full_idx],
                    key_states[:, self.comp_idx], value_states[:, self.comp_idx],
                )
                self._pending = (new_k, new_v)
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        else:
            self._pending = (key_states, value_states)
        return self.keys, self.values

    def attend_compressed(
        self, query: torch.Tensor, q_pos: torch.Tensor, decode_slot: torch.Tensor | None, scaling: float,
        window: int | None,
    ) -> torch.Tensor:
        """Attention of the compressed heads' queries [b, hq_c, q, d] over ring + new tokens; then store them."""
        if self._pending is None:
            raise RuntimeError("HeadSplitLayer.attend_compressed called before update() for this step")
        new_k, new_v = self._pending
        self._pending = None
        gqa = query.shape[1] != new_k.shape[1]
        if decode_slot is not None and window is None:
            # Decoding: store the token first; the ring then holds exactly the keys it may attend.
            slot = decode_slot
            for ring, new in ((self.ring_keys, new_k), (self.ring_values, new_v)):
                ring.scatter_(2, slot[:, None, :, None].expand(-1, ring.shape[1], 1, ring.shape[3]), new)
            self.ring_pos.scatter_(1, slot, q_pos)
            mask = (self.ring_pos >= 0)[:, None, None, :]
            out = F.scaled_dot_product_attention(
                query, self.ring_keys, self.ring_values, attn_mask=mask, scale=scaling, enable_gqa=gqa
            )
            return out.transpose(1, 2)
        keys = torch.cat([self.ring_keys, new_k], dim=-2)
        values = torch.cat([self.ring_values, new_v], dim=-2)
        k_pos = torch.cat([self.ring_pos, q_pos], dim=-1)
        mask = keep_keys_mask(q_pos, k_pos, torch.zeros(1, dtype=torch.bool), self.sink, self.recent, window)
        mask |= (q_pos < 0)[:, None, :, None]  # padding queries: any finite output will do
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=gqa)
        self._write_ring(new_k, new_v, q_pos)
        return out.transpose(1, 2)

    def _write_ring(self, new_k: torch.Tensor, new_v: torch.Tensor, q_pos: torch.Tensor) -> None:
        """Store the tokens a compressed head must remember: positions < sink, and the last `recent`."""
        last = q_pos.max(dim=-1, keepdim=True).values
        keep = (q_pos >= 0) & ((q_pos < self.sink) | (q_pos > last - self.recent))
        slot = torch.where(keep, ring_slot(q_pos, self.sink, self.recent), self.ring_size)  # dropped tokens go to a slot that is cut off
        token = torch.arange(q_pos.shape[1], device=q_pos.device).expand_as(q_pos)
        src = torch.full((q_pos.shape[0], self.ring_size + 1), -1, dtype=torch.long, device=q_pos.device)
        src = src.scatter_reduce(1, slot, token, reduce="amax")[:, : self.ring_size]
        hit = src >= 0
        idx = src.clamp(min=0)
        self.ring_pos = torch.where(hit, q_pos.gather(1, idx), self.ring_pos)
        gather_idx = idx[:, None, :, None].expand(-1, new_k.shape[1], -1, new_k.shape[-1])
        self.ring_keys = torch.where(hit[:, None, :, None], new_k.gather(2, gather_idx), self.ring_keys)
        gather_idx = idx[:, None, :, None].expand(-1, new_v.shape[1], -1, new_v.shape[-1])
        self.ring_values = torch.where(hit[:, None, :, None], new_v.gather(2, gather_idx), self.ring_values)

    # ------------------------------------------------------------------ bookkeeping
    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.keys, self.values, self.ring_keys, self.ring_values, self.ring_pos) if t is not None]

    def sequence_nbytes(self, num_tokens: torch.Tensor) -> torch.Tensor:
        """Bytes one sequence of `num_tokens` occupies here: kept heads per token, plus its ring slot."""
        if not self.is_initialized:
            return torch.zeros_like(num_tokens)
        per_token = 2 * self.keys.shape[1] * self.keys.shape[3] * self.keys.element_size()
        ring = sum(t[0].numel() * t.element_size() for t in (self.ring_keys, self.ring_values, self.ring_pos) if t is not None)
        return num_tokens * per_token + ring

    def _map(self, fn) -> None:
        for name in ("keys", "values", "ring_keys", "ring_values", "ring_pos"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "HeadSplitCache cannot be cropped: compressed heads have already dropped old tokens "
            "(assisted/speculative decoding is not supported with rlkv.compress)"
        )

    def reset(self) -> None:
        raise NotImplementedError("HeadSplitCache cannot be reset; create a new one per generation")


class HeadSplitCache(Cache):
    """A transformers Cache whose layers keep full K/V only for kept heads (see module docstring)."""

    def __init__(self, keep: torch.Tensor, sink: int, recent: int):
        super().__init__(layers=[HeadSplitLayer(keep[i], sink, recent) for i in range(keep.shape[0])])
        self.keep, self.sink, self.recent = keep, sink, recent

    def nbytes(self) -> int:
        """Bytes of K/V (and ring positions) this cache holds right now."""
        return sum(layer.nbytes() for layer in self.layers)

    def sequence_nbytes(self, num_tokens: torch.Tensor) -> torch.Tensor:
        """Bytes each sequence needs for its own `num_tokens` [batch] (padding of other rows excluded)."""
        return sum(layer.sequence_nbytes(num_tokens) for layer in self.layers)


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


class _Session:
    """What the attention function needs for one `compress` block."""

    def __init__(self, keep: torch.Tensor, sink: int, recent: int, base: str):
        self.keep, self.sink, self.recent = keep, sink, recent
        self.base = base_attention(base)
        self.all_full = keep.all(dim=1).tolist()
        self.none_full = (~keep).all(dim=1).tolist()
        self.step: Step | None = None
        self.cache: Cache | None = None  # the cache of the latest forward
        self.decode_slot: torch.Tensor | None = None
        self._q_idx = {}

    def q_heads(self, layer: int, group: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Query-head indices of the kept and of the compressed KV heads of `layer`."""
        if layer not in self._q_idx:
            self._q_idx[layer] = query_heads(self.keep[layer], group, device)
        return self._q_idx[layer]

    def before_forward(self, step: Step) -> None:
        self.step, self.cache, self.decode_slot = step, step.cache, None
        if step.q_pos.shape[1] == 1 and isinstance(step.cache, HeadSplitCache) and bool((step.q_pos >= 0).all()):
            self.decode_slot = ring_slot(step.q_pos, self.sink, self.recent)  # one real token per row


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    session: _Session = state_of(module, "rlkv.compress")
    layer = module.layer_idx
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    window = kwargs.get("sliding_window")
    if session.all_full[layer]:
        return session.base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    step = session.step
    if window is not None and step.k_pos.shape[1] <= window:
        window = None  # no token is old enough to leave the model's sliding window yet
    keep = session.keep[layer]
    if not isinstance(session.cache, HeadSplitCache):
        mask = keep_keys_mask(step.q_pos, step.k_pos[:, -key.shape[2] :], keep, session.sink, session.recent, window)
        return masked_attention(query, key, value, mask, scaling), None
    cache_layer = session.cache.layers[layer]
    if session.none_full[layer]:
        return cache_layer.attend_compressed(query, step.q_pos, session.decode_slot, scaling, window), None
    q_full, q_comp = session.q_heads(layer, query.shape[1] // keep.numel(), query.device)
    out = query.new_empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
    if len(q_full):
        out[:, :, q_full] = session.base(
            module, query[:, q_full], key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )[0]
    out[:, :, q_comp] = cache_layer.attend_compressed(query[:, q_comp], step.q_pos, session.decode_slot, scaling, window)
    return out, None


def resolve_keep(layout: Layout, heads, sparsity: float | None) -> torch.Tensor:
    """The (layers x kv_heads) keep-mask from a HeadScores (or file path) and a sparsity, or a bool mask."""
    if not isinstance(heads, (HeadScores, str, os.PathLike, type(None))) and not (
            isinstance(heads, torch.Tensor) and heads.dtype == torch.bool):
        got = f"a {str(heads.dtype).removeprefix('torch.')} tensor" if isinstance(heads, torch.Tensor) else type(heads).__name__
        raise TypeError(f"heads must be a HeadScores, a head-score file path, a bool torch tensor keep-mask "
                        f"(layers x kv_heads) or None, got {got} (a mask: torch.tensor(mask, dtype=torch.bool); "
                        "scores: rlkv.HeadScores(scores) with sparsity=)")
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


def compress(model, heads=None, sparsity: float | None = None, sink: int = 16, recent: int = 64):
    """Make `model`'s KV cache per head inside a `with` block.

    Kept heads (the top `1 - sparsity` fraction by `heads` scores) store every token; the
    others store only the first `sink` and the last `recent` tokens. `heads` is a HeadScores,
    a path to one, a boolean (layers x kv_heads) keep-mask, or None with sparsity 0 or 1.
    Yields a handle whose `.cache` is the cache of the latest forward (`.cache.nbytes()`).
    """
    layout = Layout.of(model)
    for name, value, low in (("sink", sink, 0), ("recent", recent, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    keep = resolve_keep(layout, heads, sparsity)
    session = _Session(keep, sink, recent, model.config._attn_implementation)
    return patched(model, "rlkv_headsplit", _attention, session, make_cache=lambda: HeadSplitCache(keep, sink, recent))
