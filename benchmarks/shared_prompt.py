"""n samples of one prompt: one request with `n` (one prefill, the samples forked on shared pages) against n
separate requests of the same prompt with seeds seed + i, through `rlkv.Engine`.

Per sparsity: the KV bytes each way holds at its peak (pages in use x bytes per page, plus the n rings of
compressed heads), what sharing saves, the seconds and prefill forwards each takes, and where each sample first
differs from its separate request (sample i draws with seed + i: in float32 on a CPU they are equal token for
token; in bf16 on a GPU one prefill and a packed prefill of n copies round differently, so a sample parts from
its twin somewhere along a long answer, while a fork that copied the wrong state would part at once). Every
sample generates exactly `--max-tokens` tokens (EOS ignored), so both ways hold the same tokens.

    python benchmarks/shared_prompt.py --model DIR --heads heads.json --sparsities 0,0.5 --n 8 \
        --prompt-tokens 1024 --max-tokens 8192 --kv-budget 20GiB --out results/shared_prompt.json
"""

from __future__ import annotations

import argparse
import random
import time

from common import load_model, print_table, weights_arguments, write_result

import rlkv
from rlkv import SamplingParams


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The index of the first token where `a` and `b` differ (one ending early counts), None if equal."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def run(engine: rlkv.Engine, requests: list[tuple[str, list[int], SamplingParams]]) -> tuple[dict, dict]:
    """Run `requests` to the end: ({(request id, sample index): tokens}, measurements)."""
    engine.store.peak_pages_used = 0
    engine.runner.prefill_forwards = 0
    start = time.perf_counter()
    for request_id, prompt, params in requests:
        engine.add_request(request_id, prompt, params)
    tokens = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id, out.index] = out.completion.tokens
    seconds = time.perf_counter() - start
    store = engine.store
    sequences = sum(params.n for *_, params in requests)
    held = store.peak_pages_used * store.page_bytes + sequences * store.slot_bytes
    return tokens, {"kv_bytes": held, "peak_pages": store.peak_pages_used, "seconds": seconds,
                    "prefill_forwards": engine.runner.prefill_forwards}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--heads", default=None, help="head scores for rlkv (else random heads at sparsity > 0)")
    parser.add_argument("--sparsities", default="0,0.5")
    parser.add_argument("--sink", type=int, default=16)
    parser.add_argument("--recent", type=int, default=64)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-budget", default="1GiB")
    parser.add_argument("--out", default="results/shared_prompt.json")
    weights_arguments(parser)
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, args.random_weights)
    vocab = model.config.get_text_config().vocab_size
    prompt = [random.Random(args.seed).randrange(3, vocab) for _ in range(args.prompt_tokens)]
    params = SamplingParams(
        max_tokens=args.max_tokens, n=args.n, temperature=args.temperature, seed=args.seed, ignore_eos=True
    )
    rows = []
    for sparsity in map(float, args.sparsities.split(",")):
        method = None
        if sparsity:
            name = "rlkv" if args.heads else "random"
            layout = rlkv.Layout.of(model)
            method = rlkv.methods.build(name, layout, sparsity, heads=args.heads, sink=args.sink, recent=args.recent)
        engine = rlkv.Engine(model, tokenizer, method, kv_budget=args.kv_budget, max_batch=max(args.n, 8))
        shared, one = run(engine, [("shared", prompt, params)])
        apart, many = run(engine, [(f"r{i}", prompt, params.sample(i)) for i in range(args.n)])
        parted = [first_difference(shared["shared", i], apart[f"r{i}", 0]) for i in range(args.n)]
        rows.append(
            {
                "sparsity": sparsity,
                "n": args.n,
                "prompt_tokens": args.prompt_tokens,
                "max_tokens": args.max_tokens,
                "kv_bytes_shared": one["kv_bytes"],
                "kv_bytes_separate": many["kv_bytes"],
                "kv_saved": 1 - one["kv_bytes"] / many["kv_bytes"],
                "peak_pages_shared": one["peak_pages"],
                "peak_pages_separate": many["peak_pages"],
                "seconds_shared": one["seconds"],
                "seconds_separate": many["seconds"],
                "prefill_forwards_shared": one["prefill_forwards"],
                "prefill_forwards_separate": many["prefill_forwards"],
                "identical": all(t is None for t in parted),
                "first_difference": parted,  # per sample: the first token it and its twin differ at (None: never)
            }
        )
        print_table(rows, ["sparsity", "kv_bytes_shared", "kv_bytes_separate", "kv_saved", "identical"])
    write_result(args.out, {"model": args.model, "heads": args.heads, "rows": rows})


if __name__ == "__main__":
    main()
