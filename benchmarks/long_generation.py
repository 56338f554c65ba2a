"""Long generations served by the engine: fixed-length outputs or natural EOS, each decode step against its floor.

For each `--compile` setting, KV precision (`--kv-dtypes`: bf16, fp8, fp8-kept, `rlkv.precision`) and sparsity
(one KV budget, at most `--max-batch` running), a fresh engine
serves `--num-requests` prompts through its online API (`add_request` / `step`: the loop `rlkv serve`'s
engine process runs, without HTTP): random token ids of `--input-len` tokens, or the task's prompts
(MATH-500 by default) when `--input-len` is 0. All arrive at once; at most `--max-concurrency` are in
the engine at a time (the next is added as one finishes). `--output-len N --ignore-eos` generates
exactly N tokens per request (the shape of vLLM's and SGLang's random serving benchmarks); without
`--ignore-eos` N caps answers that end at EOS, and rows of task prompts are graded (accuracy beside
output lengths: a compressed cache can write longer answers). Reported per row:
- output tok/s (first request added to its last token read back), its ratio to sparsity 0 at bf16 (the full
  bf16 cache) with the same `--compile`, and to `--compile off` at the same sparsity and precision; TTFT,
  TPOT and ITL p50 / p90 / p99 (when tokens reach the host: the engine reads a step's tokens back while the
  next one runs); preemptions and the most requests running at once;
- each decode step's wall time against its floor: the bytes it must read (every weight once, and each
  running sequence's K/V as stored: kept heads every token, compressed heads their ring) over this device's
  measured copy bandwidth. Over the steps that prefilled nothing: the median step and floor, and
  `of_floor`, the floor's share of their total time;
- recompute: the context tokens preempted requests prefill again, and what that costs at this
  engine's prefill rate (measured after the run on contexts of their mean length), in seconds and as
  a share of the run.
The run checks itself: every request finishes, with `--ignore-eos` each with exactly N tokens, and the
pool has every page back; a failed check is recorded in the row and the script exits non-zero.
Head choice does not change speed: without `--heads`, seeded random head scores (no accuracy then).

    python benchmarks/long_generation.py --model DIR --heads heads.json --sparsities 0,0.5 \
        --num-requests 64 --output-len 8192 --ignore-eos --kv-budget 4GiB --compile on,off --kv-dtypes bf16,fp8 \
        --data-dir DATA --out results/long_generation.json
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np
import torch
from common import copy_bandwidth, load_model, print_table, weights_arguments, write_result
from decode_limit import weight_bytes

import rlkv
from rlkv.engine import Completion, SamplingParams
from rlkv.methods.headsplit import HeadSplit
from rlkv.precision import KV_DTYPES

COMPILE = {"auto": None, "on": True, "off": False}


@dataclass
class Timeline:
    """One request as the host sees it."""

    added: float
    arrivals: list[float] = field(default_factory=list)  # when each step's new tokens for it were read back
    tokens: int = 0
    completion: Completion | None = None


@dataclass
class StepTime:
    seconds: float
    running: int  # sequences the step decoded
    kv_bytes: int  # their K/V the step reads
    prefilled: bool  # the step also ran a prefill forward


def request_prompts(tok, task, args) -> tuple[list[list[int]], list | None]:
    """Prompt token ids, and the task's examples they come from (None for random prompts)."""
    if args.input_len:
        generator = torch.Generator().manual_seed(args.seed)
        return torch.randint(0, len(tok), (args.num_requests, args.input_len), generator=generator).tolist(), None
    examples = task.load(args.data_dir, limit=args.num_requests)
    return [tok(task.prompt(e, tok), add_special_tokens=False).input_ids for e in examples], examples


