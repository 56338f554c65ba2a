"""The head-split KV cache of `rlkv.compress`: full K/V for kept heads, a sink + recent ring for the others.

Storage. Each layer holds ONE buffer for keys and one for values, [batch, slots, head_dim]: first
the compressed heads' rings (`sink + recent` slots per head), then the kept heads' columns, token
by token (column t of the j-th kept head is slot rings + t * kept + j), so the slots in use are
always one prefix of the buffer. Column t is the t-th token fed (padding included, as in a
DynamicCache); token position p of a row lives in ring slot p while p < sink, else in
sink + (p - sink) mod recent. Capacity grows for every layer at once, by `GROW` columns, so a
decoding step writes in place instead of concatenating. `nbytes()` reports the bytes in use
(what a cache growing by exactly one column per token holds); the allocation exceeds it by less
than `GROW` columns per kept head and layer.

Steps. `HeadSplitCache.begin` plans each forward once for all layers:
- decoding (one real token per row, no prompt pending, no sliding window in force): a `DecodeStep`,
  planned on the device from two small tensors (each row's new position, the column it is
  stored in): each row's ring slot, the ring positions after the write, and per keep pattern
  (which heads of a layer are kept) the slot each head's new token goes to and the mask of
  slots each query head may attend (an additive mask in the model's dtype). A layer then runs
  one scatter for keys, one for values and ONE attention call over its whole buffer (columns not
  yet written are masked out), with its query heads along the query axis (q [b, 1, hq, d] against
  keys [b, 1, slots, d]): no per-head index or GQA expansion, no host synchronization and no shape
  that changes from step to step, so on a GPU the step is replayed from a CUDA graph
  (`rlkv.hf.graphs`).
- any other forward (prefill, prompt chunks, padding queries, a sliding window in force): a `Plan`;
  kept heads attend with the model's own attention over their columns; compressed heads over their
  ring (with prefill="full", over the whole prompt so far) plus the new tokens, by the rule of
  `keep_keys_mask`; then every ring takes its sinks and its last `recent` tokens.
Outside decoding steps, layers whose heads are all kept are attended by the model's own attention
over their columns. A model with every head kept needs no HeadSplitCache (`rlkv.compress` keeps
transformers' DynamicCache then).

prefill="full" (the RLKV authors' rule): while the prompt is being fed, compressed heads keep
every prompt token and prompt queries attend to all of them; when the last prompt token has
been fed, the compressed heads are cut to sink + recent.

Precision (`rlkv.precision`). Kept heads' columns and rings are stored at their own precisions
(`KVPrecisions`: the model's dtype, or FP8 with per-KV-head scales). When either is FP8 a layer keeps
two buffers per K and V, the rings' and the kept columns', each in its own dtype (same layout, rings
first), rounds every new key and value before anything attends to it, and reads what it stored back
dequantised: a decoding step attends over the two buffers read back and joined in the layout above.
`nbytes()` counts what is stored.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.cache_utils import CacheLayerMixin

from rlkv.attention.reference import keep_keys_mask
from rlkv.attention.ring import query_heads, ring_slot
from rlkv.hf.graphs import ReplayableCache
from rlkv.hf.plumbing import CompressedLayer, Step
from rlkv.precision import KEYS, VALUES, KVPrecisions, as_bytes, centred

GROW = 256  # columns added per kept head when a layer's buffer is full
GRAPH_GROW = 1024  # columns a cache whose steps are replayed makes room for at once (each growth re-records the step)
PREFILL_MODES = ("compressed", "full")
# torch's first choice for masked attention on Hopper, cuDNN, builds an execution plan for every new shape
# (tenths of a second each), and a decoding step's key count grows with every token; the other kernels do not.
NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention(query, key, value, mask, scale: float) -> torch.Tensor:
    """`scaled_dot_product_attention` with an additive or boolean `mask`, never on cuDNN's attention."""
    if query.is_cuda and torch.backends.cuda.cudnn_sdp_enabled():
        with sdpa_kernel(NO_CUDNN):
            return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


