"""Decoding steps replayed from a fixed-input step (rlkv.hf.graphs) against the eager head-split cache.

On a CPU the step runs eagerly where a CUDA graph would replay (warm-up once, then once per step):
that checks what a graph relies on (fixed inputs refilled, a step run twice equals once, the
counting done outside the step). With RLKV_TEST_DEVICE=cuda the same tests capture real graphs."""

import pytest
import torch
from conftest import DEVICE, tiny_model
from conftest import left_padded_batch as batch
from transformers import DynamicCache

import rlkv
from rlkv.hf import graphs
from rlkv.hf.plumbing import CACHE_KWARG

SINK, RECENT = 2, 4
CAPTURE = DEVICE.type == "cuda"


def run(model, ids, mask, new=12, **kw):
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new, output_logits=True, return_dict_in_generate=True, **kw
    )


def addresses(cache) -> list[int]:
    """Where the cache's state lies: a replay reads and writes the addresses its recording saw."""
    shared = [getattr(cache, name, None) for name in ("ring_pos", "col_valid")]
    return [t.data_ptr() for t in [*shared, *(t for layer in cache.layers for t in layer.tensors())] if t is not None]


@pytest.fixture
def replays(monkeypatch):
    """The decoding steps a captured step served: "record" (the first, run and recorded), "run" (replays);
    every replay must leave the cache's state where the recording found it."""
    calls, recorded = [], {}
    record, replay = graphs.CapturedStep.record, graphs.CapturedStep.run

    def recording(self, warm_up):
        output = record(self, warm_up)
        recorded[id(self)] = addresses(self.cache)
        calls.append("record")
        return output

    def replaying(self, *args):
        output = replay(self, *args)
        assert addresses(self.cache) == recorded[id(self)], "a replayed step moved the cache's state"
        calls.append("run")
        return output

    monkeypatch.setattr(graphs.CapturedStep, "record", recording)
    monkeypatch.setattr(graphs.CapturedStep, "run", replaying)
    return calls


def generate_both(model, heads, ids, mask, new=12, sparsity=0.5, **kw):
    """(eager output, replayed output, the replayed run's cache)."""
    with rlkv.compress(model, heads, sparsity=sparsity, sink=SINK, recent=RECENT, cuda_graphs=False):
        torch.manual_seed(0)
        eager = run(model, ids, mask, new, **kw)
    with rlkv.compress(model, heads, sparsity=sparsity, sink=SINK, recent=RECENT, cuda_graphs=False) as handle:
        with graphs.decode_graphs(model, handle, capture=CAPTURE):
            torch.manual_seed(0)
            replayed = run(model, ids, mask, new, **kw)
    return eager, replayed, handle.cache


@pytest.mark.parametrize("sparsity", [0.5, 1.0])
def test_replayed_decoding_equals_the_eager_cache(arch, sparsity, replays):
    model = tiny_model(arch)
    heads = rlkv.HeadScores.random(rlkv.Layout.of(model), seed=1)
    ids, mask = batch((20, 13, 7), 20)
    eager, replayed, cache = generate_both(model, heads, ids, mask, new=12, sparsity=sparsity, do_sample=False)
    assert replays == ["record"] + ["run"] * 10  # every decoding step (the first token comes from the prompt's forward)
    assert cache.graph is not None and cache.length == 20 + 11
    torch.testing.assert_close(torch.stack(replayed.logits), torch.stack(eager.logits), rtol=1e-5, atol=1e-5)
    assert torch.equal(replayed.sequences, eager.sequences)
    assert cache.planned == 20 + 11 <= cache.capacity


def test_a_cache_that_grows_records_its_step_again_and_holds_only_what_it_needs(monkeypatch, replays):
    """Room is made a few columns at a time (not all of max_new_tokens at once): each growth moves the
    buffers, so the step is recorded again there, and the outputs stay the eager ones."""
    from rlkv.hf import splitcache

    monkeypatch.setattr(splitcache, "GROW", 4)
    monkeypatch.setattr(splitcache, "GRAPH_GROW", 5)
    model = tiny_model("qwen2")
    heads = rlkv.HeadScores.random(rlkv.Layout.of(model), seed=7)
    ids, mask = batch((9, 5), 9)
    eager, replayed, cache = generate_both(model, heads, ids, mask, new=15, do_sample=False)
    # prefill: 9 columns in 12 (GROW 4); then growth to 17 columns (in 20) at column 12, to 23 (in 24) at 20
    assert replays == ["record"] + ["run"] * 2 + ["record"] + ["run"] * 7 + ["record"] + ["run"] * 2
    assert cache.capacity == 24 and cache.planned == 9 + 14
    torch.testing.assert_close(torch.stack(replayed.logits), torch.stack(eager.logits), rtol=1e-5, atol=1e-5)
    assert torch.equal(replayed.sequences, eager.sequences)


