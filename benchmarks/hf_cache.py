"""Memory and speed of `compress(...)` + transformers `generate` against a plain DynamicCache.

For each configuration (plain DynamicCache, then sparsity s with a HeadSplitCache) the same
batch of prompts generates exactly `--new-tokens` tokens (EOS suppressed), greedy. Measured
in one process, side by side: peak GPU memory above the weights, KV bytes the cache holds at
the end, wall time and decode tokens/s. The DynamicCache baseline runs first (and again
last with --repeat-baseline; speedups are then against the mean of the two). Head choice does not change cost, so seeded random
head scores are used unless `--heads` is given.

    python benchmarks/hf_cache.py --model M.gguf --batch 32 --new-tokens 2048 --sparsities 0,0.5,0.8
"""

from __future__ import annotations

import argparse
import time

import torch
from common import print_table, synchronize, write_result

import rlkv
from rlkv.attention.plumbing import output_cache

TOPICS = [
    "the history of the printing press", "how bridges carry load", "the water cycle", "prime numbers",
    "the life of honey bees", "how compilers work", "the French revolution", "black holes",
    "photosynthesis", "the invention of the telescope", "plate tectonics", "the Roman road network",
    "how vaccines work", "the game of chess", "ocean currents", "the first computers",
]


def prompts(tok, n: int) -> list[str]:
    texts = [f"Write a long, detailed essay about {TOPICS[i % len(TOPICS)]} (part {i // len(TOPICS) + 1})." for i in range(n)]
    return [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True) for t in texts]


def measure(model, enc, new_tokens: int, compress_args: dict | None) -> dict:
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    synchronize()
    base = torch.cuda.memory_allocated() if cuda else 0
    start = time.perf_counter()
    if compress_args is None:
        out = model.generate(**enc, **kw)
        cache = output_cache(out)
    else:
        with rlkv.compress(model, **compress_args) as handle:
            out = model.generate(**enc, **kw)
        cache = handle.cache
    synchronize()
    elapsed = time.perf_counter() - start
    generated = out.sequences.shape[0] * (out.sequences.shape[1] - enc.input_ids.shape[1])
    result = {
        "kv_bytes_end": rlkv.cache_nbytes(cache),
        "peak_mem_above_weights": (torch.cuda.max_memory_allocated() - base) if cuda else 0,
        "seconds": elapsed,
        "tokens": generated,
        "tok_per_s": generated / elapsed,
    }
    del out, cache
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--heads", default=None, help="head scores file (default: seeded random scores)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=2048)
    ap.add_argument("--sparsities", default="0,0.5,0.8")
    ap.add_argument("--sink", type=int, default=16)
    ap.add_argument("--recent", type=int, default=64)
    ap.add_argument("--out", default="results/hf_cache.json")
    ap.add_argument("--repeat-baseline", action="store_true", help="run the DynamicCache baseline again last")
    args = ap.parse_args()

    model, tok = rlkv.load_model(args.model)
    layout = rlkv.Layout.of(model)
    heads = rlkv.HeadScores.load(args.heads) if args.heads else rlkv.HeadScores.random(layout, seed=0)
    enc = tok(prompts(tok, args.batch), return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    configs = [("DynamicCache", None)] + [
        (f"rlkv s={s:g}", dict(heads=heads, sparsity=s, sink=args.sink, recent=args.recent))
        for s in map(float, args.sparsities.split(","))
    ]
    if args.repeat_baseline:  # the baseline again at the end: shows drift over the run
        configs.append(("DynamicCache (again)", None))
    for _, cfg in configs:  # warm-up: kernels, allocator, autotuning
        measure(model, enc, 8, cfg)
    rows = []
    meta = {"benchmark": "hf_cache", "model": args.model, "layout": layout.to_dict(), "batch": args.batch,
            "prompt_tokens": enc.input_ids.shape[1], "new_tokens": args.new_tokens, "sink": args.sink, "recent": args.recent}
    for name, cfg in configs:
        r = measure(model, enc, args.new_tokens, cfg)
        rows.append({"config": name, "sparsity": None if cfg is None else cfg["sparsity"], **r})
        print(f"{name}: {r['tok_per_s']:.1f} tok/s, peak {r['peak_mem_above_weights'] / 2**20:.0f} MiB", flush=True)
        write_result(args.out, {**meta, "complete": False, "rows": rows})  # partial results survive a kill
    baselines = [r for r in rows if r["sparsity"] is None]
    plain = dict(rows[0], tok_per_s=sum(r["tok_per_s"] for r in baselines) / len(baselines))
    for r in rows:
        r["kv_ratio"] = r["kv_bytes_end"] / plain["kv_bytes_end"]
        r["peak_ratio"] = r["peak_mem_above_weights"] / max(1, plain["peak_mem_above_weights"])
        r["speedup"] = r["tok_per_s"] / plain["tok_per_s"]
        s = r["sparsity"] or 0.0
        total = enc.input_ids.shape[1] + args.new_tokens
        r["kv_ratio_theory"] = (1 - s) + s * min(1.0, (args.sink + args.recent) / total)
        r["kv_mib_end"] = r["kv_bytes_end"] / 2**20
        r["peak_mib"] = r["peak_mem_above_weights"] / 2**20
    print_table(rows, ["config", "kv_mib_end", "kv_ratio", "kv_ratio_theory", "peak_mib", "peak_ratio", "tok_per_s", "speedup"])
    write_result(args.out, {**meta, "complete": True, "rows": rows})


if __name__ == "__main__":
    main()
