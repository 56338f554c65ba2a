"""The engine's log-probs and logits processors against a plain reference: a transformers forward's log-softmax on
the same tokens (inside `compress` for a compressed cache), and transformers `generate` with its own processors."""

import pytest
import torch
from conftest import SMOLLM2, tiny_model
from test_engine import RECENT, SINK, engine, prompts
from transformers import LogitsProcessor, LogitsProcessorList

import rlkv
from rlkv import SamplingParams
from rlkv.methods.headsplit import HeadSplit

NEW = 10
TOP = 5


def run(eng, requests):
    """Step until idle; {request id: [completion of each sample]}, with every output's log-probs checked to add up
    to its completion's."""
    for rid, prompt, params in requests:
        eng.add_request(rid, prompt, params)
    streamed, done = {}, {}
    for _ in range(500):
        if not eng.has_unfinished():
            break
        for out in eng.step():
            key = out.request_id, out.index
            seen = streamed.setdefault(key, [[], None])
            seen[0] += out.logprobs.values
            seen[1] = out.prompt_logprobs if seen[1] is None else seen[1]
            if out.prompt_logprobs is not None:
                assert not seen[0] or len(seen[0]) == len(out.logprobs)  # the prompt's come with the first output
            if out.finished:
                done.setdefault(out.request_id, {})[out.index] = out.completion
    assert not eng.has_unfinished()
    for (rid, index), (values, prompt) in streamed.items():
        completion = done[rid][index]
        assert values == completion.logprobs and prompt == completion.prompt_logprobs
    return {rid: [samples[i] for i in sorted(samples)] for rid, samples in done.items()}


