"""`rlkv eval`, `rlkv report` and `rlkv tasks`: methods x sparsities on tasks into a run directory, its report,
and the tasks there are."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from rlkv.cli.common import (
    BUDGET_HELP,
    DATA_DIR_HELP,
    KV_DTYPE_HELP,
    MODEL_HELP,
    PREFILL_HELP,
    USER_ERRORS,
    check_budget,
    check_heads,
    check_model,
    config_from_options,
    console,
    fail,
    finite,
    load_model,
    parse_floats,
    parse_heads,
    parse_kv_budget,
    parse_names,
)


def evaluate(
    model: str = typer.Option(..., help=MODEL_HELP),
    task: str = typer.Option(..., help="comma-separated task names (see `rlkv tasks`)"),
    out: Path = typer.Option(..., help="run directory (resumes if it exists)"),
    method: str = typer.Option(
        "full", help="comma-separated methods: full, streaming, rlkv, duo, random, h2o, snapkv, rkv"
    ),
    sparsity: str = typer.Option("0", help="comma-separated sparsities in [0, 1]"),
    heads: Optional[list[str]] = typer.Option(
        None, help="head scores for rlkv/duo (a name from `rlkv heads list` or a file): one, or METHOD=NAME per method"
    ),
    limit: Optional[int] = typer.Option(None, min=1, help="first N examples of each task"),
    max_new_tokens: Optional[int] = typer.Option(None, min=1, help="default: each task's own"),
    batch_size: Optional[int] = typer.Option(
        None, min=1, help="prompts per transformers generate call, and finished samples recorded at once (default 32)"
    ),
    max_running: Optional[int] = typer.Option(
        None, min=1, help="most sequences the engine runs at once (default: as many as --kv-budget holds, up to 256)"
    ),
    temperature: float = typer.Option(0.0, min=0.0, callback=finite),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    seed: int = typer.Option(0),
    sink: int = typer.Option(16, min=0),
    recent: int = typer.Option(64, min=1),
    budget: Optional[int] = typer.Option(None, min=1, help=BUDGET_HELP),
    keep_rule: str = typer.Option(
        "rank",
        help="how rlkv / duo / random scores become heads: rank (exact count, ties by "
        "index) or authors (clip, seeded tie noise, quantile: the authors' code)",
    ),
    prefill: str = typer.Option("full", help=PREFILL_HELP),
    kv_dtype: str = typer.Option("bf16", help=KV_DTYPE_HELP),
    match_bytes: bool = typer.Option(
        False,
        help="token-dropping budgets matched to the mean KV bytes of the first head-ranked method in --method "
        "(same task and sparsity)",
    ),
    data_dir: Optional[str] = typer.Option(None, help=DATA_DIR_HELP),
    report: bool = typer.Option(True, help="write report.md and plots when done (not with --shard)"),
    engine: str = typer.Option(
        "auto", help="generate through rlkv.Engine: auto (on a GPU), on, off (transformers generate)"
    ),
    kv_budget: Optional[str] = typer.Option(
        None, help="the engine's KV pool: a size (20GiB) or a share of free GPU memory (0.8)"
    ),
    shard: Optional[str] = typer.Option(
        None,
        help="K/N: run only every N-th (task, method, sparsity) group, K-th of N, "
        "in parallel with the others into the same --out; then `rlkv report OUT`",
    ),
):
    """Evaluate methods x sparsities on tasks; results stream to OUT and resume after interruption."""
    options = dict(locals())
    try:
        check_model(model)  # before the (slow) imports and model load
        given = parse_heads(heads)
        for source in [given] if isinstance(given, str) else (given or {}).values():
            check_heads(source)
        import rlkv
        from rlkv.eval import Shard
        from rlkv.eval import report as write_report

        part = Shard.parse(shard) if shard is not None else None
        config = _eval_config(options)
        _check_before_load(config, out, part)
        lm, tok = load_model(model)
        results = rlkv.evaluate(lm, tok, config, out, shard=part)
        path = write_report(out) if report and not part else None  # shards finishing together would race on the PNGs
    except USER_ERRORS as err:
        fail(err)
    if part:
        console.print(f"shard {part} done; when all {part.count} are, run `rlkv report {out}`", highlight=False)
        return
    console.print(results.table(), highlight=False)
    if path:
        console.print(f"report: {path}")


def _eval_config(options: dict):
    """The EvalConfig of `rlkv eval`'s options, the comma-separated and budget ones parsed."""
    from rlkv import EvalConfig

    return config_from_options(
        EvalConfig,
        options,
        tasks=parse_names(options["task"]),
        methods=parse_names(options["method"]),
        sparsities=parse_floats(options["sparsity"], "--sparsity"),
        heads=parse_heads(options["heads"]),
        kv_budget=parse_kv_budget(options["kv_budget"], "--kv-budget"),
    )


def _check_before_load(config, out: Path, part) -> None:
    """What can be refused before the (slow) model load: tasks, methods, token budgets, the run directory and
    its lock."""
    import rlkv
    from rlkv.eval.rundir import check_run_dir

    for name in config.tasks:
        rlkv.tasks.get(name)
    for name in config.methods:
        rlkv.methods.check_name(name)
        rlkv.methods.check_kv_dtype_for(name, config.kv_dtype)
    check_budget(config.methods, config.budget, config.match_bytes)
    check_run_dir(out, part)


def report(run_dir: Path):
    """Write report.md (tables) and PNG plots for an eval run directory, or training.md and training.png for an
    `rlkv identify` run directory (reward against tau, the gates, lengths, time per step)."""
    from rlkv.eval import report as write_report
    from rlkv.identify.progress import write_report as write_training

    identification = (run_dir / "log.jsonl").is_file() and not (run_dir / "config.json").is_file()
    try:
        path = write_training(run_dir) if identification else write_report(run_dir)
    except USER_ERRORS as err:
        fail(err)
    console.print(path.read_text().split("## Details")[0].split("![")[0], highlight=False)
    console.print(f"report: {path}")


def tasks():
    """List the registered tasks."""
    from rlkv import tasks as registry

    for name in registry.names():
        console.print(f"{name}\t(default max new tokens {registry.get(name).default_max_new_tokens})")