def serve(engine, prompts: list[list[int]], params: list[SamplingParams], concurrency: int):
    """Every prompt through the engine's online API, at most `concurrency` in it at once: (timelines, steps)."""
    queue, timelines, steps, done = deque(range(len(prompts))), {}, [], 0
    while queue or engine.has_unfinished():
        while queue and len(timelines) - done < concurrency:
            i = queue.popleft()
            timelines[i] = Timeline(time.perf_counter())
            engine.add_request(str(i), prompts[i], params[i])
        decoding = [r for r in engine.scheduler.admitted if r.prefilled]
        kv = sum(engine.store.sequence_nbytes(r.length) for r in decoding)
        prefills = engine.runner.prefill_forwards
        tick = time.perf_counter()
        outputs = engine.step()
        now = time.perf_counter()
        steps.append(StepTime(now - tick, len(decoding), kv, engine.runner.prefill_forwards > prefills))
        for out in outputs:
            timeline = timelines[int(out.request_id)]
            if out.new_token_ids:
                timeline.arrivals.append(now)
                timeline.tokens += len(out.new_token_ids)
            if out.finished:
                timeline.completion = out.completion
                done += 1
    return timelines, steps


def percentiles(name: str, values: list[float], scale: float = 1.0) -> dict:
    """`name`_p50 / _p90 / _p99 of `values` times `scale` (None without values)."""
    return {f"{name}_p{q}": float(np.percentile(values, q)) * scale if values else None for q in (50, 90, 99)}


def latencies(timelines: dict[int, Timeline]) -> dict:
    """Throughput, TTFT, TPOT and ITL over the run (first request added to the last token read back)."""
    seen = [t for t in timelines.values() if t.arrivals]
    duration = max(t.arrivals[-1] for t in seen) - min(t.added for t in timelines.values())
    tokens = sum(t.tokens for t in seen)
    return {
        "duration_s": duration,
        "output_tokens": tokens,
        "output_tok_s": tokens / duration,
        **percentiles("ttft_s", [t.arrivals[0] - t.added for t in seen]),
        **percentiles(
            "tpot_ms", [(t.arrivals[-1] - t.arrivals[0]) / (t.tokens - 1) for t in seen if t.tokens > 1], 1e3
        ),
        **percentiles("itl_ms", [b - a for t in seen for a, b in zip(t.arrivals, t.arrivals[1:])], 1e3),
    }


def against_floor(steps: list[StepTime], weights: int, copy: float) -> dict:
    """Decode steps that prefilled nothing against their floor: (weights + K/V read) / copy bandwidth."""
    decode = [s for s in steps if s.running and not s.prefilled]
    if not decode:
        return {"decode_steps": 0}
    floors = [(weights + s.kv_bytes) / copy for s in decode]
    return {
        "decode_steps": len(decode),
        "mean_running": sum(s.running for s in decode) / len(decode),
        "mean_kv_gb_per_step": sum(s.kv_bytes for s in decode) / len(decode) / 1e9,
        "step_ms_p50": 1e3 * float(np.median([s.seconds for s in decode])),
        "floor_ms_p50": 1e3 * float(np.median(floors)),
        "of_floor": sum(floors) / sum(s.seconds for s in decode),
    }


def recompute_cost(engine, tok, recomputed: int, preemptions: int, duration: float, seed: int) -> dict:
    """What re-prefilling preempted contexts cost: the run's recomputed tokens at this engine's prefill rate,
    measured on 4 random contexts of their mean length (one token generated each, so no decode step)."""
    if not preemptions:
        return {"recomputed_tokens": 0, "recompute_s_est": 0.0, "recompute_share": 0.0}
    length = max(1, round(recomputed / preemptions))
    ids = torch.randint(0, len(tok), (4, length), generator=torch.Generator().manual_seed(seed)).tolist()
    engine.generate(ids, max_new_tokens=1, eos_token_ids=[])
    rate = 4 * length / engine.stats.seconds
    return {
        "recomputed_tokens": recomputed,
        "mean_recomputed_context": length,
        "prefill_tok_s": rate,
        "recompute_s_est": recomputed / rate,
        "recompute_share": recomputed / rate / duration,
    }


