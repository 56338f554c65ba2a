"""`rlkv heads list | show | convert | plot`: head scores by name (shipped with rlkv) or file (JSON, TSV, .pt)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from rlkv.cli.common import USER_ERRORS, check_heads, console, fail, finite


def heads_list():
    """List the heads shipped with rlkv, its own and the published patterns; --heads NAME takes each name."""
    from rlkv import HeadScores, patterns

    table = Table(title="head scores shipped with rlkv (--heads NAME, HeadScores.load(NAME))")
    table.add_column("name", no_wrap=True)
    for column in ("layers x kv heads", "method", "recipe", "made by"):
        table.add_column(column, overflow="fold")
    for name in sorted(patterns.shipped(), key=lambda n: (not n.startswith("rlkv:"), n)):
        scores = HeadScores.load(name)
        made = scores.provenance
        source = made.get("source", "").removesuffix("heads.json")
        table.add_row(name, _shape(scores), scores.method, made.get("recipe", ""), f"rlkv ({source})")
    for name in patterns.published():
        table.add_row(name, _shape(HeadScores.load(name)), "duo", "published", "DuoAttention's authors (MIT)")
    console.print(table)
    console.print(
        f"not shipped (no licence): the RLKV authors' gates; load head_dist/rlkv/<model> from a clone of "
        f"{patterns.RLKV_REPO}. `rlkv heads show NAME` prints one with its provenance.",
        soft_wrap=True,
        highlight=False,
    )


PROVENANCE_SHOWN = ("shipped", "published", "recipe", "settings", "command", "source", "weights", "evaluated")


def _shape(scores) -> str:
    return f"{scores.shape[0]} x {scores.shape[1]}"


def heads_show(
    path: str = typer.Argument(..., help="a .json/.tsv/.pt file, a pattern directory or a name from `rlkv heads list`"),
    sparsity: Optional[float] = typer.Option(None, callback=finite, help="also show the keep-mask"),
    rule: Optional[str] = typer.Option(None, help="keep rule: rank or authors (default: the file's own)"),
):
    """Print a head-score matrix (layers x kv_heads)."""
    try:
        check_heads(path)  # before torch is imported
        from rlkv import HeadScores

        scores = HeadScores.load(path)
        keep = scores.keep_mask(sparsity, rule=rule) if sparsity is not None else None
    except USER_ERRORS as err:
        fail(err)
    console.print(scores.summary(), soft_wrap=True, highlight=False)
    for key in PROVENANCE_SHOWN:
        if key in scores.provenance:
            console.print(f"{key}: {scores.provenance[key]}", soft_wrap=True, highlight=False)
    table = Table()
    table.add_column("layer", justify="right")
    for h in range(scores.shape[1]):
        table.add_column(f"h{h}", justify="right")
    for layer, row in enumerate(scores.scores.tolist()):
        cells = [
            f"[bold]{v:.3f}[/bold]" if keep is not None and keep[layer, h] else f"{v:.3f}" for h, v in enumerate(row)
        ]
        table.add_row(str(layer), *cells)
    console.print(table)
    if keep is not None:
        console.print(f"bold = kept at sparsity {sparsity:g} ({int(keep.sum())}/{keep.numel()} heads)")


def heads_convert(src: Path, dst: Path, method: Optional[str] = typer.Option(None, help="method name to record")):
    """Convert between JSON and the published TSV formats (by file extension)."""
    try:
        check_heads(src)  # before torch is imported
        from rlkv import HeadScores

        HeadScores.load(src, method=method).save(dst)
    except USER_ERRORS as err:
        fail(err)
    console.print(f"wrote {dst}")


def heads_plot(
    path: Path,
    output: Path = typer.Option(..., "-o", "--output", help="PNG to write"),
    sparsity: Optional[float] = typer.Option(None, callback=finite, help="also draw the heads kept at this sparsity"),
):
    """Heat map of head scores (and kept heads) as a PNG."""
    try:
        check_heads(path)  # before torch and matplotlib are imported
        from rlkv import HeadScores

        written = HeadScores.load(path).plot(output, sparsity=sparsity)
    except USER_ERRORS as err:
        fail(err)
    console.print(f"wrote {written}")
