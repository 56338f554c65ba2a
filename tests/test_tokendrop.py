"""Token-dropping caches (H2O, SnapKV, R-KV): hand-computed keep sets, the masked reference, budgets, memory."""

import pytest
import torch
from conftest import DEVICE, tiny_model
from conftest import left_padded_batch as batch
from transformers import AttentionInterface

import rlkv
from rlkv.attention.reference import masked_attention, token_positions
from rlkv.attention.tokendrop import Candidates, top_k_mask
from rlkv.hf.plumbing import output_cache
from rlkv.hf.tokendrop import TokenDropCache, TokenDropLayer
from rlkv.methods.h2o import H2O, build_h2o, h2o_keep
from rlkv.methods.rkv import RKV, build_rkv, rkv_importance, rkv_keep, rkv_redundancy
from rlkv.methods.snapkv import SnapKV, build_snapkv, snapkv_keep, snapkv_pins

BUILDERS = {"h2o": build_h2o, "snapkv": build_snapkv, "rkv": build_rkv}
SMALL = {  # small budgets: tokens are dropped after a 14-token prompt
    "h2o": dict(budget=8, h2o_recent=3),
    "snapkv": dict(budget=8, window=3),
    "rkv": dict(budget=6, window=2, interval=4),
}


def positions(values):
    return torch.tensor(values, dtype=torch.int32)[None, None]


def kept(layer: TokenDropLayer) -> set[int]:
    return set(layer.pos[0, 0][layer.pos[0, 0] >= 0].tolist())


def run_steps(policy, prompt: int, steps: int) -> list[set[int]]:
    """Drive one layer (1 KV head, 1 query head) with zero queries: attention is uniform over allowed keys."""
    torch.manual_seed(0)
    layer, sets = TokenDropLayer(), []
    lengths = [prompt] + [1] * steps
    start = 0
    for n in lengths:
        key, value = torch.randn(1, 1, n, 4), torch.randn(1, 1, n, 4)
        layer.update(key, value)
        q_pos = torch.arange(start, start + n)[None]
        layer.attend(torch.zeros(1, 1, n, 4), key, value, q_pos, 0.5, None, policy)
        sets.append(kept(layer))
        start += n
    return sets


# ---------------------------------------------------------------- (1) hand-computed keep sets
def test_h2o_keep_rule():
    score = torch.tensor([0.5, 0.1, 0.3, 0.2, 0.05, 0.0])[None, None]
    keep = h2o_keep(score, positions(range(6)), budget=4, recent=2)
    assert keep[0, 0].tolist() == [True, False, True, False, True, True]


def test_h2o_steps_with_uniform_attention():
    # prefill of 4: token j receives sum_{t>=j} 1/(t+1) = 2.08, 1.08, 0.58, 0.25 -> keep {0, 1} + recent {3}
    # each decode step adds 1/4 to the 4 attended tokens; the older recent token is the lowest non-recent one
    sets = run_steps(H2O(budget=3, recent=1), prompt=4, steps=3)
    assert sets == [{0, 1, 3}, {0, 1, 4}, {0, 1, 5}, {0, 1, 6}]


def test_h2o_accumulated_scores():
    policy, layer = H2O(budget=3, recent=1), TokenDropLayer()
    key = value = torch.randn(1, 1, 4, 4)
    layer.update(key, value)
    layer.attend(torch.zeros(1, 1, 4, 4), key, value, torch.arange(4)[None], 0.5, None, policy)
    expected = {0: 1 + 1 / 2 + 1 / 3 + 1 / 4, 1: 1 / 2 + 1 / 3 + 1 / 4, 3: 1 / 4}
    got = {int(p): float(s) for p, s in zip(layer.pos[0, 0], layer.score[0, 0]) if p >= 0}
    assert got == pytest.approx(expected)


