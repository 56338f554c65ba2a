"""The paper's efficiency table: accuracy, time and throughput of real generations at each sparsity.

For every admission policy (`--admissions`), KV precision (`--kv-dtypes`: bf16, fp8, fp8-kept) and sparsity the
same task prompts are generated
greedily through `rlkv.Engine` with the head scores `--heads` (sparsity 0 = the full cache) under
one KV budget, then graded. The policies: "demand" (pages as sequences grow, preemption when the
pool runs dry: the engine's default) and "reserve" (every request holds pages for prompt +
max_new_tokens from its admission: the engine's former policy, and the rings only for as many
sequences as that admits). Reported per (policy, sparsity): accuracy, mean generated tokens, wall
time, tokens/s, sequences at once, preemptions, end-to-end speedup and throughput ratio against
sparsity 0 at bf16 under the same policy (same run), the ratio of demand over reserve at the same sparsity
and precision,
and the theoretical speedup 1 / ((1 - s) + s * (sink + recent) / L) with L the mean sequence length.

    python benchmarks/efficiency.py --model DIR --heads heads.json --task math500 --limit 500 \
        --sparsities 0,0.2,0.4,0.5,0.6,0.8 --max-new-tokens 4096 --kv-budget 4GiB --data-dir DATA \
        --admissions demand,reserve --kv-dtypes bf16,fp8 --out results/efficiency.json
"""

from __future__ import annotations

import argparse
import itertools

import torch
from common import print_table, speedup_theory, write_result

import rlkv
from rlkv.methods.headsplit import HeadSplit


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--heads", required=True)
    ap.add_argument("--task", default="math500")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--sparsities", default="0,0.2,0.4,0.5,0.6,0.8")
    ap.add_argument("--max-new-tokens", type=int, default=4096)
    ap.add_argument("--kv-budget", default=None, help="bytes or a size like 20GiB (default: 80%% of free GPU memory)")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--admissions", default="demand,reserve", help="engine admission policies, side by side")
    ap.add_argument("--kv-dtypes", default="bf16", help="comma-separated KV precisions: bf16, fp8, fp8-kept")
    ap.add_argument("--sink", type=int, default=16)
    ap.add_argument("--recent", type=int, default=64)
    ap.add_argument("--out", default="results/efficiency.json")
    args = ap.parse_args()

    model, tok = rlkv.load_model(args.model)
    heads = rlkv.HeadScores.load(args.heads)
    heads.check_layout(rlkv.Layout.of(model))
    task = rlkv.tasks.get(args.task)
    examples = task.load(args.data_dir, limit=args.limit)
    prompts = [task.prompt(e, tok) for e in examples]
    kv_budget = args.kv_budget or (0.8 if torch.cuda.is_available() else "1GiB")
    meta = {
        "benchmark": "efficiency",
        "model": args.model,
        "heads": args.heads,
        "heads_method": heads.method,
        **{k: v for k, v in vars(args).items() if k not in ("model", "heads")},
        "kv_budget": kv_budget,
    }
    longest = max(len(tok(p, add_special_tokens=False).input_ids) for p in prompts)
    rows = []
    for admission, kv_dtype in itertools.product(args.admissions.split(","), args.kv_dtypes.split(",")):
        for s in (float(v) for v in args.sparsities.split(",")):
            # reserving: a request holds its prompt + max_new_tokens, so rings only for as many as the budget admits
            typical = longest + args.max_new_tokens if admission == "reserve" else None
            engine = rlkv.Engine(
                model,
                tok,
                HeadSplit(heads.keep_mask(s), args.sink, args.recent, kv_dtype=kv_dtype),
                kv_budget=kv_budget,
                max_batch=args.max_batch,
                sequence_tokens=typical,
                admission=admission,
            )
            engine.generate(prompts[: args.max_batch], max_new_tokens=8)  # warm-up: kernels and CUDA graphs
            outs = engine.generate(prompts, max_new_tokens=args.max_new_tokens, repetition_window=400)
            stats = engine.stats
            scores = task.grade_many(examples, [o.text for o in outs])
            length = sum(o.prompt_tokens + len(o.tokens) for o in outs) / len(outs)
            rows.append(
                {
                    "admission": admission,
                    "kv_dtype": kv_dtype,
                    "sparsity": s,
                    "accuracy": sum(scores) / len(scores),
                    "mean_tokens": stats.generated_tokens / len(outs),
                    "seconds": stats.seconds,
                    "tok_per_s": stats.tokens_per_s,
                    "max_running": stats.max_running,
                    "preemptions": stats.preemptions,
                    "pool_pages": stats.pages,
                    "peak_pages_used": stats.peak_pages_used,
                    "kv_ratio": sum(o.kv_bytes for o in outs) / sum(o.kv_bytes_full for o in outs),
                    "speedup_theory": speedup_theory(s, args.sink, args.recent, length),
                }
            )
            print(
                f"{admission} {kv_dtype} sparsity {s:g}: accuracy {rows[-1]['accuracy']:.3f}, {stats.seconds:.1f} s, "
                f"{stats.tokens_per_s:.0f} tok/s, {stats.max_running} at once, {stats.preemptions} preemptions",
                flush=True,
            )
            del engine
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            write_result(args.out, {**meta, "complete": False, "rows": rows})  # partial results survive a kill
    for r in rows:
        full = next(
            (f for f in rows if f["sparsity"] == 0 and f["kv_dtype"] == "bf16" and f["admission"] == r["admission"]),
            None,
        )
        r["speedup_e2e"] = full["seconds"] / r["seconds"] if full else None
        r["throughput_ratio"] = r["tok_per_s"] / full["tok_per_s"] if full else None
        reserve = next(
            (
                f
                for f in rows
                if f["sparsity"] == r["sparsity"] and f["kv_dtype"] == r["kv_dtype"] and f["admission"] == "reserve"
            ),
            None,
        )
        r["vs_reserve"] = r["tok_per_s"] / reserve["tok_per_s"] if reserve else None
    print_table(
        rows,
        [
            "admission",
            "kv_dtype",
            "sparsity",
            "accuracy",
            "speedup_theory",
            "seconds",
            "speedup_e2e",
            "tok_per_s",
            "throughput_ratio",
            "vs_reserve",
            "max_running",
            "preemptions",
            "mean_tokens",
            "kv_ratio",
        ],
    )
    write_result(args.out, {**meta, "complete": True, "rows": rows})


if __name__ == "__main__":
    main()
