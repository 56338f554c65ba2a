"""Aggregates of graded samples, one row per (task, method, sparsity).

KV ratios compare with a full cache for the same sequences: `kv_mean_ratio` averages over
each sequence's decoding steps, `kv_peak_ratio` is at the end of each sequence, where every
cache of ours (growing, ring or capped) is at its largest.
"""

from __future__ import annotations

from collections import defaultdict


def summarize(samples: list[dict], batches: list[dict] = ()) -> list[dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for s in samples:
        groups[(s["task"], s["method"], float(s["sparsity"]))].append(s)
    timing: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0])
    for b in batches:
        t = timing[(b["task"], b["method"], float(b["sparsity"]))]
        t[0] += b["seconds"]
        t[1] += b["tokens"]
    rows = []
    for (task, method, sparsity), items in groups.items():
        n = len(items)
        seconds, tokens = timing.get((task, method, sparsity), (0.0, 0))
        rows.append({
            "task": task,
            "method": method,
            "sparsity": sparsity,
            "n": n,
            "accuracy": sum(s["score"] for s in items) / n,
            "mean_tokens": sum(s["tokens"] for s in items) / n,
            "pct_length": 100.0 * sum(s["finish"] == "length" for s in items) / n,
            "pct_repetition": 100.0 * sum(s["finish"] == "repetition" for s in items) / n,
            "kv_mean_ratio": sum(s["kv_bytes_mean"] for s in items) / sum(s["kv_bytes_full_mean"] for s in items),
            "kv_peak_ratio": sum(s["kv_bytes"] for s in items) / sum(s["kv_bytes_full"] for s in items),
            "budget": items[0].get("budget"),  # token-dropping methods: tokens per KV head
            "seconds": seconds,
            "tok_per_s": tokens / seconds if seconds else None,
        })
    return sorted(rows, key=lambda r: (r["task"], r["method"] != "full", r["method"], r["sparsity"]))
