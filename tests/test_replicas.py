"""Data parallelism (issue #38): `Replicas` routing requests over several engines, in process (two `AsyncEngine`s
of the tiny model), then `rlkv serve --data-parallel 2` end to end through the `openai` client: answers equal
one replica's, the load spreads, a killed replica is reported while the other serves, SIGINT stops them all."""

import asyncio
import multiprocessing as mp
import os
import signal
import threading
import time
from functools import partial
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import saved_tiny_model, tiny_model
from test_engine import engine, prompts
from test_online import run_alone
from test_serve import (
    NAME,
    PROMPTS,
    Server,
    _many,
    _requests,
    engine_processes,
    greedy,
    interrupt_with_a_stream_open,
    running,
    wait_gone,
)

from rlkv import SamplingParams
from rlkv.serve import AsyncEngine, EngineStopped, Replicas
from rlkv.serve.engine_process import _sees_only
from rlkv.serve.replicas import replica_gpus


def two_replicas() -> tuple[Replicas, list]:
    """`Replicas` over two engines of the tiny model, each in a thread (started), and the engines. Their steps take
    turns: an engine's forward context is one per process (`rlkv serve` runs each replica in a process)."""
    engines = [engine(tiny_model("qwen2"), max_batch=4) for _ in range(2)]
    turns = threading.Lock()
    for e in engines:
        e.step = partial(in_turn, turns, e.step)
    replicas = Replicas([AsyncEngine(e) for e in engines])
    replicas.start()
    return replicas, engines


async def tokens_of(stream) -> dict[int, list[int]] | str:
    """Each sample's tokens, or the error the stream ended with."""
    samples: dict[int, list[int]] = {}
    try:
        async for out in stream:
            samples.setdefault(out.index, []).extend(out.new_token_ids)
    except EngineStopped as err:
        return str(err)
    return samples


def in_turn(turns: threading.Lock, step):
    with turns:
        return step()


def finished(replicas: Replicas) -> list[int]:
    return [r.metrics().finished_requests for r in replicas.replicas]


def test_a_request_goes_whole_to_the_replica_with_the_least_work_outstanding():
    """A long request holds replica 0; three short ones (one of two samples) all go to replica 1, whose outstanding
    tokens stay fewer, and equal each alone; once the long one is closed, replica 0 (the lower index) is next."""
    ps, _, _ = prompts()
    short = [
        SamplingParams(max_tokens=8, ignore_eos=True),
        SamplingParams(max_tokens=8, n=2, temperature=0.9, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=6, temperature=1.1, seed=4, ignore_eos=True),
    ]
    alone = {i: run_alone(tiny_model("qwen2"), None, ps[i + 1], short[i], max_batch=4) for i in (0, 2)}
    replicas, _ = two_replicas()

    async def scenario():
        long = replicas.generate("long", ps[0], SamplingParams(max_tokens=400, ignore_eos=True))
        await anext(long)  # routed (to replica 0: both idle) and running
        answers = await asyncio.gather(
            *(tokens_of(replicas.generate(f"s{i}", ps[i + 1], p)) for i, p in enumerate(short))
        )
        placed = finished(replicas)
        await long.aclose()  # aborted: replica 0 holds nothing any more
        await tokens_of(replicas.generate("next", ps[1], short[0]))
        return answers, placed

    try:
        answers, placed = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
        assert placed == [0, 3]
        assert answers[0] == {0: alone[0].tokens} and answers[2] == {0: alone[2].tokens}
        assert sorted(answers[1]) == [0, 1] and all(len(t) == 8 for t in answers[1].values())
        assert finished(replicas) == [2, 3] and replicas.metrics().finished_requests == 5  # the long one aborted
        assert replicas.health() == {"status": "ok", "replicas": [{"status": "ok", "replica": i} for i in range(2)]}
    finally:
        replicas.join(10)
    assert replicas.status() is not None and not replicas.healthy


def test_a_replica_that_fails_for_good_is_reported_and_the_other_serves():
    """Replica 1's engine fails in a step: its stream ends naming it, /health's body says "degraded" and which, new
    requests run on replica 0; when replica 0 fails too, nothing serves and `on_fatal` runs once."""
    ps, _, _ = prompts()
    replicas, engines = two_replicas()
    fatal = []
    replicas.on_fatal = lambda: fatal.append(True)

    def broken():
        raise RuntimeError("a device failure")

    params = SamplingParams(max_tokens=40, ignore_eos=True)

    async def two_streams():
        first = replicas.generate("a", ps[0], params)
        await anext(first)  # on replica 0
        engines[1].step = broken
        second = tokens_of(replicas.generate("b", ps[1], params))  # on replica 1, whose next step fails
        return await asyncio.gather(tokens_of(first), second)

    try:
        on_0, on_1 = asyncio.run(asyncio.wait_for(two_streams(), timeout=60))
        assert len(on_0[0]) == 39 and on_1 == "replica 1 failed for good: a device failure"
        assert replicas.status() is None and replicas.healthy and not fatal
        health = replicas.health()
        assert health["status"] == "degraded" and health["replicas"][0] == {"status": "ok", "replica": 0}
        assert health["replicas"][1]["status"] == "failed" and "a device failure" in health["replicas"][1]["reason"]
        later = asyncio.run(asyncio.wait_for(tokens_of(replicas.generate("c", ps[2], params)), timeout=60))
        assert later == {0: run_alone(tiny_model("qwen2"), None, ps[2], params, max_batch=4).tokens}
        engines[0].step = broken
        last = asyncio.run(asyncio.wait_for(tokens_of(replicas.generate("d", ps[2], params)), timeout=60))
        assert last == "replica 0 failed for good: a device failure" and fatal == [True]
        assert "every replica failed" in str(replicas.error) and not replicas.healthy
        assert "no replica can take requests" in str(replicas.status())
        with pytest.raises(EngineStopped):
            replicas.generate("e", ps[0], params)
    finally:
        replicas.join(10)


