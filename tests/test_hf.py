"""compress(...) + generate against the masked reference, on tiny models of every architecture."""

import re

import pytest
import torch
from conftest import left_padded_batch as batch
from conftest import tiny_model
from transformers import DynamicCache

import rlkv
from rlkv.attention.reference import keep_keys_mask, masked_attention
from rlkv.hf.plumbing import CACHE_KWARG, output_cache

SINK, RECENT = 2, 4  # sink + recent = 6: prompts of 4 and 20 tokens are shorter and longer


def run(model, ids, mask, new=12, **kw):
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **kw,
    )


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("lengths", [(4, 3, 2), (20, 13, 7)], ids=["short", "long"])
def test_generate_equals_masked_reference(arch, sparsity, lengths):
    model = tiny_model(arch)
    heads = rlkv.HeadScores.random(rlkv.Layout.of(model), seed=1)
    ids, mask = batch(lengths, max(lengths))
    with rlkv.compress(model, heads, sparsity=sparsity, sink=SINK, recent=RECENT) as handle:
        fast = run(model, ids, mask)
        assert isinstance(handle.cache, rlkv.FullCache if sparsity == 0 else rlkv.HeadSplitCache)
        ref = run(model, ids, mask, **{CACHE_KWARG: DynamicCache()})  # full cache + mask
    torch.testing.assert_close(torch.stack(fast.logits), torch.stack(ref.logits), rtol=1e-5, atol=1e-5)
    assert torch.equal(fast.sequences, ref.sequences)


def test_sparsity_zero_is_plain_generate(arch):
    model = tiny_model(arch)
    ids, mask = batch((20, 13, 7), 20)
    plain = run(model, ids, mask, new=20)
    decoder = model.model
    with rlkv.compress(model, rlkv.HeadScores.random(rlkv.Layout.of(model)), sparsity=0.0) as handle:
        assert model.config._attn_implementation == "sdpa"  # nothing to compress: the model's own attention
        fast = run(model, ids, mask, new=20)
        assert type(output_cache(fast)) is rlkv.FullCache and handle.cache is output_cache(fast)
    assert not decoder._forward_pre_hooks and "_prepare_cache_for_generation" not in vars(model)
    assert type(output_cache(run(model, ids, mask, new=2))) is DynamicCache
    assert torch.equal(fast.sequences, plain.sequences)
    assert torch.equal(torch.stack(fast.logits), torch.stack(plain.logits))
    held = fast.sequences.shape[1] - 1  # columns stored (padding included; the last token is never fed)
    assert handle.cache.nbytes() == rlkv.cache_nbytes(output_cache(plain))
    assert int(handle.cache.sequence_nbytes(torch.tensor([held]))[0]) * 3 == handle.cache.nbytes()
    assert held * rlkv.Layout.of(model).kv_bytes_per_token() * 3 == handle.cache.nbytes()


def test_cached_logits_equal_a_full_forward_with_the_reference_mask():
    """Incremental decoding through the ring equals one masked pass over the whole sequence."""
    model = tiny_model("llama", layers=2)
    layout = rlkv.Layout.of(model)
    keep = torch.tensor([[True, False], [False, False]])
    ids, mask = batch((14, 9), 14)
    with rlkv.compress(model, keep, sink=SINK, recent=RECENT, prefill="compressed"):  # the rule of the reference below
        out = run(model, ids, mask, new=10)
    seq = out.sequences
    full_mask = torch.cat([mask, torch.ones_like(mask[:, :10])], dim=1)
    captured = []

    def reference_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        pos = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, -1)
        m = keep_keys_mask(pos, pos, keep[module.layer_idx], SINK, RECENT)
        captured.append(module.layer_idx)
        return masked_attention(query, key, value, m, scaling), None

    rlkv_attn = "reference_for_test"
    from transformers import AttentionInterface

    AttentionInterface.register(rlkv_attn, reference_attention)
    model.set_attn_implementation(rlkv_attn)
    try:
        logits = model(input_ids=seq, attention_mask=full_mask).logits
    finally:
        model.set_attn_implementation("sdpa")
    assert captured == [0, 1]
    gen_logits = torch.stack(out.logits, dim=1)  # [b, new, vocab]: predicted at positions 13..22
    torch.testing.assert_close(gen_logits, logits[:, 13:23], rtol=1e-5, atol=1e-5)
    assert layout.shape == (2, 2)


def test_left_padding_does_not_change_a_row():
    model = tiny_model("qwen2")
    keep = torch.tensor([[True, False], [False, True], [False, False]])
    ids, mask = batch((20, 8), 20)
    with rlkv.compress(model, keep, sink=SINK, recent=RECENT):
        both = run(model, ids, mask, new=15)
        alone = run(model, ids[1:, -8:], mask[1:, -8:], new=15)
    assert torch.equal(both.sequences[1, 12:], alone.sequences[0])


