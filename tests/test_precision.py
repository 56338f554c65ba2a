"""FP8 KV (`rlkv.precision`): the rounding, the scales, every fast path against a reference that quantises the same
way (compress against the masked reference, the engine against compress, the kernels against the torch paths),
and byte counts in the bytes stored."""

import pytest
import torch
from conftest import DEVICE, left_padded_batch, offset_keys_model, tiny_model
from test_engine import NEW, RECENT, SINK, TOKEN_DROP, engine, prompts, reference
from test_hf import run
from transformers import DynamicCache

import rlkv
from rlkv.engine.attention import Decode, decode_torch, store_torch
from rlkv.engine.kv import KVStore
from rlkv.hf.plumbing import CACHE_KWARG
from rlkv.methods.headsplit import HeadSplit
from rlkv.precision import (
    CALIBRATION_TOKENS,
    FP8,
    FP8_MAX,
    HEADROOM,
    KVPrecision,
    KVPrecisions,
    calibrate,
    calibration_ids,
    precisions,
    scale_for,
)

# Two runtimes sum their attention in different orders, so a layer's K or V can differ in its last float32 bit; where
# that value lies on the edge between two e4m3 values the two round it one step (1/16 to 1/8) apart. Such a flip in
# an occasional element moves a logit by about 1e-4 (3e-4 the largest seen on these models); tokens stay equal.
FP8_TOL = 2e-3


def check_close(outs, ref):
    """`test_engine.check_equal` at FP8_TOL."""
    tokens, logprobs = ref
    assert [o.tokens for o in outs] == tokens
    torch.testing.assert_close(torch.tensor([o.logprobs for o in outs]), logprobs.cpu(), rtol=0, atol=FP8_TOL)


