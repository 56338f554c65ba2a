"""The token-dropping methods' registry entry: `TokenDrop` (a `Policy` applied through `rlkv.hf.tokendrop`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlkv.attention.tokendrop import Policy
from rlkv.hf.tokendrop import token_drop


@dataclass
class TokenDrop:
    """A token-dropping method for the registry: `apply(model)` generates with `policy`'s cache."""

    policy: Policy
    name: str
    sparsity: float = 0.0
    params: dict = field(default_factory=dict)

    def apply(self, model):
        return token_drop(model, self.policy)

    def describe(self) -> dict:
        return {"method": self.name, "sparsity": self.sparsity, **self.policy.params(), **self.params}


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
