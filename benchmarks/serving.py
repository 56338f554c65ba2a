"""Serving through `rlkv serve`: MATH-500 requests arriving as a Poisson process, streamed.

For each sparsity (and each `--engines` transport: the engine in its own process, rlkv serve's default, or in
a thread of the server's; and each `--kv-dtypes` KV precision) a server process is started (`python -m rlkv
serve`, the same KV budget and batch cap) and warmed up; then for each arrival rate `--num-requests` chat
requests (a MATH-500 question with the task's instruction, greedy, `--max-tokens` cap) are sent at
exponentially distributed intervals (`inf`: all at once), each streamed; `--max-concurrency` caps the requests
in flight (a request's clock starts when it is sent). Long generations: `--ignore-eos` makes every answer
exactly `--max-tokens` tokens, and `--input-len N` sends random prompts of N token ids as plain completions
instead of the task's chat requests (vLLM's and SGLang's random serving benchmarks). Per request: time to
first token (TTFT: sent to the first content delta), time per output token (TPOT: the rest of the answer's
time over its remaining tokens), the gaps between its streamed chunks (ITL) and end-to-end latency. Per
(sparsity, rate): output tokens/s over the run (first arrival to last answer), requests/s, TTFT / TPOT / ITL /
latency p50, p90 and p99, preemptions and the most requests running at once (from /metrics), and the
throughput ratio to sparsity 0 at bf16 at the same rate, transport and replica count (same script, one
machine). `--data-parallel 1,2,4` serves each configuration with that many engine processes behind one server
(`rlkv serve --data-parallel N`, one GPU each): `scaling` is a row's tok/s over one replica's. The step
time against its floor and what preemption's recompute costs are measured in-process by `long_generation.py`.

    python benchmarks/serving.py --model DIR --heads heads.json --sparsities 0,0.5 --rates 2,8,32,inf \
        --num-requests 200 --max-tokens 4096 --kv-budget 4GiB --data-dir DATA --out results/serving.json

`--url http://HOST:PORT` measures a running server instead (one row per rate, `--sparsities` ignored).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch
from common import print_table, write_result
from transformers import AutoTokenizer

import rlkv
from rlkv.serve.process import ServerProcess, read_metrics


@dataclass
class Sample:
    sent: float | None = None  # when it was sent (perf_counter)
    first: float | None = None  # first content delta
    end: float | None = None
    tokens: int = 0
    error: str | None = None
    chunks: list[float] = field(default_factory=list)  # arrival of each streamed chunk from the first content on


# ---------------------------------------------------------------------- the load
async def one_request(client: httpx.AsyncClient, url: str, body: dict, sample: Sample) -> None:
    """Stream one completion (chat, or plain when the body has a `prompt`), timing its first content, each
    later chunk and its end."""
    endpoint = "completions" if "prompt" in body else "chat/completions"
    sample.sent = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/{endpoint}", json=body) as answer:
            if answer.status_code != 200:
                sample.error = f"{answer.status_code}: {(await answer.aread()).decode()[:200]}"
                return
            async for line in answer.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if sample.first is not None and '"usage":{' not in line and '"error"' not in line:
                    sample.chunks.append(time.perf_counter())
                    continue  # a later delta: nothing else to read (parsing every chunk would load the client)
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    sample.error = chunk["error"]["message"]
                    return
                choice = chunk["choices"][0] if chunk["choices"] else {}
                text = choice.get("text") or choice.get("delta", {}).get("content")
                if text and sample.first is None:
                    sample.first = time.perf_counter()
                    sample.chunks.append(sample.first)
                if chunk.get("usage"):
                    sample.tokens = chunk["usage"]["completion_tokens"]
        sample.end = time.perf_counter()
    except httpx.HTTPError as err:
        sample.error = f"{type(err).__name__}: {err}"


async def run_load(
    url: str, bodies: list[dict], rate: float, seed: int, concurrency: int = 0, poll_s: float = 0.2
) -> tuple[list[Sample], int]:
    """Send `bodies` at Poisson arrivals of `rate` per second, at most `concurrency` in flight (0: no cap);
    (samples, most requests running at once)."""
    rng = random.Random(seed)
    gaps = [0.0 if math.isinf(rate) else rng.expovariate(rate) for _ in bodies]
    peak = 0
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:

        async def watch():
            nonlocal peak
            while True:
                text = (await client.get(f"{url}/metrics")).text
                running = next(
                    float(line.split()[1]) for line in text.splitlines() if line.startswith("rlkv_running_requests ")
                )
                peak = max(peak, int(running))
                await asyncio.sleep(poll_s)

        watcher = asyncio.create_task(watch())
        slots = asyncio.Semaphore(concurrency or len(bodies))

        async def limited(body: dict, sample: Sample) -> None:
            async with slots:
                await one_request(client, url, body, sample)

        tasks, samples = [], []
        for gap, body in zip(gaps, bodies):
            await asyncio.sleep(gap)
            samples.append(Sample())
            tasks.append(asyncio.create_task(limited(body, samples[-1])))
        await asyncio.gather(*tasks)
        watcher.cancel()
    return samples, peak


def summarize(samples: list[Sample]) -> dict:
    done = [s for s in samples if s.error is None and s.end is not None]
    if not done:
        return {"completed": 0, "failed": len(samples), "first_error": samples[0].error if samples else None}
    ttft = [s.first - s.sent for s in done if s.first is not None]
    tpot = [1e3 * (s.end - s.first) / (s.tokens - 1) for s in done if s.first is not None and s.tokens > 1]
    itl = [1e3 * (b - a) for s in done for a, b in zip(s.chunks, s.chunks[1:])]
    latency = [s.end - s.sent for s in done]
    duration = max(s.end for s in done) - min(s.sent for s in samples if s.sent is not None)
    tokens = sum(s.tokens for s in done)

    def pct(name, values):
        return {f"{name.format(q)}": float(np.percentile(values, q)) if values else None for q in (50, 90, 99)}

    failed = [s for s in samples if s.error is not None or s.end is None]
    return {
        "completed": len(done),
        "failed": len(failed),
        "first_error": failed[0].error if failed else None,
        "duration_s": duration,
        "output_tokens": tokens,
        "mean_output_tokens": tokens / len(done),
        "output_tok_s": tokens / duration,
        "requests_s": len(done) / duration,
        **pct("ttft_p{}_s", ttft),
        **pct("tpot_p{}_ms", tpot),
        **pct("itl_p{}_ms", itl),
        **pct("latency_p{}_s", latency),
    }


def request_bodies(args, vocab: int) -> list[dict]:
    """Streamed request bodies: the task's chat requests, or with `--input-len` plain completions of random
    token ids; exactly `--max-tokens` tokens each with `--ignore-eos`."""
    if args.input_len:
        generator = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, vocab, (args.num_requests, args.input_len), generator=generator).tolist()
        inputs = [{"prompt": p} for p in ids]
    else:
        task = rlkv.tasks.get(args.task)
        examples = task.load(args.data_dir, limit=args.num_requests)
        inputs = [{"messages": [{"role": "user", "content": task.user_message(e)}]} for e in examples]
    return [
        {
            **body,
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "top_p": args.top_p,
            **({"top_k": args.top_k} if args.top_k else {}),
            "seed": i,
            "ignore_eos": args.ignore_eos,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for i, body in enumerate(inputs)
    ]


def warm_up(url: str, bodies: list[dict], count: int) -> None:
    """`count` requests at once with caps 1..64 tokens: the decode batch shrinks through every size
    (each CUDA graph captured, each kernel compiled) before anything is measured."""
    warm = [{**bodies[i % len(bodies)], "max_tokens": 1 + i % 64, "ignore_eos": True} for i in range(count)]
    samples, _ = asyncio.run(run_load(url, warm, math.inf, seed=0))
    failed = [s.error for s in samples if s.error]
    if failed:
        raise RuntimeError(f"warm-up requests failed: {failed[0]}")


def measure(
    url: str, bodies: list[dict], rates: list[float], seed: int, warmup: int, concurrency: int, label: dict
) -> list[dict]:
    rows = []
    warm_up(url, bodies, warmup)
    for rate in rates:
        before = read_metrics(url)
        samples, peak = asyncio.run(run_load(url, bodies, rate, seed, concurrency))
        after = read_metrics(url)
        row = {
            **label,
            "rate": rate if not math.isinf(rate) else "inf",
            **summarize(samples),
            "preemptions": int(after["rlkv_preemptions_total"] - before["rlkv_preemptions_total"]),
            "max_running": peak,
            "kv_pages_total": int(after["rlkv_kv_pages_total"]),
        }
        rows.append(row)
        print(
            f"{label} rate {row['rate']}: {row.get('output_tok_s', 0):.1f} tok/s, "
            f"TTFT p50 {row.get('ttft_p50_s')}, {row['preemptions']} preemptions",
            flush=True,
        )
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="served model (required unless --url)")
    ap.add_argument("--heads", help="head scores for sparsity > 0")
    ap.add_argument("--sparsities", default="0,0.5")
    ap.add_argument(
        "--kv-dtypes", default="bf16", help="comma-separated KV precisions of the servers: bf16, fp8, fp8-kept"
    )
    ap.add_argument("--rates", default="2,8,32,inf", help="request arrivals per second (inf: all at once)")
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=4096, help="tokens per answer (exactly, with --ignore-eos)")
    ap.add_argument("--ignore-eos", action="store_true", help="every answer runs to --max-tokens")
    ap.add_argument("--input-len", type=int, default=0, help="random prompts of this many token ids (0: the task's)")
    ap.add_argument("--max-concurrency", type=int, default=0, help="requests in flight at once (0: no cap)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0, help="with --temperature: R1's settings are 0.6 and 0.95")
    ap.add_argument("--top-k", type=int, default=0, help="0: off (sent as vLLM's extension top_k)")
    ap.add_argument("--kv-budget", default=None, help="the servers' KV pool (a size like 4GiB, or a GPU share)")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--sink", type=int, default=16)
    ap.add_argument("--recent", type=int, default=64)
    ap.add_argument("--task", default="math500")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seed", type=int, default=0, help="of the arrival times")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up requests (default: --max-batch)")
    ap.add_argument("--engines", default="process", help="comma-separated: process (rlkv serve's default), thread")
    ap.add_argument(
        "--data-parallel",
        default="1",
        help="comma-separated replica counts of the servers (rlkv serve --data-parallel N: one engine process per "
        "GPU, --kv-budget each); scaling is each row's tok/s against one replica's",
    )
    ap.add_argument("--url", default=None, help="measure this running server instead of starting one per sparsity")
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument("--out", default="results/serving.json")
    args = ap.parse_args()
    if not args.url and not args.model:
        ap.error("give --model (servers are started here) or --url (a running server)")
    if not args.url and not args.heads and any(float(v) > 0 for v in args.sparsities.split(",")):
        ap.error("a sparsity above 0 needs --heads")

    if args.input_len and not args.model:
        ap.error("--input-len draws token ids from the tokenizer of --model (a model directory)")
    bodies = request_bodies(args, len(AutoTokenizer.from_pretrained(args.model)) if args.input_len else 0)
    rates = [float(r) for r in args.rates.split(",")]
    warmup = args.warmup if args.warmup is not None else args.max_batch
    meta = {"benchmark": "serving", **vars(args), "requests": len(bodies)}
    rows = []
    if args.url:
        rows = measure(args.url, bodies, rates, args.seed, warmup, args.max_concurrency, {"server": args.url})
    engines = [e for e in args.engines.split(",") if e]
    if any(e not in ("process", "thread") for e in engines):
        ap.error(f"--engines takes process and/or thread, got {args.engines!r}")
    replica_counts = [int(v) for v in args.data_parallel.split(",")]
    if any(n < 1 for n in replica_counts) or ("thread" in engines and max(replica_counts) > 1):
        ap.error("--data-parallel takes counts >= 1, and replicas are engine processes (not with --engines thread)")
    servers = itertools.product([] if args.url else engines, args.kv_dtypes.split(","), replica_counts)
    for engine, kv_dtype, replicas in servers:
        for s in [float(v) for v in args.sparsities.split(",")]:
            serve_args = [
                "--model",
                args.model,
                "--sparsity",
                str(s),
                "--max-batch",
                str(args.max_batch),
                "--sink",
                str(args.sink),
                "--recent",
                str(args.recent),
                f"--engine-{engine}",
                "--kv-dtype",
                kv_dtype,
                *(["--data-parallel", str(replicas)] if replicas > 1 else []),
                *(["--heads", args.heads] if args.heads and s > 0 else []),
                *(["--kv-budget", args.kv_budget] if args.kv_budget else []),
            ]
            name = f"{engine}_{kv_dtype}_s{s:g}" + (f"_dp{replicas}" if replicas > 1 else "")
            log = Path(args.out).with_suffix(f".server-{name.replace('_', '-')}.log")
            log.parent.mkdir(parents=True, exist_ok=True)
            server = ServerProcess([*serve_args, "--log-level", "warning"], log)
            try:
                server.wait_ready(args.startup_timeout)
                meta[f"server_command_{name}"] = " ".join(server.command)
                label = {"engine": engine, "kv_dtype": kv_dtype, "replicas": replicas, "sparsity": s}
                rows += measure(server.url, bodies, rates, args.seed, warmup, args.max_concurrency, label)
            finally:
                server.close()
            write_result(args.out, {**meta, "complete": False, "rows": rows})  # partial results survive a kill
    base = {
        (r.get("engine"), r.get("replicas"), r["rate"]): r
        for r in rows
        if r.get("sparsity") == 0 and r.get("kv_dtype") == "bf16"
    }
    single = {
        (r.get("engine"), r.get("kv_dtype"), r.get("sparsity"), r["rate"]): r for r in rows if r.get("replicas") == 1
    }
    for r in rows:
        ref = base.get((r.get("engine"), r.get("replicas"), r["rate"]))
        r["throughput_ratio"] = r["output_tok_s"] / ref["output_tok_s"] if ref and r.get("output_tok_s") else None
        one = single.get((r.get("engine"), r.get("kv_dtype"), r.get("sparsity"), r["rate"]))
        r["scaling"] = r["output_tok_s"] / one["output_tok_s"] if one and r.get("output_tok_s") else None
    print_table(
        rows,
        [
            *(["engine", "kv_dtype", "replicas", "sparsity"] if not args.url else ["server"]),
            "rate",
            "completed",
            "output_tok_s",
            "throughput_ratio",
            "scaling",
            "requests_s",
            "ttft_p50_s",
            "ttft_p99_s",
            "tpot_p50_ms",
            "tpot_p99_ms",
            "itl_p50_ms",
            "itl_p99_ms",
            "latency_p99_s",
            "preemptions",
            "max_running",
        ],
    )
    write_result(args.out, {**meta, "complete": True, "rows": rows})


if __name__ == "__main__":
    main()
