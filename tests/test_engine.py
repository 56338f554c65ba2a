"""The engine against `compress` + generate (itself pinned to the masked reference), and its kernel against the
torch path."""

import gc
import operator
import weakref
from types import SimpleNamespace

import pytest
import torch
from conftest import DEVICE, left_padded_batch, tiny_model, tiny_tokenizer

import rlkv
from rlkv.attention.ring import ring_positions
from rlkv.engine.attention import Decode, decode_torch, store_torch
from rlkv.engine.kv import KVStore, parse_bytes
from rlkv.engine.sampling import TOP_K_CANDIDATES, filter_logits, sample, uniform, vocab_keys
from rlkv.hf.gated import gated
from rlkv.methods.headsplit import HeadSplit

SINK, RECENT = 2, 6
LENGTHS = (5, 17, 30, 9)  # shorter and longer than sink + recent; 30 spans several prefill chunks
NEW = 14


def prompts(lengths=LENGTHS, seed=0):
    ids, mask = left_padded_batch(lengths, max(lengths), seed=seed)
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)], ids, mask


def engine(model, method=None, **kw):
    kw = {"kv_budget": "2MiB", "page_size": 4, "prefill_tokens": 13, "max_batch": 3, **kw}
    return rlkv.Engine(model, tiny_tokenizer(), method=method, **kw)


def reference(model, ids, mask, new=NEW):
    """Greedy tokens and their log-probs from transformers `generate`, never stopping early (no EOS)."""
    model.generation_config.eos_token_id = None
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    logits = torch.stack(out.logits, 1).float()
    tokens = out.sequences[:, ids.shape[1] :]
    return tokens.tolist(), torch.log_softmax(logits, -1).gather(2, tokens[..., None])[..., 0]


