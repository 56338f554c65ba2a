"""`rlkv.generate`: the engine and transformers `generate` give the same completions on a tiny model."""

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

import rlkv
from rlkv.generation import generator

PROMPTS = ["hello there, how", "a", "1+1=", "the quick brown fox jumps"]  # left-padded in batches of 3


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", layers=2), tiny_tokenizer()


def methods(model):
    layout = rlkv.Layout.of(model)
    return {
        "none": None,
        "full": rlkv.methods.build("full", layout, 0.0),
        "split": rlkv.methods.build("random", layout, 0.5, sink=2, recent=4),
        "h2o": rlkv.methods.build("h2o", layout, 0.0, budget=12),
    }


def both(lm, method, **kw):
    """The completions of PROMPTS through transformers generate and through the engine."""
    args = dict(max_new_tokens=20, batch_size=3, **kw)
    return [rlkv.generate(*lm, PROMPTS, method, engine=engine, **args) for engine in ("off", "on")]


def same(hf, eng):
    assert [(c.prompt_tokens, c.tokens, c.text, c.finish) for c in hf] == [
        (c.prompt_tokens, c.tokens, c.text, c.finish) for c in eng
    ]
    for a, b in zip(hf, eng):
        assert len(a.logprobs) == len(a.tokens) and a.kv_bytes_full == b.kv_bytes_full
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)
        assert all(lp <= 0 for lp in a.logprobs)


@pytest.mark.parametrize("name", ["none", "full", "split", "h2o"])
def test_both_backends_give_the_same_greedy_completions(lm, name):
    method = methods(lm[0])[name]
    hf, eng = both(lm, method)
    same(hf, eng)
    assert {c.finish for c in hf} == {"length"} and len({len(c.tokens) for c in hf}) == 1
    for a, b in zip(hf, eng):
        if name in ("none", "full"):
            assert a.kv_bytes == a.kv_bytes_full == b.kv_bytes
        elif name == "split":  # the same heads and ring; the engine keeps no ring positions per token
            assert b.kv_bytes <= a.kv_bytes < a.kv_bytes_full
        else:
            assert a.kv_bytes == b.kv_bytes < a.kv_bytes_full  # 12 tokens of at least 20


def test_both_backends_stop_alike(lm):
    """Stop strings (text cut before them), EOS ids (kept as the last token) and the repetition stop."""
    model = lm[0]
    free = rlkv.generate(*lm, PROMPTS, max_new_tokens=20, engine="off")
    stop = free[0].text[4:7]  # a string the first prompt writes, after a few tokens
    hf, eng = both(lm, None, stop=[stop, "never written"])
    same(hf, eng)
    assert hf[0].finish == "stop" and hf[0].text == free[0].text[: free[0].text.find(stop)]
    eos = free[1].tokens[5]
    hf, eng = both(lm, None, eos_token_ids=[eos])
    same(hf, eng)
    assert hf[1].finish == "eos" and hf[1].tokens[-1] == eos and len(hf[1].tokens) <= 6
    same(*both(lm, methods(model)["split"], eos_token_ids=[eos], stop=[stop]))
    hf, eng = both(lm, None, repetition_window=4, repetition_min_distinct=4)
    same(hf, eng)
    assert "repetition" in {c.finish for c in hf}
    assert all(len(c.tokens) % 4 == 0 for c in hf if c.finish == "repetition")


def test_a_list_of_token_ids_and_on_complete(lm):
    model, tok = lm
    ids = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS]
    seen = {}
    outs = rlkv.generate(
        model, tok, ids, max_new_tokens=6, engine="off", batch_size=3, on_complete=lambda i, c: seen.setdefault(i, c)
    )
    assert sorted(seen) == [0, 1, 2, 3] and [seen[i] for i in range(4)] == outs
    assert [c.tokens for c in outs] == [
        c.tokens for c in rlkv.generate(model, tok, PROMPTS, max_new_tokens=6, engine="off")
    ]


def test_sampling_on_the_transformers_path_is_seeded(lm):
    def draw(seed):
        outs = rlkv.generate(*lm, PROMPTS, max_new_tokens=8, temperature=1.0, top_k=5, seed=seed, engine="off")
        return [c.tokens for c in outs]

    assert draw(3) == draw(3) != draw(4)


def test_bad_calls_say_what_was_expected(lm):
    model, tok = lm
    engine = rlkv.Engine(model, tok, methods(model)["full"])
    assert generator(model, tok, engine.method, engine=engine) is engine
    with pytest.raises(ValueError, match="an Engine runs the method it was built with"):
        rlkv.generate(model, tok, PROMPTS, methods(model)["split"], engine=engine)
    with pytest.raises(ValueError, match="engine must be 'auto', 'on', 'off' or an rlkv.Engine, got 3"):
        rlkv.generate(model, tok, PROMPTS, engine=3)
    with pytest.raises(ValueError, match="engine must be 'auto', 'on' or 'off', got 'gpu'"):
        rlkv.generate(model, tok, PROMPTS, engine="gpu")
    for engine in ("off", "on"):
        with pytest.raises(ValueError, match="got 2 seeds for 4 prompts"):
            rlkv.generate(model, tok, PROMPTS, seed=[1, 2], engine=engine)
        with pytest.raises(ValueError, match="prompt 1 is empty"):
            rlkv.generate(model, tok, ["a", ""], engine=engine)
        with pytest.raises(ValueError, match="prompts must be a non-empty list"):
            rlkv.generate(model, tok, "a", engine=engine)
        with pytest.raises(
            ValueError, match=r"top_k must be an integer in \[0, 9223372036854775807\] \(0 = off.*\), got -1"
        ):
            rlkv.generate(model, tok, PROMPTS, top_k=-1, engine=engine)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        rlkv.generate(model, tok, PROMPTS, batch_size=0, engine="off")
