"""`rlkv.Engine` on the GPU: the measurements of each part are taken in one process (ratios within a run).

--parts hf      full-cache engine vs transformers `generate` with a DynamicCache, same prompts, exactly
                `--hf-new-tokens` tokens, at each `--hf-batches` size (one wave: requests = batch);
--parts sweep   every sparsity under one KV budget: `--requests` prompts, exactly `--new-tokens` each.
                Compression makes a page cheaper, so the budget admits more sequences at once (memory
                rebalancing) and each step reads fewer K/V bytes; the engine gets `sequence_tokens`
                (longest prompt + new tokens), so it holds rings only for the sequences the budget
                can run. Two throughputs: over the whole call,
                and under load (only while requests wait for room, as in steady serving; the whole
                call's also holds the ramp-down after the queue empties, whose length depends on how
                the request count divides into waves of running sequences), with the step time under
                load next to the GPU time of one step's graph at that batch (the gap is host time the
                GPU waited for). The ratio under load to sparsity 0 is compared with the theoretical
                1 / ((1 - s) + s * (sink + recent) / L), L = prompt + new tokens; `--requests` must
                exceed what runs at once at the highest sparsity, or nothing waits there; sparsity 0
                runs first and again last (`--repeat-baseline`), speedups use the mean;
--parts kernel  the decode kernel alone at `--kernel-batch` x `--kernel-context`, every head kept, at each
                `--kernel-kv-dtypes` precision (FP8: e4m3 pages, dequantised in registers; bytes as stored):
                K/V bytes read per second of GPU time (calls replayed from a CUDA graph, as in the
                engine) vs this GPU's measured device-to-device copy bandwidth;
--parts tune    the same call over the kernel's launch grid (`--tune-splits/-blocks/-warps/-stages`),
                fastest first: where the kernel's launch defaults come from;
--parts droppers token-dropping methods (`--droppers`, `--dropper-budget` tokens per KV head) in the engine,
                in the sweep's conditions next to the full cache in the same process: throughput over
                the whole call and under load, sequences at once, and the speedup over the full cache;
--parts profile where a decode step's time goes at each `--profile-sparsities` and for each token
                dropper of `--profile-droppers`, in the sweep's conditions (the sequences its budget
                runs at once, mid-generation contexts):
                time per step with CUDA graphs (no profiler attached), of it the GPU time of the
                step's graph (the rest is host work the device waited for), and the GPU kernels per
                step of eager runs (torch.profiler), top 15: what grows with the batch.
--parts sampling a decode step's sampling and log-probs alone, per mode (`rlkv.engine.runner.MODES`: argmax, noise
                only, top-k by selection, the general top-k / top-p filter) at each
                `--sampling-batches` size over the model's vocabulary, compiled on CUDA as the engine runs it
                (`--sampling-top-k` 20 and top-p 0.95, Qwen's settings): GPU time per call, CUDA graphs;
                against one read of the logits at copy bandwidth. Then the filter's thresholds alone (top-p
                0.95, no top-k) by the search kernel and by a sort (`rlkv.engine.sampling.KERNEL_ROWS`).
Head choice does not change cost: seeded random head scores are used.

    python benchmarks/engine.py --model DIR --parts hf,sweep,kernel --out results/engine.json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import time

import torch
from common import (
    copy_bandwidth,
    event_seconds,
    gpu_seconds,
    load_model,
    print_table,
    profiled,
    speedup_theory,
    synchronize,
    weights_arguments,
    write_result,
)
from hf_cache import prompts

import rlkv
from rlkv.engine.kernel import decode_attention, num_splits
from rlkv.engine.kv import KVStore
from rlkv.engine.tokendrop import TokenDropStore
from rlkv.methods.headsplit import HeadSplit
from rlkv.precision import FP8, KVPrecision, KVPrecisions


def run_engine(model, tok, texts, method, new_tokens, kv_budget, max_batch) -> dict:
    longest = max(len(tok(t, add_special_tokens=False).input_ids) for t in texts)
    engine = rlkv.Engine(
        model, tok, method, kv_budget=kv_budget, max_batch=max_batch, sequence_tokens=longest + new_tokens
    )  # head splits: rings only for the sequences the budget can run
    engine.generate(texts[:max_batch], max_new_tokens=8, eos_token_ids=[])  # warm-up: kernels and CUDA graphs
    outs = engine.generate(texts, max_new_tokens=new_tokens, eos_token_ids=[])
    s = engine.stats
    row = {
        "seconds": s.seconds,
        "tokens": s.generated_tokens,
        "tok_per_s": s.tokens_per_s,
        "loaded_tok_per_s": s.loaded_tokens_per_s,
        "loaded_seconds": s.loaded_seconds,
        "max_running": s.max_running,
        "slots": engine.store.num_slots - 1,
        "pool_pages": s.pages,
        "peak_pages_used": s.peak_pages_used,
        "pool_mib": s.pool_bytes / 2**20,
        "peak_gpu_mib": s.peak_memory / 2**20,
        "kv_ratio": sum(o.kv_bytes for o in outs) / sum(o.kv_bytes_full for o in outs),
    }
    if s.loaded_tokens_per_s:  # a step's time under load, and the GPU time of its graph at a mid-generation context
        row["step_ms_under_load"] = 1e3 * s.max_running / s.loaded_tokens_per_s
        context = round(sum(o.prompt_tokens for o in outs) / len(outs)) + new_tokens // 2
        row.update(_graph_times(engine, s.max_running, context))
    del engine
    torch.cuda.empty_cache()
    return row


def run_hf(model, tok, texts, new_tokens) -> dict:
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    model.generate(**enc, max_new_tokens=8, do_sample=False)  # warm-up
    synchronize()
    start = time.perf_counter()
    out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    synchronize()
    seconds = time.perf_counter() - start
    tokens = out.shape[0] * (out.shape[1] - enc.input_ids.shape[1])
    del out
    torch.cuda.empty_cache()
    return {"seconds": seconds, "tokens": tokens, "tok_per_s": tokens / seconds}


def part_hf(model, tok, heads, args) -> list[dict]:
    rows = []
    for batch in (int(b) for b in args.hf_batches.split(",")):
        texts = prompts(tok, batch)
        hf = run_hf(model, tok, texts, args.hf_new_tokens)
        eng = run_engine(model, tok, texts, _split(heads, 0.0, args), args.hf_new_tokens, args.kv_budget, batch)
        rows.append(
            {
                "part": "hf",
                "batch": batch,
                "hf_tok_per_s": hf["tok_per_s"],
                "engine_tok_per_s": eng["tok_per_s"],
                "engine_vs_hf": eng["tok_per_s"] / hf["tok_per_s"],
            }
        )
        print(
            f"batch {batch}: transformers {hf['tok_per_s']:.0f} tok/s, engine {eng['tok_per_s']:.0f} tok/s", flush=True
        )
    return rows


def part_sweep(model, tok, heads, args, mean_prompt: float) -> list[dict]:
    texts = prompts(tok, args.requests)
    sparsities = [float(s) for s in args.sparsities.split(",")] + ([0.0] if args.repeat_baseline else [])
    rows = []
    for s in sparsities:
        row = {
            "part": "sweep",
            "sparsity": s,
            **run_engine(model, tok, texts, _split(heads, s, args), args.new_tokens, args.kv_budget, args.max_batch),
        }
        rows.append(row)
        print(f"sparsity {s:g}: {row['tok_per_s']:.0f} tok/s, {row['max_running']} running", flush=True)
    length = mean_prompt + args.new_tokens
    add_speedups(rows, [r for r in rows if r["sparsity"] == 0])
    for r in rows:
        r["speedup_theory"] = speedup_theory(r["sparsity"], args.sink, args.recent, length)
        r["of_theory"] = r["loaded_speedup"] / r["speedup_theory"] if r["loaded_speedup"] else None
    return rows


def part_droppers(model, tok, heads, args) -> list[dict]:
    """Each of `--droppers` at `--dropper-budget` tokens per KV head against the full cache, same prompts and budget."""
    texts = prompts(tok, args.requests)
    layout = rlkv.Layout.of(model)
    methods = [("full", _split(heads, 0.0, args))] + [
        (name, rlkv.methods.build(name, layout, 0.0, budget=args.dropper_budget)) for name in args.droppers.split(",")
    ]
    rows = []
    for name, method in methods:
        row = {
            "part": "droppers",
            "method": name,
            "budget": None if name == "full" else args.dropper_budget,
            **run_engine(model, tok, texts, method, args.new_tokens, args.kv_budget, args.max_batch),
        }
        rows.append(row)
        print(f"{name}: {row['tok_per_s']:.0f} tok/s, {row['max_running']} running", flush=True)
    add_speedups(rows, rows[:1])
    return rows


def add_speedups(rows: list[dict], baseline: list[dict]) -> None:
    """Each row's throughputs (whole call, under load) over the mean of the baseline rows' measured ones."""
    for key, ratio in (("tok_per_s", "speedup"), ("loaded_tok_per_s", "loaded_speedup")):
        base = [r[key] for r in baseline if r[key]]
        for r in rows:
            r[ratio] = r[key] / (sum(base) / len(base)) if base and r[key] else None


def _split(heads, sparsity: float, args) -> HeadSplit:
    return HeadSplit(heads.keep_mask(sparsity), args.sink, args.recent)


def kernel_setup(model, args, kv_dtype: str = "bf16"):
    """A store of `--kernel-batch` sequences of `--kernel-context` random tokens, every head kept, and a query;
    `kv_dtype` "fp8": e4m3 pages at scale 1 (the kernel's work does not depend on the scales' values)."""
    layout = rlkv.Layout.of(model)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    batch, context = args.kernel_batch, args.kernel_context
    keep = torch.ones(layout.shape, dtype=torch.bool)
    fp8 = KVPrecision(FP8, torch.ones(2, *layout.shape, device=device))
    precision = KVPrecisions(fp8, fp8) if kv_dtype == "fp8" else dtype
    store = KVStore(
        layout,
        keep,
        args.sink,
        args.recent,
        16,
        batch * (context + 16) * layout.kv_bytes_per_token(),
        batch,
        context,
        device,
        precision,
    )
    for pages in (store.pages_k[0], store.pages_v[0]):
        pages.copy_(torch.randn(pages.shape, device=device).to(pages.dtype))
    slots = torch.arange(1, batch + 1, device=device)
    per_seq = store.pages_for(context)
    for i, slot in enumerate(slots.tolist()):
        store.page_table[slot, :per_seq] = torch.arange(1 + i * per_seq, 1 + (i + 1) * per_seq, dtype=torch.int32)
    lengths = torch.full((batch,), context, device=device)
    q = torch.randn(batch, layout.num_q_heads, layout.head_dim, device=device, dtype=dtype)
    read = 2 * batch * context * layout.num_kv_heads * layout.head_dim * store.pages_k[0].element_size()
    copy = copy_bandwidth(device)
    call = lambda **launch: decode_attention(q, store, 0, slots, lengths, layout.head_dim**-0.5, None, **launch)  # noqa: E731
    return call, read, copy, layout


def part_kernel(model, args) -> list[dict]:
    """The decode kernel with its default launch: K/V bytes read (as stored) per second of GPU time vs copy
    bandwidth, and tokens' K/V per second, at each `--kernel-kv-dtypes` precision."""
    return [kernel_row(model, args, kv_dtype) for kv_dtype in args.kernel_kv_dtypes.split(",")]


