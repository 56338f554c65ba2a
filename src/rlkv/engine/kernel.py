"""The engine's Triton kernels: fused decode attention for both kinds of KV head, and the store of new
K/V into pages and rings.

`_decode_kernel`: a program handles one (sequence, KV head, split) and all the query heads of that KV head's
GQA group (padded to 16 rows for `tl.dot`):
- a kept head walks its split of the sequence's pages (BLOCK tokens at a time, gathered
  through the page table) with an online softmax;
- a compressed head reads its sink + recent ring once (split 0 only), each slot's token
  position worked out from the sequence length;
- in gated mode every head is kept and the same pass also accumulates a second softmax over
  the keys the streaming rule allows (first `sink`, last `recent`); the two outputs are mixed
  with alpha after the splits are combined.
Splits ("split-K") give short batches of long sequences enough programs to fill the GPU; their
partial (max, sum, acc) are combined in torch. With one split (large batches) the kernel writes the
final output itself, gated mix included, and no combine step runs. `rlkv.engine.attention.decode_torch` is the
plain reference this kernel is tested against. (The token droppers' slot kernel, which both
runtimes use, is `rlkv.attention.slot_kernel`.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlkv.attention.reference import gate_mix
from rlkv.attention.slot_kernel import online_softmax
from rlkv.engine.kv import KVStore


@triton.jit
def _decode_kernel(
    Q,
    KP,
    VP,
    KR,
    VR,
    KIND,
    INDEX,
    PT,
    LENS,
    SLOTS,
    ACC,
    M,
    L,
    O,  # noqa: E741 (Triton pointer arguments are named in capitals, as ACC, M, L)
    ALPHA,
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
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(LENS + b)
    last = length - 1
    slot = tl.load(SLOTS + b)
    kind = tl.load(KIND + h)
    idx = tl.load(INDEX + h)
    low = tl.where(window > 0, tl.maximum(length - window, 0), 0)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    rows = h * G + g
    q = tl.load(Q + b * stride_qb + rows[:, None] * stride_qh + d[None, :], mask=(g < G)[:, None], other=0.0)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    m_s = tl.full([G_PAD], float("-inf"), tl.float32)
    l_s = tl.zeros([G_PAD], tl.float32)
    acc_s = tl.zeros([G_PAD, D], tl.float32)

    if kind == 0:
        n_blocks = tl.cdiv(length, BLOCK)
        per = tl.cdiv(n_blocks, SPLITS)
        first = tl.maximum(split * per, low // BLOCK)
        stop = tl.minimum(n_blocks, split * per + per)
        for blk in range(first, stop):
            t = blk * BLOCK + tl.arange(0, BLOCK)
            inside = t < length
            page = tl.load(PT + slot * stride_table + t // PAGE, mask=inside, other=0)
            base = page.to(tl.int64) * stride_pp + (t % PAGE) * stride_pt + idx * stride_ph
            k = tl.load(KP + base[:, None] + d[None, :], mask=inside[:, None], other=0.0)
            v = tl.load(VP + base[:, None] + d[None, :], mask=inside[:, None], other=0.0)
            sc = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
            valid = inside & (t >= low)
            m_i, l_i, acc = online_softmax(tl.where(valid[None, :], sc, float("-inf")), v, m_i, l_i, acc, PRECISION)
            if GATED:
                stream = valid & ((t < sink) | (t > last - recent))
                m_s, l_s, acc_s = online_softmax(
                    tl.where(stream[None, :], sc, float("-inf")), v, m_s, l_s, acc_s, PRECISION
                )
    else:
        if split == 0:
            j = tl.arange(0, RING_PAD)
            in_ring = j < RING
            back = ((last - j) % recent + recent) % recent  # rlkv.attention.ring.ring_positions, inline
            pos = tl.where(j < sink, j, last - back)
            valid = in_ring & tl.where(j < sink, j <= last, pos >= sink) & (pos >= low)
            base = slot.to(tl.int64) * stride_rs + j * stride_rt + idx * stride_rh
            k = tl.load(KR + base[:, None] + d[None, :], mask=in_ring[:, None], other=0.0)
            v = tl.load(VR + base[:, None] + d[None, :], mask=in_ring[:, None], other=0.0)
            sc = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
            m_i, l_i, acc = online_softmax(tl.where(valid[None, :], sc, float("-inf")), v, m_i, l_i, acc, PRECISION)

    out_rows = g < G
    if SPLITS == 1:  # the whole sequence is in this program: write the final output, no combine step
        out = acc / l_i[:, None]
        if GATED:
            a = tl.load(ALPHA + h)
            out = a * out + (1 - a) * (acc_s / l_s[:, None])
        o_ptr = O + b * stride_ob + rows[:, None] * stride_oh + d[None, :]
        tl.store(o_ptr, out.to(O.dtype.element_ty), mask=out_rows[:, None])
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
):
    """One (row, KV head): its new token's K/V into its page (kept head) or its ring slot (compressed head)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, D)
    k = tl.load(K + b * stride_kb + h * stride_kh + d)
    v = tl.load(V + b * stride_vb + h * stride_vh + d)
    idx = tl.load(INDEX + h)
    if tl.load(KIND + h) == 0:
        base = tl.load(PAGE + b).to(tl.int64) * stride_pp + tl.load(OFFSET + b) * stride_pt + idx * stride_ph
        tl.store(KP + base + d, k)
        tl.store(VP + base + d, v)
    else:
        base = tl.load(SLOT + b).to(tl.int64) * stride_rs + tl.load(RING + b) * stride_rt + idx * stride_rh
        tl.store(KR + base + d, k)
        tl.store(VR + base + d, v)


