"""The engine's online API: requests added while it runs, aborted, sampled per request, preempted for memory;
each request's tokens equal the same request run alone."""

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from test_engine import RECENT, SINK, engine, prompts

import rlkv
from rlkv import RequestError, SamplingParams
from rlkv.methods.headsplit import HeadSplit

NEW = 12


def run_alone(model, method, prompt, params, **kw):
    eng = engine(model, method, **kw)
    eng.add_request("alone", prompt, params)
    return drain(eng)["alone"]


def drain(eng, limit=500, steps=None, streamed=None):
    """Step until idle (bounded; or `steps` steps); {request id: completion}, checking that each request's
    increments add up to its completion's tokens."""
    streamed, done = {} if streamed is None else streamed, {}
    for _ in range(steps or limit):
        if not eng.has_unfinished():
            break
        for out in eng.step():
            streamed.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                done[out.request_id] = out.completion
    if steps:
        return done
    assert not eng.has_unfinished()
    assert all(streamed[i] == c.tokens for i, c in done.items())  # the increments are the completion's tokens
    return done


def half(model, seed=1, prefill="compressed"):
    keep = rlkv.HeadScores.random(rlkv.Layout.of(model), seed=seed).keep_mask(0.5)
    return HeadSplit(keep, SINK, RECENT, prefill=prefill)


def test_requests_added_while_it_runs_equal_each_alone():
    model = tiny_model("qwen2")
    method = half(model)
    ps, _, _ = prompts()
    params = [
        SamplingParams(max_tokens=NEW, ignore_eos=True),
        SamplingParams(max_tokens=NEW - 3, temperature=1.0, seed=5, ignore_eos=True),
        SamplingParams(max_tokens=NEW, temperature=0.8, top_p=0.7, seed=6, ignore_eos=True),
        SamplingParams(max_tokens=NEW, temperature=1.3, top_k=5, seed=7, ignore_eos=True),
    ]
    eng = engine(model, method, max_batch=4)
    eng.add_request("r0", ps[0], params[0])
    outputs = {}
    for step in range(400):  # the others arrive one by one while r0 decodes
        if step in (2, 4, 5):
            i = (2, 4, 5).index(step) + 1
            eng.add_request(f"r{i}", ps[i], params[i])
        for out in eng.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        if step > 5 and not eng.has_unfinished():
            break
    assert not eng.has_unfinished()
    for i in range(4):
        assert outputs[f"r{i}"] == run_alone(model, method, ps[i], params[i]).tokens
    assert len(outputs["r1"]) == NEW - 3  # its own max_tokens


def test_abort_frees_its_pages_at_once_and_the_others_are_unchanged():
    model = tiny_model("llama")
    ps, _, _ = prompts()
    eng = engine(model, max_batch=4)
    params = SamplingParams(max_tokens=NEW, ignore_eos=True)
    for i, p in enumerate(ps):
        eng.add_request(f"r{i}", p, params)
    streamed = {}
    drain(eng, steps=3, streamed=streamed)
    before = eng.metrics()
    held = len(eng._requests["r3"][0].pages)
    assert before.running == 4 and held > 0
    assert eng.abort_request("r3") and not eng.abort_request("r3") and not eng.abort_request("nope")
    after = eng.metrics()
    assert after.pages_used == before.pages_used - held and after.running == 3
    done = drain(eng, streamed=streamed)
    assert set(done) == {"r0", "r1", "r2", "r3"} and done["r3"].finish == "abort"
    assert [done[f"r{i}"].tokens for i in range(3)] == [run_alone(model, None, p, params).tokens for p in ps[:3]]
    assert eng.metrics().pages_used == 0 and eng.metrics().running == 0


