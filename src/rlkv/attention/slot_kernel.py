"""Decode attention over a token-dropping method's slots, in Triton: what both runtimes of the token
droppers (the engine's slots, `rlkv.engine.tokendrop`, and transformers' `rlkv.hf.tokendrop` on a GPU)
run for one new token per row.

`_slot_decode_kernel`: a program handles one (sequence, KV head): the new token, then the
sequence's slot read in place (no gather, no float32 copy), with an online softmax; for policies
that score tokens by attention it also writes the raw scores, from which torch forms each
candidate's attention. FP8 slots (`rlkv.precision`) are dequantised in registers, each head by its own
scales. Reference: `rlkv.engine.tokendrop.slot_attention_torch` (gather, float32 softmax), which it is
tested against (in Triton's interpreter on a CPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def e4m3(x):
    """fp32 `x` rounded to the nearest e4m3 value (ties to even), saturating at +-448, still in fp32: the value
    `torch.Tensor.to(torch.float8_e4m3fn)` gives after a clamp. Rounded here in integer arithmetic, so the cast
    to e4m3 that follows is exact on every backend (Triton's interpreter rounds some values wrongly)."""
    x = tl.clamp(x, -448.0, 448.0)
    bits = x.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)  # 3 mantissa bits
    tiny = (tl.abs(x) + 24576.0) - 24576.0  # below 2^-6, multiples of 2^-9 (e4m3's subnormals): fp32's own rounding
    return tl.where(tl.abs(x) < 0.015625, tl.where(x < 0, -tiny, tiny), normal)


@triton.jit
def online_softmax(sc, v, m_i, l_i, acc, PRECISION: tl.constexpr):
    """Fold a block of scores [G, N] (-inf = masked) and values [N, D] into a running softmax."""
    m_new = tl.maximum(m_i, tl.max(sc, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(sc - m_safe[:, None])
    scale = tl.exp(m_i - m_safe)
    l_i = l_i * scale + tl.sum(p, 1)
    acc = acc * scale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _slot_decode_kernel(
    Q,
    KN,
    VN,
    K,
    V,
    POS,
    SLOTS,
    QPOS,
    O,  # noqa: E741 (Triton pointer arguments are named in capitals, as POS, SLOTS, QPOS)
    SC,
    M,
    L,
    KS,
    VS,
    stride_qb,
    stride_qh,
    stride_nb,
    stride_nh,
    stride_vb,
    stride_vh,
    stride_ks,
    stride_kh,
    stride_kt,
    stride_ps,
    stride_ph,
    stride_ob,
    stride_oh,
    stride_sb,
    stride_sh,
    stride_mb,
    scale,
    window,
    CAP,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
    SCORES: tl.constexpr,
    PRECISION: tl.constexpr,
    FP8: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(SLOTS + b).to(tl.int64)
    q_pos = tl.load(QPOS + b)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    rows = h * G + g
    live = g < G
    q = tl.load(Q + b * stride_qb + rows[:, None] * stride_qh + d[None, :], mask=live[:, None], other=0.0)
    k_new = tl.load(KN + b * stride_nb + h * stride_nh + d).to(tl.float32)
    v_new = tl.load(VN + b * stride_vb + h * stride_vh + d).to(tl.float32)
    # the new token first: it always attends to itself
    s_new = tl.sum(q.to(tl.float32) * k_new[None, :], 1) * scale
    m_i = s_new
    l_i = tl.full([G_PAD], 1.0, tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32) + v_new[None, :]
    kv = slot * stride_ks + h * stride_kh
    k_scale, v_scale = 1.0, 1.0
    if FP8:
        k_scale, v_scale = tl.load(KS + h), tl.load(VS + h)
    for start in range(0, CAP, BLOCK):
        t = start + tl.arange(0, BLOCK)
        inside = t < CAP
        pos = tl.load(POS + slot * stride_ps + h * stride_ph + t, mask=inside, other=-1)
        valid = (pos >= 0) & (pos <= q_pos) & ((window == 0) | (pos > q_pos - window))
        k = tl.load(K + kv + t[:, None] * stride_kt + d[None, :], mask=inside[:, None], other=0.0)
        v = tl.load(V + kv + t[:, None] * stride_kt + d[None, :], mask=inside[:, None], other=0.0)
        if FP8:  # exact in the query's dtype: a scale is a power of two
            k, v = (k.to(tl.float32) * k_scale).to(q.dtype), (v.to(tl.float32) * v_scale).to(q.dtype)
        sc = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
        sc = tl.where(valid[None, :], sc, float("-inf"))
        if SCORES:
            tl.store(
                SC + b * stride_sb + rows[:, None] * stride_sh + t[None, :], sc, mask=live[:, None] & inside[None, :]
            )
        m_i, l_i, acc = online_softmax(sc, v, m_i, l_i, acc, PRECISION)
    if SCORES:
        tl.store(SC + b * stride_sb + rows * stride_sh + CAP, s_new, mask=live)
        tl.store(M + b * stride_mb + rows, m_i, mask=live)
        tl.store(L + b * stride_mb + rows, l_i, mask=live)
    o_ptr = O + b * stride_ob + rows[:, None] * stride_oh + d[None, :]
    tl.store(o_ptr, (acc / l_i[:, None]).to(O.dtype.element_ty), mask=live[:, None])


def slot_attention(
    q,
    k,
    v,
    keys,
    values,
    pos,
    slots,
    q_pos,
    scaling: float,
    window: int | None,
    observe: bool,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    block: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
):
    """Decode attention of q [B, Hq, D] over row b's slot `slots[b]` of one layer's keys/values [S, Hkv,
    capacity, D] at pos [S, Hkv, capacity] plus its new k/v [B, Hkv, D] at q_pos [B] (the candidates:
    slot places, then the new token) -> (output [B, Hq, D], attention [B, Hkv, capacity + 1] each
    candidate gets, averaged over the GQA group, if `observe`, else None). `scales`: the layer's K and V
    scales [Hkv] of FP8 slots (the new k/v come as attention reads them: rounded already)."""
    bsz, hq, d = q.shape
    kv_heads, cap = keys.shape[1], keys.shape[2]
    group = hq // kv_heads
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    slots, q_pos = slots.contiguous(), q_pos.contiguous()  # read as flat arrays (a row of a mask is strided)
    out = torch.empty_like(q)
    scores = torch.empty(bsz, hq, cap + 1, dtype=torch.float32, device=q.device) if observe else out
    m = torch.empty(bsz, hq, dtype=torch.float32, device=q.device) if observe else out
    denom = torch.empty_like(m) if observe else out  # unused pointers without scores: nothing allocated
    _slot_decode_kernel[(bsz, kv_heads)](
        q,
        k,
        v,
        keys,
        values,
        pos,
        slots,
        q_pos,
        out,
        scores,
        m,
        denom,
        *(scales if scales is not None else (out, out)),
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        pos.stride(0),
        pos.stride(1),
        out.stride(0),
        out.stride(1),
        scores.stride(0),
        scores.stride(1),
        m.stride(0),
        scaling,
        window or 0,
        cap,
        G=group,
        G_PAD=max(16, triton.next_power_of_2(group)),
        D=d,
        BLOCK=block,
        SCORES=observe,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        FP8=scales is not None,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if not observe:
        return out, None
    probs = torch.exp(scores - m[..., None]) / denom[..., None]  # masked candidates: exp(-inf) = 0
    return out, probs.view(bsz, kv_heads, group, cap + 1).mean(dim=2)