def test_each_replica_gets_a_gpu_of_its_own(monkeypatch):
    """The first N GPUs this process sees (CUDA_VISIBLE_DEVICES entries), one per replica, in the environment its
    engine process starts with; more replicas than GPUs are refused; on a machine without CUDA, N processes."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert replica_gpus(3) == [None] * 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert replica_gpus(2) == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert replica_gpus(1) == ["3"]
    with pytest.raises(ValueError, match="3 replicas need 3 GPUs, one each, and only 2 visible"):
        replica_gpus(3)
    with _sees_only("5"):
        child = mp.get_context("spawn").Process(target=time.sleep, args=(30,), daemon=True)
        child.start()
    try:
        assert b"CUDA_VISIBLE_DEVICES=5\0" in environment(child.pid)
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5"  # this process's, as it was
    finally:
        child.kill()
        child.join(5)


def environment(pid: int, seconds: float = 10) -> bytes:
    """A process's environment, once it shows one (empty while the process is being started)."""
    deadline = time.monotonic() + seconds
    while not (found := Path(f"/proc/{pid}/environ").read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def test_more_replicas_than_gpus_is_a_one_line_error(monkeypatch, tmp_path):
    """Refused before any engine process starts (the model directory here could not even load)."""
    from typer.testing import CliRunner

    from rlkv.cli import app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    (tmp_path / "config.json").write_text("{}")
    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path), "--data-parallel", "2"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "2 replicas need 2 GPUs, one each, and only 1 visible" in result.output


# ---------------------------------------------------------------------- `rlkv serve --data-parallel 2`
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Two replicas, none restarted (--engine-restarts 0: a replica that dies is gone for good)."""
    model_dir = saved_tiny_model(tmp_path_factory.mktemp("tiny-replicas"), "llama")
    log = tmp_path_factory.mktemp("logs") / "replicas.log"
    with running(
        Server(model_dir, log, "--data-parallel", "2", "--engine-restarts", "0", "--kv-budget", "1536KiB")
    ) as (started,):
        yield started


def per_replica(server, name: str) -> list[float]:
    metrics = server.metrics()
    return [metrics[f'rlkv_replica_{name}{{replica="{i}"}}'] for i in range(2)]


def test_two_replicas_answer_as_one_and_share_the_load(server):
    """Greedy and seeded requests sent one at a time all run on replica 0 (the lower index of two idle ones);
    sent at once, they spread over both replicas and answer the same."""
    requests = _requests(8, 12)
    alone = [asyncio.run(_many(server.url, [r]))[0] for r in requests]
    assert per_replica(server, "finished_requests_total") == [8, 0]
    together = asyncio.run(_many(server.url, requests))
    assert together == alone
    done = per_replica(server, "finished_requests_total")
    assert done[0] > 8 and done[1] > 0 and sum(done) == server.metrics()["rlkv_finished_requests_total"] == 16
    assert per_replica(server, "kv_pages_total") == [server.metrics()["rlkv_kv_pages_total"] / 2] * 2


def test_a_killed_replica_is_reported_and_the_other_serves(server):
    """One stream on each replica; one replica's process is killed: its stream ends with an error naming it, /health
    answers 200 "degraded" naming it, the other stream ends well and new requests still answer."""
    reference = greedy(server, PROMPTS[1])
    streams = []
    for prompt in PROMPTS[:2]:  # the first to replica 0, the second to replica 1 (fewer tokens outstanding)
        stream = server.client.completions.create(
            model=NAME, prompt=prompt, max_tokens=1000, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        next(iter(stream))
        streams.append(stream)
    engines = engine_processes(server.proc.pid)
    assert len(engines) == 2
    os.kill(engines[0], signal.SIGKILL)
    ends = []
    for stream in streams:
        try:
            ends.append([c.choices[0].finish_reason for c in stream][-1])
        except openai.APIError as err:
            ends.append(str(err))
    (dead,) = [i for i, end in enumerate(ends) if end != "length"]
    assert ends[1 - dead] == "length" and f"replica {dead} failed for good" in ends[dead], ends
    answer = httpx.get(f"{server.url}/health", timeout=5)
    assert answer.status_code == 200 and answer.json()["status"] == "degraded", answer.text
    assert [r["status"] for r in answer.json()["replicas"]] == ["failed" if i == dead else "ok" for i in range(2)]
    assert greedy(server, PROMPTS[1]) == reference
    assert len(asyncio.run(_many(server.url, _requests(4, 6)))) == 4  # at once, all to the replica left
    assert per_replica(server, "engine_up") == [0 if i == dead else 1 for i in range(2)]
    assert server.metrics()["rlkv_engine_up"] == 1 and server.proc.poll() is None


def test_sigint_stops_every_replica(server):  # the last test: it stops the server
    """The replica left holds a stream: SIGINT ends it with an error event, and the server and its engines exit."""
    engines = engine_processes(server.proc.pid)
    interrupt_with_a_stream_open(server)
    assert server.proc.wait(20) == 0
    assert engines and all(wait_gone(pid, 10) for pid in engines)
    assert "Traceback" not in server.output()