def kernel_row(model, args, kv_dtype: str) -> dict:
    call, read, copy, layout = kernel_setup(model, args, kv_dtype)
    seconds = gpu_seconds(call)
    row = {
        "part": "kernel",
        "kv_dtype": kv_dtype,
        "batch": args.kernel_batch,
        "context": args.kernel_context,
        "kv_heads": layout.num_kv_heads,
        "splits": num_splits(args.kernel_batch, layout.num_kv_heads, next(model.parameters()).device),
        "microseconds": seconds * 1e6,
        "kv_gb_per_s": read / seconds / 1e9,
        "mtokens_per_s": args.kernel_batch * args.kernel_context / seconds / 1e6,
        "copy_gb_per_s": copy / 1e9,
        "of_copy_bandwidth": read / seconds / copy,
    }
    print(
        f"kernel ({kv_dtype}): {row['kv_gb_per_s']:.0f} GB/s of K/V vs copy {row['copy_gb_per_s']:.0f} GB/s",
        flush=True,
    )
    return row


def part_sampling(model, args) -> list[dict]:
    """`pick` in each sampling mode (compiled, replayed) on random logits [B, V] of the model's vocabulary."""
    from functools import partial

    from rlkv.engine.compiled import compiled
    from rlkv.engine.nucleus import nucleus_threshold_kernel
    from rlkv.engine.runner import MODES, pick
    from rlkv.engine.sampling import threshold_by_sort, vocab_keys

    device = next(model.parameters()).device
    vocab = model.lm_head.weight.shape[0]
    step = partial(pick, keys=vocab_keys(vocab, device))
    step = compiled(step) if device.type == "cuda" else step  # as engines compile: on CUDA
    copy = copy_bandwidth(device)
    rows = []
    for batch in (int(b) for b in args.sampling_batches.split(",")):
        logits = torch.randn(batch, vocab, device=device, dtype=model.dtype) * 4
        seeds, steps = torch.arange(batch, device=device), torch.zeros(batch, dtype=torch.long, device=device)
        top_k = torch.full((batch,), args.sampling_top_k, device=device)
        temperature, top_p = torch.full((batch,), 0.6, device=device), torch.full((batch,), 0.95, device=device)
        floor = logits.numel() * logits.element_size() / copy
        for mode in (m for m in MODES if m != "logits"):
            seconds = gpu_seconds(partial(step, logits, seeds, steps, top_k, temperature, top_p, mode), reps=20)
            rows.append(
                {
                    "part": "sampling",
                    "mode": mode,
                    "batch": batch,
                    "vocab": vocab,
                    "microseconds": seconds * 1e6,
                    "logits_read_us": floor * 1e6,
                    "of_one_read": floor / seconds,
                }
            )
            print(f"sampling {mode} x {batch}: {seconds * 1e6:.0f} us", flush=True)
        # the filter's thresholds alone, top-p only (R1's 0.6 / 0.95), by the search kernel and by the sort:
        # where the kernel starts to win sets rlkv.engine.sampling.KERNEL_ROWS
        scaled, no_top_k = logits.float() / 0.6, torch.zeros_like(top_k)
        for mode, find in (("threshold_kernel", nucleus_threshold_kernel), ("threshold_sort", threshold_by_sort)):
            seconds = gpu_seconds(partial(find, scaled, no_top_k, top_p), reps=20)
            rows.append(
                {"part": "sampling", "mode": mode, "batch": batch, "vocab": vocab, "microseconds": seconds * 1e6}
            )
            print(f"sampling {mode} x {batch}: {seconds * 1e6:.0f} us", flush=True)
    return rows


