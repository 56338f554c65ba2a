"""The OpenAI API surface of issue #35 through the official `openai` client on real `rlkv serve` processes: log-probs
(against a transformers forward), n samples and batch prompts (against requests of each seed alone), reasoning
content, vLLM's extensions, and the request shapes of the load clients people point at vLLM (guidellm, `vllm
bench serve`, aiperf), replayed as those tools send them.

Two servers of a tiny model whose tokenizer has <think> and </think> tokens: `plain`, and `thinking` with
--reasoning-parser deepseek-r1."""

import asyncio
import json

import httpx
import pytest
import torch
from conftest import saved_tiny_model, thinking_tokenizer, tiny_model
from test_serve import NAME, Server, running

PROMPTS = ["the quick brown fox", "hello there, general", "a b c d e f g"]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    model_dir = saved_tiny_model(tmp_path_factory.mktemp("tiny-api"), "llama", thinking_tokenizer())
    logs = tmp_path_factory.mktemp("logs")
    common = ["--kv-budget", "1536KiB", "--max-model-len", "1024", "--max-batch", "16"]
    started = (
        Server(model_dir, logs / "plain.log", *common),
        Server(model_dir, logs / "thinking.log", *common, "--reasoning-parser", "deepseek-r1"),
    )
    with running(*started) as ready:
        yield ready


@pytest.fixture(scope="module")
def plain(servers):
    return servers[0]


@pytest.fixture(scope="module")
def thinking(servers):
    return servers[1]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def forward_logprobs(model, tokens):
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float()
    return torch.log_softmax(logits, -1)


def chat_ids(messages):
    tok = thinking_tokenizer()
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


# ---------------------------------------------------------------------- log-probs
def test_echo_scores_the_prompt_like_a_forward(plain, model):
    """lm-evaluation-harness's loglikelihood request: echo, logprobs 1, max_tokens 0 (and 1), token-id prompts."""
    tok = thinking_tokenizer()
    ids = [tok(p).input_ids for p in PROMPTS[:2]]
    out = plain.client.completions.create(model=NAME, prompt=ids, echo=True, logprobs=3, max_tokens=0, temperature=0)
    assert [c.index for c in out.choices] == [0, 1] and out.usage.completion_tokens == 0
    assert out.usage.prompt_tokens == sum(map(len, ids))
    for choice, prompt in zip(out.choices, ids):
        lp = choice.logprobs
        ref = forward_logprobs(model, prompt)
        want = ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and choice.finish_reason == "length"
        torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:]), want, rtol=1e-4, atol=1e-4)
        assert lp.tokens == [tok.decode([t]) for t in prompt] and choice.text == tok.decode(prompt)
        assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(prompt))]
        best = ref[:-1].topk(3, dim=-1)
        rows = zip(lp.top_logprobs[1:], best.indices.tolist(), best.values.tolist(), want.tolist(), lp.tokens[1:])
        for top, ids_, values, wanted, token in rows:
            expected = {tok.decode([t]): v for t, v in zip(ids_, values)}
            assert top.keys() == expected.keys() | {token}
            assert all(abs(top[k] - v) < 1e-4 for k, v in expected.items()) and abs(top[token] - wanted) < 1e-4
    one = plain.client.completions.create(model=NAME, prompt=ids[0], echo=True, logprobs=1, max_tokens=1, temperature=0)
    lp = one.choices[0].logprobs
    assert (
        len(lp.token_logprobs) == len(ids[0]) + 1 and lp.token_logprobs[:-1] == out.choices[0].logprobs.token_logprobs
    )
    assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())  # greedy: the token is the top one