def test_sampling_is_the_same_with_replayed_steps(replays):
    model = tiny_model("qwen2")
    heads = rlkv.HeadScores.random(rlkv.Layout.of(model), seed=2)
    ids, mask = batch((9, 5), 9)
    eager, replayed, _ = generate_both(model, heads, ids, mask, new=10, do_sample=True, top_k=20, temperature=1.5)
    assert replays == ["record"] + ["run"] * 8
    assert torch.equal(replayed.sequences, eager.sequences)


def test_what_is_not_a_single_beam_decoding_step_runs_as_it_is(replays):
    """Beams, a cache the caller built, hidden states asked for, a sliding window shorter than the cache."""
    model = tiny_model("qwen3")
    heads = rlkv.HeadScores.random(rlkv.Layout.of(model), seed=4)
    keep = heads.keep_mask(0.5)
    ids, mask = batch((11, 6), 11)
    with rlkv.compress(model, heads, sparsity=0.5, sink=SINK, recent=RECENT, cuda_graphs=False) as handle:
        with graphs.decode_graphs(model, handle, capture=CAPTURE):
            beams = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False)
            own = run(
                model,
                ids,
                mask,
                6,
                do_sample=False,
                **{CACHE_KWARG: rlkv.HeadSplitCache(keep, SINK, RECENT, prefill="full")},
            )
            hidden = run(model, ids, mask, 6, do_sample=False, output_hidden_states=True)
        ref = run(model, ids, mask, 6, do_sample=False, **{CACHE_KWARG: DynamicCache()})
        beams_ref = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=6,
            num_beams=3,
            do_sample=False,
            **{CACHE_KWARG: DynamicCache()},
        )
    assert replays == []
    assert torch.equal(beams, beams_ref)
    for out in (own, hidden):
        torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=1e-5, atol=1e-5)

    windowed = tiny_model("mistral", sliding_window=9)
    wheads = rlkv.HeadScores.random(rlkv.Layout.of(windowed), seed=3)
    eager, replayed, cache = generate_both(windowed, wheads, ids, mask, new=8, do_sample=False)
    assert replays == [] and cache.graph is None
    assert torch.equal(replayed.sequences, eager.sequences)


def test_a_window_longer_than_the_cache_still_replays(replays):
    model = tiny_model("mistral", sliding_window=64)
    heads = rlkv.HeadScores.random(rlkv.Layout.of(model), seed=3)
    ids, mask = batch((11, 6), 11)
    eager, replayed, _ = generate_both(model, heads, ids, mask, new=8, do_sample=False)
    assert replays == ["record"] + ["run"] * 6
    torch.testing.assert_close(torch.stack(replayed.logits), torch.stack(eager.logits), rtol=1e-5, atol=1e-5)


TOKEN_DROPPERS = {  # budgets that drop tokens while decoding after a 14-token prompt (R-KV compresses every 4)
    "h2o": dict(budget=8, h2o_recent=3),
    "snapkv": dict(budget=8, window=3),
    "rkv": dict(budget=6, window=2, interval=4),
}


@pytest.mark.parametrize("name", list(TOKEN_DROPPERS))
def test_token_droppers_replayed_equal_their_eager_steps(name, replays):
    """Evictions, scores and R-KV's query window all live in place, so replays keep what eager steps keep."""
    from rlkv.hf.tokendrop import token_drop

    model = tiny_model("qwen2")
    policy = rlkv.methods.build(name, rlkv.Layout.of(model), 0.5, **TOKEN_DROPPERS[name]).policy
    ids, mask = batch((14, 9), 14)
    runs = []
    for replayed in (False, True):
        with token_drop(model, policy, cuda_graphs=False) as handle:
            with graphs.decode_graphs(model, handle, capture=CAPTURE) if replayed else torch.no_grad():
                out = run(model, ids, mask, 10, do_sample=False)
        runs.append((out, [(layer.pos.clone(), layer.cumulative_length) for layer in handle.cache.layers]))
    (eager, eager_state), (replayed, replayed_state) = runs
    assert replays == ["record"] + ["run"] * 8
    assert torch.equal(replayed.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(replayed.logits), torch.stack(eager.logits), rtol=1e-5, atol=1e-5)
    for (pos, length), (eager_pos, eager_length) in zip(replayed_state, eager_state):
        assert torch.equal(pos, eager_pos) and length == eager_length == 14 + 9