def test_sampling_and_eos_run_and_context_restores_the_model():
    model = tiny_model("mistral")
    ids, mask = batch((10, 6), 10)
    plain = run(model, ids, mask)
    with rlkv.compress(model, None, sparsity=1.0, sink=SINK, recent=RECENT):
        torch.manual_seed(0)
        sampled = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=30,
            do_sample=True,
            temperature=1.0,
            top_p=0.9,
            eos_token_id=[5, 7, 9, 11],
        )
    assert sampled.shape[0] == 2 and sampled.shape[1] <= 40
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "_rlkv_state") for m in model.modules())
    assert "_prepare_cache_for_generation" not in vars(model)
    assert torch.equal(run(model, ids, mask).sequences, plain.sequences)


def test_compressed_cache_holds_less_and_is_constant_in_length():
    model = tiny_model("llama")
    ids, mask = batch((30, 30), 30)
    sizes = {}
    for new in (40, 80):
        plain = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, return_dict_in_generate=True
        )
        with rlkv.compress(model, None, sparsity=1.0, sink=SINK, recent=RECENT) as handle:
            run(model, ids, mask, new=new)
        sizes[new] = (rlkv.cache_nbytes(output_cache(plain)), handle.cache.nbytes())
    assert sizes[40][1] == sizes[80][1]  # streaming heads: constant memory
    assert sizes[80][0] > sizes[40][0]
    assert sizes[80][1] < sizes[80][0] / 10


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sparsity=1.5), "sparsity must be a number in \\[0, 1\\]"),
        (dict(sparsity=0.5, sink=-1), "sink must be an integer >= 0"),
        (dict(sparsity=0.5, recent=0), "recent must be an integer >= 1"),
        (dict(), "needs sparsity="),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    model = tiny_model("llama")
    heads = rlkv.HeadScores.random(rlkv.Layout.of(model))
    with pytest.raises(ValueError, match=message):
        with rlkv.compress(model, heads, **kwargs):
            pass


@pytest.mark.parametrize(
    "heads, kwargs, got",
    [
        (torch.ones(3, 2), {}, "got a float32 tensor"),
        (torch.ones(3, 2), dict(sparsity=0.5), "got a float32 tensor"),
        ([[True, False]] * 3, {}, "got list"),
        (0.5, {}, "got float"),
    ],
)
def test_a_mask_of_the_wrong_type_says_which_types_are_accepted(heads, kwargs, got):
    model = tiny_model("llama")
    with pytest.raises(
        TypeError,
        match=re.escape(
            f"heads must be a HeadScores, a head-score file path, a bool torch "
            f"tensor keep-mask (layers x kv_heads) or None, {got}"
        ),
    ):
        with rlkv.compress(model, heads, **kwargs):
            pass


def test_wrong_shape_heads_are_refused():
    model = tiny_model("llama")
    heads = rlkv.HeadScores(torch.rand(32, 8), model="big-model")
    with pytest.raises(ValueError, match="32x8 .* has 3x2"):
        with rlkv.compress(model, heads, sparsity=0.5):
            pass


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
def test_model_sliding_window_is_respected(sparsity):
    """Mistral with a sliding window shorter than the sequence: every head also obeys the window."""
    model = tiny_model("mistral", sliding_window=9)
    heads = rlkv.HeadScores.random(rlkv.Layout.of(model), seed=3)
    ids, mask = batch((20, 11), 20)
    plain = run(model, ids, mask)
    with rlkv.compress(model, heads, sparsity=sparsity, sink=SINK, recent=RECENT):
        fast = run(model, ids, mask)
        ref = run(model, ids, mask, **{CACHE_KWARG: DynamicCache(config=model.config)})
    torch.testing.assert_close(torch.stack(fast.logits), torch.stack(ref.logits), rtol=1e-5, atol=1e-5)
    if sparsity == 0.0:
        assert torch.equal(fast.sequences, plain.sequences)


def test_headsplit_method_from_scores_applies_the_same_compression(tmp_path):
    model = tiny_model("qwen3")
    heads = rlkv.HeadScores.random(rlkv.Layout.of(model), seed=2)
    method = rlkv.methods.HeadSplit.from_scores(heads.save(tmp_path / "h.json"), 0.5, sink=SINK, recent=RECENT)
    assert method.describe()["kept_heads"] == 3 and method.sparsity == 0.5
    ids, mask = batch((12, 7), 12)
    with method.apply(model) as handle:
        via_method = run(model, ids, mask)
    with rlkv.compress(model, heads, sparsity=0.5, sink=SINK, recent=RECENT):
        direct = run(model, ids, mask)
    assert torch.equal(via_method.sequences, direct.sequences)
    assert isinstance(handle.cache, rlkv.HeadSplitCache)