def part_tune(model, args) -> list[dict]:
    """The kernel's launch grid (splits x BLOCK x warps x stages) at the kernel part's size; the defaults come
    from here."""
    call, read, copy, layout = kernel_setup(model, args)
    reference = call(splits=1)
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    rows = []
    for splits, block, warps, stages in itertools.product(
        ints(args.tune_splits), ints(args.tune_blocks), ints(args.tune_warps), ints(args.tune_stages)
    ):
        launch = {"splits": splits, "block": block, "num_warps": warps, "num_stages": stages}
        error = (call(**launch).float() - reference.float()).abs().max().item()
        seconds = gpu_seconds(functools.partial(call, **launch))
        rows.append(
            {
                "part": "tune",
                **launch,
                "microseconds": seconds * 1e6,
                "kv_gb_per_s": read / seconds / 1e9,
                "of_copy_bandwidth": read / seconds / copy,
                "max_abs_diff": error,
            }
        )
    rows.sort(key=lambda r: r["microseconds"])
    best = rows[0]
    print(
        f"tune: best of {len(rows)} is splits {best['splits']}, BLOCK {best['block']}, {best['num_warps']} warps, "
        f"{best['num_stages']} stages: {best['kv_gb_per_s']:.0f} GB/s",
        flush=True,
    )
    return rows