def forward_logprobs(model, tokens):
    """log-softmax [T, V] of a transformers forward over `tokens` (one sequence)."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens], device=model.device)).logits[0].float()
    return torch.log_softmax(logits, -1)


def check_against_forward(model, completion, prompt, k, tolerance=1e-4):
    """Every prompt and generated token's log-prob and top-k equal the forward's (the position before it)."""
    tokens = prompt + completion.tokens
    ref = forward_logprobs(model, tokens)
    want = ref[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])]
    got = completion.prompt_logprobs.values[1:] + completion.logprobs
    assert completion.prompt_logprobs.values[0] is None and len(got) == len(tokens) - 1
    torch.testing.assert_close(torch.tensor(got), want.cpu(), rtol=tolerance, atol=tolerance)
    tops = completion.prompt_logprobs.top[1:] + completion.top_logprobs
    values, ids = ref[:-1].topk(k, dim=-1)
    assert [[i for i, _ in top] for top in tops] == ids.tolist()
    got_values = torch.tensor([[v for _, v in top] for top in tops])
    torch.testing.assert_close(got_values, values.cpu(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_prompt_and_token_logprobs_equal_a_forward_log_softmax(sparsity):
    """Greedy requests asking for their prompt's and their tokens' log-probs with the top 5: each equals the
    log-softmax of one forward over prompt + tokens (inside `compress`, whose compressed prefill applies the
    heads' rule to every token, as the engine does); the prompts span several prefill chunks."""
    model = tiny_model("llama")
    keep = rlkv.HeadScores.random(rlkv.Layout.of(model), seed=1).keep_mask(sparsity)
    method = HeadSplit(keep, SINK, RECENT, prefill="compressed")
    ps, _, _ = prompts()
    params = SamplingParams(max_tokens=NEW, ignore_eos=True, top_logprobs=TOP, prompt_logprobs=TOP)
    done = run(engine(model, method, max_batch=4), [(f"r{i}", p, params) for i, p in enumerate(ps)])
    with rlkv.compress(model, keep, sink=SINK, recent=RECENT, prefill="compressed"):
        for i, p in enumerate(ps):
            check_against_forward(model, done[f"r{i}"][0], p, TOP)


@pytest.mark.real_model
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_smollm2_logprobs_equal_a_forward_log_softmax(sparsity):
    """The same on SmolLM2-135M with its shipped heads (a small sink and window, so the compressed heads' rule
    applies within the prompt)."""
    if not SMOLLM2.is_file():
        pytest.skip(f"real weights absent: run ../shared/tools/get-model smollm2-135m-instruct (expected {SMOLLM2})")
    model, tok = rlkv.load_model(SMOLLM2, device="cpu")
    keep = rlkv.HeadScores.load("duo:smollm2-135m-instruct").keep_mask(sparsity)
    method = HeadSplit(keep, 4, 8, prefill="compressed")
    text = tok.apply_chat_template([{"role": "user", "content": "What is 12 times 7?"}], tokenize=False)
    prompt = tok(text, add_special_tokens=False).input_ids
    params = SamplingParams(max_tokens=8, top_logprobs=TOP, prompt_logprobs=TOP)
    eng = rlkv.Engine(model, tok, method, kv_budget="64MiB", max_batch=2)
    done = run(eng, [("r", prompt, params)])["r"][0]
    with rlkv.compress(model, keep, sink=4, recent=8, prefill="compressed"):
        check_against_forward(model, done, prompt, TOP, tolerance=1e-3)


def test_top_logprobs_and_prompt_logprobs_leave_the_tokens_alone():
    """Asking for log-probs takes the processed path; the tokens sampled there equal the fast path's."""
    model = tiny_model("qwen2")
    ps, _, _ = prompts()
    plain = [SamplingParams(max_tokens=NEW, temperature=t, top_p=0.9, seed=3, ignore_eos=True) for t in (0, 1.1)]
    asked = [SamplingParams(**{**vars(p), "top_logprobs": 3, "prompt_logprobs": 0}) for p in plain]
    for a, b in zip(plain, asked):
        want = run(engine(model), [(f"r{i}", p, a) for i, p in enumerate(ps)])
        got = run(engine(model), [(f"r{i}", p, b) for i, p in enumerate(ps)])
        assert [got[k][0].tokens for k in want] == [want[k][0].tokens for k in want]
        torch.testing.assert_close(
            torch.tensor([got[k][0].logprobs for k in want]), torch.tensor([want[k][0].logprobs for k in want])
        )
        assert all(len(got[k][0].top_logprobs) == NEW and got[k][0].prompt_logprobs.top is None for k in want)


def test_max_tokens_0_scores_the_prompt_alone():
    model = tiny_model("llama")
    ps, _, _ = prompts()
    params = SamplingParams(max_tokens=0, prompt_logprobs=2)
    eng = engine(model)
    done = run(eng, [(f"r{i}", p, params) for i, p in enumerate(ps)])
    for i, p in enumerate(ps):
        c = done[f"r{i}"][0]
        assert c.tokens == [] and c.finish == "length" and len(c.prompt_logprobs) == len(p)
        ref = forward_logprobs(model, p)
        want = ref[torch.arange(len(p) - 1), torch.tensor(p[1:])]
        torch.testing.assert_close(torch.tensor(c.prompt_logprobs.values[1:]), want.cpu(), rtol=1e-4, atol=1e-4)
    assert eng.metrics().pages_used == 0 and eng.metrics().generated_tokens == 0


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's frequency and presence penalties over the generated tokens (transformers has none)."""

    def __init__(self, prompt_length: int, frequency: float, presence: float):
        self.start, self.frequency, self.presence = prompt_length, frequency, presence

    def __call__(self, input_ids, scores):
        counts = torch.zeros_like(scores).scatter_add_(
            1, input_ids[:, self.start :], torch.ones_like(input_ids[:, self.start :], dtype=scores.dtype)
        )
        return scores - self.frequency * counts - self.presence * (counts > 0)


@pytest.mark.parametrize(
    "asked, hf",
    [
        ({"repetition_penalty": 1.6}, {"repetition_penalty": 1.6}),
        ({"repetition_penalty": 0.7}, {"repetition_penalty": 0.7}),
        ({"min_tokens": 12, "stop_token_ids": (7, 9)}, {"min_new_tokens": 12}),
        ({"frequency_penalty": 1.5, "presence_penalty": 0.5}, "openai"),
    ],
)
def test_penalties_and_min_tokens_equal_transformers_generate(asked, hf):
    """Greedy with each processor equals transformers `generate` with its own (EOS and the stop ids as its
    eos_token_id, so min_new_tokens keeps the same ids out); the tokens fed by a decode step still on the device
    count (the pipelined engine knows them one step late on the host)."""
    model = tiny_model("llama")
    ps, _, _ = prompts()
    params = SamplingParams(max_tokens=16, **asked)
    eos = sorted({2, *params.stop_token_ids})
    done = run(engine(model, max_batch=4), [(f"r{i}", p, params) for i, p in enumerate(ps)])
    for i, p in enumerate(ps):
        ids = torch.tensor([p], device=model.device)
        if hf == "openai":
            extra = {"logits_processor": LogitsProcessorList([OpenAIPenalties(len(p), 1.5, 0.5)])}
        else:
            extra = hf
        out = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=0, **extra)
        want = out[0, len(p) :].tolist()
        if want[-1] in eos:
            want = want[: want.index(want[-1]) + 1]
        assert done[f"r{i}"][0].tokens == want, (i, asked)
    if "min_tokens" in asked:
        assert all(len(done[f"r{i}"][0].tokens) >= 12 for i in range(len(ps)))


