"""`rlkv serve`: the online engine behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

from typing import Optional

import typer
from rich.markup import escape

from rlkv.cli.common import (
    BUDGET_HELP,
    HEADS_HELP,
    KV_DTYPE_HELP,
    MODEL_HELP,
    PREFILL_HELP,
    SPARSITY_HELP,
    USER_ERRORS,
    check_budget,
    check_heads,
    check_model,
    console,
    errors,
    fail,
    parse_kv_budget,
)


def serve(
    model: str = typer.Option(..., help=MODEL_HELP),
    heads: Optional[str] = typer.Option(None, help=HEADS_HELP + " (for rlkv / duo)"),
    sparsity: float = typer.Option(0.0, min=0.0, max=1.0, help=SPARSITY_HELP),
    method: Optional[str] = typer.Option(
        None,
        help="full, streaming, rlkv, duo, random, h2o, snapkv, rkv "
        "(default: rlkv with --heads, else full / streaming at sparsity 0 / 1)",
    ),
    sink: int = typer.Option(16, min=0),
    recent: int = typer.Option(64, min=1),
    budget: Optional[int] = typer.Option(None, min=1, help=BUDGET_HELP),
    prefill: str = typer.Option("full", help=PREFILL_HELP),
    kv_dtype: str = typer.Option("bf16", help=KV_DTYPE_HELP),
    kv_budget: Optional[str] = typer.Option(
        None,
        help="the KV pool (of each replica with --data-parallel): a size (20GiB) or a share of free GPU memory (0.8)",
    ),
    max_batch: int = typer.Option(256, min=1, help="most requests running at once"),
    max_model_len: Optional[int] = typer.Option(
        None, min=2, help="longest prompt + completion accepted (default: the engine's)"
    ),
    default_max_tokens: int = typer.Option(1024, min=1, help="a request's token limit when it sets none"),
    served_model_name: Optional[str] = typer.Option(
        None, help="the model name clients send (default: --model as given)"
    ),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000, min=1, max=65535),
    log_level: str = typer.Option("info", help="uvicorn's: critical, error, warning, info, debug"),
    engine_process: bool = typer.Option(
        True,
        "--engine-process/--engine-thread",
        help="run the engine in a process of its own, or in a thread of the server's",
    ),
    engine_restarts: int = typer.Option(
        3,
        min=0,
        help="restart a failed engine process; after this many failures in a row, each within a minute of "
        "its start, exit with status 1 (0: exit at the first failure; with --data-parallel, that replica stops "
        "and the server exits once none is left)",
    ),
    data_parallel: int = typer.Option(
        1,
        help="engine processes behind this one server, one per visible GPU (on a CPU: N processes), each with its "
        "own --kv-budget; a request goes to the one with the least work outstanding",
    ),
    max_body_bytes: Optional[int] = typer.Option(
        None, min=1, help="largest request body read, else 413 (default: 64 bytes per token of context, >= 1 MiB)"
    ),
    api_key: Optional[str] = typer.Option(
        None, envvar="RLKV_API_KEY", help="require 'Authorization: Bearer KEY' on /v1/... (/health stays open)"
    ),
    protect_metrics: bool = typer.Option(False, help="require the API key on /metrics too"),
    reasoning_parser: Optional[str] = typer.Option(
        None,
        help="deepseek-r1 or qwen3: chat answers' <think> ... </think> as message.reasoning_content "
        "(delta.reasoning_content when streaming), the rest as content",
    ),
):
    """Serve the model over an OpenAI-compatible HTTP API (chat and plain completions, streaming, /metrics)."""
    try:
        check_model(model)  # before the (slow) imports, the engine process and the model load
        _check_data_parallel(data_parallel, engine_process)
        if heads is not None:
            check_heads(heads)
        from rlkv.methods import check_kv_dtype_for
        from rlkv.serve import EngineSpec, create_app
        from rlkv.serve import serve as run_server
        from rlkv.serve.reasoning import PARSERS

        if reasoning_parser is not None and reasoning_parser not in PARSERS:
            raise ValueError(f"--reasoning-parser must be one of {', '.join(PARSERS)}, got {reasoning_parser!r}")
        name = _method_name(method, heads, sparsity)
        check_budget([name], budget)
        check_kv_dtype_for(name, kv_dtype)
        spec = EngineSpec(
            model,
            name,
            sparsity,
            heads=heads,
            sink=sink,
            recent=recent,
            budget=budget,
            prefill=prefill,
            kv_dtype=kv_dtype,
            kv_budget=parse_kv_budget(kv_budget, "--kv-budget"),
            max_batch=max_batch,
            max_seq_len=max_model_len,
        )
        engine, tokenizer = _start(spec, engine_process, engine_restarts, data_parallel)
        app_ = create_app(
            engine,
            tokenizer,
            served_model_name or model,
            default_max_tokens=default_max_tokens,
            max_body_bytes=max_body_bytes,
            api_key=api_key,
            protect_metrics=protect_metrics,
            reasoning_parser=reasoning_parser,
        )
    except USER_ERRORS as err:
        fail(err)
    replicas = f", {data_parallel} replicas" if data_parallel > 1 else ""
    console.print(
        f"serving {served_model_name or model} ({name}, sparsity {sparsity:g}, KV {kv_dtype}{replicas}) "
        f"on http://{host}:{port}/v1",
        highlight=False,
        soft_wrap=True,
    )
    try:
        clean = run_server(app_, host=host, port=port, log_level=log_level)
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down cleanly
        console.print("stopped", highlight=False)
        return
    if not clean:
        errors.print(f"[red]error:[/red] {escape(str(app_.state.runner.error))}", soft_wrap=True, highlight=False)
        raise typer.Exit(1)


def _check_data_parallel(replicas: int, own_process: bool) -> None:
    if replicas < 1:
        raise ValueError(f"--data-parallel must be at least 1 (engine processes, one per GPU), got {replicas}")
    if replicas > 1 and not own_process:
        raise ValueError("--data-parallel runs engine processes: it cannot be combined with --engine-thread")


def _start(spec, own_process: bool, restarts: int, replicas: int):
    """(the engine, its tokenizer): `Replicas` of engine processes, an EngineProcess (the model loaded in it), or
    an Engine built here."""
    from rlkv.serve import EngineProcess, start_replicas

    if replicas > 1:
        return start_replicas(spec, replicas, restarts=restarts)
    if own_process:
        engine = EngineProcess(spec, restarts=restarts)
        return engine, engine.tokenizer
    return spec.build()


def _method_name(method: str | None, heads: str | None, sparsity: float) -> str:
    """--method, else rlkv with --heads, else full / streaming at sparsity 0 / 1; checked before the (slow) model
    load."""
    from rlkv.methods import check_name

    name = method or ("rlkv" if heads is not None else {0.0: "full", 1.0: "streaming"}.get(sparsity))
    if name is None:
        raise ValueError(f"sparsity {sparsity:g} needs --heads (or --method random)")
    check_name(name)
    return name