def fp8_store(layout, keep, kv_dtype: str, seed: int = 0) -> KVStore:
    """A KVStore of `layout` with random FP8 scales per (layer, KV head) and random contents."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.exp2(torch.randint(-3, 4, (2, *layout.shape), generator=gen).float()).to(DEVICE)
    fp8, native = KVPrecision(FP8, scales), KVPrecision(torch.float32)
    kv = KVPrecisions(fp8, native if kv_dtype == "fp8-kept" else fp8)
    store = KVStore(layout, keep, 4, 8, 4, 2**22, 3, 128, DEVICE, kv)
    for layer in range(layout.num_layers):
        for name, which in (("pages_k", 0), ("pages_v", 1), ("ring_k", 0), ("ring_v", 1)):
            t = getattr(store, name)[layer]
            heads = store.full_idx[layer] if name.startswith("pages") else store.comp_idx[layer]
            precision = store.kept_precision if name.startswith("pages") else store.ring_precision
            if t.numel():
                values = torch.randn(t.shape, generator=gen).to(DEVICE) * 4
                t.copy_(precision.store(values, which, layer, heads, 2))
    return store


# ---------------------------------------------------------------------- the rounding and the scales
def test_fp8_rounds_as_torch_saturates_and_reads_back_exactly():
    scales = torch.tensor([0.25, 4.0]).view(2, 1, 1).expand(2, 1, 2).contiguous()  # K, V x 1 layer x 2 heads
    fp8 = KVPrecision(FP8, scales)
    x = torch.randn(3, 2, 5, 16) * 30
    x[0, 0, 0, :3] = torch.tensor([1e4, -1e4, 1e-6])  # far beyond 448 x 0.25, and below e4m3's subnormals
    stored = fp8.store(x, 0, 0, slice(None), 1)
    assert stored.dtype == FP8 and stored.element_size() == 1
    assert torch.equal(stored.float(), (x / 0.25).clamp(-FP8_MAX, FP8_MAX).to(FP8).float())  # torch's e4m3, saturated
    back = fp8.load(stored, 0, 0, slice(None), 1, torch.float32)
    assert back[0, 0, 0, :3].tolist() == [FP8_MAX * 0.25, -FP8_MAX * 0.25, 0.0] and back.isfinite().all()
    assert torch.equal(fp8.round_trip(back, 0, 0, slice(None), 1), back)  # stored again: the same value
    # a power-of-two scale reads back exactly in bf16 (what the kernels compute in registers)
    assert torch.equal(fp8.load(stored, 0, 0, slice(None), 1, torch.bfloat16).float(), back)
    rel = ((back - x).abs() / x.abs())[(x.abs() > 0.25 * 2**-6) & (x.abs() < 0.25 * FP8_MAX)]
    assert 0 < rel.max() <= 2**-4  # 3 mantissa bits: within half a step
    native = KVPrecision(torch.float32)
    assert native.round_trip(x, 0, 0, slice(None), 1) is x and native.itemsize == 4


def test_calibration_centres_keys_and_scales_each_kv_head_by_a_power_of_two():
    model = tiny_model("qwen2")
    fp8 = calibrate(model)
    scales, centres = fp8.scales, fp8.centres
    assert scales.shape == (2, 3, 2) and centres.shape == (3, 2, 16) and calibrate(model) is fp8  # once per model
    assert torch.equal(torch.exp2(torch.log2(scales).round()), scales)
    kv = precisions(model, "fp8-kept")
    assert kv.kept.quantized and not kv.compressed.quantized and kv.compressed.dtype == torch.float32
    # the centres: the calibration's mean key per channel; each scale the least power of two with
    # amax x HEADROOM / scale <= 448, amax over the calibration's centred K and its V
    ids = calibration_ids(model.config)
    assert ids.shape == (1, CALIBRATION_TOKENS) and calibration_ids(model.config).equal(ids)  # seeded
    cache = model(input_ids=ids.to(DEVICE), use_cache=True).past_key_values
    keys, values = (torch.stack([getattr(layer, name)[0] for layer in cache.layers]) for name in ("keys", "values"))
    torch.testing.assert_close(centres, keys.mean(dim=2))
    amax = torch.stack([(keys - centres[:, :, None]).abs().amax(dim=(2, 3)), values.abs().amax(dim=(2, 3))])
    reach = amax * torch.tensor(HEADROOM, device=amax.device).view(2, 1, 1) / scales
    assert (reach <= FP8_MAX).all() and (reach > FP8_MAX / 2).all()
    keep = torch.tensor([True, False], device=DEVICE)
    mixed = kv.key_centres(1, *(torch.nonzero(k).flatten() for k in (keep, ~keep)))  # fp8-kept: kept heads only
    assert torch.equal(mixed[0], centres[1, 0]) and not mixed[1].any()


def test_fp8_keys_on_a_large_offset_keep_their_scores(monkeypatch):
    """Qwen2's key bias puts some channels hundreds of units off zero, where e4m3 rounds in steps of 32 and the
    scores move with the query's own bias there: stored less their centres, FP8 keys keep the next-token logits
    as near the unquantised model's as without the offset, uncentred four times further off on this model."""
    model = offset_keys_model()
    ids, mask = left_padded_batch((20, 13, 7), 20)
    plain = run(model, ids, mask, new=1).logits[0]
    keep = torch.ones(rlkv.Layout.of(model).shape, dtype=torch.bool)

    def error() -> float:
        with rlkv.compress(model, keep, sink=SINK, recent=RECENT, kv_dtype="fp8"):
            return (run(model, ids, mask, new=1).logits[0] - plain).abs().max().item()

    centred_error = error()
    cache = model(input_ids=calibration_ids(model.config).to(DEVICE), use_cache=True).past_key_values
    amax = torch.stack(
        [
            torch.stack([getattr(layer, name).abs().amax(dim=(0, 2, 3)) for layer in cache.layers])
            for name in ("keys", "values")
        ]
    )
    monkeypatch.setattr(rlkv.precision, "calibrate", lambda m: KVPrecision(FP8, scale_for(amax)))  # no centres
    assert centred_error < 0.03 < 3 * centred_error < error()


def test_bad_kv_dtypes_are_refused():
    model = tiny_model("llama")
    layout = rlkv.Layout.of(model)
    with pytest.raises(ValueError, match="kv_dtype must be one of bf16, fp8, fp8-kept, got 'int4'"):
        HeadSplit(torch.ones(layout.shape, dtype=torch.bool), kv_dtype="int4")
    with pytest.raises(ValueError, match="h2o keeps no head whole"):
        rlkv.methods.build("h2o", layout, 0.5, budget=8, kv_dtype="fp8-kept")
    with pytest.raises(ValueError, match="stores K/V at kv_dtype 'fp8' but the engine was given 'bf16'"):
        engine(model, HeadSplit(torch.ones(layout.shape, dtype=torch.bool), kv_dtype="fp8"), kv_dtype="bf16")
    with pytest.raises(ValueError, match="Gated rollouts keep K/V at the model's dtype"):
        engine(model, rlkv.Gated(torch.ones(layout.shape, device=DEVICE)), kv_dtype="fp8")
    with pytest.raises(ValueError, match="kv_dtype must be one of"):
        rlkv.compress(model, sparsity=1.0, kv_dtype="fp16")


