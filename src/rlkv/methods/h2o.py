"""H2O, Heavy-Hitter Oracle (Zhang et al. 2023, arXiv:2306.14048), as a `tokendrop` policy.

Each KV head keeps at most `budget` tokens: the `recent` newest ones plus the heavy hitters,
the tokens with the largest accumulated attention (the sum of the softmax attention each stored
token has received from every query so far, averaged over the GQA group of query heads). After
every forward the candidates (stored + new tokens) are ranked: recent tokens first, then by
accumulated score; the lowest non-recent ones are evicted until `budget` remain. During decoding
that is exactly "evict the non-recent token with the lowest accumulated score" once per step;
at prefill, the prompt is attended exactly and then cut to the budget by its accumulated scores
(as in the authors' HF implementation). Ties keep the older token.
"""

from __future__ import annotations

import torch

from rlkv.attention.tokendrop import Candidates, Policy, last_position, top_k_mask
from rlkv.methods.tokendrop import TokenDrop, check_build


def h2o_keep(score: torch.Tensor, pos: torch.Tensor, budget: int, recent: int) -> torch.Tensor:
    """Bool [b, h, K]: the `recent` newest valid tokens plus the best-scored others, `budget` in all."""
    is_recent = pos > last_position(pos) - recent
    priority = torch.where(is_recent, float("inf"), score).masked_fill(pos < 0, float("-inf"))
    return top_k_mask(priority, budget, pos)


class H2O(Policy):
    name = "h2o"
    scored = True  # accumulated attention per stored token

    def __init__(self, budget: int, recent: int):
        super().__init__(budget)
        if not isinstance(recent, int) or not 0 <= recent < budget:
            raise ValueError(f"h2o needs 0 <= recent < budget, got recent={recent!r}, budget={budget}")
        self.recent = recent

    def observed(self, first: bool, q_len: int) -> int:
        return q_len  # every query adds to the accumulated attention

    def select(self, state, c: Candidates, query, q_pos) -> torch.Tensor:
        assert c.score is not None and c.attn is not None, "H2O is scored and observes every query"
        c.score = c.score + c.attn
        return h2o_keep(c.score, c.pos, self.budget, self.recent)

    def params(self) -> dict:
        return {**super().params(), "recent": self.recent}


def build_h2o(
    name: str, layout, sparsity: float, budget: int | None = None, h2o_recent: int | None = None, **options
) -> TokenDrop:
    """H2O with `budget` tokens per KV head; its recent window is `h2o_recent`, else half the budget.

    The harness-wide `recent` (the head-split window) is not used: H2O splits its budget evenly
    between heavy hitters and recent tokens.
    """
    budget = check_build(name, budget, options)
    recent = h2o_recent if h2o_recent is not None else budget // 2
    return TokenDrop(H2O(budget, recent), name=name, sparsity=float(sparsity))