def test_snapkv_pins_use_pooled_prefix_attention():
    attn = torch.tensor([0.1, 0.9, 0.0, 0.0, 0.3, 0.0, 5.0, 5.0])[None, None]  # window tokens 6, 7 never pinned
    pos = positions(range(8))
    assert snapkv_pins(attn, pos, window=2, kernel=1, pins=2)[0, 0].nonzero().flatten().tolist() == [1, 4]
    # kernel 3 pools prefix [.1 .9 0 0 .3 0] to [.9 .9 .9 .3 .3 .3]: ties keep the older tokens
    pinned = snapkv_pins(attn, pos, window=2, kernel=3, pins=2)
    assert pinned[0, 0].nonzero().flatten().tolist() == [0, 1]
    assert snapkv_keep(pinned, pos, budget=4)[0, 0].nonzero().flatten().tolist() == [0, 1, 6, 7]


def test_snapkv_steps():
    # observation queries 4 and 5 give prefix tokens 0..3 each 1/5 + 1/6: ties pin {0, 1}; the window then slides
    sets = run_steps(SnapKV(budget=4, window=2, kernel=1), prompt=6, steps=3)
    assert sets == [{0, 1, 4, 5}, {0, 1, 5, 6}, {0, 1, 6, 7}, {0, 1, 7, 8}]


def test_snapkv_short_prompt_fills_budget_with_newest_tokens():
    # only the prefix (token 0; token 1 is the observation window) is pinned; the rest is first in first out
    sets = run_steps(SnapKV(budget=4, window=1, kernel=1), prompt=2, steps=4)
    assert sets == [{0, 1}, {0, 1, 2}, {0, 1, 2, 3}, {0, 2, 3, 4}, {0, 3, 4, 5}]


def test_rkv_scores_by_hand():
    queries = torch.zeros(1, 1, 2, 2)
    pos = positions(range(4))
    imp = rkv_importance(queries, torch.tensor([[2, 3]]), torch.randn(1, 1, 4, 2), pos, 1.0, kernel=1)
    torch.testing.assert_close(imp[0, 0], torch.tensor([7 / 24, 7 / 24, 7 / 24, 1 / 8]))
    keys = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])[None, None]
    red = rkv_redundancy(keys, positions(range(3)))  # mean cosine to the others: 0.5, 0.5, 0
    torch.testing.assert_close(red[0, 0], torch.softmax(torch.tensor([0.5, 0.5, 0.0]), 0))
    keep = rkv_keep(torch.tensor([0.2, 0.6, 0.2])[None, None], red, positions(range(3)), budget=2, window=1, lam=0.5)
    assert keep[0, 0].tolist() == [False, True, True]
    # lam = 0: the least redundant key wins over the recent window's neighbours
    keep = rkv_keep(torch.zeros(1, 1, 4), rkv_redundancy(torch.cat([keys, keys[:, :, :1]], 2), pos), pos, 2, 1, 0.0)
    assert keep[0, 0].tolist() == [False, False, True, True]


def test_rkv_compares_the_model_keys_when_fp8_centres_them():
    """FP8 stores keys less a per-channel centre (`rlkv.precision`): R-KV's redundancy (the keys' cosines to each
    other) adds it back (`Candidates.model_keys`), so R-KV keeps at FP8 what it keeps on the model's keys. Small
    integers keep the arithmetic exact; attention does not see the shift (the same for every key of a query)."""
    gen = torch.Generator().manual_seed(0)
    b, h, k, d = 2, 2, 12, 4
    centres = torch.tensor([[8.0, 0.0, -6.0, 0.0], [0.0, 5.0, 0.0, 0.0]])  # an offset shared by a head's keys
    raw = torch.randint(-3, 4, (b, h, k, d), generator=gen).float() + centres[:, None, :]
    query = torch.randint(-2, 3, (b, h, 1, d), generator=gen).float()
    pos, q_pos = torch.arange(k, dtype=torch.int32).expand(b, h, k), torch.full((b, 1), k - 1)

    def keep(keys, key_centres=None):
        c = Candidates(keys, None, pos, None, None, True, 1.0, key_centres)
        return RKV(budget=4, window=2, interval=4, kernel=1).select({}, c, query, q_pos)

    model = keep(raw)
    assert torch.equal(keep(raw - centres[:, None, :], centres), model) and int(model.sum()) == b * h * 4
    assert not torch.equal(keep(raw - centres[:, None, :]), model)  # the centred keys' cosines choose otherwise


