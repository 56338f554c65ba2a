"""The engine's decode step against the physical limit: bytes it must read over the measured copy bandwidth.

At each `--compile` setting (the engine's compiled step or not), KV precision (`--kv-dtypes`), `--batches` size
and `--sparsities`,
`batch` sequences of `--context` tokens (mid-generation) sit in the engine; one decode step must read
every weight once (the tied embedding too: the logits read it whole) and the K/V of every sequence (kept
heads: every token; compressed heads: their sink + recent ring; in the bytes stored, so FP8 halves them). The
floor is those bytes over this
GPU's device-to-device copy bandwidth (bytes read + written per second of a 256 MiB copy). Reported: the
step's GPU time (its CUDA graph replayed, as the engine runs it), the floor, their ratio (`of_limit`),
the FLOP-bound floor at the measured bf16 matrix rate, the decode attention kernel alone over every
layer of the same sequences (`attention_ms`, captured in one CUDA graph, and its K/V bytes per second),
the distinct pages the sequences' page tables point to (a step that reads every sequence's own K/V needs
batch x pages), and where the GPU time goes: the kernels of the replayed graph under torch.profiler,
grouped (matrix products, attention, sampling and logits, the rest); without graphs (a CPU), or where
the profiler sees no kernel inside a graph, those of eager steps (`profiled`).

    python benchmarks/decode_limit.py --model DIR --batches 64,128,256 --sparsities 0,0.5 --context 1024 \
        --compile on,off --kv-dtypes bf16,fp8 --out results/decode_limit.json
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch
from common import (
    copy_bandwidth,
    gpu_seconds,
    load_model,
    print_table,
    profiled,
    weights_arguments,
    write_result,
)
from engine import _decode_graph, _graph_times, kernels_per_step

import rlkv
from rlkv.engine.kernel import decode_attention
from rlkv.hf.headsplit import sliding_window
from rlkv.methods.headsplit import HeadSplit

PREFILL_TOKENS = 4096  # the engine's default
GROUPS = {  # kernel name fragments -> group (first match wins)
    "attention": ("_decode_kernel", "_store_kernel", "attention", "flash"),
    "matmul": ("gemm", "cutlass", "xmma", "nvjet", "matmul", "sm90", "splitk"),
    "sampling+logits": ("argmax", "softmax", "sort", "topk", "gather", "log_softmax"),
}


def group_of(name: str) -> str:
    low = name.lower()
    return next((g for g, keys in GROUPS.items() if any(k in low for k in keys)), "other (norms, RoPE, elementwise)")


def weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: every parameter (a tied embedding once, read whole by the logits)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if embed.data_ptr() != head.data_ptr():  # untied: the input embedding is read a row per sequence
        total -= embed.numel() * embed.element_size()
    return total


def matmul_rate(device) -> float:
    """FLOP/s of a large bf16 matrix product on this device (random data)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    return 2 * 8192**3 / gpu_seconds(lambda: a @ b, reps=10)


def grouped(kernels: dict[str, float], steps: int) -> dict[str, float]:
    """GPU ms per step by kernel group, from kernel name -> microseconds over `steps` steps."""
    groups: dict[str, float] = {}
    for name, us in kernels.items():
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + us / max(steps, 1) / 1e3
    return groups


def warm_tokens(batch: int, context: int) -> int:
    """Tokens each sequence decodes in `resident_engine`: enough that the last prompt is prefilled before the first
    sequence ends. The engine decodes between prefill forwards of `PREFILL_TOKENS` (a prompt of `context` tokens
    takes ceil(context / PREFILL_TOKENS) of them), so with 8 new tokens only the first few prompts ran at once."""
    return 8 + batch * math.ceil(context / PREFILL_TOKENS)


