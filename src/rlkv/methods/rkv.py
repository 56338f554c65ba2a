"""R-KV, redundancy-aware KV compression for reasoning models (Cai et al. 2025, arXiv:2505.24133), as a
`tokendrop` policy.

Tokens accumulate until a KV head holds `budget + interval` of them (the prefill compresses at
once if the prompt is that long); then the head is cut back to `budget` tokens, so in steady
decoding it compresses every `interval` (128) new tokens and never stores more than
`budget + interval` (the slack its capacity reports). At a compression each candidate is scored

    score = lam * importance - (1 - lam) * redundancy          (lam = 0.1)

- importance: the attention the last `window` (8) queries pay it (mean over those queries and
  the GQA group of query heads), max-pooled over neighbouring positions (`kernel`, 7). The
  layer remembers those queries (and their positions) between steps: part of `nbytes()`.
- redundancy: its key's mean cosine similarity to the other keys of the head, softmax-normalised
  over the head's tokens. (The paper's variant also keeps, per token, only the similarities to
  its most recent near-duplicates above a threshold; the plain mean is used here.)

The last `window` tokens are always kept, plus the top `budget - window` by score.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlkv.attention.tokendrop import (
    Candidates,
    Policy,
    allowed_keys,
    grouped_probs,
    last_position,
    pool_by_position,
    top_k_mask,
)
from rlkv.methods.tokendrop import TokenDrop, check_build


def rkv_importance(queries, q_pos, keys, pos, scaling: float, kernel: int) -> torch.Tensor:
    """[b, h, K]: mean attention of `queries` [b, hq, w, d] at `q_pos` [b, w] over keys at `pos`, pooled."""
    probs = grouped_probs(queries, keys, allowed_keys(pos, q_pos, None), scaling)  # [b, h, g, w, K]
    count = (q_pos >= 0).sum(dim=-1).clamp(min=1)[:, None, None]
    return pool_by_position(probs.sum(dim=-2).mean(dim=2) / count, pos, kernel)


def rkv_redundancy(keys: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """[b, h, K]: softmax over valid tokens of each key's mean cosine similarity to the head's other valid keys."""
    valid = pos >= 0
    unit = F.normalize(keys.float(), dim=-1) * valid[..., None]
    n = valid.sum(dim=-1, keepdim=True)
    mean_sim = ((unit * unit.sum(dim=2, keepdim=True)).sum(-1) - valid.float()) / (n - 1).clamp(min=1)
    return torch.softmax(mean_sim.masked_fill(~valid, float("-inf")), dim=-1).nan_to_num(0.0)


def rkv_keep(importance, redundancy, pos, budget: int, window: int, lam: float) -> torch.Tensor:
    """Bool [b, h, K]: the last `window` tokens plus the best `budget - window` by
    lam*importance - (1-lam)*redundancy."""
    score = lam * importance - (1 - lam) * redundancy
    priority = torch.where(pos > last_position(pos) - window, float("inf"), score).masked_fill(pos < 0, float("-inf"))
    return top_k_mask(priority, budget, pos)


class RKV(Policy):
    name = "rkv"
    needs_keys = True  # redundancy and importance are computed from the candidates' keys

    def __init__(self, budget: int, window: int = 8, interval: int = 128, lam: float = 0.1, kernel: int = 7):
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f"rkv needs an integer interval >= 1, got {interval!r}")
        super().__init__(budget, slack=interval)
        if not isinstance(window, int) or not 1 <= window < budget:
            raise ValueError(f"rkv needs 1 <= window < budget, got window={window!r}, budget={budget}")
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"rkv needs lam in [0, 1], got {lam!r}")
        if not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"rkv needs an odd pooling kernel >= 1, got {kernel!r}")
        self.window, self.interval, self.lam, self.kernel = window, interval, lam, kernel

    def select(self, state, c: Candidates, query, q_pos) -> torch.Tensor:
        if c.first:
            state.update(self.empty_state(query.shape[0], query.shape[1], query.shape[-1], query.dtype, query.device))
        queries = torch.cat([state["queries"], query], dim=2)[:, :, -self.window :]
        query_pos = torch.cat([state["query_pos"], q_pos], dim=1)[:, -self.window :]
        state.update(queries=queries, query_pos=query_pos)
        valid = c.pos >= 0
        full = valid.sum(dim=-1).amax(dim=-1) >= self.capacity  # [b]: rows whose heads reached budget + interval
        # no row to cut: skip the scoring (that test waits for the device, so not inside a CUDA graph's capture)
        capturing = full.is_cuda and torch.cuda.is_current_stream_capturing()
        if not capturing and not bool(full.any()):
            return valid
        assert c.keys is not None, "R-KV needs the candidates' keys (needs_keys)"
        importance = rkv_importance(queries, query_pos, c.keys, c.pos, c.scaling, self.kernel)
        # redundancy compares keys with each other: the model's keys, not FP8's centred ones (c.model_keys)
        keep = rkv_keep(importance, rkv_redundancy(c.model_keys(), c.pos), c.pos, self.budget, self.window, self.lam)
        return torch.where(full[:, None, None], keep, valid)

    def state_bytes(self, layout, itemsize: int) -> int:
        """The last `window` queries (all query heads) and their positions."""
        return self.window * (layout.num_q_heads * layout.head_dim * itemsize + 8)

    def empty_state(self, batch: int, q_heads: int, head_dim: int, dtype, device) -> dict[str, torch.Tensor]:
        """`window` query places, empty (position -1): an empty query attends to nothing and is not counted."""
        return {
            "queries": torch.zeros(batch, q_heads, self.window, head_dim, dtype=dtype, device=device),
            "query_pos": torch.full((batch, self.window), -1, dtype=torch.long, device=device),
        }

    def params(self) -> dict:
        return {
            **super().params(),
            "window": self.window,
            "interval": self.interval,
            "lam": self.lam,
            "kernel": self.kernel,
        }


def build_rkv(
    name: str,
    layout,
    sparsity: float,
    budget: int | None = None,
    window: int = 8,
    interval: int = 128,
    lam: float = 0.1,
    kernel: int = 7,
    **options,
) -> TokenDrop:
    """R-KV with `budget` tokens per KV head, compressing every `interval` new tokens."""
    budget = check_build(name, budget, options)
    return TokenDrop(RKV(budget, window, interval, lam, kernel), name=name, sparsity=float(sparsity))
