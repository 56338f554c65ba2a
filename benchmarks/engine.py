"""End-to-end throughput of `rlkv.Engine` at several sparsities under one KV budget, side by side.

Every configuration generates exactly `--new-tokens` tokens (EOS ignored) for the same
`--requests` prompts under the same `--kv-budget`. Compression makes a page cheaper, so the
same budget admits more concurrent sequences (memory rebalancing), and each decode step reads
fewer K/V bytes. Full attention (sparsity 0) runs first and again last (`--repeat-baseline`):
speedups are against the mean of the two. With `--hf-requests N`, transformers `generate`
inside `rlkv.compress` runs the first N prompts in one batch at each sparsity too, for scale.
Head choice does not change cost: seeded random head scores are used.

    python benchmarks/engine.py --model DIR --requests 512 --new-tokens 2048 --kv-budget 3GiB --sparsities 0,0.5,0.6,0.8
"""

from __future__ import annotations

import argparse
import time

import torch
from common import print_table, synchronize, write_result
from hf_cache import prompts

import rlkv
from rlkv.methods.headsplit import HeadSplit


def run_engine(model, tok, texts, keep, args) -> dict:
    engine = rlkv.Engine(model, tok, HeadSplit(keep, args.sink, args.recent), kv_budget=args.kv_budget,
                         max_batch=args.max_batch)
    engine.generate(texts[: args.max_batch], max_new_tokens=8, eos_token_ids=[])  # warm-up: kernels and graphs
    outs = engine.generate(texts, max_new_tokens=args.new_tokens, eos_token_ids=[])
    s = engine.stats
    row = {
        "path": "engine", "seconds": s.seconds, "tokens": s.generated_tokens, "tok_per_s": s.tokens_per_s,
        "max_running": s.max_running, "pool_pages": s.pages, "peak_pages_used": s.peak_pages_used,
        "pool_mib": s.pool_bytes / 2**20, "peak_gpu_mib": s.peak_memory / 2**20,
        "kv_mib_end_per_seq": sum(o.kv_bytes for o in outs) / len(outs) / 2**20,
        "kv_ratio": sum(o.kv_bytes for o in outs) / sum(o.kv_bytes_full for o in outs),
    }
    del engine
    torch.cuda.empty_cache()
    return row


def run_hf(model, tok, texts, keep, args) -> dict:
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    with rlkv.compress(model, keep, sink=args.sink, recent=args.recent):
        model.generate(**enc, max_new_tokens=8, do_sample=False)  # warm-up
        synchronize()
        start = time.perf_counter()
        out = model.generate(**enc, **kw)
        synchronize()
    seconds = time.perf_counter() - start
    tokens = out.shape[0] * (out.shape[1] - enc.input_ids.shape[1])
    torch.cuda.empty_cache()
    return {"path": "transformers", "seconds": seconds, "tokens": tokens, "tok_per_s": tokens / seconds,
            "max_running": len(texts)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=2048)
    ap.add_argument("--kv-budget", default="3GiB")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--sparsities", default="0,0.5,0.8")
    ap.add_argument("--sink", type=int, default=16)
    ap.add_argument("--recent", type=int, default=64)
    ap.add_argument("--hf-requests", type=int, default=0, help="also time transformers generate on this many prompts")
    ap.add_argument("--repeat-baseline", action="store_true", help="run sparsity 0 again last")
    ap.add_argument("--out", default="results/engine.json")
    args = ap.parse_args()

    model, tok = rlkv.load_model(args.model)
    layout = rlkv.Layout.of(model)
    heads = rlkv.HeadScores.random(layout, seed=0)
    texts = prompts(tok, args.requests)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    if args.repeat_baseline:
        sparsities.append(0.0)
    meta = {"benchmark": "engine", "model": args.model, "layout": layout.to_dict(), "requests": args.requests,
            "new_tokens": args.new_tokens, "kv_budget": args.kv_budget, "max_batch": args.max_batch,
            "sink": args.sink, "recent": args.recent, "mean_prompt_tokens":
            sum(len(tok(t, add_special_tokens=False).input_ids) for t in texts) / len(texts)}
    rows = []
    for sparsity in sparsities:
        keep = heads.keep_mask(sparsity)
        paths = [run_engine] + ([run_hf] if args.hf_requests else [])
        for run in paths:
            subset = texts if run is run_engine else texts[: args.hf_requests]
            row = {"sparsity": sparsity, **run(model, tok, subset, keep, args)}
            rows.append(row)
            print(f"{row['path']} s={sparsity:g}: {row['tok_per_s']:.0f} tok/s, {row['max_running']} running", flush=True)
            write_result(args.out, {**meta, "complete": False, "rows": rows})  # partial results survive a kill
    for path in {r["path"] for r in rows}:
        base = [r["tok_per_s"] for r in rows if r["path"] == path and r["sparsity"] == 0]
        for r in rows:
            if r["path"] == path and base:
                r["speedup"] = r["tok_per_s"] / (sum(base) / len(base))
    engine_full = [r["tok_per_s"] for r in rows if r["path"] == "engine" and r["sparsity"] == 0]
    for r in rows:
        if engine_full:
            r["vs_engine_full"] = r["tok_per_s"] / (sum(engine_full) / len(engine_full))
        total = meta["mean_prompt_tokens"] + args.new_tokens
        s = r["sparsity"]
        r["kv_ratio_theory"] = (1 - s) + s * min(1.0, (args.sink + args.recent) / total)
    print_table(rows, ["path", "sparsity", "tok_per_s", "speedup", "vs_engine_full", "max_running", "pool_pages",
                       "kv_ratio", "kv_ratio_theory", "peak_gpu_mib", "seconds"])
    write_result(args.out, {**meta, "complete": True, "rows": rows})


if __name__ == "__main__":
    main()