def resident_engine(
    model, tok, method, budget: int, batch: int, context: int, cuda_graphs: bool | None = None, compile=None
):
    """(an engine, its prompts) after decoding `batch` random prompts of `context` tokens together (kernels and
    graphs warmed; `warm_tokens` each); exits if they were not all resident at once, as the timed step assumes."""
    # no admission watermark: the pool holds just the batch
    engine = rlkv.Engine(
        model,
        tok,
        method,
        kv_budget=budget,
        max_batch=batch,
        prefill_tokens=PREFILL_TOKENS,
        cuda_graphs=cuda_graphs,
        compile=compile,
        watermark=0,
    )
    ids = torch.randint(0, len(tok), (batch, context), generator=torch.Generator().manual_seed(0)).tolist()
    engine.generate(ids, max_new_tokens=warm_tokens(batch, context), eos_token_ids=[])
    if engine.stats.max_running < batch:
        raise SystemExit(
            f"only {engine.stats.max_running} of {batch} sequences of {context} tokens were decoded at "
            f"once in a KV pool of {budget} bytes: the timed step would read fewer than it reports"
        )
    return engine, ids


def attention_alone(engine, batch: int, context: int) -> float:
    """GPU ms of the decode kernel alone, every layer once, over the sequences in slots 1..batch at `context`
    tokens (the state `_decode_graph` replays)."""
    store, layout = engine.store, rlkv.Layout.of(engine.model)
    device = store.page_table.device
    slots = torch.arange(1, batch + 1, device=device)
    lengths = torch.full((batch,), context, device=device)
    q = torch.randn(batch, layout.num_q_heads, layout.head_dim, device=device, dtype=engine.model.dtype)
    window = sliding_window(engine.model.config)

    def every_layer():
        for layer in range(layout.num_layers):
            decode_attention(q, store, layer, slots, lengths, layout.head_dim**-0.5, window)

    return 1e3 * gpu_seconds(every_layer, reps=5)


def distinct_pages(store, batch: int, context: int) -> int:
    """Distinct pages the page tables of slots 1..batch point to over `context` tokens (each sequence its own:
    batch x pages)."""
    return int(store.page_table[1 : batch + 1, : store.pages_for(context)].unique().numel())


def graph_groups(engine, batch: int, context: int, replays: int) -> dict[str, float]:
    """GPU ms per decode step by kernel group, from `replays` replays of the step's CUDA graph under torch.profiler
    (empty if the profiler sees no kernel inside the graph)."""
    graph = _decode_graph(engine, batch, context)
    graph.replay()
    torch.cuda.synchronize()

    def replay():
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()

    _, averages = profiled(replay)
    kernels = {
        e.key: e.self_device_time_total
        for e in averages
        if getattr(e, "self_device_time_total", 0) > 0 and not e.key.startswith("cuda")
    }
    return grouped(kernels, replays)


