"""Each row's top-k / top-p threshold on the GPU without sorting the vocabulary.

Sampling's filter (`rlkv.engine.sampling.filter_logits`) keeps a row's tokens whose temperature-scaled
logit is at least a threshold: that of its k-th best token (top-k), and within those, that of the last
token whose better tokens' probability is at most top_p (top-p); tokens tied with it stay. Sorting a
vocabulary of 151,936 logits per row to find it cost 11.9 ms at 256 rows on an H100, twice a decode step
(`results/engine_qwen15_sampling_eager_h100.json`), and inductor cannot compile the sort's cumsum
(`filter_logits`). Here a radix search over the logits' order-preserving int32 keys finds both thresholds:
`PASSES` passes per threshold, each weighing `RADIX - 1` candidate thresholds at once (counts for top-k,
probability mass for top-p: the largest key whose keys at or above it weigh more than k - 1, or than top_p
of the top-k mass), exact to the bit after 8 passes.

Each pass is one launch over (row, chunk of `CHUNK` logits): a row is spread over many programs, since one
program walking a whole row is bound by its latency (1.45 ms for one row on an H100,
`results/engine_qwen15_sampling_kernel_h100.json`). Programs add their chunk's weights into the pass's
histogram with integer atomics, the masses in fixed point, so the sums do not depend on the order the
programs run in: a row's threshold is the same in every run and batch. Each program replays the earlier
passes' choices from their histograms. The compiled decode step calls it as one opaque operator
(`rlkv::nucleus_threshold`), as it calls the attention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

RADIX = 16  # thresholds weighed per pass (the last one, at the span's end, weighs nothing)
PASSES = 8  # RADIX ** PASSES = 2 ** 32: every int32 key
BLOCK = 1024  # logits a program reads at a time
CHUNK = 4096  # logits a program weighs per pass: 38 programs for a row of 151,936
# masses in fixed point where programs add them up (a token weighs exp(x - max) <= 1, a chunk's float32 sum at
# most CHUNK): a row's sum, at most V * 2**32, is exact in int64 and, below 2**21 tokens, in the float64 compared
FIXED_POINT = 2.0**32
KEY_MAX, KEY_MIN = 2**31 - 1, -(2**31)


@triton.jit
def _order_keys(x):
    """int32 keys ordered as the float32 values `x` are, equal where they are equal (-0.0 onto 0.0)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, (bits ^ 0x7FFFFFFF) + 1, bits)


@triton.jit
def _key_value(key):
    """The float32 value of an int64 key (`_order_keys`' inverse)."""
    bits = tl.where(key > 0, key, (key - 1) ^ 0x7FFFFFFF).to(tl.int32)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _narrow(HIST, r, rows, lo, hi, target, passes, RADIX: tl.constexpr):
    """The span [lo, hi) of a search after its first `passes` passes, from their histograms HIST [PASSES, rows,
    RADIX]: each pass keeps the sub-span of its last candidate that weighs more than `target` (float64)."""
    j = tl.arange(0, RADIX)
    for i in range(passes):
        step = (hi - lo + RADIX - 1) // RADIX
        weight = tl.load(HIST + (i * rows + r) * RADIX + j)
        n = tl.sum((weight.to(tl.float64) > target).to(tl.int64))
        hi = tl.minimum(hi, lo + step * (n + 1))
        lo = lo + step * n
    return lo, hi


@triton.jit
def _row_span(KEYS, r):
    """A row's smallest key and one past its largest (`_keys_kernel`)."""
    return tl.load(KEYS + 2 * r).to(tl.int64), tl.load(KEYS + 2 * r + 1).to(tl.int64) + 1


@triton.jit
def _floor(HIST_K, KEYS, TOP_K, r, rows, V, PASSES: tl.constexpr, RADIX: tl.constexpr):
    """The row's top-k threshold key after every top-k pass (its smallest key when top-k is off)."""
    lo, hi = _row_span(KEYS, r)
    k = tl.load(TOP_K + r).to(tl.int64)
    found, _ = _narrow(HIST_K, r, rows, lo, hi, (k - 1).to(tl.float64), PASSES, RADIX)
    return tl.where((k > 0) & (k < V), found, lo)


