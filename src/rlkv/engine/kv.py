"""The engine's KV storage: a paged pool for kept heads, one sink + recent ring per sequence for the rest.

Per layer l, with F_l kept and C_l compressed KV heads (a head-split keep-mask decides which):
- pages_k[l], pages_v[l]: [num_pages, page_size, F_l, head_dim]. Every layer uses the same page
  ids for a sequence, so one page table row per sequence serves all layers, and one page costs
  page_size x (F_1 + ... + F_L) x head_dim x 2 x dtype bytes: compressing half the heads halves
  the price of a page, and the same budget holds twice the pages (the paper's "memory
  rebalancing": the bytes freed by compression buy more concurrent sequences).
- ring_k[l], ring_v[l]: [num_slots, sink + recent, C_l, head_dim]; a running sequence owns one
  slot. Token p lives in ring slot p while p < sink, else in sink + (p - sink) mod recent.
Pages hold the kept heads at `kept`'s precision and rings the compressed heads at `compressed`'s
(`rlkv.precision`: the model's dtype, or FP8 with per-KV-head scales), and every byte count above is
in the bytes those precisions store: FP8 halves the price of a page against bf16.

Page 0 and slot 0 are scratch space that padding rows of a decode batch write into.
A sequence holds pages for the tokens it has (`grow` as it goes); the scheduler
(`rlkv.engine.scheduler`) decides who gets them, and preempts when the pool runs dry. Pages are
reference counted (`rlkv.engine.pages`): a sample forked from another (`share`, then `fork`) lists
the other's full pages in its own page table and copies only the partly filled last page and the ring.

Rings are allocated up front, one per slot, and the pages get the rest of the budget. There are
`max_batch` slots, or, given `sequence_tokens` (prompt + new tokens of a typical request), only
as many as the budget holds sequences of that length: the ring of a slot that can never be
filled would take the room of pages.
"""

from __future__ import annotations

import math
import re

import torch

from rlkv.attention.ring import query_heads
from rlkv.engine.pages import PagePool
from rlkv.engine.store import Slots
from rlkv.models import Layout
from rlkv.precision import KVPrecision, KVPrecisions

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(budget, device: torch.device) -> int:
    """Bytes from an int, a size string ("20GiB", "512MB") or a float in (0, 1]: that share of free GPU memory."""
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise ValueError(f"a fractional kv_budget must be in (0, 1] (a share of free GPU memory), got {budget}")
        if device.type != "cuda":
            raise ValueError("a fractional kv_budget is a share of free GPU memory; on CPU give bytes, e.g. '1GiB'")
        torch.cuda.empty_cache()  # blocks torch has cached but not used count as free
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * budget)
    if isinstance(budget, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", budget)
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"kv_budget {budget!r} is not a size: expected e.g. '20GiB', '512MiB', '2GB' or bytes")
        return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if isinstance(budget, int) and budget > 0:
        return budget
    raise ValueError(
        f"kv_budget must be bytes, a size string like '20GiB' or a share of free GPU memory, got {budget!r}"
    )


