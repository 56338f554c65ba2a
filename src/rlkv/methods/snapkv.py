"""SnapKV (Li et al. 2024, arXiv:2404.14469) as a `tokendrop` policy.

At prefill, each KV head scores the prompt prefix (all but the last `window` tokens) by the
attention it receives from the last `window` prompt queries (summed over those queries, averaged
over the GQA group), max-pooled over neighbouring positions (`kernel`, 7), and pins the top
`budget - window` prefix tokens; the observation window itself is kept too.

Long decoding (SnapKV itself only compresses the prompt; here the budget holds at every step):
the pinned prompt tokens stay for the whole generation, and the remaining slots hold the newest
tokens, first in first out. So a head keeps its pinned tokens plus at least the last `window`
tokens (more while the prompt was shorter than the budget), `budget` in all.
"""

from __future__ import annotations

import torch

from rlkv.attention.tokendrop import Candidates, Policy, last_position, pool_by_position, top_k_mask
from rlkv.methods.tokendrop import TokenDrop, check_build


def snapkv_pins(attn: torch.Tensor, pos: torch.Tensor, window: int, kernel: int, pins: int) -> torch.Tensor:
    """Bool [b, h, K]: the `pins` prefix tokens (older than the last `window`) with the highest pooled attention."""
    prefix = (pos >= 0) & (pos <= last_position(pos) - window)
    pooled = pool_by_position(attn.masked_fill(~prefix, 0.0), pos, kernel)
    return top_k_mask(pooled.masked_fill(~prefix, float("-inf")), pins, pos)


def snapkv_keep(pinned: torch.Tensor, pos: torch.Tensor, budget: int) -> torch.Tensor:
    """Bool [b, h, K]: every pinned token, then the newest others, `budget` in all."""
    priority = torch.where(pinned, float("inf"), pos.float()).masked_fill(pos < 0, float("-inf"))
    return top_k_mask(priority, budget, pos)


class SnapKV(Policy):
    name = "snapkv"
    scored = True  # the score of a slot is 1 for a pinned prompt token, else 0

    def __init__(self, budget: int, window: int = 32, kernel: int = 7):
        super().__init__(budget)
        if not isinstance(window, int) or not 1 <= window < budget:
            raise ValueError(f"snapkv needs 1 <= window < budget, got window={window!r}, budget={budget}")
        if not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"snapkv needs an odd pooling kernel >= 1, got {kernel!r}")
        self.window, self.kernel = window, kernel

    def observed(self, first: bool, q_len: int) -> int:
        return self.window if first else 0

    def select(self, state, c: Candidates, query, q_pos) -> torch.Tensor:
        if c.first:
            assert c.attn is not None, "SnapKV observes its window's queries in the prefill"
            c.score = snapkv_pins(c.attn, c.pos, self.window, self.kernel, self.budget - self.window).float()
        assert c.score is not None, "SnapKV is scored"
        return snapkv_keep(c.score > 0, c.pos, self.budget)

    def params(self) -> dict:
        return {**super().params(), "window": self.window, "kernel": self.kernel}


def build_snapkv(
    name: str, layout, sparsity: float, budget: int | None = None, window: int = 32, kernel: int = 7, **options
) -> TokenDrop:
    """SnapKV with `budget` tokens per KV head and an observation window of `window` prompt queries."""
    budget = check_build(name, budget, options)
    return TokenDrop(SnapKV(budget, window, kernel), name=name, sparsity=float(sparsity))