# ---------------------------------------------------------------------- runtimes against their references
@pytest.mark.parametrize("kv_dtype,sparsity", [("fp8", 0.0), ("fp8", 0.5), ("fp8-kept", 0.5)])
def test_compress_at_fp8_equals_the_quantising_masked_reference(arch, kv_dtype, sparsity):
    """The cache stores e4m3 bytes (kept columns and rings apart when their precisions differ) and reads them back;
    the reference is the masked attention over a full cache whose keys and values it rounds the same way."""
    model = tiny_model(arch)
    keep = rlkv.HeadScores.random(rlkv.Layout.of(model), seed=1).keep_mask(sparsity)
    ids, mask = left_padded_batch((20, 13, 7), 20)
    with rlkv.compress(model, keep, sink=SINK, recent=RECENT, kv_dtype=kv_dtype) as handle:
        fast = run(model, ids, mask, new=NEW)
        layer = handle.cache.layers[0]
        assert isinstance(handle.cache, rlkv.HeadSplitCache) and layer.kept_keys.dtype == FP8
        assert layer.keys.dtype == (torch.float32 if kv_dtype == "fp8-kept" else FP8)  # the rings
        ref = run(model, ids, mask, new=NEW, **{CACHE_KWARG: DynamicCache()})
    torch.testing.assert_close(torch.stack(fast.logits), torch.stack(ref.logits), rtol=0, atol=FP8_TOL)
    assert torch.equal(fast.sequences, ref.sequences)
    with rlkv.compress(model, keep, sink=SINK, recent=RECENT):
        assert not torch.equal(torch.stack(run(model, ids, mask, new=NEW).logits), torch.stack(fast.logits))


@pytest.mark.parametrize("kv_dtype,sparsity", [("fp8", 0.0), ("fp8", 0.5), ("fp8-kept", 0.5)])
def test_engine_at_fp8_equals_compress_at_fp8(arch, kv_dtype, sparsity):
    """Greedy tokens equal, log-probs within FP8_TOL: both store e4m3 bytes and read them back exactly (power-of-two
    scales), so what is left is the order of float32 sums in their attention, and the roundings it may tip. The
    engine runs eagerly: on a GPU its compiled step computes K a rounding apart from transformers' (Qwen3's k-norm
    fused), e4m3 turns that into a byte apart, and a tiny random model's near-even logits flip a greedy token on it
    (seen on an H100); the compiled step is pinned at full precision in test_engine."""
    model = tiny_model(arch)
    keep = rlkv.HeadScores.random(rlkv.Layout.of(model), seed=1).keep_mask(sparsity)
    ps, ids, mask = prompts()
    eng = engine(model, HeadSplit(keep, SINK, RECENT, kv_dtype=kv_dtype), compile=False)
    assert eng.kv_dtype == kv_dtype and eng.store.pages_k[0].dtype == FP8
    outs = eng.generate(ps, max_new_tokens=NEW, eos_token_ids=[])
    with rlkv.compress(model, keep, sink=SINK, recent=RECENT, kv_dtype=kv_dtype):
        check_close(outs, reference(model, ids, mask))


def test_engine_at_fp8_with_the_kernels_and_chunks_equals_compress():
    """The Triton path (store kernel rounding to e4m3, decode kernel reading it) and chunked prefills of 13 tokens."""
    pytest.importorskip("triton")
    model = tiny_model("qwen3")
    keep = rlkv.HeadScores.random(rlkv.Layout.of(model), seed=2).keep_mask(0.5)
    ps, ids, mask = prompts()
    method = HeadSplit(keep, SINK, RECENT, kv_dtype="fp8")  # pages and rings in e4m3 (fp8-kept: the kernel tests)
    outs = engine(model, method, kernel=True).generate(ps, max_new_tokens=NEW, eos_token_ids=[])
    with rlkv.compress(model, keep, sink=SINK, recent=RECENT, kv_dtype="fp8"):
        check_close(outs, reference(model, ids, mask))


