"""Self-distillation sampling: train the gates only on problems the full model can solve.

Before training, the full (ungated) model samples `samples_per_problem` completions for every
candidate problem. Which problems are kept:
- "solved" (the paper's "solvable problems drawn from the model's own correct rollouts"): pass
  rate > 0, always-solved problems included. The rewards then measure what compression takes
  away from the model's own ability, and the batch reward is high enough for the penalty to act.
- "band": pass rate strictly inside `band` (default (0, 1): at least one but not all correct),
  so that every group gives GRPO's per-group advantage a signal.

Sampling is the expensive part, so the per-problem scores are cached in a JSON file under a key
made of the model (name and layout), the task and the sampling settings. The band is applied
after the cache, so changing it costs nothing; problems already scored are never sampled again,
and the file is rewritten (atomically) after every batch, so an interrupted run resumes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from rlkv.engine.sampling import stable_seed
from rlkv.generation import generate
from rlkv.models import Layout
from rlkv.tasks import Example, Task


def cache_key(
    model,
    task: Task,
    samples_per_problem: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    top_p: float = 1.0,
    top_k: int = 0,
) -> str:
    layout = Layout.of(model)
    return json.dumps(
        {
            "model": layout.name,
            "layout": layout.to_dict(),
            "task": task.name,
            "samples": samples_per_problem,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "seed": seed,
        },
        sort_keys=True,
    )


def select_problems(
    model,
    tokenizer,
    task: Task,
    examples: list[Example],
    samples_per_problem: int = 8,
    band: tuple[float, float] = (0.0, 1.0),
    max_new_tokens: int = 4096,
    cache_path: str | os.PathLike | None = None,
    batch_size: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    engine=None,
    keep: str = "band",
    top_p: float = 1.0,
    top_k: int = 0,
) -> list[Example]:
    """The examples whose full-model pass rate p is > 0 (keep="solved") or in band[0] < p < band[1] (keep="band").

    Kept examples come in input order.

    Scores are read from and written to `cache_path` (JSON) when given. With an `rlkv.Engine`
    (full attention) the samples go through it, seeded per (seed, problem, sample).
    """
    low, high = band
    if not 0 <= low < high <= 1:
        raise ValueError(f"band must be (low, high) with 0 <= low < high <= 1, got {band!r}")
    if keep not in ("solved", "band"):
        raise ValueError(f"keep must be 'solved' (pass rate > 0) or 'band' (low < pass rate < high), got {keep!r}")
    if samples_per_problem < 1:
        raise ValueError(f"samples_per_problem must be >= 1, got {samples_per_problem}")
    key = cache_key(model, task, samples_per_problem, max_new_tokens, temperature, seed, top_p, top_k)
    path = Path(cache_path) if cache_path is not None else None
    cache = json.loads(path.read_text()) if path is not None and path.exists() else {}
    scores: dict[str, list[float]] = cache.setdefault(key, {})
    todo = [ex for ex in examples if ex.id not in scores]
    per_batch = max(1, batch_size // samples_per_problem)
    torch.manual_seed(seed)
    for start in range(0, len(todo), per_batch):
        chunk = todo[start : start + per_batch]
        prompts = [task.prompt(ex, tokenizer) for ex in chunk for _ in range(samples_per_problem)]
        seeds = [stable_seed(seed, ex.id, j) for ex in chunk for j in range(samples_per_problem)]
        outs = generate(
            model,
            tokenizer,
            prompts,
            engine=engine if engine is not None else "off",
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seeds,
            batch_size=batch_size,
        )
        texts = [o.text for o in outs]
        graded = task.grade_many([ex for ex in chunk for _ in range(samples_per_problem)], texts)
        for i, ex in enumerate(chunk):
            scores[ex.id] = graded[i * samples_per_problem : (i + 1) * samples_per_problem]
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, path)
    rate = {ex.id: sum(scores[ex.id]) / len(scores[ex.id]) for ex in examples}
    if keep == "solved":
        return [ex for ex in examples if rate[ex.id] > 0]
    return [ex for ex in examples if low < rate[ex.id] < high]
