"""Speed and memory of the transformers path (`compress` / token droppers + `generate`) against a DynamicCache.

For each batch size, the same left-padded batch of prompts generates exactly `--new-tokens`
tokens per row (min_new_tokens, greedy) with: a plain DynamicCache (first), `rlkv.compress`
at each sparsity, each token dropper at the budget that holds the same mean bytes as rlkv at
`--match-sparsity` (`rlkv.methods.matching`, from the layout alone), and the DynamicCache again
(last; speedups are against the faster of the two: the first pays one-time costs, such as the
execution plan cuDNN's attention builds for every new shape). All in one process, side by side: wall time,
decode tokens/s, KV bytes the cache holds at the end, peak GPU memory above the weights; with
`--profile-tokens N`, where a short generate's time goes (torch.profiler: the kernels' busy time
per step against the wall time per step, and the operators that take the most). Head
choice does not change cost, so seeded random head scores are used unless `--heads` is given.
Results are written after every configuration (a killed run keeps what it measured). On a GPU,
`compress` and the token droppers replay their decoding steps from CUDA graphs (`rlkv.hf.graphs`;
`--no-cuda-graphs` runs them eagerly).
`--no-cudnn-attention` keeps torch's SDPA off cuDNN for every configuration, so the DynamicCache
does not pay cuDNN's plan per new shape and its first run is as fast as its second.
`--rounds N` runs the eager and graphed configurations N times, every other round in reverse order, so
that a drift of the host's speed over the run falls on every configuration alike; `medians` in the
JSON holds each configuration's median tokens/s over its runs and its ratio to the DynamicCache's.
`--static-baseline` adds transformers' own fast path, a StaticCache that `generate` compiles on a GPU
(first compiling, then compiled; `vs_static` rates every row against the faster run). It runs after
the last DynamicCache, so that nothing the compiler leaves in the process touches the eager rows.

    python benchmarks/hf_cache.py --model Qwen/Qwen2.5-Coder-1.5B-Instruct --batches 1,8,32 --new-tokens 2048
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from contextlib import contextmanager

import torch
from common import (
    load_model,
    print_table,
    profiled,
    synchronize,
    weights_arguments,
    write_result,
)

import rlkv
from rlkv.hf.plumbing import output_cache
from rlkv.hf.tokendrop import token_drop
from rlkv.methods.matching import match_budget

TOPICS = [
    "the history of the printing press",
    "how bridges carry load",
    "the water cycle",
    "prime numbers",
    "the life of honey bees",
    "how compilers work",
    "the French revolution",
    "black holes",
    "photosynthesis",
    "the invention of the telescope",
    "plate tectonics",
    "the Roman road network",
    "how vaccines work",
    "the game of chess",
    "ocean currents",
    "the first computers",
]


def prompts(tok, n: int) -> list[str]:
    texts = [
        f"Write a long, detailed essay about {TOPICS[i % len(TOPICS)]} (part {i // len(TOPICS) + 1})." for i in range(n)
    ]
    return [
        tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        for t in texts
    ]


def measure(model, enc, new_tokens: int, apply) -> dict:
    """One generate of exactly `new_tokens` per row; `apply(model)` is the method's context manager (None: plain)."""
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True)
    cuda = torch.cuda.is_available()
    gc.collect()  # what the previous configuration left must not count in this one's base
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    synchronize()
    base = torch.cuda.memory_allocated() if cuda else 0
    start = time.perf_counter()
    if apply is None:
        out = model.generate(**enc, **kw)
        cache = output_cache(out)
    else:
        with apply(model) as handle:
            out = model.generate(**enc, **kw)
        cache = handle.cache if handle is not None else output_cache(out)
    synchronize()
    elapsed = time.perf_counter() - start
    generated = out.sequences.shape[0] * (out.sequences.shape[1] - enc["input_ids"].shape[1])
    if generated != enc["input_ids"].shape[0] * new_tokens:
        raise RuntimeError(f"generated {generated} tokens, expected {enc['input_ids'].shape[0]} x {new_tokens}")
    result = {
        "kv_bytes_end": rlkv.cache_nbytes(cache),
        "peak_mem_above_weights": (torch.cuda.max_memory_allocated() - base) if cuda else 0,
        "seconds": elapsed,
        "tokens": generated,
        "tok_per_s": generated / elapsed,
        "cuda_graphs": getattr(cache, "graph", None) is not None,  # decoding steps replayed (rlkv.hf.graphs)
    }
    del out, cache
    return result


def profile(model, enc, new_tokens: int, apply) -> dict:
    """Where one short generate's time goes: wall and kernel-busy ms per token step, top operators by self time."""
    cuda = torch.cuda.is_available()
    wall, events = profiled(lambda: measure(model, enc, new_tokens, apply)["seconds"])
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    top = sorted(events, key=own, reverse=True)[:10]
    return {
        "tokens": new_tokens,
        "wall_ms_per_step": 1e3 * wall / new_tokens,
        "busy_ms_per_step": sum(own(e) for e in events) / 1e3 / new_tokens if cuda else None,
        "top_ms_per_step": {e.key: own(e) / 1e3 / new_tokens for e in top},
    }


