"""Token-dropping methods (H2O, SnapKV, R-KV) in the engine: a fixed slot of tokens per sequence.

A token-dropping cache holds at most `policy.capacity` tokens per layer and KV head, so in the
engine every sequence owns one slot of exactly that many token places (with their positions,
-1 = empty, the policy's per-token score and its extra state, e.g. R-KV's last queries). The
slots the KV budget holds are the sequences that run at once: the bytes the budget saves buy
concurrency, as pages do for head-split methods.

The choice of tokens is the transformers path's own (`rlkv.attention.tokendrop`); a decode step
works on the slots in place:
1. the new token's attention over its slot plus itself: the Triton kernel
   `rlkv.attention.slot_kernel.slot_attention` reads the slot where it lies, or on a CPU the plain torch
   `slot_attention_torch` (gather, float32 softmax), which the kernel is tested against;
2. the policy chooses among the candidates (the slot's places, then the new token) from their
   positions, scores and attention (keys too, gathered, for a policy that `needs_keys`: R-KV);
3. evicted places are marked empty, and a kept new token is written into the first empty place:
   one token's K/V per row and head, where the transformers cache re-compacts every kept token.
So a slot is not in chronological order; the policies break ties by position, not by place, so
they choose the same tokens either way. Every shape is fixed (a slot is always `capacity` wide,
empty places masked), so the step runs inside the engine's CUDA graphs.
A prompt is prefilled in one piece, as transformers `generate` does: exact causal attention
over the prompt, then the policy's first cut (SnapKV's observation window sees the prompt's end).
The prompts of one prefill forward attend as a left-padded batch, the way `generate` pads them
(padding: position -1, never attended to, never kept), in groups of at most `PAD_TOKENS` padded
tokens: one `select_tokens` per group and layer, not one per prompt.
Slots hold K/V at one precision (`rlkv.precision`: the model's dtype or FP8 with per-KV-head scales);
a new token's K/V are rounded to it before anything attends to them, as `TokenDropCache`'s are.
Outputs equal `with method.apply(model): model.generate(...)` (tested token for token).
"""

from __future__ import annotations

import torch

from rlkv.attention.tokendrop import Candidates, Policy, candidate_attention, compact, select_tokens
from rlkv.engine.attention import Decode, EngineState, Prefill
from rlkv.engine.kv import upload
from rlkv.engine.store import Slots
from rlkv.models import Layout
from rlkv.precision import KEYS, VALUES, KVPrecision

PAD_TOKENS = 8192  # prompts x longest prompt of one padded prefill group: bounds its attention's memory


