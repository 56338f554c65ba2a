"""The engine's Triton kernels: fused decode attention for both kinds of KV head, and the store of new
K/V into pages and rings.

`_decode_kernel`: a program handles one (sequence, work item) and all the query heads of that item's KV
head's GQA group (padded to 16 rows for `tl.dot`). A layer's work items are its kept heads' splits
first, then one per compressed head:
- a kept head's split walks its share of the sequence's pages (BLOCK tokens at a time, gathered
  through the page table) with an online softmax;
- a compressed head reads its sink + recent ring once, in one program, and writes its output;
- in gated mode every head is kept and the same pass also accumulates a second softmax over
  the keys the streaming rule allows (first `sink`, last `recent`, at `stream_block` granularity:
  `rlkv.attention.reference.keep_keys_mask`); the two outputs are mixed with alpha once the splits
  are combined.
Splits ("split-K") give short batches of long sequences enough programs to fill the GPU; only kept
heads are split (a ring is short), so their number counts the kept heads alone (`num_splits`): the SMs
a compressed head would leave idle go to kept heads' splits. Programs start in order, sequences
fastest, so the long kept work is issued first and the short rings fill the tail (longest first).
With one split (large batches) a kept head's program writes its output itself, gated mix included;
with more, `_combine_kernel` merges the splits' partial (max, sum, acc) and mixes, one launch per layer.
FP8 pages or rings (`rlkv.precision`) are read as they lie and dequantised in registers: a tile's e4m3
values convert exactly to the query's dtype, the head's K scale (a power of two) multiplies the softmax
scale and its V scale the output, so the partial softmaxes the combine kernel merges are already in the
model's units. The store kernel rounds new K/V to e4m3 (`e4m3`, saturating) before it writes them.
`rlkv.engine.attention.decode_torch` is the plain reference these kernels are tested against. (The
token droppers' slot kernel, which both runtimes use, is `rlkv.attention.slot_kernel`.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlkv.attention.slot_kernel import e4m3, online_softmax
from rlkv.engine.kv import KVStore
from rlkv.precision import KEYS, VALUES, KVPrecision


@triton.jit
def _decode_kernel(
    Q,
    KP,
    VP,
    KR,
    VR,
    FULL,
    COMP,
    PT,
    LENS,
    SLOTS,
    ACC,
    M,
    L,
    OUT,
    ALPHA,
    KSP,
    VSP,
    KSR,
    VSR,
    n_kept,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_pp,
    stride_pt,
    stride_ph,
    stride_rs,
    stride_rt,
    stride_rh,
    stride_table,
    stride_an,
    stride_ab,
    stride_ah,
    stride_as,
    stride_mn,
    stride_mb,
    stride_mh,
    scale,
    sink,
    recent,
    window,
    stream_block,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK: tl.constexpr,
    RING: tl.constexpr,
    RING_PAD: tl.constexpr,
    SPLITS: tl.constexpr,
    GATED: tl.constexpr,
    PRECISION: tl.constexpr,
    PAGE_FP8: tl.constexpr,
    RING_FP8: tl.constexpr,
):
    b = tl.program_id(0)
    item = tl.program_id(1)
    kept = item < n_kept * SPLITS
    split = item % SPLITS
    if kept:  # the head's place in its store, and its KV head
        idx = item // SPLITS
        h = tl.load(FULL + idx)
    else:
        idx = item - n_kept * SPLITS
        h = tl.load(COMP + idx)
    length = tl.load(LENS + b)
    last = length - 1
    slot = tl.load(SLOTS + b)
    low = tl.where(window > 0, tl.maximum(length - window, 0), 0)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    rows = h * G + g
    out_rows = g < G
    q = tl.load(Q + b * stride_qb + rows[:, None] * stride_qh + d[None, :], mask=out_rows[:, None], other=0.0)
    o_ptr = OUT + b * stride_ob + rows[:, None] * stride_oh + d[None, :]

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    if kept:
        k_scale, v_scale = scale, 1.0  # FP8: the head's K scale joins the softmax scale, its V scale the output
        if PAGE_FP8:
            k_scale, v_scale = scale * tl.load(KSP + h), tl.load(VSP + h)
        m_s = tl.full([G_PAD], float("-inf"), tl.float32)
        l_s = tl.zeros([G_PAD], tl.float32)
        acc_s = tl.zeros([G_PAD, D], tl.float32)
        n_blocks = tl.cdiv(length, BLOCK)
        per = tl.cdiv(n_blocks, SPLITS)
        first = tl.maximum(split * per, low // BLOCK)
        stop = tl.minimum(n_blocks, split * per + per)
        for blk in range(first, stop):
            t = blk * BLOCK + tl.arange(0, BLOCK)
            inside = t < length
            page = tl.load(PT + slot * stride_table + t // PAGE, mask=inside, other=0)
            base = page.to(tl.int64) * stride_pp + (t % PAGE) * stride_pt + idx * stride_ph
            k = tl.load(KP + base[:, None] + d[None, :], mask=inside[:, None], other=0.0).to(q.dtype)
            v = tl.load(VP + base[:, None] + d[None, :], mask=inside[:, None], other=0.0).to(q.dtype)
            sc = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * k_scale
            valid = inside & (t >= low)
            m_i, l_i, acc = online_softmax(tl.where(valid[None, :], sc, float("-inf")), v, m_i, l_i, acc, PRECISION)
            if GATED:
                stream = valid & ((t < sink) | (t >= (last // stream_block + 1) * stream_block - recent))
                m_s, l_s, acc_s = online_softmax(
                    tl.where(stream[None, :], sc, float("-inf")), v, m_s, l_s, acc_s, PRECISION
                )
        acc, acc_s = acc * v_scale, acc_s * v_scale
        if SPLITS == 1:  # the whole sequence is in this program: write the final output, no combine step
            out = acc / l_i[:, None]
            if GATED:
                a = tl.load(ALPHA + h)
                out = a * out + (1 - a) * (acc_s / l_s[:, None])
            tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=out_rows[:, None])
        else:
            a_ptr = ACC + b * stride_ab + rows[:, None] * stride_ah + split * stride_as + d[None, :]
            tl.store(a_ptr, acc, mask=out_rows[:, None])
            m_ptr = M + b * stride_mb + rows * stride_mh + split
            tl.store(m_ptr, m_i, mask=out_rows)
            tl.store(L + b * stride_mb + rows * stride_mh + split, l_i, mask=out_rows)
            if GATED:
                tl.store(a_ptr + stride_an, acc_s, mask=out_rows[:, None])
                tl.store(m_ptr + stride_mn, m_s, mask=out_rows)
                tl.store(L + stride_mn + b * stride_mb + rows * stride_mh + split, l_s, mask=out_rows)
    else:  # a compressed head: its ring, one program, the output written here
        j = tl.arange(0, RING_PAD)
        in_ring = j < RING
        back = ((last - j) % recent + recent) % recent  # rlkv.attention.ring.ring_positions, inline
        pos = tl.where(j < sink, j, last - back)
        valid = in_ring & tl.where(j < sink, j <= last, pos >= sink) & (pos >= low)
        k_scale, v_scale = scale, 1.0
        if RING_FP8:
            k_scale, v_scale = scale * tl.load(KSR + h), tl.load(VSR + h)
        base = slot.to(tl.int64) * stride_rs + j * stride_rt + idx * stride_rh
        k = tl.load(KR + base[:, None] + d[None, :], mask=in_ring[:, None], other=0.0).to(q.dtype)
        v = tl.load(VR + base[:, None] + d[None, :], mask=in_ring[:, None], other=0.0).to(q.dtype)
        sc = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * k_scale
        m_i, l_i, acc = online_softmax(tl.where(valid[None, :], sc, float("-inf")), v, m_i, l_i, acc, PRECISION)
        tl.store(o_ptr, (acc * v_scale / l_i[:, None]).to(OUT.dtype.element_ty), mask=out_rows[:, None])


@triton.jit
def _merged(acc_ptr, m_ptr, l_ptr, live):
    """Partial softmaxes [G, S] (max, sum) and [G, S, D] (acc) merged over their splits -> [G, D]."""
    m = tl.load(m_ptr, mask=live, other=float("-inf"))
    top = tl.max(m, 1)
    weight = tl.exp(m - tl.where(top == float("-inf"), 0.0, top)[:, None])  # padding rows: all -inf, weight 0
    denom = tl.sum(tl.load(l_ptr, mask=live, other=0.0) * weight, 1)
    acc = tl.load(acc_ptr, mask=live[:, :, None], other=0.0)
    return tl.sum(acc * weight[:, :, None], 1) / tl.where(denom == 0, 1.0, denom)[:, None]


@triton.jit
def _combine_kernel(
    ACC,
    M,
    L,
    OUT,
    FULL,
    ALPHA,
    stride_an,
    stride_ab,
    stride_ah,
    stride_as,
    stride_mn,
    stride_mb,
    stride_mh,
    stride_ob,
    stride_oh,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    GATED: tl.constexpr,
):
    """One (sequence, kept head): merge its splits' partial softmaxes (max, sum, acc) into the output, gated mix
    included. An empty split (m = -inf) weighs 0."""
    b = tl.program_id(0)
    h = tl.load(FULL + tl.program_id(1))
    g = tl.arange(0, G_PAD)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, D)
    rows = h * G + g
    live = (g < G)[:, None] & (s < SPLITS)[None, :]  # [G, S]
    m_ptr = b * stride_mb + rows[:, None] * stride_mh + s[None, :]
    a_ptr = b * stride_ab + rows[:, None, None] * stride_ah + s[None, :, None] * stride_as + d[None, None, :]
    out = _merged(ACC + a_ptr, M + m_ptr, L + m_ptr, live)
    if GATED:
        a = tl.load(ALPHA + h)
        out = a * out + (1 - a) * _merged(ACC + stride_an + a_ptr, M + stride_mn + m_ptr, L + stride_mn + m_ptr, live)
    o_ptr = OUT + b * stride_ob + rows[:, None] * stride_oh + d[None, :]
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=(g < G)[:, None])


@triton.jit
def _store_kernel(
    K,
    V,
    KP,
    VP,
    KR,
    VR,
    KIND,
    INDEX,
    PAGE,
    OFFSET,
    SLOT,
    RING,
    KSP,
    VSP,
    KSR,
    VSR,
    stride_kb,
    stride_kh,
    stride_vb,
    stride_vh,
    stride_pp,
    stride_pt,
    stride_ph,
    stride_rs,
    stride_rt,
    stride_rh,
    D: tl.constexpr,
    PAGE_FP8: tl.constexpr,
    RING_FP8: tl.constexpr,
):
    """One (row, KV head): its new token's K/V into its page (kept head) or its ring slot (compressed head),
    rounded to e4m3 at the head's scales where that store is FP8."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, D)
    k = tl.load(K + b * stride_kb + h * stride_kh + d)
    v = tl.load(V + b * stride_vb + h * stride_vh + d)
    idx = tl.load(INDEX + h)
    if tl.load(KIND + h) == 0:
        base = tl.load(PAGE + b).to(tl.int64) * stride_pp + tl.load(OFFSET + b) * stride_pt + idx * stride_ph
        _put(KP + base + d, VP + base + d, k, v, KSP + h, VSP + h, PAGE_FP8)
    else:
        base = tl.load(SLOT + b).to(tl.int64) * stride_rs + tl.load(RING + b) * stride_rt + idx * stride_rh
        _put(KR + base + d, VR + base + d, k, v, KSR + h, VSR + h, RING_FP8)