def part_profile(model, tok, heads, args, mean_prompt: float) -> list[dict]:
    """Where a decode step's time goes at each `--profile-sparsities` (head splits) and for each of
    `--profile-droppers` (at `--dropper-budget`), in the sweep's conditions: as many sequences as its KV
    budget runs at once, each with a context of half of `--new-tokens` (the mean over a generation).
    Per step: the time with CUDA graphs as the engine runs (no profiler attached), and the GPU kernels
    of eager runs under torch.profiler. Both are the difference between runs of 2 + `--profile-tokens`
    and 2 new tokens, so the prefill cancels out."""
    context = max(1, args.new_tokens // 2)
    layout = rlkv.Layout.of(model)
    methods = [("split", float(s), _split(heads, float(s), args)) for s in args.profile_sparsities.split(",") if s]
    methods += [
        (name, None, rlkv.methods.build(name, layout, 0.0, budget=args.dropper_budget))
        for name in args.profile_droppers.split(",")
        if name
    ]
    rows = []
    for name, s, method in methods:
        engine = rlkv.Engine(
            model,
            tok,
            method,
            kv_budget=args.kv_budget,
            max_batch=args.max_batch,
            cuda_graphs=torch.cuda.is_available(),
        )
        batch = _running(engine, round(mean_prompt) + args.new_tokens, args.max_batch)
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, len(tok), (batch, context), generator=generator).tolist()  # content does not change cost
        engine.generate(ids, max_new_tokens=8, eos_token_ids=[])  # warm-up: kernels and CUDA graphs

        (t0, n0), (t1, n1) = _timed(engine, ids, 2), _timed(engine, ids, 2 + args.profile_tokens)
        row = {
            "part": "profile",
            "method": name,
            "sparsity": s,
            "batch": batch,
            "context": context,
            "ms_per_step": 1e3 * (t1 - t0) / (n1 - n0),
            **_graph_times(engine, batch, context),
        }
        del engine
        engine = rlkv.Engine(model, tok, method, kv_budget=args.kv_budget, max_batch=args.max_batch, cuda_graphs=False)
        per_step = kernels_per_step(engine, ids, args.profile_tokens)
        top = sorted(((k, c, us) for k, (c, us) in per_step.items() if us > 0), key=lambda e: -e[2])
        row["kernels_per_step"] = sum(c for _, c, _ in top)
        row["gpu_ms_per_step"] = sum(us for *_, us in top) / 1e3
        row["top_kernels"] = [{"name": k[:80], "calls_per_step": c, "us_per_step": us} for k, c, us in top[:15]]
        rows.append(row)
        del engine
        torch.cuda.empty_cache()
        label = f"sparsity {s:g}" if s is not None else name
        print(
            f"{label}: {batch} sequences of {context} tokens, {row['ms_per_step']:.2f} ms per decode step "
            f"(its graph {row.get('graph_ms', 0):.2f} ms of GPU time), "
            f"eager GPU kernels {row['gpu_ms_per_step']:.2f} ms",
            flush=True,
        )
    return rows


