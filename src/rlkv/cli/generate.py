"""`rlkv generate`: a batch of prompts through a per-head compressed cache, then the bytes it held."""

from __future__ import annotations

import time
from typing import Optional

import typer

from rlkv.cli.common import (
    HEADS_HELP,
    KV_DTYPE_HELP,
    MODEL_HELP,
    PREFILL_HELP,
    SPARSITY_HELP,
    USER_ERRORS,
    check_heads,
    check_model,
    console,
    fail,
    finite,
    load_model,
)


def generate(
    model: str = typer.Option(..., help=MODEL_HELP),
    prompt: list[str] = typer.Option(..., help="a prompt; repeat for a batch"),
    heads: Optional[str] = typer.Option(None, help=HEADS_HELP + "; omit for sparsity 0 or 1"),
    sparsity: float = typer.Option(0.0, min=0.0, max=1.0, help=SPARSITY_HELP),
    sink: int = typer.Option(16, min=0, help="first tokens every compressed head keeps"),
    recent: int = typer.Option(64, min=1, help="last tokens every compressed head keeps"),
    prefill: str = typer.Option("full", help=PREFILL_HELP),
    kv_dtype: str = typer.Option("bf16", help=KV_DTYPE_HELP),
    max_new_tokens: int = typer.Option(256, min=1),
    temperature: float = typer.Option(0.0, min=0.0, callback=finite, help="0 = greedy"),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    seed: int = typer.Option(0),
    chat: bool = typer.Option(True, help="wrap prompts in the model's chat template"),
    engine: str = typer.Option("auto", help="rlkv.Engine (auto: on a GPU), on, or off (transformers generate)"),
):
    """Generate with a per-head compressed KV cache and report the bytes it held."""
    try:
        check_model(model)  # before the (slow) imports and model load
        if heads is not None:
            check_heads(heads)
        import rlkv
        from rlkv.engine import check_setting
        from rlkv.generation import generator
        from rlkv.hf import resolve_keep
        from rlkv.precision import check_kv_dtype

        check_setting(engine)
        check_kv_dtype(kv_dtype)
        lm, tok = load_model(model)
        ids = _prompt_ids(tok, prompt, chat)
        keep = resolve_keep(rlkv.Layout.of(lm), heads, sparsity)
        method = rlkv.methods.HeadSplit(keep, sink, recent, prefill=prefill, kv_dtype=kv_dtype)
        runner = generator(lm, tok, method, engine=engine, max_batch=len(ids), batch_size=len(ids))
        start = time.perf_counter()
        outs = runner.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        elapsed = time.perf_counter() - start
    except USER_ERRORS as err:
        fail(err)
    _print_generations(outs, elapsed, sink + recent)


def _prompt_ids(tok, prompts: list[str], chat: bool) -> list[list[int]]:
    """Each prompt's token ids: wrapped in the chat template when asked and the tokenizer has one."""
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        if chat and tok.chat_template
        else p
        for p in prompts
    ]
    return [tok(t, add_special_tokens=not chat).input_ids for t in texts]  # plain prompts get the special tokens


def _print_generations(outs, elapsed: float, ring: int) -> None:
    """The completions, then the KV bytes held against a full cache's and the speed."""
    held, full = sum(o.kv_bytes for o in outs), sum(o.kv_bytes_full for o in outs)
    n_tokens = sum(len(o.tokens) for o in outs)
    longest = max(o.prompt_tokens + len(o.tokens) for o in outs)
    for i, out in enumerate(outs):
        console.rule(f"[bold]prompt {i}")
        console.print(out.text, highlight=False)
    console.rule()
    console.print(
        f"KV held {held / 2**20:.2f} MiB vs {full / 2**20:.2f} MiB for a full cache ({held / full:.1%}); "
        f"{n_tokens} tokens in {elapsed:.1f} s ({n_tokens / elapsed:.1f} tok/s)"
    )
    if held > full:
        console.print(
            f"more than a full cache: each compressed head holds a fixed ring of --sink + --recent = "
            f"{ring} slots, more than sequences of {longest} tokens fill; the savings start past "
            f"{ring} tokens",
            highlight=False,
        )