def test_a_step_that_cannot_be_captured_decodes_eagerly_with_a_warning(monkeypatch, replays):
    """A model whose own code synchronizes with the host (a dynamic RoPE) cannot be captured: its first step
    still counts once, it says so once, and every later step runs as it is, with the same outputs."""

    def refuse(self):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs.CapturedStep, "_warm_up", graphs.CapturedStep._step)
    monkeypatch.setattr(graphs.CapturedStep, "capture", refuse)
    model = tiny_model("llama")
    heads = rlkv.HeadScores.random(rlkv.Layout.of(model), seed=5)
    ids, mask = batch((9, 5), 9)
    with rlkv.compress(model, heads, sparsity=0.5, sink=SINK, recent=RECENT, cuda_graphs=False):
        eager = run(model, ids, mask, 8, do_sample=False)
    with rlkv.compress(model, heads, sparsity=0.5, sink=SINK, recent=RECENT, cuda_graphs=False) as handle:
        with graphs.decode_graphs(model, handle, capture=True):
            with pytest.warns(RuntimeWarning, match="cannot be captured in a CUDA graph") as warned:
                fallback = run(model, ids, mask, 8, do_sample=False)
    assert len(warned) == 1 and replays == ["record"]
    assert handle.cache.graph is None and handle.cache.length == 9 + 7
    torch.testing.assert_close(torch.stack(fallback.logits), torch.stack(eager.logits), rtol=1e-5, atol=1e-5)
    assert torch.equal(fallback.sequences, eager.sequences)


def test_the_model_forward_is_restored():
    model = tiny_model("llama")
    with rlkv.compress(model, None, sparsity=1.0, cuda_graphs=False) as handle:
        with graphs.decode_graphs(model, handle, capture=CAPTURE):
            assert isinstance(model.forward, graphs.DecodeGraphs)
    assert "forward" not in model.__dict__


@pytest.mark.skipif(CAPTURE, reason="on a GPU cuda_graphs=True is valid")
def test_cuda_graphs_on_a_cpu_model_are_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a CUDA device"):
        with rlkv.compress(model, None, sparsity=1.0, cuda_graphs=True):
            pass
    with pytest.raises(ValueError, match="cuda_graphs must be True, False or None"):
        with rlkv.compress(model, None, sparsity=1.0, cuda_graphs="yes"):
            pass


@pytest.mark.parametrize("replayed", [False, True], ids=["eager", "replayed"])
def test_a_cache_is_freed_with_its_last_reference_without_the_garbage_collector(replayed):
    """No reference cycle through its layers, plans or captured step: its memory goes when the caller lets go."""
    import gc
    import weakref

    model = tiny_model("qwen2")
    ids, mask = batch((9, 5), 9)
    gc.collect()
    gc.disable()
    try:
        with rlkv.compress(model, None, sparsity=1.0, sink=SINK, recent=RECENT, cuda_graphs=False) as handle:
            with graphs.decode_graphs(model, handle, capture=CAPTURE) if replayed else torch.no_grad():
                out = run(model, ids, mask, 6, do_sample=False)
        cache = weakref.ref(handle.cache)
        assert (cache().graph is not None) == replayed
        del out, handle
        assert cache() is None
    finally:
        gc.enable()


def test_a_deep_copy_leaves_the_captured_step_behind():
    """A copied token-drop cache gets no captured step (it would replay into the original's buffers)."""
    import copy

    from rlkv.hf.tokendrop import token_drop

    model = tiny_model("qwen2")
    policy = rlkv.methods.build("h2o", rlkv.Layout.of(model), 0.5, **TOKEN_DROPPERS["h2o"]).policy
    ids, mask = batch((14, 9), 14)
    with token_drop(model, policy, cuda_graphs=False) as handle:
        with graphs.decode_graphs(model, handle, capture=CAPTURE):
            out = run(model, ids, mask, 6, do_sample=False)
        original = handle.cache
        clone = copy.deepcopy(original)
        assert original.graph is not None and clone.graph is None
        longer = torch.cat([mask, torch.ones_like(out.sequences[:, ids.shape[1] :])], dim=1)
        on = [
            model(input_ids=out.sequences[:, -1:], attention_mask=longer, **{CACHE_KWARG: cache}).logits
            for cache in (original, clone)
        ]
    torch.testing.assert_close(on[0], on[1], rtol=0, atol=0)