def test_rkv_compresses_every_interval():
    sets = run_steps(RKV(budget=3, window=1, interval=2, kernel=1), prompt=3, steps=6)
    assert [len(s) for s in sets] == [3, 4, 3, 4, 3, 4, 3]
    assert all(max(s) == 2 + i for i, s in enumerate(sets))  # the newest token is always kept


def test_rkv_compresses_a_long_prompt_at_once():
    (prefill,) = run_steps(RKV(budget=3, window=1, interval=2, kernel=1), prompt=7, steps=0)
    assert len(prefill) == 3 and 6 in prefill


# ---------------------------------------------------------------- (2), (3) generate vs the masked reference, budgets
def generate(model, ids, mask, new, **kw):
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **kw,
    )


def test_top_k_mask_ranks_by_priority_then_age():
    """Both ways of selecting (keep the k best, or drop the K - k worst, whichever is fewer) give the
    same ranking: priority, then the older token; -0.0 ties with 0.0; -inf is never kept."""
    inf = float("inf")
    priority = torch.tensor([[2.0, 1.0, 1.0, inf, -inf, 1.0, 0.0, -0.0]])
    pos = torch.tensor([[5, 3, 7, 9, -1, 1, 2, 0]], dtype=torch.int32)
    # ranking: 3 (inf), 0 (2), then 1.0 by age: 5, 1, 2, then 0 by age: 7 (-0.0), 6; 4 (-inf) never
    expected = {2: [0, 3], 3: [0, 3, 5], 6: [0, 1, 2, 3, 5, 7], 7: [0, 1, 2, 3, 5, 6, 7], 9: [0, 1, 2, 3, 5, 6, 7]}
    for k, kept in expected.items():
        assert top_k_mask(priority, k, pos)[0].nonzero().flatten().tolist() == kept, k


def test_keep_rules_do_not_depend_on_candidate_order():
    """The engine stores a slot's tokens out of chronological order (a new token takes an evicted place), so
    each rule must choose by position, not by place: tied scores keep the older token wherever it lies."""
    pos = torch.tensor([[[0, 1, 2, 3, 4, 5, 6, 7, -1]]], dtype=torch.int32)
    score = torch.tensor([[[0.3, 0.2, 0.2, 0.2, 0.1, 0.2, 0.0, 0.0, 0.0]]])  # 1, 2, 3, 5 tie
    rules = {
        "h2o": lambda s, p: h2o_keep(s, p, budget=4, recent=2),  # 0 and the older two of the tie, + 6, 7
        "snapkv_pins": lambda s, p: snapkv_pins(s, p, window=2, kernel=1, pins=3),
        "snapkv": lambda s, p: snapkv_keep(s > 0.25, p, budget=4),
        "rkv": lambda s, p: rkv_keep(s, torch.zeros_like(s), p, budget=4, window=2, lam=1.0),
    }
    for name, rule in rules.items():
        expected = rule(score, pos)
        assert int(expected.sum()) == 4 - (name == "snapkv_pins"), name
        for seed in range(5):
            perm = torch.randperm(9, generator=torch.Generator().manual_seed(seed))
            got = rule(score[..., perm], pos[..., perm])
            assert torch.equal(got, expected[..., perm]), (name, perm.tolist())
    assert h2o_keep(score, pos, budget=4, recent=2)[0, 0].nonzero().flatten().tolist() == [0, 1, 6, 7]


