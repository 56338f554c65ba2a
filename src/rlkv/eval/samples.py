"""One group's generations as sample records: `rlkv.generate` on the group's runtime, handed over in batches.

Every `batch_size` finished samples go to the caller at once (who grades and appends them), so an
interrupted run keeps them. A batch's seconds are the generation wall time since the previous
batch, the caller's grading and writing excluded. Each sample carries the KV bytes its sequence
held at its end and on average over its decoding steps, and a full cache's, measured by its
runtime's own `sequence_nbytes` (the engine's store, or the transformers cache of its batch).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from rlkv.engine import Completion, Engine
from rlkv.eval.config import BATCH_SIZE, EvalConfig
from rlkv.generation import generator
from rlkv.methods.matching import bytes_over_decoding
from rlkv.models import Layout, eos_ids


def generate_samples(
    model,
    tokenizer,
    method,
    prompts: list[str],
    seeds: list[int],
    max_new_tokens: int,
    config: EvalConfig,
    save_batch: Callable[[list[int], list[dict], dict], None],
) -> None:
    """Generate every prompt under `method`; `save_batch(indices, samples, timing)` gets each batch as it finishes.

    Seeds come from the caller (per example): the engine samples each example as before on a resume.
    The transformers path draws from the torch RNG, seeded with the run's seed.
    """
    rows = config.batch_size or BATCH_SIZE
    runner = generator(
        model,
        tokenizer,
        method,
        engine=config.engine,
        kv_budget=config.kv_budget,
        max_batch=config.max_running,
        batch_size=rows,
    )  # max_running None: the engine's own cap
    full_per_token = Layout.of(model).kv_bytes_per_token()
    buffer: list[tuple[int, Completion]] = []
    clock = {"last": time.perf_counter(), "grading": 0.0}

    def flush() -> None:
        if not buffer:
            return
        now = time.perf_counter()
        samples = [
            {"completion": c.text, "tokens": len(c.tokens), "prompt_tokens": c.prompt_tokens, "finish": c.finish}
            for _, c in buffer
        ]
        _record_kv_bytes(samples, runner.store, full_per_token)
        timing = {
            "seconds": now - clock["last"] - clock["grading"],
            "tokens": sum(s["tokens"] for s in samples),
            "batch": len(samples),
            **({"engine": True} if isinstance(runner, Engine) else {}),
        }
        indices = [i for i, _ in buffer]
        buffer.clear()
        save_batch(indices, samples, timing)
        clock["last"] = now
        clock["grading"] = time.perf_counter() - now  # grading and writing stall generation: not its time

    def on_complete(index: int, completion) -> None:
        buffer.append((index, completion))
        if len(buffer) >= rows:
            flush()

    torch.manual_seed(config.seed)
    runner.generate(
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        seed=seeds,
        eos_token_ids=eos_ids(model, tokenizer),
        repetition_window=config.repetition_window,
        repetition_min_distinct=config.repetition_min_distinct,
        on_complete=on_complete,
    )
    flush()


def _record_kv_bytes(samples: list[dict], cache, full_per_token: int) -> None:
    """KV bytes each sequence held at its end and on average over its decoding steps, and a full cache's.

    The average is exact for any growth law: the cache's own `sequence_nbytes` is evaluated at
    every length the sequence went through (prompt + 1 ... prompt + tokens).
    """
    for s, (t, b) in zip(samples, bytes_over_decoding(cache.sequence_nbytes, samples)):
        s.update(
            kv_bytes=int(b[-1]),
            kv_bytes_full=int(t[-1]) * full_per_token,
            kv_bytes_mean=float(b.mean()),
            kv_bytes_full_mean=float(t.double().mean()) * full_per_token,
        )