def test_generated_logprobs_equal_a_forward_and_stream_alike(plain, model):
    tok = thinking_tokenizer()
    prompt = tok(PROMPTS[0]).input_ids
    kwargs = dict(model=NAME, prompt=prompt, max_tokens=8, temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    whole = plain.client.completions.create(**kwargs).choices[0]
    assert len(whole.logprobs.tokens) == 8 and whole.logprobs.token_logprobs[0] is not None
    chunks = [c for c in plain.client.completions.create(**kwargs, stream=True) if c.choices]
    streamed = [x for c in chunks if c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert streamed == whole.logprobs.token_logprobs and "".join(c.choices[0].text for c in chunks) == whole.text
    messages = [{"role": "user", "content": PROMPTS[1]}]
    chat = plain.client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=4
    )
    content = chat.choices[0].logprobs.content
    ids = chat_ids(messages)
    tokens = [max(top := {t.token: t.logprob for t in e.top_logprobs}, key=top.get) for e in content]
    assert [e.token for e in content] == tokens  # greedy: each token is its position's best
    assert all(len(e.top_logprobs) == 4 and e.bytes == list(e.token.encode()) for e in content)
    generated = tok.encode("".join(tokens), add_special_tokens=False)  # one character per token
    ref = forward_logprobs(model, ids + generated)[len(ids) - 1 : -1]
    want = ref[torch.arange(len(generated)), torch.tensor(generated)]
    torch.testing.assert_close(torch.tensor([e.logprob for e in content]), want, rtol=1e-4, atol=1e-4)
    stream = plain.client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=4, stream=True
    )
    entries = [e for c in stream for e in ((c.choices[0].logprobs.content or []) if c.choices[0].logprobs else [])]
    assert [(e.token, e.logprob) for e in entries] == [(e.token, e.logprob) for e in content]


# ---------------------------------------------------------------------- n samples, batch prompts
def test_n_samples_of_a_batch_equal_each_seed_alone(plain):
    """prompt [p0, p1] x n = 3: choice 3p + i is sample i of prompt p and equals prompt p with seed + i alone."""
    common = dict(model=NAME, max_tokens=10, temperature=1.0, extra_body={"ignore_eos": True})
    out = plain.client.completions.create(prompt=PROMPTS[:2], n=3, seed=11, **common)
    assert [c.index for c in out.choices] == list(range(6)) and out.usage.completion_tokens == 60
    alone = [
        plain.client.completions.create(prompt=PROMPTS[p], seed=11 + i, **common).choices[0].text
        for p in range(2)
        for i in range(3)
    ]
    assert [c.text for c in out.choices] == alone
    stream = plain.client.completions.create(prompt=PROMPTS[:2], n=3, seed=11, stream=True, **common)
    texts = [""] * 6
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == alone
    chat = dict(model=NAME, messages=[{"role": "user", "content": PROMPTS[2]}], max_tokens=6, temperature=1.0)
    both = plain.client.chat.completions.create(n=2, seed=3, **chat)
    assert [c.message.content for c in both.choices] == [
        plain.client.chat.completions.create(seed=3 + i, **chat).choices[0].message.content for i in range(2)
    ]


# ---------------------------------------------------------------------- reasoning content
def test_reasoning_content_splits_at_think(thinking, plain):
    """A sampled answer that writes </think>: before it is reasoning_content, after it content, streamed alike;
    usage counts the tokens up to </think> as reasoning tokens. The raw text is the same request's through
    /v1/completions on the chat prompt's ids (no parser there)."""
    messages = [{"role": "user", "content": "think about it"}]
    ids = chat_ids(messages)
    common = dict(max_tokens=160, temperature=1.5, extra_body={"ignore_eos": True, "skip_special_tokens": False})
    for seed in range(20):
        raw = plain.client.completions.create(model=NAME, prompt=ids, seed=seed, logprobs=0, **common).choices[0]
        if "</think>" in raw.text and raw.text.index("</think>") > 0:
            break
    else:
        raise AssertionError("no seed in 20 wrote </think>")
    reasoning, content = raw.text.split("</think>", 1)
    reasoning = reasoning.lstrip().removeprefix("<think>")
    answer = thinking.client.chat.completions.create(model=NAME, messages=messages, seed=seed, **common)
    message = answer.choices[0].message
    assert (message.reasoning_content, message.content or "") == (reasoning, content)
    assert answer.usage.completion_tokens_details.reasoning_tokens == raw.logprobs.tokens.index("</think>") + 1
    stream = thinking.client.chat.completions.create(
        model=NAME, messages=messages, seed=seed, stream=True, stream_options={"include_usage": True}, **common
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == reasoning
    assert "".join(d.content or "" for d in deltas) == content
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == raw.logprobs.tokens.index("</think>") + 1
    plain_answer = plain.client.chat.completions.create(model=NAME, messages=messages, seed=seed, **common)
    assert plain_answer.choices[0].message.content == raw.text  # no parser: the text as it came


# ---------------------------------------------------------------------- vLLM's extensions
def test_vllm_extensions_are_honoured(plain):
    tok = thinking_tokenizer()
    prompt = [tok.bos_token_id] + tok(PROMPTS[2]).input_ids
    echo = dict(model=NAME, prompt=prompt, echo=True, max_tokens=0, logprobs=0)
    assert plain.client.completions.create(**echo).choices[0].text == tok.decode(prompt, skip_special_tokens=True)
    kept = plain.client.completions.create(**echo, extra_body={"skip_special_tokens": False}).choices[0].text
    assert kept.startswith("<s>") and kept == tok.decode(prompt)
    greedy = dict(model=NAME, prompt=PROMPTS[2], max_tokens=12, temperature=0)
    first = plain.client.completions.create(**greedy, logprobs=0, extra_body={"ignore_eos": True}).choices[0]
    stop_id = tok.convert_tokens_to_ids(first.logprobs.tokens[0])
    stopped = plain.client.completions.create(**greedy, extra_body={"stop_token_ids": [stop_id]}).choices[0]
    assert stopped.text == "" and stopped.finish_reason == "stop"  # the first greedy token is a stop id
    held = plain.client.completions.create(**greedy, extra_body={"stop_token_ids": [stop_id], "min_tokens": 4})
    assert held.usage.completion_tokens >= 4
    plain_text = first.text
    penalized = plain.client.completions.create(**greedy, extra_body={"ignore_eos": True, "repetition_penalty": 3.0})
    assert penalized.choices[0].text != plain_text
    chat = plain.client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "x"}],
        max_completion_tokens=5,
        extra_body={"ignore_eos": True},
    )
    assert chat.usage.completion_tokens == 5
    stream = plain.client.completions.create(
        model=NAME,
        prompt=PROMPTS[0],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"ignore_eos": True},
    )
    usages = [c.usage.completion_tokens for c in stream]
    assert usages == sorted(usages) and usages[-1] == 6 and len(usages) > 2


