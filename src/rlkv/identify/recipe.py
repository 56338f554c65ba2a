"""The settings of an identification run, and the recipes that fill the ones left unset.

- "paper" (the default): the authors' code, Kurt232/RLKV at 6dadf85 with its AReaL fork at 6f9933d
  (examples/rlkv/deepseek_grpo.yaml, scripts/run_*.sh): advantages normalised over the batch,
  problems the model solves at least once, AdamW with weight decay 0.017 and the gradient norm
  clipped at 1.0, 186 steps of 32 problems x 4 rollouts of up to 7,168 new tokens; its heads
  are chosen by the authors' keep rule.
- "rlkv-v0": rlkv's first recipe: advantages per problem group, problems inside the pass band,
  no weight decay or clipping, 100 steps of up to 4,096 new tokens; heads chosen by rank.
Any field given explicitly overrides its recipe's value (the ablation switches: `advantages`,
`problems`).
"""

from __future__ import annotations

from dataclasses import dataclass

from rlkv.engine import ENGINE_SETTINGS
from rlkv.identify.objective import ADVANTAGES

RECIPES = {
    # the authors' code (Kurt232/RLKV's AReaL fork: examples/rlkv/deepseek_grpo.yaml, scripts/run_*.sh)
    "paper": dict(
        advantages="batch",
        problems="solved",
        weight_decay=0.017,
        grad_clip=1.0,
        steps=186,
        max_new_tokens=7168,
        eps=1e-5,
    ),
    # rlkv's first recipe: GRPO advantages per group, problems inside the pass band, plain AdamW
    "rlkv-v0": dict(
        advantages="group", problems="band", weight_decay=0.0, grad_clip=0.0, steps=100, max_new_tokens=4096, eps=1e-6
    ),
}
PROBLEM_FILTERS = ("solved", "band")
KEEP_RULES = {"paper": "authors", "rlkv-v0": "rank"}  # the keep rule recorded in each recipe's heads


@dataclass
class IdentifyConfig:
    """Settings of one identification run; fields left None take the value of `recipe` (see RECIPES).

    The authors' per-model values: beta 1e-3 and tau 0.5 (Llama-3.1-8B-R1), tau 0.55
    (Qwen-2.5-7B-R1), beta 2.5e-3 with temperature 0.6, top_p 0.95, top_k 20 (Qwen3-4B-Thinking).
    """

    recipe: str = "paper"
    sink: int = 128
    recent: int = 256
    group: int = 4  # rollouts per problem
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    lr: float = 1e-2  # constant
    beta: float = 1e-3  # L1 sparsity coefficient
    tau: float = 0.5  # the penalty acts only when the batch's mean reward exceeds tau
    batch_problems: int = 32
    steps: int | None = None  # paper: 186 (2 epochs of 3,000 problems at 32 per step)
    max_new_tokens: int | None = None
    advantages: str | None = None  # "batch" or "group" (rlkv.identify.objective)
    problems: str | None = None  # curriculum: "solved" (pass rate > 0) or "band" (low < pass rate < high)
    weight_decay: float | None = None  # AdamW decay on the gates
    grad_clip: float | None = None  # max L2 norm of the gate gradient (0: no clipping)
    eps: float | None = None  # in the advantage denominator
    seed: int = 0
    checkpoint_every: int = 10
    rollout_batch_size: int = 128  # sequences per generate call
    train_batch_size: int = 8  # sequences per forward/backward micro-batch
    samples_per_problem: int = 8  # curriculum: full-model samples per problem
    band: tuple[float, float] = (0.0, 1.0)  # curriculum (problems="band"): keep low < pass rate < high
    gradient_checkpointing: bool = False  # recompute layer activations in the backward pass: long sequences fit
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
        checks = {  # name: (whether its value is valid, what is expected)
            "group": (self.group >= 2, ">= 2"),
            "batch_problems": (self.batch_problems >= 1, ">= 1"),
            "steps": (self.steps >= 1, ">= 1"),
            "max_new_tokens": (self.max_new_tokens >= 1, ">= 1"),
            "checkpoint_every": (self.checkpoint_every >= 1, ">= 1"),
            "temperature": (self.temperature > 0, "> 0"),
            "top_p": (0 < self.top_p <= 1, "in (0, 1]"),
            "top_k": (self.top_k >= 0, ">= 0 (0: off)"),
            "lr": (self.lr > 0, "> 0"),
            "beta": (self.beta >= 0, ">= 0"),
            "weight_decay": (self.weight_decay >= 0, ">= 0"),
            "grad_clip": (self.grad_clip >= 0, ">= 0 (0: off)"),
            "eps": (self.eps > 0, "> 0"),
            "advantages": (self.advantages in ADVANTAGES, " or ".join(ADVANTAGES)),
            "problems": (self.problems in PROBLEM_FILTERS, " or ".join(PROBLEM_FILTERS)),
            "rollout_batch_size": (self.rollout_batch_size >= 1, ">= 1"),
            "train_batch_size": (self.train_batch_size >= 1, ">= 1"),
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
