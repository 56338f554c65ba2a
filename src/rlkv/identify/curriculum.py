"""Self-distillation sampling: train the gates only on problems the full model solves itself.

Before training, the full (ungated) model samples `samples_per_problem` completions for every
candidate problem, graded by the task (for the paper recipe with the RLKV authors' answer rule).
Which problems are kept, by their pass rate p:
- "reliable" (the paper recipe): p >= `min_pass` (3 of 4 samples by default). The authors train on
  problems their model answers within the length cap, so the batch's mean reward stays above tau
  and the sparsity penalty acts; "solved" problems keep it near 0.3 on the 1.5B stand-in.
- "solved": p > 0, always-solved problems included.
- "band": p strictly inside `band` (default (0, 1): at least one but not all correct), so that
  every group gives GRPO's per-group advantage a signal.

Sampling is the expensive part. Every sample goes to the model in one generate call (with the
engine's continuous batching a long straggler then costs once, not once per few problems); each
problem is graded as its last sample ends, and the per-problem scores are cached in a JSON file
under a key made of the model (name and layout), the task, the answer rule and the sampling
settings, rewritten atomically every 30 s: an interrupted run resumes, problems already scored are
never sampled again, and changing the keep rule costs nothing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlkv.engine.sampling import stable_seed
from rlkv.generation import generate, prompt_ids
from rlkv.models import Layout
from rlkv.tasks import Example, Task

PROBLEM_FILTERS = ("reliable", "solved", "band")


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
            "answer_rule": getattr(task, "answer_rule", None),
            "samples": samples_per_problem,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "seed": seed,
        },
        sort_keys=True,
    )


def pass_rates(
    model,
    tokenizer,
    task: Task,
    examples: list[Example],
    samples_per_problem: int = 4,
    max_new_tokens: int = 4096,
    cache_path: str | os.PathLike | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    engine=None,
    batch_size: int = 64,
    save_every: float = 30.0,
) -> dict[str, float]:
    """The full model's pass rate on every example (by id), all samples in one generate call.

    Scores are read from and written to `cache_path` (JSON) when given: a problem is graded as soon
    as its last sample is done, and the file is rewritten at most every `save_every` seconds and at
    the end, so an interruption loses at most that much. With an `rlkv.Engine` (full attention) the
    samples go through it, seeded per (seed, problem, sample), continuously batched; `batch_size` is
    the prompts per transformers `generate` call without one.
    """
    if samples_per_problem < 1:
        raise ValueError(f"samples_per_problem must be >= 1, got {samples_per_problem}")
    key = cache_key(model, task, samples_per_problem, max_new_tokens, temperature, seed, top_p, top_k)
    path = Path(cache_path) if cache_path is not None else None
    cache = json.loads(path.read_text()) if path is not None and path.exists() else {}
    scores: dict[str, list[float]] = cache.setdefault(key, {})
    todo = [ex for ex in examples if ex.id not in scores]
    samples = [ex for ex in todo for _ in range(samples_per_problem)]
    bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc="curriculum", unit="problem")
    texts: dict[int, str] = {}
    ready: list[int] = []  # problems (indices into todo) whose samples are all done, not yet graded
    saved = [time.monotonic()]

    def save() -> None:
        rows = [p * samples_per_problem + j for p in ready for j in range(samples_per_problem)]
        results = task.grade_many([samples[r] for r in rows], [texts.pop(r) for r in rows])
        for n, p in enumerate(ready):
            scores[todo[p].id] = results[n * samples_per_problem : (n + 1) * samples_per_problem]
        bar.update(len(ready))
        ready.clear()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, path)
        saved[0] = time.monotonic()

    def on_complete(i: int, completion) -> None:
        texts[i] = completion.text
        p = i // samples_per_problem
        if all(p * samples_per_problem + j in texts for j in range(samples_per_problem)):
            ready.append(p)
        if ready and time.monotonic() - saved[0] >= save_every:
            save()

    if samples:
        torch.manual_seed(seed)
        generate(
            model,
            tokenizer,
            [
                ids
                for ids in prompt_ids(tokenizer, [task.prompt(ex, tokenizer) for ex in todo])
                for _ in range(samples_per_problem)
            ],
            engine=engine if engine is not None else "off",
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=[stable_seed(seed, ex.id, j) for ex in todo for j in range(samples_per_problem)],
            batch_size=batch_size,
            on_complete=on_complete,
        )
        save()
    bar.close()
    return {ex.id: sum(scores[ex.id]) / len(scores[ex.id]) for ex in examples}


def keep_problems(
    examples: list[Example],
    rates: dict[str, float],
    keep: str = "reliable",
    min_pass: float = 0.75,
    band: tuple[float, float] = (0.0, 1.0),
) -> list[Example]:
    """The examples the rule `keep` keeps by their pass rates (see the module docstring), in input order."""
    if keep not in PROBLEM_FILTERS:
        raise ValueError(f"keep must be one of {', '.join(PROBLEM_FILTERS)}, got {keep!r}")
    low, high = band
    if not 0 <= low < high <= 1:
        raise ValueError(f"band must be (low, high) with 0 <= low < high <= 1, got {band!r}")
    if not 0 < min_pass <= 1:
        raise ValueError(f"min_pass must be in (0, 1], got {min_pass!r}")
    rule = {
        "reliable": lambda p: p >= min_pass,
        "solved": lambda p: p > 0,
        "band": lambda p: low < p < high,
    }[keep]
    return [ex for ex in examples if rule(rates[ex.id])]


def select_problems(
    model,
    tokenizer,
    task: Task,
    examples: list[Example],
    keep: str = "reliable",
    min_pass: float = 0.75,
    band: tuple[float, float] = (0.0, 1.0),
    **sampling,
) -> list[Example]:
    """`keep_problems` of the `pass_rates` sampled with `sampling` (pass_rates' keyword arguments)."""
    keep_problems(examples, {ex.id: 0.0 for ex in examples}, keep, min_pass, band)  # bad rules fail before sampling
    return keep_problems(examples, pass_rates(model, tokenizer, task, examples, **sampling), keep, min_pass, band)
