"""The settings of an identification run, and the recipes that fill the ones left unset.

- "paper" (the default): the authors' code, Kurt232/RLKV at 6dadf85 with its AReaL fork at 6f9933d
  (examples/rlkv/*_grpo.yaml, scripts/run_*.sh, areal/mixed_attn/): advantages normalised over the
  batch, AdamW with weight decay 0.017 and the gradient norm clipped at 1.0, 186 steps of 32
  problems x 4 rollouts of up to 7,168 new tokens, micro-batches of up to 7,680 tokens, gates and
  their optimizer state in bf16, the streaming branch block-sparse (128-token blocks), rewards by
  the authors' answer rule (the last boxed answer or "the answer is", nothing else), tau 0.55 on
  Qwen2.5 and beta 2.5e-3 on Qwen3 as their scripts set; its heads are chosen by the authors' keep
  rule. The curriculum keeps problems the model answers reliably (3 of 4 samples), sampled, like
  the rollouts, at 0.6 / 0.95 / 20 (the authors' Qwen3 setting): at their R1 setting (T = 1.0) the
  1.5B stand-in's batch reward never reaches tau (RESULTS.md, "Against the paper").
- "rlkv-v0": rlkv's first recipe: advantages per group, problems inside the pass band, no weight
  decay or clipping, float32 gates, token-exact streaming, 100 steps of up to 4,096 new tokens;
  heads chosen by rank.
Any field given explicitly overrides its recipe's value (the ablation switches: `advantages`,
`problems`, `block`, `gate_dtype`, `answer_rule`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rlkv.engine import ENGINE_SETTINGS
from rlkv.identify.curriculum import PROBLEM_FILTERS
from rlkv.identify.objective import ADVANTAGES
from rlkv.models import Layout
from rlkv.tasks.grading import ANSWER_RULES

RECIPES = {
    "paper": dict(
        advantages="batch",
        problems="reliable",
        weight_decay=0.017,
        grad_clip=1.0,
        steps=186,
        max_new_tokens=7168,
        eps=1e-5,
        samples_per_problem=4,
        temperature=0.6,
        top_p=0.95,
        top_k=20,
        block=128,
        gate_dtype="bfloat16",
        answer_rule="authors",
    ),
    "rlkv-v0": dict(
        advantages="group",
        problems="band",
        weight_decay=0.0,
        grad_clip=0.0,
        steps=100,
        max_new_tokens=4096,
        eps=1e-6,
        samples_per_problem=8,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        block=1,
        gate_dtype="float32",
        answer_rule="rlkv",
    ),
}
KEEP_RULES = {"paper": "authors", "rlkv-v0": "rank"}  # the keep rule recorded in each recipe's heads
# The authors' per-model penalty settings (scripts/run_*.sh), by architecture; tau 0.5 and beta 1e-3 elsewhere.
AUTHORS_PER_ARCH = {"qwen2": {"tau": 0.55}, "qwen3": {"beta": 2.5e-3}}
PER_MODEL_DEFAULTS = {"tau": 0.5, "beta": 1e-3}
GATE_DTYPES = ("float32", "bfloat16")
UNSET: Any = None  # the default of a field the recipe (or `for_model`) fills in: set on every config in use


@dataclass
class IdentifyConfig:
    """Settings of one identification run; fields left unset (None) take the value of `recipe` (see RECIPES),
    `tau` and `beta` the authors' value for the model's architecture (`for_model`)."""

    recipe: str = "paper"
    sink: int = 128
    recent: int = 256
    block: int = UNSET  # the streaming branch's granularity in tokens (1: exact; the authors': 128)
    group: int = 4  # rollouts per problem
    temperature: float = UNSET  # rollout and curriculum sampling
    top_p: float = UNSET
    top_k: int = UNSET  # 0: no top-k filter
    lr: float = 1e-2  # constant
    beta: float = UNSET  # L1 sparsity coefficient
    tau: float = UNSET  # the penalty acts only when the batch's mean reward exceeds tau
    batch_problems: int = 32
    steps: int = UNSET  # paper: 186 (2 epochs of 3,000 problems at 32 per step)
    max_new_tokens: int = UNSET
    advantages: str = UNSET  # "batch" or "group" (rlkv.identify.objective)
    problems: str = UNSET  # curriculum: "reliable", "solved" or "band" (rlkv.identify.curriculum)
    min_pass: float = 0.75  # curriculum (problems="reliable"): keep pass rate >= min_pass
    band: tuple[float, float] = (0.0, 1.0)  # curriculum (problems="band"): keep low < pass rate < high
    samples_per_problem: int = UNSET  # curriculum: full-model samples per problem
    answer_rule: str = UNSET  # how rewards find the answer: "authors" or "rlkv" (rlkv.tasks.grading)
    weight_decay: float = UNSET  # AdamW decay on the gates
    grad_clip: float = UNSET  # max L2 norm of the gate gradient (0: no clipping)
    eps: float = UNSET  # in the advantage denominator
    gate_dtype: str = UNSET  # the gates' and their optimizer state's dtype
    seed: int = 0
    checkpoint_every: int = 10
    # also keep the gates of every heads_every-th step as heads_step{N:04d}.json (0: only the last step's heads.json):
    # one run then gives the heads of its earlier epochs too (issue 32's one-epoch ablation)
    heads_every: int = 0
    rollout_batch_size: int = 128  # sequences decoded at once (the engine's batch; generate's without it)
    train_tokens: int = 7680  # padded tokens per forward/backward micro-batch (the authors' max_tokens_per_mb)
    # recompute layer activations in the backward pass: on by default, since one 80 GB GPU holding the rollout
    # engine's KV pool runs out of memory at the first step without it (the authors shard over 8 GPUs with FSDP)
    gradient_checkpointing: bool = True
    rollout_engine: str = "auto"  # rollouts through rlkv.Engine: "auto" (on CUDA), "on", "off" (transformers generate)
    rollout_kv_budget: float | str = 0.4  # the engine's KV pool: a share of free GPU memory, or bytes ("8GiB")
    init: float = 1.0  # every gate's starting value (below 1 leaves gates room to rise before the clamp at 1)

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"IdentifyConfig.recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        for name, value in RECIPES[self.recipe].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name, (valid, expected) in _CHECKS.items():
            if not valid(getattr(self, name)):
                raise ValueError(
                    f"IdentifyConfig.{name} has an invalid value: {getattr(self, name)!r} (expected {expected})"
                )
        self.band = (self.band[0], self.band[1])  # a list given (JSON, the CLI) kept as the tuple it is

    def for_model(self, layout: Layout) -> IdentifyConfig:
        """This config with `tau` and `beta` left unset filled in with the authors' values for `layout.arch`."""
        values = {**PER_MODEL_DEFAULTS, **AUTHORS_PER_ARCH.get(layout.arch, {})}
        return dataclasses.replace(self, **{k: v for k, v in values.items() if getattr(self, k) is None})