def check_equal(outs, ref):
    tokens, logprobs = ref
    assert [o.tokens for o in outs] == tokens
    torch.testing.assert_close(torch.tensor([o.logprobs for o in outs]), logprobs.cpu(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
def test_engine_equals_compressed_generate(arch, sparsity):
    model = tiny_model(arch)
    keep = rlkv.HeadScores.random(rlkv.Layout.of(model), seed=1).keep_mask(sparsity)
    ps, ids, mask = prompts()
    outs = engine(model, HeadSplit(keep, SINK, RECENT)).generate(ps, max_new_tokens=NEW, eos_token_ids=[])
    with rlkv.compress(model, keep, sink=SINK, recent=RECENT):
        check_equal(outs, reference(model, ids, mask))
    assert all(o.finish == "length" and o.prompt_tokens == n for o, n in zip(outs, LENGTHS))
    assert model.config._attn_implementation == "sdpa"  # the model is restored


@pytest.mark.parametrize("kind", ["headsplit", "h2o"])
def test_model_sliding_window_is_respected(kind):
    model = tiny_model("mistral", sliding_window=10)
    layout = rlkv.Layout.of(model)
    keep = rlkv.HeadScores.random(layout, seed=2).keep_mask(0.5)
    method = rlkv.methods.build("h2o", layout, 0.5, budget=12) if kind == "h2o" else HeadSplit(keep, SINK, RECENT)
    ps, ids, mask = prompts()
    outs = engine(model, method).generate(ps, max_new_tokens=NEW, eos_token_ids=[])
    with method.apply(model) if kind == "h2o" else rlkv.compress(model, keep, sink=SINK, recent=RECENT):
        check_equal(outs, reference(model, ids, mask))


def test_gated_rollouts_equal_gated_generate():
    model = tiny_model("qwen2")
    alpha = torch.rand(rlkv.Layout.of(model).shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    ps, ids, mask = prompts()
    outs = engine(model, rlkv.Gated(alpha, SINK, RECENT)).generate(ps, max_new_tokens=NEW, eos_token_ids=[])
    with gated(model, alpha, SINK, RECENT):
        check_equal(outs, reference(model, ids, mask))


def test_block_streaming_rollouts_equal_gated_generate():
    model = tiny_model("llama")
    alpha = torch.rand(rlkv.Layout.of(model).shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ps, ids, mask = prompts()
    outs = engine(model, rlkv.Gated(alpha, 2, 4, block=4)).generate(ps, max_new_tokens=NEW, eos_token_ids=[])
    with gated(model, alpha, 2, 4, block=4):
        check_equal(outs, reference(model, ids, mask))


def test_gated_engine_reads_alpha_in_place():
    model = tiny_model("llama")
    alpha = torch.ones(rlkv.Layout.of(model).shape, device=DEVICE)
    eng = engine(model, rlkv.Gated(alpha, SINK, RECENT))
    ps, ids, mask = prompts()
    alpha.zero_()  # as an optimizer step would
    outs = eng.generate(ps, max_new_tokens=NEW, eos_token_ids=[])
    with rlkv.compress(
        model, torch.zeros_like(alpha, dtype=torch.bool).cpu(), sink=SINK, recent=RECENT, prefill="compressed"
    ):  # alpha 0: the streaming branch everywhere, prompt included
        check_equal(outs, reference(model, ids, mask))


def test_outputs_do_not_depend_on_batching_budget_or_chunking():
    model = tiny_model("qwen3")
    keep = rlkv.HeadScores.random(rlkv.Layout.of(model), seed=3).keep_mask(0.5)
    ps, _, _ = prompts()
    kw = dict(max_new_tokens=NEW, temperature=1.0, top_p=0.9, top_k=50, seed=7, eos_token_ids=[])
    method = HeadSplit(keep, SINK, RECENT)
    packed = engine(model, method, max_batch=8, prefill_tokens=1000)
    wide = packed.generate(ps, **kw)
    assert packed.stats.prefill_forwards == 1  # every whole prompt in one packed row
    one_at_a_time = engine(model, method, max_batch=1, prefill_tokens=5)
    narrow = one_at_a_time.generate(ps, **kw)
    # a budget with room for one request's pages at a time: pages on demand run several and preempt (each
    # preempted request is prefilled again from prompt + its tokens); reserving admission waits instead
    store = one_at_a_time.store
    tight = store.slot_bytes * 4 + store.page_bytes * (store.pages_for(30 + NEW) + 1)
    squeezed = engine(model, method, kv_budget=tight, max_batch=3)
    starved = squeezed.generate(ps, **kw)
    reserving = engine(model, method, kv_budget=tight, max_batch=3, admission="reserve")
    waited = reserving.generate(ps, **kw)
    alone = engine(model, method).generate([ps[2]], **{**kw, "seed": [9]})
    assert (
        [o.tokens for o in wide]
        == [o.tokens for o in narrow]
        == [o.tokens for o in starved]
        == [o.tokens for o in waited]
    )
    assert alone[0].tokens == wide[2].tokens  # request 2 samples with seed 7 + 2 wherever it runs
    assert squeezed.stats.preemptions > 0 and squeezed.stats.max_running > 1
    # each preemption gives up a context (prompt + tokens so far) that is prefilled again
    recomputed = squeezed.stats.recomputed_tokens
    assert (
        recomputed >= squeezed.stats.preemptions * min(map(len, ps))
        and squeezed.metrics().recomputed_tokens == recomputed
    )
    assert reserving.stats.max_running == 1 < reserving.max_batch and reserving.stats.preemptions == 0
    assert len({tuple(o.tokens) for o in wide}) == len(ps)


def test_twenty_prompts_under_a_cap_of_four_equal_each_prompt_alone():
    model = tiny_model("llama")
    keep = rlkv.HeadScores.random(rlkv.Layout.of(model), seed=5).keep_mask(0.5)
    ps, _, _ = prompts([3 + (7 * i) % 29 for i in range(20)], seed=1)
    eng = engine(model, HeadSplit(keep, SINK, RECENT), max_batch=4)
    together = eng.generate(ps, max_new_tokens=6, eos_token_ids=[])
    assert eng.stats.max_running == 4 and eng.stats.peak_pages_used <= eng.stats.pages
    assert eng.store.free_pages == eng.store.capacity_pages  # every page came back
    # under load while prompts waited: more than one wave of tokens, not the last (the queue was empty by then)
    assert 4 * 6 < eng.stats.loaded_tokens < eng.stats.generated_tokens and eng.stats.loaded_tokens_per_s > 0
    assert [o.tokens for o in together] == [eng.generate([p], max_new_tokens=6, eos_token_ids=[])[0].tokens for p in ps]
    assert eng.stats.loaded_tokens == 0 and eng.stats.loaded_tokens_per_s is None  # one prompt: nothing waited


def test_memory_rebalancing_and_bytes_per_sequence():
    model = tiny_model("llama", layers=4)
    layout = rlkv.Layout.of(model)
    keep = rlkv.HeadScores.random(layout, seed=4).keep_mask(0.5)
    full, half = engine(model), engine(model, HeadSplit(keep, SINK, RECENT))
    ring = half.store.slot_bytes * half.store.num_slots
    assert half.store.page_bytes * 2 == full.store.page_bytes
    assert half.store.num_pages == (full.store.nbytes() - ring) // half.store.page_bytes  # freed bytes buy pages
    out = half.generate([list(range(3, 40))], max_new_tokens=10, eos_token_ids=[])[0]
    stored = 37 + 10 - 1  # the last sampled token is never fed back
    per_token_kept = layout.kv_bytes_per_token() // 2
    assert out.kv_bytes_full == stored * layout.kv_bytes_per_token()
    assert out.kv_bytes == stored * per_token_kept + 4 * (SINK + RECENT) * 16 * 2 * 4  # 4 compressed heads' rings


def test_sequence_tokens_give_the_rooms_of_rings_that_never_run_to_pages():
    model = tiny_model("llama", layers=4)
    keep = rlkv.HeadScores.random(rlkv.Layout.of(model), seed=4).keep_mask(0.5)
    method, budget, length = HeadSplit(keep, SINK, RECENT), 2**20, 37 + 10
    # reserving admission: each sequence holds the pages of `length` tokens from the start
    every = engine(model, method, kv_budget=budget, max_batch=64, prefill_tokens=4096, admission="reserve")
    fitted = engine(
        model, method, kv_budget=budget, max_batch=64, prefill_tokens=4096, sequence_tokens=length, admission="reserve"
    )
    store, n = fitted.store, fitted.store.num_slots - 1
    per_sequence = store.pages_for(length) * store.page_bytes + store.slot_bytes
    scratch = store.page_bytes + store.slot_bytes
    assert n < 64 and scratch + n * per_sequence <= budget < scratch + (n + 1) * per_sequence
    assert store.nbytes() <= budget and store.num_pages > every.store.num_pages
    ps = [list(range(3, 40))] * 64
    for eng in (every, fitted):
        eng.generate(ps, max_new_tokens=10, eos_token_ids=[])
    assert every.stats.max_running < fitted.stats.max_running == n
    with pytest.raises(ValueError, match="sequence_tokens must be an integer >= 1"):
        engine(model, method, sequence_tokens=0)


def test_finish_reasons_and_stop_strings():
    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    ps, _, _ = prompts()
    eng = engine(model)
    free = eng.generate(ps[:1], max_new_tokens=NEW, eos_token_ids=[])[0]
    eos = free.tokens[4]
    first = free.tokens.index(eos)
    stopped = eng.generate(ps[:1], max_new_tokens=NEW, eos_token_ids=[eos])[0]
    assert stopped.finish == "eos" and stopped.tokens == free.tokens[: first + 1]
    # done at the prefill's token: the decode step launched before that is read back computes one more, dropped
    one = eng.generate(ps, max_new_tokens=1, eos_token_ids=[])
    assert [o.tokens for o in one] == [[o.tokens[0]] for o in eng.generate(ps, max_new_tokens=2, eos_token_ids=[])]
    assert eng.generate(ps[:1], max_new_tokens=NEW, eos_token_ids=[free.tokens[0]])[0].tokens == free.tokens[:1]
    assert eng.stats.generated_tokens == 1 and eng.store.free_pages == eng.store.capacity_pages
    text = tok.decode(free.tokens, skip_special_tokens=True)
    stop = text[3:5]
    by_string = eng.generate(ps[:1], max_new_tokens=NEW, eos_token_ids=[], stop=[stop])[0]
    assert by_string.finish == "stop" and by_string.text == text[: text.find(stop)]
    looping = engine(model).generate(
        ps[:1], max_new_tokens=NEW, eos_token_ids=[], repetition_window=7, repetition_min_distinct=8
    )[0]
    assert looping.finish == "repetition" and len(looping.tokens) == 7  # 7 tokens never hold 8 distinct ids


TOKEN_DROP = {
    "h2o": dict(budget=8, h2o_recent=3),
    "snapkv": dict(budget=8, window=3),
    "rkv": dict(budget=6, window=2, interval=4),
}  # small budgets: every prompt but one is cut


@pytest.mark.parametrize("packing", ["alone", "padded"])
@pytest.mark.parametrize("name", list(TOKEN_DROP))
def test_token_droppers_in_the_engine_equal_their_generate(arch, name, packing, monkeypatch):
    """H2O / SnapKV / R-KV slots in the engine keep what their transformers cache keeps: the same tokens.

    alone: prefill_tokens 13, so each prompt has its prefill forward (the 30-token one longer than it,
    in one piece); padded: all four in one forward (4 running at once), attended as left-padded
    groups [5, 9], [17], [30]."""
    model = tiny_model(arch)
    method = rlkv.methods.build(name, rlkv.Layout.of(model), 0.5, **TOKEN_DROP[name])
    ps, ids, mask = prompts()
    if packing == "padded":
        monkeypatch.setattr(rlkv.engine.tokendrop, "PAD_TOKENS", 40)
    eng = engine(
        model, method, **({"prefill_tokens": 13} if packing == "alone" else {"prefill_tokens": 64, "max_batch": 4})
    )
    outs = eng.generate(ps, max_new_tokens=NEW, eos_token_ids=[])
    assert eng.stats.prefill_forwards == (4 if packing == "alone" else 1)
    with method.apply(model) as handle:
        check_equal(outs, reference(model, ids, mask))
        lengths = torch.tensor([len(p) + NEW - 1 for p in ps], device=DEVICE)  # the last token is never stored
        assert [o.kv_bytes for o in outs] == handle.cache.sequence_nbytes(lengths).tolist()
        assert all(type(o.kv_bytes) is int for o in outs)  # as for head splits: plain numbers (JSON, sums)


def test_token_dropper_budget_sets_how_many_sequences_run():
    model = tiny_model("qwen2")
    layout = rlkv.Layout.of(model)
    method = rlkv.methods.build("h2o", layout, 0.5, budget=8)
    slot = int(method.policy.sequence_bytes(layout, torch.tensor(8)))
    eng = engine(model, method, kv_budget=3 * slot, max_batch=8)  # slot 0 is scratch: room for 2 sequences
    assert eng.store.nbytes() == 3 * slot  # what it allocates is what the policy says a sequence holds
    ps, _, _ = prompts()
    alone = [eng.generate([p], max_new_tokens=NEW, eos_token_ids=[])[0].tokens for p in ps]
    outs = eng.generate(ps, max_new_tokens=NEW, eos_token_ids=[])
    assert eng.stats.max_running == 2 and [o.tokens for o in outs] == alone


def test_ring_positions_follow_the_ring_slot_rule():
    pos = ring_positions(torch.tensor([1, 3, 5, 12]), sink=2, recent=3)
    assert pos.tolist() == [[0, -1, -1, -1, -1], [0, 1, 2, -1, -1], [0, 1, 2, 3, 4], [0, 1, 11, 9, 10]]


def test_bad_engine_arguments_are_refused():
    model = tiny_model("llama")
    layout = rlkv.Layout.of(model)
    h2o = rlkv.methods.build("h2o", layout, 0.5, budget=16)
    with pytest.raises(ValueError, match="cannot hold one h2o sequence"):
        engine(model, h2o, kv_budget=10_000)
    with pytest.raises(ValueError, match="got str"):
        engine(model, "h2o")
    with pytest.raises(ValueError, match="cannot hold the rings of 3 sequences"):
        engine(model, HeadSplit(torch.zeros(layout.shape, dtype=torch.bool)), kv_budget=1000)
    with pytest.raises(ValueError, match="share of free GPU memory; on CPU give bytes"):
        parse_bytes(0.5, torch.device("cpu"))
    with pytest.raises(ValueError, match="is not a size"):
        parse_bytes("12 parsecs", torch.device("cpu"))
    assert parse_bytes("1.5GiB", torch.device("cpu")) == 3 * 2**29
    eng = engine(model, kv_budget=64 * 1024)
    with pytest.raises(ValueError, match="pages of 4 tokens but the KV pool holds"):
        eng.generate([[5] * 200], max_new_tokens=100)
    with pytest.raises(ValueError, match="needs 600 > max_seq_len=512"):
        engine(model, max_seq_len=512).generate([[5] * 500], max_new_tokens=100)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        eng.generate([[5], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="2 seeds for 1 prompts"):
        eng.generate([[5]], max_new_tokens=4, seed=[1, 2])
    with pytest.raises(ValueError, match="Gated alpha must be a tensor of shape"):
        engine(model, rlkv.Gated(torch.ones(2, 2)))


# ---------------------------------------------------------------------- sampling
def test_uniform_noise_is_a_pure_function_of_seed_step_and_token():
    seeds, steps = torch.tensor([1, 2, 1]), torch.tensor([0, 0, 1])
    keys = vocab_keys(50_000)
    u = uniform(seeds, steps, keys)
    assert torch.equal(u, uniform(seeds, steps, keys)) and torch.equal(u[0], uniform(seeds[:1], steps[:1], keys)[0])
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    assert (u[0] != u[1]).float().mean() > 0.99 and (u[0] != u[2]).float().mean() > 0.99


def test_seeded_sampling_draws_from_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(20_000, 4)
    tokens = sample(logits, 1.0, 0, 1.0, torch.arange(20_000), torch.zeros(20_000, dtype=torch.long))
    freq = torch.bincount(tokens, minlength=4).float() / 20_000
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.015, rtol=0)
    top1 = sample(logits[:5], 1.0, 1, 1.0, torch.arange(5), torch.zeros(5, dtype=torch.long))
    assert top1.tolist() == [0] * 5


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = filter_logits(logits, 0, 0.7).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    assert filter_logits(logits, 0, 0.01).isfinite().tolist() == [[True, False, False, False]]
    assert filter_logits(logits, 3, 1.0).isfinite().tolist() == [[True, True, True, False]]


def test_top_k_and_top_p_keep_the_tokens_tied_with_the_last_one_kept():
    logits = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0, -0.0, 0.0]])
    assert filter_logits(logits, 2, 1.0).isfinite().tolist() == [[True, True, True, True, False, False, False]]
    probs = torch.softmax(logits[0], -1)
    just_past_first = float(probs[0]) + 1e-3  # the first tied token's predecessors cover less than this: all stay
    assert filter_logits(logits, 0, just_past_first).isfinite().sum() == 4
    assert filter_logits(logits, 6, 1.0).isfinite().all()  # -0.0 ties with 0.0


@pytest.mark.parametrize("ties", [False, True])
def test_the_threshold_kernel_keeps_what_the_sort_keeps(ties, monkeypatch):
    """`rlkv.engine.nucleus` (here in Triton's interpreter) finds each row's threshold by a search over the logits'
    bits, not a sort, each row spread over several programs (here 3 chunks of one 512-logit block): the same
    threshold as the sort's, to the bit, for any top-k (off, within, beyond the vocabulary) and top-p (off, tiny,
    large), with ties and signed zeros."""
    from rlkv.engine import nucleus
    from rlkv.engine.sampling import nucleus_threshold

    monkeypatch.setattr(nucleus, "BLOCK", 512)
    monkeypatch.setattr(nucleus, "CHUNK", 512)
    gen = torch.Generator().manual_seed(1)
    rows, vocab = 24, 1500
    logits = torch.randn(rows, vocab, generator=gen) * 4
    if ties:
        logits = logits.round() * -1.0  # a few dozen values, each many times; -0.0 beside 0.0
    top_k = torch.randint(1, 40, (rows,), generator=gen)
    top_k[::4], top_k[1::6] = 0, vocab + 3
    top_p = torch.rand(rows, generator=gen) * 0.95 + 0.04
    top_p[::5], top_p[2::7] = 1.0, 1e-4
    logits, top_k, top_p = logits.to(DEVICE), top_k.to(DEVICE), top_p.to(DEVICE)
    searched = nucleus.nucleus_threshold_kernel(logits, top_k, top_p)
    sorted_ = nucleus_threshold(logits, top_k, top_p)  # a sort below KERNEL_ROWS rows
    # the same to the bit on a CPU; on a GPU the kernel's exp may round a nucleus's mass differently at its edge
    assert int((searched != sorted_).sum()) <= (0 if DEVICE == "cpu" else 1)
    kept = (logits >= searched[:, None]).sum(-1)
    assert kept.min() >= 1 and kept.max() == vocab and len(set(kept.tolist())) > 10


def test_top_k_candidates_draw_the_tokens_of_the_sorted_filter():
    """A top-k of at most TOP_K_CANDIDATES on every sampled row: one top-k selection, the noise of the selected
    tokens only, and the same tokens as the filter that sorts the vocabulary (greedy rows stay argmax)."""
    gen = torch.Generator().manual_seed(0)
    rows, vocab = 64, 1000
    logits = torch.randn(rows, vocab, generator=gen) * 3
    top_k = torch.randint(1, TOP_K_CANDIDATES + 1, (rows,), generator=gen)
    top_p = torch.rand(rows, generator=gen) * 0.5 + 0.5
    temperature = torch.rand(rows, generator=gen) + 0.3
    temperature[::7] = 0
    seeds, steps = torch.arange(rows) * 977, torch.arange(rows) % 5
    for k, p in ((top_k, top_p), (top_k, 1.0), (20, top_p)):
        sorted_ = sample(logits, temperature, k, p, seeds, steps)
        selected = sample(logits, temperature, k, p, seeds, steps, candidates=TOP_K_CANDIDATES)
        assert torch.equal(selected, sorted_)
    assert len(set(sorted_.tolist())) > 20  # sampled, not a constant


def test_batches_whose_top_k_is_small_run_the_selection_mode():
    """The engine picks the mode from its requests: every sampled row with 0 < top_k <= TOP_K_CANDIDATES selects;
    any row without top-k (or a larger one) sorts. Either way the same tokens."""
    from rlkv.engine import runner
    from rlkv.engine.request import SamplingParams

    def mode(*params):
        return runner.sampling_mode(
            [SimpleNamespace(params=SamplingParams(max_tokens=4, **p), sampled=0) for p in params]
        )

    small, greedy = dict(temperature=1.0, top_k=20, top_p=0.9), dict(temperature=0.0)
    assert mode(small, greedy) == "top_k" and mode(greedy) == "greedy"
    assert mode(small, dict(temperature=1.0, top_p=0.9)) == "filter"
    assert mode(dict(temperature=1.0, top_k=TOP_K_CANDIDATES + 1)) == "filter"
    assert mode(dict(temperature=1.0)) == "sample"
    model = tiny_model("qwen2")
    ps, _, _ = prompts()
    kw = dict(max_new_tokens=NEW, temperature=1.0, top_p=0.9, top_k=20, seed=7, eos_token_ids=[])
    selected = engine(model).generate(ps, **kw)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rlkv.engine.sampling, "TOP_K_CANDIDATES", 0)  # every batch sorts
        sorted_ = engine(model).generate(ps, **kw)
    assert [o.tokens for o in selected] == [o.tokens for o in sorted_]
    torch.testing.assert_close(
        torch.tensor([o.logprobs for o in selected]), torch.tensor([o.logprobs for o in sorted_])
    )