def outputs(timelines: dict[int, Timeline], task, examples, args) -> dict:
    """Output lengths and finish reasons; accuracy when the prompts are the task's and answers end at EOS."""
    done = [t.completion for t in timelines.values() if t.completion is not None]
    lengths = [len(c.tokens) for c in done]
    row = {
        "completed": len(done),
        "mean_output_tokens": sum(lengths) / len(lengths) if lengths else None,
        **percentiles("output_tokens", lengths),
        "max_output_tokens": max(lengths, default=None),
        "finish": dict(Counter(c.finish for c in done)),
        "kv_ratio": sum(c.kv_bytes for c in done) / max(1, sum(c.kv_bytes_full for c in done)),
    }
    if examples is not None and not args.ignore_eos and len(done) == len(examples):
        texts = [timelines[i].completion.text for i in range(len(examples))]
        scores = task.grade_many(examples, texts)
        row["accuracy"] = sum(scores) / len(scores)
    return row


def checks(engine, timelines: dict[int, Timeline], args) -> list[str]:
    """What must hold after a run: every request finished, exact lengths with --ignore-eos, every page back."""
    problems = []
    unfinished = [i for i, t in timelines.items() if t.completion is None]
    if unfinished:
        problems.append(f"{len(unfinished)} requests never finished")
    if args.ignore_eos:
        short = [i for i, t in timelines.items() if t.completion and len(t.completion.tokens) != args.output_len]
        if short:
            problems.append(f"{len(short)} requests did not generate exactly {args.output_len} tokens")
    if engine.store.free_pages != engine.store.capacity_pages:
        problems.append(f"{engine.store.capacity_pages - engine.store.free_pages} pages were not given back")
    return problems


