"""`rlkv serve` end to end: the real server process on 127.0.0.1 with a tiny saved model, driven by the
official `openai` client (and httpx for raw bodies and /metrics).

Three servers per module: `server` has room for every request at once; `small` has a KV pool of a few
pages, so concurrent requests must be preempted, and an API key; `doomed` loses its engine process,
twice. References are the same requests sent alone. The tests named after issue #33 reproduce what a
hostile client did to the server before it bounded its inputs and supervised its engine.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from conftest import saved_tiny_model, tiny_model, tiny_tokenizer

from rlkv.serve.process import ServerProcess

NAME = "tiny"
STARTUP_S = 120
KEY = "sk-test-0123456789"
VOCAB = 96  # the tiny model's
PROMPTS = [f"question {i}: " + "abcdefghij"[: i % 7 + 1] * (1 + i % 3) for i in range(16)]


class Server(ServerProcess):
    """A `python -m rlkv serve` process of the tiny model on a free local port, with an `openai` client."""

    def __init__(self, model_dir, log_path, *args, api_key=None):
        # a tiny model: one thread, no OpenMP threads spinning against the other processes of a small machine
        super().__init__(
            ["--model", str(model_dir), "--served-model-name", NAME, "--log-level", "warning", *args],
            log_path,
            env={"OMP_NUM_THREADS": "1", **({"RLKV_API_KEY": api_key} if api_key else {})},
            api_key=api_key,
        )
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key or "none", max_retries=0, timeout=60)


@contextmanager
def running(*servers: Server):
    """The servers, each ready (started together, their start-ups overlap); closed on leaving."""
    try:
        for s in servers:
            s.wait_ready(STARTUP_S)
        yield servers
    finally:
        for s in servers:
            s.close(15)


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
            "--protect-metrics",
            api_key=KEY,
        ),
        Server(model_dir, logs / "doomed.log", "--kv-budget", "512KiB", "--engine-restarts", "1"),
    ]
    with running(*started) as ready:
        yield ready


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


async def _many(url, requests, api_key="none"):
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=60)
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
    alone = [asyncio.run(_many(small.url, [r], KEY))[0] for r in requests]
    assert small.metrics()["rlkv_preemptions_total"] == 0  # one at a time fits
    together = asyncio.run(_many(small.url, requests, KEY))
    metrics = small.metrics()
    assert together == alone and metrics["rlkv_preemptions_total"] > 0
    assert metrics["rlkv_kv_pages_used"] == 0 and metrics["rlkv_running_requests"] == 0
    assert metrics["rlkv_kv_used_bytes"] == 0 < metrics["rlkv_kv_pool_bytes"]


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
    ("completions", {"prompt": "x", "max_tokens": 4095}, 400, "max_tokens"),  # fits the context, not the pool
    ("completions", {"prompt": "x", "max_tokens": 10**30}, 400, "max_tokens"),
    ("completions", {"prompt": "x", "top_k": 10**19}, 400, "top_k"),  # issue #33: it killed the engine
    ("completions", {"prompt": "x", "top_k": VOCAB + 1}, 400, "top_k"),
    ("completions", {"prompt": "x", "seed": -1}, 400, "seed"),
    ("completions", {"prompt": "x", "seed": 2**63}, 400, "seed"),
    ("completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),  # OpenAI's limit: 4
    ("completions", {"prompt": "x", "stop": [str(i) for i in range(2000)]}, 400, "stop"),  # issue #33
    ("completions", {"prompt": "x", "stop": ["a" * 4000, "b" * 97]}, 400, "stop"),  # 4,096 characters in all
    ("completions", {"prompt": "x", "stop_token_ids": [VOCAB]}, 400, "stop_token_ids"),
    ("completions", {"prompt": "x", "stop_token_ids": list(range(65))}, 400, "stop_token_ids"),
    ("completions", {"prompt": [1, 10**30]}, 400, "prompt"),
    ("completions", b'{"prompt": "x", "temperature": 1e400}', 400, "temperature"),
    ("completions", b'{"prompt": "x", "top_p": NaN}', 400, "top_p"),
    ("completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("completions", {"prompt": "x", "n": 17}, 400, "n"),  # more samples than --max-batch 16 runs at once
    ("completions", {"prompt": ["a", ""]}, 400, "prompt"),
    ("completions", {"prompt": ["a"] * 257}, 400, "prompt"),
    ("completions", {"prompt": ["a", "x" * 4200], "max_tokens": 1}, 400, "prompt"),
    ("completions", {"prompt": [1, 100000]}, 400, "prompt"),
    ("completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("completions", {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("completions", {"prompt": "x", "best_of": 2}, 400, "best_of"),
    ("completions", {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("completions", {"prompt": "x", "frequency_penalty": 2.5}, 400, "frequency_penalty"),
    ("completions", {"prompt": "x", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens"),
    ("completions", {"prompt": "x", "stream_options": {"per_chunk": True}}, 400, "stream_options.per_chunk"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
        400,
        "top_logprobs",
    ),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
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


def test_issue_33_a_top_k_beyond_the_vocabulary_is_refused_and_a_stream_beside_it_goes_on(server):
    """Before: top_k=10**19 failed inside the engine, ended the stream beside it, and every later request and
    /health answered 503 while the process stayed up."""
    stream = server.client.completions.create(
        model=NAME, prompt=PROMPTS[0], max_tokens=64, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = iter(stream)
    next(chunks)
    for top_k, allowed in ((10**19, "less than or equal to 9223372036854775807"), (VOCAB + 1, f"[0, {VOCAB}]")):
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "top_k": top_k}
        answer = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "top_k", answer.text
        assert allowed in answer.json()["error"]["message"]
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
    whole = server.client.completions.create(
        model=NAME, prompt="x", max_tokens=3, temperature=0.9, top_p=0.9, extra_body={"top_k": VOCAB}
    )
    assert whole.choices[0].finish_reason in ("stop", "length")


def test_issue_33_a_20_mb_body_is_refused_before_it_is_read(server):
    """Before: a 20 MB chat body was parsed and tokenized on the event loop, answered 400 after 16 s."""
    body = b'{"messages": [{"role": "user", "content": "' + b"x" * 20_000_000 + b'"}]}'
    for content in (body, iter([body[i : i + (1 << 20)] for i in range(0, len(body), 1 << 20)])):  # sized, chunked
        start = time.monotonic()
        answer = httpx.post(
            f"{server.url}/v1/chat/completions",
            content=content,
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert answer.status_code == 413 and answer.json()["error"]["code"] == "request_too_large", answer.text
        assert "1048576 bytes" in answer.json()["error"]["message"] and time.monotonic() - start < 5
    assert greedy(server, "still here", max_tokens=3)


HEALTH_PROBE = """
import httpx, json, sys, time
url, seconds = sys.argv[1], float(sys.argv[2])
latencies = []
with httpx.Client(timeout=10) as client:
    client.get(url + "/health")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        status = client.get(url + "/health").status_code
        latencies.append(time.perf_counter() - start if status == 200 else 1e9)
        time.sleep(0.01)