class TokenDropStore(Slots):
    """Slots of `policy.capacity` tokens per layer and KV head, as many as `budget` bytes hold (at most max_batch).

    Slot 0 is scratch space that padding rows of a decode batch write into. It implements
    `rlkv.engine.store.Store` (a sequence needs a slot and no pages)."""

    def __init__(
        self,
        layout: Layout,
        policy: Policy,
        budget: int,
        max_batch: int,
        device,
        dtype: torch.dtype,
        precision: KVPrecision | None = None,
    ):
        """`dtype`: the model's (the policy's state); `precision`: the slots' K/V (None: unquantised, `dtype`)."""
        self.layout, self.policy = layout, policy
        self.precision = (precision or KVPrecision(dtype)).to(device)
        self.key_centres = [self.precision.key_centres(i) for i in range(layout.num_layers)]  # `centred`'s
        self.capacity = policy.capacity
        self.slot_bytes = int(policy.sequence_bytes(layout, torch.tensor(self.capacity), self.precision.itemsize))
        fits = budget // self.slot_bytes - 1  # slot 0 is scratch
        if fits < 1:
            raise ValueError(
                f"kv_budget of {budget / 2**20:.1f} MiB cannot hold one {policy.name} sequence "
                f"({self.slot_bytes / 2**20:.2f} MiB with scratch: {2 * self.slot_bytes / 2**20:.2f} MiB): "
                "raise kv_budget or lower the budget of tokens"
            )
        self._init_slots(min(max_batch, fits) + 1)
        shape = (self.num_slots, layout.num_kv_heads, self.capacity)
        d = layout.head_dim
        self.keys = [
            torch.zeros(*shape, d, dtype=self.precision.dtype, device=device) for _ in range(layout.num_layers)
        ]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.pos = [torch.full(shape, -1, dtype=torch.int32, device=device) for _ in range(layout.num_layers)]
        self.score = [torch.zeros(shape, device=device) for _ in range(layout.num_layers)] if policy.scored else None
        self.extra = [
            policy.empty_state(self.num_slots, layout.num_q_heads, d, dtype, device) for _ in range(layout.num_layers)
        ]  # e.g. R-KV's last queries
        self.peak_pages_used = 0

    # ------------------------------------------------------------------ allocation (KVStore's interface)
    capacity_pages = free_pages = page_size = 0  # a sequence needs a slot and no pages

    def pages_for(self, tokens: int) -> int:
        return 0

    def grow(self, slot: int, pages: list[int], tokens: int) -> bool:
        return True  # a slot holds every token the policy keeps

    def flush(self) -> None:
        pass

    def release(self, slot: int, pages: list[int]) -> None:
        self._release_slot(slot)

    def shared_pages(self, tokens: int) -> int:
        return 0

    def share(self, slot: int, pages: list[int], tokens: int) -> list[int]:
        return []

    def fork(self, src_slot: int, src_pages: list[int], dst_slot: int, dst_pages: list[int], tokens: int) -> None:
        """A fork's slot is a copy of its origin's: kept tokens, their positions, scores and policy state."""
        for t in self._tensors():
            t[dst_slot] = t[src_slot]

    def name_pages(self, pages: list[int], tokens: list[int]) -> None:
        pass  # no pages

    # ------------------------------------------------------------------ accounting
    def _tensors(self) -> list[torch.Tensor]:
        """Every per-slot tensor of every layer (slot first)."""
        return [*self.keys, *self.values, *self.pos, *(self.score or []), *(t for e in self.extra for t in e.values())]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def sequence_nbytes(self, tokens):
        """Bytes a sequence of `tokens` tokens holds: what transformers' `TokenDropCache.sequence_nbytes` reports."""
        return self.policy.sequence_bytes(self.layout, torch.as_tensor(tokens), self.precision.itemsize)

    def scales(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The slots' K and V scales [Hkv] of `layer` (FP8), else None."""
        p = self.precision
        return (p.scale(KEYS, layer), p.scale(VALUES, layer)) if p.quantized else None

    # ------------------------------------------------------------------ a decode step, in place
    def candidates(
        self,
        layer: int,
        slots: torch.Tensor,
        k: torch.Tensor,
        q_pos: torch.Tensor,
        attn,
        scaling: float,
        needs_keys: bool,
    ) -> Candidates:
        """The rows' slot places of `layer`, then their new tokens (k [B, Hkv, D] at q_pos [B]), as `Candidates`."""
        pos = then_new(self.pos[layer], slots, new_positions(q_pos, k))
        score = (
            then_new(self.score[layer], slots, k.new_zeros(*k.shape[:2], 1, dtype=torch.float32))
            if self.score is not None
            else None
        )
        keys = None
        if needs_keys:
            stored = self.precision.load(self.keys[layer][slots], KEYS, layer, slice(None), 1, k.dtype)
            keys = torch.cat([stored, k[:, :, None]], dim=2)
        return Candidates(keys, None, pos, score, attn, False, scaling, self.key_centres[layer])

    def state(self, layer: int, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows' policy state (e.g. R-KV's last queries), for `Policy.select` to update."""
        return {name: t[slots] for name, t in self.extra[layer].items()}

    def place(self, layer: int, slots: torch.Tensor, keep: torch.Tensor, c: Candidates, k, v, state: dict):
        """Apply the policy's `keep` [B, Hkv, capacity + 1] to the rows' slots: evicted places become empty and
        a kept new token goes into the first empty place (there is one: at most `capacity` are kept)."""
        cap = self.capacity
        kept_new = keep[..., cap]
        pos = torch.where(keep[..., :cap], c.pos[..., :cap], -1)
        free = (pos < 0).to(torch.int8).argmax(dim=-1, keepdim=True)  # [B, Hkv, 1]; 0 if none (new token dropped)

        def put(rows: torch.Tensor, new: torch.Tensor) -> torch.Tensor:  # the new token's value at `free` if kept
            return rows.scatter(-1, free, torch.where(kept_new[..., None], new, rows.gather(-1, free)))

        index = (slots[:, None], torch.arange(k.shape[1], device=k.device)[None], free[..., 0])
        for which, store, new in ((KEYS, self.keys[layer], k), (VALUES, self.values[layer], v)):
            new = self.precision.store(new, which, layer, slice(None), 1)
            store[index] = torch.where(kept_new[..., None], new, store[index])
        self.pos[layer][slots] = put(pos, c.pos[..., cap:])
        if self.score is not None:
            assert c.score is not None, "a scored policy's candidates carry their scores"
            self.score[layer][slots] = put(torch.where(keep[..., :cap], c.score[..., :cap], 0.0), c.score[..., cap:])
        for name, t in state.items():
            self.extra[layer][name][slots] = t

    def scatter(self, layer: int, slots: torch.Tensor, keys, values, pos, score, state: dict) -> None:
        """Write compacted prompt rows (`compact`'s) and their policy state to `slots`, padded to the slot's width
        (empty places: position -1)."""
        width = pos.shape[-1]
        if width < self.capacity:  # a prompt shorter than the capacity
            self.pos[layer][slots] = -1
        self.keys[layer][slots, :, :width] = self.precision.store(keys, KEYS, layer, slice(None), 1)
        self.values[layer][slots, :, :width] = self.precision.store(values, VALUES, layer, slice(None), 1)
        self.pos[layer][slots, :, :width] = pos
        if self.score is not None:
            self.score[layer][slots, :, :width] = score
        for name, t in state.items():
            self.extra[layer][name][slots] = t


class TokenDropAttention(EngineState):
    """Token-dropping mode: the slots and the current batch."""

    store: TokenDropStore

    def __init__(self, store: TokenDropStore, use_kernel: bool):
        self.store, self.policy = store, store.policy
        if use_kernel:  # Triton: imported only when used
            from rlkv.attention.slot_kernel import slot_attention as attend
        else:
            attend = slot_attention_torch
        self._attend = attend
        self.batch: Decode | Prefill | None = None
        self._groups: tuple[Prefill, list[PaddedPrompts]] | None = (
            None  # the current prefill's, built once for all layers
        )

    def decode_batch(self, slots: torch.Tensor, pos: torch.Tensor, max_len: int | None = None) -> Decode:
        return Decode(slots, pos, None, None, None, max_len)  # no pages, no ring

    def decode(self, layer: int, q, k, v, scaling: float, window: int | None) -> torch.Tensor:
        """q [B, Hq, D], k/v [B, Hkv, D] of the new tokens -> attention output [B, Hq, D]; the slots keep what the
        policy keeps."""
        b, store, policy = self.batch, self.store, self.policy
        assert isinstance(b, Decode), "the engine sets the batch before each forward"
        k = store.precision.round_trip(k, KEYS, layer, slice(None), 1)  # as attention reads it once stored
        v = store.precision.round_trip(v, VALUES, layer, slice(None), 1)
        out, attn = self._attend(
            q,
            k,
            v,
            store.keys[layer],
            store.values[layer],
            store.pos[layer],
            b.slots,
            b.pos,
            scaling,
            window,
            policy.observed(False, 1) > 0,
            store.scales(layer),
        )
        c = store.candidates(layer, b.slots, k, b.pos, attn, scaling, policy.needs_keys)
        state = store.state(layer, b.slots)
        keep = policy.select(state, c, q[:, :, None], b.pos[:, None])
        store.place(layer, b.slots, keep, c, k, v, state)
        return out

    def prefill(self, layer: int, query, key, value, scaling: float, window: int | None) -> torch.Tensor:
        """Whole prompts packed in one row [1, H, T, D]: each attends exactly over itself, then is cut to the
        policy's choice."""
        batch = self.batch
        assert isinstance(batch, Prefill), "the engine sets the batch before each forward"
        if self._groups is None or self._groups[0] is not batch:
            self._groups = (batch, PaddedPrompts.groups(batch, query.device))
        out = query.new_empty(query.shape[2], query.shape[1], query.shape[3])  # [T, Hq, D]
        policy, precision = self.policy, self.store.precision
        key = precision.round_trip(key, KEYS, layer, slice(None), 1)
        value = precision.round_trip(value, VALUES, layer, slice(None), 1)
        for g in self._groups[1]:
            q, k, v = (t[0][:, g.cols].transpose(0, 1) for t in (query, key, value))  # [n, H, W, D]
            pos = g.q_pos.to(torch.int32)[:, None, :].expand(k.shape[0], k.shape[1], -1)
            score = k.new_zeros(pos.shape, dtype=torch.float32) if policy.scored else None
            state: dict = {}
            centres = self.store.key_centres[layer]
            padded, c, keep = select_tokens(
                q, k, v, pos, score, g.q_pos, scaling, window, policy, state, first=True, key_centres=centres
            )
            out[g.dest] = padded.flatten(0, 1)[g.src]  # padded: [n, W, Hq, D]
            self.store.scatter(layer, g.slots, *compact(c, keep, policy.capacity), state)
        return out[None]


class PaddedPrompts:
    """Some prompts of a packed prefill row as a left-padded batch [n, W]: `cols` their columns in the
    row (padding repeats column 0), `q_pos` their positions (padding -1), `slots` their slots, and
    the real places: row column `dest` is padded place `src` (flat over n x W)."""

    def __init__(self, segments, device: torch.device):
        width = max(seg.length for seg in segments)
        cols, q_pos, dest, src = [], [], [], []
        for i, seg in enumerate(segments):
            if seg.start:
                raise RuntimeError("token-dropping methods prefill a prompt in one piece")
            pad = width - seg.length
            cols.append([0] * pad + list(range(seg.offset, seg.offset + seg.length)))
            q_pos.append([-1] * pad + list(range(seg.length)))
            dest += range(seg.offset, seg.offset + seg.length)
            src += range(i * width + pad, (i + 1) * width)
        self.cols, self.q_pos, self.dest, self.src, self.slots = (
            upload(x, torch.long, device) for x in (cols, q_pos, dest, src, [seg.slot for seg in segments])
        )

    @classmethod
    def groups(cls, batch: Prefill, device: torch.device) -> list[PaddedPrompts]:
        """The batch's prompts, shortest first, in groups of at most PAD_TOKENS padded tokens (a longer prompt
        alone)."""
        groups, group = [], []
        for seg in sorted(batch.segments, key=lambda seg: seg.length):
            if group and (len(group) + 1) * seg.length > PAD_TOKENS:
                groups.append(group)
                group = []
            group.append(seg)
        return [cls(g, device) for g in groups + [group] if g]


def slot_attention_torch(
    q, k, v, keys, values, pos, slots, q_pos, scaling: float, window: int | None, observe: bool, scales=None
):
    """`rlkv.attention.slot_kernel.slot_attention` in plain torch: gather the rows' slots (FP8 ones dequantised by
    `scales`), append the new tokens, and attend with `candidate_attention` (the transformers path's own attention)."""
    stored_k, stored_v = keys[slots], values[slots]
    if scales is not None:
        stored_k, stored_v = (
            (t.float() * s.view(1, -1, 1, 1)).to(q.dtype) for t, s in zip((stored_k, stored_v), scales)
        )
    cand_keys, cand_values = torch.cat([stored_k, k[:, :, None]], dim=2), torch.cat([stored_v, v[:, :, None]], dim=2)
    out, attn = candidate_attention(
        q[:, :, None],
        cand_keys,
        cand_values,
        then_new(pos, slots, new_positions(q_pos, k)),
        q_pos[:, None],
        scaling,
        window,
        int(observe),
    )
    return out[:, 0], attn


def then_new(stored: torch.Tensor, slots: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """The rows' slot places of one layer's `stored` [S, Hkv, capacity, ...], then their new tokens' `new`
    [B, Hkv, 1, ...]: the candidates' order."""
    return torch.cat([stored[slots], new], dim=2)


def new_positions(q_pos: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, 1] int32: each row's new token position, for every KV head of k [B, Hkv, D]."""
    return q_pos.to(torch.int32)[:, None, None].expand(*k.shape[:2], 1)