# ---------------------------------------------------------------------- load clients' request shapes
def load_client_payloads(prompt_ids_len: int = 0):
    """Each tool's requests as it sends them (read from their sources): (path, body)."""
    text = "the quick brown fox jumps"
    usage = {"include_usage": True, "continuous_usage_stats": True}
    return {
        # guidellm 0.8 (backends/openai/request_handlers.py): text and chat completions, fixed output length
        "guidellm-text": (
            "completions",
            {"model": NAME, "stream": True, "stream_options": usage, "max_tokens": 12, "stop": None, "ignore_eos": True,
             "prompt": text},
        ),
        "guidellm-chat": (
            "chat/completions",
            {"model": NAME, "stream": True, "stream_options": usage, "max_completion_tokens": 12, "stop": None,
             "ignore_eos": True, "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]},
        ),
        # vllm bench serve (benchmarks/lib/endpoint_request_func.py): openai and openai-chat, --ignore-eos
        "vllm-openai": (
            "completions",
            {"model": NAME, "prompt": text, "repetition_penalty": 1.0, "max_tokens": 12, "logprobs": None,
             "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True},
        ),
        "vllm-openai-chat": (
            "chat/completions",
            {"model": NAME, "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}],
             "max_completion_tokens": 12, "stream": True, "stream_options": {"include_usage": True},
             "ignore_eos": True},
        ),
        # aiperf (endpoints/openai_chat.py) with --extra-inputs ignore_eos:true min_tokens:12 and --per-chunk-usage
        "aiperf-chat": (
            "chat/completions",
            {"messages": [{"role": "user", "content": text}], "model": NAME, "stream": True,
             "max_completion_tokens": 12, "ignore_eos": True, "min_tokens": 12, "stream_options": usage},
        ),
    }  # fmt: skip


async def _replay(url: str, path: str, body: dict) -> tuple[int, list[dict]]:
    async with httpx.AsyncClient(timeout=60) as client:
        async with client.stream("POST", f"{url}/v1/{path}", json=body) as answer:
            lines = [line async for line in answer.aiter_lines() if line.startswith("data: ")]
            return answer.status_code, lines


@pytest.mark.parametrize("tool", list(load_client_payloads()))
def test_load_clients_request_shapes_stream_to_the_end(plain, tool):
    path, body = load_client_payloads()[tool]
    status, lines = asyncio.run(_replay(plain.url, path, body))
    assert status == 200 and lines[-1] == "data: [DONE]", lines[-3:]
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 12
    if body["stream_options"].get("continuous_usage_stats"):
        assert all("usage" in e for e in events)
    texts = [c.get("text") or c.get("delta", {}).get("content") or "" for e in events for c in e["choices"]]
    assert "".join(texts) and "error" not in lines[-2]
