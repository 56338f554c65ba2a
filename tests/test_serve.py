"""`rlkv serve` end to end: the real server process on 127.0.0.1 with a tiny saved model, driven by the
official `openai` client (and httpx for raw bodies and /metrics).

Three servers per module: `server` has room for every request at once; `small` has a KV pool of a few
pages, so concurrent requests must be preempted; `doomed` loses its engine process. References are the
same requests sent alone.
"""

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import saved_tiny_model, tiny_model, tiny_tokenizer

from rlkv.serve.process import ServerProcess

NAME = "tiny"
STARTUP_S = 120
PROMPTS = [f"question {i}: " + "abcdefghij"[: i % 7 + 1] * (1 + i % 3) for i in range(16)]


class Server(ServerProcess):
    """A `python -m rlkv serve` process of the tiny model on a free local port, with an `openai` client."""

    def __init__(self, model_dir, log_path, *args):
        # a tiny model: one thread, no OpenMP threads spinning against the other processes of a small machine
        super().__init__(
            ["--model", str(model_dir), "--served-model-name", NAME, "--log-level", "warning", *args],
            log_path,
            env={"OMP_NUM_THREADS": "1"},
        )
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_tiny_model(tmp_path_factory.mktemp("tiny-serve"), "llama")


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    """Both servers, started together (their start-up overlaps)."""
    logs = tmp_path_factory.mktemp("logs")
    started = [
        Server(
            model_dir, logs / "server.log", "--kv-budget", "1536KiB", "--max-model-len", "4096", "--max-batch", "16"
        ),
        Server(
            model_dir,
            logs / "small.log",
            "--kv-budget",
            "96KiB",
            "--method",
            "random",
            "--sparsity",
            "0.5",
            "--sink",
            "4",
            "--recent",
            "8",
            "--max-batch",
            "4",
        ),
        Server(model_dir, logs / "doomed.log", "--kv-budget", "512KiB"),
    ]
    try:
        for s in started:
            s.wait_ready(STARTUP_S)
        yield started
    finally:
        for s in started:
            s.close(15)


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def small(servers):
    return servers[1]


def engine_processes(pid: int) -> list[int]:
    """The server's engine process (its spawned child; not multiprocessing's resource tracker)."""
    children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    return [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]:
            return True
        time.sleep(0.1)
    return False


def greedy(server, prompt, max_tokens=12, **extra):
    out = server.client.completions.create(
        model=NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True, **extra}
    )
    return out.choices[0].text