# ---------------------------------------------------------------------- the Triton kernel
@pytest.mark.parametrize("gated_mode", [False, True, 4], ids=["headsplit", "gated", "gated-block4"])
def test_kernel_equals_the_torch_path(gated_mode):
    """Compiled on CUDA; on a CPU, Triton's interpreter runs it (conftest sets TRITON_INTERPRET). Layers with
    kept and compressed heads, compressed heads only, kept heads only; one split per kept head (each program
    writes its output) and three (the combine kernel merges them, gated mix included)."""
    pytest.importorskip("triton")
    from rlkv.engine.kernel import decode_attention

    torch.manual_seed(0)
    layout = rlkv.Layout("qwen2", 3, 6, 2, 16, "float32", "x")
    keep = torch.tensor([[True, False], [False, False], [True, True]])
    keep = torch.ones_like(keep) if gated_mode else keep
    store = KVStore(layout, keep, 4, 8, 4, 2**22, 3, 128, DEVICE, torch.float32)
    for t in store.pages_k + store.pages_v + store.ring_k + store.ring_v:
        t.normal_()
    lengths, slots = torch.tensor([1, 9, 70], device=DEVICE), torch.tensor([1, 2, 3], device=DEVICE)
    for slot, n in zip(slots.tolist(), lengths.tolist()):
        pages = torch.randperm(store.num_pages - 1)[: -(-n // 4)] + 1  # scattered pages
        store.page_table[slot, : len(pages)] = pages.int().to(DEVICE)
    q = torch.randn(3, 6, 16, device=DEVICE)
    alpha = torch.rand(2, device=DEVICE) if gated_mode else None
    stream_block = gated_mode if gated_mode > 1 else 1
    for layer in (0, 1, 2):
        for window in (None, 7):
            ref = decode_torch(q, store, layer, slots, lengths, None, 0.25, window, alpha, stream_block)
            for splits in (1, 3):
                got = decode_attention(
                    q,
                    store,
                    layer,
                    slots,
                    lengths,
                    0.25,
                    window,
                    alpha,
                    splits=splits,
                    block=16,
                    stream_block=stream_block,
                )
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernel_launch_defaults_fit_real_head_sizes(head_dim):
    """The default BLOCK and stages at the head sizes of the supported models (SmolLM2 and Qwen 0.5B: 64;
    Qwen 1.5B / R1-Distill-1.5B: 128) in the dtype the engine runs them in; on a GPU this also checks
    that the tiles fit in shared memory."""
    pytest.importorskip("triton")
    from rlkv.engine.kernel import decode_attention

    torch.manual_seed(0)
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    layout = rlkv.Layout("qwen2", 1, 12, 2, head_dim, str(dtype).removeprefix("torch."), "x")
    store = KVStore(layout, torch.tensor([[True, False]]), 16, 64, 16, 2**24, 3, 512, DEVICE, dtype)
    for t in store.pages_k + store.pages_v + store.ring_k + store.ring_v:
        t.normal_()
    lengths, slots = torch.tensor([40, 300], device=DEVICE), torch.tensor([1, 2], device=DEVICE)
    for slot, n in zip(slots.tolist(), lengths.tolist()):
        pages = torch.randperm(store.num_pages - 1)[: -(-n // 16)] + 1
        store.page_table[slot, : len(pages)] = pages.int().to(DEVICE)
    q = torch.randn(2, 12, head_dim, device=DEVICE, dtype=dtype)
    ref = decode_torch(q, store, 0, slots, lengths, None, head_dim**-0.5, None, None)
    got = decode_attention(q, store, 0, slots, lengths, head_dim**-0.5, None)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)


def test_store_kernel_equals_the_torch_writes():
    """The decode step's K/V writes (pages of kept heads, rings of compressed ones) in one kernel launch per layer."""
    pytest.importorskip("triton")
    from rlkv.engine.kernel import store_kv

    torch.manual_seed(0)
    layout = rlkv.Layout("qwen2", 3, 6, 3, 16, "float32", "x")
    keep = torch.tensor([[True, False, True], [True, True, True], [False, False, False]])  # mixed, all kept, none kept
    stores = [KVStore(layout, keep, 4, 8, 4, 2**22, 3, 128, DEVICE, torch.float32) for _ in range(2)]
    for store in stores:
        store.page_table[1:4, :8] = torch.arange(1, 25, dtype=torch.int32, device=DEVICE).view(3, 8)
    slots, pos = (
        torch.tensor([2, 0, 1, 3], device=DEVICE),
        torch.tensor([17, 0, 3, 30], device=DEVICE),
    )  # row 1: padding
    batch = Decode.of(stores[0], slots, pos)
    for layer in range(3):
        k, v = torch.randn(2, 4, 3, 16, device=DEVICE).unbind(0)
        store_torch(k, v, stores[0], layer, batch)
        store_kv(k.transpose(0, 1).contiguous().transpose(0, 1), v, stores[1], layer, batch)  # strided k too
    for name in ("pages_k", "pages_v", "ring_k", "ring_v"):
        for ref, got in zip(getattr(stores[0], name), getattr(stores[1], name)):
            assert torch.equal(ref, got) and (ref.numel() == 0 or ref.abs().sum() > 0)


@pytest.mark.parametrize("observe", [False, True])
def test_slot_kernel_equals_the_torch_path(observe):
    """A token dropper's decode attention over slots read in place, out of chronological order, with empty
    places, a sliding window, and padding rows sharing scratch slot 0."""
    pytest.importorskip("triton")
    from rlkv.attention.slot_kernel import slot_attention
    from rlkv.engine.tokendrop import slot_attention_torch

    torch.manual_seed(0)
    slots_n, heads, cap, d = 4, 2, 37, 16
    keys, values = torch.randn(2, slots_n, heads, cap, d, device=DEVICE).unbind(0)
    pos = torch.stack([torch.randperm(60)[:cap] for _ in range(slots_n * heads)]).view(slots_n, heads, cap).int()
    pos[torch.rand(pos.shape) < 0.2] = -1  # empty places
    pos = pos.to(DEVICE)
    slots, q_pos = torch.tensor([2, 0, 3, 1, 0], device=DEVICE), torch.tensor([60, 0, 75, 61, 0], device=DEVICE)
    q = torch.randn(5, 6, d, device=DEVICE)
    k, v = torch.randn(2, 5, heads, d, device=DEVICE).unbind(0)
    for window in (None, 20):
        ref_out, ref_attn = slot_attention_torch(q, k, v, keys, values, pos, slots, q_pos, 0.3, window, observe)
        out, attn = slot_attention(q, k, v, keys, values, pos, slots, q_pos, 0.3, window, observe, block=16)
        real = [0, 2, 3]  # rows 1 and 4 are padding: scratch slot 0 at position 0
        torch.testing.assert_close(out[real], ref_out[real], rtol=1e-5, atol=1e-5)
        assert (attn is None) == (ref_attn is None) == (not observe)
        if observe:
            torch.testing.assert_close(attn[real], ref_attn[real], rtol=1e-5, atol=1e-6)
            assert torch.allclose(attn[real].sum(-1), torch.ones(3, heads, device=DEVICE))


@pytest.mark.parametrize("name", list(TOKEN_DROP))
def test_token_droppers_through_the_slot_kernel_equal_their_generate(name):
    """The engine's decode path on CUDA (kernel=True; on a CPU in Triton's interpreter) keeps what the
    transformers cache keeps."""
    pytest.importorskip("triton")
    model = tiny_model("qwen2")
    method = rlkv.methods.build(name, rlkv.Layout.of(model), 0.5, **TOKEN_DROP[name])
    ps, ids, mask = prompts()
    outs = engine(model, method, kernel=True, prefill_tokens=64, max_batch=4).generate(
        ps, max_new_tokens=NEW, eos_token_ids=[]
    )
    with method.apply(model):
        check_equal(outs, reference(model, ids, mask))


@pytest.mark.parametrize("name", ["full", "h2o"])
def test_the_model_cannot_be_called_directly_while_the_engine_runs(name):
    """While the engine has work the model's attention belongs to it; once idle, to the model again."""
    model = tiny_model("qwen2")
    method = None if name == "full" else rlkv.methods.build("h2o", rlkv.Layout.of(model), 0.5, budget=8)
    eng = engine(model, method)
    ids = torch.tensor([[1, 2, 3]], device=DEVICE)
    eng.add_request("a", [1, 2, 3], rlkv.SamplingParams(max_tokens=4, ignore_eos=True))
    eng.step()
    with pytest.raises(RuntimeError, match="cannot be called directly while the engine runs"):
        model(ids)
    for _ in range(20):
        if not eng.has_unfinished():
            break
        eng.step()
    assert not eng.has_unfinished()
    assert model(ids).logits.shape == (1, 3, model.config.vocab_size)  # idle: the model's own attention


def test_an_interrupted_generate_gives_its_memory_back():
    model = tiny_model("qwen2")
    eng = engine(model)
    ps, _, _ = prompts()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    decode = eng.runner.decode
    eng.runner.decode = boom
    with pytest.raises(KeyboardInterrupt):
        eng.generate(ps, max_new_tokens=NEW, eos_token_ids=[])
    eng.runner.decode = decode
    assert eng.store.free_pages == eng.store.capacity_pages and len(eng.store._free_slots) == eng.max_batch
    assert not eng.has_unfinished() and model.config._attn_implementation == "sdpa"
    assert len(eng.generate(ps, max_new_tokens=3, eos_token_ids=[])) == len(ps)


@pytest.mark.parametrize("prefill_tokens", [13, 1000], ids=["chunked", "packed"])
def test_full_prefill_equals_compressed_generate_with_full_prefill(arch, prefill_tokens):
    """prefill='full' (the authors' rule): compressed heads attend over the whole prompt, then keep sink + recent;
    packed prompts and prompts prefilled in chunks of 13 tokens give compress(prefill='full')'s tokens."""
    model = tiny_model(arch)
    keep = rlkv.HeadScores.random(rlkv.Layout.of(model), seed=1).keep_mask(0.5)
    ps, ids, mask = prompts()
    full = engine(model, HeadSplit(keep, SINK, RECENT, prefill="full"), prefill_tokens=prefill_tokens, max_batch=4)
    outs = full.generate(ps, max_new_tokens=NEW, eos_token_ids=[])
    with rlkv.compress(model, keep, sink=SINK, recent=RECENT, prefill="full"):
        check_equal(outs, reference(model, ids, mask))
    compressed = engine(model, HeadSplit(keep, SINK, RECENT, prefill="compressed")).generate(
        ps, max_new_tokens=NEW, eos_token_ids=[]
    )
    assert [o.tokens for o in outs] != [o.tokens for o in compressed]  # prompts longer than the ring: the rule matters
    assert full.state._prompt_kv == {}  # the prompts' K/V held for chunks are gone once they are done


def test_a_step_graph_is_not_captured_without_the_engines_attention():
    """Outside `Engine.step` the model runs its own attention: a graph captured there would store and read no K/V."""
    model = tiny_model("qwen2")
    eng = engine(model, compile=False)  # compiling captures every greedy decode graph up front
    eng.generate([[5, 6, 7]], max_new_tokens=2)
    with pytest.raises(RuntimeError, match="engine's attention installed"):
        eng.runner._graph(("decode", 3), "greedy")  # a bucket the generate never decoded


# ---------------------------------------------------------------------- the compiled decode step
@pytest.fixture(scope="module")
def traced():
    """Engines built inside compile with a backend that records the graphs dynamo hands it and runs them as
    inductor would get them (aot_eager: the same graphs, functionalized, no code generation). One backend for
    the module: a model class traced once serves every later engine on it, as in a real process."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rlkv.engine.compiled, "BACKEND", backend)
        yield graphs
    torch._dynamo.reset()


def attention_calls(graph) -> int:
    return sum(node.target is torch.ops.rlkv.attention.default for node in graph.graph.nodes)


def scaled_aranges(graph) -> list:
    """The graph's products of an arange: inductor folds them into int32 index arithmetic, which overflows
    (pytorch/pytorch#175966; the sampling noise's vocabulary hash failed to compile on CUDA that way)."""
    ranges = [node for node in graph.graph.nodes if node.target is torch.arange]
    return [user for node in ranges for user in node.users if user.target in (operator.mul, torch.mul, "mul")]


def test_compiled_engine_equals_the_eager_engine_and_compressed_generate(arch, traced):
    """compile=True: the decode step's forward is one graph around `rlkv::attention` (one call per layer, the
    store never traced) and sampling a small graph per mode, all compiled when the engine is built; greedy
    tokens and log-probs equal compress + generate's, sampled tokens the eager engine's."""
    model = tiny_model(arch)
    keep = rlkv.HeadScores.random(rlkv.Layout.of(model), seed=1).keep_mask(0.5)
    method = HeadSplit(keep, SINK, RECENT)
    ps, ids, mask = prompts()
    before = len(traced)
    compiled = engine(model, method, compile=True)
    new = sorted(attention_calls(g) for g in traced[before:])
    assert new[-1] == 3 and new[:-1] in ([], [0, 0, 0, 0])  # this class's forward; the modes' sampling, if first
    assert not [user for graph in traced for user in scaled_aranges(graph)]
    outs = compiled.generate(ps, max_new_tokens=NEW, eos_token_ids=[])
    with rlkv.compress(model, keep, sink=SINK, recent=RECENT):
        check_equal(outs, reference(model, ids, mask))
    kw = dict(max_new_tokens=NEW, temperature=1.0, top_p=0.9, top_k=50, seed=7, eos_token_ids=[])
    sampled, eager = compiled.generate(ps, **kw), engine(model, method, compile=False).generate(ps, **kw)
    assert [o.tokens for o in sampled] == [o.tokens for o in eager]
    assert len(traced) == before + len(new)  # every batch size and mode ran on what was compiled at the start


@pytest.mark.parametrize("compile", [False, True])
def test_a_dropped_engine_frees_its_kv_store_at_once(compile, traced):
    """Nothing in an engine refers back to it, so its KV store goes with the last reference to the engine, not at
    Python's next cycle collection: a benchmark or an evaluation that builds one engine after another on a GPU
    would otherwise hold every earlier pool (decode_limit.py ran out of memory on its third 30 GiB pool)."""
    eng = engine(tiny_model("qwen2"), compile=compile)
    eng.generate([[5, 6, 7], [8, 9]], max_new_tokens=3, eos_token_ids=[])
    store = weakref.ref(eng.store)
    gc.disable()
    try:
        del eng
        assert store() is None
    finally:
        gc.enable()


def test_engines_compile_on_more_models_than_dynamos_default_limit(traced):
    """Every model configuration is an entry of the same compiled functions' caches: engines on more configurations
    than dynamo's limit (8 by default, 2 here) still compile, under fullgraph, where the limit is an error."""
    ps, ids, mask = prompts()
    with torch._dynamo.config.patch(recompile_limit=2):
        for layers in (1, 2, 3):
            model = tiny_model("llama", layers=layers)
            outs = engine(model, compile=True).generate(ps, max_new_tokens=NEW, eos_token_ids=[])
            check_equal(outs, reference(model, ids, mask))
    assert sum(attention_calls(g) > 0 for g in traced) >= 3  # a forward compiled per configuration


def test_compiled_engine_runs_every_runtime(traced):
    """The operator hides which store and attention run: gated rollouts and token droppers compile the same way."""
    model = tiny_model("qwen2")
    layout = rlkv.Layout.of(model)
    alpha = torch.rand(layout.shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    ps, ids, mask = prompts()
    for method in (rlkv.Gated(alpha, SINK, RECENT), rlkv.methods.build("h2o", layout, 0.5, budget=8)):
        outs = engine(model, method, compile=True).generate(ps, max_new_tokens=NEW, eos_token_ids=[])
        with gated(model, alpha, SINK, RECENT) if isinstance(method, rlkv.Gated) else method.apply(model):
            check_equal(outs, reference(model, ids, mask))
    assert max(map(attention_calls, traced)) == 3


def test_inductor_compiled_engine_with_the_kernels_equals_compressed_generate(monkeypatch):
    """The engine as it runs on CUDA (Triton kernels, the step compiled by inductor; no CUDA graphs on a CPU),
    on a CPU: inductor generates C++ for the fused operators, Triton's interpreter runs the attention kernels."""
    pytest.importorskip("triton")
    from torch._dynamo.utils import counters

    monkeypatch.setattr(rlkv.engine.compiled, "BACKEND", "inductor")  # whatever `traced` set for the module
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model("llama", layers=2)
    keep = rlkv.HeadScores.random(rlkv.Layout.of(model), seed=1).keep_mask(0.5)
    ps, ids, mask = prompts()
    outs = engine(model, HeadSplit(keep, SINK, RECENT), compile=True, kernel=True).generate(
        ps, max_new_tokens=NEW, eos_token_ids=[]
    )
    assert sum(counters["inductor"][k] for k in ("fxgraph_cache_miss", "fxgraph_cache_hit")) >= 4  # inductor's code
    with rlkv.compress(model, keep, sink=SINK, recent=RECENT):
        check_equal(outs, reference(model, ids, mask))
    torch._dynamo.reset()


def test_a_decode_step_that_fails_to_compile_runs_eagerly(monkeypatch, caplog):
    """A compiler failure (inductor's and Triton's have stopped GPU runs here) costs speed, not the job: the
    engine logs why, with its traceback, and decodes eagerly, equal to compress + generate."""

    def broken(gm, example_inputs):
        raise RuntimeError("list indices must be integers or slices, not NoneType")

    monkeypatch.setattr(rlkv.engine.compiled, "BACKEND", broken)
    torch._dynamo.reset()
    model = tiny_model("qwen2")
    keep = rlkv.HeadScores.random(rlkv.Layout.of(model), seed=1).keep_mask(0.5)
    ps, ids, mask = prompts()
    with caplog.at_level("WARNING", logger="rlkv.engine"):
        eng = engine(model, HeadSplit(keep, SINK, RECENT), compile=True)
    assert not eng.compile and eng.runner.min_rows == 1
    assert "compiling the decode step failed" in caplog.text and "list indices must be integers" in caplog.text
    assert caplog.records[-1].exc_info is not None  # the whole traceback
    outs = eng.generate(ps, max_new_tokens=NEW, eos_token_ids=[])
    with rlkv.compress(model, keep, sink=SINK, recent=RECENT):
        check_equal(outs, reference(model, ids, mask))
    torch._dynamo.reset()


def test_a_sampling_mode_that_fails_to_compile_samples_eagerly(monkeypatch, caplog):
    """A compiler failure on one sampling mode's graph (here the top-k selection's) costs only that mode: it
    samples eagerly, logged; the forward and the other modes stay compiled; tokens unchanged."""

    def selects(gm) -> bool:
        return any(node.target in (torch.topk, "topk") for node in gm.graph.nodes)

    def backend(gm, example_inputs):
        if selects(gm):
            raise RuntimeError("list indices must be integers or slices, not NoneType")
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    monkeypatch.setattr(rlkv.engine.compiled, "BACKEND", backend)
    torch._dynamo.reset()
    model = tiny_model("qwen2")
    ps, _, _ = prompts()
    with caplog.at_level("WARNING", logger="rlkv.engine"):
        eng = engine(model, compile=True)
    assert eng.compile and eng.runner.eager_modes == {"top_k"}
    assert "compiling 'top_k' sampling failed" in caplog.text and caplog.records[-1].exc_info is not None
    kw = dict(max_new_tokens=NEW, temperature=1.0, top_k=20, seed=7, eos_token_ids=[])  # the top_k mode
    outs = eng.generate(ps, **kw)
    assert [o.tokens for o in outs] == [o.tokens for o in engine(model, compile=False).generate(ps, **kw)]
    torch._dynamo.reset()


def test_rlkv_compile_says_whether_engines_compile_when_not_told(monkeypatch):
    """RLKV_COMPILE=0 is the eager escape hatch for every engine a command builds; a wrong value is an error."""
    from rlkv.engine.compiled import compile_by_default

    monkeypatch.delenv("RLKV_COMPILE", raising=False)
    assert compile_by_default()
    for value, expected in [("0", False), ("off", False), ("1", True), ("ON", True)]:
        monkeypatch.setenv("RLKV_COMPILE", value)
        assert compile_by_default() is expected
    monkeypatch.setenv("RLKV_COMPILE", "maybe")
    with pytest.raises(ValueError, match="RLKV_COMPILE must be 0 or 1"):
        compile_by_default()