def test_aborting_the_last_request_gives_the_model_back():
    model = tiny_model("qwen2")
    eng = engine(model)
    eng.add_request("a", [3, 4, 5], SamplingParams(max_tokens=50, ignore_eos=True))
    eng.step()
    eng.step()
    assert model.config._attn_implementation != "sdpa"
    eng.abort_request("a")
    assert model.config._attn_implementation == "sdpa" and eng.metrics().pages_used == 0
    assert eng.step() == [] or all(o.request_id == "a" for o in eng.step())


@pytest.mark.parametrize("prefill", ["compressed", "full"])
@pytest.mark.parametrize("kind", ["greedy", "sampled"])
def test_preempted_requests_equal_an_unpreempted_run(arch, kind, prefill):
    """A pool with pages for about one sequence: four run at once, the newest are preempted and prefilled again
    (prompt + their tokens; with a full prefill only the prompt attends fully); every output equals the roomy
    run's, and the pool is never exceeded."""
    model = tiny_model(arch)
    method = half(model, seed=2, prefill=prefill)
    ps, _, _ = prompts()
    temp = 0.0 if kind == "greedy" else 1.0
    params = [SamplingParams(max_tokens=NEW, temperature=temp, seed=11 + i, ignore_eos=True) for i in range(4)]
    roomy = engine(model, method, max_batch=4)
    probe = roomy.store
    tight = probe.slot_bytes * 5 + probe.page_bytes * (probe.pages_for(30 + NEW) + 2)
    squeezed = engine(model, method, kv_budget=tight, max_batch=4, prefill_tokens=16)
    for eng in (roomy, squeezed):
        for i, (p, sp) in enumerate(zip(ps, params)):
            eng.add_request(f"r{i}", p, sp)
    want, got = drain(roomy), drain(squeezed)
    assert squeezed.metrics().preemptions > 0 and roomy.metrics().preemptions == 0
    assert squeezed.store.peak_pages_used <= squeezed.store.capacity_pages
    assert [got[f"r{i}"].tokens for i in range(4)] == [want[f"r{i}"].tokens for i in range(4)]
    torch.testing.assert_close(
        torch.tensor([got[f"r{i}"].logprobs for i in range(4)]),
        torch.tensor([want[f"r{i}"].logprobs for i in range(4)]),
        rtol=1e-4,
        atol=1e-4,
    )
    assert squeezed.metrics().pages_used == 0


def test_token_droppers_serve_online_with_fixed_slots():
    model = tiny_model("qwen2")
    method = rlkv.methods.build("h2o", rlkv.Layout.of(model), 0.5, budget=8)
    ps, _, _ = prompts()
    params = SamplingParams(max_tokens=NEW, ignore_eos=True)
    eng = engine(model, method, max_batch=2)
    for i, p in enumerate(ps):
        eng.add_request(f"r{i}", p, params)
    done = drain(eng)
    assert eng.metrics().preemptions == 0 and eng.metrics().pages_total == 2
    assert [done[f"r{i}"].tokens for i in range(4)] == [run_alone(model, method, p, params).tokens for p in ps]