def _running(engine, sequence_tokens: int, max_batch: int) -> int:
    """How many sequences of `sequence_tokens` the engine's KV budget runs at once (what the sweep reserves)."""
    if isinstance(engine.store, TokenDropStore):  # a slot per sequence, whatever its length
        return min(max_batch, engine.store.num_slots - 1)
    per_request = engine.store.pages_for(sequence_tokens)
    return min(max_batch, engine.store.capacity_pages // per_request) if per_request else max_batch


def _decode_graph(engine, batch: int, context: int):
    """The CUDA graph of one decode step (forward, greedy sampling, log-probs), its inputs set to `batch` rows of
    `context` tokens (None without graphs)."""
    if not engine.cuda_graphs:
        return None
    runner = engine.runner
    bucket = next(b for b in runner.buckets if b >= batch)
    engine._open()  # a graph not captured yet is captured with the engine's attention in the model
    try:
        with torch.inference_mode():  # the graph's input buffers are inference tensors
            graph, _ = runner._graph(("decode", bucket), "greedy")
            runner._static.zero_()
            runner._static[1, :batch] = context
            runner._static[2, :batch] = torch.arange(1, batch + 1)  # slots still hold the last call's page tables
    finally:
        engine._close()
    return graph


def _graph_times(engine, batch: int, context: int) -> dict:
    """GPU milliseconds of one decode step's CUDA graph at `batch` rows of `context` tokens: what remains of a
    step's time is the host's that the device waited for."""
    graph = _decode_graph(engine, batch, context)
    return {} if graph is None else {"graph_ms": 1e3 * event_seconds(graph.replay)}


def _timed(engine, ids, new: int) -> tuple[float, int]:
    """(seconds, decode steps) of one `generate` of `new` tokens per sequence, from the engine's stats."""
    engine.generate(ids, max_new_tokens=new, eos_token_ids=[])
    return engine.stats.seconds, engine.stats.decode_steps


def kernels_per_step(engine, ids, steps: int) -> dict[str, tuple[float, float]]:
    """GPU kernels of one eager decode step: name -> (calls, microseconds), the difference of generates of
    2 + `steps` and 2 new tokens over their difference in decode steps (the prefill cancels out)."""
    (a, n0), (b, n1) = _kernels(engine, ids, 2), _kernels(engine, ids, 2 + steps)
    done = max(n1 - n0, 1)
    return {
        k: ((calls - a.get(k, (0, 0))[0]) / done, (us - a.get(k, (0, 0))[1]) / done) for k, (calls, us) in b.items()
    }


def _kernels(engine, ids, new: int) -> tuple[dict[str, tuple[int, float]], int]:
    """GPU kernels of one eager `generate` under torch.profiler: name -> (calls, microseconds); and its decode steps."""
    _, averages = profiled(lambda: engine.generate(ids, max_new_tokens=new, eos_token_ids=[]))
    events = {
        e.key: (e.count, e.self_device_time_total) for e in averages if getattr(e, "self_device_time_total", 0) > 0
    }
    return events, engine.stats.decode_steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    weights_arguments(ap)
    ap.add_argument("--parts", default="hf,sweep,kernel")
    ap.add_argument("--hf-batches", default="1,32,128")
    ap.add_argument("--hf-new-tokens", type=int, default=512)
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=4096)
    ap.add_argument("--kv-budget", default="4GiB")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--sparsities", default="0,0.2,0.4,0.5,0.6,0.8")
    ap.add_argument("--repeat-baseline", action="store_true", help="run sparsity 0 again last")
    ap.add_argument("--profile-tokens", type=int, default=16, help="decode steps timed and profiled")
    ap.add_argument("--profile-sparsities", default="0,0.5")
    ap.add_argument("--profile-droppers", default="", help="token droppers to profile too, e.g. h2o,rkv")
    ap.add_argument("--kernel-batch", type=int, default=64)
    ap.add_argument("--kernel-context", type=int, default=4096)
    ap.add_argument("--kernel-kv-dtypes", default="bf16", help="the kernel part's KV precisions: bf16, fp8")
    ap.add_argument("--sampling-batches", default="1,8,32,64,128,256")
    ap.add_argument("--sampling-top-k", type=int, default=20)
    ap.add_argument("--tune-splits", default="1,2,4,8")
    ap.add_argument("--tune-blocks", default="64,128,256")
    ap.add_argument("--tune-warps", default="4,8")
    ap.add_argument("--tune-stages", default="2,3")
    ap.add_argument("--droppers", default="h2o,snapkv,rkv")
    ap.add_argument("--dropper-budget", type=int, default=256, help="tokens per KV head kept by each dropper")
    ap.add_argument("--sink", type=int, default=16)
    ap.add_argument("--recent", type=int, default=64)
    ap.add_argument("--out", default="results/engine.json")
    args = ap.parse_args()

    model, tok = load_model(args.model, args.random_weights)
    layout = rlkv.Layout.of(model)
    heads = rlkv.HeadScores.random(layout, seed=0)
    mean_prompt = (
        sum(len(tok(t, add_special_tokens=False).input_ids) for t in prompts(tok, args.requests)) / args.requests
    )
    meta = {
        "benchmark": "engine",
        "model": args.model,
        "layout": layout.to_dict(),
        **vars(args),
        "mean_prompt_tokens": mean_prompt,
    }
    rows = []
    parts = args.parts.split(",")
    for part in parts:
        if part == "hf":
            rows += part_hf(model, tok, heads, args)
        elif part == "sweep":
            rows += part_sweep(model, tok, heads, args, mean_prompt)
        elif part == "kernel":
            rows += part_kernel(model, args)
        elif part == "tune":
            rows += part_tune(model, args)
        elif part == "profile":
            rows += part_profile(model, tok, heads, args, mean_prompt)
        elif part == "droppers":
            rows += part_droppers(model, tok, heads, args)
        elif part == "sampling":
            rows += part_sampling(model, args)
        else:
            raise SystemExit(f"unknown part {part!r}: expected hf, sweep, kernel, tune, profile, droppers or sampling")
        write_result(args.out, {**meta, "complete": False, "rows": rows})  # partial results survive a kill
    for part, cols in (
        ("hf", ["batch", "hf_tok_per_s", "engine_tok_per_s", "engine_vs_hf"]),
        (
            "sweep",
            [
                "sparsity",
                "tok_per_s",
                "speedup",
                "loaded_tok_per_s",
                "loaded_speedup",
                "speedup_theory",
                "of_theory",
                "max_running",
                "step_ms_under_load",
                "graph_ms",
                "kv_ratio",
                "seconds",
            ],
        ),
        (
            "kernel",
            [
                "kv_dtype",
                "batch",
                "context",
                "splits",
                "microseconds",
                "kv_gb_per_s",
                "mtokens_per_s",
                "copy_gb_per_s",
                "of_copy_bandwidth",
            ],
        ),
        (
            "tune",
            [
                "splits",
                "block",
                "num_warps",
                "num_stages",
                "microseconds",
                "kv_gb_per_s",
                "of_copy_bandwidth",
                "max_abs_diff",
            ],
        ),
        (
            "profile",
            [
                "method",
                "sparsity",
                "batch",
                "context",
                "ms_per_step",
                "graph_ms",
                "kernels_per_step",
                "gpu_ms_per_step",
            ],
        ),
        ("sampling", ["mode", "batch", "vocab", "microseconds", "logits_read_us", "of_one_read"]),
        (
            "droppers",
            [
                "method",
                "budget",
                "tok_per_s",
                "speedup",
                "loaded_tok_per_s",
                "loaded_speedup",
                "max_running",
                "step_ms_under_load",
                "graph_ms",
                "kv_ratio",
                "seconds",
            ],
        ),
    ):
        if any(r["part"] == part for r in rows):
            print_table([r for r in rows if r["part"] == part], cols)
    write_result(args.out, {**meta, "complete": True, "rows": rows})


if __name__ == "__main__":
    main()
