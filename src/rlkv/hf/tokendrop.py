"""Token-dropping KV caches for transformers `generate`: the runtime of H2O, SnapKV and R-KV.

The rule (candidates, policies, their attention) is `rlkv.attention.tokendrop`'s, which the
engine's slots (`rlkv.engine.tokendrop`) run as well.

Design, in the order a forward pass meets it:

1. `token_drop(model, policy)` switches the model to the attention function "rlkv_tokendrop_<base>"
   (registered through `AttentionInterface`, with the base implementation's mask builder), makes
   `generate` build a `TokenDropCache` instead of a `DynamicCache`, and hooks the decoder to read
   each new token's position from the 2-D padding mask (padding = -1; left padding does not
   count). Everything is undone when the `with` block exits.
2. `TokenDropLayer.update` only counts tokens: `get_seq_length()` is the LOGICAL length (tokens
   seen), which transformers 5.x takes positions from; the new K/V go on to the attention function.
3. `TokenDropLayer.attend` forms the candidates (stored slots + the new tokens, each with its
   position), attends every query over them with an explicit softmax (chunks of `CHUNK` queries;
   mask: valid, causal by position, the model's sliding window if any), and sums the
   probabilities of the last `policy.observed(...)` queries per key (mean over the GQA group of
   query heads: decisions are per KV head). The policy then returns a keep mask over the
   candidates, and the layer compacts the kept ones (in chronological order) into at most
   `policy.capacity` slots. Eviction therefore happens after each forward: within one forward
   (the prefill) attention is exact causal attention over stored + new tokens.

Storage per layer: keys/values [b, h_kv, width, d], positions [b, h_kv, width] (int32, -1 =
empty) and, for scored policies, a float32 score per slot; width grows with the sequence up to
`capacity` (= budget, plus the compression interval for R-KV). A decoding step (one token per
row) then works in place on `capacity` + 1 slots: the spare one takes the new token, and if the
policy keeps it, it moves into the first empty slot (evicted slots are emptied), so nothing is
concatenated or compacted. `nbytes()` counts the slots in use (min(tokens, capacity) per head,
not the spare) and the policy state; `sequence_nbytes(n)` what one sequence of n tokens occupies.
Without a `TokenDropCache` (use_cache=False, or a cache the caller passed) attention is the base
implementation's: exact, nothing dropped. With `kv_dtype="fp8"` the slots hold e4m3 K/V at per-KV-head
scales (`rlkv.precision`): new K/V are rounded before anything attends to them, and what is stored
is read back dequantised; bytes are counted as stored.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from rlkv.attention.tokendrop import Candidates, Policy, candidate_attention, compact, select_tokens, slot_attention
from rlkv.hf.graphs import ReplayableCache, check_cuda_graphs, planned_columns, with_graphs
from rlkv.hf.plumbing import CompressedLayer, Step, base_attention, patched, state_of
from rlkv.precision import KEYS, VALUES, KVPrecision, as_bytes, centred, precisions


class TokenDropLayer(CompressedLayer, CacheLayerMixin):
    """One layer's cache: at most `policy.capacity` (token, position[, score]) slots per KV head."""

    is_sliding = False

    def __init__(self, layer: int = 0, precision: KVPrecision | None = None):
        super().__init__()
        self.layer, self.precision = layer, precision  # precision None: the model's dtype, unquantised
        self.cumulative_length = 0
        self.pos = self.score = None
        self.extra: dict[str, torch.Tensor] = {}  # policy state that must follow the batch (R-KV's query window)
        self._rows: torch.Tensor | None = None  # the slot kernel's row -> slot map (the identity)
        self.counts = True  # update() counts the new tokens

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.precision = (self.precision or KVPrecision(self.dtype)).to(self.device)

    def _stored(self, x: torch.Tensor, which: int) -> torch.Tensor:
        return self.precision.store(x, which, self.layer, slice(None), 1)

    def _read(self, x: torch.Tensor, which: int) -> torch.Tensor:
        return self.precision.load(x, which, self.layer, slice(None), 1, self.dtype)

    def update(self, key_states, value_states, *args, **kwargs):
        """Count the new tokens (not inside a fixed step: `TokenDropCache.fixed_step`); they are stored (or
        dropped) by `attend`, after attention."""
        if self.keys is None:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2] * self.counts
        return key_states, value_states

    def attend(
        self, query, key, value, q_pos, scaling: float, window: int | None, policy: Policy, fused=None
    ) -> torch.Tensor:
        """Attention [b, q, hq, d] of the new queries over stored + new tokens; then keep what `policy` selects.
        `fused`: a decoding step's attention, `rlkv.attention.slot_kernel.slot_attention` (None: torch)."""
        b, h, q, _ = key.shape
        centres = self.precision.key_centres(self.layer)
        key = centred(key, centres)  # FP8: what the slots hold of a key
        if q == 1 and self.is_initialized:
            return self._decode(query, key, value, q_pos, scaling, window, policy, fused)
        key = self.precision.round_trip(key, KEYS, self.layer, slice(None), 1)
        value = self.precision.round_trip(value, VALUES, self.layer, slice(None), 1)
        new_pos = q_pos.to(torch.int32)[:, None, :].expand(b, h, q)
        first = not self.is_initialized
        if first:
            keys, values, pos = key, value, new_pos
            score = key.new_zeros(b, h, q, dtype=torch.float32) if policy.scored else None
        else:
            keys = torch.cat([self._read(self.keys, KEYS), key], dim=-2)
            values = torch.cat([self._read(self.values, VALUES), value], dim=-2)
            pos = torch.cat([self.pos, new_pos], dim=-1)
            score = torch.cat([self.score, self.score.new_zeros(b, h, q)], dim=-1) if policy.scored else None
        out, c, keep = select_tokens(
            query, keys, values, pos, score, q_pos, scaling, window, policy, self.extra, first, centres
        )
        keys, values, self.pos, self.score = compact(c, keep, policy.capacity)
        self.keys, self.values = self._stored(keys, KEYS), self._stored(values, VALUES)
        self.is_initialized = True
        return out

    def _decode(
        self, query, key, value, q_pos, scaling: float, window: int | None, policy: Policy, fused
    ) -> torch.Tensor:
        """One new token per row, in place: the slots (`capacity` + a spare one, which takes the new token) are
        the candidates; then evicted slots are emptied and a kept new token moves into the first empty slot."""
        cap = policy.capacity
        if self.pos.shape[-1] != cap + 1:
            self._to_slots(cap + 1)
        self.keys[:, :, cap] = self._stored(key[:, :, 0], KEYS)
        self.values[:, :, cap] = self._stored(value[:, :, 0], VALUES)
        self.pos[:, :, cap] = q_pos.to(torch.int32)
        if self.score is not None:
            self.score[:, :, cap] = 0.0
        observe = policy.observed(False, 1)
        if fused is not None:  # the slots where they lie, the new token apart: no float32 copies, one fused pass
            if self._rows is None or self._rows.numel() != query.shape[0]:  # row b reads slot b: made once
                self._rows = torch.arange(query.shape[0], device=query.device)
            p = self.precision
            out, attn = fused(
                query[:, :, 0],
                self._read(self.keys[:, :, cap], KEYS),  # the new token as stored
                self._read(self.values[:, :, cap], VALUES),
                self.keys[:, :, :cap],
                self.values[:, :, :cap],
                self.pos[:, :, :cap],
                self._rows,
                q_pos[:, 0],
                scaling,
                window,
                observe > 0,
                (p.scale(KEYS, self.layer), p.scale(VALUES, self.layer)) if p.quantized else None,
            )
            out = out[:, None]
            keys = self._read(self.keys, KEYS) if policy.needs_keys else None
        else:
            keys, values = self._read(self.keys, KEYS), self._read(self.values, VALUES)
            if observe:
                out, attn = candidate_attention(query, keys, values, self.pos, q_pos, scaling, window, observe)
            else:
                out, attn = slot_attention(query, keys, values, self.pos, q_pos, scaling, window), None
        c = Candidates(keys, None, self.pos, self.score, attn, False, scaling, self.precision.key_centres(self.layer))
        state = dict(self.extra)
        keep = policy.select(self.extra, c, query, q_pos)
        pos = torch.where(keep, self.pos, -1)
        free = (
            (pos[..., :cap] < 0).to(torch.int8).argmax(dim=-1, keepdim=True)
        )  # [b, h, 1]; one exists if the new token is kept
        source = torch.where(keep[..., cap:], cap, free)  # the slot `free` takes: the new token if kept, else itself
        for t in (as_bytes(self.keys), as_bytes(self.values)):  # FP8 moved as its bytes (no float8 gather on a CPU)
            t.scatter_(
                2,
                free[..., None].expand(-1, -1, -1, t.shape[-1]),
                t.gather(2, source[..., None].expand(-1, -1, -1, t.shape[-1])),
            )
        # every piece of state is written where it lies, so a CUDA graph's replay finds it there (rlkv.hf.graphs)
        self.pos.copy_(pos.scatter(-1, free, pos.gather(-1, source)))
        self.pos[..., cap] = -1
        if c.score is not None:
            score = torch.where(keep, c.score, 0.0)
            self.score.copy_(score.scatter(-1, free, score.gather(-1, source)))
        for name, t in state.items():
            self.extra[name] = t.copy_(self.extra[name])
        return out

    def _to_slots(self, width: int) -> None:
        """Widen the storage to `width` slots (the new ones empty, position -1)."""
        extra = width - self.pos.shape[-1]
        self.keys = F.pad(self.keys, (0, 0, 0, extra))
        self.values = F.pad(self.values, (0, 0, 0, extra))
        self.pos = F.pad(self.pos, (0, extra), value=-1)
        if self.score is not None:
            self.score = F.pad(self.score, (0, extra))

    # ------------------------------------------------------------------ bookkeeping
    def stored(self) -> torch.Tensor:
        """[b, h]: tokens held per KV head."""
        return (self.pos >= 0).sum(dim=-1)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.keys, self.values, self.pos, self.score, *self.extra.values()) if t is not None]

    def nbytes(self, capacity: int | None = None) -> int:
        """Bytes held: min(tokens fed, capacity) slots per KV head and row, and the policy state (the decoding
        steps' spare slot, scratch for the new token, is not counted)."""
        if not self.is_initialized:
            return 0
        width = self.pos.shape[-1] if capacity is None else min(self.cumulative_length, capacity)
        rows = self.pos.shape[0]
        return int(rows * self.sequence_nbytes(torch.tensor(width), width))

    def sequence_nbytes(self, num_tokens: torch.Tensor, capacity: int) -> torch.Tensor:
        """Bytes one sequence of `num_tokens` occupies: min(num_tokens, capacity) slots plus its policy state."""
        if not self.is_initialized:
            return torch.zeros_like(num_tokens)
        per_slot = sum(
            t[0, :, 0].numel() * t.element_size()
            for t in (self.keys, self.values, self.pos, self.score)
            if t is not None
        )
        state = sum(t[0].numel() * t.element_size() for t in self.extra.values())
        return num_tokens.clamp(max=capacity) * per_slot + state

    def _map(self, fn) -> None:
        for name in ("keys", "values", "pos", "score"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))
        self.extra = {k: fn(t) for k, t in self.extra.items()}

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("TokenDropCache cannot be cropped: evicted tokens are gone (no assisted decoding)")

    def reset(self) -> None:
        raise NotImplementedError("TokenDropCache cannot be reset; create a new one per generation")