def test_requests_that_can_never_run_are_refused_with_what_is_wrong():
    model = tiny_model("llama")
    eng = engine(model, kv_budget=64 * 1024, max_seq_len=256)
    ok = SamplingParams(max_tokens=4)
    with pytest.raises(RequestError, match="the prompt is empty"):
        eng.add_request("a", [], ok)
    with pytest.raises(RequestError, match="the prompt has 296 tokens: at most max_seq_len - 1 = 255 fit"):
        eng.add_request("a", [5] * 296, ok)
    with pytest.raises(RequestError, match="pages of 4 tokens but the KV pool holds"):
        eng.add_request("a", [5] * 200, SamplingParams(max_tokens=50))
    with pytest.raises(RequestError, match=r"prompt token 96 is not a token id: expected integers in \[0, 96\)"):
        eng.add_request("a", [5, 96], ok)
    with pytest.raises(RequestError, match=r"top_k must be in \[0, 96\] \(0 = off; 96: the vocabulary\), got 97"):
        eng.add_request("a", [5], SamplingParams(max_tokens=4, temperature=1, top_k=97))
    with pytest.raises(RequestError, match=r"stop token 96 is not a token id: expected integers in \[0, 96\)"):
        eng.add_request("a", [5], SamplingParams(max_tokens=4, stop_token_ids=(3, 96)))
    eng.add_request("a", [5, 6], ok)
    with pytest.raises(RequestError, match="already running"):
        eng.add_request("a", [5, 6], ok)
    assert eng.metrics().waiting == 1


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("max_tokens", 0, r"max_tokens must be >= 1 \(0 only with prompt_logprobs"),
        ("max_tokens", -1, r"max_tokens must be an integer in \[0, 9223372036854775807\]"),
        ("temperature", -0.5, "temperature must be a number >= 0"),
        ("temperature", float("nan"), "temperature must be a number >= 0"),
        ("top_p", 0.0, r"top_p must be a number in \(0, 1\]"),
        ("top_p", 1.5, r"top_p must be a number in \(0, 1\]"),
        ("top_k", -1, r"top_k must be an integer in \[0, 9223372036854775807\]"),
        ("top_k", 10**19, r"top_k must be an integer in \[0, 9223372036854775807\]"),  # issue #33
        ("seed", 1.5, "seed must be an integer"),
        ("seed", 2**63, r"seed must be an integer in \[0, 9223372036854775807\]"),
        ("stop", [""], "stop: stop strings must be non-empty strings"),
        ("stop", ["a"] * 5, "stop: at most 4 stop strings are allowed, got 5"),
        ("stop", ["a" * 4000, "b" * 97], "stop: the stop strings may hold 4096 characters in all, got 4097"),
        ("stop_token_ids", [-3], r"stop_token_ids must be at most 64 token ids \(an integer in \[0, "),
        ("stop_token_ids", [1] * 65, "stop_token_ids must be at most 64 token ids"),
    ],
)
def test_sampling_params_refuse_bad_values(field, value, expected):
    with pytest.raises(ValueError, match=expected):
        SamplingParams(**{field: value})


def test_stop_strings_and_ids_per_request():
    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    ps, _, _ = prompts()
    free = run_alone(model, None, ps[0], SamplingParams(max_tokens=NEW, ignore_eos=True))
    text = tok.decode(free.tokens, skip_special_tokens=True)
    eng = engine(model)
    eng.add_request("s", ps[0], SamplingParams(max_tokens=NEW, ignore_eos=True, stop=(text[3:5],)))
    eng.add_request("i", ps[0], SamplingParams(max_tokens=NEW, ignore_eos=True, stop_token_ids=(free.tokens[4],)))
    done = drain(eng)
    assert done["s"].finish == "stop" and done["s"].text == text[: text.find(text[3:5])]
    assert done["i"].finish == "eos" and done["i"].tokens == free.tokens[: free.tokens.index(free.tokens[4]) + 1]


def test_both_stores_implement_the_store_interface():
    from rlkv.engine.store import Store

    model = tiny_model("qwen2")
    h2o = rlkv.methods.build("h2o", rlkv.Layout.of(model), 0.5, budget=8)
    for method in (None, half(model), h2o):
        store = engine(model, method).store
        assert isinstance(store, Store)
        slot, pages = store.take_slot(), []
        assert store.grow(slot, pages, 9) and len(pages) == store.pages_for(9)
        assert store.free_slots == store.num_slots - 2 and store.free_pages == store.capacity_pages - len(pages)
        store.release(slot, pages)
        assert store.free_slots == store.num_slots - 1 and store.free_pages == store.capacity_pages


