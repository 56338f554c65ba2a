"""What one identification step optimises: advantages from the 0/1 rewards, and the sparsity penalty.

Two advantage rules:
- "batch" (the authors' AReaL recipe, `adv_norm: {mean_level: batch, std_level: batch}`): the
  reward is shaped to clip((r - 0.5) * 10, -20, 20); every completion token carries its
  rollout's shaped reward, and the advantage is (s - mean) / (std + 1e-5) with the mean and the
  unbiased std taken over all completion tokens of the whole batch (every rank), in float64.
  A group whose rollouts are all right (or all wrong) still moves the gates.
- "group" (GRPO as first written in rlkv): (r - mean) / (std + eps) within each problem's group;
  a group with equal rewards gives no signal.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

ADVANTAGES = ("batch", "group")


def shaped_rewards(rewards: torch.Tensor, scale: float = 10.0, bias: float = -0.5, clip: float = 20.0) -> torch.Tensor:
    """AReaL's reward shaping: clip((r + bias) * scale, -clip, clip)."""
    return ((rewards + bias) * scale).clamp(-clip, clip)


def group_advantages(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """GRPO advantages of rewards [problems, group]: normalised within each row."""
    return (rewards - rewards.mean(dim=1, keepdim=True)) / (rewards.std(dim=1, keepdim=True) + eps)


def batch_advantages(
    rewards: torch.Tensor,
    n_tokens: torch.Tensor,
    eps: float = 1e-5,
    all_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> torch.Tensor:
    """Token-weighted batch-normalised shaped advantages of rewards [n] with n_tokens [n] completion tokens.

    `all_sum` sums a tensor over ranks (torch.distributed), so the statistics are the whole batch's.
    """
    s, n = shaped_rewards(rewards.double()), n_tokens.double()
    count, total = all_sum(torch.stack([n.sum(), (n * s).sum()]))
    if count == 0:
        return torch.zeros_like(rewards, dtype=torch.float32)
    mean = total / count
    squares = all_sum((n * (s - mean) ** 2).sum().reshape(1))[0]
    std = (squares / (count - 1)).sqrt() if count > 1 else torch.ones_like(squares)  # AReaL: one token gives std 1
    return ((s - mean) / (std + eps)).float()


def advantages(
    rule: str,
    rewards: torch.Tensor,
    group: int,
    n_tokens: torch.Tensor,
    eps: float,
    all_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> torch.Tensor:
    """Per-rollout advantages [n] of rewards [n] (consecutive runs of `group` rollouts per problem)."""
    if rule == "batch":
        return batch_advantages(rewards, n_tokens, eps, all_sum)
    if rule == "group":
        return group_advantages(rewards.view(-1, group), eps).flatten()
    raise ValueError(f"unknown advantage rule {rule!r}: expected one of {', '.join(ADVANTAGES)}")


def penalty_weight(mean_reward: float, beta: float, tau: float) -> float:
    """beta * (exp(mean_reward) - 1) when mean_reward > tau, else 0.

    `mean_reward` is the whole batch's (every rank's) raw 0/1 reward, as in the authors' code: AReaL's
    micro-batch split (`split_padded_tensor_dict_into_mb_list`) divides only batch x sequence tensors,
    so the 1-D rewards reach every micro-batch whole and `reg_loss_fn` compares their mean with tau.
    """
    return beta * (math.exp(mean_reward) - 1.0) if mean_reward > tau else 0.0
