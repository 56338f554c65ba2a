"""Which methods a run evaluates: every (method, sparsity) built up front, and `--match-bytes` budgets.

Building each method before anything runs makes a bad head file or setting fail before the run
directory is touched. A token-dropping method under `match_bytes` is built last, once the
head-split samples whose mean KV bytes its budget is matched to exist.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import rlkv.methods as method_registry
from rlkv.eval.config import EvalConfig
from rlkv.eval.rundir import run_records
from rlkv.methods.matching import TOLERANCE, match_budget
from rlkv.models import Layout


def method_plan(config: EvalConfig, layout: Layout) -> list[tuple[str, float, object]]:
    """(method name, sparsity, built method) for every group, built now so bad inputs fail early.

    With `match_bytes`, token-dropping methods come last and unbuilt (None): their budget is
    matched to the head-split samples of the same task and sparsity once those exist.
    """
    if config.match_bytes and bytes_reference(config.methods) is None:
        raise ValueError(f"--match-bytes needs a head-split method to match ({', '.join(method_registry.HEAD_RANKED)})")
    plan, seen = [], set()
    for name in config.methods:
        for sparsity in config.sparsities:
            if config.match_bytes and name in method_registry.TOKEN_DROPPING:
                plan.append((name, float(sparsity), None))
                continue
            options = {"keep_rule": config.keep_rule} if name in method_registry.HEAD_RANKED else {}
            if name not in method_registry.TOKEN_DROPPING:
                options["prefill"] = config.prefill
            method = method_registry.build(
                name,
                layout,
                sparsity,
                heads=_heads_for(config, name),
                sink=config.sink,
                recent=config.recent,
                seed=config.seed,
                budget=config.budget,
                kv_dtype=config.kv_dtype,
                **options,
            )
            key = (name, method.sparsity)
            if key not in seen:
                seen.add(key)
                plan.append((name, method.sparsity, method))
    return sorted(plan, key=lambda p: p[2] is None)


def _heads_for(config: EvalConfig, method: str) -> str | None:
    """The head-score file of `method`: the one file, or its entry in a per-method mapping."""
    if isinstance(config.heads, dict):
        return config.heads.get(method)
    return config.heads


def matched(name: str, task: str, sparsity: float, ids: set[str], config: EvalConfig, layout: Layout, out: Path):
    """The token-dropping method `name` with the budget that matches the head-split run's mean bytes.

    The reference is the first head-split method of the run on the same task and sparsity, and it
    must be complete (every example id in `ids`): a budget matched to part of it would differ from
    the one a resume matches to all of it. Unsharded, it is, as the reference group runs first; a
    shard may find it still running in the shard that owns it.
    """
    ref = bytes_reference(config.methods)  # method_plan checked there is one
    reference = [
        s
        for s in run_records(out, "samples")
        if (s["task"], s["method"], float(s["sparsity"])) == (task, ref, sparsity)
    ]
    have = len(ids & {str(s["id"]) for s in reference})
    if have < len(ids):
        raise ValueError(
            f"--match-bytes: {name} on {task} at sparsity {sparsity:g} takes its budget from the KV bytes of {ref} "
            f"there, which has {have} of {len(ids)} samples in {out}; that group must finish first (run the "
            f"head-split methods without --shard first, or run this shard again once the one that owns it is done)"
        )

    def build(budget: int):
        return method_registry.build(name, layout, sparsity, budget=budget, kv_dtype=config.kv_dtype)

    match = match_budget(build, layout, reference)
    if match.excess > TOLERANCE:
        warnings.warn(
            f"--match-bytes: {name} cannot hold as little KV as {ref} on {task} at sparsity {sparsity:g}: its budget "
            f"of {match.budget} tokens is predicted to hold {100 * match.excess:.0f}% more; it runs there and the "
            "report marks it as not at equal memory",
            stacklevel=2,
        )
    return build(match.budget)


def bytes_reference(methods: list[str]) -> str | None:
    """The head-split method whose KV bytes `--match-bytes` matches: the first head-ranked one listed."""
    return next((m for m in methods if m in method_registry.HEAD_RANKED), None)
