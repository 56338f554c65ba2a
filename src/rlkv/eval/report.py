"""Turn a run directory into a markdown report and plots.

- report.md: accuracy per (method, sparsity) row and task column, with the change against the
  full cache in parentheses (as in the RLKV paper's tables), then memory, length and speed;
- accuracy_vs_sparsity.png: one panel per task, one line per method;
- accuracy_vs_kv.png: accuracy against the KV bytes actually held (relative to a full cache),
  the fair comparison across method families whose nominal knobs differ;
- length_vs_sparsity.png: mean output length, where compression that breaks reasoning shows
  up as rambling to the length limit.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from rlkv.eval.rundir import read_config
from rlkv.eval.summary import summarize_run, write_summary

OVER_REFERENCE = 0.05  # measured bytes vary a few % with each method's own output lengths; beyond this, flag


def _baseline(rows: list[dict]) -> dict[str, float]:
    return {r["task"]: r["accuracy"] for r in rows if r["method"] == "full"}


def _over_reference(row: dict) -> bool:
    """A matched group that held clearly more KV than its reference: not an equal-memory result."""
    return (row.get("kv_vs_reference") or 0) > 1 + OVER_REFERENCE


def markdown_table(rows: list[dict]) -> str:
    tasks = sorted({r["task"] for r in rows})
    base = _baseline(rows)
    cells: dict[tuple, dict[str, str]] = defaultdict(dict)
    for r in rows:
        acc = 100 * r["accuracy"]
        text = f"{acc:.1f}"
        if r["task"] in base and r["method"] != "full":
            text += f" ({acc - 100 * base[r['task']]:+.1f})"
        if _over_reference(r):
            text += f" † {r['kv_vs_reference']:.2f}x KV"
        cells[(r["method"], r["sparsity"])][r["task"]] = text
    lines = ["| method | sparsity | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for (method, sparsity), by_task in cells.items():
        lines.append(f"| {method} | {sparsity:g} | " + " | ".join(by_task.get(t, "") for t in tasks) + " |")
    if any(_over_reference(r) for r in rows):
        lines += [
            "",
            f"† not at equal memory: held more than {1 + OVER_REFERENCE:g}x the mean KV bytes of the "
            "head-split method it was matched to (the multiple shown), e.g. where its smallest budget "
            "cannot go lower.",
        ]
    return "\n".join(lines)


def details_table(rows: list[dict]) -> str:
    lines = [
        "| task | method | sparsity | n | accuracy | mean tokens | % length | % repetition | KV mean / full "
        "| KV peak / full | budget | KV mean / matched | tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tps = f"{r['tok_per_s']:.0f}" if r["tok_per_s"] else ""
        vs = f"{r['kv_vs_reference']:.3f}" if r.get("kv_vs_reference") else ""
        lines.append(
            f"| {r['task']} | {r['method']} | {r['sparsity']:g} | {r['n']} | {100 * r['accuracy']:.1f} | "
            f"{r['mean_tokens']:.0f} | {r['pct_length']:.1f} | {r['pct_repetition']:.1f} | "
            f"{r['kv_mean_ratio']:.3f} | {r['kv_peak_ratio']:.3f} | {r['budget'] or ''} | {vs} | {tps} |"
        )
    return "\n".join(lines)


def _plot(
    rows: list[dict], x: str, y: str, xlabel: str, ylabel: str, path: Path, title: str, xlim=(-0.03, 1.03)
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        top = 0.0
        by_method: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            if r["task"] == task:
                by_method[r["method"]].append(r)
        for method, items in sorted(by_method.items()):
            items.sort(key=lambda r: r[x])
            xs = [r[x] for r in items]
            ys = [100 * r[y] if y == "accuracy" else r[y] for r in items]
            top = max(top, *ys)
            if method == "full" and x == "sparsity":
                ax.axhline(ys[0], color="black", linestyle="--", linewidth=1, label="full")
            else:
                ax.plot(xs, ys, marker="o", label=method)
        ax.set_title(task)
        ax.set_xlim(*xlim)
        ax.set_ylim(0, top * 1.15 or 1.0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(run_dir: str | Path) -> Path:
    """Write report.md and the PNG plots into `run_dir`, and summary.json anew from every sample
    (shards that finished after the last `evaluate` are in it); returns the report path."""
    run_dir = Path(run_dir)
    samples, rows = summarize_run(run_dir)  # samples.jsonl and every shard's
    if not samples:
        raise FileNotFoundError(
            f"{run_dir} holds no results (expected samples.jsonl or samples.shard-*.jsonl "
            f"from `rlkv eval --out {run_dir}`)"
        )
    model = ""
    config = read_config(run_dir)
    if config is not None:
        model = Path(config.get("model") or "").name
        write_summary(run_dir, {k: v for k, v in config.items() if k != "invocations"}, rows)
    plots = [
        _plot(
            rows,
            "sparsity",
            "accuracy",
            "sparsity (fraction of KV heads compressed)",
            "accuracy (%)",
            run_dir / "accuracy_vs_sparsity.png",
            f"accuracy vs sparsity {model}",
        ),
        _plot(
            rows,
            "kv_mean_ratio",
            "accuracy",
            "mean KV bytes held / full cache",
            "accuracy (%)",
            run_dir / "accuracy_vs_kv.png",
            f"accuracy vs KV memory {model}",
        ),
        _plot(
            rows,
            "sparsity",
            "mean_tokens",
            "sparsity",
            "mean output tokens",
            run_dir / "length_vs_sparsity.png",
            f"output length {model}",
        ),
    ]
    text = [
        f"# Evaluation report: {model}",
        "",
        "Accuracy (%); in parentheses the change against the full KV cache.",
        "",
        markdown_table(rows),
        "",
        "## Details",
        "",
        details_table(rows),
        "",
        *[f"![{p.stem}]({p.name})" for p in plots],
        "",
    ]
    path = run_dir / "report.md"
    path.write_text("\n".join(text))
    return path