@pytest.mark.parametrize("name, arch", [("h2o", "llama"), ("snapkv", "qwen2"), ("rkv", "qwen3")])
def test_generate_equals_masked_reference_on_recorded_keep_sets(name, arch):
    model = tiny_model(arch)
    method = BUILDERS[name](name, rlkv.Layout.of(model), 0.5, **SMALL[name])
    ids, mask = batch((14, 9), 14)
    new = 16
    stored = []  # per forward, per layer: positions held before that forward ([b, h, slots], None at prefill)
    with method.apply(model) as handle:
        hooks = [
            m.register_forward_pre_hook(
                lambda m, *_: stored.append(
                    (m.layer_idx, None if (p := handle.cache.layers[m.layer_idx].pos) is None else p.clone())
                )
            )
            for m in model.modules()
            if hasattr(m, "o_proj")
        ]
        try:
            out = generate(model, ids, mask, new)
        finally:
            for h in hooks:
                h.remove()
        cache = handle.cache
    assert isinstance(cache, TokenDropCache)
    layers = model.config.num_hidden_layers
    steps = [dict(stored[i : i + layers]) for i in range(0, len(stored), layers)]
    assert len(steps) == new
    capacity = method.policy.capacity
    counts = [(p >= 0).sum(-1) for s in steps[1:] for p in s.values()]
    assert max(int(c.max()) for c in counts) == capacity - (name == "rkv")  # R-KV compresses on reaching capacity
    assert all(int(layer.stored().max()) <= capacity for layer in cache.layers)

    full_mask = torch.cat([mask, mask.new_ones(mask.shape[0], new - 1)], dim=1)  # the last token is never fed back
    pos, _ = token_positions(full_mask, *full_mask.shape, DEVICE)
    width = ids.shape[1]

    def reference(module, query, key, value, attention_mask, scaling=None, **kwargs):
        b, h, length = key.shape[0], key.shape[1], key.shape[2]
        allowed = (pos[:, None, None, :] <= pos[:, None, :, None]) & (pos >= 0)[:, None, None, :]
        allowed = allowed.expand(b, h, length, length).clone()
        for step in range(1, new):
            col = width + step - 1
            held = steps[step][module.layer_idx]  # [b, h, slots]
            by_pos = torch.zeros(b, h, length + 1, dtype=torch.bool, device=held.device)
            by_pos.scatter_(-1, (held.long() + 1).clamp(min=0), held >= 0)
            by_pos[..., 0] = False
            ok = by_pos[..., 1:].gather(-1, pos.clamp(min=0)[:, None].expand(b, h, length)) & (pos >= 0)[:, None]
            ok |= (pos == pos[:, col : col + 1])[:, None]
            allowed[:, :, col] = ok
        return masked_attention(query, key, value, allowed, scaling), None

    AttentionInterface.register("tokendrop_reference_for_test", reference)
    model.set_attn_implementation("tokendrop_reference_for_test")
    try:
        logits = model(input_ids=out.sequences[:, :-1], attention_mask=full_mask).logits
    finally:
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(torch.stack(out.logits, 1), logits[:, width - 1 :], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_decoding_in_the_slot_kernel_equals_the_torch_path(name):
    """`token_drop(kernel=True)` (Triton's interpreter on a CPU) keeps and outputs what the torch path does."""
    from rlkv.hf.tokendrop import token_drop

    model = tiny_model("qwen2")
    policy = BUILDERS[name](name, rlkv.Layout.of(model), 0.5, **SMALL[name]).policy
    ids, mask = batch((14, 9), 14)
    runs = []
    for kernel in (False, True):
        with token_drop(model, policy, kernel=kernel) as handle:
            runs.append((generate(model, ids, mask, 8), [layer.pos.clone() for layer in handle.cache.layers]))
    (torch_out, torch_pos), (kernel_out, kernel_pos) = runs
    assert torch.equal(kernel_out.sequences, torch_out.sequences)
    torch.testing.assert_close(torch.stack(kernel_out.logits), torch.stack(torch_out.logits), rtol=1e-4, atol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(kernel_pos, torch_pos))  # the same tokens kept, in the same places


# ---------------------------------------------------------------- (4) a budget that drops nothing is plain generate
@pytest.mark.parametrize("name", list(BUILDERS))
def test_large_budget_is_plain_generate(name):
    model = tiny_model("mistral")
    ids, mask = batch((20, 13, 7), 20)
    plain = generate(model, ids, mask, 20)
    kw = {**SMALL[name], "budget": 40}
    with BUILDERS[name](name, rlkv.Layout.of(model), 0.0, **kw).apply(model):
        fast = generate(model, ids, mask, 20)
    assert torch.equal(fast.sequences, plain.sequences)
    torch.testing.assert_close(torch.stack(fast.logits), torch.stack(plain.logits), rtol=1e-4, atol=1e-4)
    assert model.config._attn_implementation == "sdpa" and "_prepare_cache_for_generation" not in vars(model)


# ---------------------------------------------------------------- (5) memory
@pytest.mark.parametrize("name", list(BUILDERS))
def test_cache_holds_less_than_a_dynamic_cache(name):
    model = tiny_model("llama")
    ids, mask = batch((30, 30), 30)
    plain = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=60,
        min_new_tokens=60,
        do_sample=False,
        return_dict_in_generate=True,
    )
    kw = {**SMALL[name], "budget": 16, **({"interval": 8} if name == "rkv" else {})}
    with BUILDERS[name](name, rlkv.Layout.of(model), 0.0, **kw).apply(model) as handle:
        generate(model, ids, mask, 60)
    full = rlkv.cache_nbytes(output_cache(plain))
    assert handle.cache.nbytes() < full / 2
    assert handle.cache.get_seq_length() == 89  # logical length: every token seen (the last one is not fed back)
    per_row = handle.cache.sequence_nbytes(torch.tensor([90.0, 90.0]))
    assert float(per_row.sum()) == handle.cache.nbytes()
    lengths = torch.tensor([5.0, 16.0, 17.0, 24.0, 90.0])  # the planning formula equals the live cache's accounting
    layout = rlkv.Layout.of(model)
    torch.testing.assert_close(handle.policy.sequence_bytes(layout, lengths), handle.cache.sequence_nbytes(lengths))