def test_compiled_engine_with_logprobs_and_penalties_equals_the_eager_engine(monkeypatch):
    """compile=True: batches asking for top log-probs, penalties or min_tokens run the compiled step in "logits"
    mode (its forward compiled, `rlkv.engine.logits` on the rows left once the padding row is sliced off, the
    newest token still on the device counted); tokens and log-probs equal the eager engine's, down to the last
    request decoding alone (one row padded to the compiled step's two)."""
    monkeypatch.setattr(rlkv.engine.compiled, "BACKEND", "aot_eager")  # the same graphs, no code generation
    torch._dynamo.reset()
    model = tiny_model("llama")
    keep = rlkv.HeadScores.random(rlkv.Layout.of(model), seed=1).keep_mask(0.5)
    ps, _, _ = prompts()
    asked = [
        SamplingParams(max_tokens=NEW, top_logprobs=3, prompt_logprobs=2),
        SamplingParams(max_tokens=NEW, temperature=1.1, top_p=0.9, seed=3, repetition_penalty=1.6),
        SamplingParams(
            max_tokens=NEW + 2,
            n=2,
            temperature=0.8,
            top_k=20,
            seed=5,
            frequency_penalty=1.5,
            presence_penalty=0.5,
            top_logprobs=1,
        ),
        SamplingParams(max_tokens=NEW + 6, min_tokens=NEW + 6, stop_token_ids=(7, 9)),
    ]
    requests = [(f"r{i}", p, params) for i, (p, params) in enumerate(zip(ps, asked))]
    runs = []
    for compile in (True, False):
        eng = engine(model, HeadSplit(keep, SINK, RECENT), max_batch=4, compile=compile)
        runs.append(run(eng, requests))
        assert eng.runner.min_rows == (2 if compile else 1)
    torch._dynamo.reset()
    compiled, eager = runs
    assert compiled.keys() == eager.keys() and len(compiled["r2"]) == 2
    for got, want in ((g, w) for rid in eager for g, w in zip(compiled[rid], eager[rid])):
        assert got.tokens == want.tokens
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs))
        assert (got.top_logprobs is None) == (want.top_logprobs is None)
        if want.top_logprobs is not None:
            assert [[i for i, _ in t] for t in got.top_logprobs] == [[i for i, _ in t] for t in want.top_logprobs]
        assert got.prompt_logprobs == want.prompt_logprobs  # the prefill is not compiled
    assert len(compiled["r3"][0].tokens) == NEW + 6


def test_logits_mode_selects_top_k_candidates_as_the_sort_would(monkeypatch):
    """Penalties and top log-probs beside a small top-k: the logits mode selects each row's candidates instead of
    sorting the vocabulary, with the same tokens, log-probs and top log-probs as the sort."""
    model = tiny_model("qwen2")
    ps, _, _ = prompts()
    params = SamplingParams(
        max_tokens=NEW, temperature=0.9, top_k=20, top_p=0.8, seed=3, top_logprobs=2, presence_penalty=0.7
    )
    requests = [(f"r{i}", p, params) for i, p in enumerate(ps)]
    selected = run(engine(model, max_batch=4), requests)
    monkeypatch.setattr(rlkv.engine.sampling, "TOP_K_CANDIDATES", 0)  # every batch sorts
    sorted_ = run(engine(model, max_batch=4), requests)
    for rid in sorted_:
        (got,), (want,) = selected[rid], sorted_[rid]
        assert got.tokens == want.tokens and got.top_logprobs == want.top_logprobs
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs))
    assert len({tuple(c.tokens) for (c,) in sorted_.values()}) > 1