def ring_plan(pos: torch.Tensor, sink: int, recent: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(src, hit) [b, sink + recent]: which candidate (index into `pos` [b, n]) each ring slot takes, if any.

    A ring keeps the candidates at positions < sink and the last `recent` of each row; where two
    map to one slot, the later candidate wins. Padding (-1) is never kept."""
    size = sink + recent
    last = pos.max(dim=-1, keepdim=True).values
    keep = (pos >= 0) & ((pos < sink) | (pos > last - recent))
    slot = torch.where(keep, ring_slot(pos, sink, recent), size)  # dropped candidates go to a slot that is cut off
    index = torch.arange(pos.shape[1], device=pos.device).expand_as(pos)
    src = torch.full((pos.shape[0], size + 1), -1, dtype=torch.long, device=pos.device)
    src = src.scatter_reduce(1, slot, index, reduce="amax")[:, :size]
    return src.clamp(min=0), src >= 0


class Parts:
    """What the layers of one forward share, each part built by the first layer that asks for it."""

    def __init__(self):
        self._parts: dict = {}

    def part(self, key, build):
        if key not in self._parts:
            self._parts[key] = build()
        return self._parts[key]


class Plan(Parts):
    """What every layer of a forward that is not a decoding step shares; built by `HeadSplitCache.begin`,
    parts on first use."""

    def __init__(self, cache: HeadSplitCache, step: Step, prompt_len):
        super().__init__()
        self.cache, self.q_pos, self.k_pos, self.prompt_len = weakref.proxy(cache), step.q_pos, step.k_pos, prompt_len
        self.start, self.length = cache.length, cache.length + step.q_pos.shape[1]
        self.from_prompt = cache.prompt_pos is not None  # compressed heads hold the prompt so far, not a ring
        self.stored_pos = cache.prompt_pos if self.from_prompt else cache.ring_pos

    def candidates(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(positions of stored + new tokens [b, n], ring src, ring hit); src/hit None while the prompt stays open."""

        def build():
            pos = torch.cat([self.stored_pos, self.q_pos], dim=-1)
            if self.cache.prompt_open_after(self):
                return pos, None, None
            return (pos, *ring_plan(pos, self.cache.sink, self.cache.recent))

        return self.part("candidates", build)

    def candidate_mask(self, window: int | None) -> torch.Tensor:
        """[b, 1, q, n]: which candidates each new query of a compressed head attends (padding queries: any)."""

        def build():
            pos = self.candidates()[0]
            none = torch.zeros(1, dtype=torch.bool, device=pos.device)
            mask = keep_keys_mask(self.q_pos, pos, none, self.cache.sink, self.cache.recent, window, self.prompt_len)
            return mask | (self.q_pos < 0)[:, None, :, None]

        return self.part(("mask", window), build)


class DecodeStep(Parts):
    """A decoding step planned on the device from fixed inputs: `q_pos` [b, 1] (each row's new position)
    and `column` [1] (tokens fed so far, the column the new tokens go to).

    Nothing in it reads a value back to the host or depends on the step's number except through those
    two tensors, and it writes every piece of state in place, so a CUDA graph of the step replays by
    refilling them (`rlkv.hf.graphs`). `counts`: the layers count the new tokens (False inside
    `HeadSplitCache.fixed_step`: the graph runner counts each step)."""

    def __init__(self, cache: HeadSplitCache, q_pos: torch.Tensor, column: torch.Tensor, counts: bool = True):
        super().__init__()
        self.cache, self.q_pos, self.column, self.counts = weakref.proxy(cache), q_pos, column, counts

    def slot(self) -> torch.Tensor:
        """Each row's ring slot [b, 1]; on first use, writes the new positions into the ring positions
        and marks the new column valid (once per step, before any layer attends)."""

        def build():
            cache = self.cache
            slot = ring_slot(self.q_pos, cache.sink, cache.recent)
            cache.ring_pos.scatter_(1, slot, self.q_pos)
            cache.col_valid.index_fill_(1, self.column, True)
            return slot

        return self.part("slot", build)

    def ring_mask(self, dtype) -> torch.Tensor:
        """Additive mask [b, 1, 1, sink + recent] of the ring slots that hold a token."""

        def build():
            self.slot()
            empty = (self.cache.ring_pos < 0)[:, None, None, :]
            return torch.zeros(empty.shape, dtype=dtype, device=empty.device).masked_fill_(empty, float("-inf"))

        return self.part(("ring_mask", dtype), build)

    def layout(self, keep: tuple[bool, ...], group: int, dtype, dim: int):
        """(write index [b, h, dim], additive mask [b, 1, hq, slots]) of a layer with keep pattern `keep`:
        where each head's new token goes, and which slots of the whole buffer each query head attends."""

        def build():
            cache, slot = self.cache, self.slot()
            kept, offset, match = cache.flat_layout(keep, group, slot.device)
            nf, nc = sum(keep), len(keep) - sum(keep)
            index = offset + torch.where(kept, self.column * nf, slot)  # [b, h]
            valid = torch.cat(
                [(cache.ring_pos >= 0).repeat(1, nc), cache.col_valid.repeat_interleave(nf, dim=1)], dim=1
            )
            valid = valid[:, None, None, :] & match
            mask = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill_(~valid, float("-inf"))
            return index[:, :, None].expand(-1, -1, dim), mask

        return self.part(("layout", keep), build)


class HeadSplitLayer(CompressedLayer, CacheLayerMixin):
    """One layer's cache (see the module docstring): kept columns and rings in one buffer."""

    is_sliding = False

    def __init__(
        self, keep: torch.Tensor, owner: HeadSplitCache, layer: int = 0, precisions: KVPrecisions | None = None
    ):
        super().__init__()
        self.layer, self.precisions = layer, precisions  # None: the model's dtype, one buffer
        self.split = precisions is not None and (precisions.kept.quantized or precisions.compressed.quantized)
        self.kept_keys = self.kept_values = None  # `split`: the kept heads' columns, apart from the rings
        self.keep = keep.bool().cpu()
        self.pattern = tuple(self.keep.tolist())
        self.nf, self.nc = int(self.keep.sum()), int((~self.keep).sum())
        self.owner = weakref.proxy(owner)  # no reference cycle: the cache's memory goes as soon as it does
        self.cumulative_length = 0
        self.capacity = 0
        self.prompt_keys = self.prompt_values = None  # prefill="full": compressed heads' prompt K/V so far

    @property
    def ring_size(self) -> int:
        return self.owner.sink + self.owner.recent

    def kept(self, t: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
        """[b, nf, capacity, d] view of the kept heads' columns of buffer `t` (`split`: of the kept buffer `t`)."""
        capacity = self.capacity if capacity is None else capacity
        start = 0 if self.split else self.nc * self.ring_size
        return t[:, start : start + capacity * self.nf].view(t.shape[0], capacity, self.nf, t.shape[-1]).transpose(1, 2)

    # ------------------------------------------------------------------ precision (`split` layers)
    def _kept_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.kept_keys, self.kept_values) if self.split else (self.keys, self.values)

    def _store(self, x: torch.Tensor, which: int, kept: bool) -> torch.Tensor:
        """`x` (this layer's kept or compressed heads along dimension 1) as their buffer holds it."""
        if not self.split:
            return x
        precision, heads = (
            (self.precisions.kept, self.full_idx) if kept else (self.precisions.compressed, self.comp_idx)
        )
        return precision.store(x, which, self.layer, heads, 1)

    def _read(self, x: torch.Tensor, which: int, kept: bool) -> torch.Tensor:
        """Stored `x` (kept or compressed heads along dimension 1) in the model's dtype."""
        if not self.split:
            return x
        precision, heads = (
            (self.precisions.kept, self.full_idx) if kept else (self.precisions.compressed, self.comp_idx)
        )
        return precision.load(x, which, self.layer, heads, 1, self.dtype)

    def _joined(self, which: int) -> torch.Tensor:
        """[b, slots, d] in the model's dtype: rings then kept columns, read back (`split` decoding steps)."""
        ring, kept = (self.keys, self.kept_keys) if which == KEYS else (self.values, self.kept_values)
        b, d = ring.shape[0], ring.shape[-1]
        rings = self._read(self.ring(ring), which, False).reshape(b, -1, d)
        columns = self._read(self.kept(kept), which, True).transpose(1, 2).reshape(b, -1, d)
        return torch.cat([rings, columns], dim=1)

    def ring(self, t: torch.Tensor) -> torch.Tensor:
        """[b, nc, sink + recent, d] view of the compressed heads' rings of buffer `t`."""
        return t[:, : self.nc * self.ring_size].view(t.shape[0], self.nc, self.ring_size, t.shape[-1])

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b = key_states.shape[0]
        self.dtype, self.device = key_states.dtype, key_states.device
        self.full_idx = torch.nonzero(self.keep).flatten().to(self.device)
        self.comp_idx = torch.nonzero(~self.keep).flatten().to(self.device)
        slots = self.nc * self.ring_size
        self.key_centres = None  # what new keys are stored less (`rlkv.precision.centred`)
        if self.split:
            self.precisions = self.precisions.to(self.device)
            self.key_centres = self.precisions.key_centres(self.layer, self.full_idx, self.comp_idx)
            ring, kept = self.precisions.compressed.dtype, self.precisions.kept.dtype
            self.keys = key_states.new_zeros(b, slots, key_states.shape[-1], dtype=ring)
            self.values = value_states.new_zeros(b, slots, value_states.shape[-1], dtype=ring)
            self.kept_keys = key_states.new_zeros(b, 0, key_states.shape[-1], dtype=kept)
            self.kept_values = value_states.new_zeros(b, 0, value_states.shape[-1], dtype=kept)
        else:
            self.keys = key_states.new_zeros(b, slots, key_states.shape[-1])
            self.values = value_states.new_zeros(b, slots, value_states.shape[-1])
        self.is_initialized = True

    def _grow(self, capacity: int) -> None:
        """Re-allocate the buffers with `capacity` columns per kept head (contents kept)."""
        rings = 0 if self.split else self.nc * self.ring_size
        for name in ("kept_keys", "kept_values") if self.split else ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[0], rings + self.nf * capacity, old.shape[-1])
            new[:, : old.shape[1]] = old
            setattr(self, name, new)
        self.capacity = capacity
        self._kept_views = tuple(self.kept(t) for t in self._kept_buffers())

    def update(self, key_states, value_states, *args, **kwargs):
        """Count the new tokens. In a decoding step every layer stores them in `decode`; otherwise an all-kept
        layer stores them now and returns its columns (for the model's own attention), the others store
        them in `attend`, which needs the ring as it was."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        plan = self.owner.plan
        if isinstance(plan, DecodeStep):
            self.cumulative_length += plan.counts
            return key_states, value_states
        start = self.cumulative_length
        self.cumulative_length += key_states.shape[-2]
        self.reserve(self.owner.capacity)
        if self.nc:
            return key_states, value_states
        keys, values = self._kept_views
        key_states = centred(key_states, self.key_centres)
        keys[:, :, start : self.cumulative_length] = self._store(key_states, KEYS, True)
        values[:, :, start : self.cumulative_length] = self._store(value_states, VALUES, True)
        end = self.cumulative_length
        return self._read(keys[:, :, :end], KEYS, True), self._read(values[:, :, :end], VALUES, True)

    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` columns per kept head (the buffers move only when they grow)."""
        if self.nf and self.capacity < capacity:
            self._grow(capacity)

    def attend(self, module, query, key, value, attention_mask, scaling: float, window: int | None, base, kwargs):
        """Attention output [b, q, hq, d] of a layer with compressed heads in any forward but a decoding
        step; stores the new tokens."""
        plan = self.owner.plan
        b, hq, q, _ = query.shape
        group = hq // self.keep.numel()
        out = query.new_empty(b, q, hq, value.shape[-1])
        q_full, q_comp = self.owner.query_heads(self, group, query.device)
        if self.split:  # as attention reads them once stored
            key = centred(key, self.key_centres)
            key, value = self.precisions.round_trip(self.layer, self.full_idx, self.comp_idx, key, value, dim=1)
        if self.nf:
            keys, values = self._kept_views
            keys[:, :, plan.start : plan.length] = self._store(key[:, self.full_idx], KEYS, True)
            values[:, :, plan.start : plan.length] = self._store(value[:, self.full_idx], VALUES, True)
            out[:, :, q_full] = base(
                module,
                query[:, q_full],
                self._read(keys[:, :, : plan.length], KEYS, True),
                self._read(values[:, :, : plan.length], VALUES, True),
                attention_mask,
                scaling=scaling,
                **kwargs,
            )[0]
            key, value = key[:, self.comp_idx], value[:, self.comp_idx]
        out[:, :, q_comp] = self._attend_compressed(query[:, q_comp], key, value, plan, scaling, window, group)
        return out

    def decode(self, query, key, value, scaling: float) -> torch.Tensor:
        """Attention output [b, 1, hq, d] of a decoding step (`DecodeStep`); stores the new token."""
        step = self.owner.plan
        b, hq, _, d = query.shape
        group = hq // self.keep.numel()
        index, mask = step.layout(self.pattern, group, query.dtype, max(self.keys.shape[-1], self.values.shape[-1]))
        if self.split:
            keys, values = self._decode_split(index, centred(key[:, :, 0], self.key_centres), value[:, :, 0])
        else:
            self.keys.scatter_(1, index[..., : self.keys.shape[-1]], key[:, :, 0])
            self.values.scatter_(1, index[..., : self.values.shape[-1]], value[:, :, 0])
            keys, values = self.keys, self.values
        if self.nf == 0:  # rings only: each KV head's query heads form its query axis
            out = attention(
                query.reshape(b, self.nc, group, d),
                self.ring(keys),
                self.ring(values),
                step.ring_mask(query.dtype),
                scaling,
            )
            return out.reshape(b, 1, hq, -1)
        return attention(query.reshape(b, 1, hq, d), keys[:, None], values[:, None], mask, scaling)

    def _decode_split(self, index: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple:
        """A decoding step's new K/V [b, h, d] into the rings' and the kept columns' buffers (`index` as into one
        buffer, rings first), then both read back joined: (keys, values) [b, slots, d]."""
        rings = self.nc * self.ring_size
        for which, new, ring, kept in (
            (KEYS, key, self.keys, self.kept_keys),
            (VALUES, value, self.values, self.kept_values),
        ):
            at = index[..., : new.shape[-1]]
            if self.nc:
                stored = self._store(new[:, self.comp_idx], which, False)
                as_bytes(ring).scatter_(1, at[:, self.comp_idx], as_bytes(stored))
            if self.nf:
                stored = self._store(new[:, self.full_idx], which, True)
                as_bytes(kept).scatter_(1, at[:, self.full_idx] - rings, as_bytes(stored))
        return self._joined(KEYS), self._joined(VALUES)

    def _attend_compressed(self, query, new_k, new_v, plan: Plan, scaling: float, window, group: int) -> torch.Tensor:
        """Compressed heads over stored (ring or prompt) + new tokens [b, q, hq_c, d]; then store the new tokens."""
        _, src, hit = plan.candidates()
        stored_k, stored_v = (
            (self.prompt_keys, self.prompt_values)
            if plan.from_prompt
            else (self._read(self.ring(self.keys), KEYS, False), self._read(self.ring(self.values), VALUES, False))
        )
        if stored_k is None:
            stored_k, stored_v = new_k[:, :, :0], new_v[:, :, :0]
        keys, values = torch.cat([stored_k, new_k], dim=-2), torch.cat([stored_v, new_v], dim=-2)
        mask = plan.candidate_mask(window)
        out = attention(query, keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1), mask, scaling)
        if src is None:
            self.prompt_keys, self.prompt_values = keys, values
        else:
            self.prompt_keys = self.prompt_values = None
            for which, ring, cand in ((KEYS, self.ring(self.keys), keys), (VALUES, self.ring(self.values), values)):
                taken = cand.gather(2, src[:, None, :, None].expand(-1, cand.shape[1], -1, cand.shape[-1]))
                ring.copy_(
                    self._store(torch.where(hit[:, None, :, None], taken, self._read(ring, which, False)), which, False)
                )
        return out.transpose(1, 2)

    # ------------------------------------------------------------------ bookkeeping
    def nbytes(self) -> int:
        """Bytes in use: kept heads' columns so far, rings and their positions, a pending full prompt."""
        if not self.is_initialized:
            return 0
        rows = self.keys.shape[0]
        held = int(self.sequence_nbytes(torch.tensor(self.cumulative_length)))
        prompt = sum(t.numel() * t.element_size() for t in (self.prompt_keys, self.prompt_values) if t is not None)
        return rows * held + prompt

    def sequence_nbytes(self, num_tokens: torch.Tensor) -> torch.Tensor:
        """Bytes one sequence of `num_tokens` occupies here: kept heads per token, plus its rings and positions."""
        if not self.is_initialized:
            return torch.zeros_like(num_tokens)
        width = self.keys.shape[-1] + self.values.shape[-1]
        ring_slot, kept_slot = (t.element_size() * width for t in (self.keys, self._kept_buffers()[0]))
        ring = self.nc * self.ring_size * ring_slot + (self.ring_size * 8 if self.nc else 0)
        return num_tokens * self.nf * kept_slot + ring

    BUFFERS = ("keys", "values", "kept_keys", "kept_values", "prompt_keys", "prompt_values")

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (getattr(self, name) for name in self.BUFFERS) if t is not None]

    def _map(self, fn) -> None:
        for name in self.BUFFERS:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))
        if self.nf:
            self._kept_views = tuple(self.kept(t) for t in self._kept_buffers())

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "HeadSplitCache cannot be cropped: compressed heads have already dropped old tokens "
            "(assisted/speculative decoding is not supported with rlkv.compress)"
        )

    def reset(self) -> None:
        raise NotImplementedError("HeadSplitCache cannot be reset; create a new one per generation")


