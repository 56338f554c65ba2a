"""Equal-memory budgets for token-dropping methods (`rlkv eval --match-bytes`).

Methods are compared fairly only at equal memory. A head-split method at sparsity s has no token
budget; what it has is the KV bytes it actually held, recorded per sample by the harness. For a
token-dropping method we pick the token budget per KV head at which it would hold the same mean
bytes over the same sequences (the head-split run's prompt and output lengths): the smallest
budget whose predicted bytes reach the target, or the one below if that is closer. Predictions
use `Policy.sequence_bytes`, which equals what the live cache reports.

Some targets are out of reach: R-KV, for one, compresses only every 128 new tokens and is charged
for the budget + 128 tokens it holds between compressions, so at high sparsity even its smallest
budget holds more than the head split did. `Match.excess` says by how much the chosen budget
overshoots; the harness warns above `TOLERANCE` and the report marks such groups as not at equal
memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

TOLERANCE = 0.02  # a matched budget predicts the reference's mean bytes within this fraction


@dataclass(frozen=True)
class Match:
    """A matched token budget, and the mean bytes it is predicted to hold against the target's (summed over samples)."""

    budget: int
    predicted: float
    target: float

    @property
    def excess(self) -> float:
        """Predicted bytes over the target's, as a fraction (0.41: 41% more than the reference)."""
        return self.predicted / self.target - 1


def bytes_over_decoding(bytes_of: Callable[[torch.Tensor], torch.Tensor], samples: list[dict]):
    """Per sample: the lengths it went through (prompt + 1 ... prompt + tokens) and `bytes_of` each."""
    steps = [torch.arange(s["prompt_tokens"] + 1, s["prompt_tokens"] + max(s["tokens"], 1) + 1) for s in samples]
    held = bytes_of(torch.cat(steps).to(torch.float64)).split([len(t) for t in steps])
    return list(zip(steps, held))


def mean_bytes(bytes_of: Callable[[torch.Tensor], torch.Tensor], samples: list[dict]) -> float:
    """Sum over samples of the mean, over decoding steps, of `bytes_of(tokens held)`."""
    return float(sum(held.mean() for _, held in bytes_over_decoding(bytes_of, samples)))


def match_budget(build: Callable[[int], Any], layout, samples: list[dict]) -> Match:
    """The budget at which `build(budget)`'s method holds the mean KV bytes the `samples` held."""
    if not samples:
        raise ValueError("no reference samples to match bytes against")
    target = sum(s["kv_bytes_mean"] for s in samples)

    def predicted(budget: int) -> float | None:
        try:
            method = build(budget)
        except ValueError:
            return None  # below the method's smallest valid budget
        return mean_bytes(lambda t: method.sequence_bytes(layout, t), samples)

    lo = 1
    while predicted(lo) is None:
        lo += 1

    def held(budget: int) -> float:
        """The prediction of a budget from `lo` up, all of them valid."""
        value = predicted(budget)
        assert value is not None, f"budget {budget} is above the smallest valid one, {lo}"
        return value

    hi = max(s["prompt_tokens"] + s["tokens"] for s in samples)
    if held(hi) < target:
        return Match(hi, held(hi), target)  # holding every token still costs less than the reference
    while lo < hi:  # smallest budget whose prediction reaches the target (bytes grow with the budget)
        mid = (lo + hi) // 2
        if held(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    below = predicted(lo - 1) if lo > 1 else None
    if below is not None and target - below < held(lo) - target:
        return Match(lo - 1, below, target)
    return Match(lo, held(lo), target)