def store_kv(k: torch.Tensor, v: torch.Tensor, store: KVStore, layer: int, batch) -> None:
    """Write new K/V [B, Hkv, D] of `layer` into pages and rings in one launch (what
    `rlkv.engine.attention.store_torch` does with up to eight indexing kernels). `batch` says where:
    a decode step's `rlkv.engine.attention.Decode`, or packed new prompts' `Prompts` (B = their tokens)."""
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    pk, pv, rk, rv = store.pages_k[layer], store.pages_v[layer], store.ring_k[layer], store.ring_v[layer]
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
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        *(pk.stride()[:3] if pk.ndim == 4 else (0, 0, 0)),
        *(rk.stride()[:3] if rk.ndim == 4 else (0, 0, 0)),
        D=k.shape[-1],
    )


def num_splits(batch: int, kv_heads: int, device: torch.device) -> int:
    """Splits per sequence: only as many as fill one wave of SMs.

    A split pays for a combine step (several small kernels per layer), so from one (sequence, KV
    head) per SM on, one split is fastest (`benchmarks/engine.py --parts tune`)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(16, sms // (batch * kv_heads)))


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
) -> torch.Tensor:
    """Decode attention of q [B, Hq, D] over the store's pages and rings of `layer` -> [B, Hq, D].

    Launch defaults: a tile of BLOCK x D = 16384 elements (256 tokens at D = 64, 128 at D = 128), 8
    warps, 3 pipeline stages at D <= 64 and 2 above: with about one (sequence, KV head) program per
    SM, a longer block keeps more bytes in flight, and the K and V tiles in flight stay within an
    SM's shared memory (measurements: benchmarks/README.md)."""
    bsz, hq, d = q.shape
    block = block or max(16, 16384 // d)
    num_stages = num_stages or (3 if d <= 64 else 2)
    kv_heads = store.keep.shape[1]
    group = hq // kv_heads
    splits = splits or num_splits(bsz, kv_heads, q.device)
    out = torch.empty_like(q)
    if splits == 1:  # the kernel writes `out` itself
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
    _decode_kernel[(bsz, kv_heads, splits)](
        q,
        pk,
        pv,
        rk,
        rv,
        store.kind[layer],
        store.index[layer],
        store.page_table,
        lengths.to(torch.int32),
        slots.to(torch.int32),
        acc,
        m,
        denom,
        out,
        alpha_f,
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
        G=group,
        G_PAD=max(16, triton.next_power_of_2(group)),
        D=d,
        PAGE=page,
        BLOCK=block,
        RING=store.ring,
        RING_PAD=max(16, triton.next_power_of_2(store.ring)),
        SPLITS=splits,
        GATED=alpha is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if splits == 1:
        return out
    top = m.amax(-1, keepdim=True)
    weight = torch.exp(m - top)  # empty splits: m = -inf -> weight 0
    out = (acc * weight[..., None]).sum(-2) / (denom * weight).sum(-1)[..., None]
    if alpha is not None:
        return gate_mix(out[0], out[1], alpha, group).to(q.dtype)
    return out[0].to(q.dtype)
