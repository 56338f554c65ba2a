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

Sampling is the expensive part. Each wave of samples goes to the model in one generate call (with
the engine's continuous batching a long straggler then costs once, not once per few problems); with
the "reliable" rule a problem draws its last samples only if its first ones leave it a chance (two
waves, the same problems kept). Each problem is graded as its samples end, and the per-problem
scores are cached in a JSON file under a key made of the model (name and layout), the task, the
answer rule and the sampling settings, rewritten atomically every 30 s: an interrupted run resumes,
samples already scored are never drawn again, and another keep rule draws only the samples it lacks.
"""

from __future__ import annotations

import json
import math
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
    reject_below: float | None = None,
) -> dict[str, float]:
    """The full model's pass rate on every example (by id), each wave of samples in one generate call.

    Scores are read from and written to `cache_path` (JSON) when given: a problem is graded as soon
    as its samples of the wave are done, and the file is rewritten at most every `save_every` seconds
    and at the end, so an interruption loses at most that much. With an `rlkv.Engine` (full attention)
    the samples go through it, seeded per (seed, problem, sample), continuously batched; `batch_size`
    is the prompts per transformers `generate` call without one.

    `reject_below` (the "reliable" rule's min_pass) stops sampling a problem once it cannot reach that
    pass rate: every problem first draws the fewest samples whose all being wrong rules it out (2 of 4
    at 0.75), and only the problems not ruled out draw the rest. Samples are seeded per (problem,
    sample), so the problems kept are those that all samples would keep, at about half the cost on
    problems the model fails; a ruled-out problem's rate is that of the samples it drew (cached as
    they are: a later call without `reject_below` draws the rest).
    """
    n = samples_per_problem
    if n < 1:
        raise ValueError(f"samples_per_problem must be >= 1, got {n}")
    if reject_below is not None and not 0 < reject_below <= 1:
        raise ValueError(f"reject_below must be in (0, 1], got {reject_below!r}")
    key = cache_key(model, task, n, max_new_tokens, temperature, seed, top_p, top_k)
    path = Path(cache_path) if cache_path is not None else None
    cache = json.loads(path.read_text()) if path is not None and path.exists() else {}
    scores: dict[str, list[float]] = cache.setdefault(key, {})

    def settled(ex: Example) -> bool:
        drawn = scores.get(ex.id, [])
        best = (sum(drawn) + n - len(drawn)) / n  # every sample still to draw right
        return len(drawn) == n or (reject_below is not None and best < reject_below)

    bar = tqdm(total=len(examples), initial=sum(map(settled, examples)), desc="curriculum", unit="problem")
    saved = [time.monotonic()]

    def sample(todo: list[tuple[Example, int]]) -> None:
        """Draw, grade and cache the samples `todo` ((problem, sample index) pairs, a problem's in order)."""
        texts: dict[int, str] = {}
        rows_of: dict[str, list[int]] = {}
        for row, (ex, _) in enumerate(todo):
            rows_of.setdefault(ex.id, []).append(row)
        ready: list[str] = []  # problems whose samples are all done, not yet graded

        def save() -> None:
            rows = [r for p in ready for r in rows_of[p]]
            results = iter(task.grade_many([todo[r][0] for r in rows], [texts.pop(r) for r in rows]))
            for p in ready:
                scores.setdefault(p, []).extend(next(results) for _ in rows_of[p])
            bar.update(sum(settled(todo[rows_of[p][0]][0]) for p in ready))
            ready.clear()
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text(json.dumps(cache))
                os.replace(tmp, path)
            saved[0] = time.monotonic()

        def on_complete(i: int, completion) -> None:
            texts[i] = completion.text
            p = todo[i][0].id
            if all(r in texts for r in rows_of[p]):
                ready.append(p)
            if ready and time.monotonic() - saved[0] >= save_every:
                save()

        prompts = dict(
            zip(rows_of, prompt_ids(tokenizer, [task.prompt(todo[rows[0]][0], tokenizer) for rows in rows_of.values()]))
        )
        generate(
            model,
            tokenizer,
            [prompts[ex.id] for ex, _ in todo],
            engine=engine if engine is not None else "off",
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=[stable_seed(seed, ex.id, j) for ex, j in todo],
            batch_size=batch_size,
            on_complete=on_complete,
        )
        save()

    first = n if reject_below is None else min(n, math.floor(n * (1 - reject_below) + 1e-9) + 1)
    torch.manual_seed(seed)
    for start, upto in ((0, first), (first, n)) if first < n else ((0, n),):
        todo = [(ex, j) for ex in examples if not settled(ex) for j in range(len(scores.get(ex.id, [])), upto)]
        if todo:
            bar.set_description(f"curriculum, samples {start + 1}-{upto} of {n}" if first < n else "curriculum")
            sample(todo)
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
    reject_below = min_pass if keep == "reliable" else None
    rates = pass_rates(model, tokenizer, task, examples, reject_below=reject_below, **sampling)
    return keep_problems(examples, rates, keep, min_pass, band)