def run(model, tok, method, compile: bool | None, prompts, params, task, examples, args, weights, copy) -> dict:
    """One row: a fresh engine serves every prompt (after a short warm-up), then checks and the recompute cost."""
    engine = rlkv.Engine(model, tok, method, kv_budget=args.kv_budget, max_batch=args.max_batch, compile=compile)
    engine.generate(prompts[: args.max_batch], max_new_tokens=8, eos_token_ids=[])  # warm-up: kernels and graphs
    before = engine.metrics()
    timelines, steps = serve(engine, prompts, params, args.max_concurrency or len(prompts))
    after = engine.metrics()
    row = {
        "compile": engine.compile,
        **latencies(timelines),
        "preemptions": after.preemptions - before.preemptions,
        "max_running": max(s.running for s in steps),
        "pool_pages": engine.store.capacity_pages,
        **against_floor(steps, weights, copy),
        **outputs(timelines, task, examples, args),
        "problems": checks(engine, timelines, args),
    }
    recomputed = after.recomputed_tokens - before.recomputed_tokens
    row.update(recompute_cost(engine, tok, recomputed, row["preemptions"], row["duration_s"], args.seed))
    del engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--heads", default=None, help="head scores (default: seeded random ones: speed only)")
    ap.add_argument("--sparsities", default="0,0.2,0.4,0.5,0.6,0.8")
    ap.add_argument("--compile", default="auto", help="comma-separated engine settings: auto (on CUDA), on, off")
    ap.add_argument("--kv-dtypes", default="bf16", help="comma-separated KV precisions: bf16, fp8, fp8-kept")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=0, help="random prompts of this many tokens (0: the task's)")
    ap.add_argument("--output-len", type=int, default=8192, help="tokens per request (a cap without --ignore-eos)")
    ap.add_argument("--ignore-eos", action="store_true", help="generate exactly --output-len tokens per request")
    ap.add_argument("--max-concurrency", type=int, default=0, help="requests in the engine at once (0: all)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0, help="with --temperature: R1's settings are 0.6 and 0.95")
    ap.add_argument("--top-k", type=int, default=0, help="0: off")
    ap.add_argument("--repetition-window", type=int, default=400, help="the paper's stop, at natural EOS only")
    ap.add_argument("--kv-budget", default="4GiB")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--sink", type=int, default=16)
    ap.add_argument("--recent", type=int, default=64)
    ap.add_argument("--task", default="math500")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seed", type=int, default=0, help="of the random prompts and head scores")
    weights_arguments(ap)
    ap.add_argument("--out", default="results/long_generation.json")
    args = ap.parse_args()
    settings = args.compile.split(",")
    if any(c not in COMPILE for c in settings):
        ap.error(f"--compile takes auto, on and/or off, got {args.compile!r}")
    kv_dtypes = args.kv_dtypes.split(",")
    if any(k not in KV_DTYPES for k in kv_dtypes):
        ap.error(f"--kv-dtypes takes {', '.join(KV_DTYPES)}, got {args.kv_dtypes!r}")

    model, tok = load_model(args.model, args.random_weights)
    layout = rlkv.Layout.of(model)
    heads = rlkv.HeadScores.load(args.heads) if args.heads else rlkv.HeadScores.random(layout, seed=args.seed)
    heads.check_layout(layout)
    task = rlkv.tasks.get(args.task)
    prompts, examples = request_prompts(tok, task, args)
    params = [
        SamplingParams(
            max_tokens=args.output_len,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=i,
            ignore_eos=args.ignore_eos,
            repetition_window=0 if args.ignore_eos else args.repetition_window,
        )
        for i in range(len(prompts))
    ]
    device = next(model.parameters()).device
    copy, weights = copy_bandwidth(device), weight_bytes(model)
    meta = {
        "benchmark": "long_generation",
        "layout": layout.to_dict(),
        **vars(args),
        "heads_method": heads.method if args.heads else "random",
        "requests": len(prompts),
        "mean_prompt_tokens": sum(map(len, prompts)) / len(prompts),
        "copy_gb_per_s": copy / 1e9,
        "weight_bytes": weights,
    }
    print(f"copy bandwidth {copy / 1e9:.0f} GB/s, weights {weights / 2**30:.2f} GiB", flush=True)
    rows, failed = [], []
    for setting, kv_dtype in itertools.product(settings, kv_dtypes):
        for s in (float(v) for v in args.sparsities.split(",")):
            method = HeadSplit(heads.keep_mask(s), args.sink, args.recent, kv_dtype=kv_dtype)
            row = {
                "kv_dtype": kv_dtype,
                "sparsity": s,
                **run(model, tok, method, COMPILE[setting], prompts, params, task, examples, args, weights, copy),
            }
            rows.append(row)
            failed += row["problems"]
            print(
                f"compile {row['compile']}, {kv_dtype}, sparsity {s:g}: {row['output_tok_s']:.0f} tok/s, TPOT p50 "
                f"{row['tpot_ms_p50'] or 0:.2f} ms, step {row.get('step_ms_p50') or 0:.2f} ms against a floor of "
                f"{row.get('floor_ms_p50') or 0:.2f} ms, {row['preemptions']} preemptions "
                f"(recompute {row['recompute_share']:.1%} of the run), {row['max_running']} running at most",
                flush=True,
            )
            write_result(args.out, {**meta, "complete": False, "rows": rows})  # partial results survive a kill
    for r in rows:
        base = next(
            (b for b in rows if b["sparsity"] == 0 and b["kv_dtype"] == "bf16" and b["compile"] == r["compile"]), None
        )
        eager = next(
            (
                b
                for b in rows
                if b["sparsity"] == r["sparsity"] and b["kv_dtype"] == r["kv_dtype"] and b["compile"] is False
            ),
            None,
        )
        r["throughput_ratio"] = r["output_tok_s"] / base["output_tok_s"] if base else None
        r["vs_uncompiled"] = r["output_tok_s"] / eager["output_tok_s"] if eager else None
    print_table(
        rows,
        [
            "compile",
            "kv_dtype",
            "sparsity",
            "output_tok_s",
            "throughput_ratio",
            "vs_uncompiled",
            "ttft_s_p50",
            "tpot_ms_p50",
            "itl_ms_p99",
            "step_ms_p50",
            "floor_ms_p50",
            "of_floor",
            "preemptions",
            "recompute_share",
            "max_running",
            "mean_output_tokens",
            "accuracy",
        ],
    )
    write_result(args.out, {**meta, "complete": not failed, "rows": rows})
    if failed:
        raise SystemExit("checks failed: " + "; ".join(failed))


if __name__ == "__main__":
    main()