class TokenDropCache(ReplayableCache):
    """A transformers Cache holding at most `policy.capacity` tokens per layer and KV head."""

    def __init__(
        self, policy: Policy, num_layers: int, planned: int | None = None, precision: KVPrecision | None = None
    ):
        super().__init__(layers=[TokenDropLayer(i, precision) for i in range(num_layers)])
        self.policy = policy
        self.planned = planned  # the most tokens it will store, where known (a one-beam `generate`'s max_cache_length)
        self.fixed_pos: torch.Tensor | None = None  # inside `fixed_step`: the new tokens' positions

    @property
    def batch(self) -> int | None:
        return self.layers[0].pos.shape[0] if self.layers[0].is_initialized else None

    def replayable(self) -> bool:
        """Whether the next single-token forward can be a fixed step (`rlkv.hf.graphs`): the prompt done,
        built by a one-beam `generate`."""
        return self.planned is not None and all(layer.is_initialized for layer in self.layers)

    @contextmanager
    def fixed_step(self, q_pos: torch.Tensor, column: torch.Tensor):
        """Forwards inside take the new tokens' positions from `q_pos` and count nothing (`column` is not needed:
        slots are found by position)."""
        self.fixed_pos = q_pos
        for layer in self.layers:
            layer.counts = False
        try:
            yield
        finally:
            self.fixed_pos = None
            for layer in self.layers:
                layer.counts = True

    def nbytes(self) -> int:
        """Bytes this cache holds right now (K/V, positions, scores, policy state; see `TokenDropLayer.nbytes`)."""
        return sum(layer.nbytes(self.policy.capacity) for layer in self.layers)

    def sequence_nbytes(self, num_tokens: torch.Tensor) -> torch.Tensor:
        """Bytes each sequence needs for its own `num_tokens` [batch] (padding of other rows excluded)."""
        return sum(layer.sequence_nbytes(num_tokens, self.policy.capacity) for layer in self.layers)