def upload(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host data (lists, ints) as a tensor on `device` without waiting for the device's queued work: on
    CUDA through pinned memory and a non-blocking copy (a plain host-to-device copy synchronizes the
    stream, which would stall the engine's overlap of host and device)."""
    tensor = torch.tensor(data, dtype=dtype)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class KVStore(Slots):
    """Pages and rings for every layer, sized from a byte budget; allocates pages and slots to sequences
    (`rlkv.engine.store.Store`)."""

    def __init__(
        self,
        layout: Layout,
        keep: torch.Tensor,
        sink: int,
        recent: int,
        page_size: int,
        budget: int,
        max_batch: int,
        max_seq_len: int,
        device,
        precision: torch.dtype | KVPrecisions,
        sequence_tokens: int | None = None,
    ):
        """`precision`: the pages' and rings' (a dtype: both unquantised at that dtype)."""
        if tuple(keep.shape) != layout.shape:
            raise ValueError(f"keep-mask is {tuple(keep.shape)} but the model has {layout.shape} (layers x kv_heads)")
        self.keep = keep.bool().cpu()
        self.sink, self.recent, self.page_size = sink, recent, page_size
        self.ring = sink + recent
        self.max_pages_per_seq = math.ceil(max_seq_len / page_size)
        if isinstance(precision, torch.dtype):
            precision = KVPrecisions(KVPrecision(precision), KVPrecision(precision))
        self.kept_precision, self.ring_precision = precision.kept.to(device), precision.compressed.to(device)
        d = layout.head_dim
        self.kept_heads = int(self.keep.sum())
        self.compressed_heads = self.keep.numel() - self.kept_heads
        self.token_bytes = 2 * self.kept_heads * d * self.kept_precision.itemsize  # one more token of a sequence
        self.page_bytes = page_size * self.token_bytes
        self.slot_bytes = 2 * self.ring * self.compressed_heads * d * self.ring_precision.itemsize  # its ring
        if sequence_tokens is not None:  # scratch page and slot, then (pages + ring) per sequence
            room = budget - self.slot_bytes - self.page_bytes * bool(self.kept_heads)
            per_sequence = self.pages_for(sequence_tokens) * self.page_bytes + self.slot_bytes
            max_batch = max(1, min(max_batch, room // per_sequence))
        num_slots = max_batch + 1
        self.num_pages = self._pages_left(budget, max_batch)
        self._allocate(layout, num_slots, device)
        self.page_table = torch.zeros(num_slots, self.max_pages_per_seq, dtype=torch.int32, device=device)
        self.pool = PagePool(self.num_pages)
        self._init_slots(num_slots)
        self._table_writes: list[tuple[int, int, int]] = []
        self.peak_pages_used = 0

    def _pages_left(self, budget: int, max_batch: int) -> int:
        """Pages the budget holds beside the rings of `max_batch` sequences and the scratch slot (1: no pages
        needed)."""
        ring_bytes = (max_batch + 1) * self.slot_bytes
        if not self.kept_heads:
            if budget < ring_bytes:
                raise ValueError(
                    f"kv_budget of {budget / 2**20:.1f} MiB cannot hold the rings of {max_batch} sequences "
                    f"({ring_bytes / 2**20:.1f} MiB): raise kv_budget or lower max_batch"
                )
            return 1
        if budget < ring_bytes + 2 * self.page_bytes:
            raise ValueError(
                f"kv_budget of {budget / 2**20:.1f} MiB cannot hold the rings of {max_batch} sequences "
                f"({ring_bytes / 2**20:.1f} MiB) plus any page ({self.page_bytes / 2**10:.1f} KiB each): "
                "raise kv_budget or lower max_batch"
            )
        return int((budget - ring_bytes) // self.page_bytes)

    def _allocate(self, layout: Layout, num_slots: int, device) -> None:
        """Every layer's pages and rings, and what the kernels read of the head split."""
        d, page_size = layout.head_dim, self.page_size
        self.full_idx = [torch.nonzero(row).flatten().to(device) for row in self.keep]
        self.comp_idx = [torch.nonzero(~row).flatten().to(device) for row in self.keep]
        # the same split for query heads (a GQA group follows its KV head)
        self.q_full, self.q_comp = zip(*(query_heads(row, layout.group_size, device) for row in self.keep))
        self.pages_k, self.pages_v, self.ring_k, self.ring_v = [], [], [], []
        for layer in range(layout.num_layers):
            nf, nc = len(self.full_idx[layer]), len(self.comp_idx[layer])
            page_shape = (self.num_pages, page_size, nf, d) if nf else (0,)
            ring_shape = (num_slots, self.ring, nc, d) if nc else (0,)
            page, ring = self.kept_precision.dtype, self.ring_precision.dtype
            self.pages_k.append(torch.zeros(page_shape, dtype=page, device=device))
            self.pages_v.append(torch.zeros(page_shape, dtype=page, device=device))
            self.ring_k.append(torch.zeros(ring_shape, dtype=ring, device=device))
            self.ring_v.append(torch.zeros(ring_shape, dtype=ring, device=device))
        # what each layer's new keys are stored less (`rlkv.precision.centred`): None unless a store is FP8
        kv = KVPrecisions(self.kept_precision, self.ring_precision)
        self.key_centres = [kv.key_centres(i, self.full_idx[i], self.comp_idx[i]) for i in range(layout.num_layers)]
        # head kind (0 paged, 1 ring) and index within its store, per layer: what the decode kernel reads
        self.kind = [(~self.keep[i]).int().to(device) for i in range(layout.num_layers)]
        index = torch.zeros_like(self.keep, dtype=torch.int32)
        for i in range(layout.num_layers):
            index[i, self.keep[i]] = torch.arange(int(self.keep[i].sum()), dtype=torch.int32)
            index[i, ~self.keep[i]] = torch.arange(int((~self.keep[i]).sum()), dtype=torch.int32)
        self.index = [index[i].to(device) for i in range(layout.num_layers)]

    # ------------------------------------------------------------------ precision
    def round_trip(self, layer: int, key: torch.Tensor, value: torch.Tensor, dim: int) -> tuple:
        """New K/V of `layer` (every KV head along `dim`) as attention reads them once stored: kept heads at the
        pages' precision, compressed heads at the rings' (the same tensors when nothing is quantised)."""
        kv = KVPrecisions(self.kept_precision, self.ring_precision)
        return kv.round_trip(layer, self.full_idx[layer], self.comp_idx[layer], key, value, dim)

    # ------------------------------------------------------------------ allocation
    def pages_for(self, tokens: int) -> int:
        """Pages a sequence of `tokens` tokens needs (none when no head is kept)."""
        return math.ceil(tokens / self.page_size) if self.kept_heads else 0

    @property
    def capacity_pages(self) -> int:
        return self.num_pages - 1 if self.kept_heads else 0

    @property
    def free_pages(self) -> int:
        return self.pool.free

    def grow(self, slot: int, pages: list[int], tokens: int) -> bool:
        """Extend `pages` (the sequence in `slot`) to hold `tokens` tokens; False, taking nothing, if the pool
        is short. Page-table rows are written at the next `flush()`."""
        need = self.pages_for(tokens) - len(pages)
        if need <= 0:
            return True
        if need > self.pool.free:
            return False
        new = self.pool.take(need)
        self._table_writes += [(slot, len(pages) + i, page) for i, page in enumerate(new)]
        pages.extend(new)
        self.peak_pages_used = max(self.peak_pages_used, self.capacity_pages - self.pool.free)
        return True

    def shared_pages(self, tokens: int) -> int:
        """Pages a sample forked after `tokens` tokens shares with its origin: the full ones."""
        return tokens // self.page_size if self.kept_heads else 0

    def share(self, slot: int, pages: list[int], tokens: int) -> list[int]:
        """The page list of a new sequence in `slot` forked from one holding `pages` after `tokens` tokens: their
        full pages, held once more (it then `grow`s its own)."""
        shared = pages[: self.shared_pages(tokens)]
        self.pool.share(shared)
        self._table_writes += [(slot, i, page) for i, page in enumerate(shared)]
        return list(shared)

    def fork(self, src_slot: int, src_pages: list[int], dst_slot: int, dst_pages: list[int], tokens: int) -> None:
        """Copy what a sequence of `tokens` tokens holds that a fork of it does not share: its partly filled
        last page (kept heads) and its ring (compressed heads)."""
        partial = self.kept_heads and tokens % self.page_size
        last = tokens // self.page_size
        for layer in range(len(self.pages_k)):
            if partial and self.pages_k[layer].numel():
                self.pages_k[layer][dst_pages[last]] = self.pages_k[layer][src_pages[last]]
                self.pages_v[layer][dst_pages[last]] = self.pages_v[layer][src_pages[last]]
            if self.ring_k[layer].numel():
                self.ring_k[layer][dst_slot] = self.ring_k[layer][src_slot]
                self.ring_v[layer][dst_slot] = self.ring_v[layer][src_slot]

    def name_pages(self, pages: list[int], tokens: list[int]) -> None:
        """Record the content hashes of the full pages holding `tokens` (`rlkv.engine.pages`)."""
        if self.kept_heads:
            self.pool.name(pages, tokens, self.page_size)

    def flush(self) -> None:
        """Write the page-table entries of pages handed out since the last flush (one upload for all)."""
        if self._table_writes:
            slots, cols, pages = upload(list(zip(*self._table_writes)), torch.long, self.page_table.device)
            self.page_table[slots, cols] = pages.to(torch.int32)
            self._table_writes = []

    def release(self, slot: int, pages: list[int]) -> None:
        self._release_slot(slot)
        self.pool.release(pages)

    # ------------------------------------------------------------------ accounting
    def nbytes(self) -> int:
        """Bytes allocated for K/V (pages and rings of every layer, in the bytes they store)."""
        return sum(
            t.numel() * t.element_size() for ts in (self.pages_k, self.pages_v, self.ring_k, self.ring_v) for t in ts
        )

    def sequence_nbytes(self, tokens: int) -> int:
        """Bytes of K/V a sequence of `tokens` tokens holds: its kept heads' tokens and its ring."""
        return tokens * self.token_bytes + self.slot_bytes