class HeadSplitCache(ReplayableCache):
    """A transformers Cache whose layers keep full K/V only for kept heads (see the module docstring)."""

    FRESH = ("plan", "graph", "graph_step")  # a deep copy's next forward makes its own

    def __init__(
        self,
        keep: torch.Tensor,
        sink: int,
        recent: int,
        prefill: str = "compressed",
        planned: int | None = None,
        precisions: KVPrecisions | None = None,
    ):
        """`precisions`: the kept heads' and the rings' (None: the model's dtype)."""
        if prefill not in PREFILL_MODES:
            raise ValueError(f"prefill must be one of {PREFILL_MODES}, got {prefill!r}")
        quantized = precisions is not None and (precisions.kept.quantized or precisions.compressed.quantized)
        if bool(keep.all()) and not quantized:
            raise ValueError(
                "a HeadSplitCache at the model's dtype needs at least one compressed head (with every head kept, "
                "use a DynamicCache)"
            )
        super().__init__(layers=[HeadSplitLayer(keep[i], self, i, precisions) for i in range(keep.shape[0])])
        self.keep, self.sink, self.recent, self.prefill = keep, sink, recent, prefill
        self.planned = planned  # the most columns it will store, where known (`generate`'s max_cache_length)
        self.length = 0  # columns fed so far
        self.capacity = 0  # columns allocated per kept head
        self.ring_pos: torch.Tensor | None = None  # [b, sink + recent]: position in each ring slot, -1 = empty
        self.col_valid: torch.Tensor | None = None  # [b, capacity]: which columns hold a token (not padding, fed)
        self.prompt_pos: torch.Tensor | None = None  # prefill="full": positions of the prompt so far
        self.plan: Plan | DecodeStep | None = None
        self.graph_step: DecodeStep | None = None  # inside `fixed_step`: forwards use it as their plan
        self._q_idx: dict = {}
        self._layouts: dict = {}

    def begin(self, step: Step, prompt_len=None, window_in_force: bool = False) -> None:
        """Plan the forward `step` for every layer (called before the decoder runs); `window_in_force`: some
        layer's sliding window already hides old tokens (no `DecodeStep` then)."""
        b, q = step.q_pos.shape
        self.reserve(self.length + q)
        if self.ring_pos is None:
            self.ring_pos = torch.full((b, self.sink + self.recent), -1, dtype=torch.long, device=step.q_pos.device)
            self.col_valid = torch.zeros(b, self.capacity, dtype=torch.bool, device=step.q_pos.device)
            if self.prefill == "full":
                self.prompt_pos = step.q_pos[:, :0]
        if q == 1 and not window_in_force and self.prompt_pos is None and bool((step.q_pos >= 0).all()):
            self.plan = DecodeStep(self, step.q_pos, torch.full((1,), self.length, device=step.q_pos.device))
        else:
            self.col_valid[:, self.length : self.length + q] = step.q_pos >= 0
            self.plan = plan = Plan(self, step, prompt_len)
            pos, src, hit = plan.candidates()
            if src is None:
                self.prompt_pos = pos
            else:
                base = torch.full_like(self.ring_pos, -1) if plan.from_prompt else self.ring_pos
                self.ring_pos.copy_(torch.where(hit, pos.gather(1, src), base))
                self.prompt_pos = None
        self.length += q

    def reserve(self, columns: int) -> None:
        """Room for `columns` columns per kept head, in every layer at once (grown by multiples of `GROW`)."""
        if columns <= self.capacity:
            return
        self.capacity = -(-columns // GROW) * GROW
        self.graph = None
        if self.col_valid is not None:
            self.col_valid = F.pad(self.col_valid, (0, self.capacity - self.col_valid.shape[1]))
        for layer in self.layers:
            if layer.is_initialized:
                layer.reserve(self.capacity)

    @property
    def batch(self) -> int | None:
        return None if self.ring_pos is None else self.ring_pos.shape[0]

    def replayable(self) -> bool:
        """Whether the next single-token forward can be a fixed step (`rlkv.hf.graphs`): the prompt done, in a
        cache `generate` planned (its columns known)."""
        return (
            self.ring_pos is not None
            and self.prompt_pos is None
            and self.planned is not None
            and self.length < self.planned
        )

    def prepare_step(self) -> None:
        """Room for the next fixed step: when the buffers are full they grow by `GRAPH_GROW` columns (never
        beyond the planned ones), which drops the captured step, so it is recorded again where they now lie."""
        if self.length >= self.capacity:
            self.reserve(min(self.planned, self.length + GRAPH_GROW))

    @contextmanager
    def fixed_step(self, q_pos: torch.Tensor, column: torch.Tensor):
        """Forwards inside are `DecodeStep`s on these inputs that count nothing (after `prepare_step`)."""
        self.plan = self.graph_step = DecodeStep(self, q_pos, column, counts=False)
        try:
            yield
        finally:
            self.graph_step = None

    def advance(self) -> None:
        self.length += 1
        super().advance()

    def prompt_open_after(self, plan: Plan) -> bool:
        """prefill="full": whether some row's prompt is still unfinished after this forward."""
        if not plan.from_prompt:
            return False
        done = plan.q_pos.max(dim=-1).values + 1 >= torch.as_tensor(plan.prompt_len, device=plan.q_pos.device)
        return not bool(done.all())

    def flat_layout(self, keep: tuple[bool, ...], group: int, device):
        """(kept [h], first slot of each head [h], query head x slot ownership [hq, slots]) of the buffer
        of a layer with keep pattern `keep` at the current capacity (kept heads' slots: column 0)."""
        key = (keep, group, self.capacity)
        if key not in self._layouts:
            kept = torch.tensor(keep, device=device)
            size, nc = self.sink + self.recent, len(keep) - sum(keep)
            before = torch.cumsum(kept.long(), 0) - kept.long()  # kept heads before each head
            offset = torch.where(kept, nc * size + before, (torch.arange(len(keep), device=device) - before) * size)
            owner = torch.cat(
                [
                    torch.nonzero(~kept).flatten().repeat_interleave(size),
                    torch.nonzero(kept).flatten().repeat(self.capacity),
                ]
            )
            match = owner[None, :] == torch.arange(len(keep) * group, device=device)[:, None] // group
            self._layouts = {k: v for k, v in self._layouts.items() if k[2] == self.capacity}
            self._layouts[key] = (kept, offset, match)
        return self._layouts[key]

    def query_heads(self, layer: HeadSplitLayer, group: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if layer.pattern not in self._q_idx:
            self._q_idx[layer.pattern] = query_heads(layer.keep, group, device)
        return self._q_idx[layer.pattern]

    def nbytes(self) -> int:
        """Bytes of K/V (and ring positions) this cache holds right now."""
        return sum(layer.nbytes() for layer in self.layers)

    def sequence_nbytes(self, num_tokens: torch.Tensor) -> torch.Tensor:
        """Bytes each sequence needs for its own `num_tokens` [batch] (padding of other rows excluded)."""
        return sum(layer.sequence_nbytes(num_tokens) for layer in self.layers)

    def __deepcopy__(self, memo):
        """A copy whose layers point to it (a weak reference, as here)."""
        clone = super().__deepcopy__(memo)
        for layer in clone.layers:
            layer.owner = weakref.proxy(clone)
        return clone

    def _map_shared(self, fn) -> None:
        for name in ("ring_pos", "col_valid", "prompt_pos"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_shared(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_shared(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_shared(lambda t: t.repeat_interleave(repeats, dim=0))
