"""The obviously-correct definition of per-head streaming attention.

A kept ("full") KV head attends causally to every earlier token. A compressed head at query
position t attends only to keys j with j < sink (attention sinks) or t - recent < j <= t
(the recent window). With `block` > 1 (the RLKV authors' block-sparse training attention, in
128-token blocks) the rule holds at block granularity: the first ceil(sink / block) blocks, and the
ceil(recent / block) most recent blocks counting the query's own (so the recent window holds
between recent - block + 1 and recent keys, recent rounded up to blocks). Positions are a
sequence's own token indices: left padding does not count, so a padded row behaves exactly like
the same prompt alone. With a prompt length (prefill="full", the RLKV authors' rule), queries
inside the prompt attend causally to every key with every head; the compressed heads' rule holds
from the first query after it.

`keep_keys_mask` is that rule, written once; `masked_attention` applies any boolean mask to a
full cache with a plain softmax; `gate_mix` is the gated (RLKV training) mix of the two. Every compressed
runtime (the transformers cache in `rlkv.hf`, the engine) must reproduce
`masked_attention(q, k, v, keep_keys_mask(...))`.
"""

from __future__ import annotations

import torch


def token_positions(
    attention_mask: torch.Tensor | None, batch: int, length: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, valid) of every column of a 2-D padding mask (1 = token, 0 = padding).

    Positions count only real tokens: the first real token of each row is position 0.
    Padding columns get position -1 and valid False. Without a mask, all columns are tokens.
    """
    if attention_mask is None:
        pos = torch.arange(length, device=device).expand(batch, length)
        return pos, torch.ones(batch, length, dtype=torch.bool, device=device)
    valid = attention_mask.to(device=device).bool()
    pos = valid.long().cumsum(-1) - 1
    return pos.masked_fill(~valid, -1), valid


def block_window(sink: int, recent: int, block: int = 1) -> tuple[int, int]:
    """(sink, recent) rounded up to whole blocks: the streaming rule's sizes at `block` granularity."""
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be an integer >= 1 (1: token-exact streaming), got {block!r}")
    return -(-sink // block) * block, -(-recent // block) * block


def recent_start(q_pos, recent: int, block: int = 1):
    """The first recent key a query at `q_pos` sees: q - recent + 1, or at block granularity the start of
    the `recent // block`-th most recent block counting the query's own (`recent` already rounded)."""
    return (q_pos // block + 1) * block - recent


def keep_keys_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    full: torch.Tensor,
    sink: int,
    recent: int,
    window: int | None = None,
    prompt_len: torch.Tensor | int | None = None,
    block: int = 1,
) -> torch.Tensor:
    """Bool [batch, kv_heads, q, k]: which keys each query may attend to.

    q_pos [batch, q] and k_pos [batch, k] are token positions (-1 marks padding, which is never
    attended); `full` [kv_heads] says which heads keep every token. `window` is the model's own
    sliding window, if it has one, applied to every head. `prompt_len` ([batch] or one number):
    queries at positions < prompt_len attend like full heads. `block`: the streaming rule's granularity.
    """
    q = q_pos[:, None, :, None]
    k = k_pos[:, None, None, :]
    allowed = (k >= 0) & (k <= q)
    if window is not None:
        allowed &= k > q - window
    sink, recent = block_window(sink, recent, block)
    streaming = (k < sink) | (k >= recent_start(q, recent, block))
    if prompt_len is not None:
        streaming = streaming | (q < torch.as_tensor(prompt_len, device=q.device).reshape(-1, 1, 1, 1))
    return allowed & (full.to(q.device)[None, :, None, None] | streaming)


def masked_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """softmax(q k^T * scaling, masked) v with GQA; returns [batch, q, q_heads, head_dim].

    query [b, q_heads, q, d]; key/value [b, kv_heads, k, d]; mask [b, kv_heads, q, k] (True =
    attend). Query head i belongs to KV head i // (q_heads / kv_heads). Rows with nothing to
    attend (padding queries) return zeros.
    """
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    mask = mask.repeat_interleave(group, dim=1)
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.matmul(probs, value.float()).to(query.dtype)
    return out.transpose(1, 2).contiguous()


def gate_mix(
    full: torch.Tensor, stream: torch.Tensor, alpha: torch.Tensor, group: int, head_dim: int = 1
) -> torch.Tensor:
    """alpha * full + (1 - alpha) * stream: RLKV's gated attention output.

    `alpha` [kv_heads] is shared by the `group` query heads of each KV head, which lie along
    `head_dim` of `full` and `stream`. Differentiable in alpha.
    """
    a = alpha.to(device=full.device, dtype=full.dtype).repeat_interleave(group)
    a = a.view(*([1] * head_dim), -1, *([1] * (full.ndim - head_dim - 1)))
    return a * full + (1 - a) * stream