@pytest.mark.parametrize("name", ["h2o", "rkv"])  # R-KV reads stored keys back too
def test_token_droppers_at_fp8_in_the_engine_equal_their_generate(name):
    """FP8 slots in the engine (the slot kernel, in Triton's interpreter on a CPU) keep and attend what the
    transformers cache at FP8 does, and both count the bytes they store."""
    pytest.importorskip("triton")
    model = tiny_model("llama")
    layout = rlkv.Layout.of(model)
    method = rlkv.methods.build(name, layout, 0.5, kv_dtype="fp8", **TOKEN_DROP[name])
    ps, ids, mask = prompts()
    eng = engine(model, method, kernel=True, prefill_tokens=64, max_batch=4)
    outs = eng.generate(ps, max_new_tokens=NEW, eos_token_ids=[])
    assert eng.store.keys[0].dtype == FP8
    with method.apply(model) as handle:
        check_close(outs, reference(model, ids, mask))
        lengths = torch.tensor([len(p) + NEW - 1 for p in ps], device=DEVICE)
        live = handle.cache.sequence_nbytes(lengths)
    assert [o.kv_bytes for o in outs] == live.tolist() == method.sequence_bytes(layout, lengths).tolist()
    bf16 = rlkv.methods.build(name, layout, 0.5, **TOKEN_DROP[name])
    per_slot = layout.num_kv_heads * layout.num_layers * 2 * layout.head_dim * (4 - 1)  # fp32 against e4m3
    full = torch.tensor(method.policy.capacity)
    assert int(bf16.sequence_bytes(layout, full) - method.sequence_bytes(layout, full)) == per_slot * int(full)