def reference_logits(model, seq, full_mask, keep, prompt_len=None):
    """Logits of one forward over `seq` with the masked reference (`keep_keys_mask`) in every layer."""
    from transformers import AttentionInterface

    def reference_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        pos = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, -1)
        m = keep_keys_mask(pos, pos, keep[module.layer_idx], SINK, RECENT, prompt_len=prompt_len)
        return masked_attention(query, key, value, m, scaling), None

    AttentionInterface.register("reference_prompt_for_test", reference_attention)
    model.set_attn_implementation("reference_prompt_for_test")
    try:
        return model(input_ids=seq, attention_mask=full_mask).logits
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("prefill", ["compressed", "full"])
@pytest.mark.parametrize("chunk", [None, 5], ids=["one-forward", "chunked"])
def test_prefill_modes_equal_one_masked_forward(prefill, chunk):
    """Both prefill modes, the prompt in one forward or in chunks of 5 (left-padded rows), equal the
    reference mask over the whole sequence; "full" with the prompt's real tokens as prompt_len."""
    model = tiny_model("qwen2")
    keep = torch.tensor([[True, False], [False, False], [False, True]])
    ids, mask = batch((14, 9, 4), 14)
    new = 10
    with rlkv.compress(model, keep, sink=SINK, recent=RECENT, prefill=prefill) as handle:
        out = run(model, ids, mask, new=new, prefill_chunk_size=chunk)
        assert handle.cache.prefill == prefill and handle.cache.prompt_pos is None  # the prompt was cut
    full_mask = torch.cat([mask, torch.ones_like(mask[:, :new])], dim=1)
    prompt_len = mask.sum(-1) if prefill == "full" else None
    logits = reference_logits(model, out.sequences, full_mask, keep, prompt_len)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), logits[:, 13:23], rtol=1e-5, atol=1e-5)


def test_full_prefill_matches_plain_attention_over_the_prompt_then_compresses():
    model = tiny_model("llama")
    ids, mask = batch((20, 13), 20)
    plain = run(model, ids, mask, new=8)
    with rlkv.compress(model, None, sparsity=1.0, sink=SINK, recent=RECENT, prefill="full") as handle:
        full = run(model, ids, mask, new=8)
        held = handle.cache.nbytes()
        ref = run(model, ids, mask, new=8, **{CACHE_KWARG: DynamicCache()})  # the masked reference, prompt_len too
    torch.testing.assert_close(full.logits[0], plain.logits[0], rtol=1e-5, atol=1e-5)  # the prompt: every head full
    assert not torch.allclose(full.logits[-1], plain.logits[-1], atol=1e-3)  # decoding: sink + recent only
    torch.testing.assert_close(torch.stack(full.logits), torch.stack(ref.logits), rtol=1e-5, atol=1e-5)
    assert held < rlkv.cache_nbytes(output_cache(plain)) / 2


def test_growing_storage_and_beam_search_equal_the_reference(monkeypatch):
    """Capacity grown every 4 columns (instead of GROW) and beams reordered: still the masked reference."""
    from rlkv.hf import splitcache

    monkeypatch.setattr(splitcache, "GROW", 4)
    model = tiny_model("qwen3")
    heads = rlkv.HeadScores.random(rlkv.Layout.of(model), seed=4)
    ids, mask = batch((11, 6), 11)
    with rlkv.compress(model, heads, sparsity=0.5, sink=SINK, recent=RECENT) as handle:
        fast = run(model, ids, mask, new=14)
        assert handle.cache.capacity == 24  # 11 + 13 columns fed
        ref = run(model, ids, mask, new=14, **{CACHE_KWARG: DynamicCache()})
        beams = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=9, num_beams=3, do_sample=False)
        beams_ref = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=9,
            num_beams=3,
            do_sample=False,
            **{CACHE_KWARG: DynamicCache()},
        )
    torch.testing.assert_close(torch.stack(fast.logits), torch.stack(ref.logits), rtol=1e-5, atol=1e-5)
    assert torch.equal(beams, beams_ref)


def test_bad_prefill_is_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="prefill must be one of"):
        with rlkv.compress(model, None, sparsity=1.0, prefill="dense"):
            pass


def test_a_deep_copied_cache_continues_as_the_original():
    """transformers' prompt-reuse pattern: deepcopy a filled cache, generate on from each copy alike."""
    import copy

    model = tiny_model("qwen2")
    heads = rlkv.HeadScores.random(rlkv.Layout.of(model), seed=6)
    ids, mask = batch((9, 5), 9)
    with rlkv.compress(model, heads, sparsity=0.5, sink=SINK, recent=RECENT) as handle:
        first = run(model, ids, mask, new=4)
        original = handle.cache
        clone = copy.deepcopy(original)
        assert all(layer.owner == clone and layer.owner != original for layer in clone.layers)  # (through the proxy)
        assert clone.nbytes() == original.nbytes()
        seq = first.sequences
        longer = torch.cat([mask, torch.ones_like(seq[:, ids.shape[1] :])], dim=1)
        on = [
            model(input_ids=seq[:, -1:], attention_mask=longer, **{CACHE_KWARG: cache}).logits
            for cache in (original, clone)
        ]
    torch.testing.assert_close(on[0], on[1], rtol=0, atol=0)
