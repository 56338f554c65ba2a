"""The engine's attention: store each forward's new K/V in the KV store, then attend over it.

The engine registers `attention` (below) as the model's attention implementation, so the
model's own modules project, normalise and rotate q/k/v; this module only stores and attends, as
one custom operator, `rlkv::attention` (`engine_attention`), which torch.compile keeps opaque
(`rlkv.engine.compiled`). A forward is either
- a decode step (`Decode`): one new token for each of B sequences. Its K/V go to the pages of
  kept heads and the rings of compressed ones, then kept heads attend over their pages,
  compressed heads over their ring: two Triton kernels on CUDA (`rlkv.engine.kernel`) or the
  plain torch code here (`store_torch`, `decode_torch`), which the kernels are tested against;
- a prefill of new prompts (`Prompts`): whole prompts, each from its first token, packed into
  one row padded to a fixed length. Each prompt attends with SDPA over its own tokens only
  (`rlkv.attention.reference.keep_keys_mask` within the prompt), then its K/V are stored as a
  decode step's are. Every shape depends only on the padded length, so on CUDA the engine
  replays it as a CUDA graph: a prefill costs the host one launch instead of a few hundred;
- a chunked prefill (`Prefill`): chunks of prompts too long for that, packed into one row. Each
  chunk attends with SDPA over its sequence's stored keys plus itself, with the mask of
  `keep_keys_mask`; compressed heads see their ring plus the chunk.
In gated mode (RL rollouts) every head is paged and its output is
alpha * full + (1 - alpha) * streaming attention, both over the same keys.
With FP8 pages or rings (`rlkv.precision`) every new key is centred first, and every new key and value is
rounded to its head's precision before anything attends to it (`KVStore.round_trip`), so a prefill reads
what a later decode step reads.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from rlkv.attention.reference import gate_mix, keep_keys_mask, masked_attention, recent_start
from rlkv.attention.ring import ring_positions, ring_slot
from rlkv.engine.kv import KVStore, upload
from rlkv.precision import KEYS, VALUES, centred

if TYPE_CHECKING:
    from rlkv.engine.tokendrop import TokenDropStore


@dataclass
class Decode:
    """One decode step for B rows (padding rows use slot 0 and position 0)."""

    slots: torch.Tensor  # [B] long
    pos: torch.Tensor  # [B] long: position of the token fed this step
    page: torch.Tensor | None  # [B] long: page its K/V goes to (head-split stores; token-dropping slots need none)
    offset: torch.Tensor | None  # [B] long: row within that page
    ring: torch.Tensor | None  # [B] long: its ring slot
    max_len: int | None = None  # longest sequence (torch path only: how many pages to read)

    @classmethod
    def of(cls, store: KVStore, slots: torch.Tensor, pos: torch.Tensor, max_len: int | None = None) -> Decode:
        return cls(slots, pos, *places(store, slots, pos), max_len)

    def attend(self, state, layer: int, query, key, value, scaling: float, window: int | None) -> torch.Tensor:
        return state.decode(layer, query[:, :, 0], key[:, :, 0], value[:, :, 0], scaling, window)[:, None]


def places(store: KVStore, slots: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the K/V of the token at `pos` of the sequence in `slots` go: (page, row within it, ring slot)."""
    page = store.page_table[slots, pos // store.page_size].long()
    return page, pos % store.page_size, ring_slot(pos, store.sink, store.recent)


@dataclass
class Prompts:
    """Whole new prompts packed into one row of T tokens (padding tokens at the end).

    A token's K/V are stored like a decode step's (`store_torch` reads page, offset, slots, ring):
    kept heads' at (page, offset), compressed heads' at ring place `ring` of `slots`, which is the
    sequence's slot when the token stays in its ring (a sink or one of the prompt's last `recent`),
    else scratch slot 0. Padding tokens: position 0, scratch page 0 and slot 0, and each its own
    negative `seq`, so it attends only to itself."""

    pos: torch.Tensor  # [T] long: position within its context
    seq: torch.Tensor  # [T] long: which context of the row
    page: torch.Tensor  # [T] long
    offset: torch.Tensor  # [T] long
    slots: torch.Tensor  # [T] long
    ring: torch.Tensor  # [T] long
    sink: int
    recent: int
    full_rows: torch.Tensor | None = None  # [T] bool: queries that attend like a kept head's (full prefill)
    block: int = 1  # the streaming rule's granularity (gated mode)
    masks: dict = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        store: KVStore,
        slots: torch.Tensor,
        pos: torch.Tensor,
        seq: torch.Tensor,
        lengths: torch.Tensor,
        prompt_lengths: torch.Tensor | None = None,
        block: int = 1,
    ) -> Prompts:
        """`slots`, `pos`, `seq`, `lengths` (its context's length) and, for a full prefill, `prompt_lengths`
        (its prompt's: a preempted request's context also holds its generated tokens) of every token [T]."""
        page, offset, ring = places(store, slots, pos)  # as a decode step's token would have
        stays = (pos < store.sink) | (pos >= lengths - store.recent)
        full_rows = pos < prompt_lengths if prompt_lengths is not None else None
        return cls(
            pos, seq, page, offset, torch.where(stays, slots, 0), ring, store.sink, store.recent, full_rows, block
        )

    def attend(self, state, layer: int, query, key, value, scaling: float, window: int | None) -> torch.Tensor:
        return state.prompts(layer, query, key, value, scaling, window)

    def mask(self, full: bool, window: int | None) -> torch.Tensor:
        """[1, 1, T, T]: what a kept (`full`) or a compressed head's queries attend to (built once per forward);
        in a full prefill a compressed head's queries inside their prompt attend like a kept head's."""
        if (full, window) not in self.masks:
            rule = torch.full((1,), full, dtype=torch.bool, device=self.pos.device)
            own = (self.seq[:, None] == self.seq[None, :])[None, None]
            pos = self.pos[None]
            mask = keep_keys_mask(pos, pos, rule, self.sink, self.recent, window, block=self.block)
            if not full and self.full_rows is not None:
                mask = mask | (
                    keep_keys_mask(pos, pos, ~rule, self.sink, self.recent, window)
                    & self.full_rows[None, None, :, None]
                )
            self.masks[full, window] = mask & own
        return self.masks[full, window]


