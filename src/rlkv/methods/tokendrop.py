"""The token-dropping methods' registry entry: `TokenDrop` (a `Policy` applied through `rlkv.hf.tokendrop`, with its
slots at a precision: the model's dtype or FP8, `rlkv.precision`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlkv.attention.tokendrop import Policy
from rlkv.hf.tokendrop import token_drop
from rlkv.precision import check_kv_dtype


@dataclass
class TokenDrop:
    """A token-dropping method for the registry: `apply(model)` generates with `policy`'s cache."""

    policy: Policy
    name: str
    sparsity: float = 0.0
    params: dict = field(default_factory=dict)
    kv_dtype: str | None = None  # "bf16" (the model's dtype) or "fp8"; None: the runtime's, bf16

    def __post_init__(self):
        if self.kv_dtype is not None and check_kv_dtype(self.kv_dtype) == "fp8-kept":
            raise ValueError(
                f"{self.name} keeps no head whole, so kv_dtype 'fp8-kept' means nothing for it: give 'bf16' or 'fp8'"
            )

    def apply(self, model):
        return token_drop(model, self.policy, kv_dtype=self.kv_dtype or "bf16")

    def sequence_bytes(self, layout, num_tokens: torch.Tensor) -> torch.Tensor:
        """`Policy.sequence_bytes` with the slots at this method's precision."""
        kv_itemsize = 1 if self.kv_dtype == "fp8" else None
        return self.policy.sequence_bytes(layout, num_tokens, kv_itemsize)

    def describe(self) -> dict:
        return {
            "method": self.name,
            "sparsity": self.sparsity,
            "kv_dtype": self.kv_dtype or "bf16",
            **self.policy.params(),
            **self.params,
        }


HARNESS_OPTIONS = (
    "heads",
    "sink",
    "recent",
    "seed",
)  # passed to every builder by rlkv.eval; token dropping ignores them


def check_build(name: str, budget, options: dict) -> int:
    """The budget of a builder call; refuses a missing budget and kwargs that are neither the method's nor the
    harness's."""
    unknown = sorted(set(options) - set(HARNESS_OPTIONS))
    if unknown:
        raise ValueError(f"method {name!r} got unknown options {unknown}")
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(
            f"method {name!r} needs budget= an integer >= 1 (tokens kept per layer and KV head; on the "
            f"command line --budget N, or --match-bytes in rlkv eval), got {budget!r}"
        )
    return budget
