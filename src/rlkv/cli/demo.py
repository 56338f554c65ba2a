"""`rlkv demo`: RLKV's heads against DuoAttention's, random heads and H2O at equal memory, on graded
GSM8K answers (Qwen2.5-Coder-0.5B-Instruct by default, on a CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from rlkv.cli.common import (
    SPARSITY_HELP,
    USER_ERRORS,
    check_heads,
    check_model,
    console,
    fail,
    load_model,
    note,
    parse_heads,
)

MODEL_FILE = Path.home() / ".cache" / "rlkv-models" / "qwen2.5-coder-0.5b-instruct.Q4_K_M.gguf"
HEADS = {"rlkv": "rlkv:qwen2.5-coder-0.5b-instruct", "duo": "duo:qwen2.5-coder-0.5b-instruct"}


def demo(
    model: Optional[str] = typer.Option(
        None, help="default: Qwen2.5-Coder-0.5B-Instruct, fetched by ../shared/tools/get-model"
    ),
    heads: Optional[list[str]] = typer.Option(
        None,
        help="METHOD=NAME_OR_FILE for rlkv and/or duo "
        "(default: rlkv=rlkv:qwen2.5-coder-0.5b-instruct duo=duo:qwen2.5-coder-0.5b-instruct)",
    ),
    questions: int = typer.Option(8, min=1, max=16, help="how many of the demo's 16 GSM8K problems"),
    max_new_tokens: int = typer.Option(256, min=1),
    sparsity: float = typer.Option(0.5, min=0.0, max=1.0, help=SPARSITY_HELP),
    sink: int = typer.Option(16, min=0),
    recent: int = typer.Option(64, min=1),
):
    """RLKV's heads vs DuoAttention's, random heads and H2O at equal KV memory: graded GSM8K answers, KV bytes."""
    try:
        chosen = _heads(heads)
        for source in chosen.values():
            check_heads(source)  # before the (slow) imports and model load
        model = model or str(default_model())
        check_model(model)
        from rlkv.demo import run_demo

        lm, tok = load_model(model, dtype="bfloat16")
        examples, runs = run_demo(
            lm, tok, chosen, questions, max_new_tokens, sparsity, sink, recent, on_run=_progress(questions)
        )
    except USER_ERRORS as err:
        fail(err)
    console.print(_answers_table(examples, runs))
    console.print(_runs_table(runs, sparsity, sink, recent))
    if heads is None and sparsity == 0.5 and (sink, recent) == (16, 64):
        console.print(_at_scale(len(examples)), soft_wrap=True, highlight=False)


def default_model() -> Path:
    """The Qwen2.5-Coder-0.5B-Instruct GGUF that `get-model` fetches, or an error saying how to get it."""
    if not MODEL_FILE.is_file():
        raise FileNotFoundError(
            f"Qwen2.5-Coder-0.5B-Instruct weights not found at {MODEL_FILE}: run "
            "`../shared/tools/get-model qwen2.5-coder-0.5b-instruct` (a 491 MB GGUF), or pass --model "
            "(a model directory, a .gguf, or the hub id Qwen/Qwen2.5-Coder-0.5B-Instruct)"
        )
    return MODEL_FILE


def _heads(values: list[str] | None) -> dict[str, str]:
    """--heads METHOD=NAME entries (a plain name: the rlkv heads), else the shipped Qwen2.5-Coder-0.5B heads."""
    parsed = parse_heads(values)
    if parsed is None:
        return dict(HEADS)
    return {"rlkv": parsed} if isinstance(parsed, str) else parsed


def _progress(questions: int):
    """One line on stderr as each method finishes: the demo runs for about a minute."""

    def report(run) -> None:
        note(f"{run.label}: {sum(run.correct)}/{questions} correct, {run.tokens} tokens in {run.seconds:.0f} s")

    return report


def _answers_table(examples, runs) -> Table:
    """Each problem: its reference answer and every method's final answer, marked right or wrong."""
    table = Table(title="final answers (the last \\boxed{}): ✓ right, ✗ wrong or none")
    table.add_column("problem", overflow="ellipsis", no_wrap=True, max_width=30)
    table.add_column("answer", justify="right", no_wrap=True)
    for run in runs:
        table.add_column(run.label.split(" ")[0].rstrip(","), justify="right", no_wrap=True)
    for i, example in enumerate(examples):
        cells = [_cell(run.answers[i], run.correct[i]) for run in runs]
        table.add_row(escape(" ".join(example.question.split())), example.answer, *cells)
    return table


def _at_scale(questions: int) -> str:
    """The same comparison on every GSM8K test problem, for reading a handful of easy ones against."""
    from rlkv.demo import at_scale

    scale = at_scale()
    shares = ", ".join(f"{method} {share:g}%" for method, share in scale["accuracy"].items())
    return (
        f"These {questions} problems are ones the full cache answers right in at most 180 tokens. On all 1,319 "
        f"GSM8K test problems at sparsity {scale['sparsity']:g} (rlkv's GPU run, {scale['source']}): {shares} "
        "(H2O there at duo's bytes)."
    )


def _cell(answer: str | None, correct: bool) -> str:
    shown = "-" if answer is None else escape(answer if len(answer) <= 10 else answer[:9] + "…")
    return f"[green]{shown} ✓[/]" if correct else f"[red]{shown} ✗[/]"


def _runs_table(runs, sparsity: float, sink: int, recent: int) -> Table:
    """One row per method: answers right, KV bytes per sequence against a full cache's, at LONG tokens, speed."""
    from rlkv.demo import LONG

    full = runs[0]
    table = Table(
        title=f"sparsity {sparsity:g}: compressed heads keep {sink} + {recent} tokens, H2O the first heads' bytes",
        caption=(
            f"KV / seq: the bytes one sequence held, averaged over its decoding steps and the {len(full.texts)} "
            f"problems; KV / full: that against a full cache on the same tokens. A compressed head holds "
            f"{sink + recent} tokens however long the sequence, so the savings grow with length: "
            f"'at {LONG}' is what one sequence of {LONG} tokens would hold."
        ),
    )
    for column in ("method", "right", "KV / seq", "KV / full", f"at {LONG}", "tok/s"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for run in runs:
        table.add_row(
            run.label,
            f"{sum(run.correct)}/{len(run.correct)}",
            f"{run.kv_mean / 2**20:.2f} MiB",
            f"{run.kv_mean / run.kv_full_mean:.2f}",
            f"{run.kv_long / 2**20:.0f} MiB",
            f"{run.tokens_per_s:.0f}",
        )
    return table