@triton.jit
def _keys_kernel(X, stride, V, KEYS, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """Each row's smallest and largest keys into KEYS [rows, 2] (int32, set to KEY_MAX, KEY_MIN beforehand)."""
    r = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * CHUNK
    lo = tl.full((), 2**31 - 1, tl.int32)
    hi = tl.full((), -(2**31), tl.int32)
    for off in range(0, CHUNK, BLOCK):
        offs = start + off + tl.arange(0, BLOCK)
        valid = offs < V
        key = _order_keys(tl.load(X + r * stride + offs, mask=valid, other=0.0))
        lo = tl.minimum(lo, tl.min(tl.where(valid, key, 2**31 - 1)))
        hi = tl.maximum(hi, tl.max(tl.where(valid, key, -(2**31))))
    tl.atomic_min(KEYS + 2 * r, lo)
    tl.atomic_max(KEYS + 2 * r + 1, hi)


@triton.jit(do_not_specialize=["done"])
def _pass_kernel(
    X,
    stride,
    V,
    TOP_K,
    TOP_P,
    KEYS,
    HIST_K,
    HIST_P,
    TOTAL,
    rows,
    done,
    NUCLEUS: tl.constexpr,
    FIXED_POINT: tl.constexpr,
    RADIX: tl.constexpr,
    PASSES: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Pass `done` of the top-k search (NUCLEUS false) or the top-p one: this chunk's weight at or above each of
    the pass's candidate thresholds, added into its histogram; the first top-p pass also adds the chunk's top-k
    mass into TOTAL."""
    r = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * CHUNK
    lo, hi = _row_span(KEYS, r)
    m = _key_value(hi - 1)  # the row's largest logit
    if NUCLEUS:
        floor = _floor(HIST_K, KEYS, TOP_K, r, rows, V, PASSES, RADIX)
        target = tl.load(TOP_P + r).to(tl.float64) * tl.load(TOTAL + r).to(tl.float64)
        lo, hi = _narrow(HIST_P, r, rows, floor, hi, target, done, RADIX)
        hist = HIST_P
        active = tl.load(TOP_P + r) < 1.0
    else:
        floor = lo
        k = tl.load(TOP_K + r).to(tl.int64)
        lo, hi = _narrow(HIST_K, r, rows, lo, hi, (k - 1).to(tl.float64), done, RADIX)
        hist = HIST_K
        active = (k > 0) & (k < V)
    if active:
        j = tl.arange(0, RADIX)
        step = (hi - lo + RADIX - 1) // RADIX
        tried = tl.minimum(lo + step * (j + 1), 2**31 - 1).to(tl.int32)  # [RADIX] ascending; the last one >= hi
        floor32 = floor.to(tl.int32)
        weight = tl.zeros([RADIX], dtype=tl.float32)
        total = tl.full((), 0.0, tl.float32)
        for off in range(0, CHUNK, BLOCK):
            offs = start + off + tl.arange(0, BLOCK)
            valid = offs < V
            x = tl.load(X + r * stride + offs, mask=valid, other=float("-inf"))
            key = _order_keys(x)
            counted = valid & (key >= floor32)
            if NUCLEUS:
                w = tl.where(counted, tl.exp(x - m), 0.0)
            else:
                w = counted.to(tl.float32)
            weight += tl.sum(tl.where(key[:, None] >= tried[None, :], w[:, None], 0.0), axis=0)
            if NUCLEUS:  # the top-k mass, which only the top-p search weighs against
                total += tl.sum(w)
        # the chunk's sums (float32, in the program's fixed order) to int64, where the programs' sums meet: counts as
        # they are (at most CHUNK), masses in fixed point
        if NUCLEUS:
            weight, total = weight * FIXED_POINT, total * FIXED_POINT
        tl.atomic_add(hist + (done * rows + r) * RADIX + j, weight.to(tl.int64))
        if NUCLEUS:
            if done == 0:
                tl.atomic_add(TOTAL + r, total.to(tl.int64))


@triton.jit
def _threshold_kernel(
    TOP_K, TOP_P, V, KEYS, HIST_K, HIST_P, TOTAL, OUT, rows, RADIX: tl.constexpr, PASSES: tl.constexpr
):
    """Row program_id's threshold, its smallest kept logit (float32), from every pass's histogram."""
    r = tl.program_id(0).to(tl.int64)
    floor = _floor(HIST_K, KEYS, TOP_K, r, rows, V, PASSES, RADIX)
    _, hi = _row_span(KEYS, r)
    p = tl.load(TOP_P + r)
    target = p.to(tl.float64) * tl.load(TOTAL + r).to(tl.float64)
    found, _ = _narrow(HIST_P, r, rows, floor, hi, target, PASSES, RADIX)
    tl.store(OUT + r, _key_value(tl.where(p < 1.0, found, floor)))


def nucleus_threshold_kernel(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Each row's smallest kept logit [B] (float32) of `scaled` [B, V] (float32, the temperature-scaled logits) under
    its `top_k` [B] (0: off) and `top_p` [B] (1: off): the Triton kernels (on CUDA, or in Triton's interpreter), a
    fixed number of launches whatever the logits (a CUDA graph can hold them)."""
    scaled = scaled.contiguous()
    rows, vocab = scaled.shape
    device = scaled.device
    out = torch.empty(rows, dtype=torch.float32, device=device)
    if not rows:
        return out
    top_k = top_k.to(torch.int64).contiguous()
    top_p = top_p.to(torch.float32).contiguous()
    keys = torch.empty(rows, 2, dtype=torch.int32, device=device)  # filled on the device: a CUDA graph may capture it
    keys[:, 0], keys[:, 1] = KEY_MAX, KEY_MIN
    hist = torch.zeros(2, PASSES, rows, RADIX, dtype=torch.int64, device=device)  # top-k's passes, top-p's
    total = torch.zeros(rows, dtype=torch.int64, device=device)
    grid = (rows, triton.cdiv(vocab, CHUNK))
    _keys_kernel[grid](scaled, scaled.stride(0), vocab, keys, BLOCK=BLOCK, CHUNK=CHUNK)
    for nucleus in (False, True):
        for done in range(PASSES):
            _pass_kernel[grid](
                scaled,
                scaled.stride(0),
                vocab,
                top_k,
                top_p,
                keys,
                hist[0],
                hist[1],
                total,
                rows,
                done,
                NUCLEUS=nucleus,
                FIXED_POINT=FIXED_POINT,
                RADIX=RADIX,
                PASSES=PASSES,
                BLOCK=BLOCK,
                CHUNK=CHUNK,
                num_warps=8,
            )
    _threshold_kernel[(rows,)](
        top_k, top_p, vocab, keys, hist[0], hist[1], total, out, rows, RADIX=RADIX, PASSES=PASSES
    )
    return out