print(json.dumps(latencies))
"""


async def _hostile_load(url, streams, bodies):
    """`streams` streams with four stop strings of 1,024 characters each and `bodies` chat bodies of 20 MB, at once."""
    stops = ["ab" * 511 + "c" + end for end in "wxyz"]
    huge = b'{"messages": [{"role": "user", "content": "' + b"x" * 20_000_000 + b'"}]}'
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=None)) as client:

        async def stream(i):
            body = {"prompt": PROMPTS[i % 16], "max_tokens": 8, "stream": True, "stop": stops, "ignore_eos": True}
            async with client.stream("POST", f"{url}/v1/completions", json=body) as answer:
                return answer.status_code, [line async for line in answer.aiter_lines() if line][-1]

        async def big():
            headers = {"content-type": "application/json"}
            return (await client.post(f"{url}/v1/chat/completions", content=huge, headers=headers)).status_code

        return await asyncio.gather(*(stream(i) for i in range(streams)), *(big() for _ in range(bodies)))


def test_issue_33_health_answers_within_50_ms_at_p99_under_hostile_load(server):
    """The goal of issue #33: streams with 4,096 characters of stop strings each, and 20 MB bodies, all at once;
    /health, probed from another process every 10 ms, answers within 50 ms at p99 (before: 16 s). The issue
    asks for 200 streams; 100 here, as the server, its engine, this client and the probe share 2 CPU cores."""
    streams = 100
    probe = subprocess.Popen([sys.executable, "-c", HEALTH_PROBE, server.url, "8"], stdout=subprocess.PIPE)
    time.sleep(1)
    answers = asyncio.run(_hostile_load(server.url, streams=streams, bodies=4))
    latencies = sorted(json.loads(probe.communicate(timeout=60)[0]))
    assert answers[:streams] == [(200, "data: [DONE]")] * streams and answers[streams:] == [413] * 4
    assert len(latencies) > 100 and latencies[int(0.99 * len(latencies))] < 0.05, latencies[-10:]
    assert _wait_idle(server)["rlkv_open_streams"] == 0


def test_issue_33_the_api_key_guards_the_api_but_not_health(small):
    """Before: there was no --api-key. `small` has one (RLKV_API_KEY) and --protect-metrics."""
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {KEY}"}):
        for path in ("/v1/models", "/metrics"):
            answer = httpx.get(f"{small.url}{path}", headers=headers, timeout=10)
            assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
            assert answer.json()["error"]["code"] == "invalid_api_key"
        answer = httpx.post(f"{small.url}/v1/completions", json={"prompt": "x"}, headers=headers, timeout=10)
        assert answer.status_code == 401
    assert httpx.get(f"{small.url}/health", timeout=10).status_code == 200
    assert small.metrics()["rlkv_engine_up"] == 1  # with the key
    assert small.client.completions.create(model=NAME, prompt="x", max_tokens=2).usage.completion_tokens <= 2
    stranger = openai.OpenAI(base_url=f"{small.url}/v1", api_key="sk-wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        stranger.completions.create(model=NAME, prompt="x", max_tokens=2)


def _health_while(server, condition, seconds):
    """Poll /health until `condition(answer)`; the answers seen."""
    deadline, seen = time.monotonic() + seconds, []
    while time.monotonic() < deadline:
        seen.append(httpx.get(f"{server.url}/health", timeout=5))
        if condition(seen[-1]):
            return seen
        time.sleep(0.1)
    raise AssertionError(f"/health never met the condition: {[a.text for a in seen[-3:]]}")


def test_a_lost_engine_process_is_restarted_and_a_second_quick_loss_ends_the_server(servers):
    doomed = servers[2]
    assert greedy(doomed, PROMPTS[1]) == greedy(servers[0], PROMPTS[1])  # the same engine, another process
    stream = doomed.client.completions.create(
        model=NAME, prompt=PROMPTS[0], max_tokens=500, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = iter(stream)
    next(chunks)
    (engine,) = engine_processes(doomed.proc.pid)
    os.kill(engine, signal.SIGKILL)
    with pytest.raises(openai.APIError, match="restarting"):  # the stream it held ends with a clear error
        list(chunks)
    restarting = _health_while(doomed, lambda a: a.status_code == 200, STARTUP_S)[:-1]
    assert restarting and all(a.status_code == 503 for a in restarting)
    assert restarting[0].json()["error"]["code"] == "engine_restarting"
    metrics = doomed.metrics()
    assert metrics["rlkv_engine_restarts_total"] == 1 and metrics["rlkv_engine_up"] == 1
    assert metrics["rlkv_open_streams"] == 0 and metrics["rlkv_kv_pages_used"] == 0
    assert greedy(doomed, PROMPTS[1]) == greedy(servers[0], PROMPTS[1])
    (engine,) = engine_processes(doomed.proc.pid)
    os.kill(engine, signal.SIGKILL)  # within a minute of its start: --engine-restarts 1 is spent
    assert doomed.proc.wait(STARTUP_S) == 1
    assert "2 failures in a row" in doomed.output()


def interrupt_with_a_stream_open(server) -> None:
    """SIGINT the server while a long stream is open: the stream ends with the shutdown's error event."""
    stream = server.client.completions.create(
        model=NAME, prompt=PROMPTS[0], max_tokens=1500, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(stream))
    server.proc.send_signal(signal.SIGINT)
    with pytest.raises(openai.APIError, match="shutting down"):
        for _ in stream:
            pass


def test_sigint_closes_open_streams_and_exits_cleanly(server):  # the last test: it stops the server
    (engine,) = engine_processes(server.proc.pid)
    interrupt_with_a_stream_open(server)
    assert server.proc.wait(20) is not None
    assert "Traceback" not in server.output()
    assert wait_gone(engine, 10)  # the engine process does not outlive the server