class _Session:
    """Per `token_drop` block: the latest forward's cache and new-token positions."""

    def __init__(self, policy: Policy, base: str, fused, num_layers: int, precision: KVPrecision | None = None):
        self.policy, self.base, self.fused, self.num_layers = policy, base_attention(base), fused, num_layers
        self.precision = precision
        self.cache: Cache | None = None
        self.q_pos: torch.Tensor | None = None
        self._planned = None  # the most tokens the cache `generate` is about to build will store (None: not replayable)

    def before_generate(self, generation_config, model_kwargs: dict, max_cache_length: int | None) -> None:
        self._planned = planned_columns(generation_config, max_cache_length)

    def new_cache(self) -> TokenDropCache:
        return TokenDropCache(self.policy, self.num_layers, planned=self._planned, precision=self.precision)

    def before_forward(self, step: Step) -> None:
        self.q_pos, self.cache = step.q_pos, step.cache


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    session: _Session = state_of(module, "rlkv token-drop")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if not isinstance(session.cache, TokenDropCache):
        return session.base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    layer = session.cache.layers[module.layer_idx]
    q_pos = session.q_pos if session.cache.fixed_pos is None else session.cache.fixed_pos
    out = layer.attend(query, key, value, q_pos, scaling, kwargs.get("sliding_window"), session.policy, session.fused)
    return out, None