def test_async_engine_streams_in_process_equal_each_request_alone():
    """`create_app(Engine)`'s transport (the engine in a thread): concurrent streams, one refused on arrival."""
    import asyncio

    from rlkv.serve import AsyncEngine

    model = tiny_model("qwen2")
    method = half(model)
    ps, _, _ = prompts()
    params = [SamplingParams(max_tokens=NEW, temperature=0.9, seed=i, ignore_eos=True) for i in range(3)]
    alone = [run_alone(model, method, p, sp).tokens for p, sp in zip(ps, params)]
    runner = AsyncEngine(engine(model, method, max_batch=4))
    runner.start()

    async def stream(i: int) -> list[int]:
        tokens = []
        async for out in runner.generate(f"r{i}", ps[i], params[i]):
            tokens += out.new_token_ids
        return tokens

    async def all_at_once():
        return await asyncio.wait_for(asyncio.gather(*(stream(i) for i in range(3))), timeout=60)

    try:
        assert asyncio.run(all_at_once()) == alone
        with pytest.raises(RequestError, match="empty"):
            runner.generate("bad", [], params[0])
        assert runner.metrics().running == 0 and runner.healthy
    finally:
        runner.join(10)
    assert not runner.healthy


def _async_engine_run(runner, requests):
    """Stream `requests` ((id, prompt, params)) at once; each one's tokens, or the error it ended with."""
    import asyncio

    async def stream(request_id, prompt, params):
        tokens = []
        try:
            async for out in runner.generate(request_id, prompt, params):
                tokens += out.new_token_ids
        except Exception as err:
            return err
        return tokens

    async def all_at_once():
        return await asyncio.wait_for(asyncio.gather(*(stream(*r) for r in requests)), timeout=60)

    return asyncio.run(all_at_once())


def test_a_request_the_engine_fails_to_take_fails_alone():
    """An exception that belongs to one request (here: raised adding it) fails that request; the rest go on."""
    from rlkv.serve import AsyncEngine
    from rlkv.serve.async_engine import RequestFailed

    model = tiny_model("qwen2")
    ps, _, _ = prompts()
    params = SamplingParams(max_tokens=NEW, ignore_eos=True)
    eng = engine(model, half(model), max_batch=4)
    add = eng.add_request

    def add_request(request_id, prompt, params):
        if request_id == "bad":
            raise OverflowError("a bug this request alone meets")
        add(request_id, prompt, params)

    eng.add_request = add_request
    runner = AsyncEngine(eng)
    runner.start()
    try:
        good, bad = _async_engine_run(runner, [("good", ps[0], params), ("bad", ps[1], params)])
        assert good == run_alone(model, half(model), ps[0], params).tokens
        assert isinstance(bad, RequestFailed) and "a bug this request alone meets" in str(bad)
        assert runner.healthy and runner.metrics().running == 0
    finally:
        runner.join(10)


def test_a_failing_step_ends_every_stream_and_reports_the_engine_failed_for_good():
    """An Engine given in Python cannot be rebuilt: its streams end with EngineStopped and `on_fatal` runs
    (`rlkv serve --engine-thread` then exits non-zero)."""
    from rlkv.serve import AsyncEngine, EngineStopped

    model = tiny_model("qwen2")
    ps, _, _ = prompts()
    eng = engine(model, half(model), max_batch=4)
    step, calls = eng.step, []

    def step_then_fail():
        if len(calls) == 3:
            raise RuntimeError("a device failure")
        calls.append(1)
        return step()

    eng.step = step_then_fail
    runner = AsyncEngine(eng)
    fatal = []
    runner.on_fatal = lambda: fatal.append(True)
    runner.start()
    try:
        params = SamplingParams(max_tokens=50, ignore_eos=True)
        ends = _async_engine_run(runner, [(f"r{i}", ps[i], params) for i in range(3)])
        assert all(isinstance(e, EngineStopped) and "a device failure" in str(e) for e in ends), ends
        assert fatal == [True] and not runner.healthy and "a device failure" in str(runner.status())
        with pytest.raises(EngineStopped):
            runner.generate("later", ps[0], params)
    finally:
        runner.join(10)
