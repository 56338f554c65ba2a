"""The sanity check after identification: do the learned gates beat random heads?

A run that learned nothing looks like a run that learned something until its heads are used.
So right after training, the top-k heads by the learned gates are evaluated at two sparsities
on a held-out slice of the training task (problems the training never saw), next to the full
cache and to random heads of the same count, through the ordinary evaluation harness (inference
defaults: sink 16 + recent 64), both chosen by the rule the heads record (identify's paper
recipe: the authors'). The rows land in `out_dir/check/` like any evaluation run.
"""

from __future__ import annotations

from pathlib import Path

from rlkv.eval import EvalConfig, EvalResults, evaluate
from rlkv.heads import HeadScores


def sanity_check(
    model,
    tokenizer,
    task,
    heldout: list,
    heads_path: str | Path,
    out_dir: str | Path,
    sparsities: tuple[float, ...] = (0.5, 0.8),
    max_new_tokens: int | None = None,
    batch_size: int = 32,
    sink: int = 16,
    recent: int = 64,
    seed: int = 0,
) -> EvalResults:
    """Accuracy of full, rlkv and random heads at `sparsities` on `heldout` examples of `task`."""
    if not heldout:
        raise ValueError("the sanity check needs held-out examples (none were set aside)")
    config = EvalConfig(
        tasks=[task.name],
        methods=["full", "rlkv", "random"],
        sparsities=list(sparsities),
        heads=str(heads_path),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        sink=sink,
        recent=recent,
        seed=seed,
        keep_rule=HeadScores.load(heads_path).keep_rule,
    )
    return evaluate(model, tokenizer, config, Path(out_dir) / "check", examples={task.name: heldout})
