"""`rlkv identify` (RLKV gates trained with GRPO) and `rlkv identify-duo` (the same gates by distillation):
which KV heads need a full cache, written as OUT/heads.json."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from rlkv.cli.common import (
    DATA_DIR_HELP,
    MODEL_HELP,
    USER_ERRORS,
    check_model,
    config_from_options,
    console,
    fail,
    finite,
    load_model,
    parse_floats,
    parse_kv_budget,
    say,
    warn,
)


def identify(
    model: str = typer.Option(..., help=MODEL_HELP),
    task: str = typer.Option("math_train", help="training task (see `rlkv tasks`)"),
    out: Path = typer.Option(
        ..., help="run directory: curriculum cache, log.jsonl, checkpoint.pt, heads.json (resumes)"
    ),
    data_dir: Optional[str] = typer.Option(None, help=DATA_DIR_HELP),
    limit: Optional[int] = typer.Option(None, min=1, help="first N training problems before the curriculum"),
    recipe: str = typer.Option(
        "paper",
        help="paper (the authors' code) or rlkv-v0 (rlkv's first); the options "
        "below left unset take the recipe's value",
    ),
    steps: Optional[int] = typer.Option(None, min=1, help="paper: 186"),
    batch_problems: int = typer.Option(32, min=1),
    group: int = typer.Option(4, min=2, help="rollouts per problem"),
    max_new_tokens: Optional[int] = typer.Option(None, min=1, help="paper: 7168"),
    temperature: Optional[float] = typer.Option(
        None, min=0.0, callback=finite, help="rollout and curriculum sampling (paper: 0.6, the authors' Qwen3 value)"
    ),
    top_p: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="paper: 0.95"),
    top_k: Optional[int] = typer.Option(None, min=0, help="0: off (paper: 20)"),
    advantages: Optional[str] = typer.Option(
        None, help="batch (paper: shaped, normalised over the batch) or group (per problem)"
    ),
    problems: Optional[str] = typer.Option(
        None,
        help="curriculum: reliable (paper: pass rate >= --min-pass), solved (pass rate > 0) or band (see --band)",
    ),
    min_pass: float = typer.Option(0.75, min=0.0, max=1.0, help="curriculum with --problems reliable"),
    answer_rule: Optional[str] = typer.Option(
        None, help="how rewards find the answer: authors (paper: boxed or 'the answer is') or rlkv (+ last number)"
    ),
    lr: float = typer.Option(1e-2, min=0.0, callback=finite),
    weight_decay: Optional[float] = typer.Option(None, min=0.0, help="AdamW decay on the gates (paper: 0.017)"),
    grad_clip: Optional[float] = typer.Option(None, min=0.0, help="max gate-gradient norm, 0 = off (paper: 1.0)"),
    gate_dtype: Optional[str] = typer.Option(None, help="gates and optimizer state: bfloat16 (paper) or float32"),
    beta: Optional[float] = typer.Option(
        None, min=0.0, callback=finite, help="L1 sparsity coefficient (the authors': 1e-3; 2.5e-3 on Qwen3)"
    ),
    tau: Optional[float] = typer.Option(
        None, callback=finite, help="the penalty acts only above this mean reward (the authors': 0.5; 0.55 on Qwen2.5)"
    ),
    init: float = typer.Option(1.0, min=0.0, max=1.0, help="every gate's starting value"),
    sink: int = typer.Option(128, min=0),
    recent: int = typer.Option(256, min=1),
    block: Optional[int] = typer.Option(
        None, min=1, help="the streaming branch's granularity in tokens (paper: 128, block-sparse; 1: exact)"
    ),
    samples_per_problem: Optional[int] = typer.Option(None, min=1, help="curriculum: samples per problem (paper: 4)"),
    band: str = typer.Option("0,1", help="curriculum with --problems band: keep low < pass rate < high"),
    rollout_batch_size: int = typer.Option(128, min=1, help="sequences decoded at once"),
    train_tokens: int = typer.Option(7680, min=1, help="padded tokens per training micro-batch"),
    checkpoint_every: int = typer.Option(10, min=1),
    heads_every: int = typer.Option(
        0, min=0, help="also keep every N-th step's heads as OUT/heads_stepNNNN.json (0: only the last)"
    ),
    gradient_checkpointing: bool = typer.Option(
        True, help="recompute activations in backward: less memory, a slower update (off: when memory allows)"
    ),
    rollout_engine: str = typer.Option("auto", help="rollouts through rlkv.Engine: auto (on a GPU), on, off"),
    rollout_kv_budget: str = typer.Option(
        "0.4", help="the rollout engine's KV pool: a share of free GPU memory or a size (8GiB)"
    ),
    seed: int = typer.Option(0),
    check_limit: int = typer.Option(64, min=0, help="held-out problems for the sanity check after training (0: skip)"),
    check_sparsities: str = typer.Option("0.5,0.8", help="sparsities of the sanity check"),
    check_max_new_tokens: Optional[int] = typer.Option(None, min=1, help="default: the task's own"),
):
    """Learn which KV heads need a full cache (RLKV gates trained with GRPO); writes OUT/heads.json.

    Afterwards the top-k heads are checked against full and random heads on held-out problems.
    Several GPUs: `torchrun --nproc-per-node N -m rlkv identify ...` splits the rollouts over ranks.
    """
    options = dict(locals())
    try:
        check_model(model)  # before the (slow) imports and model load
        from rlkv.identify import identify_pipeline

        config = _identify_config(options)
        identify_pipeline(
            model,
            task,
            config,
            out,
            data_dir=data_dir,
            limit=limit,
            check_limit=check_limit,
            check_sparsities=tuple(parse_floats(check_sparsities, "--check-sparsities")),
            check_max_new_tokens=check_max_new_tokens,
            say=say,
            warn=warn,
        )
    except USER_ERRORS as err:
        fail(err)


def _identify_config(options: dict):
    """The IdentifyConfig of `rlkv identify`'s options, --band and --rollout-kv-budget parsed."""
    from rlkv.identify import IdentifyConfig

    return config_from_options(
        IdentifyConfig,
        options,
        band=tuple(parse_floats(options["band"], "--band")),
        rollout_kv_budget=parse_kv_budget(options["rollout_kv_budget"], "--rollout-kv-budget"),
    )


