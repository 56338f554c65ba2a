"""Each row's top-k / top-p threshold on the GPU without sorting the vocabulary.

Sampling's filter (`rlkv.engine.sampling.filter_logits`) keeps a row's tokens whose temperature-scaled
logit is at least a threshold: that of its k-th best token (top-k), and within those, that of the last
token whose better tokens' probability is at most top_p (top-p); tokens tied with it stay. Sorting a
vocabulary of 151,936 logits per row to find it cost 11.9 ms at 256 rows on an H100, twice a decode step
(`results/engine_qwen15_sampling_eager_h100.json`), and inductor cannot compile the sort's cumsum
(`filter_logits`). `_nucleus_kernel` finds both thresholds without a sort, one program per row: a radix
search over the logits' order-preserving int32 keys, `PASSES` passes over the row, each weighing
`RADIX - 1` thresholds at once (counts for top-k, probability mass for top-p: the largest key whose keys
at or above it weigh more than k - 1, or than top_p of the top-k mass), exact to the bit after 8 passes.
Sums run in a fixed order, so a row's threshold does not depend on the batch or the run. The compiled
decode step calls it as one opaque operator (`rlkv::nucleus_threshold`), as it calls the attention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

RADIX = 16  # thresholds weighed per pass (the last one, at the span's end, weighs nothing)
PASSES = 8  # RADIX ** PASSES = 2 ** 32: every int32 key
BLOCK = 1024  # logits a program reads at a time


@triton.jit
def _order_keys(x):
    """int32 keys ordered as the float32 values `x` are, equal where they are equal (-0.0 onto 0.0)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, (bits ^ 0x7FFFFFFF) + 1, bits)


@triton.jit
def _search(
    row,
    V,
    lo,
    hi,
    target,
    floor,
    m,
    WEIGHTED: tl.constexpr,
    RADIX: tl.constexpr,
    PASSES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The largest key T in [lo, hi) whose keys >= T (counting only keys >= floor) weigh more than `target`: each
    key 1, or exp(x - m) if WEIGHTED. The keys >= lo must weigh more than `target`, the keys >= hi not."""
    j = tl.arange(0, RADIX) + 1
    for _ in range(PASSES):
        step = (hi - lo + RADIX - 1) // RADIX
        tried = tl.minimum(lo + step * j, 2**31 - 1).to(tl.int32)  # [RADIX] ascending; the last one >= hi
        weight = tl.zeros([RADIX], dtype=tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < V
            x = tl.load(row + offs, mask=valid, other=float("-inf"))
            key = _order_keys(x)
            if WEIGHTED:
                w = tl.where(valid & (key >= floor), tl.exp(x - m), 0.0)
            else:
                w = tl.where(valid & (key >= floor), 1.0, 0.0)
            weight += tl.sum(tl.where(key[:, None] >= tried[None, :], w[:, None], 0.0), axis=0)
        n = tl.sum((weight > target).to(tl.int64))  # how many tried thresholds still weigh more than target
        hi = tl.minimum(hi, lo + step * (n + 1))
        lo = lo + step * n
    return lo


@triton.jit
def _nucleus_kernel(X, stride, V, TOP_K, TOP_P, OUT, RADIX: tl.constexpr, PASSES: tl.constexpr, BLOCK: tl.constexpr):
    """Row program_id's threshold: its smallest kept logit (float32), from its logits X [B, V] (float32)."""
    r = tl.program_id(0).to(tl.int64)
    row = X + r * stride
    k = tl.load(TOP_K + r).to(tl.int64)
    p = tl.load(TOP_P + r)
    m = float("-inf")
    lo = tl.full((), 2**31 - 1, tl.int64)
    hi = tl.full((), -(2**31), tl.int64)
    for start in range(0, V, BLOCK):  # the row's largest logit, smallest and largest keys
        offs = start + tl.arange(0, BLOCK)
        valid = offs < V
        x = tl.load(row + offs, mask=valid, other=float("-inf"))
        key = _order_keys(x).to(tl.int64)
        m = tl.maximum(m, tl.max(x))
        lo = tl.minimum(lo, tl.min(tl.where(valid, key, 2**31 - 1)))
        hi = tl.maximum(hi, tl.max(tl.where(valid, key, -(2**31))))
    hi += 1
    floor = lo  # the top-k threshold: every key when top-k is off
    if (k > 0) & (k < V):
        floor = _search(row, V, lo, hi, (k - 1).to(tl.float32), lo, m, False, RADIX, PASSES, BLOCK)
    threshold = floor
    if p < 1.0:
        total = 0.0  # the top-k tokens' mass
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < V
            x = tl.load(row + offs, mask=valid, other=float("-inf"))
            total += tl.sum(tl.where(valid & (_order_keys(x) >= floor), tl.exp(x - m), 0.0))
        threshold = _search(row, V, floor, hi, p * total, floor, m, True, RADIX, PASSES, BLOCK)
    bits = tl.where(threshold > 0, threshold, (threshold - 1) ^ 0x7FFFFFFF).to(tl.int32)  # the key's float
    tl.store(OUT + r, bits.to(tl.float32, bitcast=True))


def nucleus_threshold_kernel(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Each row's smallest kept logit [B] (float32) of `scaled` [B, V] (float32, the temperature-scaled logits) under
    its `top_k` [B] (0: off) and `top_p` [B] (1: off): the Triton kernel (on CUDA, or in Triton's interpreter)."""
    scaled = scaled.contiguous()
    out = torch.empty(scaled.shape[0], dtype=torch.float32, device=scaled.device)
    if scaled.shape[0]:
        _nucleus_kernel[(scaled.shape[0],)](
            scaled,
            scaled.stride(0),
            scaled.shape[1],
            top_k.to(torch.int64).contiguous(),
            top_p.to(torch.float32).contiguous(),
            out,
            RADIX=RADIX,
            PASSES=PASSES,
            BLOCK=BLOCK,
            num_warps=8,
        )
    return out
