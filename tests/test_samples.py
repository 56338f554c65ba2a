"""n samples of one prompt: one prefill, the others forked from it on shared pages; each sample equals a request of
its seed alone (tokens and log-probs), through compressed heads' rings, token droppers' slots and preemption."""

import pytest
import torch
from conftest import tiny_model
from test_engine import RECENT, SINK, engine, prompts
from test_logprobs import run

import rlkv
from rlkv import SamplingParams
from rlkv.engine.pages import page_hashes
from rlkv.methods.headsplit import HeadSplit

NEW = 12
N = 4


def method_of(kind, model):
    if kind == "full":
        return None
    if kind == "h2o":
        return rlkv.methods.build("h2o", rlkv.Layout.of(model), 0.5, budget=8)
    keep = rlkv.HeadScores.random(rlkv.Layout.of(model), seed=2).keep_mask(0.5)
    return HeadSplit(keep, SINK, RECENT, prefill=kind)


def alone(model, method, prompt, params, **kw):
    """Each sample of `params` as a request of its own seed, one at a time."""
    return [run(engine(model, method, **kw), [("r", prompt, params.sample(i))])["r"][0] for i in range(params.n)]


def same(got, want):
    assert [c.tokens for c in got] == [c.tokens for c in want]
    torch.testing.assert_close(torch.tensor([c.logprobs for c in got]), torch.tensor([c.logprobs for c in want]))


@pytest.mark.parametrize("kind", ["full", "compressed", "full-prefill", "h2o"])
def test_n_samples_equal_requests_of_their_seeds_alone(kind):
    """Prompts whose last page is partly filled (5, 17, 30 tokens) or full (16): every sample of n = 4 equals the
    request of seed + i alone, and the request's samples ran from one prefill."""
    model = tiny_model("qwen2")
    method = method_of("full" if kind == "full-prefill" else kind, model)
    if kind == "full-prefill":
        method = HeadSplit(method_of("compressed", model).keep, SINK, RECENT, prefill="full")
    ps, _, _ = prompts((5, 17, 30, 16))
    params = SamplingParams(max_tokens=NEW, n=N, temperature=1.0, seed=7, ignore_eos=True)
    eng = engine(model, method, max_batch=8)
    done = run(eng, [(f"r{i}", p, params) for i, p in enumerate(ps)])
    assert eng.runner.prefill_forwards <= sum(-(-len(p) // 13) for p in ps)  # chunks of 13: one prefill per prompt
    for i, p in enumerate(ps):
        same(done[f"r{i}"], alone(model, method, p, params))
    assert eng.metrics().pages_used == 0 and eng.metrics().running == 0


def test_samples_share_the_prompts_full_pages_and_name_them_by_content():
    model = tiny_model("llama")
    ps, _, _ = prompts((30,))
    eng = engine(model, method_of("compressed", model))
    eng.add_request("r", ps[0], SamplingParams(max_tokens=NEW, n=3, temperature=1.0, ignore_eos=True))
    while eng._requests["r"][0].sampled == 0:
        eng.step()
    first, *forks = eng._requests["r"]
    full = len(ps[0]) // 4  # page size 4: 7 full pages and a partly filled one, copied
    assert all(f.pages[:full] == first.pages[:full] for f in forks)
    assert len({first.pages[full], *(f.pages[full] for f in forks)}) == 3
    pool = eng.store.pool
    assert [pool.refs[page] for page in first.pages[:full]] == [3] * full
    assert [pool.hashes[page] for page in first.pages[:full]] == page_hashes(ps[0], 4)
    assert page_hashes(ps[0][:8] + [1], 4)[:2] == page_hashes(ps[0], 4)[:2] != page_hashes([1] + ps[0], 4)[:2]
    while eng.has_unfinished():
        eng.step()
    assert pool.free == eng.store.capacity_pages and not any(pool.refs) and not pool.hashes


def test_n_samples_hold_fewer_pages_than_n_requests():
    model = tiny_model("llama")
    ps, _, _ = prompts((30,))
    params = SamplingParams(max_tokens=NEW, n=N, temperature=1.0, seed=1, ignore_eos=True)
    shared, separate = (engine(model, max_batch=8, prefill_tokens=256) for _ in range(2))  # prompts in lockstep
    together = run(shared, [("r", ps[0], params)])["r"]
    apart = run(separate, [(f"r{i}", ps[0], params.sample(i)) for i in range(N)])
    same(together, [apart[f"r{i}"][0] for i in range(N)])
    full = len(ps[0]) // 4
    assert shared.store.peak_pages_used == separate.store.peak_pages_used - (N - 1) * full


@pytest.mark.parametrize("prefill", ["compressed", "full"])
def test_preempted_samples_equal_an_unpreempted_run(prefill):
    """A pool with pages for about two sequences: samples are preempted (some before they were forked) and
    prefilled again alone; every sample equals the roomy run's."""
    model = tiny_model("llama")
    method = HeadSplit(method_of("compressed", model).keep, SINK, RECENT, prefill=prefill)
    ps, _, _ = prompts((17, 9))
    params = SamplingParams(max_tokens=NEW + 8, n=3, temperature=1.0, seed=4, ignore_eos=True)
    roomy = engine(model, method, max_batch=8)
    probe = roomy.store
    tight = probe.slot_bytes * 9 + probe.page_bytes * (2 * probe.pages_for(17 + NEW + 8) + 2)
    squeezed = engine(model, method, kv_budget=tight, max_batch=8, prefill_tokens=16)
    requests = [(f"r{i}", p, params) for i, p in enumerate(ps)]
    want, got = run(roomy, requests), run(squeezed, requests)
    assert squeezed.metrics().preemptions > 0 and squeezed.store.peak_pages_used <= squeezed.store.capacity_pages
    for key in want:
        same(got[key], want[key])
    assert squeezed.metrics().pages_used == 0 and not any(squeezed.store.pool.refs)


def test_aborting_one_sample_or_all_frees_their_pages():
    model = tiny_model("llama")
    ps, _, _ = prompts((17,))
    params = SamplingParams(max_tokens=NEW, n=3, temperature=1.0, seed=9, ignore_eos=True)
    eng = engine(model, max_batch=8)
    eng.add_request("waiting", ps[0], params)
    assert eng.abort_request("waiting", index=0)  # its forks wait for its prefill: they go on, it gives way after
    eng.add_request("r", ps[0], params)
    outputs = [out for _ in range(3) for out in eng.step()]
    assert eng.abort_request("r", index=1) and not eng.abort_request("r", index=1)
    while eng.has_unfinished():
        outputs += eng.step()
    outputs += eng.step()
    done = {}
    for out in outputs:
        if out.finished:
            done.setdefault(out.request_id, {})[out.index] = out.completion
    want = alone(model, None, ps[0], params)
    same([done["r"][0], done["r"][2]], [want[0], want[2]])
    same([done["waiting"][1], done["waiting"][2]], [want[1], want[2]])
    assert done["r"][1].finish == done["waiting"][0].finish == "abort"
    eng.add_request("gone", ps[0], params)
    eng.step()
    assert eng.abort_request("gone") and not eng.has_unfinished() and eng.metrics().pages_used == 0
    eng.add_request("one by one", ps[0], params)
    eng.step()  # admitted, its prefill under way
    for index in (0, 2, 1):
        assert eng.abort_request("one by one", index)
    assert not eng.has_unfinished() and eng.metrics().pages_used == 0 and eng.metrics().running == 0
