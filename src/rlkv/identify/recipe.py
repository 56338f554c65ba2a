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


@dataclass
class IdentifyConfig:
    """Settings of one identification run; fields left None take the value of `recipe` (see RECIPES),
    `tau` and `beta` the authors' value for the model's architecture (`for_model`)."""

    recipe: str = "paper"
    sink: int = 128
    recent: int = 256
    block: int | None = None  # the streaming branch's granularity in tokens (1: exact; the authors': 128)
    group: int = 4  # rollouts per problem
    temperature: float | None = None  # rollout and curriculum sampling
    top_p: float | None = None
    top_k: int | None = None  # 0: no top-k filter
    lr: float = 1e-2  # constant
    beta: float | None = None  # L1 sparsity coefficient
    tau: float | None = None  # the penalty acts only when the batch's mean reward exceeds tau
    batch_problems: int = 32
    steps: int | None = None  # paper: 186 (2 epochs of 3,000 problems at 32 per step)
    max_new_tokens: int | None = None
    advantages: str | None = None  # "batch" or "group" (rlkv.identify.objective)
    problems: str | None = None  # curriculum: "reliable", "solved" or "band" (rlkv.identify.curriculum)
    min_pass: float = 0.75  # curriculum (problems="reliable"): keep pass rate >= min_pass
    band: tuple[float, float] = (0.0, 1.0)  # curriculum (problems="band"): keep low < pass rate < high
    samples_per_problem: int | None = None  # curriculum: full-model samples per problem
    answer_rule: str | None = None  # how rewards find the answer: "authors" or "rlkv" (rlkv.tasks.grading)
    weight_decay: float | None = None  # AdamW decay on the gates
    grad_clip: float | None = None  # max L2 norm of the gate gradient (0: no clipping)
    eps: float | None = None  # in the advantage denominator
    gate_dtype: str | None = None  # the gates' and their optimizer state's dtype
    seed: int = 0
    checkpoint_every: int = 10
    rollout_batch_size: int = 128  # sequences decoded at once (the engine's batch; generate's without it)
    train_tokens: int = 7680  # padded tokens per forward/backward micro-batch (the authors' max_tokens_per_mb)
    gradient_checkpointing: bool = False  # recompute layer activations in the backward pass
    rollout_engine: str = "auto"  # rollouts through rlkv.Engine: "auto" (on CUDA), "on", "off" (transformers generate)
    rollout_kv_budget: float | str = 0.4  # the engine's KV pool: a share of free GPU memory, or bytes ("8GiB")
    init: float = 1.0  # every gate's starting value (below 1 leaves gates room to rise before the clamp at 1)

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"IdentifyConfig.recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        for name, value in RECIPES[self.recipe].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.band = tuple(self.band)
        checks = {  # name: (whether its value is valid, what is expected); None: set later by for_model
            "group": (self.group >= 2, ">= 2"),
            "batch_problems": (self.batch_problems >= 1, ">= 1"),
            "steps": (self.steps >= 1, ">= 1"),
            "max_new_tokens": (self.max_new_tokens >= 1, ">= 1"),
            "checkpoint_every": (self.checkpoint_every >= 1, ">= 1"),
            "temperature": (self.temperature > 0, "> 0"),
            "top_p": (0 < self.top_p <= 1, "in (0, 1]"),
            "top_k": (self.top_k >= 0, ">= 0 (0: off)"),
            "lr": (self.lr > 0, "> 0"),
            "beta": (self.beta is None or self.beta >= 0, ">= 0"),
            "tau": (self.tau is None or 0 <= self.tau <= 1, "in [0, 1] (a mean 0/1 reward)"),
            "weight_decay": (self.weight_decay >= 0, ">= 0"),
            "grad_clip": (self.grad_clip >= 0, ">= 0 (0: off)"),
            "eps": (self.eps > 0, "> 0"),
            "advantages": (self.advantages in ADVANTAGES, " or ".join(ADVANTAGES)),
            "problems": (self.problems in PROBLEM_FILTERS, " or ".join(PROBLEM_FILTERS)),
            "min_pass": (0 < self.min_pass <= 1, "in (0, 1]"),
            "answer_rule": (self.answer_rule in ANSWER_RULES, " or ".join(ANSWER_RULES)),
            "gate_dtype": (self.gate_dtype in GATE_DTYPES, " or ".join(GATE_DTYPES)),
            "block": (isinstance(self.block, int) and self.block >= 1, "an integer >= 1 (1: token-exact)"),
            "rollout_batch_size": (self.rollout_batch_size >= 1, ">= 1"),
            "train_tokens": (self.train_tokens >= 1, ">= 1"),
            "samples_per_problem": (self.samples_per_problem >= 1, ">= 1"),
            "band": (
                len(self.band) == 2 and 0 <= self.band[0] < self.band[1] <= 1,
                "low, high with 0 <= low < high <= 1",
            ),
            "rollout_engine": (self.rollout_engine in ENGINE_SETTINGS, ", ".join(ENGINE_SETTINGS)),
            "init": (0 <= self.init <= 1, "in [0, 1]"),
        }
        for name, (ok, expected) in checks.items():
            if not ok:
                raise ValueError(
                    f"IdentifyConfig.{name} has an invalid value: {getattr(self, name)!r} (expected {expected})"
                )

    def for_model(self, layout: Layout) -> IdentifyConfig:
        """This config with `tau` and `beta` left unset filled in with the authors' values for `layout.arch`."""
        values = {**PER_MODEL_DEFAULTS, **AUTHORS_PER_ARCH.get(layout.arch, {})}
        return dataclasses.replace(self, **{k: v for k, v in values.items() if getattr(self, k) is None})
