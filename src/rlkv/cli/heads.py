"""`rlkv heads list | show | convert | plot`: the head-score files (JSON, TSV, .pt, published patterns)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from rlkv.cli.common import USER_ERRORS, console, fail, finite


def heads_list():
    """List the head patterns shipped with rlkv (load one by name: --heads duo:<model>)."""
    from rlkv import HeadScores, patterns

    for name, path in patterns.published().items():
        scores = HeadScores.load(name)
        console.print(
            f"{name}\t{scores.shape[0]} layers x {scores.shape[1]} kv heads ({path.parent.name})",
            soft_wrap=True,
            highlight=False,
        )
    console.print(
        f"not shipped (no licence): the RLKV authors' gates; load head_dist/rlkv/<model> from a clone of "
        f"{patterns.RLKV_REPO}",
        soft_wrap=True,
        highlight=False,
    )


def heads_show(
    path: str = typer.Argument(..., help="a .json/.tsv/.pt file, a pattern directory or a published name"),
    sparsity: Optional[float] = typer.Option(None, callback=finite, help="also show the keep-mask"),
    rule: Optional[str] = typer.Option(None, help="keep rule: rank or authors (default: the file's own)"),
):
    """Print a head-score matrix (layers x kv_heads)."""
    from rlkv import HeadScores

    try:
        scores = HeadScores.load(path)
        keep = scores.keep_mask(sparsity, rule=rule) if sparsity is not None else None
    except USER_ERRORS as err:
        fail(err)
    console.print(scores.summary(), soft_wrap=True, highlight=False)
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
    from rlkv import HeadScores

    try:
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
    from rlkv import HeadScores

    try:
        written = HeadScores.load(path).plot(output, sparsity=sparsity)
    except USER_ERRORS as err:
        fail(err)
    console.print(f"wrote {written}")