_CHECKS = {  # field: (whether a value is valid, what is expected); tau and beta may wait for `for_model`
    "group": (lambda v: v >= 2, ">= 2"),
    "batch_problems": (lambda v: v >= 1, ">= 1"),
    "steps": (lambda v: v >= 1, ">= 1"),
    "max_new_tokens": (lambda v: v >= 1, ">= 1"),
    "checkpoint_every": (lambda v: v >= 1, ">= 1"),
    "heads_every": (lambda v: v >= 0, ">= 0 (0: off)"),
    "temperature": (lambda v: v > 0, "> 0"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (lambda v: v >= 0, ">= 0 (0: off)"),
    "lr": (lambda v: v > 0, "> 0"),
    "beta": (lambda v: v is None or v >= 0, ">= 0"),
    "tau": (lambda v: v is None or 0 <= v <= 1, "in [0, 1] (a mean 0/1 reward)"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "grad_clip": (lambda v: v >= 0, ">= 0 (0: off)"),
    "eps": (lambda v: v > 0, "> 0"),
    "advantages": (lambda v: v in ADVANTAGES, " or ".join(ADVANTAGES)),
    "problems": (lambda v: v in PROBLEM_FILTERS, " or ".join(PROBLEM_FILTERS)),
    "min_pass": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "answer_rule": (lambda v: v in ANSWER_RULES, " or ".join(ANSWER_RULES)),
    "gate_dtype": (lambda v: v in GATE_DTYPES, " or ".join(GATE_DTYPES)),
    "block": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1 (1: token-exact)"),
    "rollout_batch_size": (lambda v: v >= 1, ">= 1"),
    "train_tokens": (lambda v: v >= 1, ">= 1"),
    "samples_per_problem": (lambda v: v >= 1, ">= 1"),
    "band": (lambda v: len(v) == 2 and 0 <= v[0] < v[1] <= 1, "low, high with 0 <= low < high <= 1"),
    "rollout_engine": (lambda v: v in ENGINE_SETTINGS, ", ".join(ENGINE_SETTINGS)),
    "init": (lambda v: 0 <= v <= 1, "in [0, 1]"),
}