def token_drop(
    model, policy: Policy, kernel: bool | None = None, cuda_graphs: bool | None = None, kv_dtype: str = "bf16"
):
    """Inside the block, `model.generate` uses a `TokenDropCache` run by `policy`; yields a handle with `.cache`.
    `kernel`: decoding steps attend in the Triton slot kernel (None: with the model on CUDA). `cuda_graphs`:
    `generate`'s decoding steps are replayed from a CUDA graph (`rlkv.hf.graphs`; None: on CUDA).
    `kv_dtype`: "bf16" (the model's dtype) or "fp8" (`rlkv.precision`)."""
    cuda = next(model.parameters()).device.type == "cuda"
    kernel = cuda if kernel is None else kernel
    graphs = check_cuda_graphs(cuda_graphs, cuda)
    fused = None
    if kernel:  # Triton: imported only when used
        from rlkv.attention.slot_kernel import slot_attention as fused
    if kv_dtype not in ("bf16", "fp8"):
        raise ValueError(f"a token-dropping cache holds K/V at kv_dtype 'bf16' or 'fp8', got {kv_dtype!r}")
    session = _Session(
        policy,
        model.config._attn_implementation,
        fused,
        model.config.get_text_config().num_hidden_layers,
        precisions(model, kv_dtype).kept,
    )
    return with_graphs(
        model, session, patched(model, "rlkv_tokendrop", _attention, session, make_cache=session.new_cache), graphs
    )