# ---------------------------------------------------------------- parameters
@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("h2o", dict(), "needs budget="),
        ("h2o", dict(budget=8, h2o_recent=8), "recent < budget"),
        ("snapkv", dict(budget=8, window=8), "window < budget"),
        ("snapkv", dict(budget=8, kernel=4, window=2), "odd pooling kernel"),
        ("rkv", dict(budget=8, window=9), "window < budget"),
        ("rkv", dict(budget=16, lam=2.0), "lam in"),
        ("rkv", dict(budget=16, interval=0), "interval >= 1"),
        ("rkv", dict(budget=16, sinks=4), "unknown options"),
    ],
)
def test_bad_parameters_are_refused(name, kwargs, message):
    layout = rlkv.Layout.of(tiny_model("llama", layers=1))
    with pytest.raises(ValueError, match=message):
        BUILDERS[name](name, layout, 0.5, **kwargs)


def test_harness_options_are_accepted_and_described():
    layout = rlkv.Layout.of(tiny_model("llama", layers=1))
    method = build_rkv("rkv", layout, 0.5, budget=64, heads=None, sink=16, recent=64, seed=0)
    assert method.describe() == {
        "method": "rkv",
        "sparsity": 0.5,
        "kv_dtype": "bf16",
        "budget": 64,
        "capacity": 192,
        "window": 8,
        "interval": 128,
        "lam": 0.1,
        "kernel": 7,
    }