# ---------------------------------------------------------------------- the kernels against the torch paths
@pytest.mark.parametrize("kv_dtype", ["fp8", "fp8-kept"])
def test_decode_kernel_on_fp8_equals_the_torch_path(kv_dtype):
    """Kept and compressed heads, only compressed, only kept; one split per kept head and three (the combine)."""
    pytest.importorskip("triton")
    from rlkv.engine.kernel import decode_attention

    torch.manual_seed(0)
    layout = rlkv.Layout("qwen2", 3, 6, 2, 16, "float32", "x")
    keep = torch.tensor([[True, False], [False, False], [True, True]])
    store = fp8_store(layout, keep, kv_dtype)
    lengths, slots = torch.tensor([1, 9, 70], device=DEVICE), torch.tensor([1, 2, 3], device=DEVICE)
    for slot, n in zip(slots.tolist(), lengths.tolist()):
        pages = torch.randperm(store.num_pages - 1)[: -(-n // 4)] + 1
        store.page_table[slot, : len(pages)] = pages.int().to(DEVICE)
    q = torch.randn(3, 6, 16, device=DEVICE)
    for layer in (0, 1, 2):
        for window in (None, 7):
            ref = decode_torch(q, store, layer, slots, lengths, None, 0.25, window, None)
            for splits in (1, 3):
                got = decode_attention(q, store, layer, slots, lengths, 0.25, window, splits=splits, block=16)
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_dtype", ["fp8", "fp8-kept"])
def test_store_kernel_rounds_as_torch(kv_dtype):
    """New K/V into FP8 pages and rings: the kernel's e4m3 (saturating, ties to even, subnormals) is torch's, byte
    for byte."""
    pytest.importorskip("triton")
    from rlkv.engine.kernel import store_kv

    torch.manual_seed(0)
    layout = rlkv.Layout("qwen2", 2, 6, 3, 16, "float32", "x")
    keep = torch.tensor([[True, False, True], [False, False, False]])
    stores = [fp8_store(layout, keep, kv_dtype, seed=1) for _ in range(2)]
    for store in stores:
        store.page_table[1:4, :8] = torch.arange(1, 25, dtype=torch.int32, device=DEVICE).view(3, 8)
    batch = Decode.of(stores[0], torch.tensor([2, 0, 1, 3], device=DEVICE), torch.tensor([17, 0, 3, 30], device=DEVICE))
    for layer in range(2):
        k, v = torch.randn(2, 4, 3, 16, device=DEVICE).unbind(0)
        k = k * torch.logspace(-4, 4, 16, device=DEVICE)  # tiny (subnormal) to saturating
        store_torch(k, v, stores[0], layer, batch)
        store_kv(k, v, stores[1], layer, batch)
    for name in ("pages_k", "pages_v", "ring_k", "ring_v"):
        for ref, got in zip(getattr(stores[0], name), getattr(stores[1], name)):
            assert ref.dtype == got.dtype and torch.equal(ref.view(torch.uint8), got.view(torch.uint8))


def test_slot_kernel_on_fp8_equals_the_torch_path():
    pytest.importorskip("triton")
    from rlkv.attention.slot_kernel import slot_attention
    from rlkv.engine.tokendrop import slot_attention_torch

    torch.manual_seed(0)
    slots_n, heads, cap, d = 4, 2, 37, 16
    scales = (torch.tensor([0.5, 2.0], device=DEVICE), torch.tensor([0.125, 1.0], device=DEVICE))
    keys, values = (
        (torch.randn(slots_n, heads, cap, d, device=DEVICE) * 3 / s.view(1, -1, 1, 1)).to(FP8) for s in scales
    )
    pos = torch.stack([torch.randperm(60)[:cap] for _ in range(slots_n * heads)]).view(slots_n, heads, cap).int()
    pos[torch.rand(pos.shape) < 0.2] = -1
    pos = pos.to(DEVICE)
    slots, q_pos = torch.tensor([2, 3, 1], device=DEVICE), torch.tensor([60, 75, 61], device=DEVICE)
    q = torch.randn(3, 6, d, device=DEVICE)
    k, v = torch.randn(2, 3, heads, d, device=DEVICE).unbind(0)
    for observe in (False, True):
        ref_out, ref_attn = slot_attention_torch(q, k, v, keys, values, pos, slots, q_pos, 0.3, 20, observe, scales)
        out, attn = slot_attention(q, k, v, keys, values, pos, slots, q_pos, 0.3, 20, observe, scales, block=16)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
        if observe:
            torch.testing.assert_close(attn, ref_attn, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- bytes
def test_fp8_bytes_are_the_bytes_stored():
    """A page, a ring and a sequence cost what their e4m3 bytes (and the rings' model-dtype bytes at fp8-kept) do;
    the budget buys pages at that price; the engine's and compress's counts agree."""
    model = tiny_model("llama", layers=4)
    layout = rlkv.Layout.of(model)
    keep = rlkv.HeadScores.random(layout, seed=4).keep_mask(0.5)
    native = engine(model, HeadSplit(keep, SINK, RECENT)).store
    ring_bytes = 4 * (SINK + RECENT) * 16 * 2  # 4 compressed heads, K and V, per byte of an element
    for kv_dtype, ring_item in (("fp8", 1), ("fp8-kept", 4)):
        eng = engine(model, HeadSplit(keep, SINK, RECENT, kv_dtype=kv_dtype))
        store = eng.store
        assert store.page_bytes * 4 == native.page_bytes and store.slot_bytes == ring_bytes * ring_item
        assert store.nbytes() == sum(
            t.numel() * t.element_size()
            for ts in (store.pages_k, store.pages_v, store.ring_k, store.ring_v)
            for t in ts
        )
        assert store.nbytes() <= 2**21 and store.num_pages > native.num_pages * 3  # the same budget, 4x the pages
        out = eng.generate([list(range(3, 40))], max_new_tokens=10, eos_token_ids=[])[0]
        stored = 37 + 10 - 1
        eng.add_request("r", list(range(3, 40)), rlkv.SamplingParams(max_tokens=10, ignore_eos=True))
        eng.step()  # its first prompt chunk's K/V and its ring, as /metrics reports them
        (req,) = eng.scheduler.admitted
        assert 0 < req.stored < 37 and eng.metrics().kv_bytes_used == store.sequence_nbytes(req.stored)
        assert eng.metrics().kv_pool_bytes == store.nbytes()
        eng.abort_request("r")
        assert eng.metrics().kv_bytes_used == 0
        assert out.kv_bytes == stored * layout.kv_bytes_per_token() // 2 // 4 + ring_bytes * ring_item
        assert out.kv_bytes_full == stored * layout.kv_bytes_per_token()  # the reference stays the model's dtype
        with rlkv.compress(model, keep, sink=SINK, recent=RECENT, kv_dtype=kv_dtype) as handle:
            model.generate(
                input_ids=torch.tensor([list(range(3, 40))], device=DEVICE), max_new_tokens=10, do_sample=False
            )
            ring_pos = (SINK + RECENT) * 8 * int((~keep).any(dim=1).sum())  # compress also keeps ring slots' positions
            assert int(handle.cache.sequence_nbytes(torch.tensor([stored]))[0]) == out.kv_bytes + ring_pos
            assert handle.cache.nbytes() == out.kv_bytes + ring_pos
