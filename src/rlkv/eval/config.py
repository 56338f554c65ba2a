"""What an evaluation runs (`EvalConfig`), checked whole before anything runs, and which settings are a run's
identity."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rlkv.engine import check_setting
from rlkv.heads import KEEP_RULES
from rlkv.hf.splitcache import PREFILL_MODES
from rlkv.precision import check_kv_dtype

# The settings a run directory keeps for good: a resumed run must share them (heads: per method, in rlkv.eval.run).
# A run recorded before a setting existed ran with the default it has now, except for these:
BEFORE_IT_EXISTED = {"prefill": "compressed"}  # full prefill became the default when the setting came in
IDENTITY = (
    "model",
    "max_new_tokens",
    "temperature",
    "top_p",
    "seed",
    "sink",
    "recent",
    "budget",
    "match_bytes",
    "keep_rule",
    "prefill",
    "kv_dtype",
)


@dataclass
class EvalConfig:
    """What to evaluate; defaults follow the paper (sink 16 + recent 64, greedy)."""

    tasks: list[str]
    methods: list[str] = field(default_factory=lambda: ["full"])
    sparsities: list[float] = field(default_factory=lambda: [0.0])
    heads: str | dict[str, str] | None = None  # one head-score file, or one per method: {"rlkv": a, "duo": b}
    limit: int | None = None
    max_new_tokens: int | None = None  # None: each task's own default
    batch_size: int | None = (
        None  # prompts per transformers generate call, finished samples recorded at once (None: 32)
    )
    max_running: int | None = (
        None  # most sequences the engine runs at once (None: as many as kv_budget holds, up to 256)
    )
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    sink: int = 16
    recent: int = 64
    budget: int | None = None  # tokens per KV head for h2o / snapkv / rkv
    keep_rule: str = "rank"  # how rlkv / duo / random scores become heads: "rank" or "authors" (rlkv.heads)
    prefill: str = (
        "full"  # head splits: "full" (every head attends over the whole prompt: the authors') or "compressed"
    )
    kv_dtype: str = (
        "bf16"  # how every method stores K/V (rlkv.precision): "bf16" (the model's dtype), "fp8", "fp8-kept"
    )
    match_bytes: bool = False  # instead: per task and sparsity, the budget matching a head-split method's mean bytes
    data_dir: str | None = None
    repetition_window: int = 400  # 0 turns the degenerate-repetition stop off
    repetition_min_distinct: int = 40
    engine: str = "auto"  # generate through rlkv.Engine: "auto" (on CUDA), "on" or "off" (transformers generate)
    kv_budget: str | float | None = None  # the engine's KV pool: a size ("20GiB") or a share of free GPU memory

    def __post_init__(self):
        check_setting(self.engine)
        _check_settings(self)
        if self.prefill not in PREFILL_MODES:
            raise ValueError(f"prefill must be one of {', '.join(PREFILL_MODES)}, got {self.prefill!r}")
        check_kv_dtype(self.kv_dtype)
        if self.keep_rule not in KEEP_RULES:
            raise ValueError(f"keep_rule must be one of {', '.join(KEEP_RULES)}, got {self.keep_rule!r}")
        if isinstance(self.heads, dict) and set(self.heads) - set(self.methods):
            raise ValueError(
                f"heads are given for {sorted(set(self.heads) - set(self.methods))}, "
                f"which are not among the evaluated methods {self.methods}"
            )


# The least value of each whole-number setting; those that may be None (the default) are in OPTIONAL.
MINIMUM = {
    "batch_size": 1,
    "max_running": 1,
    "limit": 1,
    "max_new_tokens": 1,
    "sink": 0,
    "recent": 1,
    "budget": 1,
    "repetition_window": 0,
    "repetition_min_distinct": 1,
}
OPTIONAL = ("batch_size", "max_running", "limit", "max_new_tokens", "budget")
BATCH_SIZE = 32  # batch_size when None


def _check_settings(config: EvalConfig) -> None:
    """One line for the first setting that is not what it should be (a bad value never reaches a run)."""
    for name in ("tasks", "methods", "sparsities"):
        values = getattr(config, name)
        if isinstance(values, str) or not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"EvalConfig {name} must be a non-empty list, got {values!r}")
    for sparsity in config.sparsities:
        if not _is_number(sparsity) or not 0 <= sparsity <= 1:
            raise ValueError(
                f"sparsity must be a number in [0, 1] (fraction of KV heads compressed; full and "
                f"streaming take one too), got {sparsity!r}"
            )
    for name, least in MINIMUM.items():
        value = getattr(config, name)
        if value is None and name in OPTIONAL:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"EvalConfig {name} must be an integer >= {least}, got {value!r}")
    if not _is_number(config.temperature) or not config.temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {config.temperature!r}")
    if not _is_number(config.top_p) or not 0 <= config.top_p <= 1:
        raise ValueError(f"top_p must be a number in [0, 1], got {config.top_p!r}")


def _is_number(value) -> bool:
    """A real, finite number (not a bool, not nan or inf)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