def identify_duo(
    model: str = typer.Option(..., help=MODEL_HELP),
    text: Path = typer.Option(..., help="any plain-text file: the haystack of the passkey documents"),
    out: Path = typer.Option(..., help="run directory: log.jsonl, heads.json"),
    steps: int = typer.Option(200, min=1),
    length: int = typer.Option(2048, min=1, help="haystack tokens per document"),
    num_keys: int = typer.Option(8, min=1, help="pass keys per document"),
    batch: int = typer.Option(1, min=1),
    lr: float = typer.Option(2e-2, min=0.0, callback=finite),
    l1: float = typer.Option(0.05, min=0.0, callback=finite, help="weight of mean |alpha|"),
    sink: int = typer.Option(128, min=0),
    recent: int = typer.Option(256, min=1),
    seed: int = typer.Option(0),
):
    """DuoAttention-style baseline: the same gates trained by distillation on passkey retrieval."""
    try:
        check_model(model)  # before the (slow) imports and model load
        if not text.is_file():
            raise FileNotFoundError(f"text file not found: {text} (expected any plain-text file for the haystack)")
        from rlkv.identify import DuoConfig
        from rlkv.identify import identify_duo as train_duo

        config = DuoConfig(
            sink=sink,
            recent=recent,
            steps=steps,
            lr=lr,
            l1=l1,
            length=length,
            num_keys=num_keys,
            batch=batch,
            seed=seed,
        )
        lm, tok = load_model(model)
        heads = train_duo(lm, tok, text.read_text(), config, out)
    except USER_ERRORS as err:
        fail(err)
    console.print(heads.summary(), soft_wrap=True, highlight=False)
    console.print(f"wrote {out / 'heads.json'}")