def eager_groups(model, tok, method, budget: int, batch: int, context: int, steps: int, compile) -> dict[str, float]:
    """GPU ms per decode step by kernel group, from `steps` eager (ungraphed) steps under torch.profiler."""
    eager, ids = resident_engine(model, tok, method, budget, batch, context, cuda_graphs=False, compile=compile)
    return grouped({name: us for name, (_, us) in kernels_per_step(eager, ids, steps).items()}, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--batches", default="64,128,256")
    ap.add_argument("--sparsities", default="0,0.5")
    ap.add_argument("--context", type=int, default=1024, help="tokens per sequence (mid-generation)")
    ap.add_argument(
        "--profile-tokens", type=int, default=4, help="decode steps profiled: graph replays, else eager steps (0: none)"
    )
    ap.add_argument("--compile", default="auto", help="comma-separated engine settings: auto (on CUDA), on, off")
    ap.add_argument("--kv-dtypes", default="bf16", help="comma-separated KV precisions: bf16, fp8, fp8-kept")
    ap.add_argument("--sink", type=int, default=16)
    ap.add_argument("--recent", type=int, default=64)
    weights_arguments(ap)
    ap.add_argument("--out", default="results/decode_limit.json")
    args = ap.parse_args()

    model, tok = load_model(args.model, args.random_weights)
    layout = rlkv.Layout.of(model)
    device = next(model.parameters()).device
    heads = rlkv.HeadScores.random(layout, seed=0)  # head choice does not change cost
    copy = copy_bandwidth(device)
    flops = matmul_rate(device) if device.type == "cuda" else None
    weights = weight_bytes(model)
    params = sum(p.numel() for p in model.parameters())
    meta = {
        "benchmark": "decode_limit",
        "model": args.model,
        "layout": layout.to_dict(),
        **vars(args),
        "copy_gb_per_s": copy / 1e9,
        "matmul_tflop_per_s": flops / 1e12 if flops else None,
        "weight_bytes": weights,
    }
    print(f"copy bandwidth {copy / 1e9:.0f} GB/s, weights {weights / 2**30:.2f} GiB", flush=True)
    rows = []
    settings = [{"auto": None, "on": True, "off": False}[c] for c in args.compile.split(",")]
    sparsities = [float(v) for v in args.sparsities.split(",")]
    for compile, kv_dtype, s in itertools.product(settings, args.kv_dtypes.split(","), sparsities):
        for batch in (int(b) for b in args.batches.split(",")):
            method = HeadSplit(heads.keep_mask(s), args.sink, args.recent, kv_dtype=kv_dtype)
            budget = (
                batch * (args.context + warm_tokens(batch, args.context) + 64) * layout.kv_bytes_per_token() + 2**28
            )
            engine, _ = resident_engine(model, tok, method, budget, batch, args.context, compile=compile)
            store = engine.store
            kv = batch * (args.context * store.token_bytes + store.slot_bytes)
            floor = (weights + kv) / copy
            row = {
                "compile": engine.compile,
                "kv_dtype": kv_dtype,
                "sparsity": s,
                "batch": batch,
                "context": args.context,
                "kv_bytes": kv,
                "floor_ms": 1e3 * floor,
                **_graph_times(engine, batch, args.context),
            }
            row.setdefault("graph_ms", None)  # no CUDA graphs on a CPU
            if row["graph_ms"]:
                row["of_limit"] = row["floor_ms"] / row["graph_ms"]
            if flops:
                row["flop_floor_ms"] = 1e3 * 2 * params * batch / flops
            row["distinct_pages"] = distinct_pages(store, batch, args.context)
            if device.type == "cuda":
                row["attention_ms"] = attention_alone(engine, batch, args.context)
                row["attention_gb_per_s"] = kv / (row["attention_ms"] / 1e3) / 1e9
            groups, profiled = {}, None
            if args.profile_tokens and row["graph_ms"]:
                groups, profiled = graph_groups(engine, batch, args.context, args.profile_tokens), "graph"
            if args.profile_tokens and not groups:
                groups, profiled = (
                    eager_groups(model, tok, method, budget, batch, args.context, args.profile_tokens, compile),
                    "eager",
                )
            row["profiled"], row["profiled_gpu_ms"], row["groups_ms"] = profiled, sum(groups.values()) or None, groups
            rows.append(row)
            print(
                f"compile {engine.compile}, {kv_dtype}, sparsity {s:g}, {batch} x {args.context}: step "
                f"{row['graph_ms'] or 0:.2f} ms of GPU time, floor {row['floor_ms']:.2f} ms "
                f"({row.get('of_limit') or 0:.0%} of the limit); attention alone "
                f"{row.get('attention_ms') or 0:.2f} ms; {profiled} kernels: "
                + ", ".join(f"{g} {ms:.2f} ms" for g, ms in sorted(groups.items(), key=lambda e: -e[1])),
                flush=True,
            )
            del engine, store  # the pool goes before the next engine allocates its own
            if device.type == "cuda":
                torch.cuda.empty_cache()
            write_result(args.out, {**meta, "complete": False, "rows": rows})
    print_table(
        rows,
        [
            "compile",
            "kv_dtype",
            "sparsity",
            "batch",
            "context",
            "graph_ms",
            "floor_ms",
            "of_limit",
            "flop_floor_ms",
            "attention_ms",
            "attention_gb_per_s",
            "distinct_pages",
            "profiled",
            "profiled_gpu_ms",
        ],
    )
    write_result(args.out, {**meta, "complete": True, "rows": rows})


if __name__ == "__main__":
    main()