def headsplit_samples(
    keep: torch.Tensor, layout, sink: int, recent: int, prompt_tokens: list[int], new: int
) -> list[dict]:
    """Per row, the mean bytes a head split with `keep` holds over its decoding steps (what eval records)."""
    itemsize = torch.empty((), dtype=getattr(torch, layout.dtype)).element_size()
    per_slot = 2 * layout.head_dim * itemsize
    ring = sink + recent
    fixed = int((~keep).sum()) * ring * per_slot + int((~keep).any(dim=1).sum()) * ring * 8
    per_token = int(keep.sum()) * per_slot
    samples = []
    for p in prompt_tokens:
        steps = torch.arange(p + 1, p + new + 1, dtype=torch.float64)
        samples.append({"prompt_tokens": p, "tokens": new, "kv_bytes_mean": float((steps * per_token + fixed).mean())})
    return samples


@contextmanager
def static_cache(model):
    """`generate` with transformers' StaticCache, which it compiles (torch.compile, CUDA graphs) on a GPU."""
    config = model.generation_config
    before = config.cache_implementation
    config.cache_implementation = "static"
    try:
        yield None
    finally:
        config.cache_implementation = before


def configs(args, model, layout, heads, prompt_tokens: list[int]) -> list[tuple[str, dict, object]]:
    """(name, row fields, apply) per configuration of one batch: DynamicCache first and last, then the
    StaticCache (compiling, compiled) with `--static-baseline`."""
    out = [("DynamicCache", {"method": "full"}, None)]
    for s in args.sparsities:
        out.append(
            (
                f"rlkv s={s:g}",
                {"method": "rlkv", "sparsity": s},
                lambda m, s=s: rlkv.compress(
                    m,
                    heads,
                    sparsity=s,
                    sink=args.sink,
                    recent=args.recent,
                    prefill=args.prefill,
                    cuda_graphs=args.cuda_graphs,
                ),
            )
        )
    if args.droppers:
        keep = heads.keep_mask(args.match_sparsity)
        samples = headsplit_samples(keep, layout, args.sink, args.recent, prompt_tokens, args.new_tokens)
        for name in args.droppers:
            match = match_budget(
                lambda b, name=name: rlkv.methods.build(name, layout, args.match_sparsity, budget=b), layout, samples
            )
            policy = rlkv.methods.build(name, layout, args.match_sparsity, budget=match.budget).policy
            out.append(
                (
                    f"{name} b={match.budget}",
                    {
                        "method": name,
                        "budget": match.budget,
                        "matched_to": f"rlkv s={args.match_sparsity:g}",
                        "bytes_excess": match.excess,
                    },
                    lambda m, policy=policy: token_drop(m, policy, cuda_graphs=args.cuda_graphs),
                )
            )
    out.append(("DynamicCache (again)", {"method": "full"}, None))
    if args.static_baseline:  # its first run compiles (its own warm-up), the second runs compiled
        out += [(f"StaticCache{again}", {"method": "full-static"}, static_cache) for again in ("", " (again)")]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--heads", default=None, help="head scores file (default: seeded random scores)")
    ap.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    ap.add_argument("--new-tokens", type=int, default=2048)
    ap.add_argument("--sparsities", default="0,0.5,0.8", help="comma-separated; empty for none")
    ap.add_argument("--droppers", default="h2o,snapkv,rkv", help="token droppers at equal bytes; empty for none")
    ap.add_argument(
        "--match-sparsity", type=float, default=0.5, help="the droppers hold the bytes of rlkv at this sparsity"
    )
    ap.add_argument("--sink", type=int, default=16)
    ap.add_argument("--recent", type=int, default=64)
    ap.add_argument("--prefill", default="full", choices=["compressed", "full"])
    ap.add_argument("--warmup-tokens", type=int, default=8, help="a short generate of every configuration first")
    ap.add_argument(
        "--profile-tokens", type=int, default=0, help="profile a generate of this many tokens per configuration"
    )
    ap.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_const",
        const=False,
        default=None,
        help="compress and the token droppers decode eagerly (default: CUDA graphs on a GPU)",
    )
    ap.add_argument(
        "--static-baseline",
        action="store_true",
        help="also transformers' StaticCache, compiled by generate on a GPU (twice: compiling, compiled)",
    )
    ap.add_argument(
        "--no-cudnn-attention",
        dest="cudnn_attention",
        action="store_false",
        help="keep SDPA off cuDNN everywhere (the DynamicCache then pays no plan per new shape)",
    )
    ap.add_argument(
        "--rounds", type=int, default=1, help="run the configurations this many times, every other round reversed"
    )
    weights_arguments(ap)
    ap.add_argument("--out", default="results/hf_cache.json")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    if not args.cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    args.sparsities = [float(s) for s in args.sparsities.split(",") if s]
    args.droppers = [d for d in args.droppers.split(",") if d]

    model, tok = load_model(args.model, args.random_weights)
    layout = rlkv.Layout.of(model)
    heads = rlkv.HeadScores.load(args.heads) if args.heads else rlkv.HeadScores.random(layout, seed=0)
    meta = {
        "benchmark": "hf_cache",
        "model": args.model,
        "layout": layout.to_dict(),
        "new_tokens": args.new_tokens,
        "sink": args.sink,
        "recent": args.recent,
        "prefill": args.prefill,
        "cuda_graphs": args.cuda_graphs,
        "static_baseline": args.static_baseline,
        "cudnn_attention": args.cudnn_attention,
        "rounds": args.rounds,
        "random_weights": args.random_weights,
    }
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        enc = tok(prompts(tok, batch), return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        prompt_tokens = enc["attention_mask"].sum(-1).tolist()
        plan = configs(args, model, layout, heads, prompt_tokens)
        for _, _, apply in eager_and_graphed(plan)[:-1]:  # warm-up: kernels, allocator, autotuning
            measure(model, enc, args.warmup_tokens, apply)
        first = len(rows)
        for rnd, (name, fields, apply) in in_rounds(plan, args.rounds):
            r = {
                "batch": batch,
                "config": name,
                "sparsity": None,
                **fields,
                "round": rnd,
                **measure(model, enc, args.new_tokens, apply),
            }
            if args.profile_tokens:
                r["profile"] = profile(model, enc, args.profile_tokens, apply)
            rows.append(r)
            print(
                f"batch {batch} {name}: {r['tok_per_s']:.1f} tok/s, {r['seconds']:.1f} s, "
                f"KV {r['kv_bytes_end'] / 2**20:.1f} MiB",
                flush=True,
            )
            write_result(args.out, {**meta, "complete": False, "rows": rows})  # partial results survive a kill
        summarize(rows[first:], args, prompt_tokens)
    print_table(
        rows,
        [
            "batch",
            "config",
            "round",
            "kv_mib_end",
            "kv_ratio",
            "kv_ratio_theory",
            "peak_mib",
            "peak_ratio",
            "tok_per_s",
            "speedup",
            *(["vs_static"] if args.static_baseline else []),
        ],
    )
    result = {**meta, "complete": True, "rows": rows}
    if args.rounds > 1:
        result["medians"] = medians(rows)
        print_table(result["medians"], ["batch", "method", "sparsity", "runs", "median_tok_per_s", "vs_dynamic"])
    write_result(args.out, result)


def eager_and_graphed(plan: list) -> list:
    """The configurations that warm up and repeat in rounds: all but the StaticCache, whose first row
    compiles (its own warm-up)."""
    return [c for c in plan if c[1]["method"] != "full-static"]


def in_rounds(plan: list, rounds: int):
    """(round, configuration) in run order: every round of the plan, odd rounds reversed; the StaticCache's
    two rows (compiling, compiled) once, last."""
    timed = eager_and_graphed(plan)
    for rnd in range(rounds):
        yield from ((rnd, c) for c in (timed if rnd % 2 == 0 else timed[::-1]))
    yield from ((0, c) for c in plan if c[1]["method"] == "full-static")


def medians(rows: list[dict]) -> list[dict]:
    """Per batch and configuration (both DynamicCache rows pooled), the median tokens/s over its runs and its
    ratio to the DynamicCache's median."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        key = (r["batch"], r["method"], r.get("sparsity"), r.get("budget"))
        groups.setdefault(key, []).append(r["tok_per_s"])
    out = [
        {
            "batch": b,
            "method": m,
            "sparsity": s,
            "budget": budget,
            "runs": len(v),
            "median_tok_per_s": statistics.median(v),
        }
        for (b, m, s, budget), v in groups.items()
    ]
    base = {r["batch"]: r["median_tok_per_s"] for r in out if r["method"] == "full"}
    for r in out:
        r["vs_dynamic"] = r["median_tok_per_s"] / base[r["batch"]]
    return out


def summarize(rows: list[dict], args, prompt_tokens: list[int]) -> None:
    """Ratios of one batch's rows against its DynamicCache runs (speed: the faster of the first and last)."""
    baselines = [r for r in rows if r["method"] == "full"]
    speed = max(r["tok_per_s"] for r in baselines)
    static = max((r["tok_per_s"] for r in rows if r["method"] == "full-static"), default=None)
    total = sum(prompt_tokens) / len(prompt_tokens) + args.new_tokens
    for r in rows:
        r["kv_ratio"] = r["kv_bytes_end"] / baselines[0]["kv_bytes_end"]
        r["peak_ratio"] = r["peak_mem_above_weights"] / max(1, baselines[0]["peak_mem_above_weights"])
        r["speedup"] = r["tok_per_s"] / speed
        if static is not None:
            r["vs_static"] = r["tok_per_s"] / static
        if r["method"] == "rlkv":
            s = r["sparsity"]
            r["kv_ratio_theory"] = (1 - s) + s * min(1.0, (args.sink + args.recent) / total)
        r["kv_mib_end"] = r["kv_bytes_end"] / 2**20
        r["peak_mib"] = r["peak_mem_above_weights"] / 2**20


if __name__ == "__main__":
    main()