@dataclass
class Segment:
    """One prompt chunk of a prefill: tokens [offset, offset + length) of the packed row."""

    slot: int
    pages: list[int]
    start: int  # tokens of this sequence already stored
    length: int
    offset: int
    prompt_len: int = 0  # full prefill: its queries before this position attend like a kept head's
    masks: dict = field(default_factory=dict)

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass
class Prefill:
    segments: list[Segment]

    def attend(self, state, layer: int, query, key, value, scaling: float, window: int | None) -> torch.Tensor:
        return state.prefill(layer, query, key, value, scaling, window)


class EngineState:
    """What the registered attention function reads while the engine runs (`attention` below); the engine
    sets `batch` before each forward, so a forward from outside (transformers' hook) is refused."""

    batch = None
    store: KVStore | TokenDropStore  # each holds its layers' `key_centres`

    def before_forward(self, step) -> None:
        raise RuntimeError("a model driven by rlkv.Engine cannot be called directly while the engine runs")

    def centred(self, layer: int, key: torch.Tensor) -> torch.Tensor:
        """`layer`'s new keys as the store holds them: less their centres where it is FP8 (`rlkv.precision`)."""
        return centred(key, self.store.key_centres[layer])


class EngineAttention(EngineState):
    """Head-split and gated mode: the store, the mode and the current batch."""

    store: KVStore

    def __init__(
        self,
        store: KVStore,
        group: int,
        alpha: torch.Tensor | None,
        use_kernel: bool,
        full_prefill: bool = False,
        block: int = 1,
    ):
        self.store, self.group, self.alpha, self.use_kernel = store, group, alpha, use_kernel
        self.full_prefill, self.block = full_prefill, block  # block: the gated streaming branch's granularity
        self.batch: Decode | Prompts | Prefill | None = None
        # full prefill in chunks: each compressed head's K/V of the prompt so far, per (layer, slot), until
        # the prompt is done (a kept head has them in its pages; a compressed head's ring keeps only 80)
        self._prompt_kv: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def decode_batch(self, slots: torch.Tensor, pos: torch.Tensor, max_len: int | None = None) -> Decode:
        return Decode.of(self.store, slots, pos, max_len)

    def prompts_batch(
        self,
        slots: torch.Tensor,
        pos: torch.Tensor,
        seq: torch.Tensor,
        lengths: torch.Tensor,
        prompt_lengths: torch.Tensor,
    ) -> Prompts:
        full_rows = prompt_lengths if self.full_prefill else None
        return Prompts.of(self.store, slots, pos, seq, lengths, full_rows, self.block)

    def _store(self, k, v, layer: int) -> None:
        """New K/V [B, Hkv, D] into pages and rings where the batch says (`Decode` or `Prompts`)."""
        batch = self.batch
        assert isinstance(batch, (Decode, Prompts)), "the engine sets the batch before each forward"
        if self.use_kernel:
            from rlkv.engine.kernel import store_kv

            store_kv(k, v, self.store, layer, batch)
        else:
            store_torch(k, v, self.store, layer, batch)

    # ------------------------------------------------------------------ decode
    def decode(self, layer: int, q, k, v, scaling: float, window: int | None) -> torch.Tensor:
        """q [B, Hq, D], k/v [B, Hkv, D] of the new tokens -> attention output [B, Hq, D]."""
        s, b = self.store, self.batch
        assert isinstance(b, Decode), "the engine sets the batch before each forward"
        self._store(k, v, layer)
        if self.use_kernel:
            from rlkv.engine.kernel import decode_attention

            return decode_attention(
                q, s, layer, b.slots, b.pos + 1, scaling, window, self._alpha(layer), stream_block=self.block
            )
        return decode_torch(
            q, s, layer, b.slots, b.pos + 1, b.max_len, scaling, window, self._alpha(layer), stream_block=self.block
        )

    def _alpha(self, layer: int) -> torch.Tensor | None:
        return None if self.alpha is None else self.alpha[layer]

    def _kept(self, layer: int, q, keys, values, full_mask, stream_mask, scaling: float) -> torch.Tensor:
        """Kept heads' SDPA; in gated mode mixed with the streaming branch over the same keys (`stream_mask`)."""
        full = _sdpa(q, keys, values, full_mask, scaling)
        if self.alpha is None:
            return full
        return gate_mix(full, _sdpa(q, keys, values, stream_mask, scaling), self.alpha[layer], self.group)

    # ------------------------------------------------------------------ prefill
    def prompts(self, layer: int, query, key, value, scaling: float, window: int | None) -> torch.Tensor:
        """query [1, Hq, T, D], key/value [1, Hkv, T, D] of packed new prompts -> output [1, T, Hq, D]."""
        s, b = self.store, self.batch
        assert isinstance(b, Prompts), "the engine sets the batch before each forward"
        key, value = s.round_trip(layer, key, value, dim=1)
        out = query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])
        fi, ci = s.full_idx[layer], s.comp_idx[layer]
        qf, qc = s.q_full[layer], s.q_comp[layer]
        if len(fi):
            stream = b.mask(False, window) if self.alpha is not None else None
            full = self._kept(layer, query[:, qf], key[:, fi], value[:, fi], b.mask(True, window), stream, scaling)
            out[:, :, qf] = full.transpose(1, 2)
        if len(ci):
            out[:, :, qc] = _sdpa(query[:, qc], key[:, ci], value[:, ci], b.mask(False, window), scaling).transpose(
                1, 2
            )
        self._store(key[0].transpose(0, 1), value[0].transpose(0, 1), layer)
        return out

    def prefill(self, layer: int, query, key, value, scaling: float, window: int | None) -> torch.Tensor:
        """query [1, Hq, T, D], key/value [1, Hkv, T, D] of packed chunks -> output [1, T, Hq, D]."""
        s = self.store
        key, value = s.round_trip(layer, key, value, dim=1)
        out = query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])
        fi, ci = s.full_idx[layer], s.comp_idx[layer]
        kept, ring = s.kept_precision, s.ring_precision
        qf, qc = s.q_full[layer], s.q_comp[layer]
        assert isinstance(self.batch, Prefill), "the engine sets the batch before each forward"
        for seg in self.batch.segments:
            cols = slice(seg.offset, seg.offset + seg.length)
            q, k, v = query[:, :, cols], key[:, :, cols], value[:, :, cols]
            masks = self._masks(seg, window, query.device)
            if len(fi):
                page, row = masks["write"]
                s.pages_k[layer][page, row] = kept.store(k[0, fi].transpose(0, 1), KEYS, layer, fi, 1)
                s.pages_v[layer][page, row] = kept.store(v[0, fi].transpose(0, 1), VALUES, layer, fi, 1)
                page, row = masks["read"]
                keys = kept.load(s.pages_k[layer][page, row], KEYS, layer, fi, 1, q.dtype).transpose(0, 1)[None]
                values = kept.load(s.pages_v[layer][page, row], VALUES, layer, fi, 1, q.dtype).transpose(0, 1)[None]
                full = self._kept(layer, q[:, qf], keys, values, masks["full"], masks.get("stream"), scaling)
                out[:, cols, qf] = full.transpose(1, 2)
            if len(ci):
                if "prompt" in masks:  # full prefill: over every earlier prompt token, not only the ring
                    keys, values = self._prompt_keys(layer, seg, k[0, ci], v[0, ci])
                    mask = masks["prompt"]
                else:
                    stored_k = ring.load(s.ring_k[layer][seg.slot], KEYS, layer, ci, 1, q.dtype)
                    stored_v = ring.load(s.ring_v[layer][seg.slot], VALUES, layer, ci, 1, q.dtype)
                    keys = torch.cat([stored_k.transpose(0, 1), k[0, ci]], dim=1)[None]
                    values = torch.cat([stored_v.transpose(0, 1), v[0, ci]], dim=1)[None]
                    mask = masks["ring"]
                out[:, cols, qc] = _sdpa(q[:, qc], keys, values, mask, scaling).transpose(1, 2)
                src, dst = masks["ring_write"]
                s.ring_k[layer][seg.slot, dst] = ring.store(k[0, ci][:, src].transpose(0, 1), KEYS, layer, ci, 1)
                s.ring_v[layer][seg.slot, dst] = ring.store(v[0, ci][:, src].transpose(0, 1), VALUES, layer, ci, 1)
        return out

    def _prompt_keys(self, layer: int, seg: Segment, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        """A full-prefill chunk's compressed-head keys and values [1, C, end, D]: the prompt's earlier ones
        (kept from the chunks before) and its own; kept for the next chunk while the prompt goes on."""
        key = (layer, seg.slot)
        if seg.start and key in self._prompt_kv:
            before_k, before_v = self._prompt_kv[key]
            k, v = torch.cat([before_k, k], dim=1), torch.cat([before_v, v], dim=1)
        if seg.end < seg.prompt_len:
            self._prompt_kv[key] = (k, v)
        else:
            self._prompt_kv.pop(key, None)
        return k[None], v[None]

    def _masks(self, seg: Segment, window: int | None, device) -> dict:
        """Index and mask tensors of a segment, built once and shared by every layer."""
        if window in seg.masks:
            return seg.masks[window]
        s = self.store
        m = {}
        q_pos = torch.arange(seg.start, seg.end, device=device)[None]
        never = torch.zeros(1, dtype=torch.bool)
        if s.kept_heads:
            pages = upload(seg.pages, torch.long, device)
            m["write"] = (pages[q_pos[0] // s.page_size], q_pos[0] % s.page_size)
            k_pos = torch.arange(seg.end, device=device)
            m["read"] = (pages[k_pos // s.page_size], k_pos % s.page_size)
            m["full"] = keep_keys_mask(q_pos, k_pos[None], ~never, s.sink, s.recent, window)
            if self.alpha is not None:  # gated mode: the streaming branch over the same keys
                m["stream"] = keep_keys_mask(q_pos, k_pos[None], never, s.sink, s.recent, window, block=self.block)
        if s.compressed_heads:
            if self.full_prefill and seg.start < seg.prompt_len:  # over the whole prompt so far (_prompt_keys)
                k_pos = torch.arange(seg.end, device=device)[None]
                m["prompt"] = keep_keys_mask(q_pos, k_pos, never, s.sink, s.recent, window, prompt_len=seg.prompt_len)
            else:
                before = ring_positions(torch.full((1,), seg.start, device=device), s.sink, s.recent)
                m["ring"] = keep_keys_mask(q_pos, torch.cat([before, q_pos], dim=1), never, s.sink, s.recent, window)
            # the chunk's tokens that stay in the ring (sinks, and the last `recent` of the sequence so far):
            # listed on the host, as a device-side nonzero() would wait for the device
            sinks = max(0, min(s.sink, seg.end) - seg.start)
            first_recent = max(seg.start, seg.end - s.recent, min(s.sink, seg.end))
            stored = [*range(sinks), *range(first_recent - seg.start, seg.length)]
            src = upload(stored, torch.long, device)
            m["ring_write"] = (src, ring_slot(src + seg.start, s.sink, s.recent))
        seg.masks[window] = m
        return m


def _sdpa(q, k, v, mask, scaling):
    """SDPA with a [1, 1, q, k] boolean mask (True = attend) and GQA."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=q.shape[1] != k.shape[1])


def store_torch(k, v, store: KVStore, layer: int, b: Decode | Prompts) -> None:
    """New K/V [B, Hkv, D] (a decode step's, or packed prompts') into the pages of kept heads and the rings of
    compressed ones."""
    fi, ci = store.full_idx[layer], store.comp_idx[layer]
    kept, ring = store.kept_precision, store.ring_precision
    if len(fi):
        store.pages_k[layer][b.page, b.offset] = kept.store(k[:, fi], KEYS, layer, fi, 1)
        store.pages_v[layer][b.page, b.offset] = kept.store(v[:, fi], VALUES, layer, fi, 1)
    if len(ci):
        store.ring_k[layer][b.slots, b.ring] = ring.store(k[:, ci], KEYS, layer, ci, 1)
        store.ring_v[layer][b.slots, b.ring] = ring.store(v[:, ci], VALUES, layer, ci, 1)


def decode_torch(
    q,
    store: KVStore,
    layer: int,
    slots,
    lengths,
    max_len: int | None,
    scaling: float,
    window: int | None,
    alpha: torch.Tensor | None,
    stream_block: int = 1,
) -> torch.Tensor:
    """Decode attention in plain torch: gather pages and rings, mask, softmax. q [B, Hq, D] -> [B, Hq, D].

    In gated mode (`alpha`) the streaming branch keeps the store's sink and recent keys at `stream_block`
    granularity (the store's sizes are already whole blocks)."""
    s = store
    bsz, hq, d = q.shape
    group = hq // s.keep.shape[1]
    out = q.new_empty(bsz, hq, d)
    low = lengths - window if window else torch.zeros_like(lengths)
    qf, qc = s.q_full[layer], s.q_comp[layer]
    fi, ci = s.full_idx[layer], s.comp_idx[layer]
    if len(fi):
        n_pages = -(-(max_len if max_len is not None else int(lengths.max())) // s.page_size)
        table = s.page_table[slots, :n_pages].long()  # [B, P]
        keys = s.kept_precision.load(s.pages_k[layer][table], KEYS, layer, fi, 3, q.dtype)
        values = s.kept_precision.load(s.pages_v[layer][table], VALUES, layer, fi, 3, q.dtype)
        keys, values = keys.flatten(1, 2).transpose(1, 2), values.flatten(1, 2).transpose(1, 2)  # [B, F, T, D]
        t = torch.arange(keys.shape[2], device=q.device)[None]
        valid = (t < lengths[:, None]) & (t >= low[:, None])
        mask = valid[:, None, None, :].expand(-1, keys.shape[1], 1, -1)
        q_kept = q[:, qf][:, :, None]
        full = masked_attention(q_kept, keys, values, mask, scaling)[:, 0]
        if alpha is not None:
            stream = valid & ((t < s.sink) | (t >= recent_start(lengths[:, None] - 1, s.recent, stream_block)))
            mask = stream[:, None, None, :].expand(-1, keys.shape[1], 1, -1)
            full = gate_mix(full, masked_attention(q_kept, keys, values, mask, scaling)[:, 0], alpha, group)
        out[:, qf] = full
    if len(ci):
        keys = s.ring_precision.load(s.ring_k[layer][slots], KEYS, layer, ci, 2, q.dtype).transpose(
            1, 2
        )  # [B, C, R, D]
        values = s.ring_precision.load(s.ring_v[layer][slots], VALUES, layer, ci, 2, q.dtype).transpose(1, 2)
        pos = ring_positions(lengths, s.sink, s.recent)
        valid = (pos >= 0) & (pos >= low[:, None])
        mask = valid[:, None, None, :].expand(-1, keys.shape[1], 1, -1)
        out[:, qc] = masked_attention(q[:, qc][:, :, None], keys, values, mask, scaling)[:, 0]
    return out


_forward_state: EngineState | None = None  # the state of the engine forward running now (`attending`)


@contextmanager
def attending(state: EngineState):
    """Inside the block, the engine's attention operator works on `state` (its store and current batch): set
    around each of the engine's forwards, as vLLM sets its forward context."""
    global _forward_state
    previous, _forward_state = _forward_state, state
    try:
        yield
    finally:
        _forward_state = previous


@torch.library.custom_op("rlkv::attention", mutates_args=())
def engine_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, scaling: float, window: int | None
) -> torch.Tensor:
    """Store the new K/V of `layer` and attend over the store: query [B, Hq, T, D], key/value [B, Hkv, T, D] ->
    [B, T, Hq, D], as the current batch says (`Decode`, `Prompts`, `Prefill`).

    One operator, opaque to torch.compile (`rlkv.engine.compiled`): the compiler fuses the model's own
    operators around it and never traces the store, the kernels or the batch's host-side description. It
    writes the KV store, which is no argument of it: nothing in a compiled graph reads the store but it."""
    state = _forward_state
    if state is None or state.batch is None:
        raise RuntimeError("rlkv.Engine's attention ran outside an engine step")
    key = state.centred(layer, key)
    return state.batch.attend(state, layer, query, key, value, scaling, window).contiguous()


@engine_attention.register_fake
def _(query, key, value, layer, scaling, window):
    b, h, t, d = query.shape
    return query.new_empty(b, t, h, d)


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention implementation the engine registers (transformers' AttentionInterface signature)."""
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    return engine_attention(query, key, value, module.layer_idx, scaling, kwargs.get("sliding_window")), None