@triton.jit
def _put(k_at, v_at, k, v, K_SCALE, V_SCALE, FP8: tl.constexpr):
    """Store a token's K/V, rounded to e4m3 at the head's scales where the store is FP8 (a function of its own:
    Triton refuses a runtime branch that changes a variable's type, as the rounding does)."""
    if FP8:
        k, v = e4m3(k.to(tl.float32) / tl.load(K_SCALE)), e4m3(v.to(tl.float32) / tl.load(V_SCALE))
    tl.store(k_at, k.to(k_at.dtype.element_ty))
    tl.store(v_at, v.to(v_at.dtype.element_ty))


def store_kv(k: torch.Tensor, v: torch.Tensor, store: KVStore, layer: int, batch) -> None:
    """Write new K/V [B, Hkv, D] of `layer` into pages and rings in one launch (what
    `rlkv.engine.attention.store_torch` does with up to eight indexing kernels). `batch` says where:
    a decode step's `rlkv.engine.attention.Decode`, or packed new prompts' `Prompts` (B = their tokens)."""
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    pk, pv, rk, rv = store.pages_k[layer], store.pages_v[layer], store.ring_k[layer], store.ring_v[layer]
    page_scales, ring_scales = _scales(store.kept_precision, layer, k), _scales(store.ring_precision, layer, k)
    _store_kernel[(k.shape[0], k.shape[1])](
        k,
        v,
        pk,
        pv,
        rk,
        rv,
        store.kind[layer],
        store.index[layer],
        batch.page,
        batch.offset,
        batch.slots,
        batch.ring,
        *page_scales,
        *ring_scales,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        *(pk.stride()[:3] if pk.ndim == 4 else (0, 0, 0)),
        *(rk.stride()[:3] if rk.ndim == 4 else (0, 0, 0)),
        D=k.shape[-1],
        PAGE_FP8=store.kept_precision.quantized,
        RING_FP8=store.ring_precision.quantized,
    )