def test_chat_and_completion_answer_like_generate(server):
    tok, model = tiny_tokenizer(), tiny_model("llama")
    messages = [{"role": "user", "content": "hello there"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    reference = model.generate(__import__("torch").tensor([ids]), max_new_tokens=10, do_sample=False)[0, len(ids) :]
    chat = server.client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    assert chat.object == "chat.completion" and chat.model == NAME and chat.id.startswith("chatcmpl-")
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == tok.decode(reference, skip_special_tokens=True)
    assert chat.choices[0].finish_reason == ("stop" if tok.eos_token_id in reference.tolist() else "length")
    usage = chat.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        len(ids),
        len(reference),
        len(ids) + len(reference),
    )
    plain = server.client.completions.create(model=NAME, prompt=ids, max_tokens=10, temperature=0)
    assert plain.object == "text_completion" and plain.choices[0].text == chat.choices[0].message.content
    text = server.client.completions.create(model=NAME, prompt="hello", max_tokens=3, temperature=0)
    assert text.usage.prompt_tokens == len(tok("hello").input_ids) and text.usage.completion_tokens <= 3
    assert [m.id for m in server.client.models.list().data] == [NAME]


def test_streamed_deltas_arrive_early_and_join_to_the_whole_text(server):
    whole = greedy(server, PROMPTS[3], max_tokens=40)
    stream = server.client.completions.create(
        model=NAME,
        prompt=PROMPTS[3],
        max_tokens=40,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    arrivals, texts, finish, usage = [], [], None, None
    for chunk in stream:
        arrivals.append(time.monotonic())
        if chunk.choices:
            texts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert "".join(texts) == whole and finish == "length" and usage.completion_tokens == 40
    assert sum(bool(t) for t in texts) > 1 and arrivals[0] < arrivals[-1]
    messages = [{"role": "user", "content": PROMPTS[5]}]
    chat = server.client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
    )
    chunks = list(
        server.client.chat.completions.create(
            model=NAME, messages=messages, max_tokens=20, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content


def test_a_stop_string_ends_both_answers_before_it(server):
    whole = greedy(server, PROMPTS[1], max_tokens=30)
    stop = whole[10:13]
    cut = whole[: whole.find(stop)]
    plain = server.client.completions.create(
        model=NAME, prompt=PROMPTS[1], max_tokens=30, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    )
    assert plain.choices[0].text == cut and plain.choices[0].finish_reason == "stop"
    chunks = list(
        server.client.completions.create(
            model=NAME,
            prompt=PROMPTS[1],
            max_tokens=30,
            temperature=0,
            stop=stop,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == cut and chunks[-1].choices[0].finish_reason == "stop"


async def _many(url, requests):
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    outs = await asyncio.gather(*(client.completions.create(model=NAME, **r) for r in requests))
    await client.close()
    return [o.choices[0].text for o in outs]


def _requests(n, max_tokens):
    """Greedy and seeded sampled requests of varied prompt lengths."""
    return [
        dict(
            prompt=PROMPTS[i],
            max_tokens=max_tokens,
            temperature=0 if i % 2 else 0.9,
            seed=i,
            extra_body={"ignore_eos": True},
        )
        for i in range(n)
    ]


def test_16_concurrent_requests_answer_as_each_alone(server):
    requests = _requests(16, 16)
    alone = [asyncio.run(_many(server.url, [r]))[0] for r in requests]
    before = server.metrics()["rlkv_finished_requests_total"]
    together = asyncio.run(_many(server.url, requests))
    assert together == alone
    assert server.metrics()["rlkv_finished_requests_total"] - before == 16
    assert server.metrics()["rlkv_preemptions_total"] == 0


def test_a_tiny_pool_preempts_and_still_answers_as_each_alone(small):
    requests = _requests(6, 48)
    alone = [asyncio.run(_many(small.url, [r]))[0] for r in requests]
    assert small.metrics()["rlkv_preemptions_total"] == 0  # one at a time fits
    together = asyncio.run(_many(small.url, requests))
    metrics = small.metrics()
    assert together == alone and metrics["rlkv_preemptions_total"] > 0
    assert metrics["rlkv_kv_pages_used"] == 0 and metrics["rlkv_running_requests"] == 0


def _wait_idle(server, deadline_s=15):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        m = server.metrics()
        if m["rlkv_running_requests"] == 0 and m["rlkv_waiting_requests"] == 0 and m["rlkv_kv_pages_used"] == 0:
            return m
        time.sleep(0.1)
    raise AssertionError(f"the server did not go idle: {m}")


def test_a_disconnected_client_frees_its_pages(server):
    before = _wait_idle(server)["rlkv_generation_tokens_total"]
    stream = server.client.completions.create(
        model=NAME, prompt=PROMPTS[2], max_tokens=1500, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    busy = server.metrics()
    assert busy["rlkv_running_requests"] == 1 and busy["rlkv_kv_pages_used"] > 0
    stream.close()
    idle = _wait_idle(server)
    assert idle["rlkv_generation_tokens_total"] - before < 1500  # aborted, not run to the end
    with pytest.raises(httpx.TimeoutException):  # a whole answer the client stops waiting for
        httpx.post(
            f"{server.url}/v1/completions",
            timeout=0.3,
            json={"prompt": PROMPTS[2], "max_tokens": 1500, "ignore_eos": True},
        )
    assert _wait_idle(server)["rlkv_generation_tokens_total"] - before < 1500


BAD = [
    ("completions", b'{"model": "tiny", "prompt": ', 400, None),
    ("completions", b'["not an object"]', 400, None),
    ("completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("chat/completions", {"messages": "hello"}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "gpt-9"}, 404, "model"),
    ("completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
        400,
        "max_completion_tokens",
    ),
    ("completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("completions", {"prompt": "x" * 4200, "max_tokens": 1}, 400, "prompt"),  # beyond --max-model-len 4096
    ("completions", {"prompt": "x", "max_tokens": 3000}, 400, "prompt"),  # fits the context, not the pool
    ("completions", {"prompt": "x", "n": 2}, 400, "n"),
    ("completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("completions", {"prompt": [1, 100000]}, 400, "prompt"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True}, 400, "logprobs"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": []}, 400, "tools"),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    for path, body, status, param in BAD:
        kwargs = (
            {"content": body, "headers": {"content-type": "application/json"}}
            if isinstance(body, bytes)
            else {"json": body}
        )
        answer = httpx.post(f"{server.url}/v1/{path}", timeout=30, **kwargs)
        assert answer.status_code == status, (body, answer.text)
        error = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
        assert error["param"] == param, (body, error)
        assert "Traceback" not in error["message"] and "\n" not in error["message"]
    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        server.client.completions.create(model=NAME, prompt="x", temperature=-1)
    assert greedy(server, "still here", max_tokens=3)
    assert server.metrics()['rlkv_http_requests_total{endpoint="/v1/completions",status="400"}'] >= 10


def test_a_lost_engine_process_answers_503_and_the_server_keeps_serving(servers):
    doomed = servers[2]
    assert greedy(doomed, PROMPTS[1]) == greedy(servers[0], PROMPTS[1])  # the same engine, another process
    (engine,) = engine_processes(doomed.proc.pid)
    os.kill(engine, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while httpx.get(f"{doomed.url}/health", timeout=5).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(f"{doomed.url}/health", timeout=5).status_code == 503
    with pytest.raises(openai.InternalServerError) as err:
        greedy(doomed, PROMPTS[2])
    assert err.value.status_code == 503 and "engine" in str(err.value)
    assert httpx.get(f"{doomed.url}/v1/models", timeout=5).status_code == 200
    assert doomed.proc.poll() is None


def test_sigint_closes_open_streams_and_exits_cleanly(server):  # the last test: it stops the server
    (engine,) = engine_processes(server.proc.pid)
    stream = server.client.completions.create(
        model=NAME, prompt=PROMPTS[0], max_tokens=1500, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(stream))
    server.proc.send_signal(signal.SIGINT)
    with pytest.raises(openai.APIError, match="shutting down"):
        for _ in stream:
            pass
    assert server.proc.wait(20) is not None
    assert "Traceback" not in server.output()
    assert wait_gone(engine, 10)  # the engine process does not outlive the server
