"""Aggregates of graded samples, one row per (task, method, sparsity), and a run's summary.json.

KV ratios compare with a full cache for the same sequences: `kv_mean_ratio` averages over
each sequence's decoding steps, `kv_peak_ratio` is at the end of each sequence, where every
cache of ours (growing, ring or capped) is at its largest.

In a run with matched bytes, a token-dropping group's `kv_vs_reference` is its mean KV bytes over
those of the reference head-split group (same task, sparsity and examples): near 1 when matched,
above 1 where the method's smallest budget still holds more (`rlkv.methods.matching`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from rlkv.eval.plan import bytes_reference
from rlkv.eval.rundir import read_config, run_records, write_whole


def summarize(samples: list[dict], batches: Sequence[dict] = (), reference: str | None = None) -> list[dict]:
    """One row per (task, method, sparsity). A token-dropping group's budget was matched to the bytes of
    the head-split method its samples name (`matched_to`), or else to `reference`'s."""
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
        budget = items[0].get("budget")  # token-dropping methods: tokens per KV head
        matched_to = items[0].get("matched_to", reference) if budget is not None else None
        seconds, tokens = timing.get((task, method, sparsity), (0.0, 0))
        rows.append(
            {
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
                "budget": budget,
                "matched_to": matched_to,
                "kv_vs_reference": _vs_reference(items, groups.get((task, matched_to, sparsity)))
                if matched_to
                else None,
                "seconds": seconds,
                "tok_per_s": tokens / seconds if seconds else None,
            }
        )
    return sorted(rows, key=lambda r: (r["task"], r["method"] != "full", r["method"], r["sparsity"]))


def _vs_reference(items: list[dict], reference: list[dict] | None) -> float | None:
    """Mean KV bytes of `items` over the reference group's on the same examples (None: not all there)."""
    ref = {str(s["id"]): s["kv_bytes_mean"] for s in reference or ()}
    if any(str(s["id"]) not in ref for s in items):
        return None
    return sum(s["kv_bytes_mean"] for s in items) / sum(ref[str(s["id"])] for s in items)


def summarize_run(out: Path) -> tuple[list[dict], list[dict]]:
    """Every sample of a run as it is now (all shards') and their aggregate rows. A matched group is
    compared with the head-split method its samples name; samples from before they named it, with the
    first head-ranked method of the run's last invocation."""
    samples = run_records(out, "samples")
    reference, config = None, read_config(out) or {}
    if config.get("match_bytes") and config.get("invocations"):
        reference = bytes_reference(config["invocations"][-1]["methods"])
    return samples, summarize(samples, run_records(out, "batches"), reference)


def write_summary(out: Path, record: dict, rows: list[dict]) -> None:
    """summary.json: the run's identity (config.json without its invocations) and aggregate rows."""
    write_whole(out / "summary.json", json.dumps({"config": record, "rows": rows}, indent=1))