def _scales(precision: KVPrecision, layer: int, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K scales, V scales) [kv_heads] of `layer` at `precision`; unquantised, `other` stands in (never read)."""
    if not precision.quantized:
        return other, other
    return precision.scale(KEYS, layer), precision.scale(VALUES, layer)


def num_splits(batch: int, kept_heads: int, device: torch.device) -> int:
    """Splits per kept head of a sequence: only as many as fill one wave of SMs with kept heads' programs.

    Compressed heads are never split (their ring is one program). A split pays for the combine (one more
    launch per layer), so from one (sequence, kept head) per SM on, one split is fastest
    (`benchmarks/engine.py --parts tune`)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(16, sms // (batch * max(kept_heads, 1))))


def decode_attention(
    q: torch.Tensor,
    store: KVStore,
    layer: int,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    scaling: float,
    window: int | None,
    alpha: torch.Tensor | None = None,
    splits: int | None = None,
    block: int | None = None,
    num_warps: int = 8,
    num_stages: int | None = None,
    stream_block: int = 1,
) -> torch.Tensor:
    """Decode attention of q [B, Hq, D] over the store's pages and rings of `layer` -> [B, Hq, D].

    `alpha` [kv_heads]: gated mode, with the streaming branch at `stream_block` granularity.

    Launch defaults: a tile of BLOCK x D = 16384 elements (256 tokens at D = 64, 128 at D = 128), 8
    warps, 3 pipeline stages at D <= 64 and 2 above: with about one (sequence, KV head) program per
    SM, a longer block keeps more bytes in flight, and the K and V tiles in flight stay within an
    SM's shared memory (measurements: benchmarks/README.md). `splits`: per kept head (default `num_splits`)."""
    bsz, hq, d = q.shape
    q = q if q.stride(-1) == 1 else q.contiguous()  # the kernel reads a head's D values in a row
    block = block or max(16, 16384 // d)
    num_stages = num_stages or (3 if d <= 64 else 2)
    full, comp = store.full_idx[layer], store.comp_idx[layer]
    n_kept, n_comp = len(full), len(comp)
    group = hq // store.keep.shape[1]
    splits = (splits or num_splits(bsz, n_kept, q.device)) if n_kept else 1
    out = torch.empty_like(q)
    if splits == 1:  # every program writes its output itself
        acc = m = denom = out
        acc_strides, m_strides = (0, 0, 0, 0), (0, 0, 0)
    else:
        branches = 1 if alpha is None else 2
        acc = torch.empty(branches, bsz, hq, splits, d, dtype=torch.float32, device=q.device)
        m = torch.empty(branches, bsz, hq, splits, dtype=torch.float32, device=q.device)
        denom = torch.empty_like(m)
        acc_strides, m_strides = acc.stride()[:4], m.stride()[:3]
    alpha_f = alpha.float().contiguous() if alpha is not None else q
    pk, pv, rk, rv = store.pages_k[layer], store.pages_v[layer], store.ring_k[layer], store.ring_v[layer]
    page_strides = pk.stride()[:3] if pk.ndim == 4 else (0, 0, 0)
    ring_strides = rk.stride()[:3] if rk.ndim == 4 else (0, 0, 0)
    page = store.page_size
    block = max(block, page)
    g_pad = max(16, triton.next_power_of_2(group))
    _decode_kernel[(bsz, n_kept * splits + n_comp)](
        q,
        pk,
        pv,
        rk,
        rv,
        full if n_kept else comp,  # an empty list is never read: the other one stands in
        comp if n_comp else full,
        store.page_table,
        lengths.to(torch.int32),
        slots.to(torch.int32),
        acc,
        m,
        denom,
        out,
        alpha_f,
        *_scales(store.kept_precision, layer, q),
        *_scales(store.ring_precision, layer, q),
        n_kept,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        *page_strides,
        *ring_strides,
        store.page_table.stride(0),
        *acc_strides,
        *m_strides,
        scaling,
        store.sink,
        store.recent,
        window or 0,
        stream_block,
        G=group,
        G_PAD=g_pad,
        D=d,
        PAGE=page,
        BLOCK=block,
        RING=store.ring,
        RING_PAD=max(16, triton.next_power_of_2(store.ring)),
        SPLITS=splits,
        GATED=alpha is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        PAGE_FP8=store.kept_precision.quantized,
        RING_FP8=store.ring_precision.quantized,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if splits > 1:
        _combine_kernel[(bsz, n_kept)](
            acc,
            m,
            denom,
            out,
            full,
            alpha_f,
            *acc_strides,
            *m_strides,
            out.stride(0),
            out.stride(1),
            G=group,
            G_PAD=triton.next_power_of_2(group),
            D=d,
            SPLITS=splits,
            SPLITS_PAD=triton.next_power_of_2(splits),
            GATED=alpha is not None,
            num_warps=4,
        )
    return out
