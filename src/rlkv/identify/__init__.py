"""RLKV head identification: learn per-KV-head gates with GRPO (see `grpo` for the loop).

    from rlkv.identify import IdentifyConfig, identify, select_problems
    task = rlkv.tasks.get("math_train")
    config = IdentifyConfig()                       # recipe="paper" (the authors'); "rlkv-v0": rlkv's first
    problems = select_problems(model, tok, task, task.load(), keep=config.problems, min_pass=config.min_pass,
                               samples_per_problem=config.samples_per_problem, max_new_tokens=config.max_new_tokens,
                               cache_path="runs/id/curriculum.json")
    heads = identify(model, tok, task, problems, config, out_dir="runs/id")   # -> HeadScores

`identify_pipeline(model, task, config, out)` is the whole of `rlkv identify` (held-out split,
curriculum, torchrun, training, sanity check) in one call.
`gated(model, alpha, sink, recent, block)` is the mixed full/streaming attention the gates train through;
`sanity_check(...)` evaluates the learned heads against full and random heads on held-out problems.
`identify_duo(...)` is the DuoAttention-style baseline: the same gates, trained by distillation on
synthetic passkey retrieval instead of by reward.
"""

from rlkv.hf.gated import gated, init_gates
from rlkv.identify.check import sanity_check
from rlkv.identify.curriculum import select_problems
from rlkv.identify.duo import DuoConfig, identify_duo, passkey_document
from rlkv.identify.grpo import identify
from rlkv.identify.objective import batch_advantages, group_advantages, penalty_weight
from rlkv.identify.pipeline import IdentifyRun, identify_pipeline
from rlkv.identify.recipe import RECIPES, IdentifyConfig

__all__ = [
    "RECIPES",
    "DuoConfig",
    "IdentifyConfig",
    "IdentifyRun",
    "identify_duo",
    "passkey_document",
    "gated",
    "batch_advantages",
    "group_advantages",
    "identify",
    "identify_pipeline",
    "init_gates",
    "penalty_weight",
    "sanity_check",
    "select_problems",
]
